// moa/kernels/cpu/embedding.hpp: fast embedding lookup and backward. The forward copies rows in
// parallel. The backward scatter-adds rows of dout into the table; repeated ids would race if
// rows ran in parallel, so threads split the C columns instead and each walks all N rows in order:
// no atomics, no scratch, and the same bits for any thread count.
#pragma once

#include <cstdint>
#include <cstring>

#include "moa/core/parallel.hpp"
#include "moa/kernels/cpu/softmax.hpp"  // MOA_OMP_SIMD

namespace moa::kernels::cpu {

// out[n, :] = weight[ids[n], :].  out: (N, C); ids: (N), each in [0, V) (the caller checks);
// weight: (V, C).
template <class T>
void embedding_forward(T* out, const int32_t* ids, const T* weight, int64_t N, int64_t C) {
  ::moa::detail::parallel_for(N, C, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      std::memcpy(out + n * C, weight + static_cast<int64_t>(ids[n]) * C, static_cast<std::size_t>(C) * sizeof(T));
  });
}

// dweight[ids[n], :] += dout[n, :] for every n (accumulated).  dweight: (V, C); dout: (N, C).
template <class T>
void embedding_backward(T* dweight, const T* dout, const int32_t* ids, int64_t N, int64_t C) {
  ::moa::detail::parallel_for(C, N, [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < N; ++n) {
      T* d = dweight + static_cast<int64_t>(ids[n]) * C;
      const T* g = dout + n * C;
      MOA_OMP_SIMD
      for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
    }
  });
}

}  // namespace moa::kernels::cpu
