// moa/kernels/cuda/norm.cuh: LayerNorm and RMSNorm over the last axis, forward and backward, on
// row-major float32 device buffers. Same semantics as kernels/reference/norm.hpp: forward saves
// mean/rstd, backward writes dx and accumulates (+=) dweight and dbias. One block per row for the
// row-wise parts; the weight gradients are column sums over blocks of rows, added with atomics.
#pragma once

#include <cstdint>

#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"
#include "moa/kernels/cuda/reduce.cuh"

namespace moa::kernels::cuda {

namespace detail {

static __global__ void layer_norm_forward_kernel(float* out, float* mean, float* rstd, const float* x,
                                                 const float* weight, const float* bias, int64_t C, float eps) {
  __shared__ float shared[32];
  const int64_t off = blockIdx.x * C;
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += x[off + c];
  const float m = block_sum(s, shared) / static_cast<float>(C);
  float v = 0.f;  // two passes: the variance of (x - mean), no cancellation
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float d = x[off + c] - m;
    v += d * d;
  }
  const float r = rsqrtf(block_sum(v, shared) / static_cast<float>(C) + eps);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    out[off + c] = (x[off + c] - m) * r * weight[c] + (bias ? bias[c] : 0.f);
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = m;
    rstd[blockIdx.x] = r;
  }
}

static __global__ void layer_norm_dx_kernel(float* dx, const float* dout, const float* x, const float* weight,
                                            const float* mean, const float* rstd, int64_t C) {
  __shared__ float shared[32];
  const int64_t off = blockIdx.x * C;
  const float m = mean[blockIdx.x], r = rstd[blockIdx.x];
  float mg = 0.f, mgx = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float g = dout[off + c] * weight[c];
    mg += g;
    mgx += g * (x[off + c] - m) * r;
  }
  mg = block_sum(mg, shared) / static_cast<float>(C);
  mgx = block_sum(mgx, shared) / static_cast<float>(C);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    dx[off + c] = r * (dout[off + c] * weight[c] - mg - (x[off + c] - m) * r * mgx);
}

static __global__ void rms_norm_forward_kernel(float* out, float* rstd, const float* x, const float* weight, int64_t C,
                                               float eps) {
  __shared__ float shared[32];
  const int64_t off = blockIdx.x * C;
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += x[off + c] * x[off + c];
  const float r = rsqrtf(block_sum(s, shared) / static_cast<float>(C) + eps);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) out[off + c] = x[off + c] * r * weight[c];
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

static __global__ void rms_norm_dx_kernel(float* dx, const float* dout, const float* x, const float* weight,
                                          const float* rstd, int64_t C) {
  __shared__ float shared[32];
  const int64_t off = blockIdx.x * C;
  const float r = rstd[blockIdx.x];
  float mgx = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) mgx += dout[off + c] * weight[c] * x[off + c];
  mgx = block_sum(mgx, shared) / static_cast<float>(C);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    dx[off + c] = r * (dout[off + c] * weight[c] - x[off + c] * r * r * mgx);
}

// Column sums for the weight gradients. Block (32, 8): 32 columns, 8 row lanes; blockIdx.y picks a
// slice of rows. dweight[c] += sum dout * xhat (xhat = (x - mean) * rstd, mean null for RMSNorm),
// dbias[c] += sum dout (dbias may be null).
static __global__ void norm_dweight_kernel(float* dweight, float* dbias, const float* dout, const float* x,
                                           const float* mean, const float* rstd, int64_t N, int64_t C) {
  __shared__ float sw[8][33], sb[8][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  float w = 0.f, b = 0.f;
  if (c < C)
    for (int64_t n = blockIdx.y * 8 + threadIdx.y; n < N; n += int64_t(gridDim.y) * 8) {
      const float g = dout[n * C + c];
      w += g * (x[n * C + c] - (mean ? mean[n] : 0.f)) * rstd[n];
      b += g;
    }
  sw[threadIdx.y][threadIdx.x] = w;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int k = 1; k < 8; ++k) {
      w += sw[k][threadIdx.x];
      b += sb[k][threadIdx.x];
    }
    if (dweight) atomicAdd(dweight + c, w);
    if (dbias) atomicAdd(dbias + c, b);
  }
}

