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
// A warp shrinks its assignments and expands them at once (sgmv_fused_kernel: h never makes a round
// trip through memory in between): the forward is one launch, the backward two (dh, dw and dx in
// one; dA and dB of every expert in the other), plus one zeroing launch when gradients are written
// over memory that more than one slice adds into.
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
  // With write_grads: dx is accumulated all the same (dA_e and dB_e are written).
  bool add_dx = false;
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

// How the expand adds into its output: plain adds, atomic adds (rows repeat), or stores (=, each
// row written once).
enum class ExpandMode : int { add, atomic_add, store };

// The shrink and the expand of the same assignments in one kernel. One warp per sgmv_rows<RMax>
// assignments, taken in runs of one expert; for each assignment j of expert e:
//   v_j[r]   = pre * sum_k in[rows[j], k] * W1_e[r * sr1 + k * sk1]       (r < R; lanes split k, then
//              every lane holds all of v_j)
//   dw[j]    = h_in[j] . v_j                                              (when dw)
//   v_j     *= w_j                                                        (when weighted_v)
//   v_out[j] = v_j                                                        ((M, R), written)
//   out[rows[j], c] (+)= coef_j * sum_r v_j[r] * W2_e[c * sc2 + r * sr2]  (when out; lanes split c)
// with coef_j = post * (weighted_v ? 1 : w_j), w_j = w ? w[j] : 1. Each weight is read once for all
// the warp's assignments of its expert. mode: plain adds, atomic adds (rows repeat), or stores.
//   forward:  in x, W1 = A, v = h, W2 = B, post = scale      (y[rows] += scale w h B^T)
//   backward: in g, W1 = B^T, pre = scale, dw, weighted v = dh, W2 = A^T   (dx[rows] += dh A)
template <int RMax>
__global__ void sgmv_fused_kernel(float* out, int64_t ld_out, const float* in, int64_t ld_in, const float* const* W1,
                                  int64_t sr1, int64_t sk1, int64_t K, const float* const* W2, int64_t sc2, int64_t sr2,
                                  int64_t Cn, int R, const int32_t* rows, const int32_t* seg, int E, int64_t M,
                                  float pre, float post, const float* w, bool weighted_v, float* v_out, float* dw,
                                  const float* h_in, ExpandMode mode) {
  constexpr int Rows = sgmv_rows<RMax>;
  const int lane = threadIdx.x & 31;
  const int64_t first = (blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5)) * Rows;
  const int64_t last = first + Rows < M ? first + Rows : M;
  for_each_run(seg, E, first, last, [&](int e, int64_t j, int n) {
    // Shrink: acc[i][r] = v_{j+i}[r].
    const float* W1e = W1[e];
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
          const float wv = W1e[r * sr1 + k * sk1];
          MOA_UNROLL
          for (int i = 0; i < Rows; ++i) acc[i][r] += xv[i] * wv;
        }
      }
    }
    // Every lane gets all of v (butterfly sums); then dw, the weights, the stored v and the
    // expand's coefficient, row by row (n, R and the branches are the same for the whole warp).
    MOA_UNROLL
    for (int i = 0; i < Rows; ++i) {
      if (i >= n) {
        MOA_UNROLL
        for (int r = 0; r < RMax; ++r) acc[i][r] = 0.f;
        continue;
      }
      const int64_t ji = j + i;
      MOA_UNROLL
      for (int r = 0; r < RMax; ++r) acc[i][r] = r < R ? pre * warp_sum(acc[i][r]) : 0.f;
      if (dw) {
        float d = 0.f;
        for (int r = 0; r < R; ++r) d += h_in[ji * R + r] * acc[i][r];
        if (lane == 0) dw[ji] = d;
      }
      const float wj = w ? w[ji] : 1.f;
      if (weighted_v) {
        MOA_UNROLL
        for (int r = 0; r < RMax; ++r) acc[i][r] *= wj;
      }
      MOA_UNROLL
      for (int r = 0; r < RMax; ++r)
        if (r < R && lane == (r & 31)) v_out[ji * R + r] = acc[i][r];
      const float coef = post * (weighted_v ? 1.f : wj);
      MOA_UNROLL
      for (int r = 0; r < RMax; ++r) acc[i][r] *= coef;
    }
    if (!out) return;
    // Expand.
    const float* W2e = W2[e];
    float* yr[Rows];
    MOA_UNROLL
    for (int i = 0; i < Rows; ++i) yr[i] = out + static_cast<int64_t>(rows[j + (i < n ? i : 0)]) * ld_out;
    for (int64_t c = lane; c < Cn; c += 32) {
      float y[Rows];
      MOA_UNROLL
      for (int i = 0; i < Rows; ++i) y[i] = 0.f;
      MOA_UNROLL
      for (int r = 0; r < RMax; ++r) {
        if (r < R) {
          const float wv = W2e[c * sc2 + r * sr2];
          MOA_UNROLL
          for (int i = 0; i < Rows; ++i) y[i] += acc[i][r] * wv;
        }
      }
      MOA_UNROLL
      for (int i = 0; i < Rows; ++i) {
        if (i >= n) break;
        if (mode == ExpandMode::atomic_add)
          atomicAdd(yr[i] + c, y[i]);
        else if (mode == ExpandMode::store)
          yr[i][c] = y[i];
        else
          yr[i][c] += y[i];
      }
    }
  });
}

