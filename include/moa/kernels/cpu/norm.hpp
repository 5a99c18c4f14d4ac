// moa/kernels/cpu/norm.hpp: fast LayerNorm and RMSNorm over the last axis (forward, backward).
// Rows run in parallel (OpenMP) with SIMD inside a row. The weight/bias gradients are reductions
// over rows; they run in parallel over columns instead, each column summed by one thread in row
// order, so they are deterministic for any thread count and need no atomics or scratch.
#pragma once

#include <cmath>
#include <cstdint>

#include "moa/core/parallel.hpp"
#include "moa/kernels/cpu/softmax.hpp"  // row primitives, MOA_OMP_SIMD

namespace moa::kernels::cpu {

// out = (x - mean) * rstd * weight + bias; saves mean and rstd = 1 / sqrt(var + eps) (biased var).
// x, out: (N, C); weight, bias: (C) (bias may be null); mean, rstd: (N).
template <class T>
void layer_norm_forward(T* out, T* mean, T* rstd, const T* x, const T* weight, const T* bias, int64_t N, int64_t C,
                        T eps) {
  ::moa::detail::parallel_for(N, 6 * C, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* xr = x + n * C;
      T* yr = out + n * C;
      const T m = detail::sum(xr, C) / static_cast<T>(C);
      T v = 0;
      MOA_OMP_SIMD_REDUCE(+, v)
      for (int64_t c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m);
      const T r = T(1) / std::sqrt(v / static_cast<T>(C) + eps);
      if (bias) {
        MOA_OMP_SIMD
        for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m) * r * weight[c] + bias[c];
      } else {
        MOA_OMP_SIMD
        for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m) * r * weight[c];
      }
      mean[n] = m;
      rstd[n] = r;
    }
  });
}

// xhat = (x - mean) * rstd, g = dout * weight:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (written)
//   dweight += sum_n dout * xhat,  dbias += sum_n dout  (accumulated)
// dx, dweight, dbias may each be null. dout, x, dx: (N, C); weight: (C); mean, rstd: (N).
template <class T>
void layer_norm_backward(T* dx, T* dweight, T* dbias, const T* dout, const T* x, const T* weight, const T* mean,
                         const T* rstd, int64_t N, int64_t C) {
  if (dx)
    ::moa::detail::parallel_for(N, 8 * C, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const T* g = dout + n * C;
        const T* xr = x + n * C;
        T* d = dx + n * C;
        const T m = mean[n], r = rstd[n];
        T sg = 0, sgx = 0;
        MOA_OMP_SIMD_REDUCE(+, sg)
        for (int64_t c = 0; c < C; ++c) sg += g[c] * weight[c];
        MOA_OMP_SIMD_REDUCE(+, sgx)
        for (int64_t c = 0; c < C; ++c) sgx += g[c] * weight[c] * ((xr[c] - m) * r);
        const T mg = sg / static_cast<T>(C), mgx = sgx / static_cast<T>(C);
        MOA_OMP_SIMD
        for (int64_t c = 0; c < C; ++c) d[c] = r * (g[c] * weight[c] - mg - ((xr[c] - m) * r) * mgx);
      }
    });
  if (dweight || dbias)
    ::moa::detail::parallel_for(C, 4 * N, [&](int64_t c0, int64_t c1) {
      for (int64_t n = 0; n < N; ++n) {
        const T* g = dout + n * C;
        const T* xr = x + n * C;
        const T m = mean[n], r = rstd[n];
        if (dweight) {
          MOA_OMP_SIMD
          for (int64_t c = c0; c < c1; ++c) dweight[c] += g[c] * ((xr[c] - m) * r);
        }
        if (dbias) {
          MOA_OMP_SIMD
          for (int64_t c = c0; c < c1; ++c) dbias[c] += g[c];
        }
      }
    });
}

// out = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps) (Llama's RMSNorm); saves rstd.
// x, out: (N, C); weight: (C); rstd: (N).
template <class T>
void rms_norm_forward(T* out, T* rstd, const T* x, const T* weight, int64_t N, int64_t C, T eps) {
  ::moa::detail::parallel_for(N, 4 * C, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* xr = x + n * C;
      T* yr = out + n * C;
      const T r = T(1) / std::sqrt(detail::dot(xr, xr, C) / static_cast<T>(C) + eps);
      MOA_OMP_SIMD
      for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * r * weight[c];
      rstd[n] = r;
    }
  });
}

// g = dout * weight:  dx = rstd * (g - x * rstd^2 * mean(g * x))   (written)
//                     dweight += sum_n dout * x * rstd              (accumulated)
// dx or dweight may be null. dout, x, dx: (N, C); weight: (C); rstd: (N).
template <class T>
void rms_norm_backward(T* dx, T* dweight, const T* dout, const T* x, const T* weight, const T* rstd, int64_t N,
                       int64_t C) {
  if (dx)
    ::moa::detail::parallel_for(N, 6 * C, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const T* g = dout + n * C;
        const T* xr = x + n * C;
        T* d = dx + n * C;
        const T r = rstd[n];
        T sgx = 0;
        MOA_OMP_SIMD_REDUCE(+, sgx)
        for (int64_t c = 0; c < C; ++c) sgx += g[c] * weight[c] * xr[c];
        const T k = r * r * sgx / static_cast<T>(C);
        MOA_OMP_SIMD
        for (int64_t c = 0; c < C; ++c) d[c] = r * (g[c] * weight[c] - xr[c] * k);
      }
    });
  if (dweight)
    ::moa::detail::parallel_for(C, 3 * N, [&](int64_t c0, int64_t c1) {
      for (int64_t n = 0; n < N; ++n) {
        const T* g = dout + n * C;
        const T* xr = x + n * C;
        const T r = rstd[n];
        MOA_OMP_SIMD
        for (int64_t c = c0; c < c1; ++c) dweight[c] += g[c] * xr[c] * r;
      }
    });
}

}  // namespace moa::kernels::cpu
