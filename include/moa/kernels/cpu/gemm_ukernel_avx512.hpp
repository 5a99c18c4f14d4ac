// AVX-512 microkernel of the blocked matrix product: a 12 x 32 register tile held in 24 zmm
// accumulators; each k step loads two vectors of packed B and broadcasts twelve values of packed A.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>

#include "gemm_common.hpp"
#include "gemm_pack.hpp"
#include "gemm_pack_avx2.hpp"

namespace moa::kernels::cpu::detail {

struct ukernel_avx512 {
  static constexpr int64_t MR = 12;
  static constexpr int64_t NR = 32;
  static constexpr int64_t KC = 256;
  static constexpr int64_t MC = 192;
  static constexpr int64_t NC = 3072;
  static constexpr int64_t NJ_MIN = 128;  // narrowest column block of a threaded job

  static void pack_a(bool trans_a, const float* A, int64_t lda, int64_t i0, int64_t mc, int64_t k0, int64_t kc,
                     float* Ap) {
    detail::pack_a<MR>(trans_a, A, lda, i0, mc, k0, kc, Ap);
  }
  // Micro-panels [q0, q1) of the B block at columns j0.. (nc wide), rows k0.. (kc deep).
  static void pack_b(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc, int64_t j0, int64_t nc,
                     int64_t q0, int64_t q1, float* Bp) {
    pack_b_block<NR>(trans_b, B, ldb, k0, kc, j0, nc, q0, q1, Bp, pack_b_panel_avx2<NR>);
  }

  static void run(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                  float alpha, float beta, update_mode mode) {
#define MOA_Z2(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
    MOA_Z2(0) MOA_Z2(1) MOA_Z2(2) MOA_Z2(3) MOA_Z2(4) MOA_Z2(5)
    MOA_Z2(6) MOA_Z2(7) MOA_Z2(8) MOA_Z2(9) MOA_Z2(10) MOA_Z2(11)
#undef MOA_Z2

    for (int64_t r = 0; r < MR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 31), _MM_HINT_T0);
    }

#define MOA_R(r)                                          \
  av = _mm512_set1_ps(a[(r)]);                            \
  c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0);             \
  c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1);
    for (int64_t k = 0; k < kc; ++k) {
      const __m512 b0 = _mm512_load_ps(b);
      const __m512 b1 = _mm512_load_ps(b + 16);
      __m512 av;
      MOA_R(0) MOA_R(1) MOA_R(2) MOA_R(3) MOA_R(4) MOA_R(5)
      MOA_R(6) MOA_R(7) MOA_R(8) MOA_R(9) MOA_R(10) MOA_R(11)
      a += MR;
      b += NR;
    }
#undef MOA_R

    const __m512 va = _mm512_set1_ps(alpha);
    const __m512 vb = _mm512_set1_ps(beta);
    auto store = [&](float* p, __m512 acc) {
      switch (mode) {
        case update_mode::overwrite: _mm512_storeu_ps(p, _mm512_mul_ps(acc, va)); break;
        case update_mode::scale: _mm512_storeu_ps(p, _mm512_fmadd_ps(acc, va, _mm512_mul_ps(_mm512_loadu_ps(p), vb))); break;
        default: _mm512_storeu_ps(p, _mm512_fmadd_ps(acc, va, _mm512_loadu_ps(p))); break;
      }
    };
#define MOA_S(r)                        \
  store(c + (r) * ldc, c##r##0);        \
  store(c + (r) * ldc + 16, c##r##1);
    MOA_S(0) MOA_S(1) MOA_S(2) MOA_S(3) MOA_S(4) MOA_S(5)
    MOA_S(6) MOA_S(7) MOA_S(8) MOA_S(9) MOA_S(10) MOA_S(11)
#undef MOA_S
  }
};

}  // namespace moa::kernels::cpu::detail

#endif  // __AVX512F__