// out_e[p * sp + q * sq] += sum over j in segment e of coef_j * L[j, p] * G[rows[j], q], p < R, q < Q;
// coef_j = scale * (w ? w[j] : 1). The block's x index bx picks q = 32 bx + threadIdx.x; grid y is
// the expert e; blockIdx.z takes one of gridDim.z slices of the segment's assignments; block
// (32, 8): threadIdx.y picks p = y, y + 8, ... Slices add their partial sums with atomics; with
// store (one slice: each element has one writer) they are stored instead, zeros for an expert
// without assignments.
struct OuterArgs {
  float* const* out;  // E pointers (null: not wanted; an entry null: that expert not wanted)
  int64_t sp, sq;
  const float* L;
  const float* G;
  int64_t ldg, Q;
  float scale;
  const float* w;
};

template <int RMax>
__device__ __forceinline__ void sgmv_outer_block(const OuterArgs& a, int64_t bx, int R, const int32_t* rows,
                                                 const int32_t* seg, bool store) {
  constexpr int P = (RMax + 7) / 8;
  const int e = blockIdx.y;
  const int64_t q = bx * 32 + threadIdx.x;
  const int64_t b = seg[e], len = seg[e + 1] - b;
  const int64_t chunk = (len + gridDim.z - 1) / gridDim.z;
  const int64_t j0 = b + blockIdx.z * chunk;
  const int64_t j1 = j0 + chunk < b + len ? j0 + chunk : b + len;
  if (q >= a.Q || (j0 >= j1 && !store) || !a.out[e]) return;
  float acc[P];
  MOA_UNROLL
  for (int i = 0; i < P; ++i) acc[i] = 0.f;
  for (int64_t j = j0; j < j1; ++j) {
    const float gq = a.G[static_cast<int64_t>(rows[j]) * a.ldg + q] * a.scale * (a.w ? a.w[j] : 1.f);
    MOA_UNROLL
    for (int i = 0; i < P; ++i) {
      const int p = threadIdx.y + 8 * i;
      if (p < R) acc[i] += a.L[j * R + p] * gq;
    }
  }
  float* o = a.out[e];
  MOA_UNROLL
  for (int i = 0; i < P; ++i) {
    const int p = threadIdx.y + 8 * i;
    if (p >= R) continue;
    if (store)
      o[p * a.sp + q * a.sq] = acc[i];
    else
      atomicAdd(o + p * a.sp + q * a.sq, acc[i]);
  }
}

