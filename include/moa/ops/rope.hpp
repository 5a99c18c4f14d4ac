// moa/ops/rope.hpp: rotary position embedding (RoPE) in the rotate-half convention of Hugging Face
// Llama / Qwen2 / SmolLM, with its backward (the transposed rotation).
//
// x: (B, H, T, D), D even; any strides on B, H, T (see rope()). For pair i < D/2 at absolute position p = start + t:
//   angle = p * theta^(-2i / D)
//   y[i]       = x[i] cos(angle) - x[i + D/2] sin(angle)
//   y[i + D/2] = x[i + D/2] cos(angle) + x[i] sin(angle)
// Angles are computed in double, then rounded to the tensor's type.
#pragma once

#include <cmath>
#include <memory>
#include <utility>
#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/head_layout.hpp"
#include "moa/core/tensor.hpp"
#include "moa/ops/heads.hpp"

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

// y = R x (sign = +1) or R^T x (sign = -1, the backward), x and y (B, H, T, D) in their layouts
// (rows of D contiguous; moa/core/head_layout.hpp). y may be x when the layouts are the same.
template <class T>
void rope_apply(const T* x, const HeadLayout& x_layout, T* y, const HeadLayout& y_layout, int64_t B, int64_t H,
                int64_t Tn, int64_t D, const std::vector<double>& cos_t, const std::vector<double>& sin_t, int sign) {
  const int64_t half = D / 2;
  const HeadLayout xl = x_layout.resolve(H, Tn, D), yl = y_layout.resolve(H, Tn, D);
  parallel_for(B * H, Tn * D, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t bi = r / H, hi = r % H;
        const T* xi = x + bi * xl.batch + hi * xl.head + t * xl.row;
        T* yi = y + bi * yl.batch + hi * yl.head + t * yl.row;
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

// The contiguous (BH, T, D) form.
template <class T>
void rope_apply(const T* x, T* y, int64_t BH, int64_t Tn, int64_t D, const std::vector<double>& cos_t,
                const std::vector<double>& sin_t, int sign) {
  rope_apply<T>(x, HeadLayout{}, y, HeadLayout{}, 1, BH, Tn, D, cos_t, sin_t, sign);
}

}  // namespace detail

// Rotates q or k (B, H, T, D) for absolute positions start .. start + T - 1. x is read in place
// when its rows of D values are contiguous (the heads of a projection output); the result has x's
// row order (heads of a (B, T, H, D) buffer for such a view), so attention reads it in place and
// the gradient reaches the projection without a copy.
inline Tensor rope(const Tensor& x, int64_t start = 0, double theta = 10000.0) {
  MOA_CHECK(x.defined() && is_floating(x.dtype()), ValueError, "rope: expected a floating tensor");
  MOA_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, ShapeError, "rope: expected x [B, H, T, D] with D even, got ",
            shape_str(x.shape()));
  MOA_CHECK(start >= 0 && theta > 0, ValueError, "rope: expected start >= 0 and theta > 0, got start ", start,
            " and theta ", theta);
  const int64_t B = x.size(0), H = x.size(1), Tn = x.size(2), D = x.size(3);
  const bool on_dev = on_device(x);
  if (on_dev) detail::check_device_f32(x, "rope");
  const Tensor xc = detail::heads_in_place(x);
  const bool token_major = detail::rows_first(xc);
  Tensor out = detail::empty_heads(B, H, Tn, D, token_major, x.dtype(), x.device());
  // y = R x (sign +1) or R^T x (sign -1) in the layouts of the two tensors.
  auto apply = [B, H, Tn, D, start, theta, on_dev](const Tensor& src, Tensor& dst, int sign,
                                                   const std::vector<double>* cos_t, const std::vector<double>* sin_t) {
    if (dst.numel() == 0) return;
    if (on_dev) {
      backend(src.device())
          .rope_heads(dst.data<float>(), detail::head_layout(dst), src.data<float>(), detail::head_layout(src), B, H,
                      Tn, D, start, theta, sign);
      return;
    }
    detail::dispatch_float(src.dtype(), "rope", [&]<class T>() {
      detail::rope_apply<T>(src.data<T>(), detail::head_layout(src), dst.data<T>(), detail::head_layout(dst), B, H, Tn,
                            D, *cos_t, *sin_t, sign);
    });
  };
  auto tables = std::make_shared<std::pair<std::vector<double>, std::vector<double>>>();
  if (!on_dev) detail::rope_tables(Tn, D, start, theta, tables->first, tables->second);
  apply(xc, out, +1, &tables->first, &tables->second);
  if (autograd::needs_graph({&x})) {
    autograd::record(
        "rope", out, {x},
        [apply, tables, B, H, Tn, D, token_major](const Tensor& g, const std::vector<char>&) {
          const Tensor gc = detail::heads_in_place(g);
          Tensor gx = detail::empty_heads(B, H, Tn, D, token_major, g.dtype(), g.device());  // in x's row order
          apply(gc, gx, -1, &tables->first, &tables->second);
          return std::vector<Tensor>{gx};
        },
        /*strided_grad=*/true);
  }
  return out;
}

}  // namespace moa
