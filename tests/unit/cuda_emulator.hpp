// tests/unit/cuda_emulator.hpp: runs CUDA source on the CPU: moa's kernels with their launchers, and
// the whole CUDA backend (moa/kernels/cuda/backend.cuh, through <moa/cuda.cuh>) over an emulated
// CUDA runtime and cuBLAS, so the tiling, masking and synchronisation of the kernels and the host
// logic of the backend (layouts, caches, the caching allocator, the row-major/column-major mapping
// of the products) are tested on machines without a GPU. tests/cuda/ runs the same code on a GPU.
//
// Kernels:
//   - a launch (MOA_CUDA_LAUNCH of moa/kernels/cuda/launch.cuh) runs blockDim.x * blockDim.y real
//     threads (one pooled std::thread per CUDA thread of a block) through the blocks of the grid,
//     one block at a time, so __syncthreads (a std::barrier over the block) and __syncwarp (one per
//     32 threads) have their real meaning: a missing barrier is a data race here too;
//   - static shared memory (`__shared__ float s[32]`) is a function-local static: one copy, which
//     is per block since blocks run one after the other;
//   - dynamic shared memory is one 128-byte aligned buffer per block, filled with 0xFF bytes (NaN
//     as floats and bf16) so that a read of shared memory nobody wrote shows in the results, and an
//     access past its end is caught by AddressSanitizer;
//   - shuffles exchange through a per-warp buffer between two warp barriers; atomicAdd is
//     std::atomic_ref;
//   - WMMA fragments hold the whole 16 x 16 tile in every lane (products are exact in float32, as
//     bf16 x bf16 is); load/store check WMMA's pointer alignment (32 bytes) and ldm rules, and a
//     store is done by lane 0 (the other lanes see it after the __syncwarp the kernel needs anyway);
//   - __nv_bfloat16 rounds to nearest even, as __float2bfloat16 does;
//   - a launch CUDA would refuse (grid or block too large, more shared memory than an H100/H200
//     block can have, an empty grid) runs nothing and sets the last error, as CUDA does.
// Runtime and cuBLAS (what moa calls, one device):
//   - device memory is host memory from cudaMalloc (256-byte aligned, filled with 0xFF bytes:
//     memory is not zeroed on a GPU either) in a registry; copies, memsets and cuBLAS products check
//     that their device ranges lie inside one allocation and that copies do not overlap (undefined
//     on a GPU); a device memory capacity (set_device_memory) makes cudaMalloc fail as a full GPU's;
//   - streams exist but everything runs when called (in call order, as on one stream);
//   - failing calls return CUDA's codes and set the (per host thread) last error;
//   - cuBLAS products follow the column-major definition with cuBLAS's argument checks, float32
//     accumulation, and inputs rounded to bf16 (COMPUTE_32F_FAST_16BF) or tf32 (FAST_TF32);
//   - cuBLASLt: descriptors, layouts, a heuristic that finds one algorithm (or none, when a test
//     sets moa_emu::lt_heuristic_finds to false) for the operand alignments it is told (default 256
//     bytes, as cuBLASLt), and cublasLtMatmul with the bias epilogue over the same emulated product,
//     refusing operands aligned less than the algorithm was chosen for.
// Not emulated: timing, memory other than shared being on another device (a kernel handed a host
// pointer reads it here), warp divergence rules beyond "all 32 lanes take part in every collective".
//
// Use: include this first (it defines MOA_CUDA_EMULATE), then the kernel header or <moa/cuda.cuh>;
// call launchers with host or emulated device pointers, or moa_emu::launch(grid, block, smem_bytes,
// [&] { kernel<...>(args...); }).
#pragma once

#ifndef MOA_CUDA_EMULATE
#define MOA_CUDA_EMULATE
#endif

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// moa/kernels/cuda/launch.cuh's spellings, emulated
#define MOA_CUDA_DYNAMIC_SMEM(name) unsigned char* name = ::moa_emu::dynamic_smem()
#define MOA_CUDA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::moa_emu::launch(::dim3(grid), ::dim3(block), smem, [&] { kernel(__VA_ARGS__); }))
#define MOA_UNROLL

// ---- types and device functions -------------------------------------------------------------------------

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if (std::isnan(f)) return {static_cast<std::uint16_t>((u >> 16) | 0x40)};
  const std::uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<std::uint16_t>(rounded >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b.bits) << 16); }

namespace moa_emu {
// The value as a rounded float, opaque to the optimiser: GCC fuses a * b + c into one FMA where the
// target has it (-march=native) even across inlined calls, which the _rn intrinsics forbid.
inline float rounded(float v) {
#if defined(__x86_64__) && defined(__GNUC__)
  asm("" : "+x"(v));
#else
  volatile float t = v;
  v = t;
#endif
  return v;
}
}  // namespace moa_emu

// Correctly rounded float arithmetic, never fused, as the _rn intrinsics.
inline float __fadd_rn(float a, float b) { return moa_emu::rounded(a + b); }
inline float __fsub_rn(float a, float b) { return moa_emu::rounded(a - b); }
inline float __fmul_rn(float a, float b) { return moa_emu::rounded(a * b); }
inline float __fdiv_rn(float a, float b) { return moa_emu::rounded(a / b); }
inline float __fsqrt_rn(float a) { return moa_emu::rounded(std::sqrt(a)); }
inline float rsqrtf(float a) { return 1.f / std::sqrt(a); }
inline float __expf(float x) { return std::exp(x); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }

