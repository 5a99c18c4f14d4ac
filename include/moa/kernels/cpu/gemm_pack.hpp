// Packing of A and B panels for the blocked matrix product: copies a block of op(A) / op(B) into
// contiguous, zero-padded micro-panels in the order the microkernel reads them, so transposed
// operands cost nothing extra in the inner loop.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace moa::kernels::cpu::detail {

// Packs rows [i0, i0 + mc) and columns [k0, k0 + kc) of op(A) into MR-row micro-panels:
// Ap[p * MR * kc + k * MR + r] = op(A)(i0 + p * MR + r, k0 + k), rows past mc set to zero.
template <int64_t MR>
inline void pack_a(bool trans_a, const float* A, int64_t lda, int64_t i0, int64_t mc, int64_t k0, int64_t kc,
                   float* __restrict Ap) {
  for (int64_t p = 0; p * MR < mc; ++p) {
    const int64_t mr = (mc - p * MR < MR) ? mc - p * MR : MR;
    float* __restrict dst = Ap + p * MR * kc;
    const int64_t row = i0 + p * MR;
    if (!trans_a) {
      // op(A) = A: row r of the panel is contiguous along k.
      if (mr == MR) {
        const float* src[MR];
        for (int64_t r = 0; r < MR; ++r) src[r] = A + (row + r) * lda + k0;
        for (int64_t k = 0; k < kc; ++k)
          for (int64_t r = 0; r < MR; ++r) dst[k * MR + r] = src[r][k];
      } else {
        for (int64_t k = 0; k < kc; ++k) {
          for (int64_t r = 0; r < mr; ++r) dst[k * MR + r] = A[(row + r) * lda + k0 + k];
          for (int64_t r = mr; r < MR; ++r) dst[k * MR + r] = 0.0f;
        }
      }
    } else {
      // op(A) = A^T with A stored K x M: a column k of the panel is contiguous.
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = A + (k0 + k) * lda + row;
        if (mr == MR) {
          for (int64_t r = 0; r < MR; ++r) dst[k * MR + r] = src[r];
        } else {
          for (int64_t r = 0; r < mr; ++r) dst[k * MR + r] = src[r];
          for (int64_t r = mr; r < MR; ++r) dst[k * MR + r] = 0.0f;
        }
      }
    }
  }
}

// Packs one NR-column micro-panel: columns [j, j + nr) and rows [k0, k0 + kc) of op(B):
// dst[k * NR + c] = op(B)(k0 + k, j + c), columns past nr set to zero.
// (prefetch_next: a hint that the next micro-panel follows; this portable version ignores it.)
template <int64_t NR>
inline void pack_b_panel(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc, int64_t j, int64_t nr,
                         float* __restrict dst, bool prefetch_next = false) {
  (void)prefetch_next;
  if (!trans_b) {
    // op(B) = B: each packed row is a contiguous run of B.
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = B + (k0 + k) * ldb + j;
      if (nr == NR) {
        std::memcpy(dst + k * NR, src, NR * sizeof(float));
      } else {
        for (int64_t c = 0; c < nr; ++c) dst[k * NR + c] = src[c];
        for (int64_t c = nr; c < NR; ++c) dst[k * NR + c] = 0.0f;
      }
    }
  } else {
    // op(B) = B^T with B stored N x K: column c of the panel is the contiguous row j + c of B.
    for (int64_t c = 0; c < nr; ++c) {
      const float* src = B + (j + c) * ldb + k0;
      for (int64_t k = 0; k < kc; ++k) dst[k * NR + c] = src[k];
    }
    for (int64_t c = nr; c < NR; ++c)
      for (int64_t k = 0; k < kc; ++k) dst[k * NR + c] = 0.0f;
  }
}

// Packs micro-panels [q0, q1) of the B block at columns [j0, j0 + nc), rows [k0, k0 + kc):
// panel q goes to Bp + q * NR * kc. Untransposed B is walked a few rows at a time across all
// the panels, so that it is read along its rows (a panel-by-panel walk would read one 64-byte
// piece per row of B, with a row-sized stride). `panel` packs one transposed micro-panel
// (its last argument says whether a whole next micro-panel follows, to prefetch).
template <int64_t NR, class PanelFn>
inline void pack_b_block(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc, int64_t j0, int64_t nc,
                         int64_t q0, int64_t q1, float* Bp, PanelFn panel) {
  if (trans_b) {
    for (int64_t q = q0; q < q1; ++q)
      panel(trans_b, B, ldb, k0, kc, j0 + q * NR, std::min(NR, nc - q * NR), Bp + q * NR * kc, (q + 2) * NR <= nc);
    return;
  }
  constexpr int64_t kRows = 8;
  for (int64_t kb = 0; kb < kc; kb += kRows) {
    const int64_t kn = std::min(kRows, kc - kb);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t nr = std::min(NR, nc - q * NR);
      float* __restrict dst = Bp + q * NR * kc + kb * NR;
      const float* src = B + (k0 + kb) * ldb + j0 + q * NR;
      for (int64_t k = 0; k < kn; ++k) {
        // The same piece of the next group of rows: the hardware prefetcher loses track of this
        // many row streams.
        if (kb + kRows + k < kc) __builtin_prefetch(src + (k + kRows) * ldb, 0, 3);
        if (nr == NR) {
          std::memcpy(dst + k * NR, src + k * ldb, NR * sizeof(float));
        } else {
          for (int64_t c = 0; c < nr; ++c) dst[k * NR + c] = src[k * ldb + c];
          for (int64_t c = nr; c < NR; ++c) dst[k * NR + c] = 0.0f;
        }
      }
    }
  }
}

}  // namespace moa::kernels::cpu::detail
