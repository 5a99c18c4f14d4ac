// moa/kernels/cuda/attention.cuh: fused causal self-attention (multi-head and grouped-query),
// forward and backward, on float32 device buffers, with the layouts and semantics of
// kernels/reference/attention.hpp:
//   q, out, dq: (B, Hq, Tq, D); k, v, dk, dv: (B, Hkv, Tk, D); lse, delta: (B, Hq, Tq); D <= 256.
//   Each (B, H, T, D) operand lies in its own HeadLayout (AttentionShape::layout: rows of D
//   contiguous floats; default contiguous); lse and delta are contiguous.
//   Query head h reads kv head h / (Hq / Hkv); query i sits at position Tk - Tq + i and sees keys
//   j <= Tk - Tq + i.
//
// The exact (float32) kernels: one warp per query row (forward, dq) or key row (dk, dv), the head
// dimension split over the lanes, an online softmax over the keys (never a T x T matrix). Warps of a
// block take neighbouring rows of the same head, so K and V rows are shared through L1. They serve
// MatmulPrecision highest and tf32, decoding (Tq < 16) and heads over 128; with bf16 products the
// backend runs the tiled tensor-core kernels of flash_attention.cuh instead.
#pragma once

#include <cmath>
#include <cstdint>

#include "moa/core/error.hpp"
#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/flash_attention.cuh"  // AttentionShape, and the tensor-core kernels
#include "moa/kernels/cuda/launch.cuh"
#include "moa/kernels/cuda/reduce.cuh"

namespace moa::kernels::cuda {

namespace detail {

constexpr int attn_warps = 4;  // rows per block

template <int DPL>  // head elements per lane: D <= 32 * DPL
__device__ __forceinline__ void load_row(float (&r)[DPL], const float* p, int64_t D, int lane) {
  MOA_UNROLL
  for (int t = 0; t < DPL; ++t) {
    const int64_t c = lane + 32 * t;
    r[t] = c < D ? p[c] : 0.f;
  }
}

template <int DPL>
__device__ __forceinline__ float row_dot(const float (&a)[DPL], const float* p, int64_t D, int lane) {
  float s = 0.f;
  MOA_UNROLL
  for (int t = 0; t < DPL; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < D) s += a[t] * p[c];
  }
  return warp_sum(s);
}

template <int DPL>
__global__ void attention_forward_kernel(float* out, float* lse, const float* q, const float* k, const float* v,
                                         AttentionShape s, float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(attn_warps) + (threadIdx.x >> 5);  // over B * Hq * Tq
  if (row >= s.B * s.Hq * s.Tq) return;
  const int64_t bh = row / s.Tq, i = row - bh * s.Tq, b = bh / s.Hq, h = bh - b * s.Hq;
  const int64_t hkv = h / (s.Hq / s.Hkv), n = s.Tk - s.Tq + i + 1;
  const AttentionLayouts& L = s.layout;
  const float* kb = k + head_at(L.k, b, hkv);
  const float* vb = v + head_at(L.v, b, hkv);
  float qr[DPL], acc[DPL];
  load_row(qr, q + head_at(L.q, b, h) + i * L.q.row, s.D, lane);
  MOA_UNROLL
  for (int t = 0; t < DPL; ++t) acc[t] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float sc = row_dot(qr, kb + j * L.k.row, s.D, lane) * scale;
    const float mn = fmaxf(m, sc);
    const float corr = expf(m - mn), p = expf(sc - mn);
    l = l * corr + p;
    MOA_UNROLL
    for (int t = 0; t < DPL; ++t) {
      const int64_t c = lane + 32 * t;
      acc[t] = acc[t] * corr + (c < s.D ? p * vb[j * L.v.row + c] : 0.f);
    }
    m = mn;
  }
  const float inv = 1.f / l;
  float* orow = out + head_at(L.out, b, h) + i * L.out.row;
  MOA_UNROLL
  for (int t = 0; t < DPL; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < s.D) orow[c] = acc[t] * inv;
  }
  if (lane == 0) lse[row] = m + logf(l);
}

