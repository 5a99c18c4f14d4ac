// moa/ops/norm.hpp: layer_norm and rms_norm over the last axis, with their backwards.
//
// Saved for backward (llm.c style): layer_norm keeps x, weight and the per-row mean and rstd
// (each of x's shape without the last axis); rms_norm keeps x, weight and the per-row rstd.
// Gradients: dx is written, dweight / dbias are per-call tensors the engine accumulates.
#pragma once

#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/norm.hpp"

namespace moa {

namespace detail {

// x: (..., C) floating cpu tensor with C >= 1. Returns C.
inline int64_t norm_check_input(const Tensor& x, const char* op) {
  MOA_CHECK(x.defined(), ValueError, op, ": expected a defined input x, got an undefined tensor");
  MOA_CHECK(is_floating(x.dtype()) && x.dtype() != DType::bf16, ValueError, op,
            ": expected x of dtype f32 or f64, got ", dtype_name(x.dtype()));
  if (on_device(x)) check_device_f32(x, op);
  MOA_CHECK(x.dim() >= 1 && x.shape().back() >= 1, ShapeError, op,
            ": expected x of shape [..., C] with C >= 1, got ", shape_str(x.shape()));
  return x.shape().back();
}

// A parameter of shape [C] and x's dtype.
inline void norm_check_param(const Tensor& p, const char* name, int64_t C, const Tensor& x, const char* op) {
  MOA_CHECK(p.defined(), ValueError, op, ": expected a defined ", name, " of shape [", C, "], got an undefined tensor");
  MOA_CHECK(p.shape() == Shape{C}, ShapeError, op, ": expected ", name, " of shape [", C, "], got ",
            shape_str(p.shape()), " (x has shape ", shape_str(x.shape()), ")");
  MOA_CHECK(p.dtype() == x.dtype(), ValueError, op, ": expected ", name, " of dtype ", dtype_name(x.dtype()),
            " (as x), got ", dtype_name(p.dtype()));
  MOA_CHECK(p.device() == x.device(), DeviceError, op, ": expected ", name, " on ", x.device().str(), ", got ",
            p.device().str());
}

inline Shape rows_shape(const Shape& s) { return Shape(s.begin(), s.end() - 1); }

}  // namespace detail

// LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias (biased variance).
// x: (..., C); weight: (C); bias: (C) or an undefined Tensor (no bias). Returns x's shape.
inline Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor(), double eps = 1e-5) {
  const int64_t C = detail::norm_check_input(x, "layer_norm");
  detail::norm_check_param(weight, "weight", C, x, "layer_norm");
  if (bias.defined()) detail::norm_check_param(bias, "bias", C, x, "layer_norm");
  MOA_CHECK(eps >= 0.0, ValueError, "layer_norm: expected eps >= 0, got ", eps);
  const int64_t N = x.numel() / C;
  const Tensor xc = x.detach().contiguous();
  const Tensor wc = weight.detach().contiguous();
  const Tensor bc = bias.defined() ? bias.detach().contiguous() : Tensor();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor mean = Tensor::empty(detail::rows_shape(x.shape()), x.dtype(), x.device());  // (N)
  Tensor rstd = Tensor::empty(detail::rows_shape(x.shape()), x.dtype(), x.device());  // (N)
  if (on_device(x)) {
    if (N > 0)
      backend(x.device()).layer_norm_forward(out.data<float>(), mean.data<float>(), rstd.data<float>(),
                                             xc.data<float>(), wc.data<float>(),
                                             bc.defined() ? bc.data<float>() : nullptr, N, C, static_cast<float>(eps));
  } else
  detail::dispatch_float(x.dtype(), "layer_norm", [&]<class T>() {
    kernels::cpu::layer_norm_forward<T>(out.data<T>(), mean.data<T>(), rstd.data<T>(), xc.data<T>(), wc.data<T>(),
                                        bc.defined() ? bc.data<T>() : nullptr, N, C, static_cast<T>(eps));
  });
  if (autograd::needs_graph({&x, &weight, &bias})) {
    autograd::record("layer_norm", out, {x, weight, bias},
                     [xs = xc.detach(), ws = wc.detach(), mean, rstd, N, C](const Tensor& g,
                                                                             const std::vector<char>& needs) {
                       std::vector<Tensor> grads(3);
                       const Device dev = xs.device();
                       if (needs[0]) grads[0] = Tensor::empty(xs.shape(), xs.dtype(), dev);
                       if (needs[1]) grads[1] = Tensor::zeros({C}, xs.dtype(), dev);
                       if (needs[2]) grads[2] = Tensor::zeros({C}, xs.dtype(), dev);
                       if (on_device(xs)) {
                         auto ptr = [](const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; };
                         if (N > 0)
                           backend(dev).layer_norm_backward(ptr(grads[0]), ptr(grads[1]), ptr(grads[2]),
                                                            g.data<float>(), xs.data<float>(), ws.data<float>(),
                                                            mean.data<float>(), rstd.data<float>(), N, C);
                         return grads;
                       }
                       detail::dispatch_float(xs.dtype(), "layer_norm backward", [&]<class T>() {
                         auto ptr = [](const Tensor& t) { return t.defined() ? t.data<T>() : nullptr; };
                         kernels::cpu::layer_norm_backward<T>(ptr(grads[0]), ptr(grads[1]), ptr(grads[2]),
                                                              g.data<T>(), xs.data<T>(), ws.data<T>(),
                                                              mean.data<T>(), rstd.data<T>(), N, C);
                       });
                       return grads;
                     });
  }
  return out;
}

