// moa/ops/dropout.hpp: inverted dropout: zero each element with probability p and scale the rest
// by 1 / (1 - p); identity when not training or p == 0. The mask comes from a Generator, so a run
// repeats bitwise with the same seed, whatever the thread count.
#pragma once

#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/ops/elementwise.hpp"

namespace moa {

inline Tensor dropout(const Tensor& x, double p, Generator& gen, bool training = true) {
  MOA_CHECK(p >= 0.0 && p < 1.0, ValueError, "dropout: expected 0 <= p < 1, got ", p);
  MOA_CHECK(is_floating(x.dtype()), ValueError, "dropout: expected a floating tensor, got ", dtype_name(x.dtype()));
  if (!training || p == 0.0) return x;
  if (on_device(x)) {  // the same mask as on the cpu (drawn on the host from gen), applied on the device
    detail::check_device_f32(x, "dropout");
    Tensor mask = Tensor::empty(x.shape(), DType::f32);
    const int64_t n = x.numel();
    const std::uint64_t first = gen.reserve(static_cast<std::uint64_t>(n));
    float* pm = mask.data<float>();
    const float keep_scale = static_cast<float>(1.0 / (1.0 - p));
    for (int64_t i = 0; i < n; ++i)
      pm[i] = gen.uniform_at<double>(first + static_cast<std::uint64_t>(i)) < p ? 0.f : keep_scale;
    return mul(x, mask.to(x.device()));
  }
  const Tensor xc = x.contiguous();
  const int64_t n = x.numel();
  Tensor mask = Tensor::empty(x.shape(), x.dtype(), x.device());  // 0 or 1 / (1 - p)
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  const std::uint64_t first = gen.reserve(static_cast<std::uint64_t>(n));
  detail::dispatch_float(x.dtype(), "dropout", [&]<class T>() {
    const T keep_scale = static_cast<T>(1.0 / (1.0 - p));
    const T* px = xc.data<T>();
    T* pm = mask.data<T>();
    T* o = out.data<T>();
    detail::parallel_for(n, 16, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) {
        pm[i] = gen.uniform_at<double>(first + static_cast<std::uint64_t>(i)) < p ? T(0) : keep_scale;
        o[i] = px[i] * pm[i];
      }
    });
  });
  if (autograd::needs_graph({&x})) {
    autograd::record("dropout", out, {x}, [md = mask.detach()](const Tensor& g, const std::vector<char>&) {
      Tensor gx = Tensor::empty(g.shape(), g.dtype(), g.device());
      detail::dispatch_float(g.dtype(), "dropout", [&]<class T>() {
        const T* pm = md.data<T>();
        const T* pg = g.data<T>();
        T* o = gx.data<T>();
        for (int64_t i = 0; i < g.numel(); ++i) o[i] = pg[i] * pm[i];
      });
      return std::vector<Tensor>{gx};
    });
  }
  return out;
}

}  // namespace moa
