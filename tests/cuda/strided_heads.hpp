// tests/cuda/strided_heads.hpp: (B, H, T, D) attention operands in a strided HeadLayout, for the
// tests that run attention kernels on strided operands and compare them with the contiguous run
// (the CPU emulator's tests/unit/test_flash_attention_emulated.cpp and the GPU's test_cuda_ops.cu,
// test_cuda_backend.cu).
//
// The layout is a projection output's: (B, T, H * D + gap) memory seen as (B, H, T, D), so heads
// are interleaved within a token's row and gap floats (NaN) follow each token. A kernel that reads
// a gap poisons its result with NaN; one that writes a gap is caught by gaps_untouched.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moa/core/head_layout.hpp"

namespace moa_test {

struct StridedHeads {
  std::vector<float> buf;
  moa::HeadLayout layout;
  int64_t B = 0, H = 0, T = 0, D = 0;

  StridedHeads(int64_t B_, int64_t H_, int64_t T_, int64_t D_, int64_t gap)
      : buf(static_cast<std::size_t>(B_ * T_ * (H_ * D_ + gap)), NAN),
        layout{T_ * (H_ * D_ + gap), D_, H_ * D_ + gap},
        B(B_),
        H(H_),
        T(T_),
        D(D_) {}
  // x (contiguous (B, H, T, D)) scattered into the layout.
  StridedHeads(const std::vector<float>& x, int64_t B_, int64_t H_, int64_t T_, int64_t D_, int64_t gap)
      : StridedHeads(B_, H_, T_, D_, gap) {
    for_each([&](std::size_t flat, std::size_t at) { buf[at] = x[flat]; });
  }
  // The contiguous (B, H, T, D) values.
  std::vector<float> gather() const {
    std::vector<float> x(static_cast<std::size_t>(B * H * T * D));
    for_each([&](std::size_t flat, std::size_t at) { x[flat] = buf[at]; });
    return x;
  }
  // Whether every float outside the rows is still NaN (nothing was written there).
  bool gaps_untouched() const {
    std::vector<char> row(buf.size(), 0);
    for_each([&](std::size_t, std::size_t at) { row[at] = 1; });
    for (std::size_t i = 0; i < buf.size(); ++i)
      if (!row[i] && !std::isnan(buf[i])) return false;
    return true;
  }
  template <class F>
  void for_each(F&& f) const {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t c = 0; c < D; ++c)
            f(static_cast<std::size_t>(((b * H + h) * T + t) * D + c),
              static_cast<std::size_t>(b * layout.batch + h * layout.head + t * layout.row + c));
  }
};

inline bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

}  // namespace moa_test
