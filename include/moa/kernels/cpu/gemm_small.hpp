// Direct (unpacked) matrix product for tiny or skinny problems (a few rows or columns, or very few
// flops), where packing panels would cost as much as the product itself.
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemm_common.hpp"

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
    for (; k + 16 <= K; k += 16)
      for (int64_t l = 0; l < 16; ++l) s[l] = fmadd(a[k + l], b[k + l], s[l]);
  } else {
    for (; k + 16 <= K; k += 16)
      for (int64_t l = 0; l < 16; ++l) s[l] = fmadd(a[(k + l) * sa], b[k + l], s[l]);
  }
  for (int64_t l = 0; k < K; ++k, ++l) s[l] = fmadd(a[k * sa], b[k], s[l]);
  for (int64_t w = 8; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
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
        for (int64_t j = j0; j < j1; ++j) c[j] = fmadd(ak, b[j], c[j]);
      }
    } else {
      // B stored N x K: C(i, j) is a dot product of op(A) row i with the contiguous row j of B.
      for (int64_t j = j0; j < j1; ++j) {
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
