// moa/kernels/reference/cross_entropy.hpp: naive cross-entropy over rows of logits fused with
// log-softmax, forward (mean loss) and backward, on raw row-major buffers. Sums in double; the
// fast kernels are tested against these.
#pragma once

#include <cmath>
#include <cstdint>

namespace moa::kernels::reference {

// lse[n] = log(sum_v exp(logits[n, v])) for every row; returns the mean of lse[n] - logits[n, t_n]
// over the rows whose target t_n != ignore_index, or 0 when every row is ignored.
// logits: (N, V); targets: (N), each in [0, V) or == ignore_index (the caller checks); lse: (N).
template <class T>
T cross_entropy_forward(T* lse, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                        int32_t ignore_index) {
  double total = 0.0;
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) {
    const T* x = logits + n * V;
    double m = -INFINITY;
    for (int64_t v = 0; v < V; ++v) m = std::fmax(m, static_cast<double>(x[v]));
    double s = 0.0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(static_cast<double>(x[v]) - m);
    const double l = m + std::log(s);
    lse[n] = static_cast<T>(l);
    if (targets[n] == ignore_index) continue;
    total += l - static_cast<double>(x[targets[n]]);
    ++count;
  }
  return count ? static_cast<T>(total / static_cast<double>(count)) : T(0);
}

// dlogits[n, :] = dloss / count * (softmax(logits[n, :]) - onehot(t_n)) for kept rows, 0 for
// ignored rows (count = number of kept rows; all zero when there are none).  Written.
// dlogits, logits: (N, V); lse, targets: (N).
template <class T>
void cross_entropy_backward(T* dlogits, T dloss, const T* logits, const T* lse, const int32_t* targets, int64_t N,
                            int64_t V, int32_t ignore_index) {
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) count += targets[n] != ignore_index;
  const double scale = count ? static_cast<double>(dloss) / static_cast<double>(count) : 0.0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v) {
      if (targets[n] == ignore_index) {
        dlogits[n * V + v] = T(0);
        continue;
      }
      const double p = std::exp(static_cast<double>(logits[n * V + v]) - static_cast<double>(lse[n]));
      dlogits[n * V + v] = static_cast<T>(scale * (p - (v == targets[n] ? 1.0 : 0.0)));
    }
}

}  // namespace moa::kernels::reference