// dq_i = scale sum_j P_ij (dout_i . v_j - delta_i) k_j; also writes delta_i = dout_i . out_i.
template <int DPL>
__global__ void attention_dq_kernel(float* dq, float* delta, const float* dout, const float* q, const float* k,
                                    const float* v, const float* out, const float* lse, AttentionShape s,
                                    float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(attn_warps) + (threadIdx.x >> 5);
  if (row >= s.B * s.Hq * s.Tq) return;
  const int64_t bh = row / s.Tq, i = row - bh * s.Tq, b = bh / s.Hq, h = bh - b * s.Hq;
  const int64_t hkv = h / (s.Hq / s.Hkv), n = s.Tk - s.Tq + i + 1;
  const AttentionLayouts& L = s.layout;
  const float* kb = k + head_at(L.k, b, hkv);
  const float* vb = v + head_at(L.v, b, hkv);
  float qr[DPL], gr[DPL], acc[DPL];
  load_row(qr, q + head_at(L.q, b, h) + i * L.q.row, s.D, lane);
  load_row(gr, dout + head_at(L.dout, b, h) + i * L.dout.row, s.D, lane);
  const float dl = row_dot(gr, out + head_at(L.out, b, h) + i * L.out.row, s.D, lane), li = lse[row];
  MOA_UNROLL
  for (int t = 0; t < DPL; ++t) acc[t] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float p = expf(row_dot(qr, kb + j * L.k.row, s.D, lane) * scale - li);
    const float ds = p * (row_dot(gr, vb + j * L.v.row, s.D, lane) - dl) * scale;
    MOA_UNROLL
    for (int t = 0; t < DPL; ++t) {
      const int64_t c = lane + 32 * t;
      if (c < s.D) acc[t] += ds * kb[j * L.k.row + c];
    }
  }
  float* dqrow = dq + head_at(L.dq, b, h) + i * L.dq.row;
  MOA_UNROLL
  for (int t = 0; t < DPL; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < s.D) dqrow[c] = acc[t];
  }
  if (lane == 0) delta[row] = dl;
}

// dv_j = sum P_ij dout_i, dk_j = scale sum dS_ij q_i over the queries that see key j, in every query
// head of the group. One warp per key row (B * Hkv * Tk).
template <int DPL>
__global__ void attention_dkv_kernel(float* dk, float* dv, const float* dout, const float* q, const float* k,
                                     const float* v, const float* lse, const float* delta, AttentionShape s,
                                     float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(attn_warps) + (threadIdx.x >> 5);  // over B * Hkv * Tk
  if (row >= s.B * s.Hkv * s.Tk) return;
  const int64_t bkv = row / s.Tk, j = row - bkv * s.Tk, b = bkv / s.Hkv, hkv = bkv - b * s.Hkv;
  const int64_t group = s.Hq / s.Hkv, off = s.Tk - s.Tq;
  const int64_t i0 = j - off > 0 ? j - off : 0;  // first query that sees key j
  const AttentionLayouts& L = s.layout;
  float kr[DPL], vr[DPL], dka[DPL], dva[DPL];
  load_row(kr, k + head_at(L.k, b, hkv) + j * L.k.row, s.D, lane);
  load_row(vr, v + head_at(L.v, b, hkv) + j * L.v.row, s.D, lane);
  MOA_UNROLL
  for (int t = 0; t < DPL; ++t) dka[t] = dva[t] = 0.f;
  for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h) {
    const int64_t bh = b * s.Hq + h;
    const float* qh = q + head_at(L.q, b, h);
    const float* gh = dout + head_at(L.dout, b, h);
    for (int64_t i = i0; i < s.Tq; ++i) {
      const int64_t qrow = bh * s.Tq + i;
      const float* qi = qh + i * L.q.row;
      const float* gi = gh + i * L.dout.row;
      const float p = expf(row_dot(kr, qi, s.D, lane) * scale - lse[qrow]);
      const float ds = p * (row_dot(vr, gi, s.D, lane) - delta[qrow]) * scale;
      MOA_UNROLL
      for (int t = 0; t < DPL; ++t) {
        const int64_t c = lane + 32 * t;
        if (c < s.D) {
          dva[t] += p * gi[c];
          dka[t] += ds * qi[c];
        }
      }
    }
  }
  float* dkrow = dk + head_at(L.dk, b, hkv) + j * L.dk.row;
  float* dvrow = dv + head_at(L.dv, b, hkv) + j * L.dv.row;
  MOA_UNROLL
  for (int t = 0; t < DPL; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < s.D) {
      dkrow[c] = dka[t];
      dvrow[c] = dva[t];
    }
  }
}

