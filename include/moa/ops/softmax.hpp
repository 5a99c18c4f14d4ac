// moa/ops/softmax.hpp: softmax and log_softmax along an axis, with their backwards.
//
// The last axis is the fast path (rows of C contiguous values); another axis is moved last with a
// transpose, computed, and moved back. Both backwards need only the forward's output y:
//   softmax:     dx = y * (dy - sum(dy * y))
//   log_softmax: dx = dy - exp(y) * sum(dy)
#pragma once

#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/softmax.hpp"

namespace moa {

namespace detail {

// Shared body of softmax / log_softmax; `log` picks which. x: (..., C).
inline Tensor softmax_impl(const Tensor& x, int64_t axis, bool log) {
  const char* op = log ? "log_softmax" : "softmax";
  MOA_CHECK(x.defined(), ValueError, op, ": expected a defined tensor, got an undefined one");
  MOA_CHECK(x.dim() >= 1, ShapeError, op, ": expected a tensor of rank >= 1, got shape ", shape_str(x.shape()));
  const int64_t ax = normalize_axis(axis, x.dim(), op);
  if (ax != x.dim() - 1) return softmax_impl(x.transpose(ax, -1), -1, log).transpose(ax, -1).contiguous();

  const Tensor xc = x.detach().contiguous();
  const int64_t C = x.shape().back();
  const int64_t N = C == 0 ? 0 : x.numel() / C;
  if (on_device(x)) {
    check_device_f32(x, op);
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    if (N > 0) backend(x.device()).softmax_forward(log, out.data<float>(), xc.data<float>(), N, C);
    if (autograd::needs_graph({&x}))
      autograd::record(op, out, {x}, [y = out.detach(), N, C, log](const Tensor& g, const std::vector<char>&) {
        Tensor dx = Tensor::empty(y.shape(), y.dtype(), y.device());
        if (N > 0) backend(y.device()).softmax_backward(log, dx.data<float>(), g.data<float>(), y.data<float>(), N, C);
        return std::vector<Tensor>{dx};
      });
    return out;
  }
  Tensor out = Tensor::empty(x.shape(), x.dtype());
  dispatch_float(x.dtype(), op, [&]<class T>() {
    if (log)
      kernels::cpu::log_softmax_forward<T>(out.data<T>(), xc.data<T>(), N, C);
    else
      kernels::cpu::softmax_forward<T>(out.data<T>(), xc.data<T>(), N, C);
  });
  if (autograd::needs_graph({&x})) {
    autograd::record(op, out, {x}, [y = out.detach(), N, C, log](const Tensor& g, const std::vector<char>&) {
      Tensor dx = Tensor::empty(y.shape(), y.dtype());
      dispatch_float(y.dtype(), "softmax backward", [&]<class T>() {
        if (log)
          kernels::cpu::log_softmax_backward<T>(dx.data<T>(), g.data<T>(), y.data<T>(), N, C);
        else
          kernels::cpu::softmax_backward<T>(dx.data<T>(), g.data<T>(), y.data<T>(), N, C);
      });
      return std::vector<Tensor>{dx};
    });
  }
  return out;
}

}  // namespace detail

// softmax(x) along `axis`: exp(x - max) / sum(exp(x - max)).  x: (..., C) f32/f64 -> same shape.
inline Tensor softmax(const Tensor& x, int64_t axis = -1) { return detail::softmax_impl(x, axis, false); }

// log_softmax(x) along `axis`: x - logsumexp(x).  x: (..., C) f32/f64 -> same shape.
inline Tensor log_softmax(const Tensor& x, int64_t axis = -1) { return detail::softmax_impl(x, axis, true); }

}  // namespace moa
