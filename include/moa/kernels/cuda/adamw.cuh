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
// adamw_step_multi updates many parameters in a few launches (a list of up to 40 tensors passed by
// value per launch, like PyTorch's multi_tensor_apply): one step of a model with 144 LoRA matrices
// is 4 launches instead of 144. sum_squares_multi and scale_multi do the same for clipping.
//
// grad_norm_sq_accumulate / clip_grad_scale split moa::optim::clip_grad_norm: the squares are
// summed in double into one device double over all gradients, then every gradient is scaled by
// max_norm / (norm + 1e-6) when that is below 1, reading the norm on the device (no host sync).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

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

// The update of element i (the whole arithmetic; one_b1 = 1 - beta1, one_b2 = 1 - beta2).
__device__ __forceinline__ void adamw_update(float* w, float* m, float* v, const float* g, int64_t i,
                                             const AdamWScalars& s, float one_b1, float one_b2) {
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

static __global__ void adamw_kernel(float* w, float* m, float* v, const float* g, int64_t n, AdamWScalars s) {
  const float one_b1 = __fsub_rn(1.f, s.beta1), one_b2 = __fsub_rn(1.f, s.beta2);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    adamw_update(w, m, v, g, i, s, one_b1, one_b2);
}

// Up to kMaxTensors parameters in one launch, passed by value (no upload): blockIdx.y picks the
// tensor, the x blocks stride over its elements.
struct AdamWTensorList {
  static constexpr int kMaxTensors = 40;  // 40 x 40 bytes: well inside the 4 KB of kernel parameters
  float* w[kMaxTensors];
  float* m[kMaxTensors];
  float* v[kMaxTensors];
  const float* g[kMaxTensors];
  int64_t n[kMaxTensors];
};

static __global__ void adamw_multi_kernel(AdamWTensorList list, AdamWScalars s) {
  const float one_b1 = __fsub_rn(1.f, s.beta1), one_b2 = __fsub_rn(1.f, s.beta2);
  const int t = blockIdx.y;
  const int64_t n = list.n[t];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    adamw_update(list.w[t], list.m[t], list.v[t], list.g[t], i, s, one_b1, one_b2);
}

// Up to kMaxTensors buffers of n[t] floats in one launch (blockIdx.y: the buffer), by value.
template <class P>
struct BufferList {
  static constexpr int kMaxTensors = 128;  // 128 x 16 bytes
  P x[kMaxTensors];
  int64_t n[kMaxTensors];
};

// The sum of squares of every buffer into one double.
static __global__ void sq_norm_multi_kernel(double* acc, BufferList<const float*> list) {
  __shared__ double shared[32];
  const int t = blockIdx.y;
  const int64_t n = list.n[t];
  const float* x = list.x[t];
  double s = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  s = block_sum(s, shared);  // every thread of the block reaches it (no early return above)
  if (threadIdx.x == 0 && s != 0.0) atomicAdd(acc, s);
}

// x_t *= c for every buffer.
static __global__ void scale_multi_kernel(BufferList<float*> list, float c) {
  const int t = blockIdx.y;
  const int64_t n = list.n[t];
  float* x = list.x[t];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __fmul_rn(x[i], c);
}

// Calls launch(first, count, blocks_x) for groups of at most max_group of the n items, taken in
// order of decreasing size(i) so that a group's tensors need about the same number of blocks
// (blocks_x: for the largest of the group, at most max_blocks). Items of size 0 are skipped.
template <class Size, class Launch>
void for_each_group(std::size_t n, int max_group, unsigned max_blocks, Size&& size, Launch&& launch) {
  std::vector<std::size_t> order;
  order.reserve(n);
  for (std::size_t i = 0; i < n; ++i)
    if (size(i) > 0) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return size(a) > size(b); });
  for (std::size_t first = 0; first < order.size(); first += static_cast<std::size_t>(max_group)) {
    const std::size_t count = std::min(order.size() - first, static_cast<std::size_t>(max_group));
    const unsigned blocks = std::min(grid_for(size(order[first]), 256), max_blocks);
    launch(order.data() + first, count, blocks);
  }
}

// Calls launch(list, count, blocks_x) for BufferLists of the buffers (see for_each_group).
template <class P, class Launch>
void for_each_buffer_list(const std::pair<P, int64_t>* buffers, std::size_t count, unsigned max_blocks,
                          Launch&& launch) {
  for_each_group(
      count, BufferList<P>::kMaxTensors, max_blocks, [&](std::size_t i) { return buffers[i].second; },
      [&](const std::size_t* idx, std::size_t k, unsigned blocks) {
        BufferList<P> list{};
        for (std::size_t j = 0; j < k; ++j) {
          list.x[j] = buffers[idx[j]].first;
          list.n[j] = buffers[idx[j]].second;
        }
        launch(list, k, blocks);
      });
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

// One parameter of a multi-tensor AdamW step: n values of w, m, v and g.
struct AdamWTensor {
  float* w;
  float* m;
  float* v;
  const float* g;
  int64_t n;
};

// adamw_step for every tensor of the list, with ceil(count / 40) launches in all (each tensor's
// values get exactly adamw_step's arithmetic). Tensors with n == 0 are skipped.
inline void adamw_step_multi(const AdamWTensor* tensors, std::size_t count, const AdamWScalars& s,
                             cudaStream_t stream = nullptr) {
  detail::for_each_group(
      count, detail::AdamWTensorList::kMaxTensors, 4096, [&](std::size_t i) { return tensors[i].n; },
      [&](const std::size_t* idx, std::size_t k, unsigned blocks) {
        detail::AdamWTensorList list{};
        for (std::size_t j = 0; j < k; ++j) {
          const AdamWTensor& t = tensors[idx[j]];
          list.w[j] = t.w;
          list.m[j] = t.m;
          list.v[j] = t.v;
          list.g[j] = t.g;
          list.n[j] = t.n;
        }
        MOA_CUDA_LAUNCH(detail::adamw_multi_kernel, dim3(blocks, static_cast<unsigned>(k)), 256, 0, stream, list, s);
        MOA_CUDA_LAUNCH_CHECK();
      });
}

// *acc += sum over the buffers of x[i]^2 in double, ceil(count / 128) launches. acc: zeroed by the
// caller.
inline void sum_squares_multi(double* acc, const std::pair<const float*, int64_t>* buffers, std::size_t count,
                              cudaStream_t stream = nullptr) {
  detail::for_each_buffer_list(buffers, count, 1024, [&](const auto& list, std::size_t k, unsigned blocks) {
    MOA_CUDA_LAUNCH(detail::sq_norm_multi_kernel, dim3(blocks, static_cast<unsigned>(k)), 256, 0, stream, acc, list);
    MOA_CUDA_LAUNCH_CHECK();
  });
}

// x *= c (float32, rounded once) for every buffer, ceil(count / 128) launches.
inline void scale_multi(const std::pair<float*, int64_t>* buffers, std::size_t count, float c,
                        cudaStream_t stream = nullptr) {
  detail::for_each_buffer_list(buffers, count, 4096, [&](const auto& list, std::size_t k, unsigned blocks) {
    MOA_CUDA_LAUNCH(detail::scale_multi_kernel, dim3(blocks, static_cast<unsigned>(k)), 256, 0, stream, list, c);
    MOA_CUDA_LAUNCH_CHECK();
  });
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
