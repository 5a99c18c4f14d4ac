// moa/kernels/reference/softmax.hpp: naive softmax and log-softmax over the last axis, forward and
// backward, on raw row-major buffers. Obviously correct, slow; the fast kernels are tested against these.
#pragma once

#include <cmath>
#include <cstdint>

namespace moa::kernels::reference {

// out = softmax(x) row by row.  x, out: (N, C).  Sums in double.
template <class T>
void softmax_forward(T* out, const T* x, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * C;
    T* yr = out + n * C;
    double m = -INFINITY;
    for (int64_t c = 0; c < C; ++c) m = std::fmax(m, static_cast<double>(xr[c]));
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += std::exp(static_cast<double>(xr[c]) - m);
    for (int64_t c = 0; c < C; ++c) yr[c] = static_cast<T>(std::exp(static_cast<double>(xr[c]) - m) / s);
  }
}

// dx = y * (dout - sum(dout * y)), with y the forward's output.  dx, dout, y: (N, C).  dx is written.
template <class T>
void softmax_backward(T* dx, const T* dout, const T* y, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const T* g = dout + n * C;
    const T* yr = y + n * C;
    double dot = 0.0;
    for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(g[c]) * yr[c];
    for (int64_t c = 0; c < C; ++c) dx[n * C + c] = static_cast<T>(yr[c] * (g[c] - dot));
  }
}

// out = x - logsumexp(x) row by row.  x, out: (N, C).
template <class T>
void log_softmax_forward(T* out, const T* x, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * C;
    double m = -INFINITY;
    for (int64_t c = 0; c < C; ++c) m = std::fmax(m, static_cast<double>(xr[c]));
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += std::exp(static_cast<double>(xr[c]) - m);
    const double lse = m + std::log(s);
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = static_cast<T>(xr[c] - lse);
  }
}

// dx = dout - exp(y) * sum(dout), with y the forward's output (log-probabilities).  (N, C).  Written.
template <class T>
void log_softmax_backward(T* dx, const T* dout, const T* y, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const T* g = dout + n * C;
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += g[c];
    for (int64_t c = 0; c < C; ++c) dx[n * C + c] = static_cast<T>(g[c] - std::exp(static_cast<double>(y[n * C + c])) * s);
  }
}

}  // namespace moa::kernels::reference
