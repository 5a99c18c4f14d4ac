// moa/kernels/cuda/grouped_lora.cuh: the segmented LoRA product (Punica's SGMV) on float32 device
// buffers: rows are grouped by expert, and each stage is ONE launch for all experts, whatever their
// number; a warp finds its expert from the segment offsets, so no per-expert loop on the host.
//
//   for every assignment j (grouped by expert: seg[e] <= j < seg[e + 1] means expert e):
//     h[j]        = A_e x[rows[j]]                       (shrink: (In) -> (R))
//     y[rows[j]] += scale * w_j * B_e h[j]               (expand: (R) -> (Out))
//
// x: (N, In); y: (N, Out); rows: (M) int32 in [0, N); seg: (E + 1) int32, seg[0] = 0, seg[E] = M,
// non-decreasing; A: E device pointers, each (R, In) row-major; B: E device pointers, each (Out, R);
// w: (M) per-assignment weights in the same grouped order, or null (all 1); h: (M, R), written by the
// forward and kept for the backward. All experts share one rank R <= 64. This is what
// moa/ops/grouped_lora.hpp computes on the CPU, with its assignments sorted by expert (the caller
// sorts: detail::group_by_expert). When a row has several assignments (token-level top-k), pass
// rows_unique = false: the adds to y and dx then use atomics.
//
// The matrices A_e, B_e are small (R x In, Out x R) and stay in L1/L2; x and y are streamed once.
#pragma once

#include <cstdint>

#include "moa/core/error.hpp"
#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"
#include "moa/kernels/cuda/reduce.cuh"

