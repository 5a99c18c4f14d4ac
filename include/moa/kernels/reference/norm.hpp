// moa/kernels/reference/norm.hpp: naive LayerNorm and RMSNorm over the last axis, forward and
// backward, on raw row-major buffers. Obviously correct, slow, sums in double; the fast kernels
// are tested against these.
#pragma once

#include <cmath>
#include <cstdint>

namespace moa::kernels::reference {

// out = (x - mean) * rstd * weight + bias, per row; saves mean and rstd = 1 / sqrt(var + eps)
// (biased variance). x, out: (N, C); weight, bias: (C) (bias may be null); mean, rstd: (N).
template <class T>
void layer_norm_forward(T* out, T* mean, T* rstd, const T* x, const T* weight, const T* bias, int64_t N, int64_t C,
                        T eps) {
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * C;
    double m = 0.0;
    for (int64_t c = 0; c < C; ++c) m += xr[c];
    m /= static_cast<double>(C);
    double v = 0.0;
    for (int64_t c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m);
    v /= static_cast<double>(C);
    const double r = 1.0 / std::sqrt(v + static_cast<double>(eps));
    for (int64_t c = 0; c < C; ++c)
      out[n * C + c] = static_cast<T>((xr[c] - m) * r * weight[c] + (bias ? static_cast<double>(bias[c]) : 0.0));
    mean[n] = static_cast<T>(m);
    rstd[n] = static_cast<T>(r);
  }
}

// With xhat = (x - mean) * rstd and g = dout * weight:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (written)
//   dweight += sum over rows of dout * xhat,  dbias += sum over rows of dout   (accumulated)
// Any of dx, dweight, dbias may be null (not wanted). dout, x, dx: (N, C); weight: (C); mean, rstd: (N).
template <class T>
void layer_norm_backward(T* dx, T* dweight, T* dbias, const T* dout, const T* x, const T* weight, const T* mean,
                         const T* rstd, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const T* g = dout + n * C;
    const T* xr = x + n * C;
    double mg = 0.0, mgx = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double xhat = (static_cast<double>(xr[c]) - mean[n]) * rstd[n];
      mg += static_cast<double>(g[c]) * weight[c];
      mgx += static_cast<double>(g[c]) * weight[c] * xhat;
    }
    mg /= static_cast<double>(C);
    mgx /= static_cast<double>(C);
    for (int64_t c = 0; c < C; ++c) {
      const double xhat = (static_cast<double>(xr[c]) - mean[n]) * rstd[n];
      if (dx) dx[n * C + c] = static_cast<T>(rstd[n] * (static_cast<double>(g[c]) * weight[c] - mg - xhat * mgx));
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double dw = 0.0, db = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const double xhat = (static_cast<double>(x[n * C + c]) - mean[n]) * rstd[n];
      dw += dout[n * C + c] * xhat;
      db += dout[n * C + c];
    }
    if (dweight) dweight[c] += static_cast<T>(dw);
    if (dbias) dbias[c] += static_cast<T>(db);
  }
}

// out = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps), per row (Llama's RMSNorm); saves rstd.
// x, out: (N, C); weight: (C); rstd: (N).
template <class T>
void rms_norm_forward(T* out, T* rstd, const T* x, const T* weight, int64_t N, int64_t C, T eps) {
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * C;
    double ms = 0.0;
    for (int64_t c = 0; c < C; ++c) ms += static_cast<double>(xr[c]) * xr[c];
    ms /= static_cast<double>(C);
    const double r = 1.0 / std::sqrt(ms + static_cast<double>(eps));
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = static_cast<T>(xr[c] * r * weight[c]);
    rstd[n] = static_cast<T>(r);
  }
}

// With g = dout * weight:  dx = rstd * (g - x * rstd^2 * mean(g * x))   (written)
//                          dweight += sum over rows of dout * x * rstd   (accumulated)
// dx or dweight may be null. dout, x, dx: (N, C); weight: (C); rstd: (N).
template <class T>
void rms_norm_backward(T* dx, T* dweight, const T* dout, const T* x, const T* weight, const T* rstd, int64_t N,
                       int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const T* g = dout + n * C;
    const T* xr = x + n * C;
    double mgx = 0.0;
    for (int64_t c = 0; c < C; ++c) mgx += static_cast<double>(g[c]) * weight[c] * xr[c];
    mgx /= static_cast<double>(C);
    const double r = rstd[n];
    for (int64_t c = 0; c < C; ++c)
      if (dx) dx[n * C + c] = static_cast<T>(r * (static_cast<double>(g[c]) * weight[c] - xr[c] * r * r * mgx));
  }
  if (!dweight) return;
  for (int64_t c = 0; c < C; ++c) {
    double dw = 0.0;
    for (int64_t n = 0; n < N; ++n) dw += static_cast<double>(dout[n * C + c]) * x[n * C + c] * rstd[n];
    dweight[c] += static_cast<T>(dw);
  }
}

}  // namespace moa::kernels::reference
