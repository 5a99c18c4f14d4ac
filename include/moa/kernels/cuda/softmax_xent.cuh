// moa/kernels/cuda/softmax_xent.cuh: softmax and log-softmax over the last axis, and cross-entropy
// fused with log-softmax (ignore_index), forward and backward, on row-major float32 device buffers.
// Same semantics as kernels/reference/softmax.hpp and cross_entropy.hpp; one block per row, sums in
// float32 (the reference sums in double: see the error bounds in tests/cuda/test_cuda_ops.cu).
#pragma once

#include <cmath>
#include <cstdint>

#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"
#include "moa/kernels/cuda/reduce.cuh"

namespace moa::kernels::cuda {

namespace detail {

// log(sum(exp(x))) of a row, computed by the whole block in one pass over memory (the online
// softmax): each thread keeps a running maximum m and its sum of exp(x - m), rescaled when m grows;
// the block then rescales every thread's sum to the row maximum. -inf entries add nothing; a NaN,
// a +inf, or a row of -inf only give NaN, as the two-pass reference (exp(inf - inf)).
__device__ __forceinline__ float row_logsumexp(const float* x, int64_t C, float* shared) {
  float m = -INFINITY, s = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = x[c];
    if (v > m) {
      s = s * expf(m - v) + 1.f;  // first value: 0 * exp(-inf) + 1
      m = v;
    } else if (v != -INFINITY) {
      s += expf(v - m);
    }
  }
  const float row_max = block_max(m, shared);
  s = block_sum(s == 0.f ? 0.f : s * expf(m - row_max), shared);
  if (row_max == -INFINITY) return C > 0 ? NAN : -INFINITY;
  return row_max + logf(s);
}

template <bool Log>
__global__ void softmax_forward_kernel(float* out, const float* x, int64_t C) {
  __shared__ float shared[32];
  const float* xr = x + blockIdx.x * C;
  float* yr = out + blockIdx.x * C;
  const float lse = row_logsumexp(xr, C, shared);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) yr[c] = Log ? xr[c] - lse : expf(xr[c] - lse);
}

template <bool Log>
__global__ void softmax_backward_kernel(float* dx, const float* dout, const float* y, int64_t C) {
  __shared__ float shared[32];
  const int64_t off = blockIdx.x * C;
  float s = 0.f;  // softmax: sum(dout * y); log-softmax: sum(dout)
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += Log ? dout[off + c] : dout[off + c] * y[off + c];
  s = block_sum(s, shared);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    dx[off + c] = Log ? dout[off + c] - expf(y[off + c]) * s : y[off + c] * (dout[off + c] - s);
}

static __global__ void xent_lse_kernel(float* lse, const float* logits, int64_t V) {
  __shared__ float shared[32];
  const float l = row_logsumexp(logits + blockIdx.x * V, V, shared);
  if (threadIdx.x == 0) lse[blockIdx.x] = l;
}

// One block: loss = mean over kept rows of lse[n] - logits[n, t_n] (0 when none is kept); also
// writes the backward's per-element scale dloss / count when `scale_out` is given.
static __global__ void xent_mean_kernel(float* loss, const float* lse, const float* logits, const int32_t* targets, int64_t N,
                                 int64_t V, int32_t ignore_index) {
  __shared__ float shared[32];
  float total = 0.f, count = 0.f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int32_t t = targets[n];
    if (t == ignore_index) continue;
    total += lse[n] - logits[n * V + t];
    count += 1.f;
  }
  total = block_sum(total, shared);
  count = block_sum(count, shared);
  if (threadIdx.x == 0) loss[0] = count > 0.f ? total / count : 0.f;
}

static __global__ void xent_scale_kernel(float* scale, const float* dloss, const int32_t* targets, int64_t N,
                                  int32_t ignore_index) {
  __shared__ float shared[32];
  float count = 0.f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) count += targets[n] != ignore_index ? 1.f : 0.f;
  count = block_sum(count, shared);
  if (threadIdx.x == 0) scale[0] = count > 0.f ? dloss[0] / count : 0.f;
}

