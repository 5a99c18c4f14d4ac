// AVX2 packing for the 6 x 16 microkernel: the two packings that transpose (rows of A into
// 6-wide columns, rows of a transposed B into 16-wide rows) done with 8 x 8 register transposes.
// The AVX-512 microkernel (12 x 32) uses the B one too, at 32 wide.
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>

#include "gemm_pack.hpp"

namespace moa::kernels::cpu::detail {

// In-register transpose: on return r[k] holds column k of the 8 x 8 block whose rows were r[0..7].
inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// pack_a<6> with the untransposed case (six rows of A, contiguous along k) vectorised.
inline void pack_a_avx2_6(bool trans_a, const float* A, int64_t lda, int64_t i0, int64_t mc, int64_t k0, int64_t kc,
                          float* __restrict Ap) {
  if (trans_a) {
    pack_a<6>(trans_a, A, lda, i0, mc, k0, kc, Ap);
    return;
  }
  const int64_t full = mc / 6;
  for (int64_t p = 0; p < full; ++p) {
    float* __restrict dst = Ap + p * 6 * kc;
    const float* src = A + (i0 + p * 6) * lda + k0;
    const float* next = (p + 1 < full) ? src + 6 * lda : nullptr;  // rows of the next micro-panel
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
      // Six short row streams are too many for the hardware prefetcher: fetch the next panel's
      // rows one line per row every 16 columns.
      if (next && (k & 15) == 0)
        for (int i = 0; i < 6; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * lda + k), _MM_HINT_T0);
      __m256 r[8];
      for (int i = 0; i < 6; ++i) r[i] = _mm256_loadu_ps(src + i * lda + k);
      r[6] = _mm256_setzero_ps();
      r[7] = _mm256_setzero_ps();
      transpose8x8(r);
      // Column kk goes to dst[(k + kk) * 6 .. + 6): overlapping 8-wide stores, each fixed up by
      // the next one; the last column is stored as exactly 4 + 2 floats.
      for (int kk = 0; kk < 7; ++kk) _mm256_storeu_ps(dst + (k + kk) * 6, r[kk]);
      _mm_storeu_ps(dst + (k + 7) * 6, _mm256_castps256_ps128(r[7]));
      _mm_storel_pi(reinterpret_cast<__m64*>(dst + (k + 7) * 6 + 4), _mm256_extractf128_ps(r[7], 1));
    }
    for (; k < kc; ++k)
      for (int64_t i = 0; i < 6; ++i) dst[k * 6 + i] = src[i * lda + k];
  }
  if (full * 6 < mc) pack_a<6>(trans_a, A, lda, i0 + full * 6, mc - full * 6, k0, kc, Ap + full * 6 * kc);
}

// pack_b_panel<NR> (NR a multiple of 8: 16 for the AVX2 microkernel, 32 for the AVX-512 one) with
// the transposed case (NR rows of B^T, contiguous along k) vectorised: 8 x 8 register transposes
// instead of NR strided scalar walks. With prefetch_next, rows [j + NR, j + 2 NR) of B exist and
// are fetched along the way.
template <int64_t NR>
inline void pack_b_panel_avx2(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc, int64_t j, int64_t nr,
                              float* __restrict dst, bool prefetch_next) {
  static_assert(NR % 8 == 0, "pack_b_panel_avx2: NR must be a multiple of 8");
  if (!trans_b || nr != NR) {
    pack_b_panel<NR>(trans_b, B, ldb, k0, kc, j, nr, dst, prefetch_next);
    return;
  }
  const float* src = B + j * ldb + k0;
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    if (prefetch_next && (k & 15) == 0)
      for (int64_t i = NR; i < 2 * NR; ++i) _mm_prefetch(reinterpret_cast<const char*>(src + i * ldb + k), _MM_HINT_T0);
    for (int64_t h = 0; h < NR / 8; ++h) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (8 * h + i) * ldb + k);
      transpose8x8(r);
      for (int kk = 0; kk < 8; ++kk) _mm256_store_ps(dst + (k + kk) * NR + 8 * h, r[kk]);
    }
  }
  for (; k < kc; ++k)
    for (int64_t c = 0; c < NR; ++c) dst[k * NR + c] = src[c * ldb + k];
}

}  // namespace moa::kernels::cpu::detail

#endif  // __AVX2__
