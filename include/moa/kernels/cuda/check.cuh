// moa/kernels/cuda/check.cuh: every CUDA runtime and cuBLAS call checked; a failure becomes a
// moa::DeviceError naming the call, where it was made, and the error code with its name, e.g.
//   [moa.device_error] cudaMalloc(&p, bytes) failed at allocator.cuh:71: error 2 (cudaErrorMemoryAllocation: out of memory)
//
//   MOA_CUDA_CHECK(cudaMemcpy(...));
//   MOA_CUBLAS_CHECK(cublasSgemm(...));
//   kernel<<<grid, block, 0, stream>>>(...); MOA_CUDA_LAUNCH_CHECK();
#pragma once

#include <string>

#include "moa/core/error.hpp"
#include "moa/kernels/cuda/launch.cuh"

namespace moa::kernels::cuda::detail {

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

// Strips the directory from __FILE__ so messages stay short and stable across checkouts.
inline const char* base_name(const char* path) {
  const char* b = path;
  for (const char* p = path; *p; ++p)
    if (*p == '/' || *p == '\\') b = p + 1;
  return b;
}

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  (void)cudaGetLastError();  // clear it: the next launch check must not report this error as its own
  throw DeviceError(::moa::detail::cat(call, " failed at ", base_name(file), ":", line, ": error ", static_cast<int>(e),
                                       " (", cudaGetErrorName(e), ": ", cudaGetErrorString(e), ")"));
}

[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  throw DeviceError(::moa::detail::cat(call, " failed at ", base_name(file), ":", line, ": cuBLAS status ",
                                       static_cast<int>(s), " (", cublas_status_name(s), ")"));
}

}  // namespace moa::kernels::cuda::detail

#define MOA_CUDA_CHECK(call)                                                                  \
  do {                                                                                        \
    const cudaError_t moa_cuda_err_ = (call);                                                 \
    if (moa_cuda_err_ != cudaSuccess)                                                         \
      ::moa::kernels::cuda::detail::throw_cuda(moa_cuda_err_, #call, __FILE__, __LINE__);     \
  } while (0)

#define MOA_CUBLAS_CHECK(call)                                                                \
  do {                                                                                        \
    const cublasStatus_t moa_cublas_st_ = (call);                                             \
    if (moa_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                              \
      ::moa::kernels::cuda::detail::throw_cublas(moa_cublas_st_, #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: a bad configuration (grid, shared memory) shows here; faults inside the
// kernel show at the next synchronising call, which is checked too.
#define MOA_CUDA_LAUNCH_CHECK() MOA_CUDA_CHECK(cudaGetLastError())
