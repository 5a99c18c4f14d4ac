// moa/kernels/cpu/attention.hpp: fast fused causal self-attention (multi-head and grouped-query),
// forward and backward, built from blocked matrix products (kernels/cpu/gemm.hpp).
//
// Shapes: q, out, dq: (B, Hq, Tq, D); k, v, dk, dv: (B, Hkv, Tk, D); lse: (B, Hq, Tq) contiguous.
// The (B, H, T, D) operands may lie in any HeadLayout (moa/core/head_layout.hpp: rows of D
// contiguous values, the other axes strided), each its own; the gemms read and write them in place
// with the row stride as leading dimension.
// Query head h reads kv head h / (Hq / Hkv); query i sits at position Tk - Tq + i and sees keys
// j <= Tk - Tq + i. The forward saves only lse, the per-row log-sum-exp of the scaled scores
// (O(B H T) memory, not the O(B H T^2) probabilities); the backward recomputes the probabilities
// from q, k and lse, FlashAttention style.
//
// Work is split into blocks of kBlock query rows (forward, dq) or key rows (dk, dv); each block is a
// few gemms against the keys/queries it can see, with a per-thread scratch of kBlock x T scores.
// The backward runs two passes so that no two threads ever write the same gradient row:
//   pass 1, per (b, query head, query block):  dq  (dP = dO V^T, dS = P (dP - delta), dq = dS K)
//   pass 2, per (b, kv head, key block), looping over the heads of its group: dk, dv
// (the scores are computed twice, the price of needing no atomics). Results do not depend on the
// thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moa/core/head_layout.hpp"
#include "moa/core/parallel.hpp"
#include "moa/kernels/cpu/gemm.hpp"
#include "moa/kernels/cpu/softmax.hpp"

namespace moa::kernels::cpu {

namespace detail {

inline constexpr int64_t kAttentionBlock = 64;

// Runs body(unit, scratch) for unit in [0, units), in parallel when there is enough work (each
// thread with its own scratch of `scratch_size` elements); serially otherwise, leaving the gemms
// free to use the threads.
template <class T, class F>
void attention_units(int64_t units, int64_t work_per_unit, std::size_t scratch_size, F&& body) {
#ifdef _OPENMP
  const bool parallel = units >= 2 && units * work_per_unit >= (int64_t{1} << 18) && !omp_in_parallel() &&
                        omp_get_max_threads() > 1;
  if (parallel) {
#pragma omp parallel
    {
      std::vector<T> scratch(scratch_size);
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < units; ++u) body(u, scratch.data());
    }
    return;
  }
#endif
  (void)work_per_unit;
  std::vector<T> scratch(scratch_size);
  for (int64_t u = 0; u < units; ++u) body(u, scratch.data());
}

}  // namespace detail

// out = softmax(scale * q k^T, causal) v; lse[b, h, i] = logsumexp_j(scale * q_i . k_j) over the
// visible keys.  Requires Hq % Hkv == 0 and Tk >= Tq (the caller checks). Layouts: L.q, L.k, L.v,
// L.out (the others are not read).
template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t Hq, int64_t Hkv,
                       int64_t Tq, int64_t Tk, int64_t D, T scale, const AttentionLayouts& layouts) {
  if (B == 0 || Hq == 0 || Tq == 0) return;
  const AttentionLayouts L = layouts.resolve(Hq, Hkv, Tq, Tk, D);
  constexpr int64_t BQ = detail::kAttentionBlock;
  const int64_t group = Hq / Hkv, off = Tk - Tq, nqb = (Tq + BQ - 1) / BQ;
  const auto scratch = static_cast<std::size_t>(BQ * Tk);  // S: (BQ, kend), row stride kend
  detail::attention_units<T>(B * Hq * nqb, 4 * BQ * Tk * D, scratch, [&](int64_t u, T* S) {
    const int64_t qb = u % nqb, bh = u / nqb, b = bh / Hq, h = bh % Hq, hkv = h / group;
    const int64_t i0 = qb * BQ, m = std::min(Tq, i0 + BQ) - i0;
    const int64_t kend = off + i0 + m;  // keys [0, kend) are visible to some row of the block
    const T* Q = q + b * L.q.batch + h * L.q.head + i0 * L.q.row;                    // (m, D)
    const T* K = k + b * L.k.batch + hkv * L.k.head;                                 // (kend, D)
    const T* V = v + b * L.v.batch + hkv * L.v.head;                                 // (kend, D)
    gemm<T>(false, true, m, kend, D, scale, Q, L.q.row, K, L.k.row, T(0), S, kend);  // S = scale Q K^T: (m, kend)
    for (int64_t r = 0; r < m; ++r) {
      T* s = S + r * kend;
      const int64_t n = off + i0 + r + 1;  // this row sees keys [0, n)
      const T mx = detail::row_max(s, n);
      const T sum = detail::exp_sub_sum(s, s, n, mx);
      const T inv = T(1) / sum;
      MOA_OMP_SIMD
      for (int64_t j = 0; j < n; ++j) s[j] *= inv;
      std::fill(s + n, s + kend, T(0));
      lse[bh * Tq + i0 + r] = mx + std::log(sum);
    }
    T* O = out + b * L.out.batch + h * L.out.head + i0 * L.out.row;
    gemm<T>(false, false, m, D, kend, T(1), S, kend, V, L.v.row, T(0), O, L.out.row);  // O = P V
  });
}