// RMSNorm over the last axis (Llama): x * rsqrt(mean(x^2) + eps) * weight.
// x: (..., C); weight: (C). Returns x's shape.
inline Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps = 1e-6) {
  const int64_t C = detail::norm_check_input(x, "rms_norm");
  detail::norm_check_param(weight, "weight", C, x, "rms_norm");
  MOA_CHECK(eps >= 0.0, ValueError, "rms_norm: expected eps >= 0, got ", eps);
  const int64_t N = x.numel() / C;
  const Tensor xc = x.detach().contiguous();
  const Tensor wc = weight.detach().contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor rstd = Tensor::empty(detail::rows_shape(x.shape()), x.dtype(), x.device());  // (N)
  if (on_device(x)) {
    if (N > 0)
      backend(x.device()).rms_norm_forward(out.data<float>(), rstd.data<float>(), xc.data<float>(), wc.data<float>(),
                                           N, C, static_cast<float>(eps));
  } else
  detail::dispatch_float(x.dtype(), "rms_norm", [&]<class T>() {
    kernels::cpu::rms_norm_forward<T>(out.data<T>(), rstd.data<T>(), xc.data<T>(), wc.data<T>(), N, C,
                                      static_cast<T>(eps));
  });
  if (autograd::needs_graph({&x, &weight})) {
    autograd::record("rms_norm", out, {x, weight},
                     [xs = xc.detach(), ws = wc.detach(), rstd, N, C](const Tensor& g, const std::vector<char>& needs) {
                       std::vector<Tensor> grads(2);
                       const Device dev = xs.device();
                       if (needs[0]) grads[0] = Tensor::empty(xs.shape(), xs.dtype(), dev);
                       if (needs[1]) grads[1] = Tensor::zeros({C}, xs.dtype(), dev);
                       if (on_device(xs)) {
                         auto ptr = [](const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; };
                         if (N > 0)
                           backend(dev).rms_norm_backward(ptr(grads[0]), ptr(grads[1]), g.data<float>(),
                                                          xs.data<float>(), ws.data<float>(), rstd.data<float>(), N, C);
                         return grads;
                       }
                       detail::dispatch_float(xs.dtype(), "rms_norm backward", [&]<class T>() {
                         auto ptr = [](const Tensor& t) { return t.defined() ? t.data<T>() : nullptr; };
                         kernels::cpu::rms_norm_backward<T>(ptr(grads[0]), ptr(grads[1]), g.data<T>(), xs.data<T>(),
                                                            ws.data<T>(), rstd.data<T>(), N, C);
                       });
                       return grads;
                     });
  }
  return out;
}

}  // namespace moa