// Fibers (default): a block's threads are ucontext fibers of the calling thread, switched at
// barriers, which is fast. OS threads (under ThreadSanitizer, or with MOA_EMU_OS_THREADS): one
// pooled std::thread per CUDA thread, with std::barriers, so that TSan sees a missing barrier as
// a data race.
#if defined(__SANITIZE_THREAD__) || defined(MOA_EMU_OS_THREADS)
#define MOA_EMU_FIBERS 0
#else
#define MOA_EMU_FIBERS 1
#endif

namespace moa_emu {

struct Block {
  explicit Block(unsigned threads, std::size_t smem_bytes) : exchange(threads), raw(smem_bytes + 128, 0xFF) {
#if !MOA_EMU_FIBERS
    block = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(threads));
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
#endif
    const auto addr = reinterpret_cast<std::uintptr_t>(raw.data());
    smem = raw.data() + ((128 - addr % 128) % 128);
  }
#if !MOA_EMU_FIBERS
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
#endif
  std::vector<std::uint64_t> exchange;  // one slot per thread, for shuffles
  std::vector<unsigned char> raw;
  unsigned char* smem = nullptr;
};

inline thread_local Block* current = nullptr;
inline thread_local unsigned linear_id = 0;  // threadIdx.x + blockDim.x * threadIdx.y: warps and lanes

inline unsigned char* dynamic_smem() { return current->smem; }

void sync_block();
void sync_warp();

}  // namespace moa_emu

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { moa_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { moa_emu::sync_warp(); }

template <class T>
T __shfl_sync(unsigned, T v, int src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  auto& ex = moa_emu::current->exchange;
  const unsigned id = moa_emu::linear_id, base = id & ~31u;
  std::memcpy(&ex[id], &v, sizeof(T));
  __syncwarp();
  T r;
  std::memcpy(&r, &ex[base + (static_cast<unsigned>(src_lane) & 31u)], sizeof(T));
  __syncwarp();
  return r;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return __shfl_sync(mask, v, static_cast<int>((moa_emu::linear_id & 31u) ^ static_cast<unsigned>(lane_mask)));
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[rows * cols];
};

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
void check_ptr(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    throw std::logic_error(std::string("wmma ") + what + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) throw std::logic_error(std::string("wmma ") + what + ": ldm not a multiple of 16 bytes");
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  detail::check_ptr(p, ldm, "load_matrix_sync");
  using Fr = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < Fr::rows; ++r)
    for (int c = 0; c < Fr::cols; ++c)
      f.x[r * Fr::cols + c] = detail::to_f(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  detail::check_ptr(p, ldm, "load_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  detail::check_ptr(p, ldm, "store_matrix_sync");
  if ((moa_emu::linear_id & 31u) != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < N; ++n) {
      float s = c.x[r * N + n];
      for (int kk = 0; kk < K; ++kk) s += a.x[r * K + kk] * b.x[kk * N + n];
      out[r * N + n] = s;
    }
  std::memcpy(d.x, out, sizeof out);
}

}  // namespace nvcuda::wmma

// ---- the runtime API: errors, devices, memory, streams -----------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
};
using cudaError = cudaError_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3
};
struct cudaPointerAttributes {
  cudaMemoryType type = cudaMemoryTypeUnregistered;
  int device = -1;
  void* devicePointer = nullptr;
  void* hostPointer = nullptr;
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;
struct CUstream_st {
  unsigned flags = 0;
};
using cudaStream_t = CUstream_st*;

namespace moa_emu {

// The emulated GPU: its allocations (start -> bytes), capacity and counters.
struct Runtime {
  std::mutex mutex;
  std::map<std::uintptr_t, std::size_t> allocations;
  std::size_t capacity = std::size_t(8) << 30;
  std::size_t in_use = 0;
  int devices = 1;
  std::int64_t launches = 0;
  static Runtime& get() {
    static Runtime r;
    return r;
  }
};
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local int current_device = 0;

inline cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

// Device memory the emulated GPU may allocate (a full GPU: cudaMalloc fails with
// cudaErrorMemoryAllocation), and the number of devices cudaGetDeviceCount reports (0: no GPU).
inline void set_device_memory(std::size_t bytes) {
  const std::lock_guard lock(Runtime::get().mutex);
  Runtime::get().capacity = bytes;
}
inline void set_device_count(int n) { Runtime::get().devices = n; }
inline std::size_t device_bytes_in_use() {
  const std::lock_guard lock(Runtime::get().mutex);
  return Runtime::get().in_use;
}
inline std::int64_t launch_count() { return Runtime::get().launches; }

// Whether [p, p + bytes) lies inside one device allocation.
inline bool is_device_range(const void* p, std::size_t bytes) {
  Runtime& rt = Runtime::get();
  const std::lock_guard lock(rt.mutex);
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = rt.allocations.upper_bound(a);
  if (it == rt.allocations.begin()) return false;
  --it;
  return a >= it->first && a - it->first <= it->second && bytes <= it->second - (a - it->first);
}
inline bool is_device_pointer(const void* p) { return is_device_range(p, 1); }

inline bool overlap(const void* a, const void* b, std::size_t n) {
  const auto x = reinterpret_cast<std::uintptr_t>(a), y = reinterpret_cast<std::uintptr_t>(b);
  return n > 0 && x < y + n && y < x + n;
}

}  // namespace moa_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = moa_emu::last_error;
  moa_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return moa_emu::last_error; }
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = moa_emu::Runtime::get().devices;
  return *count > 0 ? cudaSuccess : moa_emu::fail(cudaErrorNoDevice);
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = moa_emu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= moa_emu::Runtime::get().devices) return moa_emu::fail(cudaErrorInvalidDevice);
  moa_emu::current_device = device;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  moa_emu::Runtime& rt = moa_emu::Runtime::get();
  {
    const std::lock_guard lock(rt.mutex);
    if (bytes > rt.capacity - rt.in_use) return moa_emu::fail(cudaErrorMemoryAllocation);
    rt.in_use += bytes;
  }
  void* q = ::operator new (bytes, std::align_val_t{256});
  std::memset(q, 0xFF, bytes);  // not zeroed, as on a GPU: a read before a write shows as NaN
  const std::lock_guard lock(rt.mutex);
  rt.allocations.emplace(reinterpret_cast<std::uintptr_t>(q), bytes);
  *p = q;
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  void* q = nullptr;
  const cudaError_t e = cudaMalloc(&q, bytes);
  *p = static_cast<T*>(q);
  return e;
}
inline cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  moa_emu::Runtime& rt = moa_emu::Runtime::get();
  {
    const std::lock_guard lock(rt.mutex);
    const auto it = rt.allocations.find(reinterpret_cast<std::uintptr_t>(p));
    if (it == rt.allocations.end()) return moa_emu::fail(cudaErrorInvalidValue);
    rt.in_use -= it->second;
    rt.allocations.erase(it);
  }
  ::operator delete (p, std::align_val_t{256});
  return cudaSuccess;
}

inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  *a = {};
  if (moa_emu::is_device_pointer(p)) {
    a->type = cudaMemoryTypeDevice;
    a->device = 0;
    a->devicePointer = const_cast<void*>(p);
  }
  return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t n, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
  if (n == 0) return cudaSuccess;
  using moa_emu::is_device_range;
  const bool dst_dev = is_device_range(dst, n), src_dev = is_device_range(src, n);
  bool ok = false;
  switch (kind) {
    case cudaMemcpyHostToDevice: ok = dst_dev && !moa_emu::is_device_pointer(src); break;
    case cudaMemcpyDeviceToHost: ok = src_dev && !moa_emu::is_device_pointer(dst); break;
    case cudaMemcpyDeviceToDevice: ok = dst_dev && src_dev; break;
    case cudaMemcpyHostToHost: ok = !moa_emu::is_device_pointer(dst) && !moa_emu::is_device_pointer(src); break;
    case cudaMemcpyDefault: ok = true; break;
  }
  if (!ok || moa_emu::overlap(dst, src, n)) return moa_emu::fail(cudaErrorInvalidValue);
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t n, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, n, kind);
}
inline cudaError_t cudaMemsetAsync(void* p, int value, std::size_t n, cudaStream_t = nullptr) {
  if (n == 0) return cudaSuccess;
  if (!moa_emu::is_device_range(p, n)) return moa_emu::fail(cudaErrorInvalidValue);
  std::memset(p, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, std::size_t n) { return cudaMemsetAsync(p, value, n); }

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  *s = new CUstream_st{flags};
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete s;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

namespace moa_emu {
constexpr int max_threads_per_block = 1024;
constexpr std::size_t max_dynamic_smem = 232448;  // 227 KB: an H100/H200 block, opted in
}  // namespace moa_emu

template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize &&
      (value < 0 || static_cast<std::size_t>(value) > moa_emu::max_dynamic_smem))
    return moa_emu::fail(cudaErrorInvalidValue);
  return cudaSuccess;
}

// ---- cuBLAS: handles and the GEMMs moa calls -------------------------------------------------------------

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
  CUBLAS_STATUS_LICENSE_ERROR = 16
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
using cudaDataType = cudaDataType_t;
enum cublasComputeType_t {
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_32F_FAST_16BF = 75,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77
};
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
struct cublasContext {
  cudaStream_t stream = nullptr;
};
using cublasHandle_t = cublasContext*;

inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = new cublasContext{};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}

