// moa/ops/rope.hpp: rotary position embedding (RoPE) in the rotate-half convention of Hugging Face
// Llama / Qwen2 / SmolLM, with its backward (the transposed rotation).
//
// x: (B, H, T, D), D even. For pair i < D/2 at absolute position p = start + t:
//   angle = p * theta^(-2i / D)
//   y[i]       = x[i] cos(angle) - x[i + D/2] sin(angle)
//   y[i + D/2] = x[i + D/2] cos(angle) + x[i] sin(angle)
// Angles are computed in double, then rounded to the tensor's type.
#pragma once

#include <cmath>
#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"

namespace moa {

namespace detail {

// cos/sin tables (T, D/2) for positions start .. start + T - 1.
inline void rope_tables(int64_t T, int64_t D, int64_t start, double theta, std::vector<double>& cos_t,
                        std::vector<double>& sin_t) {
  const int64_t half = D / 2;
  cos_t.resize(static_cast<std::size_t>(T * half));
  sin_t.resize(static_cast<std::size_t>(T * half));
  for (int64_t i = 0; i < half; ++i) {
    const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(D));
    for (int64_t t = 0; t < T; ++t) {
      const double a = static_cast<double>(start + t) * inv_freq;
      cos_t[static_cast<std::size_t>(t * half + i)] = std::cos(a);
      sin_t[static_cast<std::size_t>(t * half + i)] = std::sin(a);
    }
  }
}

// y = R x (sign = +1) or R^T x (sign = -1, the backward), x and y contiguous (B*H, T, D).
template <class T>
void rope_apply(const T* x, T* y, int64_t BH, int64_t Tn, int64_t D, const std::vector<double>& cos_t,
                const std::vector<double>& sin_t, int sign) {
  const int64_t half = D / 2;
  parallel_for(BH, Tn * D, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t t = 0; t < Tn; ++t) {
        const T* xi = x + (r * Tn + t) * D;
        T* yi = y + (r * Tn + t) * D;
        const double* c = cos_t.data() + t * half;
        const double* s = sin_t.data() + t * half;
        for (int64_t i = 0; i < half; ++i) {
          const T ci = static_cast<T>(c[i]), si = static_cast<T>(sign * s[i]);
          const T a = xi[i], bb = xi[i + half];
          yi[i] = a * ci - bb * si;
          yi[i + half] = bb * ci + a * si;
        }
      }
  });
}

}  // namespace detail

// Rotates q or k (B, H, T, D) for absolute positions start .. start + T - 1.
inline Tensor rope(const Tensor& x, int64_t start = 0, double theta = 10000.0) {
  MOA_CHECK(x.defined() && is_floating(x.dtype()), ValueError, "rope: expected a floating tensor");
  MOA_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, ShapeError, "rope: expected x [B, H, T, D] with D even, got ",
            shape_str(x.shape()));
  MOA_CHECK(start >= 0 && theta > 0, ValueError, "rope: expected start >= 0 and theta > 0, got start ", start,
            " and theta ", theta);
  const int64_t B = x.size(0), H = x.size(1), Tn = x.size(2), D = x.size(3);
  if (on_device(x)) {
    detail::check_device_f32(x, "rope");
    const Tensor xc = x.contiguous();
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    if (out.numel() > 0)
      backend(x.device()).rope(out.data<float>(), xc.data<float>(), B * H, Tn, D, start, theta, +1);
    if (autograd::needs_graph({&x}))
      autograd::record("rope", out, {x}, [B, H, Tn, D, start, theta](const Tensor& g, const std::vector<char>&) {
        Tensor gx = Tensor::empty(g.shape(), g.dtype(), g.device());
        if (gx.numel() > 0)
          backend(g.device()).rope(gx.data<float>(), g.data<float>(), B * H, Tn, D, start, theta, -1);
        return std::vector<Tensor>{gx};
      });
    return out;
  }
  std::vector<double> cos_t, sin_t;
  detail::rope_tables(Tn, D, start, theta, cos_t, sin_t);
  const Tensor xc = x.contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  detail::dispatch_float(x.dtype(), "rope", [&]<class T>() {
    detail::rope_apply<T>(xc.data<T>(), out.data<T>(), B * H, Tn, D, cos_t, sin_t, +1);
  });
  if (autograd::needs_graph({&x})) {
    autograd::record("rope", out, {x},
                     [cos_t = std::move(cos_t), sin_t = std::move(sin_t), B, H, Tn, D](const Tensor& g,
                                                                                     const std::vector<char>&) {
                       Tensor gx = Tensor::empty(g.shape(), g.dtype(), g.device());
                       detail::dispatch_float(g.dtype(), "rope", [&]<class T>() {
                         detail::rope_apply<T>(g.data<T>(), gx.data<T>(), B * H, Tn, D, cos_t, sin_t, -1);
                       });
                       return std::vector<Tensor>{gx};
                     });
  }
  return out;
}

}  // namespace moa
