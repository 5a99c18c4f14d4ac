// moa/kernels/cpu/softmax.hpp: fast softmax and log-softmax over the last axis (forward, backward),
// OpenMP over rows, SIMD inside a row; plus the row primitives (max, exp-and-sum, a vectorisable
// float exp) that the cross-entropy and attention kernels reuse.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moa/core/parallel.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace moa::kernels::cpu {

namespace detail {

// exp(x) for float: Cephes' range reduction and degree-6 polynomial, about 1 ulp over the normal
// range; below ln(FLT_MIN) it returns 0 (no denormals), above ln(FLT_MAX) +inf, NaN stays NaN.
// glibc's expf only vectorises under -ffast-math, so the loops below use exp8_f32 (the same
// formula, eight lanes) where AVX2+FMA is available and this scalar form for the tails.
inline float exp_f32(float x) {
  if (x != x) return x;
  if (x < -87.33654f) return 0.0f;
  if (x > 88.72283f) return INFINITY;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);  // in [-126, 128]
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as 2^min(n, 127) * 2^(n - min(n, 127)): n = 128 happens just below ln(FLT_MAX).
  const int32_t ni = static_cast<int32_t>(n), n1 = ni > 127 ? 127 : ni;
  return p * std::bit_cast<float>((n1 + 127) << 23) * std::bit_cast<float>((ni - n1 + 127) << 23);
}

#if defined(__AVX2__) && defined(__FMA__)
#define MOA_SOFTMAX_AVX2 1
inline __m256 exp8_f32(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.72283f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvttps_epi32(n), bias = _mm256_set1_epi32(127);
  const __m256i n1 = _mm256_min_epi32(ni, bias);
  const __m256i e1 = _mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23);
  const __m256i e2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, n1), bias), 23);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e1)), _mm256_castsi256_ps(e2));
  y = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.72283f), _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

template <class T>
inline T fast_exp(T x) {
  if constexpr (std::is_same_v<T, float>)
    return exp_f32(x);
  else
    return std::exp(x);
}

// max(x[0..n)); -inf for n == 0.
template <class T>
inline T row_max(const T* x, int64_t n) {
  T m = -INFINITY;
MOA_OMP_SIMD_REDUCE(max, m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// y[i] = exp(x[i] - m) (y may alias x, or be null to store nothing); returns the sum of the exps.
template <class T>
inline T exp_sub_sum(T* y, const T* x, int64_t n, T m) {
  int64_t i = 0;
  T s = 0;
#ifdef MOA_SOFTMAX_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8_f32(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
      if (y) _mm256_storeu_ps(y + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    s = hsum8(acc);
  }
#endif
  for (; i < n; ++i) {
    const T e = fast_exp<T>(x[i] - m);
    if (y) y[i] = e;
    s += e;
  }
  return s;
}

// y[i] = exp(x[i] - m) * scale (y may alias x).
template <class T>
inline void exp_sub_scale(T* y, const T* x, int64_t n, T m, T scale) {
  int64_t i = 0;
#ifdef MOA_SOFTMAX_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_mul_ps(exp8_f32(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm)), vs));
  }
#endif
  for (; i < n; ++i) y[i] = fast_exp<T>(x[i] - m) * scale;
}

// y[i] = exp(x[i] - m[i]) (y may alias x).
template <class T>
inline void exp_sub_each(T* y, const T* x, const T* m, int64_t n) {
  int64_t i = 0;
#ifdef MOA_SOFTMAX_AVX2
  if constexpr (std::is_same_v<T, float>)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, exp8_f32(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(m + i))));
#endif
  for (; i < n; ++i) y[i] = fast_exp<T>(x[i] - m[i]);
}

template <class T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
MOA_OMP_SIMD_REDUCE(+, s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class T>
inline T sum(const T* a, int64_t n) {
  T s = 0;
MOA_OMP_SIMD_REDUCE(+, s)
  for (int64_t i = 0; i < n; ++i) s += a[i];
  return s;
}

}  // namespace detail

// out = softmax(x) row by row.  x, out: (N, C).  out may alias x.
template <class T>
void softmax_forward(T* out, const T* x, int64_t N, int64_t C) {
  ::moa::detail::parallel_for(N, 8 * C, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* xr = x + n * C;
      T* yr = out + n * C;
      const T m = detail::row_max(xr, C);
      const T inv = T(1) / detail::exp_sub_sum(yr, xr, C, m);
MOA_OMP_SIMD
      for (int64_t c = 0; c < C; ++c) yr[c] *= inv;
    }
  });
}

// dx = y * (dout - sum(dout * y)).  dx, dout, y: (N, C).  dx is written.
template <class T>
void softmax_backward(T* dx, const T* dout, const T* y, int64_t N, int64_t C) {
  ::moa::detail::parallel_for(N, 3 * C, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* g = dout + n * C;
      const T* yr = y + n * C;
      T* d = dx + n * C;
      const T s = detail::dot(g, yr, C);
MOA_OMP_SIMD
      for (int64_t c = 0; c < C; ++c) d[c] = yr[c] * (g[c] - s);
    }
  });
}

// out = x - logsumexp(x) row by row.  x, out: (N, C).  out may alias x.
template <class T>
void log_softmax_forward(T* out, const T* x, int64_t N, int64_t C) {
  ::moa::detail::parallel_for(N, 8 * C, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* xr = x + n * C;
      T* yr = out + n * C;
      const T m = detail::row_max(xr, C);
      const T lse = m + std::log(detail::exp_sub_sum<T>(nullptr, xr, C, m));
MOA_OMP_SIMD
      for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] - lse;
    }
  });
}

// dx = dout - exp(y) * sum(dout), with y = log_softmax(x).  (N, C).  dx is written.
template <class T>
void log_softmax_backward(T* dx, const T* dout, const T* y, int64_t N, int64_t C) {
  ::moa::detail::parallel_for(N, 8 * C, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* g = dout + n * C;
      const T* yr = y + n * C;
      T* d = dx + n * C;
      const T s = detail::sum(g, C);
      detail::exp_sub_scale<T>(d, yr, C, T(0), s);  // d = exp(y) * s
MOA_OMP_SIMD
      for (int64_t c = 0; c < C; ++c) d[c] = g[c] - d[c];
    }
  });
}

}  // namespace moa::kernels::cpu
