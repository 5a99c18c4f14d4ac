// Shared helpers for the unit tests: random shapes, tensor comparison.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "moa/moa.hpp"

namespace moa::test {

// The folder with the shared data and models: $MOA_SHARED_DIR (CTest sets it), else ../shared.
inline std::filesystem::path shared_dir() {
  const char* env = std::getenv("MOA_SHARED_DIR");
  return env && *env ? std::filesystem::path(env) : std::filesystem::path("../shared");
}

inline std::mt19937& shape_rng() {
  static std::mt19937 rng(20261128);
  return rng;
}

// A random size in [lo, hi].
inline int64_t rand_size(int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(shape_rng());
}

inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  return max_abs_diff(a.to_vector<double>(), b.to_vector<double>());
}

// max |a - b| / max |b|: the error relative to the reference's largest magnitude.
inline double rel_err(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  const auto av = a.to_vector<double>(), bv = b.to_vector<double>();
  double num = 0, den = 0;
  for (std::size_t i = 0; i < av.size(); ++i) {
    num = std::max(num, std::abs(av[i] - bv[i]));
    den = std::max(den, std::abs(bv[i]));
  }
  return den > 0 ? num / den : num;
}

// Checks that `f` throws E and that its message contains every fragment.
template <class E, class F>
void check_throws_with(F&& f, const std::vector<std::string>& fragments) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    const std::string what = e.what();
    for (const auto& frag : fragments) {
      INFO("message: " << what);
      CHECK(what.find(frag) != std::string::npos);
    }
  }
  CHECK_MESSAGE(thrown, "expected an exception");
}

}  // namespace moa::test