// The contiguous layouts.
template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t Hq, int64_t Hkv,
                       int64_t Tq, int64_t Tk, int64_t D, T scale) {
  attention_forward<T>(out, lse, q, k, v, B, Hq, Hkv, Tq, Tk, D, scale, AttentionLayouts{});
}

// The gradients of attention_forward given dout, the forward's out and lse:
//   P = exp(scale q k^T - lse) (causal), delta_i = dout_i . out_i, dS = P (dout v^T - delta),
//   dq = scale dS k,  dk = scale dS^T q,  dv = P^T dout   (dk, dv summed over each kv head's group).
// dq, dk, dv are written; any may be null (not wanted). Every operand in its layout of `layouts`.
template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const T* out,
                        const T* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, T scale,
                        const AttentionLayouts& layouts) {
  constexpr int64_t BL = detail::kAttentionBlock;
  const int64_t group = Hq / Hkv, off = Tk - Tq;
  const AttentionLayouts L = layouts.resolve(Hq, Hkv, Tq, Tk, D);
  if ((dk || dv) && Tq == 0) {  // no query sees any key
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t j = 0; j < Tk; ++j) {
          if (dk) std::fill_n(dk + b * L.dk.batch + h * L.dk.head + j * L.dk.row, D, T(0));
          if (dv) std::fill_n(dv + b * L.dv.batch + h * L.dv.head + j * L.dv.row, D, T(0));
        }
  }
  if (B == 0 || Hq == 0 || Tq == 0) return;

  // Pass 1: dq, per (b, query head, block of query rows).
  if (dq) {
    const int64_t nqb = (Tq + BL - 1) / BL;
    const auto scratch = static_cast<std::size_t>(2 * BL * Tk);  // S, dP: (BL, kend) each
    detail::attention_units<T>(B * Hq * nqb, 6 * BL * Tk * D, scratch, [&](int64_t u, T* S) {
      const int64_t qb = u % nqb, bh = u / nqb, b = bh / Hq, h = bh % Hq, hkv = h / group;
      const int64_t i0 = qb * BL, m = std::min(Tq, i0 + BL) - i0, kend = off + i0 + m;
      T* dP = S + BL * Tk;
      const T* Q = q + b * L.q.batch + h * L.q.head + i0 * L.q.row;                       // (m, D)
      const T* G = dout + b * L.dout.batch + h * L.dout.head + i0 * L.dout.row;           // (m, D)
      const T* O = out + b * L.out.batch + h * L.out.head + i0 * L.out.row;               // (m, D)
      const T* K = k + b * L.k.batch + hkv * L.k.head;                                    // (kend, D)
      const T* V = v + b * L.v.batch + hkv * L.v.head;                                    // (kend, D)
      gemm<T>(false, true, m, kend, D, scale, Q, L.q.row, K, L.k.row, T(0), S, kend);     // S = scale Q K^T
      gemm<T>(false, true, m, kend, D, T(1), G, L.dout.row, V, L.v.row, T(0), dP, kend);  // dP = dO V^T
      for (int64_t r = 0; r < m; ++r) {
        T* s = S + r * kend;  // P, then dS, in place
        const T* dp = dP + r * kend;
        const int64_t n = off + i0 + r + 1;
        const T delta = detail::dot(G + r * L.dout.row, O + r * L.out.row, D);
        detail::exp_sub_scale(s, s, n, lse[bh * Tq + i0 + r], T(1));
        MOA_OMP_SIMD
        for (int64_t j = 0; j < n; ++j) s[j] = s[j] * (dp[j] - delta);
        std::fill(s + n, s + kend, T(0));
      }
      T* dQ = dq + b * L.dq.batch + h * L.dq.head + i0 * L.dq.row;
      gemm<T>(false, false, m, D, kend, scale, S, kend, K, L.k.row, T(0), dQ, L.dq.row);  // dq = scale dS K
    });
  }

  // Pass 2: dk, dv, per (b, kv head, block of key rows), over the query heads of the group.
  if (dk || dv) {
    const int64_t nkb = (Tk + BL - 1) / BL;
    const auto scratch = static_cast<std::size_t>(2 * BL * Tq + Tq);  // St, dPt: (BL, mq); delta: (mq)
    detail::attention_units<T>(B * Hkv * nkb, 8 * BL * Tq * D * group, scratch, [&](int64_t u, T* St) {
      const int64_t kb = u % nkb, bkv = u / nkb, b = bkv / Hkv, hkv = bkv % Hkv;
      const int64_t j0 = kb * BL, nk = std::min(Tk, j0 + BL) - j0;
      const int64_t i_start = std::max<int64_t>(0, j0 - off), mq = Tq - i_start;  // queries that see key j0
      T* dPt = St + BL * Tq;
      T* delta = dPt + BL * Tq;
      const T* Kb = k + b * L.k.batch + hkv * L.k.head + j0 * L.k.row;  // (nk, D)
      const T* Vb = v + b * L.v.batch + hkv * L.v.head + j0 * L.v.row;  // (nk, D)
      T* dKb = dk ? dk + b * L.dk.batch + hkv * L.dk.head + j0 * L.dk.row : nullptr;
      T* dVb = dv ? dv + b * L.dv.batch + hkv * L.dv.head + j0 * L.dv.row : nullptr;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hkv * group + g, bh = b * Hq + h;
        const T* Q = q + b * L.q.batch + h * L.q.head + i_start * L.q.row;              // (mq, D)
        const T* G = dout + b * L.dout.batch + h * L.dout.head + i_start * L.dout.row;  // (mq, D)
        const T* O = out + b * L.out.batch + h * L.out.head + i_start * L.out.row;      // (mq, D)
        const T* Lse = lse + bh * Tq + i_start;                                         // (mq)
        const T beta = g == 0 ? T(0) : T(1);
        for (int64_t r = 0; r < mq; ++r) delta[r] = detail::dot(G + r * L.dout.row, O + r * L.out.row, D);
        gemm<T>(false, true, nk, mq, D, scale, Kb, L.k.row, Q, L.q.row, T(0), St, mq);     // St = scale K Q^T: (nk, mq)
        gemm<T>(false, true, nk, mq, D, T(1), Vb, L.v.row, G, L.dout.row, T(0), dPt, mq);  // dPt = V dO^T: (nk, mq)
        for (int64_t jj = 0; jj < nk; ++jj) {
          T* s = St + jj * mq;  // Pt row
          T* dp = dPt + jj * mq;  // dSt row
          const int64_t first = std::max<int64_t>(0, j0 + jj - off - i_start);  // first query that sees key j
          std::fill(s, s + first, T(0));
          std::fill(dp, dp + first, T(0));
          detail::exp_sub_each(s + first, s + first, Lse + first, mq - first);
          MOA_OMP_SIMD
          for (int64_t r = first; r < mq; ++r) dp[r] = s[r] * (dp[r] - delta[r]);
        }
        if (dVb) gemm<T>(false, false, nk, D, mq, T(1), St, mq, G, L.dout.row, beta, dVb, L.dv.row);  // dv += Pt dO
        if (dKb)
          gemm<T>(false, false, nk, D, mq, scale, dPt, mq, Q, L.q.row, beta, dKb, L.dk.row);  // dk += scale dSt Q
      }
    });
  }
}

// The contiguous layouts.
template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const T* out,
                        const T* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, T scale) {
  attention_backward<T>(dq, dk, dv, dout, q, k, v, out, lse, B, Hq, Hkv, Tq, Tk, D, scale, AttentionLayouts{});
}

}  // namespace moa::kernels::cpu
