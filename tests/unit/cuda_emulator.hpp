// tests/unit/cuda_emulator.hpp: runs CUDA kernel source on the CPU, so the tiling, masking and
// synchronisation of moa's tensor-core kernels are tested on machines without a GPU (the same
// kernels run on the GPU in tests/cuda/).
//
// What it emulates, and how:
//   - a launch (MOA_CUDA_LAUNCH of moa/kernels/cuda/launch.cuh, so a header's launchers run too)
//     runs blockDim.x * blockDim.y real threads (one std::thread per CUDA thread of a block), which
//     walk through the blocks, so __syncthreads (a std::barrier over the block) and __syncwarp
//     (one per 32 threads) have their real meaning: a missing barrier is a data race here too;
//   - atomicAdd on float is std::atomic_ref; MOA_CUDA_CHECK evaluates its call (stubs) and throws
//     nothing;
//   - dynamic shared memory is one 128-byte aligned buffer per block, filled with 0xFF bytes (NaN
//     as floats and bf16) so that a read of shared memory nobody wrote shows in the results, and an
//     access past its end is caught by AddressSanitizer;
//   - shuffles exchange through a per-warp buffer between two warp barriers;
//   - WMMA fragments hold the whole 16 x 16 tile in every lane (products are exact in float32, as
//     bf16 x bf16 is); load/store check WMMA's pointer alignment (32 bytes) and ldm rules, and a
//     store is done by lane 0 (the other lanes see it after the __syncwarp the kernel needs anyway);
//   - __nv_bfloat16 rounds to nearest even, as __float2bfloat16 does.
// Not emulated: memory other than shared (kernels read and write host pointers), timing, warp
// divergence rules beyond "all 32 lanes take part in every collective".
//
// Use: include this, define MOA_CUDA_EMULATE, include the kernel header, and call its launchers
// with host pointers (or moa_emu::launch(grid, block, smem_bytes, [&] { kernel<...>(args...); })).
#pragma once

#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// moa/kernels/cuda/launch.cuh's spellings, emulated
#define MOA_CUDA_DYNAMIC_SMEM(name) unsigned char* name = ::moa_emu::dynamic_smem()
#define MOA_CUDA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::moa_emu::launch(::dim3(grid), ::dim3(block), smem, [&] { kernel(__VA_ARGS__); }))
#define MOA_UNROLL
#define MOA_CUDA_CHECK(call) ((void)(call))
#define MOA_CUDA_LAUNCH_CHECK() ((void)0)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <class Kernel>
int cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return 0;
}
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
inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b.bits) << 16); }

namespace moa_emu {

struct Block {
  explicit Block(unsigned threads, std::size_t smem_bytes)
      : block(static_cast<std::ptrdiff_t>(threads)), exchange(threads), raw(smem_bytes + 128, 0xFF) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    const auto addr = reinterpret_cast<std::uintptr_t>(raw.data());
    smem = raw.data() + ((128 - addr % 128) % 128);
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> exchange;  // one slot per thread, for shuffles
  std::vector<unsigned char> raw;
  unsigned char* smem = nullptr;
};

inline thread_local Block* current = nullptr;
inline thread_local unsigned linear_id = 0;  // threadIdx.x + blockDim.x * threadIdx.y: warps and lanes

inline unsigned char* dynamic_smem() { return current->smem; }

}  // namespace moa_emu

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { moa_emu::current->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { moa_emu::current->warps[moa_emu::linear_id / 32]->arrive_and_wait(); }

inline float __shfl_sync(unsigned, float v, int src_lane) {
  auto& ex = moa_emu::current->exchange;
  const unsigned id = moa_emu::linear_id, base = id & ~31u;
  ex[id] = v;
  __syncwarp();
  const float r = ex[base + (static_cast<unsigned>(src_lane) & 31u)];
  __syncwarp();
  return r;
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  return __shfl_sync(mask, v, static_cast<int>((moa_emu::linear_id & 31u) ^ static_cast<unsigned>(lane_mask)));
}
inline float __expf(float x) { return std::exp(x); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

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

namespace moa_emu {

// Runs body (the kernel call) for every block of grid, with block.x * block.y threads (block.z = 1).
template <class F>
void launch(dim3 grid, dim3 block, std::size_t smem_bytes, F&& body) {
  const unsigned threads = block.x * block.y;
  if (block.z != 1 || threads == 0 || threads % 32 != 0 || threads > 1024)
    throw std::invalid_argument("moa_emu::launch: expected a block of whole warps (<= 1024 threads, block.z = 1)");
  gridDim = grid;
  blockDim = block;
  // Every block up front (its barriers and shared memory); one std::thread per CUDA thread of a
  // block walks all the blocks in order, so threads are created once per launch. A thread that is
  // done with a block drops out of its barriers (as an exited GPU thread) and goes on to the next;
  // blocks are independent, as on a GPU.
  const std::size_t nblocks = std::size_t(grid.x) * grid.y * grid.z;
  std::vector<std::unique_ptr<Block>> blocks;
  blocks.reserve(nblocks);
  for (std::size_t b = 0; b < nblocks; ++b) blocks.push_back(std::make_unique<Block>(threads, smem_bytes));
  std::exception_ptr error;
  std::mutex error_mutex;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      linear_id = t;
      threadIdx = {t % block.x, t / block.x, 0};
      bool failed = false;
      for (std::size_t b = 0; b < nblocks; ++b) {
        Block& blk = *blocks[b];
        current = &blk;
        blockIdx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                    static_cast<unsigned>(b / (std::size_t(grid.x) * grid.y))};
        if (!failed) {
          try {
            body();
          } catch (...) {
            failed = true;  // the other threads go on (no deadlock); the first error is rethrown
            const std::lock_guard lock(error_mutex);
            if (!error) error = std::current_exception();
          }
        }
        blk.block.arrive_and_drop();
        blk.warps[t / 32]->arrive_and_drop();
      }
    });
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace moa_emu
