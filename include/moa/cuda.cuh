// moa/cuda.cuh: moa's tensors on NVIDIA GPUs. Include this header in one .cu file of the program
// (compiled by nvcc with -std=c++20 --expt-relaxed-constexpr, linked with moa::cuda, i.e. the CUDA
// runtime and cuBLAS); every other file keeps using the plain moa headers with the host compiler.
//
// Including it registers the CUDA implementation of moa::DeviceBackend (moa/core/backend.hpp)
// for DeviceType::cuda at static initialisation, so Device::cuda(i) tensors work anywhere in the
// program. moa::cuda::init() does the same explicitly and says whether a GPU is present:
//
//   #include <moa/cuda.cuh>
//   int main() {
//     const moa::Device dev = moa::cuda::init() ? moa::Device::cuda(0) : moa::Device::cpu();
//     ...
//   }
//
// Including it in several .cu files is fine too (everything here is inline).
#pragma once

#include "moa/core/backend.hpp"
#include "moa/kernels/cuda/allocator.cuh"
#include "moa/kernels/cuda/backend.cuh"
#include "moa/kernels/cuda/launch.cuh"

namespace moa::cuda {

// The process's CUDA backend (never destroyed: no CUDA call after the driver unloads at exit).
inline kernels::cuda::CudaBackend& backend_instance() {
  static kernels::cuda::CudaBackend* b = new kernels::cuda::CudaBackend();
  return *b;
}

namespace detail {
// Registers the backend without touching the driver (no CUDA call: a CPU-only run of a program
// that includes this header does not pay for CUDA's initialisation).
inline bool install() noexcept {
  try {
    register_backend(DeviceType::cuda, &backend_instance());
    return true;
  } catch (...) {
    return false;
  }
}
}  // namespace detail

// Registers the CUDA backend for DeviceType::cuda (idempotent; replaces a backend a test
// installed) and returns whether at least one CUDA device is present. Never throws.
inline bool init() noexcept {
  try {
    return detail::install() && backend_instance().device_count() > 0;
  } catch (...) {
    return false;
  }
}

// The number of CUDA devices (0 without a GPU or a driver).
inline int device_count() { return backend_instance().device_count(); }

// The caching allocator's counters for a device: bytes in use, cached and at peak, and the real
// cudaMalloc/cudaFree counts (a warm training loop keeps malloc_count constant).
inline kernels::cuda::AllocatorStats allocator_stats(int device = 0) {
  return backend_instance().allocator_stats(device);
}

// The stream all of moa's work on a device runs on (for interop with the caller's own kernels:
// queue them on this stream, or synchronise with it).
inline cudaStream_t stream(int device = 0) { return backend_instance().stream(device); }

namespace detail {
// Dynamic initialisation registers the backend before main in any program that includes this
// header: init() without its device query, which runs on first use of a cuda device instead.
inline const bool registered = install();
}  // namespace detail

}  // namespace moa::cuda
