// Direct (unpacked) matrix product for tiny or skinny problems (a few rows or columns, or very few
// flops), where packing panels would cost as much as the product itself.
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemm_common.hpp"
#include "moa/core/parallel.hpp"

namespace moa::kernels::cpu::detail {

// True when the direct path beats packing: very little work, or op(A) / op(B) is a few vectors.
inline bool sgemm_prefers_direct(int64_t M, int64_t N, int64_t K) {
  return M * N * K <= 24 * 24 * 24 || M <= 2 || N <= 2;
}

// sum_k a[k * sa] * b[k] with 16 fixed partial sums (vectorisable, deterministic order).
inline float dot_strided(const float* a, int64_t sa, const float* __restrict b, int64_t K) {
  float s[16] = {};
  int64_t k = 0;
  if (sa == 1) {
    for (; k + 16 <= K; k += 16) {
      MOA_OMP_SIMD
      for (int64_t l = 0; l < 16; ++l) s[l] = fmadd(a[k + l], b[k + l], s[l]);
    }
  } else {
    for (; k + 16 <= K; k += 16) {
      MOA_OMP_SIMD
      for (int64_t l = 0; l < 16; ++l) s[l] = fmadd(a[(k + l) * sa], b[k + l], s[l]);
    }
  }
  for (int64_t l = 0; k < K; ++k, ++l) s[l] = fmadd(a[k * sa], b[k], s[l]);
  for (int64_t w = 8; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

// The dot products of op(A)'s row `a` with 4 contiguous rows of B at once (one pass over a for 4
// streams of B: a matrix-vector product reads B at the memory's rate, not one row's latency at a
// time). Each result is bit-identical to dot_strided's for that row (the same partial sums in the
// same order). `ahead`: bytes past each position read to prefetch (the caller passes the next 4
// rows': a matrix-vector product streams a matrix too large for the caches, and the prefetch keeps
// more of its reads in flight: GPT-2 decoding 41 -> 56 tokens/s on a 2-core Xeon). A prefetch
// does not fault, so the last rows' (past the matrix) are harmless; the address is formed as an
// integer, not as a pointer past the array.
inline void dot4_strided(const float* a, int64_t sa, const float* __restrict b0, const float* __restrict b1,
                         const float* __restrict b2, const float* __restrict b3, int64_t K, float out[4],
                         int64_t ahead) {
  float s0[16] = {}, s1[16] = {}, s2[16] = {}, s3[16] = {};
  int64_t k = 0;
  const auto at = [ahead](const float* p, int64_t k) {
    return reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p + k) + static_cast<std::uintptr_t>(ahead));
  };
  for (; k + 16 <= K; k += 16) {
    __builtin_prefetch(at(b0, k));
    __builtin_prefetch(at(b1, k));
    __builtin_prefetch(at(b2, k));
    __builtin_prefetch(at(b3, k));
    MOA_OMP_SIMD
    for (int64_t l = 0; l < 16; ++l) {
      const float av = a[(k + l) * sa];
      s0[l] = fmadd(av, b0[k + l], s0[l]);
      s1[l] = fmadd(av, b1[k + l], s1[l]);
      s2[l] = fmadd(av, b2[k + l], s2[l]);
      s3[l] = fmadd(av, b3[k + l], s3[l]);
    }
  }
  for (int64_t l = 0; k < K; ++k, ++l) {
    const float ak = a[k * sa];
    s0[l] = fmadd(ak, b0[k], s0[l]);
    s1[l] = fmadd(ak, b1[k], s1[l]);
    s2[l] = fmadd(ak, b2[k], s2[l]);
    s3[l] = fmadd(ak, b3[k], s3[l]);
  }
  for (int64_t w = 8; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) {
      s0[l] += s0[l + w];
      s1[l] += s1[l + w];
      s2[l] += s2[l + w];
      s3[l] += s3[l + w];
    }
  out[0] = s0[0];
  out[1] = s1[0];
  out[2] = s2[0];
  out[3] = s3[0];
}

// Rows [i0, i1) x columns [j0, j1) of C, computed without packing.
inline void sgemm_direct_block(bool trans_a, bool trans_b, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t K,
                               float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                               float* C, int64_t ldc) {
  const int64_t a_row = trans_a ? 1 : lda;  // stride between rows i of op(A)
  const int64_t a_col = trans_a ? lda : 1;  // stride between columns k of op(A)
  for (int64_t i = i0; i < i1; ++i) {
    float* __restrict c = C + i * ldc;
    const float* a = A + i * a_row;
    if (!trans_b) {
      // Row of C as a sum of rows of B: contiguous along j, vectorisable.
      if (beta == 0.0f) {
        for (int64_t j = j0; j < j1; ++j) c[j] = 0.0f;
      } else if (beta != 1.0f) {
        for (int64_t j = j0; j < j1; ++j) c[j] *= beta;
      }
      for (int64_t k = 0; k < K; ++k) {
        const float ak = alpha * a[k * a_col];
        const float* __restrict b = B + k * ldb;
        MOA_OMP_SIMD
        for (int64_t j = j0; j < j1; ++j) c[j] = fmadd(ak, b[j], c[j]);
      }
    } else {
      // B stored N x K: C(i, j) is a dot product of op(A) row i with the contiguous row j of B.
      int64_t j = j0;
      for (; j + 4 <= j1; j += 4) {
        float s[4];
        const float* b = B + j * ldb;
        dot4_strided(a, a_col, b, b + ldb, b + 2 * ldb, b + 3 * ldb, K, s, 4 * ldb * int64_t(sizeof(float)));
        for (int64_t q = 0; q < 4; ++q) c[j + q] = (beta == 0.0f) ? alpha * s[q] : fmadd(alpha, s[q], beta * c[j + q]);
      }
      for (; j < j1; ++j) {
        const float s = dot_strided(a, a_col, B + j * ldb, K);
        c[j] = (beta == 0.0f) ? alpha * s : fmadd(alpha, s, beta * c[j]);
      }
    }
  }
}

// The whole product on the direct path, split over rows or columns (never over K) across threads.
inline void sgemm_direct(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                         int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int nthreads) {
  if (nthreads <= 1) {
    sgemm_direct_block(trans_a, trans_b, 0, M, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
  {
    const int t = thread_id(), nt = num_threads();
    if (N >= 64 * nt) {
      const int64_t units = (N + 15) / 16;
      const int64_t j0 = std::min(N, units * t / nt * 16), j1 = std::min(N, units * (t + 1) / nt * 16);
      sgemm_direct_block(trans_a, trans_b, 0, M, j0, j1, K, alpha, A, lda, B, ldb, beta, C, ldc);
    } else {
      const int64_t i0 = M * t / nt, i1 = M * (t + 1) / nt;
      sgemm_direct_block(trans_a, trans_b, i0, i1, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
  }
}

}  // namespace moa::kernels::cpu::detail
