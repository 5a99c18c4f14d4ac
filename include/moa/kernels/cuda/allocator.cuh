// moa/kernels/cuda/allocator.cuh: a caching device allocator, so a training step does no cudaMalloc
// (and no cudaFree, which synchronises the device) once the first steps have warmed the cache.
//
// Sizes are rounded to a size class: multiples of 512 B up to 1 MiB, then four classes per power of
// two (1, 1.25, 1.5, 1.75 x 2^k, at most 25% waste). A released block goes to the free list of its
// class and is handed out again for any request of that class; blocks are never split or merged,
// which keeps the bookkeeping trivial and is enough for a step loop that repeats the same shapes.
//
// Streams: `allocate(bytes, stream)` records the stream but there is one free list for all streams
// (per-stream pools are not needed yet). Reuse is safe when all work runs on one stream, since a
// block released after a kernel is only reused by work queued after it on the same stream. Work on
// several streams must synchronise before releasing a block another stream still reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "moa/core/error.hpp"
#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"

namespace moa::kernels::cuda {

struct AllocatorStats {
  std::size_t bytes_in_use = 0;      // rounded bytes handed out and not yet released
  std::size_t bytes_cached = 0;      // rounded bytes in the free lists
  std::size_t peak_bytes_in_use = 0;
  std::int64_t malloc_count = 0;     // cudaMalloc calls since construction (warm loop: stays constant)
  std::int64_t free_count = 0;       // cudaFree calls (empty_cache, destruction)
  std::int64_t hits = 0;             // requests served from the cache
};

class CachingAllocator {
 public:
  CachingAllocator() = default;
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;
  // Frees the cached blocks; blocks still in use are leaked on purpose (freeing memory a kernel may
  // still use is worse), and the process-wide instance is never destroyed before exit anyway.
  ~CachingAllocator() {
    try {
      empty_cache();
    } catch (...) {  // the driver may be shutting down at exit
    }
  }

  // The size class of a request: what is really allocated.
  static std::size_t round_size(std::size_t bytes) {
    constexpr std::size_t small = 512, large = std::size_t(1) << 20;
    if (bytes == 0) bytes = 1;
    if (bytes <= large) return (bytes + small - 1) / small * small;
    std::size_t p = large;
    while (p < bytes / 2) p *= 2;  // p < bytes <= 2p (no overflow near 2^64)
    const std::size_t step = p / 4;
    return (bytes + step - 1) / step * step;
  }

  // A device block of at least `bytes` (256-byte aligned, as cudaMalloc). Never null; throws
  // DeviceError when the device is out of memory even after emptying the cache.
  void* allocate(std::size_t bytes, cudaStream_t stream = nullptr) {
    MOA_CHECK(bytes <= (std::size_t(1) << 52), DeviceError, "cuda allocator: a request of ", bytes,
              " bytes is beyond any device (a negative size cast to unsigned?)");
    const std::size_t size = round_size(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    void* p = nullptr;
    auto it = free_.find(size);
    if (it != free_.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      stats_.bytes_cached -= size;
      ++stats_.hits;
    } else {
      cudaError_t e = cudaMalloc(&p, size);
      if (e == cudaErrorMemoryAllocation) {  // give the cache back to the driver and try once more
        (void)cudaGetLastError();
        release_cached_locked();
        e = cudaMalloc(&p, size);
      }
      if (e != cudaSuccess)
        detail::throw_cuda(e, "cudaMalloc(&p, size)", __FILE__, __LINE__);
      ++stats_.malloc_count;
    }
    live_[p] = Block{size, stream};
    stats_.bytes_in_use += size;
    if (stats_.bytes_in_use > stats_.peak_bytes_in_use) stats_.peak_bytes_in_use = stats_.bytes_in_use;
    return p;
  }

  // Returns a block from allocate() to the cache. Null is ignored; a pointer this allocator did not
  // hand out throws ValueError.
  void release(void* p) {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(p);
    MOA_CHECK(it != live_.end(), ValueError, "CachingAllocator::release: pointer ", p,
              " was not allocated by this allocator or was already released");
    const std::size_t size = it->second.size;
    live_.erase(it);
    free_[size].push_back(p);
    stats_.bytes_in_use -= size;
    stats_.bytes_cached += size;
  }

  // cudaFree every cached block (synchronises the device). Blocks in use are untouched.
  void empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_cached_locked();
  }

  AllocatorStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  // The process-wide allocator the CUDA ops use.
  static CachingAllocator& global() {
    static CachingAllocator* a = new CachingAllocator();  // never destroyed: no cudaFree after the driver unloads
    return *a;
  }

 private:
  struct Block {
    std::size_t size;
    cudaStream_t stream;
  };

  void release_cached_locked() {
    for (auto& [size, list] : free_) {
      while (!list.empty()) {  // a block leaves the list before cudaFree: a failure never frees it twice
        void* p = list.back();
        list.pop_back();
        stats_.bytes_cached -= size;
        MOA_CUDA_CHECK(cudaFree(p));
        ++stats_.free_count;
      }
    }
    free_.clear();
  }

  mutable std::mutex mutex_;
  std::unordered_map<std::size_t, std::vector<void*>> free_;  // size class -> cached blocks
  std::unordered_map<void*, Block> live_;                     // handed-out blocks
  AllocatorStats stats_;
};

// A typed, move-only owner of one block from an allocator (tests, benches, scratch space).
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n, CachingAllocator& a = CachingAllocator::global(), cudaStream_t stream = nullptr)
      : alloc_(&a), n_(n), p_(static_cast<T*>(a.allocate(n * sizeof(T), stream))) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept : alloc_(o.alloc_), n_(o.n_), p_(o.p_) { o.p_ = nullptr; o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      alloc_ = o.alloc_;
      n_ = o.n_;
      p_ = o.p_;
      o.p_ = nullptr;
      o.n_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    try {
      reset();
    } catch (...) {  // a destructor never throws; the allocator already reported the bad pointer
    }
  }

  void reset() {
    if (p_) alloc_->release(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* data() const { return p_; }
  std::size_t size() const { return n_; }

  void copy_from_host(const T* src, std::size_t n, cudaStream_t stream = nullptr) {
    MOA_CHECK(n <= n_, ValueError, "DeviceBuffer::copy_from_host: ", n, " elements into a buffer of ", n_);
    MOA_CUDA_CHECK(cudaMemcpyAsync(p_, src, n * sizeof(T), cudaMemcpyHostToDevice, stream));
  }
  void copy_to_host(T* dst, std::size_t n, cudaStream_t stream = nullptr) const {
    MOA_CHECK(n <= n_, ValueError, "DeviceBuffer::copy_to_host: ", n, " elements from a buffer of ", n_);
    MOA_CUDA_CHECK(cudaMemcpyAsync(dst, p_, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
    MOA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

 private:
  CachingAllocator* alloc_ = nullptr;
  std::size_t n_ = 0;
  T* p_ = nullptr;
};

}  // namespace moa::kernels::cuda