namespace moa_emu {

// A float32 value as the tensor cores see it under a compute type: rounded to bf16 or tf32
// (nearest even) for the FAST types, unchanged otherwise.
inline float gemm_input(float x, cublasComputeType_t compute) {
  if (compute == CUBLAS_COMPUTE_32F_FAST_16BF) return __bfloat162float(__float2bfloat16(x));
  if (compute == CUBLAS_COMPUTE_32F_FAST_TF32 && std::isfinite(x)) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
    return std::bit_cast<float>((u + 0xfffu + ((u >> 13) & 1u)) & ~0x1fffu);
  }
  return x;
}
inline float load(const void* p, cudaDataType_t t, long long i) {
  return t == CUDA_R_16BF ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// The column-major product C = alpha op(A) op(B) + beta C of every batch, with cuBLAS's argument
// checks. A device range outside every allocation is a fault on a GPU: a logic_error here.
inline cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const void* alpha_p, const void* A, cudaDataType_t at, int lda, long long sa, const void* B,
                           cudaDataType_t bt, int ldb, long long sb, const void* beta_p, void* C, cudaDataType_t ct,
                           int ldc, long long sc, int batch, cublasComputeType_t compute) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  const auto valid_type = [](cudaDataType_t t) { return t == CUDA_R_32F || t == CUDA_R_16BF; };
  const auto valid_op = [](cublasOperation_t o) { return o == CUBLAS_OP_N || o == CUBLAS_OP_T; };
  if (m < 0 || n < 0 || k < 0 || batch < 0 || !valid_op(ta) || !valid_op(tb) ||
      lda < std::max(1, ta == CUBLAS_OP_N ? m : k) || ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) ||
      ldc < std::max(1, m) || !valid_type(at) || !valid_type(bt) || ct != CUDA_R_32F || at != bt)
    return CUBLAS_STATUS_INVALID_VALUE;
  if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_16BF &&
      compute != CUBLAS_COMPUTE_32F_FAST_TF32)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  const float alpha = *static_cast<const float*>(alpha_p), beta = *static_cast<const float*>(beta_p);
  const std::size_t as = at == CUDA_R_16BF ? 2 : 4;
  const auto span = [](long long rows, long long cols, long long ld) { return (cols - 1) * ld + rows; };
  for (int b = 0; b < batch; ++b) {
    const char* a = static_cast<const char*>(A) + b * sa * static_cast<long long>(as);
    const char* bb = static_cast<const char*>(B) + b * sb * static_cast<long long>(as);
    float* c = static_cast<float*>(C) + b * sc;
    if (k > 0 && alpha != 0.f &&
        (!is_device_range(a, as * span(ta == CUBLAS_OP_N ? m : k, ta == CUBLAS_OP_N ? k : m, lda)) ||
         !is_device_range(bb, as * span(tb == CUBLAS_OP_N ? k : n, tb == CUBLAS_OP_N ? n : k, ldb))))
      throw std::logic_error("emulated cuBLAS: A or B is not inside one device allocation");
    if (!is_device_range(c, 4 * span(m, n, ldc)))
      throw std::logic_error("emulated cuBLAS: C is not inside one device allocation");
    // op(A) as rows i and op(B) as columns j, each k contiguous values as the tensor cores see them
    std::vector<float> ra, rb;
    if (alpha != 0.f) {
      ra.resize(std::size_t(m) * k);
      rb.resize(std::size_t(n) * k);
      for (int i = 0; i < m; ++i)
        for (int l = 0; l < k; ++l)
          ra[std::size_t(i) * k + l] = gemm_input(
              load(a, at,
                   ta == CUBLAS_OP_N ? i + static_cast<long long>(l) * lda : l + static_cast<long long>(i) * lda),
              compute);
      for (int j = 0; j < n; ++j)
        for (int l = 0; l < k; ++l)
          rb[std::size_t(j) * k + l] = gemm_input(
              load(bb, bt,
                   tb == CUBLAS_OP_N ? l + static_cast<long long>(j) * ldb : j + static_cast<long long>(l) * ldb),
              compute);
    }
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        float acc = 0.f;
        if (alpha != 0.f) {
          const float* x = ra.data() + std::size_t(i) * k;
          const float* y = rb.data() + std::size_t(j) * k;
          for (int l = 0; l < k; ++l) acc += x[l] * y[l];
        }
        float& out = c[i + static_cast<long long>(j) * ldc];
        out = beta == 0.f ? alpha * acc : alpha * acc + beta * out;  // beta == 0: C is not read
      }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace moa_emu

inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float* alpha, const float* A, int lda, const float* B, int ldb,
                                  const float* beta, float* C, int ldc) {
  return moa_emu::gemm(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, 0, B, CUDA_R_32F, ldb, 0, beta, C, CUDA_R_32F,
                       ldc, 0, 1, CUBLAS_COMPUTE_32F);
}
inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                                   cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t) {
  return moa_emu::gemm(h, ta, tb, m, n, k, alpha, A, at, lda, 0, B, bt, ldb, 0, beta, C, ct, ldc, 0, 1, compute);
}
inline cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                 int n, int k, const void* alpha, const void* A, cudaDataType_t at,
                                                 int lda, long long sa, const void* B, cudaDataType_t bt, int ldb,
                                                 long long sb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                                                 long long sc, int batch, cublasComputeType_t compute,
                                                 cublasGemmAlgo_t) {
  return moa_emu::gemm(h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch, compute);
}

// ---- cuBLASLt: the one product with an epilogue that moa calls (bias) --------------------------------------

enum cublasLtEpilogue_t { CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4 };
enum cublasLtMatmulDescAttributes_t {
  CUBLASLT_MATMUL_DESC_TRANSA = 3,
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
  CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
  CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8
};
enum cublasLtMatmulPreferenceAttributes_t {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8
};
struct cublasLtContext {};
using cublasLtHandle_t = cublasLtContext*;
struct cublasLtMatmulDescOpaque_t {
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  cudaDataType_t scale = CUDA_R_32F;
  int32_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
};
using cublasLtMatmulDesc_t = cublasLtMatmulDescOpaque_t*;
struct cublasLtMatrixLayoutOpaque_t {  // column-major, one matrix
  cudaDataType_t type = CUDA_R_32F;
  uint64_t rows = 0, cols = 0;
  int64_t ld = 0;
};
using cublasLtMatrixLayout_t = cublasLtMatrixLayoutOpaque_t*;
struct cublasLtMatmulPreferenceOpaque_t {
  uint64_t max_workspace = 0;
  uint32_t min_align[4] = {256, 256, 256, 256};  // A, B, C, D: cuBLASLt's default assumes 256 bytes
};
using cublasLtMatmulPreference_t = cublasLtMatmulPreferenceOpaque_t*;
struct cublasLtMatmulAlgo_t {
  uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};

