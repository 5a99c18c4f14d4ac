// AVX2 + FMA microkernel of the blocked matrix product: a 6 x 16 register tile held in 12 ymm
// accumulators; each k step loads two vectors of packed B and broadcasts six values of packed A.
#pragma once

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "gemm_common.hpp"
#include "gemm_pack_avx2.hpp"

namespace moa::kernels::cpu::detail {

struct ukernel_avx2 {
  static constexpr int64_t MR = 6;
  static constexpr int64_t NR = 16;
  static constexpr int64_t KC = 256;
  static constexpr int64_t MC = 144;
  static constexpr int64_t NC = 3072;
  static constexpr int64_t NJ_MIN = 64;  // narrowest column block of a threaded job

  static void pack_a(bool trans_a, const float* A, int64_t lda, int64_t i0, int64_t mc, int64_t k0, int64_t kc,
                     float* Ap) {
    pack_a_avx2_6(trans_a, A, lda, i0, mc, k0, kc, Ap);
  }
  // Micro-panels [q0, q1) of the B block at columns j0.. (nc wide), rows k0.. (kc deep).
  static void pack_b(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc, int64_t j0, int64_t nc,
                     int64_t q0, int64_t q1, float* Bp) {
    pack_b_block<NR>(trans_b, B, ldb, k0, kc, j0, nc, q0, q1, Bp, pack_b_panel_avx2<NR>);
  }

  // C[0:6, 0:16] (row stride ldc) <- update(sum_k a[k*6 + r] * b[k*16 + c]); a, b packed, b 32-byte aligned.
  static void run(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                  float alpha, float beta, update_mode mode) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;

    for (int64_t r = 0; r < MR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 15), _MM_HINT_T0);
    }

    // The k loop is written in assembly so that the compiler can neither turn it into
    // memory-operand FMAs nor shuffle accumulators between registers; the accumulators stay C++
    // variables bound to ymm registers, so the write-back below is ordinary intrinsics code.
#define MOA_SGEMM_AVX2_ROW(o, r, lo, hi)             \
  "vbroadcastss 24*" #o "+4*" #r "(%[a]), %[t2]\n\t" \
  "vfmadd231ps %[t0], %[t2], %[" #lo "]\n\t"         \
  "vfmadd231ps %[t1], %[t2], %[" #hi "]\n\t"
#define MOA_SGEMM_AVX2_STEP(o)                \
  "vmovaps 64*" #o "(%[b]), %[t0]\n\t"        \
  "vmovaps 64*" #o "+32(%[b]), %[t1]\n\t"     \
  MOA_SGEMM_AVX2_ROW(o, 0, c00, c01)          \
  MOA_SGEMM_AVX2_ROW(o, 1, c10, c11)          \
  MOA_SGEMM_AVX2_ROW(o, 2, c20, c21)          \
  MOA_SGEMM_AVX2_ROW(o, 3, c30, c31)          \
  MOA_SGEMM_AVX2_ROW(o, 4, c40, c41)          \
  MOA_SGEMM_AVX2_ROW(o, 5, c50, c51)

    int64_t k4 = kc >> 2, kr = kc & 3;
    __m256 t0, t1, t2;
    __asm__(
        "vxorps %[c00], %[c00], %[c00]\n\t"
        "vxorps %[c01], %[c01], %[c01]\n\t"
        "vxorps %[c10], %[c10], %[c10]\n\t"
        "vxorps %[c11], %[c11], %[c11]\n\t"
        "vxorps %[c20], %[c20], %[c20]\n\t"
        "vxorps %[c21], %[c21], %[c21]\n\t"
        "vxorps %[c30], %[c30], %[c30]\n\t"
        "vxorps %[c31], %[c31], %[c31]\n\t"
        "vxorps %[c40], %[c40], %[c40]\n\t"
        "vxorps %[c41], %[c41], %[c41]\n\t"
        "vxorps %[c50], %[c50], %[c50]\n\t"
        "vxorps %[c51], %[c51], %[c51]\n\t"
        "test %[k4], %[k4]\n\t"
        "jz 2f\n\t"
        ".p2align 5\n\t"
        "1:\n\t"
        "prefetcht0 768(%[a])\n\t"
        MOA_SGEMM_AVX2_STEP(0)
        MOA_SGEMM_AVX2_STEP(1)
        MOA_SGEMM_AVX2_STEP(2)
        MOA_SGEMM_AVX2_STEP(3)
        "add $96, %[a]\n\t"
        "add $256, %[b]\n\t"
        "dec %[k4]\n\t"
        "jnz 1b\n\t"
        "2:\n\t"
        "test %[kr], %[kr]\n\t"
        "jz 4f\n\t"
        "3:\n\t"
        MOA_SGEMM_AVX2_STEP(0)
        "add $24, %[a]\n\t"
        "add $64, %[b]\n\t"
        "dec %[kr]\n\t"
        "jnz 3b\n\t"
        "4:\n\t"
        : [a] "+r"(a), [b] "+r"(b), [k4] "+r"(k4), [kr] "+r"(kr), [c00] "=&x"(c00), [c01] "=&x"(c01),
          [c10] "=&x"(c10), [c11] "=&x"(c11), [c20] "=&x"(c20), [c21] "=&x"(c21), [c30] "=&x"(c30), [c31] "=&x"(c31),
          [c40] "=&x"(c40), [c41] "=&x"(c41), [c50] "=&x"(c50), [c51] "=&x"(c51), [t0] "=&x"(t0), [t1] "=&x"(t1),
          [t2] "=&x"(t2)
        :
        : "cc", "memory");
#undef MOA_SGEMM_AVX2_STEP
#undef MOA_SGEMM_AVX2_ROW

    const __m256 va = _mm256_set1_ps(alpha);
    const __m256 vb = _mm256_set1_ps(beta);
    auto store = [&](float* p, __m256 acc) {
      switch (mode) {
        case update_mode::overwrite: _mm256_storeu_ps(p, _mm256_mul_ps(acc, va)); break;
        case update_mode::scale: _mm256_storeu_ps(p, _mm256_fmadd_ps(acc, va, _mm256_mul_ps(_mm256_loadu_ps(p), vb))); break;
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