namespace moa::kernels::cuda {

struct GroupedLoRAShape {
  int64_t N = 0;    // rows of x and y
  int64_t M = 0;    // assignments
  int64_t E = 0;    // experts
  int64_t In = 0;   // x columns
  int64_t Out = 0;  // y columns
  int64_t R = 0;    // rank, 1..64
  // Backward only: dx, dA_e and dB_e are written (every element, experts without assignments get
  // zeros) instead of accumulated, so the caller need not zero them first. The kernels then store
  // where each element has one writer (dx when the rows are a permutation, M == N with unique rows;
  // dA, dB when one slice covers each expert) and zero the rest in one launch before adding.
  bool write_grads = false;
};

namespace detail {

// The expert e with seg[e] <= j < seg[e + 1] (empty segments are skipped).
__device__ __forceinline__ int find_segment(const int32_t* seg, int E, int64_t j) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (seg[mid + 1] > j)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

// Assignments per warp in shrink and expand: every weight a lane reads serves this many
// assignments of the same expert (64 accumulators per lane whatever the rank).
template <int RMax>
constexpr int sgmv_rows = RMax <= 8 ? 8 : 64 / RMax;  // 8, 4, 2, 1

// Calls run(e, j, n) for the runs of the warp's assignments [first, min(first + Rows, M)) that
// share an expert: assignments j .. j + n - 1 of expert e (segments are contiguous, so a warp meets
// at most a few experts). The same for every lane of the warp.
template <class Run>
__device__ __forceinline__ void for_each_run(const int32_t* seg, int E, int64_t first, int64_t last, Run&& run) {
  for (int64_t j = first; j < last;) {
    const int e = find_segment(seg, E, j);
    const int64_t end = seg[e + 1] < last ? seg[e + 1] : last;
    run(e, j, static_cast<int>(end - j));
    j = end;
  }
}

// out[j, r] = s_j * sum_k in[rows[j], k] * W_e[r * sr + k * sk], s_j = scale * (w ? w[j] : 1).
// One warp per sgmv_rows<RMax> assignments: lanes split k (coalesced reads of the input rows),
// each weight read once for all the warp's assignments of its expert.
template <int RMax>
__global__ void sgmv_shrink_kernel(float* out, const float* in, int64_t ld_in, const float* const* W, int64_t sr,
                                   int64_t sk, int64_t K, int R, const int32_t* rows, const int32_t* seg, int E,
                                   int64_t M, float scale, const float* w) {
  constexpr int Rows = sgmv_rows<RMax>;
  const int lane = threadIdx.x & 31;
  const int64_t first = (blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5)) * Rows;
  const int64_t last = first + Rows < M ? first + Rows : M;
  for_each_run(seg, E, first, last, [&](int e, int64_t j, int n) {
    const float* We = W[e];
    const float* xr[Rows];
    float acc[Rows][RMax];
    MOA_UNROLL
    for (int i = 0; i < Rows; ++i) {
      xr[i] = in + static_cast<int64_t>(rows[j + (i < n ? i : 0)]) * ld_in;
      MOA_UNROLL
      for (int r = 0; r < RMax; ++r) acc[i][r] = 0.f;
    }
    for (int64_t k = lane; k < K; k += 32) {
      float xv[Rows];
      MOA_UNROLL
      for (int i = 0; i < Rows; ++i) xv[i] = i < n ? xr[i][k] : 0.f;
      MOA_UNROLL
      for (int r = 0; r < RMax; ++r) {
        if (r < R) {
          const float wv = We[r * sr + k * sk];
          MOA_UNROLL
          for (int i = 0; i < Rows; ++i) acc[i][r] += xv[i] * wv;
        }
      }
    }
    MOA_UNROLL
    for (int i = 0; i < Rows; ++i) {
      if (i >= n) break;  // n is the same for the whole warp
      const float s = scale * (w ? w[j + i] : 1.f);
      MOA_UNROLL
      for (int r = 0; r < RMax; ++r) {
        if (r >= R) break;
        const float v = warp_sum(acc[i][r]);
        if (lane == (r & 31)) out[(j + i) * R + r] = s * v;
      }
    }
  });
}

// out[rows[j], c] += s_j * sum_r h[j, r] * W_e[c * sc + r * sr], one warp per sgmv_rows<RMax>
// assignments; lanes split c, each weight read once for the warp's assignments of its expert.
// mode: plain adds, atomic adds (rows repeat), or stores (=, each row written once).
enum class ExpandMode : int { add, atomic_add, store };

template <int RMax>
__global__ void sgmv_expand_kernel(float* out, int64_t ld_out, const float* h, const float* const* W, int64_t sc,
                                   int64_t sr, int64_t Cn, int R, const int32_t* rows, const int32_t* seg, int E,
                                   int64_t M, float scale, const float* w, ExpandMode mode) {
  constexpr int Rows = sgmv_rows<RMax>;
  const int lane = threadIdx.x & 31;
  const int64_t first = (blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5)) * Rows;
  const int64_t last = first + Rows < M ? first + Rows : M;
  for_each_run(seg, E, first, last, [&](int e, int64_t j, int n) {
    const float* We = W[e];
    float hr[Rows][RMax];
    float* yr[Rows];
    MOA_UNROLL
    for (int i = 0; i < Rows; ++i) {
      const int64_t ji = j + (i < n ? i : 0);
      const float s = i < n ? scale * (w ? w[ji] : 1.f) : 0.f;
      MOA_UNROLL
      for (int r = 0; r < RMax; ++r) hr[i][r] = r < R ? s * h[ji * R + r] : 0.f;
      yr[i] = out + static_cast<int64_t>(rows[ji]) * ld_out;
    }
    for (int64_t c = lane; c < Cn; c += 32) {
      float acc[Rows];
      MOA_UNROLL
      for (int i = 0; i < Rows; ++i) acc[i] = 0.f;
      MOA_UNROLL
      for (int r = 0; r < RMax; ++r) {
        if (r < R) {
          const float wv = We[c * sc + r * sr];
          MOA_UNROLL
          for (int i = 0; i < Rows; ++i) acc[i] += hr[i][r] * wv;
        }
      }
      MOA_UNROLL
      for (int i = 0; i < Rows; ++i) {
        if (i >= n) break;
        if (mode == ExpandMode::atomic_add)
          atomicAdd(yr[i] + c, acc[i]);
        else if (mode == ExpandMode::store)
          yr[i][c] = acc[i];
        else
          yr[i][c] += acc[i];
      }
    }
  });
}

