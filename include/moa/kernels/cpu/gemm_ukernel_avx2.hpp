// AVX2 + FMA microkernel of the blocked matrix product: a 6 x 16 register tile held in 12 ymm
// accumulators; each k step loads two vectors of packed B and broadcasts six values of packed A.
#pragma once

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "gemm_common.hpp"

namespace moa::kernels::cpu::detail {

struct ukernel_avx2 {
  static constexpr int64_t MR = 6;
  static constexpr int64_t NR = 16;
  static constexpr int64_t KC = 256;
  static constexpr int64_t MC = 144;
  static constexpr int64_t NC = 3072;

  static void run(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                  float alpha, float beta, update_mode mode) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();

    for (int64_t r = 0; r < MR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 15), _MM_HINT_T0);
    }

#define MOA_SGEMM_AVX2_STEP(o)                                    \
  {                                                               \
    const __m256 b0 = _mm256_load_ps(b + 16 * (o));               \
    const __m256 b1 = _mm256_load_ps(b + 16 * (o) + 8);           \
    __m256 av = _mm256_broadcast_ss(a + 6 * (o) + 0);             \
    c00 = _mm256_fmadd_ps(av, b0, c00);                           \
    c01 = _mm256_fmadd_ps(av, b1, c01);                           \
    av = _mm256_broadcast_ss(a + 6 * (o) + 1);                    \
    c10 = _mm256_fmadd_ps(av, b0, c10);                           \
    c11 = _mm256_fmadd_ps(av, b1, c11);                           \
    av = _mm256_broadcast_ss(a + 6 * (o) + 2);                    \
    c20 = _mm256_fmadd_ps(av, b0, c20);                           \
    c21 = _mm256_fmadd_ps(av, b1, c21);                           \
    av = _mm256_broadcast_ss(a + 6 * (o) + 3);                    \
    c30 = _mm256_fmadd_ps(av, b0, c30);                           \
    c31 = _mm256_fmadd_ps(av, b1, c31);                           \
    av = _mm256_broadcast_ss(a + 6 * (o) + 4);                    \
    c40 = _mm256_fmadd_ps(av, b0, c40);                           \
    c41 = _mm256_fmadd_ps(av, b1, c41);                           \
    av = _mm256_broadcast_ss(a + 6 * (o) + 5);                    \
    c50 = _mm256_fmadd_ps(av, b0, c50);                           \
    c51 = _mm256_fmadd_ps(av, b1, c51);                           \
  }

    int64_t k = 0;
    for (; k + 4 <= kc; k += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(a + 6 * 16), _MM_HINT_T0);
      MOA_SGEMM_AVX2_STEP(0)
      MOA_SGEMM_AVX2_STEP(1)
      MOA_SGEMM_AVX2_STEP(2)
      MOA_SGEMM_AVX2_STEP(3)
      a += 24;
      b += 64;
    }
    for (; k < kc; ++k) {
      MOA_SGEMM_AVX2_STEP(0)
      a += 6;
      b += 16;
    }
#undef MOA_SGEMM_AVX2_STEP

    const __m256 va = _mm256_set1_ps(alpha);
    auto store = [&](float* p, __m256 acc) {
      switch (mode) {
        case update_mode::overwrite: _mm256_storeu_ps(p, _mm256_mul_ps(acc, va)); break;
        case update_mode::scale:
          _mm256_storeu_ps(p, _mm256_fmadd_ps(acc, va, _mm256_mul_ps(_mm256_loadu_ps(p), _mm256_set1_ps(beta))));
          break;
        default: _mm256_storeu_ps(p, _mm256_fmadd_ps(acc, va, _mm256_loadu_ps(p))); break;
      }
    };
    store(c + 0 * ldc, c00);
    store(c + 0 * ldc + 8, c01);
    store(c + 1 * ldc, c10);
    store(c + 1 * ldc + 8, c11);
    store(c + 2 * ldc, c20);
    store(c + 2 * ldc + 8, c21);
    store(c + 3 * ldc, c30);
    store(c + 3 * ldc + 8, c31);
    store(c + 4 * ldc, c40);
    store(c + 4 * ldc + 8, c41);
    store(c + 5 * ldc, c50);
    store(c + 5 * ldc + 8, c51);
  }
};

}  // namespace moa::kernels::cpu::detail

#endif  // __AVX2__ && __FMA__
