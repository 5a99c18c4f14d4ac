// moa/kernels/cuda/embedding.cuh: embedding lookup (row gather) and its backward (scatter-add into
// the table with atomics: repeated ids add up, in no fixed order), float32 device buffers. Same
// semantics as kernels/reference/embedding.hpp.
#pragma once

#include <cstdint>

#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"
#include "moa/kernels/cuda/reduce.cuh"

namespace moa::kernels::cuda {

namespace detail {

static __global__ void embedding_forward_kernel(float* out, const int32_t* ids, const float* weight, int64_t N,
                                                int64_t C) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N * C; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i - n * C;
    out[i] = weight[static_cast<int64_t>(ids[n]) * C + c];
  }
}

static __global__ void embedding_backward_kernel(float* dweight, const float* dout, const int32_t* ids, int64_t N,
                                                 int64_t C) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N * C; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i - n * C;
    atomicAdd(dweight + static_cast<int64_t>(ids[n]) * C + c, dout[i]);
  }
}

}  // namespace detail

// out[n, :] = weight[ids[n], :]. out: (N, C); ids: (N), each in [0, V) (the caller checks); weight: (V, C).
inline void embedding_forward(float* out, const int32_t* ids, const float* weight, int64_t N, int64_t C,
                              cudaStream_t stream = nullptr) {
  if (N <= 0 || C <= 0) return;
  MOA_CUDA_LAUNCH(detail::embedding_forward_kernel, detail::grid_for(N * C, 256), 256, 0, stream, out, ids, weight, N,
                  C);
  MOA_CUDA_LAUNCH_CHECK();
}

// dweight[ids[n], :] += dout[n, :] (accumulated). dweight: (V, C); dout: (N, C).
inline void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t C,
                               cudaStream_t stream = nullptr) {
  if (N <= 0 || C <= 0) return;
  MOA_CUDA_LAUNCH(detail::embedding_backward_kernel, detail::grid_for(N * C, 256), 256, 0, stream, dweight, dout, ids,
                  N, C);
  MOA_CUDA_LAUNCH_CHECK();
}

}  // namespace moa::kernels::cuda
