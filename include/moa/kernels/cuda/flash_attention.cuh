// moa/kernels/cuda/flash_attention.cuh: fused causal attention on tensor cores (FlashAttention-2
// style), forward and backward, for MatmulPrecision::bf16. Same layouts and semantics as
// attention.cuh and kernels/reference/attention.hpp:
//   q, out, dq: (B, Hq, Tq, D); k, v, dk, dv: (B, Hkv, Tk, D); lse, delta: (B, Hq, Tq); D <= 128.
//   Each (B, H, T, D) operand lies in its own HeadLayout (AttentionShape::layout; rows of D contiguous
//   floats, default contiguous); lse and delta are contiguous.
//   Query head h reads kv head h / (Hq / Hkv); query i sits at position Tk - Tq + i and sees keys
//   j <= Tk - Tq + i.
//
// Tiles of 64 queries x 64 keys, one block of 4 warps; each warp owns 16 rows of the tile. Q, K, V
// (and dO) tiles are rounded to bf16 in shared memory with the head padded to a multiple of 16;
// the products Q K^T, P V, dO V^T, P^T dO, dS^T Q and dS K run as 16x16x16 bf16 WMMA products with
// float32 accumulation. Scores, the online softmax (running max m, sum l per row), lse, delta and
// all accumulators stay float32; P and dS are rounded to bf16 only as inputs of the next product.
// Relative error against the f32 reference: about 1e-2 of the output's scale (the tests' bound).
//
//   forward: block = (batch, query head, 64-query tile); loops over the key tiles the tile sees;
//            O is kept in shared memory (f32) so the per-row rescaling needs no fragment layout.
//   dk, dv:  block = (batch, kv head, 64-key tile); loops over the query heads of the group and the
//            query tiles that see the keys; dK, dV accumulate in registers (WMMA fragments).
//   dq:      block = (batch, query head, 64-query tile); loops over key tiles; no atomics, so the
//            backward is deterministic (it recomputes S and dP once more than FlashAttention-2).
//   delta_i = dout_i . out_i comes from the caller (row_dot).
//
// The kernels use only dynamic shared memory, __syncthreads, __syncwarp, shuffles and WMMA, and
// launch through launch.cuh, so tests/unit/cuda_emulator.hpp runs this same source, launchers
// included, on the CPU (MOA_CUDA_EMULATE): the tiling, masking and synchronisation are tested on
// every machine; tests/cuda/ tests them on the GPU.
#pragma once

#ifndef MOA_CUDA_EMULATE
#include <mma.h>
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "moa/core/error.hpp"
#include "moa/core/head_layout.hpp"
#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"

namespace moa::kernels::cuda {

struct AttentionShape {
  int64_t B = 1, Hq = 1, Hkv = 1, Tq = 1, Tk = 1, D = 1;
  AttentionLayouts layout = {};  // default layouts: contiguous (the launchers resolve them)

