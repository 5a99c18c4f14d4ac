// moa/kernels/cpu/cross_entropy.hpp: fast cross-entropy fused with log-softmax (forward, backward).
// Rows run in parallel with the vectorised exp; the loss is summed over rows serially, in double
// and in row order, so it is the same for any thread count.
#pragma once

#include <cmath>
#include <cstdint>

#include "moa/core/parallel.hpp"
#include "moa/kernels/cpu/softmax.hpp"

namespace moa::kernels::cpu {

// lse[n] = logsumexp(logits[n, :]) for every row; returns the mean of lse[n] - logits[n, t_n] over
// rows with t_n != ignore_index, or 0 when every row is ignored.
// logits: (N, V); targets: (N), each in [0, V) or == ignore_index (the caller checks); lse: (N).
template <class T>
T cross_entropy_forward(T* lse, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                        int32_t ignore_index) {
  ::moa::detail::parallel_for(N, 8 * V, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* x = logits + n * V;
      const T m = detail::row_max(x, V);
      lse[n] = m + std::log(detail::exp_sub_sum<T>(nullptr, x, V, m));
    }
  });
  double total = 0.0;
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (targets[n] == ignore_index) continue;
    total += static_cast<double>(lse[n]) - static_cast<double>(logits[n * V + targets[n]]);
    ++count;
  }
  return count ? static_cast<T>(total / static_cast<double>(count)) : T(0);
}

// dlogits[n, :] = dloss / count * (softmax(logits[n, :]) - onehot(t_n)) for kept rows, 0 for ignored
// rows (all zero when no row is kept).  Written.  dlogits, logits: (N, V), dlogits may be logits;
// lse, targets: (N).
template <class T>
void cross_entropy_backward(T* dlogits, T dloss, const T* logits, const T* lse, const int32_t* targets, int64_t N,
                            int64_t V, int32_t ignore_index) {
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) count += targets[n] != ignore_index;
  const T scale = count ? static_cast<T>(static_cast<double>(dloss) / static_cast<double>(count)) : T(0);
  ::moa::detail::parallel_for(N, 6 * V, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      T* d = dlogits + n * V;
      if (targets[n] == ignore_index || count == 0) {
        MOA_OMP_SIMD
        for (int64_t v = 0; v < V; ++v) d[v] = T(0);
        continue;
      }
      detail::exp_sub_scale<T>(d, logits + n * V, V, lse[n], scale);
      d[targets[n]] -= scale;
    }
  });
}

}  // namespace moa::kernels::cpu
