// moa/kernels/reference/attention.hpp: naive fused causal self-attention (scores, causal mask,
// softmax, weighted sum of values), multi-head and grouped-query, forward and backward, on raw
// row-major buffers. One query row at a time, sums in double; the fast kernels are tested against it.
//
// Shapes: q, out, dq: (B, Hq, Tq, D); k, v, dk, dv: (B, Hkv, Tk, D); lse: (B, Hq, Tq).
// Query head h reads kv head h / (Hq / Hkv). Query i sits at absolute position Tk - Tq + i and
// sees keys j <= Tk - Tq + i (Tq == Tk: plain causal attention; Tq < Tk: new tokens against a cache).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace moa::kernels::reference {

// out = softmax(scale * q k^T, causal) v; lse[b, h, i] = log(sum_j exp(scale * q_i . k_j)) over the
// visible keys (saved for backward).
template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t Hq, int64_t Hkv,
                       int64_t Tq, int64_t Tk, int64_t D, T scale) {
  const int64_t group = Hq / Hkv, off = Tk - Tq;
  std::vector<double> s(static_cast<std::size_t>(Tk));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t bh = b * Hq + h, bkv = b * Hkv + h / group;
      for (int64_t i = 0; i < Tq; ++i) {
        const T* qi = q + (bh * Tq + i) * D;
        const int64_t n = off + i + 1;  // visible keys [0, n)
        double m = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const T* kj = k + (bkv * Tk + j) * D;
          double d = 0.0;
          for (int64_t c = 0; c < D; ++c) d += static_cast<double>(qi[c]) * kj[c];
          s[j] = d * static_cast<double>(scale);
          m = std::fmax(m, s[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < n; ++j) sum += std::exp(s[j] - m);
        lse[bh * Tq + i] = static_cast<T>(m + std::log(sum));
        T* oi = out + (bh * Tq + i) * D;
        for (int64_t c = 0; c < D; ++c) {
          double acc = 0.0;
          for (int64_t j = 0; j < n; ++j) acc += std::exp(s[j] - m) / sum * v[(bkv * Tk + j) * D + c];
          oi[c] = static_cast<T>(acc);
        }
      }
    }
}

// With P = exp(scale * q k^T - lse) (causal), delta_i = dout_i . out_i:
//   dv_j = sum_i P_ij dout_i,  dS_ij = P_ij (dout_i . v_j - delta_i),
//   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,
// dk and dv summed over the query heads that share a kv head. dq, dk, dv are written.
template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const T* out,
                        const T* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D,
                        T scale) {
  const int64_t group = Hq / Hkv, off = Tk - Tq;
  std::vector<double> dqi(static_cast<std::size_t>(D));
  for (int64_t i = 0; i < B * Hkv * Tk * D; ++i) dk[i] = dv[i] = T(0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t bh = b * Hq + h, bkv = b * Hkv + h / group;
      for (int64_t i = 0; i < Tq; ++i) {
        const T* qi = q + (bh * Tq + i) * D;
        const T* gi = dout + (bh * Tq + i) * D;
        const T* oi = out + (bh * Tq + i) * D;
        double delta = 0.0;
        for (int64_t c = 0; c < D; ++c) delta += static_cast<double>(gi[c]) * oi[c];
        for (int64_t c = 0; c < D; ++c) dqi[c] = 0.0;
        for (int64_t j = 0; j <= off + i; ++j) {
          const T* kj = k + (bkv * Tk + j) * D;
          const T* vj = v + (bkv * Tk + j) * D;
          double s = 0.0, dp = 0.0;
          for (int64_t c = 0; c < D; ++c) s += static_cast<double>(qi[c]) * kj[c];
          for (int64_t c = 0; c < D; ++c) dp += static_cast<double>(gi[c]) * vj[c];
          const double p = std::exp(s * static_cast<double>(scale) - static_cast<double>(lse[bh * Tq + i]));
          const double ds = p * (dp - delta);
          for (int64_t c = 0; c < D; ++c) {
            dqi[c] += static_cast<double>(scale) * ds * kj[c];
            dk[(bkv * Tk + j) * D + c] += static_cast<T>(static_cast<double>(scale) * ds * qi[c]);
            dv[(bkv * Tk + j) * D + c] += static_cast<T>(p * gi[c]);
          }
        }
        for (int64_t c = 0; c < D; ++c) dq[(bh * Tq + i) * D + c] = static_cast<T>(dqi[c]);
      }
    }
}

}  // namespace moa::kernels::reference