// delta[(b Hq + h) Tq + i] = dout_i . out_i over the query rows, each operand in its layout. One
// warp per row, grid-stride.
static __global__ void attention_delta_kernel(float* delta, const float* dout, const float* out, AttentionShape s) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = s.B * s.Hq * s.Tq, warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const int64_t bh = r / s.Tq, i = r - bh * s.Tq, b = bh / s.Hq, h = bh - b * s.Hq;
    const float* g = dout + head_at(s.layout.dout, b, h) + i * s.layout.dout.row;
    const float* o = out + head_at(s.layout.out, b, h) + i * s.layout.out.row;
    float acc = 0.f;
    for (int64_t c = lane; c < s.D; c += 32) acc += g[c] * o[c];
    acc = warp_sum(acc);
    if (lane == 0) delta[r] = acc;
  }
}

inline void check_attention(const char* op, const AttentionShape& s) {
  MOA_CHECK(s.B >= 0 && s.Hq >= 1 && s.Hkv >= 1 && s.Hq % s.Hkv == 0 && s.Tq >= 0 && s.Tk >= s.Tq && s.D >= 1 &&
                s.D <= 256,
            ShapeError, op, ": expected Hq a multiple of Hkv, Tk >= Tq and head size in [1, 256], got B ", s.B, ", Hq ",
            s.Hq, ", Hkv ", s.Hkv, ", Tq ", s.Tq, ", Tk ", s.Tk, ", D ", s.D);
}

template <class F>
void dispatch_head(int64_t D, F&& f) {
  if (D <= 32)
    f.template operator()<1>();
  else if (D <= 64)
    f.template operator()<2>();
  else if (D <= 128)
    f.template operator()<4>();
  else
    f.template operator()<8>();
}

inline unsigned attn_blocks(int64_t rows) { return static_cast<unsigned>((rows + attn_warps - 1) / attn_warps); }

}  // namespace detail

// delta (B, Hq, Tq) = dout . out row by row (the backward's per-query term), dout and out in the
// layouts of s.
inline void attention_delta(float* delta, const float* dout, const float* out, const AttentionShape& shape,
                            cudaStream_t stream = nullptr) {
  const AttentionShape s = shape.resolved();
  const int64_t rows = s.B * s.Hq * s.Tq;
  if (rows <= 0) return;
  int64_t blocks = (rows + 7) / 8;
  blocks = blocks > 65535LL * 16 ? 65535LL * 16 : blocks;
  MOA_CUDA_LAUNCH(detail::attention_delta_kernel, static_cast<unsigned>(blocks), 256, 0, stream, delta, dout, out, s);
  MOA_CUDA_LAUNCH_CHECK();
}

// out = softmax(scale q k^T, causal) v, lse saved for the backward. out, lse written.
inline void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                              const AttentionShape& shape, float scale, cudaStream_t stream = nullptr) {
  detail::check_attention("attention_forward", shape);
  const AttentionShape s = shape.resolved();
  const int64_t rows = s.B * s.Hq * s.Tq;
  if (rows == 0) return;
  detail::dispatch_head(s.D, [&]<int DPL>() {
    MOA_CUDA_LAUNCH(detail::attention_forward_kernel<DPL>, detail::attn_blocks(rows), 32 * detail::attn_warps, 0,
                    stream, out, lse, q, k, v, s, scale);
    MOA_CUDA_LAUNCH_CHECK();
  });
}

// dq, dk, dv written (dk, dv summed over the query heads sharing a kv head). delta: (B, Hq, Tq)
// scratch (kernels allocate nothing).
inline void attention_backward(float* dq, float* dk, float* dv, float* delta, const float* dout, const float* q,
                               const float* k, const float* v, const float* out, const float* lse,
                               const AttentionShape& shape, float scale, cudaStream_t stream = nullptr) {
  detail::check_attention("attention_backward", shape);
  const AttentionShape s = shape.resolved();
  const int64_t qrows = s.B * s.Hq * s.Tq, krows = s.B * s.Hkv * s.Tk;
  if (krows == 0) return;
  detail::dispatch_head(s.D, [&]<int DPL>() {
    if (qrows > 0) {
      MOA_CUDA_LAUNCH(detail::attention_dq_kernel<DPL>, detail::attn_blocks(qrows), 32 * detail::attn_warps, 0, stream,
                      dq, delta, dout, q, k, v, out, lse, s, scale);
      MOA_CUDA_LAUNCH_CHECK();
    }
    MOA_CUDA_LAUNCH(detail::attention_dkv_kernel<DPL>, detail::attn_blocks(krows), 32 * detail::attn_warps, 0, stream,
                    dk, dv, dout, q, k, v, lse, delta, s, scale);
    MOA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace moa::kernels::cuda
