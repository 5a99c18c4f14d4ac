// Reference matrix product: a naive, obviously-correct triple loop used to check the fast kernels.
#pragma once

#include <cstdint>

namespace moa::kernels::reference {

// Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
// op(A) = A (A is M x K, row stride lda) or, with trans_a, A is stored K x M and op(A) = A^T.
// op(B) = B (B is K x N, row stride ldb) or, with trans_b, B is stored N x K and op(B) = B^T.
// beta == 0 overwrites C (whatever it held, NaN included), as in BLAS. Accumulates in T.
template <class T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      T acc = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T a = trans_a ? A[k * lda + i] : A[i * lda + k];
        const T b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        acc += a * b;
      }
      T& c = C[i * ldc + j];
      c = (beta == T(0)) ? alpha * acc : alpha * acc + beta * c;
    }
  }
}

}  // namespace moa::kernels::reference
