// Fast float32 matrix product on the CPU (sgemm, batched sgemm, and a gemm<T> dispatcher):
// cache-blocked, packed, OpenMP-parallel, with a SIMD microkernel picked at compile time
// (AVX-512, AVX2+FMA, or the portable one that is always available as detail::sgemm_generic).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../reference/gemm.hpp"
#include "gemm_blocked.hpp"
#include "gemm_common.hpp"
#include "gemm_small.hpp"
#include "gemm_ukernel_avx2.hpp"
#include "gemm_ukernel_avx512.hpp"
#include "gemm_ukernel_generic.hpp"

namespace moa::kernels::cpu {
namespace detail {

#if defined(__AVX512F__)
using ukernel_native = ukernel_avx512;
#elif defined(__AVX2__) && defined(__FMA__)
using ukernel_native = ukernel_avx2;
#else
using ukernel_native = ukernel_generic;
#endif

// Threads worth using for an M x N x K product by its flops: all available ones, fewer for small
// products (~1 Mflop per thread: below that, a fork costs more than it saves).
inline int sgemm_threads_for_flops(int64_t M, int64_t N, int64_t K) {
  const int64_t work = M * N * K;
  const int64_t per_thread = int64_t(1) << 19;
  const int avail = max_threads();
  if (avail <= 1 || work < 2 * per_thread) return 1;
  return static_cast<int>(std::min<int64_t>(avail, work / per_thread));
}

// Threads worth using for one M x N x K product. A matrix-vector product (a side of 1 or 2) is
// bound by reading the matrix, not by its flops: one thread per 256 KB of it (decoding reads every
// 768 x 768 weight once per token; a second core reads the second half at the same time), and no
// more than the direct path can split it into (column blocks of 64 when M <= 2, rows when N <= 2).
inline int sgemm_threads_for(int64_t M, int64_t N, int64_t K) {
  const int avail = max_threads();
  if (avail <= 1) return 1;
  if (std::min(M, N) > 2) return sgemm_threads_for_flops(M, N, K);
  const int64_t work = std::max(M, N) * K, per_thread = int64_t(1) << 16;
  const int64_t parts = M <= 2 ? N / 64 : M;
  if (work < 2 * per_thread || parts < 2) return 1;
  return static_cast<int>(std::min<int64_t>({avail, work / per_thread, parts}));
}

// The whole product with a given microkernel and thread count (deterministic for any count).
template <class Ukr>
inline void sgemm_with(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                       int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int nthreads) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == 0.0f) {
    scale_c(M, N, beta, C, ldc);
    return;
  }
  if (sgemm_prefers_direct(M, N, K)) {
    sgemm_direct(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, nthreads);
    return;
  }
  sgemm_blocked<Ukr>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, nthreads);
}

// The portable path (no intrinsics), same signature as sgemm; always compiled.
inline void sgemm_generic(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  sgemm_with<ukernel_generic>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                              sgemm_threads_for(M, N, K));
}

// Double precision: a simple row-wise loop (i, k, j: contiguous along j), parallel over rows.
inline void dgemm_simple(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                         int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  const int64_t a_row = trans_a ? 1 : lda, a_col = trans_a ? lda : 1;
  const int64_t b_row = trans_b ? 1 : ldb, b_col = trans_b ? ldb : 1;  // op(B)(k, j) = B[k*b_row + j*b_col]
  const int nthreads = static_cast<int>(std::min<int64_t>(sgemm_threads_for_flops(M, N, K), M));  // split over rows
  (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
#endif
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = (beta == 0.0) ? 0.0 : beta * c[j];
    if (alpha == 0.0) continue;
    for (int64_t k = 0; k < K; ++k) {
      const double ak = alpha * A[i * a_row + k * a_col];
      const double* b = B + k * b_row;
      if (b_col == 1) {
        for (int64_t j = 0; j < N; ++j) c[j] += ak * b[j];
      } else {
        for (int64_t j = 0; j < N; ++j) c[j] += ak * b[j * b_col];
      }
    }
  }
}

}  // namespace detail

// Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, float32.
// op(A) = A (M x K, row stride lda) or, with trans_a, A is stored K x M and op(A) = A^T; the same
// for B (K x N, or N x K stored with trans_b). beta == 0 overwrites C, ignoring its contents.
// Uses up to omp_get_max_threads() threads; results are bitwise reproducible for any thread count.
inline void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                  int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  detail::sgemm_with<detail::ukernel_native>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                                             detail::sgemm_threads_for(M, N, K));
}

// `batch` independent products; matrix b of A, B, C starts at A + b * stride_a (and so on).
// Small products run one per thread over the batch; large ones one after the other, each threaded.
inline void sgemm_batched(bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K, float alpha,
                          const float* A, int64_t lda, int64_t stride_a, const float* B, int64_t ldb, int64_t stride_b,
                          float beta, float* C, int64_t ldc, int64_t stride_c) {
  if (batch <= 0) return;
  // by flops: many small products (attention's heads) go one per thread rather than each threaded
  const int per_product = detail::sgemm_threads_for_flops(M, N, K);
  const int avail = detail::max_threads();
  if (batch == 1 || per_product >= avail) {
    for (int64_t b = 0; b < batch; ++b)
      detail::sgemm_with<detail::ukernel_native>(trans_a, trans_b, M, N, K, alpha, A + b * stride_a, lda,
                                                 B + b * stride_b, ldb, beta, C + b * stride_c, ldc, per_product);
    return;
  }
  const int nthreads = static_cast<int>(std::min<int64_t>(avail, batch));
  (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
#endif
  for (int64_t b = 0; b < batch; ++b)
    detail::sgemm_with<detail::ukernel_native>(trans_a, trans_b, M, N, K, alpha, A + b * stride_a, lda,
                                               B + b * stride_b, ldb, beta, C + b * stride_c, ldc, 1);
}

// Type-generic entry point: float goes to sgemm, double to a simple loop, anything else to the
// reference kernel.
template <class T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else if constexpr (std::is_same_v<T, double>) {
    detail::dgemm_simple(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    reference::gemm<T>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

}  // namespace moa::kernels::cpu
