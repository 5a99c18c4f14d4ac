// moa/ops/loss.hpp: cross_entropy (mean over the non-ignored targets), fused with log-softmax.
//
// Saved for backward: the logits (contiguous), the per-row log-sum-exp and a copy of the
// targets; backward writes dlogits = (softmax - onehot) * dloss / count.
// Every target ignored: the loss is 0 and the gradient is all zero (not NaN, unlike 0/0).
#pragma once

#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/cross_entropy.hpp"

namespace moa {

namespace detail {

// The targets (...) of logits (..., V), checked (i32, that shape, each in [0, V) or ignore_index),
// as an owned contiguous host copy (the caller may refill its buffer).
inline Tensor checked_targets(const Shape& logits_shape, const Tensor& targets, int32_t ignore_index, const char* op) {
  MOA_CHECK(targets.dtype() == DType::i32, ValueError, op, ": expected targets of dtype i32, got ",
            dtype_name(targets.dtype()));
  const Shape rows(logits_shape.begin(), logits_shape.end() - 1);
  MOA_CHECK(targets.shape() == rows, ShapeError, op, ": expected targets of shape ", shape_str(rows), " for logits ",
            shape_str(logits_shape), ", got ", shape_str(targets.shape()));
  const int64_t V = logits_shape.back(), N = numel_of(rows);
  const Tensor tc = on_device(targets) ? device_to_host(targets) : copy_contiguous(targets.detach());
  const int32_t* t = tc.data<int32_t>();
  for (int64_t n = 0; n < N; ++n)
    MOA_CHECK(t[n] == ignore_index || (t[n] >= 0 && t[n] < V), IndexError, op, ": target ", t[n], " at position ",
              unravel_index(n, rows), " of targets ", shape_str(rows), " is out of range for logits ",
              shape_str(logits_shape), " (expected 0 <= target < V = ", V, ", or ignore_index = ", ignore_index, ")");
  return tc;
}

}  // namespace detail

// logits: (N, V) with targets (N), or (B, T, V) with targets (B, T) (any (..., V) with (...));
// logits f32/f64, targets i32, each in [0, V) or equal to ignore_index. Returns a scalar (shape
// []) of the logits' dtype: the mean of -log_softmax(logits)[target] over the non-ignored rows.
inline Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index = -100) {
  MOA_CHECK(logits.defined() && targets.defined(), ValueError, "cross_entropy: expected defined logits and targets");
  MOA_CHECK(logits.dtype() == DType::f32 || logits.dtype() == DType::f64, ValueError,
            "cross_entropy: expected logits of dtype f32 or f64, got ", dtype_name(logits.dtype()));
  MOA_CHECK(logits.dim() >= 2 && logits.shape().back() >= 1, ShapeError,
            "cross_entropy: expected logits of shape [N, V] or [B, T, V] with V >= 1, got ", shape_str(logits.shape()));
  MOA_CHECK(!on_device(targets) || targets.device() == logits.device(), DeviceError,
            "cross_entropy: expected targets on the cpu or on the logits' device ", logits.device().str(), ", got ",
            targets.device().str());
  const Tensor tc = detail::checked_targets(logits.shape(), targets, ignore_index, "cross_entropy");
  const int32_t* t = tc.data<int32_t>();
  const int64_t V = logits.shape().back(), N = tc.numel();
  const Tensor xc = logits.detach().contiguous();
  if (on_device(logits)) {
    detail::check_device_f32(logits, "cross_entropy");
    const Device dev = logits.device();
    const Tensor td = on_device(targets) ? targets.detach().clone() : tc.to(dev);
    Tensor lse = Tensor::empty({N}, logits.dtype(), dev);
    Tensor out = Tensor::empty({}, logits.dtype(), dev);
    backend(dev).cross_entropy_forward(out.data<float>(), lse.data<float>(), xc.data<float>(), td.data<int32_t>(), N, V,
                                       ignore_index);
    if (autograd::needs_graph({&logits}))
      autograd::record("cross_entropy", out, {logits},
                       [xs = xc.detach(), lse, td, N, V, ignore_index](const Tensor& g, const std::vector<char>&) {
                         Tensor dx = Tensor::empty(xs.shape(), xs.dtype(), xs.device());
                         backend(xs.device()).cross_entropy_backward(dx.data<float>(), g.data<float>(),
                                                                     xs.data<float>(), lse.data<float>(),
                                                                     td.data<int32_t>(), N, V, ignore_index);
                         return std::vector<Tensor>{dx};
                       });
    return out;
  }
  Tensor lse = Tensor::empty({N}, logits.dtype());  // (N)
  Tensor out = Tensor::empty({}, logits.dtype());
  detail::dispatch_float(logits.dtype(), "cross_entropy", [&]<class T>() {
    out.data<T>()[0] =
        kernels::cpu::cross_entropy_forward<T>(lse.data<T>(), xc.data<T>(), t, N, V, ignore_index);
  });
  if (autograd::needs_graph({&logits})) {
    autograd::record("cross_entropy", out, {logits},
                     [xs = xc.detach(), lse, tc, N, V, ignore_index](const Tensor& g, const std::vector<char>&) {
                       Tensor dx = Tensor::empty(xs.shape(), xs.dtype());
                       detail::dispatch_float(xs.dtype(), "cross_entropy backward", [&]<class T>() {
                         kernels::cpu::cross_entropy_backward<T>(dx.data<T>(), g.data<T>()[0], xs.data<T>(),
                                                                 lse.data<T>(), tc.data<int32_t>(), N, V,
                                                                 ignore_index);
                       });
                       return std::vector<Tensor>{dx};
                     });
  }
  return out;
}

}  // namespace moa