namespace moa_emu {
// Whether cublasLtMatmulAlgoGetHeuristic finds an algorithm (a test turns it off to run the callers'
// fallback), how many times it was asked, and how many products cublasLtMatmul ran.
inline std::atomic<bool> lt_heuristic_finds{true};
inline std::atomic<long> lt_heuristic_calls{0}, lt_matmul_calls{0};
constexpr uint64_t lt_algo_tag = 0x6d6f612d6c74ull;  // marks an algo this emulator returned
}  // namespace moa_emu

inline cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) {
  if (!h) return CUBLAS_STATUS_INVALID_VALUE;
  *h = new cublasLtContext{};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute,
                                               cudaDataType_t scale) {
  if (!d || scale != CUDA_R_32F) return CUBLAS_STATUS_INVALID_VALUE;
  *d = new cublasLtMatmulDescOpaque_t{compute, scale};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}
// Each attribute with the size of its documented type (int32_t, uint32_t, a pointer), as cuBLASLt.
inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a,
                                                     const void* buf, size_t size) {
  if (!d || !buf) return CUBLAS_STATUS_INVALID_VALUE;
  switch (a) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB: {
      if (size != sizeof(int32_t)) return CUBLAS_STATUS_INVALID_VALUE;
      int32_t v;
      std::memcpy(&v, buf, sizeof v);
      if (v != CUBLAS_OP_N && v != CUBLAS_OP_T) return CUBLAS_STATUS_INVALID_VALUE;
      (a == CUBLASLT_MATMUL_DESC_TRANSA ? d->trans_a : d->trans_b) = v;
      return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_EPILOGUE: {
      if (size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&d->epilogue, buf, sizeof(uint32_t));
      return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
      if (size != sizeof(void*)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&d->bias, buf, sizeof(void*));
      return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}
inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType_t type, uint64_t rows,
                                                 uint64_t cols, int64_t ld) {
  if (!l || ld < 1 || (rows > 0 && static_cast<uint64_t>(ld) < rows)) return CUBLAS_STATUS_INVALID_VALUE;
  *l = new cublasLtMatrixLayoutOpaque_t{type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
  if (!p) return CUBLAS_STATUS_INVALID_VALUE;
  *p = new cublasLtMatmulPreferenceOpaque_t{};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                           cublasLtMatmulPreferenceAttributes_t a, const void* buf,
                                                           size_t size) {
  if (!p || !buf) return CUBLAS_STATUS_INVALID_VALUE;
  if (a == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) {
    if (size != sizeof(uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(&p->max_workspace, buf, sizeof(uint64_t));
    return CUBLAS_STATUS_SUCCESS;
  }
  if (a >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES && a <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES) {
    if (size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(&p->min_align[a - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, sizeof(uint32_t));
    return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}

namespace moa_emu {
// The shapes of D = op(A) op(B) + C as cuBLASLt checks them: m, n, k, or false when they disagree.
inline bool lt_shapes(cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                      cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D, uint64_t& m, uint64_t& n, uint64_t& k) {
  if (!d || !A || !B || !C || !D) return false;
  m = D->rows;
  n = D->cols;
  k = d->trans_a == CUBLAS_OP_N ? A->cols : A->rows;
  const uint64_t am = d->trans_a == CUBLAS_OP_N ? A->rows : A->cols;
  const uint64_t bk = d->trans_b == CUBLAS_OP_N ? B->rows : B->cols, bn = d->trans_b == CUBLAS_OP_N ? B->cols : B->rows;
  return am == m && bk == k && bn == n && C->rows == m && C->cols == n && C->type == CUDA_R_32F &&
         D->type == CUDA_R_32F && A->type == B->type && (A->type == CUDA_R_32F || A->type == CUDA_R_16BF) &&
         (d->epilogue == CUBLASLT_EPILOGUE_DEFAULT || d->epilogue == CUBLASLT_EPILOGUE_BIAS);
}
}  // namespace moa_emu

inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                                     cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                                                     cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D,
                                                     cublasLtMatmulPreference_t pref, int requested,
                                                     cublasLtMatmulHeuristicResult_t results[], int* returned) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!pref || requested < 1 || !results || !returned) return CUBLAS_STATUS_INVALID_VALUE;
  ++moa_emu::lt_heuristic_calls;
  *returned = 0;
  uint64_t m = 0, n = 0, k = 0;
  if (!moa_emu::lt_shapes(d, A, B, C, D, m, n, k)) return CUBLAS_STATUS_INVALID_VALUE;
  if (!moa_emu::lt_heuristic_finds) return CUBLAS_STATUS_NOT_SUPPORTED;
  results[0] = {};
  results[0].algo.data[0] = moa_emu::lt_algo_tag;
  // The alignments the algorithm was chosen for: a GPU kernel may fault on operands aligned less.
  for (int i = 0; i < 4; ++i) results[0].algo.data[1 + i] = pref->min_align[i];
  results[0].workspaceSize = std::min<uint64_t>(pref->max_workspace, 1u << 20);
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.f;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

// D = alpha op(A) op(B) + beta C, then + bias (length m, every column) under CUBLASLT_EPILOGUE_BIAS.
inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void* alpha, const void* A,
                                     cublasLtMatrixLayout_t Ad, const void* B, cublasLtMatrixLayout_t Bd,
                                     const void* beta, const void* C, cublasLtMatrixLayout_t Cd, void* D,
                                     cublasLtMatrixLayout_t Dd, const cublasLtMatmulAlgo_t* algo, void* workspace,
                                     size_t workspace_bytes, cudaStream_t) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  uint64_t m = 0, n = 0, k = 0;
  if (!alpha || !beta || !moa_emu::lt_shapes(d, Ad, Bd, Cd, Dd, m, n, k) || !algo ||
      algo->data[0] != moa_emu::lt_algo_tag || (workspace_bytes > 0 && !workspace) ||
      (workspace_bytes > 0 && !moa_emu::is_device_range(workspace, workspace_bytes)) || m > INT_MAX || n > INT_MAX ||
      k > INT_MAX)
    return CUBLAS_STATUS_INVALID_VALUE;
  if (Cd->ld != Dd->ld) return CUBLAS_STATUS_NOT_SUPPORTED;  // moa passes C == D
  const void* operands[4] = {A, B, C, D};
  for (int i = 0; i < 4; ++i)
    if (reinterpret_cast<uintptr_t>(operands[i]) % algo->data[1 + i] != 0)
      throw std::logic_error("emulated cuBLASLt: an operand is aligned less than the heuristic was told (" +
                             std::to_string(algo->data[1 + i]) + " bytes): a misaligned access on a GPU");
  ++moa_emu::lt_matmul_calls;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const float b = *static_cast<const float*>(beta);
  float* out = static_cast<float*>(D);
  if (C != D && b != 0.f) {
    if (!moa_emu::is_device_range(C, 4 * ((n - 1) * Cd->ld + m)))
      throw std::logic_error("emulated cuBLASLt: C is not inside one device allocation");
    for (uint64_t j = 0; j < n; ++j) std::memcpy(out + j * Dd->ld, static_cast<const float*>(C) + j * Cd->ld, 4 * m);
  }
  cublasContext blas{};  // the product itself is the emulated cuBLAS one
  const cublasStatus_t st =
      moa_emu::gemm(&blas, static_cast<cublasOperation_t>(d->trans_a), static_cast<cublasOperation_t>(d->trans_b),
                    int(m), int(n), int(k), alpha, A, Ad->type, int(Ad->ld), 0, B, Bd->type, int(Bd->ld), 0, beta, out,
                    CUDA_R_32F, int(Dd->ld), 0, 1, d->compute);
  if (st != CUBLAS_STATUS_SUCCESS || d->epilogue != CUBLASLT_EPILOGUE_BIAS) return st;
  if (!d->bias || !moa_emu::is_device_range(d->bias, 4 * m))
    throw std::logic_error("emulated cuBLASLt: the bias is not m floats inside one device allocation");
  const float* bias = static_cast<const float*>(d->bias);
  for (uint64_t j = 0; j < n; ++j)
    for (uint64_t i = 0; i < m; ++i) out[i + j * Dd->ld] += bias[i];
  return CUBLAS_STATUS_SUCCESS;
}

// ---- launches --------------------------------------------------------------------------------------------

namespace moa_emu {

#if MOA_EMU_FIBERS

// The context switch: on x86-64 a few instructions (callee-saved registers and the stack pointer;
// glibc's swapcontext also saves the signal mask, a system call each time); elsewhere ucontext.
#if defined(__x86_64__) && !defined(MOA_EMU_UCONTEXT)
#define MOA_EMU_ASM_SWITCH 1
// moa_emu_switch(save, to): saves the registers on the current stack and its pointer in *save,
// then continues where `to` was saved. Weak, so every translation unit may define it.
asm(R"(
  .text
  .weak moa_emu_switch
  .type moa_emu_switch, @function
moa_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size moa_emu_switch, .-moa_emu_switch
)");
extern "C" void moa_emu_switch(void** save, void* to);
#else
#define MOA_EMU_ASM_SWITCH 0
#endif

// A block's threads as fibers of the launching thread. Each runs until it waits at a barrier or
// returns; the scheduler then resumes the next runnable one (round robin). A barrier is released
// when every thread that has not returned waits at it (a returned thread drops out, as on a GPU);
// when no thread can run but some have not returned, the block is stuck on mismatched barriers,
// which is reported instead of hanging.
class Fibers {
 public:
  static Fibers& get() {
    thread_local Fibers f;
    return f;
  }
  ~Fibers() {
    for (Fiber& f : fibers_) munmap(f.stack, stack_bytes);
  }

  // Runs body once on each of `threads` fibers (one block); the first exception is rethrown.
  void run_block(unsigned threads, unsigned block_x, const std::function<void()>& body) {
    while (fibers_.size() < threads) {
      void* st = mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (st == MAP_FAILED) throw std::bad_alloc();
      fibers_.push_back({});
      fibers_.back().stack = st;
      fibers_.back().low_water = static_cast<char*>(st) + stack_bytes;  // a fresh stack: nothing to clear
    }
    body_ = &body;
    error_ = nullptr;
    live_ = threads;
    at_block_ = 0;
    warp_live_.assign(threads / 32, 32);
    at_warp_.assign(threads / 32, 0);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
#if defined(__SANITIZE_ADDRESS__)
      // The frames a fiber left when it ended (or was abandoned) are still poisoned: clear them,
      // as AddressSanitizer's own swapcontext does, before the stack is used again.
      char* const end = static_cast<char*>(f.stack) + stack_bytes;
      char* const low = f.state == State::done && f.low_water ? f.low_water : static_cast<char*>(f.stack);
      __asan_unpoison_memory_region(low, static_cast<std::size_t>(end - low));
      f.low_water = nullptr;
#endif
      f.state = State::runnable;
#if MOA_EMU_ASM_SWITCH
      // A stack that moa_emu_switch "returns" into entry() from, as if entry had been called: six
      // zero registers, entry's address, and a null return address (16-byte alignment as at a call).
      auto* top = reinterpret_cast<void**>(static_cast<char*>(f.stack) + stack_bytes);
      top[-1] = nullptr;
      top[-2] = reinterpret_cast<void*>(&Fibers::entry);
      for (int r = 3; r <= 8; ++r) top[-r] = nullptr;
      f.sp = top - 8;
#else
      if (!have_template_) {
        getcontext(&template_);
        have_template_ = true;
      }
      f.ctx = template_;
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = stack_bytes;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, &Fibers::entry, 0);
#endif
    }
    unsigned next = 0;
    while (live_ > 0) {
      unsigned pick = threads;
      for (unsigned k = 0; k < threads; ++k)
        if (fibers_[(next + k) % threads].state == State::runnable) {
          pick = (next + k) % threads;
          break;
        }
      if (pick == threads)
        throw std::logic_error(
            "moa_emu: the block is stuck: threads wait at different barriers (__syncthreads and "
            "__syncwarp that not all live threads of the block or warp reach)");
      cur_ = pick;
      linear_id = pick;
      threadIdx = {pick % block_x, pick / block_x, 0};
      switch_in(fibers_[pick]);
      next = pick + 1;
    }
    if (error_) std::rethrow_exception(error_);
  }

  void sync_block() {
    Fiber& f = fibers_[cur_];
    f.state = State::at_block;
    if (++at_block_ == live_)
      release_block();
    else
      switch_out(f);
  }
  void sync_warp() {
    Fiber& f = fibers_[cur_];
    const unsigned w = cur_ / 32;
    f.state = State::at_warp;
    if (++at_warp_[w] == warp_live_[w])
      release_warp(w);
    else
      switch_out(f);
  }

 private:
  static constexpr std::size_t stack_bytes = std::size_t(1) << 20;  // reserved, touched as used
  enum class State { runnable, at_block, at_warp, done };
  struct Fiber {
#if MOA_EMU_ASM_SWITCH
    void* sp = nullptr;  // the saved stack pointer while switched out
#else
    ucontext_t ctx{};
#endif
    void* stack = nullptr;
    State state = State::done;
    void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
    char* low_water = nullptr;   // the lowest address its last run left frames at
  };

  static void entry() {
    Fibers& s = get();
    s.finish_switch(nullptr);
    try {
      (*s.body_)();
    } catch (...) {
      if (!s.error_) s.error_ = std::current_exception();
    }
    s.exit_current();
  }

  void exit_current() {
    Fiber& f = fibers_[cur_];
    // below every frame still live on this stack (this one and the few the switch adds)
    f.low_water = std::max(static_cast<char*>(f.stack), static_cast<char*>(__builtin_frame_address(0)) - 4096);
    const unsigned w = cur_ / 32;
    f.state = State::done;
    --live_;
    --warp_live_[w];
    if (at_block_ > 0 && at_block_ == live_) release_block();
    if (at_warp_[w] > 0 && at_warp_[w] == warp_live_[w]) release_warp(w);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(nullptr, main_bottom_, main_size_);  // this fiber is done
#endif
    jump(f, /*to_main=*/true);  // never resumed: the next block makes a new context
    __builtin_unreachable();
  }

  // Saves the running context into `from`'s slot (or main's) and resumes the other one.
  void jump(Fiber& f, bool to_main) {
#if MOA_EMU_ASM_SWITCH
    if (to_main)
      moa_emu_switch(&f.sp, main_sp_);
    else
      moa_emu_switch(&main_sp_, f.sp);
#else
    if (to_main)
      swapcontext(&f.ctx, &main_);
    else
      swapcontext(&main_, &f.ctx);
#endif
  }

  void release_block() {
    at_block_ = 0;
    for (Fiber& f : fibers_)
      if (f.state == State::at_block) f.state = State::runnable;
  }
  void release_warp(unsigned w) {
    at_warp_[w] = 0;
    for (unsigned t = 32 * w; t < 32 * w + 32; ++t)
      if (fibers_[t].state == State::at_warp) fibers_[t].state = State::runnable;
  }

  // scheduler -> fiber, and back when the fiber waits or returns
  void switch_in(Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(&main_fake_, f.stack, stack_bytes);
#endif
    jump(f, /*to_main=*/false);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(main_fake_, nullptr, nullptr);
#endif
  }
  // fiber -> scheduler, returning when the scheduler resumes it
  void switch_out(Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(&f.fake_stack, main_bottom_, main_size_);
#endif
    jump(f, /*to_main=*/true);
    finish_switch(f.fake_stack);
  }
  void finish_switch([[maybe_unused]] void* fake) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake, &main_bottom_, &main_size_);
#endif
  }

  std::vector<Fiber> fibers_;
#if MOA_EMU_ASM_SWITCH
  void* main_sp_ = nullptr;
#else
  ucontext_t main_{}, template_{};
  bool have_template_ = false;
#endif
  void* main_fake_ = nullptr;
  const void* main_bottom_ = nullptr;
  std::size_t main_size_ = 0;
  const std::function<void()>* body_ = nullptr;
  std::exception_ptr error_;
  unsigned cur_ = 0, live_ = 0, at_block_ = 0;
  std::vector<unsigned> warp_live_, at_warp_;
};