inline void launch_norm_dweight(float* dweight, float* dbias, const float* dout, const float* x, const float* mean,
                                const float* rstd, int64_t N, int64_t C, cudaStream_t stream) {
  if (!dweight && !dbias) return;
  const int64_t col_blocks = (C + 31) / 32;
  int64_t row_blocks = (N + 63) / 64;  // about 64 rows per block, enough blocks to fill the GPU
  if (row_blocks > 1024) row_blocks = 1024;
  if (row_blocks < 1) row_blocks = 1;
  MOA_CUDA_LAUNCH(norm_dweight_kernel, dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks)),
                  dim3(32, 8), 0, stream, dweight, dbias, dout, x, mean, rstd, N, C);
  MOA_CUDA_LAUNCH_CHECK();
}

inline void check_norm(const char* op, int64_t N, int64_t C) {
  MOA_CHECK(N >= 0 && N <= 2147483647 && C >= 1, ShapeError, op, ": expected N in [0, 2^31) rows of C >= 1, got N ",
            N, ", C ", C);
}

}  // namespace detail

// out = (x - mean) * rstd * weight + bias per row; saves mean and rstd (N). x, out: (N, C);
// weight, bias: (C), bias may be null.
inline void layer_norm_forward(float* out, float* mean, float* rstd, const float* x, const float* weight,
                               const float* bias, int64_t N, int64_t C, float eps, cudaStream_t stream = nullptr) {
  detail::check_norm("layer_norm_forward", N, C);
  if (N == 0) return;
  MOA_CUDA_LAUNCH(detail::layer_norm_forward_kernel, static_cast<unsigned>(N), detail::row_threads(C), 0, stream, out,
                  mean, rstd, x, weight, bias, C, eps);
  MOA_CUDA_LAUNCH_CHECK();
}

// dx written, dweight and dbias accumulated; any may be null.
inline void layer_norm_backward(float* dx, float* dweight, float* dbias, const float* dout, const float* x,
                                const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C,
                                cudaStream_t stream = nullptr) {
  detail::check_norm("layer_norm_backward", N, C);
  if (N == 0) return;
  if (dx) {
    MOA_CUDA_LAUNCH(detail::layer_norm_dx_kernel, static_cast<unsigned>(N), detail::row_threads(C), 0, stream, dx, dout,
                    x, weight, mean, rstd, C);
    MOA_CUDA_LAUNCH_CHECK();
  }
  detail::launch_norm_dweight(dweight, dbias, dout, x, mean, rstd, N, C, stream);
}

// out = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps) per row (saved, (N)).
inline void rms_norm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t N, int64_t C,
                             float eps, cudaStream_t stream = nullptr) {
  detail::check_norm("rms_norm_forward", N, C);
  if (N == 0) return;
  MOA_CUDA_LAUNCH(detail::rms_norm_forward_kernel, static_cast<unsigned>(N), detail::row_threads(C), 0, stream, out,
                  rstd, x, weight, C, eps);
  MOA_CUDA_LAUNCH_CHECK();
}

// dx written, dweight accumulated; either may be null.
inline void rms_norm_backward(float* dx, float* dweight, const float* dout, const float* x, const float* weight,
                              const float* rstd, int64_t N, int64_t C, cudaStream_t stream = nullptr) {
  detail::check_norm("rms_norm_backward", N, C);
  if (N == 0) return;
  if (dx) {
    MOA_CUDA_LAUNCH(detail::rms_norm_dx_kernel, static_cast<unsigned>(N), detail::row_threads(C), 0, stream, dx, dout,
                    x, weight, rstd, C);
    MOA_CUDA_LAUNCH_CHECK();
  }
  detail::launch_norm_dweight(dweight, nullptr, dout, x, nullptr, rstd, N, C, stream);
}

}  // namespace moa::kernels::cuda