// out_e[p * sp + q * sq] += sum over j in segment e of coef_j * L[j, p] * G[rows[j], q], p < R, q < Q;
// coef_j = scale * (w ? w[j] : 1). Grid (Q / 32, E, S): blockIdx.z takes one of S slices of the
// segment's assignments; block (32, 8): threadIdx.x picks q, threadIdx.y picks p = y, y + 8, ...
// Slices add their partial sums with atomics; with store (one slice: each element has one writer)
// they are stored instead, zeros for an expert without assignments.
template <int RMax>
__global__ void sgmv_outer_kernel(float* const* out, int64_t sp, int64_t sq, const float* L, const float* G,
                                  int64_t ldg, int64_t Q, int R, const int32_t* rows, const int32_t* seg, float scale,
                                  const float* w, bool store) {
  constexpr int P = (RMax + 7) / 8;
  const int e = blockIdx.y;
  const int64_t q = blockIdx.x * int64_t(32) + threadIdx.x;
  const int64_t b = seg[e], len = seg[e + 1] - b;
  const int64_t chunk = (len + gridDim.z - 1) / gridDim.z;
  const int64_t j0 = b + blockIdx.z * chunk;
  const int64_t j1 = j0 + chunk < b + len ? j0 + chunk : b + len;
  if (q >= Q || (j0 >= j1 && !store) || !out[e]) return;
  float acc[P];
  MOA_UNROLL
  for (int i = 0; i < P; ++i) acc[i] = 0.f;
  for (int64_t j = j0; j < j1; ++j) {
    const float gq = G[static_cast<int64_t>(rows[j]) * ldg + q] * scale * (w ? w[j] : 1.f);
    MOA_UNROLL
    for (int i = 0; i < P; ++i) {
      const int p = threadIdx.y + 8 * i;
      if (p < R) acc[i] += L[j * R + p] * gq;
    }
  }
  float* o = out[e];
  MOA_UNROLL
  for (int i = 0; i < P; ++i) {
    const int p = threadIdx.y + 8 * i;
    if (p >= R) continue;
    if (store)
      o[p * sp + q * sq] = acc[i];
    else
      atomicAdd(o + p * sp + q * sq, acc[i]);
  }
}

// o[0 .. n) = 0.
static __global__ void zero_kernel(float* o, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    o[i] = 0.f;
}

// Zeroes out[e][0 .. n) for every e < E with out[e] non-null (out itself may be null: nothing).
// Grid (blocks, E, 2): blockIdx.z picks the array a (n_a values per expert) or b (n_b).
static __global__ void zero_expert_buffers_kernel(float* const* a, int64_t n_a, float* const* b, int64_t n_b) {
  float* const* arr = blockIdx.z == 0 ? a : b;
  const int64_t n = blockIdx.z == 0 ? n_a : n_b;
  if (!arr) return;
  float* o = arr[blockIdx.y];
  if (!o) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    o[i] = 0.f;
}

// dw[j] = h[j] . dh[j] (when dw), then dh[j] *= w[j] (when w). One thread per assignment.
static __global__ void sgmv_weight_grad_kernel(float* dw, float* dh, const float* h, const float* w, int R, int64_t M) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= M) return;
  float d = 0.f;
  const float wj = w ? w[j] : 1.f;
  for (int r = 0; r < R; ++r) {
    d += h[j * R + r] * dh[j * R + r];
    dh[j * R + r] *= wj;
  }
  if (dw) dw[j] = d;
}

inline void check_grouped_shape(const char* op, const GroupedLoRAShape& s) {
  MOA_CHECK(s.N >= 0 && s.M >= 0 && s.E >= 1 && s.E <= 65535 && s.In >= 1 && s.Out >= 1 && s.R >= 1 && s.R <= 64,
            ShapeError, op, ": expected N, M >= 0, E in [1, 65535], In, Out >= 1 and rank in [1, 64], got N ", s.N,
            ", M ", s.M, ", E ", s.E, ", In ", s.In, ", Out ", s.Out, ", R ", s.R);
}