// Both weight gradients in one launch: x blocks [0, blocks_a) do `a`, the rest do `b`.
template <int RMax>
__global__ void sgmv_outer_kernel(OuterArgs a, int64_t blocks_a, OuterArgs b, int R, const int32_t* rows,
                                  const int32_t* seg, bool store) {
  if (blockIdx.x < blocks_a)
    sgmv_outer_block<RMax>(a, blockIdx.x, R, rows, seg, store);
  else
    sgmv_outer_block<RMax>(b, blockIdx.x - blocks_a, R, rows, seg, store);
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

// Forward: h = x[rows] A_e^T (written, (M, R)); y[rows] += scale * w * h B_e^T. One launch in all.
inline void grouped_lora_forward(float* y, float* h, const float* x, const float* const* A, const float* const* B,
                                 const int32_t* rows, const int32_t* seg, const float* w, float scale,
                                 const GroupedLoRAShape& s, bool rows_unique = true, cudaStream_t stream = nullptr) {
  detail::check_grouped_shape("grouped_lora_forward", s);
  if (s.M == 0) return;
  const int R = static_cast<int>(s.R), E = static_cast<int>(s.E);
  detail::dispatch_rank(s.R, [&]<int RMax>() {
    auto* fused = detail::sgmv_fused_kernel<RMax>;
    MOA_CUDA_LAUNCH(fused, detail::sgmv_blocks<RMax>(s.M), 32 * detail::sgmv_warps, 0, stream, y, s.Out, x, s.In, A,
                    /*sr1=*/s.In, /*sk1=*/1, s.In, B, /*sc2=*/s.R, /*sr2=*/1, s.Out, R, rows, seg, E, s.M, 1.f, scale,
                    w, false, h, nullptr, nullptr,
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
// s.write_grads, dx, dA_e and dB_e are written instead (= in place of +=; zeros where nothing adds);
// with s.add_dx as well, dx is still accumulated.
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
  const bool write_dx = s.write_grads && !s.add_dx;
  const bool store_dx = write_dx && s.M == s.N && rows_unique;
  const bool store_w = s.write_grads && slices == 1 && s.M > 0;
  auto blocks_for = [](int64_t n) { return static_cast<unsigned>((n + 255) / 256 < 1024 ? (n + 255) / 256 : 1024); };
  if (write_dx && dx && !store_dx && s.N > 0) {
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
    auto* fused = detail::sgmv_fused_kernel<RMax>;
    auto* outer = detail::sgmv_outer_kernel<RMax>;
    // dh = w scale B_e^T g[row] (shrink: W1_e[r, o] = B_e[o * R + r]; dw from the unweighted value),
    // then dx[row, i] += sum_r dh[j, r] A_e[r, i] (expand: W2_e[i, r] = A_e[r * In + i]).
    const detail::ExpandMode mode =
        store_dx ? detail::ExpandMode::store : (rows_unique ? detail::ExpandMode::add : detail::ExpandMode::atomic_add);
    MOA_CUDA_LAUNCH(fused, detail::sgmv_blocks<RMax>(s.M), 32 * detail::sgmv_warps, 0, stream, dx, s.In, g, s.Out, B,
                    /*sr1=*/1, /*sk1=*/s.R, s.Out, A, /*sc2=*/1, /*sr2=*/s.In, s.In, R, rows, seg, E, s.M, scale, 1.f,
                    w, true, dh, dw, h, mode);
    MOA_CUDA_LAUNCH_CHECK();
    // dA_e[r, i] += sum_j dh[j, r] x[row_j, i] and dB_e[o, r] += sum_j scale w_j g[row_j, o] h[j, r],
    // one launch for both.
    if (dA || dB) {
      const detail::OuterArgs args_a{dA, s.In, 1, dh, x, s.In, s.In, 1.f, nullptr};
      const detail::OuterArgs args_b{dB, 1, s.R, h, g, s.Out, s.Out, scale, w};
      const int64_t blocks_a = dA ? (s.In + 31) / 32 : 0, blocks_b = dB ? (s.Out + 31) / 32 : 0;
      const dim3 grid(static_cast<unsigned>(blocks_a + blocks_b), static_cast<unsigned>(E),
                      static_cast<unsigned>(slices));
      MOA_CUDA_LAUNCH(outer, grid, dim3(32, 8), 0, stream, args_a, blocks_a, args_b, R, rows, seg, store_w);
      MOA_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace moa::kernels::cuda
