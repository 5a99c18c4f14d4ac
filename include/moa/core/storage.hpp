// moa/core/storage.hpp: reference-counted, 64-byte aligned memory that tensors view.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

#include "moa/core/dtype.hpp"
#include "moa/core/error.hpp"

namespace moa {

inline constexpr std::size_t kAlignment = 64;

namespace detail {

// Counts host allocations made for tensors, so tests and benchmarks can check that a hot loop allocates nothing.
inline std::atomic<std::uint64_t>& storage_allocation_counter() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}

inline void* aligned_alloc_bytes(std::size_t nbytes) {
  const std::size_t rounded = (nbytes + kAlignment - 1) / kAlignment * kAlignment;
  storage_allocation_counter().fetch_add(1, std::memory_order_relaxed);
  return ::operator new(rounded == 0 ? kAlignment : rounded, std::align_val_t(kAlignment));
}

inline void aligned_free_bytes(void* p) noexcept { ::operator delete(p, std::align_val_t(kAlignment)); }

}  // namespace detail

// A block of memory on one device. Several tensors (views) may share one Storage.
// `version` counts in-place writes, so a saved tensor can tell that it was overwritten.
struct Storage {
  std::shared_ptr<std::byte> data;
  std::size_t nbytes = 0;
  Device device{};
  std::uint64_t version = 0;

  // Fresh uninitialised host memory, 64-byte aligned.
  static std::shared_ptr<Storage> allocate(std::size_t nbytes, Device device) {
    MOA_CHECK(device.type == DeviceType::cpu, DeviceError, "allocate: device ", device.str(),
              " is not available in this build (expected cpu)");
    auto s = std::make_shared<Storage>();
    s->data = std::shared_ptr<std::byte>(static_cast<std::byte*>(detail::aligned_alloc_bytes(nbytes)),
                                         [](std::byte* p) { detail::aligned_free_bytes(p); });
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