inline void sync_block() { Fibers::get().sync_block(); }
inline void sync_warp() { Fibers::get().sync_warp(); }

#else  // OS threads

inline void sync_block() { current->block->arrive_and_wait(); }
inline void sync_warp() { current->warps[linear_id / 32]->arrive_and_wait(); }

// Threads kept across launches (creating hundreds per launch would dominate a training step):
// run(n, job) runs job(t) on pool threads t = 0..n-1 and returns when all are done.
class Pool {
 public:
  static Pool& get() {
    static Pool p;
    return p;
  }
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    while (workers_.size() < n)
      workers_.push_back(std::make_unique<Worker>(*this, static_cast<unsigned>(workers_.size())));
    job_ = &job;
    remaining_.store(n);
    for (unsigned t = 0; t < n; ++t) workers_[t]->go.release();
    done_.acquire();
  }
  ~Pool() {
    stop_ = true;
    for (auto& w : workers_) w->go.release();
    for (auto& w : workers_) w->thread.join();
  }

 private:
  struct Worker {
    Worker(Pool& pool, unsigned id) : thread([&pool, this, id] { pool.work(*this, id); }) {}
    std::binary_semaphore go{0};
    std::thread thread;  // last: starts once `go` exists
  };
  void work(Worker& w, unsigned id) {
    for (;;) {
      w.go.acquire();
      if (stop_) return;
      (*job_)(id);
      if (remaining_.fetch_sub(1) == 1) done_.release();
    }
  }
  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::atomic<unsigned> remaining_{0};
  std::binary_semaphore done_{0};
  bool stop_ = false;
};

