// moa/kernels/cuda/activation.cuh: elementwise GELU (tanh form, GPT-2) and SiLU, forward and
// backward, on float32 device buffers. The formulas are kernels/reference/activation.hpp's.
#pragma once

#include <cstdint>

#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"
#include "moa/kernels/cuda/reduce.cuh"

namespace moa::kernels::cuda {

enum class Activation { gelu, silu };

namespace detail {

__device__ __forceinline__ float gelu_f(float x) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  const float u = c * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + tanhf(u));
}
__device__ __forceinline__ float gelu_grad_f(float x) {
  const float c = 0.7978845608028654f;
  const float u = c * (x + 0.044715f * x * x * x);
  const float th = tanhf(u);
  const float du = c * (1.f + 3.f * 0.044715f * x * x);
  return 0.5f * (1.f + th) + 0.5f * x * (1.f - th * th) * du;
}
__device__ __forceinline__ float silu_f(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float silu_grad_f(float x) {
  const float s = 1.f / (1.f + expf(-x));
  return s * (1.f + x * (1.f - s));
}

template <Activation A>
__global__ void activation_forward_kernel(float* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = A == Activation::gelu ? gelu_f(x[i]) : silu_f(x[i]);
}

template <Activation A>
__global__ void activation_backward_kernel(float* dx, const float* dy, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dx[i] = dy[i] * (A == Activation::gelu ? gelu_grad_f(x[i]) : silu_grad_f(x[i]));
}

}  // namespace detail

// y = act(x), n elements (y may be x).
inline void activation_forward(Activation a, float* y, const float* x, int64_t n, cudaStream_t stream = nullptr) {
  if (n <= 0) return;
  const unsigned g = detail::grid_for(n, 256);
  if (a == Activation::gelu)
    MOA_CUDA_LAUNCH(detail::activation_forward_kernel<Activation::gelu>, g, 256, 0, stream, y, x, n);
  else
    MOA_CUDA_LAUNCH(detail::activation_forward_kernel<Activation::silu>, g, 256, 0, stream, y, x, n);
  MOA_CUDA_LAUNCH_CHECK();
}

// dx = dy * act'(x), written (dx may be dy), n elements; x is the forward's input.
inline void activation_backward(Activation a, float* dx, const float* dy, const float* x, int64_t n,
                                cudaStream_t stream = nullptr) {
  if (n <= 0) return;
  const unsigned g = detail::grid_for(n, 256);
  if (a == Activation::gelu)
    MOA_CUDA_LAUNCH(detail::activation_backward_kernel<Activation::gelu>, g, 256, 0, stream, dx, dy, x, n);
  else
    MOA_CUDA_LAUNCH(detail::activation_backward_kernel<Activation::silu>, g, 256, 0, stream, dx, dy, x, n);
  MOA_CUDA_LAUNCH_CHECK();
}

}  // namespace moa::kernels::cuda
