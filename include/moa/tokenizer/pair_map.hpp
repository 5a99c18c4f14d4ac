// moa/tokenizer/pair_map.hpp: an open-addressing hash map keyed by a pair of token ids, the merge
// table of byte-level BPE ((left, right) -> rank and merged id), faster than std::unordered_map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moa::detail {

inline std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
}

template <class V>
class PairMap {
 public:
  // Inserts or overwrites.
  void set(std::int32_t a, std::int32_t b, const V& v) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    const std::uint64_t k = pair_key(a, b);
    std::size_t i = slot(k);
    while (slots_[i].used && slots_[i].key != k) i = (i + 1) & mask_;
    if (!slots_[i].used) ++size_;
    slots_[i] = {k, v, true};
  }
  // The value for (a, b), or nullptr.
  const V* find(std::int32_t a, std::int32_t b) const {
    if (slots_.empty()) return nullptr;
    const std::uint64_t k = pair_key(a, b);
    for (std::size_t i = slot(k);; i = (i + 1) & mask_) {
      if (!slots_[i].used) return nullptr;
      if (slots_[i].key == k) return &slots_[i].value;
    }
  }
  std::size_t size() const { return size_; }

 private:
  struct Slot {
    std::uint64_t key = 0;
    V value{};
    bool used = false;
  };
  std::size_t slot(std::uint64_t k) const {
    return static_cast<std::size_t>((k * 0x9E3779B97F4A7C15ull) >> shift_) & mask_;
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    std::size_t cap = old.empty() ? 64 : old.size() * 2;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    shift_ = 64;
    for (std::size_t c = cap; c > 1; c >>= 1) --shift_;
    size_ = 0;
    for (const Slot& s : old)
      if (s.used) set(static_cast<std::int32_t>(s.key >> 32), static_cast<std::int32_t>(s.key & 0xFFFFFFFFu), s.value);
  }
  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
  unsigned shift_ = 64;
  std::size_t size_ = 0;
};

}  // namespace moa::detail