// Calls f.template operator()<RMax>() with the smallest RMax in {8, 16, 32, 64} that holds R.
template <class F>
void dispatch_rank(int64_t R, F&& f) {
  if (R <= 8)
    f.template operator()<8>();
  else if (R <= 16)
    f.template operator()<16>();
  else if (R <= 32)
    f.template operator()<32>();
  else
    f.template operator()<64>();
}

constexpr int sgmv_warps = 8;  // warps per block in shrink and expand

template <int RMax>
unsigned sgmv_blocks(int64_t M) {
  constexpr int64_t per_block = int64_t(sgmv_warps) * sgmv_rows<RMax>;
  return static_cast<unsigned>((M + per_block - 1) / per_block);
}

}  // namespace detail

// Forward: h = x[rows] A_e^T (written, (M, R)); y[rows] += scale * w * h B_e^T. Two launches in all.
inline void grouped_lora_forward(float* y, float* h, const float* x, const float* const* A, const float* const* B,
                                 const int32_t* rows, const int32_t* seg, const float* w, float scale,
                                 const GroupedLoRAShape& s, bool rows_unique = true, cudaStream_t stream = nullptr) {
  detail::check_grouped_shape("grouped_lora_forward", s);
  if (s.M == 0) return;
  const int R = static_cast<int>(s.R), E = static_cast<int>(s.E);
  detail::dispatch_rank(s.R, [&]<int RMax>() {
    auto* shrink = detail::sgmv_shrink_kernel<RMax>;
    auto* expand = detail::sgmv_expand_kernel<RMax>;
    const unsigned blocks = detail::sgmv_blocks<RMax>(s.M);
    MOA_CUDA_LAUNCH(shrink, blocks, 32 * detail::sgmv_warps, 0, stream, h, x, s.In, A, /*sr=*/s.In, /*sk=*/1, s.In, R,
                    rows, seg, E, s.M, 1.f, nullptr);
    MOA_CUDA_LAUNCH_CHECK();
    MOA_CUDA_LAUNCH(expand, blocks, 32 * detail::sgmv_warps, 0, stream, y, s.Out, h, B, /*sc=*/s.R, /*sr=*/1, s.Out, R,
                    rows, seg, E, s.M, scale, w,
                    rows_unique ? detail::ExpandMode::add : detail::ExpandMode::atomic_add);
    MOA_CUDA_LAUNCH_CHECK();
  });
}