static __global__ void xent_backward_kernel(float* dlogits, const float* scale, const float* logits, const float* lse,
                                     const int32_t* targets, int64_t V, int32_t ignore_index) {
  const int64_t n = blockIdx.x;
  const int32_t t = targets[n];
  float* d = dlogits + n * V;
  if (t == ignore_index) {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) d[v] = 0.f;
    return;
  }
  const float s = scale[0], l = lse[n];
  const float* x = logits + n * V;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) d[v] = s * (expf(x[v] - l) - (v == t ? 1.f : 0.f));
}

// One block per row: loss_rows[n] = scale * (lse - x[t]) (0 on ignored rows); with d, its logit
// gradient scale * (softmax - onehot) is written over d, which may be the logits themselves:
// every thread has read the target's logit (and finished its pass for the log-sum-exp) before any
// writes.
static __global__ void xent_rows_kernel(float* loss_rows, float* d, const float* logits, const int32_t* targets,
                                        int64_t V, int32_t ignore_index, float scale) {
  __shared__ float shared[32];
  const int64_t n = blockIdx.x;
  const int32_t t = targets[n];
  float* dr = d ? d + n * V : nullptr;
  if (t == ignore_index) {
    if (threadIdx.x == 0) loss_rows[n] = 0.f;
    if (dr)
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) dr[v] = 0.f;
    return;
  }
  const float* x = logits + n * V;
  const float l = row_logsumexp(x, V, shared);
  const float xt = x[t];
  if (threadIdx.x == 0) loss_rows[n] = scale * (l - xt);
  if (!dr) return;
  __syncthreads();  // x[t] read by every thread before any writes over it
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) dr[v] = scale * (expf(x[v] - l) - (v == t ? 1.f : 0.f));
}

inline void check_rows(const char* op, int64_t N, int64_t C) {
  MOA_CHECK(N >= 0 && N <= 2147483647 && C >= 1, ShapeError, op, ": expected N in [0, 2^31) rows of C >= 1, got N ",
            N, ", C ", C);
}

}  // namespace detail

// out = softmax(x) row by row. x, out: (N, C).
inline void softmax_forward(float* out, const float* x, int64_t N, int64_t C, cudaStream_t stream = nullptr) {
  detail::check_rows("softmax_forward", N, C);
  if (N == 0) return;
  MOA_CUDA_LAUNCH(detail::softmax_forward_kernel<false>, static_cast<unsigned>(N), detail::row_threads(C), 0, stream,
                  out, x, C);
  MOA_CUDA_LAUNCH_CHECK();
}

// dx = y * (dout - sum(dout * y)), y the forward's output. (N, C). dx is written.
inline void softmax_backward(float* dx, const float* dout, const float* y, int64_t N, int64_t C,
                             cudaStream_t stream = nullptr) {
  detail::check_rows("softmax_backward", N, C);
  if (N == 0) return;
  MOA_CUDA_LAUNCH(detail::softmax_backward_kernel<false>, static_cast<unsigned>(N), detail::row_threads(C), 0, stream,
                  dx, dout, y, C);
  MOA_CUDA_LAUNCH_CHECK();
}

// out = x - logsumexp(x) row by row. (N, C).
inline void log_softmax_forward(float* out, const float* x, int64_t N, int64_t C, cudaStream_t stream = nullptr) {
  detail::check_rows("log_softmax_forward", N, C);
  if (N == 0) return;
  MOA_CUDA_LAUNCH(detail::softmax_forward_kernel<true>, static_cast<unsigned>(N), detail::row_threads(C), 0, stream,
                  out, x, C);
  MOA_CUDA_LAUNCH_CHECK();
}

