// moa/kernels/cuda/reduce.cuh: warp and block reductions (sum, max) shared by the row kernels
// (softmax, cross-entropy, norms). Block reductions need blockDim.x a multiple of 32, at most 1024,
// and every thread of the block to call them.
#pragma once

#include <cmath>

#include "moa/kernels/cuda/launch.cuh"

namespace moa::kernels::cuda::detail {

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  MOA_UNROLL
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
  MOA_UNROLL
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The sum over the block, returned to every thread. `shared` holds 32 values; the trailing
// __syncthreads lets the caller reuse it for the next reduction.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = lane < warps ? shared[lane] : T(0);
  r = warp_sum(r);
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float r = lane < warps ? shared[lane] : -INFINITY;
  r = warp_max(r);
  __syncthreads();
  return r;
}

// Threads per block for a row of C elements: enough to cover the row once, 32..1024.
inline int row_threads(long long C) {
  int t = 32;
  while (t < C && t < 1024) t *= 2;
  return t;
}

// Grid size for a grid-stride elementwise kernel over n elements.
inline unsigned grid_for(long long n, int threads) {
  long long b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > 65535LL * 16) b = 65535LL * 16;
  return static_cast<unsigned>(b);
}

}  // namespace moa::kernels::cuda::detail