#endif

// Runs body (the kernel call) for every block of grid, with block.x * block.y threads (block.z = 1),
// one block after the other. A configuration CUDA refuses sets the last error and runs nothing.
template <class F>
void launch(dim3 grid, dim3 block, std::size_t smem_bytes, F&& body) {
  const unsigned long long threads_ull = 1ull * block.x * block.y * block.z;
  if (threads_ull == 0 || threads_ull > max_threads_per_block || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || smem_bytes > max_dynamic_smem) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const unsigned threads = block.x * block.y;
  if (block.z != 1 || threads % 32 != 0)  // valid CUDA, but not emulated
    throw std::invalid_argument("moa_emu::launch: expected a block of whole warps (block.z = 1)");
  ++Runtime::get().launches;
  gridDim = grid;
  blockDim = block;
  const std::size_t nblocks = std::size_t(grid.x) * grid.y * grid.z;
  const auto block_index = [&](std::size_t i) {
    return dim3{static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                static_cast<unsigned>(i / (std::size_t(grid.x) * grid.y))};
  };
#if MOA_EMU_FIBERS
  const std::function<void()> run = [&] { body(); };
  for (std::size_t i = 0; i < nblocks; ++i) {
    Block blk(threads, smem_bytes);
    current = &blk;
    blockIdx = block_index(i);
    Fibers::get().run_block(threads, block.x, run);
    current = nullptr;
  }
#else
  // The current block; the barrier that ends a block builds the next one (its completion runs once,
  // before any thread goes on), so blocks run one at a time and static shared memory is per block.
  std::size_t b = 0;
  auto blk = std::make_unique<Block>(threads, smem_bytes);
  const auto next = [&]() noexcept {
    if (++b < nblocks) blk = std::make_unique<Block>(threads, smem_bytes);
  };
  std::barrier<decltype(next)> end_of_block(static_cast<std::ptrdiff_t>(threads), next);
  std::exception_ptr error;
  std::mutex error_mutex;
  const std::function<void(unsigned)> job = [&](unsigned t) {
    linear_id = t;
    threadIdx = {t % block.x, t / block.x, 0};
    bool failed = false;
    for (std::size_t i = 0; i < nblocks; ++i) {
      Block& cur = *blk;
      current = &cur;
      blockIdx = block_index(i);
      if (!failed) {
        try {
          body();
        } catch (...) {
          failed = true;  // the other threads go on (no deadlock); the first error is rethrown
          const std::lock_guard lock(error_mutex);
          if (!error) error = std::current_exception();
        }
      }
      // An exited thread drops out of its block's barriers, as on a GPU.
      cur.block->arrive_and_drop();
      cur.warps[t / 32]->arrive_and_drop();
      end_of_block.arrive_and_wait();
    }
    current = nullptr;
  };
  Pool::get().run(threads, job);
  if (error) std::rethrow_exception(error);
#endif
}

}  // namespace moa_emu