  // This shape with every default layout made explicit (what the kernels read).
  AttentionShape resolved() const {
    AttentionShape r = *this;
    r.layout = layout.resolve(Hq, Hkv, Tq, Tk, D);
    return r;
  }
};

// Element offset of row 0 of head h of batch b in layout l.
__device__ __forceinline__ int64_t head_at(const HeadLayout& l, int64_t b, int64_t h) {
  return b * l.batch + h * l.head;
}

namespace flash {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;

constexpr int kTile = 64;      // queries and keys per tile
constexpr int kThreads = 128;  // 4 warps x 16 rows
constexpr int kMaxHead = 128;  // D <= 128 (8 fragments of 16)
constexpr int kLdS = kTile + 4;  // f32 score rows (a multiple of 4 floats, as WMMA needs)
constexpr int kLdP = kTile + 8;  // bf16 probability rows (a multiple of 8 halves)

template <int DT>
struct Dims {
  static constexpr int Dp = 16 * DT;   // the head, padded
  static constexpr int LdK = Dp + 8;   // bf16 rows of Q, K, V, dO tiles
  static constexpr int LdO = Dp + 4;   // f32 rows of O / staging
  static constexpr std::size_t tile_h = sizeof(bf16) * kTile * LdK;  // one bf16 Q/K/V tile
  static constexpr std::size_t scores = sizeof(float) * kTile * kLdS;
  static constexpr std::size_t probs = sizeof(bf16) * kTile * kLdP;
  static constexpr std::size_t out_f = sizeof(float) * kTile * LdO;
  // forward: Q, K, V, S, P, O
  static constexpr std::size_t forward_smem = 3 * tile_h + scores + probs + out_f;
  // dk/dv and dq: four bf16 tiles (K, V, Q, dO), S, dP, two bf16 products (P^T and dS^T, or dS),
  // lse, delta; the 16-row staging of the results reuses S and dP.
  static constexpr std::size_t backward_smem = 4 * tile_h + 2 * scores + 2 * probs + 2 * sizeof(float) * kTile;
  static_assert(2 * scores >= out_f, "the result staging reuses the two score buffers");
};

// The shared memory of the backward kernels, carved from the dynamic buffer.
template <int DT>
struct BackwardSmem {
  __nv_bfloat16 *t0, *t1, *t2, *t3;  // 64 x LdK bf16 tiles
  float *S, *dP;                      // 64 x kLdS
  __nv_bfloat16 *p0, *p1;             // 64 x kLdP
  float *lse, *delta;                 // 64 each
  __device__ explicit BackwardSmem(unsigned char* smem) {
    constexpr int LdK = Dims<DT>::LdK;
    t0 = reinterpret_cast<__nv_bfloat16*>(smem);
    t1 = t0 + kTile * LdK;
    t2 = t1 + kTile * LdK;
    t3 = t2 + kTile * LdK;
    S = reinterpret_cast<float*>(t3 + kTile * LdK);
    dP = S + kTile * kLdS;
    p0 = reinterpret_cast<__nv_bfloat16*>(dP + kTile * kLdS);
    p1 = p0 + kTile * kLdP;
    lse = reinterpret_cast<float*>(p1 + kTile * kLdP);
    delta = lse + kTile;
  }
};

// The query tile of a forward or dq block (blockIdx.x over B * Hq * query tiles; the longest,
// last, tiles first) and what it reads.
struct QueryTile {
  int64_t q0, bh, b, h, hkv, off, key_tiles;
  __device__ explicit QueryTile(const AttentionShape& s) {
    const int64_t qtiles = (s.Tq + kTile - 1) / kTile, bid = blockIdx.x;
    q0 = (qtiles - 1 - bid % qtiles) * kTile;
    bh = bid / qtiles;  // over B * Hq
    b = bh / s.Hq;
    h = bh - b * s.Hq;
    hkv = h / (s.Hq / s.Hkv);
    off = s.Tk - s.Tq;
    const int64_t last = q0 + kTile < s.Tq ? q0 + kTile : s.Tq;  // one past the tile's last query
    key_tiles = (off + last - 1) / kTile + 1;                       // the keys up to its last query's
  }
  // Row 0 of this tile's head in a query-side operand (q, out, dout, dq) of layout l.
  __device__ int64_t q_at(const HeadLayout& l) const { return head_at(l, b, h); }
  // Row 0 of this tile's kv head in k or v of layout l.
  __device__ int64_t kv_at(const HeadLayout& l) const { return head_at(l, b, hkv); }
};

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// dst (64 x Dp bf16, row stride ld) = rows r0 .. r0 + 63 of src (rows x D f32, row stride lds),
// zero outside.
template <int Dp>
__device__ __forceinline__ void load_tile(bf16* dst, int ld, const float* src, int64_t lds, int64_t r0, int64_t rows,
                                          int D, int tid) {
  if (D == Dp && (reinterpret_cast<std::uintptr_t>(src) & 15) == 0 && (lds & 3) == 0) {  // float4 loads
    constexpr int V = Dp / 4;
    for (int e = tid; e < kTile * V; e += kThreads) {
      const int rr = e / V, c = (e - rr * V) * 4;
      const int64_t gr = r0 + rr;
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (gr < rows) x = *reinterpret_cast<const float4*>(src + gr * lds + c);
      bf16* d = dst + rr * ld + c;
      d[0] = __float2bfloat16(x.x);
      d[1] = __float2bfloat16(x.y);
      d[2] = __float2bfloat16(x.z);
      d[3] = __float2bfloat16(x.w);
    }
  } else {
    for (int e = tid; e < kTile * Dp; e += kThreads) {
      const int rr = e / Dp, c = e - rr * Dp;
      const int64_t gr = r0 + rr;
      dst[rr * ld + c] = __float2bfloat16(gr < rows && c < D ? src[gr * lds + c] : 0.f);
    }
  }
}

// Scores of the warp's 16 rows against 64 columns: out (16 x 64 f32, row stride kLdS) = A B^T, with
// A the warp's 16 rows (16 x Dp, ld lda) and B 64 rows (64 x Dp, ld ldb), both bf16.
template <int DT>
__device__ __forceinline__ void scores16(float* out, const bf16* A, int lda, const bf16* Bm, int ldb) {
MOA_UNROLL
  for (int n = 0; n < kTile / 16; ++n) {
    FragC acc;
    wmma::fill_fragment(acc, 0.f);
MOA_UNROLL
    for (int d = 0; d < DT; ++d) {
      FragA a;
      FragBCol b;
      wmma::load_matrix_sync(a, A + d * 16, lda);
      wmma::load_matrix_sync(b, Bm + n * 16 * ldb + d * 16, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(out + n * 16, acc, kLdS, wmma::mem_row_major);
  }
}

// acc[n] += P (16 x 64 bf16, ld kLdP) x M (64 x Dp bf16, ld ldm), n over the Dp / 16 column blocks.
template <int DT>
__device__ __forceinline__ void accumulate16(FragC (&acc)[DT], const bf16* P, const bf16* M, int ldm) {
MOA_UNROLL
  for (int kk = 0; kk < kTile / 16; ++kk) {
    FragA a;
    wmma::load_matrix_sync(a, P + kk * 16, kLdP);
MOA_UNROLL
    for (int n = 0; n < DT; ++n) {
      FragBRow b;
      wmma::load_matrix_sync(b, M + kk * 16 * ldm + n * 16, ldm);
      wmma::mma_sync(acc[n], a, b, acc[n]);
    }
  }
}

// Writes the warp's 16 rows (rows r0 .. r0 + 15 of a (rows x D) f32 matrix at dst, row stride ldd)
// of acc * scale, through stage (16 x LdO f32, the warp's own). Whole warp, one row at a time
// (coalesced).
template <int DT>
__device__ __forceinline__ void write16(float* dst, int64_t ldd, int64_t r0, int64_t rows, int D,
                                        const FragC (&acc)[DT], float* stage, float scale, int lane) {
  constexpr int LdO = Dims<DT>::LdO;
MOA_UNROLL
  for (int n = 0; n < DT; ++n) wmma::store_matrix_sync(stage + n * 16, acc[n], LdO, wmma::mem_row_major);
  __syncwarp();
  for (int rr = 0; rr < 16; ++rr) {
    const int64_t gr = r0 + rr;
    if (gr >= rows) break;
    for (int c = lane; c < D; c += 32) dst[gr * ldd + c] = stage[rr * LdO + c] * scale;
  }
  __syncwarp();
}

template <int DT>
__global__ void __launch_bounds__(kThreads) forward_kernel(float* out, float* lse, const float* q, const float* k,
                                                          const float* v, AttentionShape s, float scale) {
  using Dm = Dims<DT>;
  constexpr int Dp = Dm::Dp, LdK = Dm::LdK, LdO = Dm::LdO;
  MOA_CUDA_DYNAMIC_SMEM(smem);
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Ks = Qs + kTile * LdK;
  bf16* Vs = Ks + kTile * LdK;
  float* Ss = reinterpret_cast<float*>(Vs + kTile * LdK);
  bf16* Ps = reinterpret_cast<bf16*>(Ss + kTile * kLdS);
  float* Os = reinterpret_cast<float*>(Ps + kTile * kLdP);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int D = static_cast<int>(s.D);
  const QueryTile qt(s);
  const int64_t q0 = qt.q0, bh = qt.bh, off = qt.off;
  const AttentionLayouts& L = s.layout;
  const float *kb = k + qt.kv_at(L.k), *vb = v + qt.kv_at(L.v);

  load_tile<Dp>(Qs, LdK, q + qt.q_at(L.q), L.q.row, q0, s.Tq, D, tid);
  for (int e = tid; e < kTile * LdO; e += kThreads) Os[e] = 0.f;

  // Softmax work: lanes 2r and 2r + 1 own row r of the warp's 16, columns 0..31 and 32..63.
  const int r = lane >> 1, half = lane & 1, row = warp * 16 + r;
  const int64_t i = q0 + row, jmax = off + i;  // the last key row i sees
  float m = -INFINITY, l = 0.f;
  for (int64_t kt = 0; kt < qt.key_tiles; ++kt) {
    const int64_t k0 = kt * kTile;
    __syncthreads();  // the last tile's K, V are read by every warp (and Q, O are initialised)
    load_tile<Dp>(Ks, LdK, kb, L.k.row, k0, s.Tk, D, tid);
    load_tile<Dp>(Vs, LdK, vb, L.v.row, k0, s.Tk, D, tid);
    __syncthreads();
    scores16<DT>(Ss + warp * 16 * kLdS, Qs + warp * 16 * LdK, LdK, Ks, LdK);
    __syncwarp();

    const float* srow = Ss + row * kLdS + half * 32;
    const int64_t j0 = k0 + half * 32;
    float mx = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int64_t j = j0 + c;
      if (j <= jmax && j < s.Tk) mx = fmaxf(mx, srow[c] * scale);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float mn = fmaxf(m, mx);
    const float mref = mn == -INFINITY ? 0.f : mn;  // a row with nothing visible yet keeps p = 0
    const float corr = __expf(m - mref);
    float sum = 0.f;
    bf16* prow = Ps + row * kLdP + half * 32;
    for (int c = 0; c < 32; ++c) {
      const int64_t j = j0 + c;
      const float p = j <= jmax && j < s.Tk ? __expf(srow[c] * scale - mref) : 0.f;
      prow[c] = __float2bfloat16(p);
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * corr + sum;
    m = mn;
    float* orow = Os + row * LdO;
    for (int c = half; c < Dp; c += 2) orow[c] *= corr;
    __syncwarp();

    // O (the warp's 16 rows) += P V
    FragC acc[DT];
MOA_UNROLL
    for (int n = 0; n < DT; ++n)
      wmma::load_matrix_sync(acc[n], Os + warp * 16 * LdO + n * 16, LdO, wmma::mem_row_major);
    accumulate16<DT>(acc, Ps + warp * 16 * kLdP, Vs, LdK);
    __syncwarp();  // every lane has read its part of O before any lane writes O back
MOA_UNROLL
    for (int n = 0; n < DT; ++n)
      wmma::store_matrix_sync(Os + warp * 16 * LdO + n * 16, acc[n], LdO, wmma::mem_row_major);
    __syncwarp();
  }

  // out = O / l, lse = m + log l; the warp writes its rows one at a time (coalesced).
  const float inv = l > 0.f ? 1.f / l : 0.f;
  if (half == 0 && i < s.Tq) lse[bh * s.Tq + i] = m + logf(l);
  float* ob = out + qt.q_at(L.out);
  for (int rr = 0; rr < 16; ++rr) {
    const float inv_r = __shfl_sync(0xffffffffu, inv, 2 * rr);
    const int64_t gi = q0 + warp * 16 + rr;
    if (gi >= s.Tq) break;  // uniform over the warp
    for (int c = lane; c < D; c += 32) ob[gi * L.out.row + c] = Os[(warp * 16 + rr) * LdO + c] * inv_r;
  }
}

// The backward's query side of one tile: Q and dO rows q0 .. q0 + 63 of head h of batch b
// (bh = b Hq + h) as bf16 tiles, and their lse and delta (zero past Tq). The caller synchronises
// before reading them.
template <int DT>
__device__ __forceinline__ void load_query_tile(__nv_bfloat16* Qs, __nv_bfloat16* dOs, float* lse_s, float* delta_s,
                                                const float* q, const float* dout, const float* lse, const float* delta,
                                                int64_t b, int64_t h, int64_t q0, const AttentionShape& s, int tid) {
  constexpr int Dp = Dims<DT>::Dp, LdK = Dims<DT>::LdK;
  const int D = static_cast<int>(s.D);
  const int64_t bh = b * s.Hq + h;
  load_tile<Dp>(Qs, LdK, q + head_at(s.layout.q, b, h), s.layout.q.row, q0, s.Tq, D, tid);
  load_tile<Dp>(dOs, LdK, dout + head_at(s.layout.dout, b, h), s.layout.dout.row, q0, s.Tq, D, tid);
  if (tid < kTile) {
    const int64_t i = q0 + tid;
    lse_s[tid] = i < s.Tq ? lse[bh * s.Tq + i] : 0.f;
    delta_s[tid] = i < s.Tq ? delta[bh * s.Tq + i] : 0.f;
  }
}

// dv_j = sum_i P_ij dout_i and dk_j = scale sum_i dS_ij q_i, dS_ij = P_ij (dout_i . v_j - delta_i),
// over the queries of every head in the group that see key j. Block = (batch, kv head, key tile).
template <int DT>
__global__ void __launch_bounds__(kThreads) dkv_kernel(float* dk, float* dv, const float* dout, const float* q,
                                                      const float* k, const float* v, const float* lse,
                                                      const float* delta, AttentionShape s, float scale) {
  using Dm = Dims<DT>;
  constexpr int Dp = Dm::Dp, LdK = Dm::LdK, LdO = Dm::LdO;
  MOA_CUDA_DYNAMIC_SMEM(smem);
  const BackwardSmem<DT> sm(smem);
  bf16 *Ks = sm.t0, *Vs = sm.t1, *Qs = sm.t2, *dOs = sm.t3, *PTs = sm.p0, *dSTs = sm.p1;
  float *Ss = sm.S, *dPs = sm.dP, *lse_s = sm.lse, *delta_s = sm.delta;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int D = static_cast<int>(s.D);
  const int64_t ktiles = (s.Tk + kTile - 1) / kTile;
  const int64_t bid = blockIdx.x;
  const int64_t kt = bid % ktiles;  // the first key tiles see the most queries, run first
  const int64_t bkv = bid / ktiles;  // over B * Hkv
  const int64_t b = bkv / s.Hkv, hkv = bkv - b * s.Hkv;
  const int64_t group = s.Hq / s.Hkv, off = s.Tk - s.Tq, k0 = kt * kTile;
  const int64_t qt0 = (k0 - off > 0 ? k0 - off : 0) / kTile, qtiles = (s.Tq + kTile - 1) / kTile;

  const AttentionLayouts& L = s.layout;
  load_tile<Dp>(Ks, LdK, k + head_at(L.k, b, hkv), L.k.row, k0, s.Tk, D, tid);
  load_tile<Dp>(Vs, LdK, v + head_at(L.v, b, hkv), L.v.row, k0, s.Tk, D, tid);

  FragC dK[DT], dV[DT];
MOA_UNROLL
  for (int n = 0; n < DT; ++n) {
    wmma::fill_fragment(dK[n], 0.f);
    wmma::fill_fragment(dV[n], 0.f);
  }
  const int r = lane >> 1, half = lane & 1, row = warp * 16 + r;
  const int64_t j = k0 + row;  // this lane pair's key
  for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h) {
    for (int64_t qt = qt0; qt < qtiles; ++qt) {
      const int64_t q0 = qt * kTile;
      __syncthreads();  // every warp is done with the last Q, dO, lse, delta (and K, V are loaded)
      load_query_tile<DT>(Qs, dOs, lse_s, delta_s, q, dout, lse, delta, b, h, q0, s, tid);
      __syncthreads();
      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x 64 queries
      scores16<DT>(Ss + warp * 16 * kLdS, Ks + warp * 16 * LdK, LdK, Qs, LdK);
      scores16<DT>(dPs + warp * 16 * kLdS, Vs + warp * 16 * LdK, LdK, dOs, LdK);
      __syncwarp();
      for (int c = 0; c < 32; ++c) {
        const int qi = half * 32 + c;
        const int64_t i = q0 + qi;
        const bool seen = i < s.Tq && j <= off + i;  // (j < Tk follows)
        const float p = seen ? __expf(Ss[row * kLdS + qi] * scale - lse_s[qi]) : 0.f;
        const float ds = seen ? p * (dPs[row * kLdS + qi] - delta_s[qi]) : 0.f;
        PTs[row * kLdP + qi] = __float2bfloat16(p);
        dSTs[row * kLdP + qi] = __float2bfloat16(ds);
      }
      __syncwarp();
      accumulate16<DT>(dV, PTs + warp * 16 * kLdP, dOs, LdK);
      accumulate16<DT>(dK, dSTs + warp * 16 * kLdP, Qs, LdK);
    }
  }
  __syncthreads();  // the score buffers become the staging of the results
  float* stage = Ss + warp * 16 * LdO;
  write16<DT>(dv + head_at(L.dv, b, hkv), L.dv.row, k0 + warp * 16, s.Tk, D, dV, stage, 1.f, lane);
  write16<DT>(dk + head_at(L.dk, b, hkv), L.dk.row, k0 + warp * 16, s.Tk, D, dK, stage, scale, lane);
}

// dq_i = scale sum_j dS_ij k_j. Block = (batch, query head, query tile).
template <int DT>
__global__ void __launch_bounds__(kThreads) dq_kernel(float* dq, const float* dout, const float* q, const float* k,
                                                     const float* v, const float* lse, const float* delta,
                                                     AttentionShape s, float scale) {
  using Dm = Dims<DT>;
  constexpr int Dp = Dm::Dp, LdK = Dm::LdK, LdO = Dm::LdO;
  MOA_CUDA_DYNAMIC_SMEM(smem);
  const BackwardSmem<DT> sm(smem);
  bf16 *Qs = sm.t0, *dOs = sm.t1, *Ks = sm.t2, *Vs = sm.t3, *dSs = sm.p0;
  float *Ss = sm.S, *dPs = sm.dP, *lse_s = sm.lse, *delta_s = sm.delta;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int D = static_cast<int>(s.D);
  const QueryTile qt(s);
  const int64_t q0 = qt.q0, off = qt.off;
  const AttentionLayouts& L = s.layout;
  const float *kb = k + qt.kv_at(L.k), *vb = v + qt.kv_at(L.v);

  load_query_tile<DT>(Qs, dOs, lse_s, delta_s, q, dout, lse, delta, qt.b, qt.h, q0, s, tid);
  FragC dQ[DT];
MOA_UNROLL
  for (int n = 0; n < DT; ++n) wmma::fill_fragment(dQ[n], 0.f);

  const int r = lane >> 1, half = lane & 1, row = warp * 16 + r;
  const int64_t i = q0 + row;
  for (int64_t kt = 0; kt < qt.key_tiles; ++kt) {
    const int64_t k0 = kt * kTile;
    __syncthreads();
    load_tile<Dp>(Ks, LdK, kb, L.k.row, k0, s.Tk, D, tid);
    load_tile<Dp>(Vs, LdK, vb, L.v.row, k0, s.Tk, D, tid);
    __syncthreads();
    scores16<DT>(Ss + warp * 16 * kLdS, Qs + warp * 16 * LdK, LdK, Ks, LdK);
    scores16<DT>(dPs + warp * 16 * kLdS, dOs + warp * 16 * LdK, LdK, Vs, LdK);
    __syncwarp();
    for (int c = 0; c < 32; ++c) {
      const int kj = half * 32 + c;
      const int64_t j = k0 + kj;
      const bool seen = i < s.Tq && j <= off + i;
      const float p = seen ? __expf(Ss[row * kLdS + kj] * scale - lse_s[row]) : 0.f;
      dSs[row * kLdP + kj] = __float2bfloat16(seen ? p * (dPs[row * kLdS + kj] - delta_s[row]) : 0.f);
    }
    __syncwarp();
    accumulate16<DT>(dQ, dSs + warp * 16 * kLdP, Ks, LdK);
  }
  __syncthreads();
  float* stage = Ss + warp * 16 * LdO;
  write16<DT>(dq + qt.q_at(L.dq), L.dq.row, q0 + warp * 16, s.Tq, D, dQ, stage, scale, lane);
}

// Calls f.template operator()<DT>() with DT = ceil(D / 16) in 1..8.
template <class F>
void dispatch_tiles(int64_t D, F&& f) {
  switch ((D + 15) / 16) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    case 4: f.template operator()<4>(); break;
    case 5: f.template operator()<5>(); break;
    case 6: f.template operator()<6>(); break;
    case 7: f.template operator()<7>(); break;
    default: f.template operator()<8>(); break;
  }
}

}  // namespace flash

// Whether the tensor-core kernels take this shape: a head of at most 128 and at least 16 queries
// (a decode step, Tq = 1, stays on the row kernels of attention.cuh).
inline bool flash_attention_supported(const AttentionShape& s) { return s.D >= 1 && s.D <= flash::kMaxHead && s.Tq >= 16; }

namespace flash::detail {

template <class Kernel>
void set_smem(Kernel kernel, std::size_t bytes) {
  MOA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

inline unsigned blocks(int64_t n, const char* op) {
  MOA_CHECK(n >= 0 && n <= 0x7fffffff, ShapeError, op, ": ", n, " blocks exceed the grid limit");
  return static_cast<unsigned>(n);
}

inline void check_shape(const char* op, const AttentionShape& s) {
  MOA_CHECK(s.B >= 0 && s.Hq >= 1 && s.Hkv >= 1 && s.Hq % s.Hkv == 0 && s.Tq >= 0 && s.Tk >= s.Tq && s.D >= 1 &&
                s.D <= kMaxHead,
            ShapeError, op, ": expected Hq a multiple of Hkv, Tk >= Tq and head size in [1, 128], got B ", s.B,
            ", Hq ", s.Hq, ", Hkv ", s.Hkv, ", Tq ", s.Tq, ", Tk ", s.Tk, ", D ", s.D);
}

}  // namespace flash::detail

// out = softmax(scale q k^T, causal) v and lse, on tensor cores (bf16 products, f32 softmax).
inline void flash_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                                    const AttentionShape& shape, float scale, cudaStream_t stream = nullptr) {
  flash::detail::check_shape("flash_attention_forward", shape);
  const AttentionShape s = shape.resolved();
  const int64_t qtiles = (s.Tq + flash::kTile - 1) / flash::kTile;
  if (s.B * s.Hq * qtiles == 0) return;
  const unsigned grid = flash::detail::blocks(s.B * s.Hq * qtiles, "flash_attention_forward");
  flash::dispatch_tiles(s.D, [&]<int DT>() {
    constexpr std::size_t smem = flash::Dims<DT>::forward_smem;
    auto* kernel = flash::forward_kernel<DT>;
    flash::detail::set_smem(kernel, smem);
    MOA_CUDA_LAUNCH(kernel, grid, flash::kThreads, smem, stream, out, lse, q, k, v, s, scale);
    MOA_CUDA_LAUNCH_CHECK();
  });
}

// dq, dk, dv written (each may be null; dk and dv come from one kernel, so when only one of them is
// wanted the other must still be a (B, Hkv, Tk, D) buffer: pass scratch). delta = dout . out per
// query row (B, Hq, Tq), computed by the caller.
inline void flash_attention_backward(float* dq, float* dk, float* dv, const float* delta, const float* dout,
                                     const float* q, const float* k, const float* v, const float* lse,
                                     const AttentionShape& shape, float scale, cudaStream_t stream = nullptr) {
  flash::detail::check_shape("flash_attention_backward", shape);
  const AttentionShape s = shape.resolved();
  MOA_CHECK((dk == nullptr) == (dv == nullptr), ValueError,
            "flash_attention_backward: dk and dv come from one kernel: pass both (scratch for the unwanted one)");
  const int64_t qtiles = (s.Tq + flash::kTile - 1) / flash::kTile, ktiles = (s.Tk + flash::kTile - 1) / flash::kTile;
  // Each kernel runs when its output has elements: with no queries (Tq == 0) dq is empty and the
  // dk, dv kernel writes zeros (no key is seen).
  flash::dispatch_tiles(s.D, [&]<int DT>() {
    if (dq && s.B * s.Hq * qtiles > 0) {
      constexpr std::size_t smem = flash::Dims<DT>::backward_smem;
      auto* kernel = flash::dq_kernel<DT>;
      flash::detail::set_smem(kernel, smem);
      MOA_CUDA_LAUNCH(kernel, flash::detail::blocks(s.B * s.Hq * qtiles, "flash_attention_backward"),
                      flash::kThreads, smem, stream, dq, dout, q, k, v, lse, delta, s, scale);
      MOA_CUDA_LAUNCH_CHECK();
    }
    if (dk && s.B * s.Hkv * ktiles > 0) {
      constexpr std::size_t smem = flash::Dims<DT>::backward_smem;
      auto* kernel = flash::dkv_kernel<DT>;
      flash::detail::set_smem(kernel, smem);
      MOA_CUDA_LAUNCH(kernel, flash::detail::blocks(s.B * s.Hkv * ktiles, "flash_attention_backward"),
                      flash::kThreads, smem, stream, dk, dv, dout, q, k, v, lse, delta, s, scale);
      MOA_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace moa::kernels::cuda
