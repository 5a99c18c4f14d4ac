// moa/kernels/cuda/adamw.cuh: the fused AdamW step and the global gradient norm for clipping, on
// float32 device buffers.
//
// adamw_step makes, element by element, exactly the float32 operations moa::optim::AdamW::step
// makes on the CPU (include/moa/optim/adamw.hpp), in the same order:
//   w *= decay;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g g;  w -= step_size m / (sqrt(v) inv_sqrt_bc2 + eps)
// with the same scalars computed on the host in double and rounded to float (AdamWScalars). Each
// operation uses an explicitly rounded intrinsic so nvcc cannot fuse a multiply and an add into an
// FMA: the result is bit-identical to an unfused CPU evaluation.
//
// grad_norm_sq_accumulate / clip_grad_scale split moa::optim::clip_grad_norm: the squares are
// summed in double into one device double over all gradients, then every gradient is scaled by
// max_norm / (norm + 1e-6) when that is below 1, reading the norm on the device (no host sync).
#pragma once

#include <cmath>
#include <cstdint>

#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"
#include "moa/kernels/cuda/reduce.cuh"

namespace moa::kernels::cuda {

// The per-step scalars, computed as AdamW::step computes them (step counts from 1).
struct AdamWScalars {
  float beta1, beta2, decay, step_size, inv_sqrt_bc2, eps;

  static AdamWScalars make(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    return {static_cast<float>(beta1),       static_cast<float>(beta2),
            static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(lr / bc1),
            static_cast<float>(1.0 / std::sqrt(bc2)),    static_cast<float>(eps)};
  }
};

namespace detail {

static __global__ void adamw_kernel(float* w, float* m, float* v, const float* g, int64_t n, AdamWScalars s) {
  const float one_b1 = __fsub_rn(1.f, s.beta1), one_b2 = __fsub_rn(1.f, s.beta2);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    float wi = __fmul_rn(w[i], s.decay);
    const float mi = __fadd_rn(__fmul_rn(s.beta1, m[i]), __fmul_rn(one_b1, gi));
    const float vi = __fadd_rn(__fmul_rn(s.beta2, v[i]), __fmul_rn(__fmul_rn(one_b2, gi), gi));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), s.inv_sqrt_bc2), s.eps);
    wi = __fsub_rn(wi, __fdiv_rn(__fmul_rn(s.step_size, mi), denom));
    w[i] = wi;
    m[i] = mi;
    v[i] = vi;
  }
}

static __global__ void sq_norm_kernel(double* acc, const float* g, int64_t n) {
  __shared__ double shared[32];
  double s = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    s += static_cast<double>(g[i]) * static_cast<double>(g[i]);
  s = block_sum(s, shared);
  if (threadIdx.x == 0) atomicAdd(acc, s);
}

static __global__ void clip_scale_kernel(float* g, int64_t n, const double* total_sq, double max_norm) {
  const double coef = max_norm / (::sqrt(*total_sq) + 1e-6);
  if (!(coef < 1.0)) return;  // also leaves a NaN norm alone: the caller reads it and stops
  const float c = static_cast<float>(coef);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    g[i] *= c;
}

}  // namespace detail

// One AdamW update of n parameters w with gradient g and moments m, v (all (n), updated in place).
inline void adamw_step(float* w, float* m, float* v, const float* g, int64_t n, const AdamWScalars& s,
                       cudaStream_t stream = nullptr) {
  if (n <= 0) return;
  MOA_CUDA_LAUNCH(detail::adamw_kernel, detail::grid_for(n, 256), 256, 0, stream, w, m, v, g, n, s);
  MOA_CUDA_LAUNCH_CHECK();
}

// *acc += sum of g[i]^2 in double. acc: 1 double on the device, zeroed by the caller before the
// first gradient (cudaMemsetAsync); call once per gradient buffer.
inline void grad_norm_sq_accumulate(double* acc, const float* g, int64_t n, cudaStream_t stream = nullptr) {
  if (n <= 0) return;
  unsigned blocks = detail::grid_for(n, 256);
  if (blocks > 1024) blocks = 1024;  // few atomics on the one accumulator
  MOA_CUDA_LAUNCH(detail::sq_norm_kernel, blocks, 256, 0, stream, acc, g, n);
  MOA_CUDA_LAUNCH_CHECK();
}

// g *= max_norm / (sqrt(*total_sq) + 1e-6) when that is below 1 (as clip_grad_norm); call once per
// gradient buffer after all grad_norm_sq_accumulate calls. The norm is sqrt(*total_sq).
inline void clip_grad_scale(float* g, int64_t n, const double* total_sq, double max_norm,
                            cudaStream_t stream = nullptr) {
  MOA_CHECK(max_norm > 0, ValueError, "clip_grad_scale: expected max_norm > 0, got ", max_norm);
  if (n <= 0) return;
  MOA_CUDA_LAUNCH(detail::clip_scale_kernel, detail::grid_for(n, 256), 256, 0, stream, g, n, total_sq, max_norm);
  MOA_CUDA_LAUNCH_CHECK();
}

}  // namespace moa::kernels::cuda