// dx = dout - exp(y) * sum(dout), y the forward's output (log-probabilities). (N, C). Written.
inline void log_softmax_backward(float* dx, const float* dout, const float* y, int64_t N, int64_t C,
                                 cudaStream_t stream = nullptr) {
  detail::check_rows("log_softmax_backward", N, C);
  if (N == 0) return;
  MOA_CUDA_LAUNCH(detail::softmax_backward_kernel<true>, static_cast<unsigned>(N), detail::row_threads(C), 0, stream,
                  dx, dout, y, C);
  MOA_CUDA_LAUNCH_CHECK();
}

// loss[0] = mean over rows with targets[n] != ignore_index of lse[n] - logits[n, t_n] (0 when every
// row is ignored); lse[n] = logsumexp(logits[n, :]) for every row, saved for backward.
// loss: 1 float on the device; logits: (N, V); targets: (N), in [0, V) or ignore_index (the caller
// checks); lse: (N). The default ignore_index is PyTorch's -100.
inline void cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* targets, int64_t N,
                                  int64_t V, int32_t ignore_index = -100, cudaStream_t stream = nullptr) {
  detail::check_rows("cross_entropy_forward", N, V);
  if (N > 0) {
    MOA_CUDA_LAUNCH(detail::xent_lse_kernel, static_cast<unsigned>(N), detail::row_threads(V), 0, stream, lse, logits,
                    V);
    MOA_CUDA_LAUNCH_CHECK();
  }
  MOA_CUDA_LAUNCH(detail::xent_mean_kernel, 1, 1024, 0, stream, loss, lse, logits, targets, N, V, ignore_index);
  MOA_CUDA_LAUNCH_CHECK();
}

// dlogits[n, :] = dloss / count * (softmax(logits[n, :]) - onehot(t_n)) for kept rows, 0 for ignored
// rows. dloss: 1 float on the device (the upstream gradient, usually 1); scratch: 1 float on the
// device (the per-element scale; kernels allocate nothing). Written. (N, V). dlogits may be logits
// (each element is read, then written, by one thread).
inline void cross_entropy_backward(float* dlogits, const float* dloss, const float* logits, const float* lse,
                                   const int32_t* targets, int64_t N, int64_t V, float* scratch,
                                   int32_t ignore_index = -100, cudaStream_t stream = nullptr) {
  detail::check_rows("cross_entropy_backward", N, V);
  if (N == 0) return;
  MOA_CUDA_LAUNCH(detail::xent_scale_kernel, 1, 1024, 0, stream, scratch, dloss, targets, N, ignore_index);
  MOA_CUDA_LAUNCH_CHECK();
  MOA_CUDA_LAUNCH(detail::xent_backward_kernel, static_cast<unsigned>(N), detail::row_threads(V), 0, stream, dlogits,
                  scratch, logits, lse, targets, V, ignore_index);
  MOA_CUDA_LAUNCH_CHECK();
}

// Per row, in one pass over its logits (plus one more for the gradient): loss_rows[n] =
// scale * (logsumexp(logits[n]) - logits[n, t_n]), 0 on ignored rows; with dlogits, its gradient
// dlogits[n, :] = scale * (softmax(logits[n]) - onehot(t_n)), 0 on ignored rows, written (dlogits
// may be logits). What linear_cross_entropy runs on each chunk with scale = 1 / (kept rows), known
// on the host: the loss is then the sum of loss_rows, with no per-chunk reduction or scale kernel.
inline void cross_entropy_rows(float* loss_rows, float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                               int64_t V, int32_t ignore_index, float scale, cudaStream_t stream = nullptr) {
  detail::check_rows("cross_entropy_rows", N, V);
  if (N == 0) return;
  MOA_CUDA_LAUNCH(detail::xent_rows_kernel, static_cast<unsigned>(N), detail::row_threads(V), 0, stream, loss_rows,
                  dlogits, logits, targets, V, ignore_index, scale);
  MOA_CUDA_LAUNCH_CHECK();
}

}  // namespace moa::kernels::cuda
