// moa/core/storage.hpp: reference-counted, 64-byte aligned memory that tensors view, served by a
// caching allocator.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "moa/core/backend.hpp"
#include "moa/core/dtype.hpp"
#include "moa/core/error.hpp"

namespace moa {

inline constexpr std::size_t kAlignment = 64;

namespace detail {

// Counts fresh host allocations (cache misses) made for tensors, so tests and benchmarks can check
// that a hot loop allocates nothing once warm.
inline std::atomic<std::uint64_t>& storage_allocation_counter() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}

inline void* aligned_alloc_bytes(std::size_t nbytes) {
  storage_allocation_counter().fetch_add(1, std::memory_order_relaxed);
  return ::operator new(nbytes == 0 ? kAlignment : nbytes, std::align_val_t(kAlignment));
}

inline void aligned_free_bytes(void* p) noexcept { ::operator delete(p, std::align_val_t(kAlignment)); }

// The size class a request is served from: multiples of 64 bytes up to 4 KiB, then steps of 1/8
// of a power of two (at most 12.5% slack), so blocks of similar size are reused.
inline std::size_t size_class(std::size_t nbytes) {
  if (nbytes <= 4096) return (nbytes + kAlignment - 1) / kAlignment * kAlignment;
  std::size_t top = std::size_t{1} << (63 - __builtin_clzll(static_cast<unsigned long long>(nbytes)));
  const std::size_t step = top / 8;
  return (nbytes + step - 1) / step * step;
}

// Keeps freed tensor memory for reuse: a training step reallocates the same activation sizes
// every time, and fresh pages from the OS cost a page fault each (often more than the kernel that
// writes them). Thread-safe. Disabled under AddressSanitizer so that it still sees every use after
// free, and by the environment variable MOA_NO_CACHING_ALLOCATOR=1.
class CachingHostAllocator {
 public:
  static CachingHostAllocator& instance() {
    static CachingHostAllocator* a = new CachingHostAllocator();  // never destroyed: tensors may outlive main
    return *a;
  }

  void* allocate(std::size_t nbytes, std::size_t& block_bytes) {
    block_bytes = size_class(nbytes);
    if (enabled_) {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(block_bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= block_bytes;
        return p;
      }
    }
    return aligned_alloc_bytes(block_bytes);
  }

  void release(void* p, std::size_t block_bytes) noexcept {
    if (enabled_) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + block_bytes <= limit_bytes_) {
        try {
          free_[block_bytes].push_back(p);
          cached_bytes_ += block_bytes;
          return;
        } catch (...) {  // no memory for the bookkeeping: free the block instead
        }
      }
    }
    aligned_free_bytes(p);
  }

  // Returns every cached block to the system.
  void empty_cache() noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, blocks] : free_)
      for (void* p : blocks) aligned_free_bytes(p);
    free_.clear();
    cached_bytes_ = 0;
  }

  std::size_t cached_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }
  bool enabled() const { return enabled_; }
  // Upper bound on the memory kept for reuse (default 16 GiB); beyond it, freed blocks go back.
  void set_limit(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_bytes_ = bytes;
  }

 private:
  CachingHostAllocator() {
#if defined(__SANITIZE_ADDRESS__)
    enabled_ = false;
#else
    const char* off = std::getenv("MOA_NO_CACHING_ALLOCATOR");
    enabled_ = !(off && *off && *off != '0');
#endif
  }

  mutable std::mutex mutex_;
  std::unordered_map<std::size_t, std::vector<void*>> free_;
  std::size_t cached_bytes_ = 0;
  std::size_t limit_bytes_ = std::size_t{16} << 30;
  bool enabled_ = true;
};

}  // namespace detail

// Frees the memory the allocator keeps for reuse (for long-lived programs between phases).
inline void empty_cache() { detail::CachingHostAllocator::instance().empty_cache(); }

// A block of memory on one device. Several tensors (views) may share one Storage.
// `version` counts in-place writes, so a saved tensor can tell that it was overwritten.
struct Storage {
  std::shared_ptr<std::byte> data;
  std::size_t nbytes = 0;
  Device device{};
  std::uint64_t version = 0;

  // Fresh uninitialised memory: 64-byte aligned host memory, or device memory from the device's
  // backend (its caching allocator).
  static std::shared_ptr<Storage> allocate(std::size_t nbytes, Device device) {
    auto s = std::make_shared<Storage>();
    if (device.type != DeviceType::cpu) {
      DeviceBackend* b = &backend(device).memory_backend();
      const int index = device.index;
      void* p = b->allocate(nbytes, index);
      try {
        s->data = std::shared_ptr<std::byte>(static_cast<std::byte*>(p),
                                             [b, nbytes, index](std::byte* q) { b->release(q, nbytes, index); });
      } catch (...) {
        b->release(p, nbytes, index);
        throw;
      }
      s->nbytes = nbytes;
      s->device = device;
      return s;
    }
    std::size_t block = 0;
    auto& alloc = detail::CachingHostAllocator::instance();
    void* p = alloc.allocate(nbytes, block);
    try {
      s->data = std::shared_ptr<std::byte>(static_cast<std::byte*>(p), [block](std::byte* q) {
        detail::CachingHostAllocator::instance().release(q, block);
      });
    } catch (...) {
      alloc.release(p, block);
      throw;
    }
    s->nbytes = nbytes;
    s->device = device;
    return s;
  }

  // Wraps memory owned elsewhere (a memory-mapped file); `owner` keeps it alive.
  static std::shared_ptr<Storage> wrap(std::shared_ptr<std::byte> data, std::size_t nbytes, Device device) {
    auto s = std::make_shared<Storage>();
    s->data = std::move(data);
    s->nbytes = nbytes;
    s->device = device;
    return s;
  }
};

}  // namespace moa
