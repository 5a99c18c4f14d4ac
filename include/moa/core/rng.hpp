// moa/core/rng.hpp: deterministic, counter-based random numbers (Philox4x32-10).
//
// Element i of a fill draws from counter (offset + i), so a result depends on the seed and on how
// many numbers were drawn before, never on the thread count or on how the work is split.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

namespace moa {

namespace detail {

struct Philox4x32 {
  std::uint32_t v[4];
};

// Ten rounds of the Philox4x32 bijection (Salmon et al., SC'11) on counter `c` with key `k`.
inline Philox4x32 philox4x32_10(std::uint64_t counter, std::uint64_t stream, std::uint64_t key) {
  constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  std::uint32_t c0 = static_cast<std::uint32_t>(counter), c1 = static_cast<std::uint32_t>(counter >> 32);
  std::uint32_t c2 = static_cast<std::uint32_t>(stream), c3 = static_cast<std::uint32_t>(stream >> 32);
  std::uint32_t k0 = static_cast<std::uint32_t>(key), k1 = static_cast<std::uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c0;
    const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c2;
    const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
    const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
    const std::uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return {{c0, c1, c2, c3}};
}

// Uniform in [0, 1) with 24 (float) or 53 (double) random bits.
inline float u32_to_unit_float(std::uint32_t x) { return static_cast<float>(x >> 8) * 0x1.0p-24f; }
inline double u64_to_unit_double(std::uint32_t hi, std::uint32_t lo) {
  const std::uint64_t x = (static_cast<std::uint64_t>(hi) << 32 | lo) >> 11;
  return static_cast<double>(x) * 0x1.0p-53;
}

}  // namespace detail

// A seeded stream of random numbers. State = (seed, offset); save both to resume a run bitwise.
class Generator {
 public:
  explicit Generator(std::uint64_t seed = 0x5EEDull) : seed_(seed) {}

  std::uint64_t seed() const { return seed_; }
  std::uint64_t offset() const { return offset_; }
  void set_state(std::uint64_t seed, std::uint64_t offset) {
    seed_ = seed;
    offset_ = offset;
  }
  void manual_seed(std::uint64_t seed) { set_state(seed, 0); }

  // Reserves n counters and returns the first; fills use counters [first, first + n).
  std::uint64_t reserve(std::uint64_t n) {
    const std::uint64_t first = offset_;
    offset_ += n;
    return first;
  }

  // The i-th draw of a reserved block: uniform in [0, 1).
  template <class T>
  T uniform_at(std::uint64_t counter) const {
    const auto r = detail::philox4x32_10(counter, 0, seed_);
    if constexpr (sizeof(T) == 4)
      return static_cast<T>(detail::u32_to_unit_float(r.v[0]));
    else
      return static_cast<T>(detail::u64_to_unit_double(r.v[0], r.v[1]));
  }

  // The i-th draw of a reserved block: standard normal (Box-Muller on one counter's four words).
  template <class T>
  T normal_at(std::uint64_t counter) const {
    const auto r = detail::philox4x32_10(counter, 1, seed_);
    double u1, u2;
    if constexpr (sizeof(T) == 4) {
      u1 = (static_cast<double>(r.v[0] >> 8) + 1.0) * 0x1.0p-24;  // (0, 1]: log is finite
      u2 = static_cast<double>(r.v[1] >> 8) * 0x1.0p-24;
    } else {
      u1 = 1.0 - detail::u64_to_unit_double(r.v[0], r.v[1]);
      u2 = detail::u64_to_unit_double(r.v[2], r.v[3]);
    }
    return static_cast<T>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
  }

  // Scalar draws for host-side logic (sampling, shuffles).
  double next_double() { return uniform_at<double>(reserve(1)); }
  std::uint64_t next_below(std::uint64_t n) {  // uniform integer in [0, n)
    return n == 0 ? 0 : static_cast<std::uint64_t>(next_double() * static_cast<double>(n)) % n;
  }

 private:
  std::uint64_t seed_;
  std::uint64_t offset_ = 0;
};

// The process-wide default generator (not thread-safe: one thread draws at a time).
inline Generator& default_generator() {
  static Generator g;
  return g;
}
inline void manual_seed(std::uint64_t seed) { default_generator().manual_seed(seed); }

}  // namespace moa