// Backward, with g = dL/dy (N, Out) and h from the forward:
//   dh[j]  = scale * w_j * B_e^T g[rows[j]]          (scratch, (M, R), written)
//   dw[j]  = scale * h[j] . (B_e^T g[rows[j]])       (written; null: not wanted)
//   dx[rows[j]] += A_e^T dh[j]                        (accumulated; null: not wanted)
//   dA_e  += sum_j dh[j]^T x[rows[j]]                 (accumulated; dA null or dA[e] null: not wanted)
//   dB_e  += sum_j scale * w_j g[rows[j]]^T h[j]      (accumulated; likewise)
// dA and dB are device arrays of E pointers. Experts without assignments get nothing added. With
// s.write_grads, dx, dA_e and dB_e are written instead (= in place of +=; zeros where nothing adds).
inline void grouped_lora_backward(float* dx, float* const* dA, float* const* dB, float* dw, float* dh, const float* g,
                                  const float* x, const float* h, const float* const* A, const float* const* B,
                                  const int32_t* rows, const int32_t* seg, const float* w, float scale,
                                  const GroupedLoRAShape& s, bool rows_unique = true, cudaStream_t stream = nullptr) {
  detail::check_grouped_shape("grouped_lora_backward", s);
  const int R = static_cast<int>(s.R), E = static_cast<int>(s.E);
  // Slices per expert for the weight gradients: about 64 assignments each, enough blocks to fill the GPU.
  int64_t slices = s.M / (s.E * 64);
  slices = slices < 1 ? 1 : (slices > 64 ? 64 : slices);
  // Written outputs: dx is stored directly when every row has exactly one assignment, dA / dB when
  // one slice covers each expert; what is still added into is zeroed first (dx by one launch, every
  // expert's dA and dB by one more).
  const bool store_dx = s.write_grads && s.M == s.N && rows_unique;
  const bool store_w = s.write_grads && slices == 1 && s.M > 0;
  auto blocks_for = [](int64_t n) { return static_cast<unsigned>((n + 255) / 256 < 1024 ? (n + 255) / 256 : 1024); };
  if (s.write_grads && dx && !store_dx && s.N > 0) {
    MOA_CUDA_LAUNCH(detail::zero_kernel, blocks_for(s.N * s.In), 256, 0, stream, dx, s.N * s.In);
    MOA_CUDA_LAUNCH_CHECK();
  }
  if (s.write_grads && !store_w && (dA || dB)) {
    const unsigned bx = blocks_for(s.R * (s.In > s.Out ? s.In : s.Out));
    MOA_CUDA_LAUNCH(detail::zero_expert_buffers_kernel, dim3(bx, static_cast<unsigned>(E), 2), 256, 0, stream, dA,
                    s.R * s.In, dB, s.Out * s.R);
    MOA_CUDA_LAUNCH_CHECK();
  }
  if (s.M == 0) return;
  detail::dispatch_rank(s.R, [&]<int RMax>() {
    auto* shrink = detail::sgmv_shrink_kernel<RMax>;
    auto* expand = detail::sgmv_expand_kernel<RMax>;
    auto* outer = detail::sgmv_outer_kernel<RMax>;
    auto* weight_grad = detail::sgmv_weight_grad_kernel;
    const unsigned blocks = detail::sgmv_blocks<RMax>(s.M);
    // dh without the weights: scale * B_e^T g[row], read as W_e[r, o] = B_e[o * R + r].
    MOA_CUDA_LAUNCH(shrink, blocks, 32 * detail::sgmv_warps, 0, stream, dh, g, s.Out, B, /*sr=*/1, /*sk=*/s.R, s.Out,
                    R, rows, seg, E, s.M, scale, nullptr);
    MOA_CUDA_LAUNCH_CHECK();
    if (dw || w) {
      MOA_CUDA_LAUNCH(weight_grad, static_cast<unsigned>((s.M + 255) / 256), 256, 0, stream, dw, dh, h, w, R, s.M);
      MOA_CUDA_LAUNCH_CHECK();
    }
    if (dx) {  // dx[row, i] += sum_r dh[j, r] A_e[r, i]: W_e[i, r] = A_e[r * In + i]
      const detail::ExpandMode mode = store_dx
                                          ? detail::ExpandMode::store
                                          : (rows_unique ? detail::ExpandMode::add : detail::ExpandMode::atomic_add);
      MOA_CUDA_LAUNCH(expand, blocks, 32 * detail::sgmv_warps, 0, stream, dx, s.In, dh, A, /*sc=*/1, /*sr=*/s.In, s.In,
                      R, rows, seg, E, s.M, 1.f, nullptr, mode);
      MOA_CUDA_LAUNCH_CHECK();
    }
    if (dA) {  // dA_e[r, i] += sum_j dh[j, r] x[row_j, i]
      const dim3 grid(static_cast<unsigned>((s.In + 31) / 32), static_cast<unsigned>(E), static_cast<unsigned>(slices));
      MOA_CUDA_LAUNCH(outer, grid, dim3(32, 8), 0, stream, dA, /*sp=*/s.In, /*sq=*/1, dh, x, s.In, s.In, R, rows, seg,
                      1.f, nullptr, store_w);
      MOA_CUDA_LAUNCH_CHECK();
    }
    if (dB) {  // dB_e[o, r] += sum_j scale w_j g[row_j, o] h[j, r]
      const dim3 grid(static_cast<unsigned>((s.Out + 31) / 32), static_cast<unsigned>(E), static_cast<unsigned>(slices));
      MOA_CUDA_LAUNCH(outer, grid, dim3(32, 8), 0, stream, dB, /*sp=*/1, /*sq=*/s.R, h, g, s.Out, s.Out, R, rows, seg,
                      scale, w, store_w);
      MOA_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace moa::kernels::cuda
