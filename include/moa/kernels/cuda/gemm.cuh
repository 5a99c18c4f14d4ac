// moa/kernels/cuda/gemm.cuh: row-major matrix products on the GPU through cuBLAS, with the same
// arguments as kernels::reference::gemm:
//   C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C
// op(A) = A (stored M x K, row stride lda) or, with trans_a, A stored K x M and op(A) = A^T;
// op(B) likewise (stored K x N, or N x K with trans_b). beta == 0 overwrites C.
//
// cuBLAS is column-major; a row-major X is a column-major X^T with the same leading dimension, so
// row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
#pragma once

#include <cstdint>
#include <map>

#include "moa/core/error.hpp"
#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"

namespace moa::kernels::cuda {

// One cuBLAS handle per host thread and device (a handle belongs to the device current when it was
// created), created on first use for the current device (cublasCreate is slow; never in a loop).
// CudaBackend passes its own per-device handles; this is for direct callers of the launchers.
inline cublasHandle_t cublas_handle() {
  struct Holder {
    std::map<int, cublasHandle_t> h;
    ~Holder() {
      for (auto& [device, handle] : h) cublasDestroy(handle);
    }
  };
  thread_local Holder holder;
  int device = 0;
  MOA_CUDA_CHECK(cudaGetDevice(&device));
  auto it = holder.h.find(device);
  if (it == holder.h.end()) {
    cublasHandle_t handle = nullptr;
    MOA_CUBLAS_CHECK(cublasCreate(&handle));
    it = holder.h.emplace(device, handle).first;
  }
  return it->second;
}

namespace detail {

inline void check_gemm_args(const char* op, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int64_t lda,
                            int64_t ldb, int64_t ldc) {
  constexpr int64_t max_int = 2147483647;
  MOA_CHECK(M >= 0 && N >= 0 && K >= 0 && M <= max_int && N <= max_int && K <= max_int, ShapeError, op,
            ": expected sizes in [0, 2^31), got M ", M, ", N ", N, ", K ", K);
  MOA_CHECK(lda >= (trans_a ? M : K) && ldb >= (trans_b ? K : N) && ldc >= N && lda >= 1 && ldb >= 1 && ldc >= 1 &&
                lda <= max_int && ldb <= max_int && ldc <= max_int,
            ShapeError, op, ": leading dimensions too small: lda ", lda, ", ldb ", ldb, ", ldc ", ldc, " for M ", M,
            ", N ", N, ", K ", K, trans_a ? " (A^T)" : "", trans_b ? " (B^T)" : "");
}

}  // namespace detail

// float32 in, float32 out, float32 accumulation (no TF32 unless the handle's math mode allows it).
inline void gemm_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                     int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                     cudaStream_t stream = nullptr, cublasHandle_t handle = nullptr) {
  detail::check_gemm_args("gemm_f32", trans_a, trans_b, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  if (!handle) handle = cublas_handle();
  MOA_CUBLAS_CHECK(cublasSetStream(handle, stream));
  MOA_CUBLAS_CHECK(cublasSgemm(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                               static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B,
                               static_cast<int>(ldb), A, static_cast<int>(lda), &beta, C, static_cast<int>(ldc)));
}

// bfloat16 A and B, float32 C, float32 accumulation (tensor cores): the mixed-precision option.
// Same layout rules as gemm_f32.
inline void gemm_bf16_f32(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                          const __nv_bfloat16* A, int64_t lda, const __nv_bfloat16* B, int64_t ldb, float beta,
                          float* C, int64_t ldc, cudaStream_t stream = nullptr, cublasHandle_t handle = nullptr) {
  detail::check_gemm_args("gemm_bf16_f32", trans_a, trans_b, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  if (!handle) handle = cublas_handle();
  MOA_CUBLAS_CHECK(cublasSetStream(handle, stream));
  MOA_CUBLAS_CHECK(cublasGemmEx(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B, CUDA_R_16BF,
                                static_cast<int>(ldb), A, CUDA_R_16BF, static_cast<int>(lda), &beta, C, CUDA_R_32F,
                                static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

namespace detail {
static __global__ void f32_to_bf16_kernel(__nv_bfloat16* out, const float* in, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}
}  // namespace detail

// out[i] = bf16(in[i]), round to nearest even: feeding float32 data to gemm_bf16_f32.
inline void f32_to_bf16(__nv_bfloat16* out, const float* in, int64_t n, cudaStream_t stream = nullptr) {
  if (n <= 0) return;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  MOA_CUDA_LAUNCH(detail::f32_to_bf16_kernel, grid, threads, 0, stream, out, in, n);
  MOA_CUDA_LAUNCH_CHECK();
}

}  // namespace moa::kernels::cuda
