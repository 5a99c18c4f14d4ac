// moa/ops/elementwise.hpp: elementwise ops with NumPy broadcasting (add, sub, mul, div), scalar
// ops (scale, shift, pow), and unary maps (neg, exp, log, sqrt, tanh, relu, GELU, SiLU),
// each with its backward (broadcast inputs get their gradient summed back with sum_to).
#pragma once

#include <cmath>
#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/activation.hpp"
#include "moa/kernels/reference/activation.hpp"
#include "moa/ops/reduce.hpp"

namespace moa {

namespace detail {

inline void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  MOA_CHECK(a.device() == b.device(), DeviceError, op, ": expected tensors on one device, got ", a.device().str(),
            " and ", b.device().str());
}

inline void check_float_pair(const Tensor& a, const Tensor& b, const char* op) {
  MOA_CHECK(a.defined() && b.defined(), ValueError, op, ": expected two defined tensors");
  MOA_CHECK(a.dtype() == b.dtype(), ValueError, op, ": expected operands of one dtype, got ", dtype_name(a.dtype()),
            " and ", dtype_name(b.dtype()));
  MOA_CHECK(is_floating(a.dtype()), ValueError, op, ": expected floating operands, got ", dtype_name(a.dtype()));
  check_same_device(a, b, op);
}

// out = a op b on a device (f32), out contiguous with the broadcast shape.
inline Tensor device_binary(BinaryOp op, const Tensor& a, const Tensor& b, const Shape& out_shape, const char* name) {
  check_device_f32(a, name);
  MOA_CHECK(static_cast<int64_t>(out_shape.size()) <= kMaxDeviceRank, ShapeError, name, ": expected at most ",
            kMaxDeviceRank, " axes on ", a.device().str(), ", got shape ", shape_str(out_shape));
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  if (out.numel() > 0)
    backend(a.device()).binary(op, out.data<float>(), out_shape, a.data<float>(),
                               broadcast_strides(a.shape(), a.strides(), out_shape), b.data<float>(),
                               broadcast_strides(b.shape(), b.strides(), out_shape));
  return out;
}

// out = f(a, b) elementwise (op on a device), out contiguous with the broadcast shape.
template <class T, class F>
Tensor binary_map(BinaryOp op, const Tensor& a, const Tensor& b, const Shape& out_shape, F f) {
  if (on_device(a)) return device_binary(op, a, b, out_shape, "binary op");
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  T* o = out.data<T>();
  const T* pa = static_cast<const T*>(a.data_ptr());
  const T* pb = static_cast<const T*>(b.data_ptr());
  const int64_t n = out.numel();
  if (a.shape() == out_shape && b.shape() == out_shape && a.is_contiguous() && b.is_contiguous()) {
    parallel_for(n, 1, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) o[i] = f(pa[i], pb[i]);
    });
    return out;
  }
  const Strides so = out.strides();
  const Strides sa = broadcast_strides(a.shape(), a.strides(), out_shape);
  const Strides sb = broadcast_strides(b.shape(), b.strides(), out_shape);
  for_each_row<3>(out_shape, {&so, &sa, &sb},
                  [&](const std::array<int64_t, 3>& off, int64_t len, const std::array<int64_t, 3>& in) {
                    for (int64_t i = 0; i < len; ++i)
                      o[off[0] + i] = f(pa[off[1] + i * in[1]], pb[off[2] + i * in[2]]);
                  });
  return out;
}

// out = f(x) elementwise (out contiguous).
template <class T, class F>
Tensor unary_map(const Tensor& x, F f) {
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  T* o = out.data<T>();
  const T* px = static_cast<const T*>(x.data_ptr());
  if (x.is_contiguous()) {
    parallel_for(x.numel(), 4, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) o[i] = f(px[i]);
    });
    return out;
  }
  const Strides so = out.strides();
  const Strides sx = x.strides();
  for_each_row<2>(x.shape(), {&so, &sx},
                  [&](const std::array<int64_t, 2>& off, int64_t len, const std::array<int64_t, 2>& in) {
                    for (int64_t i = 0; i < len; ++i) o[off[0] + i] = f(px[off[1] + i * in[1]]);
                  });
  return out;
}

}  // namespace detail

namespace detail {

// Records a binary op whose input gradients are g * da(a, b) and g * db(a, b), summed to the input shapes.
template <class GradA, class GradB>
void record_binary(const char* name, Tensor& out, const Tensor& a, const Tensor& b, GradA ga, GradB gb) {
  if (!autograd::needs_graph({&a, &b})) return;
  autograd::record(name, out, {a, b},
                   [ad = a.detach(), bd = b.detach(), ga, gb](const Tensor& g, const std::vector<char>& needs) {
                     std::vector<Tensor> r(2);
                     if (needs[0]) r[0] = sum_to(ga(g, ad, bd), ad.shape());
                     if (needs[1]) r[1] = sum_to(gb(g, ad, bd), bd.shape());
                     return r;
                   });
}

}  // namespace detail

inline Tensor mul(const Tensor& a, const Tensor& b);
inline Tensor div(const Tensor& a, const Tensor& b);
inline Tensor neg(const Tensor& x);

inline Tensor add(const Tensor& a, const Tensor& b) {
  detail::check_float_pair(a, b, "add");
  const Shape s = broadcast_shapes(a.shape(), b.shape(), "add");
  Tensor out = detail::dispatch_float(a.dtype(), "add", [&]<class T>() {
    return detail::binary_map<T>(BinaryOp::add, a, b, s, [](T x, T y) { return x + y; });
  });
  detail::record_binary(
      "add", out, a, b, [](const Tensor& g, const Tensor&, const Tensor&) { return g; },
      [](const Tensor& g, const Tensor&, const Tensor&) { return g; });
  return out;
}

inline Tensor sub(const Tensor& a, const Tensor& b) {
  detail::check_float_pair(a, b, "sub");
  const Shape s = broadcast_shapes(a.shape(), b.shape(), "sub");
  Tensor out = detail::dispatch_float(a.dtype(), "sub", [&]<class T>() {
    return detail::binary_map<T>(BinaryOp::sub, a, b, s, [](T x, T y) { return x - y; });
  });
  detail::record_binary(
      "sub", out, a, b, [](const Tensor& g, const Tensor&, const Tensor&) { return g; },
      [](const Tensor& g, const Tensor&, const Tensor&) { return neg(g); });
  return out;
}

inline Tensor mul(const Tensor& a, const Tensor& b) {
  detail::check_float_pair(a, b, "mul");
  const Shape s = broadcast_shapes(a.shape(), b.shape(), "mul");
  Tensor out = detail::dispatch_float(a.dtype(), "mul", [&]<class T>() {
    return detail::binary_map<T>(BinaryOp::mul, a, b, s, [](T x, T y) { return x * y; });
  });
  detail::record_binary(
      "mul", out, a, b, [](const Tensor& g, const Tensor&, const Tensor& y) { return mul(g, y); },
      [](const Tensor& g, const Tensor& x, const Tensor&) { return mul(g, x); });
  return out;
}

inline Tensor div(const Tensor& a, const Tensor& b) {
  detail::check_float_pair(a, b, "div");
  const Shape s = broadcast_shapes(a.shape(), b.shape(), "div");
  Tensor out = detail::dispatch_float(a.dtype(), "div", [&]<class T>() {
    return detail::binary_map<T>(BinaryOp::div, a, b, s, [](T x, T y) { return x / y; });
  });
  detail::record_binary(
      "div", out, a, b, [](const Tensor& g, const Tensor&, const Tensor& y) { return div(g, y); },
      [](const Tensor& g, const Tensor& x, const Tensor& y) { return neg(div(mul(g, x), mul(y, y))); });
  return out;
}

namespace detail {

// A unary op y = f(x) with dy/dx = df(x, y), both scalar functions.
// The same op on a device: y = f(x; p), backward gx = g * f'(x) through the backend's kernels.
inline Tensor device_unary(const char* name, UnaryOp code, double p, const Tensor& x) {
  check_device_f32(x, name);
  const Tensor xc = x.contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (out.numel() > 0) backend(x.device()).unary(code, p, out.data<float>(), xc.data<float>(), out.numel());
  if (autograd::needs_graph({&x})) {
    autograd::record(name, out, {x},
                     [xd = xc.detach(), yd = out.detach(), code, p](const Tensor& g, const std::vector<char>&) {
                       Tensor gx = Tensor::empty(g.shape(), g.dtype(), g.device());
                       if (gx.numel() > 0)
                         backend(g.device()).unary_backward(code, p, gx.data<float>(), g.data<float>(),
                                                            xd.data<float>(), yd.data<float>(), gx.numel());
                       return std::vector<Tensor>{gx};
                     });
  }
  return out;
}

template <class F, class DF>
Tensor unary_op(const char* name, UnaryOp code, double p, const Tensor& x, F f, DF df) {
  MOA_CHECK(x.defined() && is_floating(x.dtype()), ValueError, name, ": expected a floating tensor, got ",
            x.defined() ? dtype_name(x.dtype()) : "an undefined tensor");
  if (on_device(x)) return device_unary(name, code, p, x);
  Tensor out = dispatch_float(x.dtype(), name, [&]<class T>() { return unary_map<T>(x, [&](T v) { return f(v); }); });
  if (autograd::needs_graph({&x})) {
    autograd::record(name, out, {x},
                     [xd = x.detach(), yd = out.detach(), df, name](const Tensor& g, const std::vector<char>&) {
                       Tensor gx = Tensor::empty(g.shape(), g.dtype(), g.device());
                       dispatch_float(g.dtype(), name, [&]<class T>() {
                         const Tensor xc = xd.contiguous();
                         const T* px = xc.data<T>();
                         const T* py = yd.data<T>();
                         const T* pg = g.data<T>();
                         T* o = gx.data<T>();
                         parallel_for(g.numel(), 4, [&](int64_t s, int64_t e) {
                           for (int64_t i = s; i < e; ++i) o[i] = pg[i] * static_cast<T>(df(px[i], py[i]));
                         });
                       });
                       return std::vector<Tensor>{gx};
                     });
  }
  return out;
}

}  // namespace detail

// x * s for a scalar s.
inline Tensor scale(const Tensor& x, double s) {
  return detail::unary_op(
      "scale", UnaryOp::scale, s, x, [s](auto v) { return static_cast<decltype(v)>(v * s); }, [s](auto, auto) { return s; });
}
// x + c for a scalar c.
inline Tensor shift(const Tensor& x, double c) {
  return detail::unary_op(
      "shift", UnaryOp::shift, c, x, [c](auto v) { return static_cast<decltype(v)>(v + c); }, [](auto, auto) { return 1.0; });
}
inline Tensor neg(const Tensor& x) {
  return detail::unary_op(
      "neg", UnaryOp::neg, 0, x, [](auto v) { return -v; }, [](auto, auto) { return -1.0; });
}
inline Tensor exp(const Tensor& x) {
  return detail::unary_op(
      "exp", UnaryOp::exp, 0, x, [](auto v) { return std::exp(v); }, [](auto, auto y) { return y; });
}
// Natural log; non-positive inputs give -inf/NaN as in IEEE arithmetic.
inline Tensor log(const Tensor& x) {
  return detail::unary_op(
      "log", UnaryOp::log, 0, x, [](auto v) { return std::log(v); }, [](auto v, auto) { return 1 / v; });
}
inline Tensor sqrt(const Tensor& x) {
  return detail::unary_op(
      "sqrt", UnaryOp::sqrt, 0, x, [](auto v) { return std::sqrt(v); }, [](auto, auto y) { return 1 / (2 * y); });
}
inline Tensor tanh(const Tensor& x) {
  return detail::unary_op(
      "tanh", UnaryOp::tanh, 0, x, [](auto v) { return std::tanh(v); }, [](auto, auto y) { return 1 - y * y; });
}
// x^p for a scalar exponent p.
inline Tensor pow(const Tensor& x, double p) {
  return detail::unary_op(
      "pow", UnaryOp::pow, p, x, [p](auto v) { return static_cast<decltype(v)>(std::pow(v, p)); },
      [p](auto v, auto) { return p * std::pow(v, p - 1); });
}
inline Tensor relu(const Tensor& x) {
  return detail::unary_op(
      "relu", UnaryOp::relu, 0, x, [](auto v) { return v > 0 ? v : decltype(v)(0); }, [](auto v, auto) { return v > 0 ? 1.0 : 0.0; });
}
// GELU, tanh approximation (as GPT-2 uses). Float tensors take the vectorised cpu kernel.
inline Tensor gelu(const Tensor& x) {
  if (x.defined() && x.dtype() == DType::f32 && !on_device(x)) {
    const Tensor xc = x.contiguous();
    Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
    kernels::cpu::gelu_forward(xc.data<float>(), out.data<float>(), x.numel());
    if (autograd::needs_graph({&x}))
      autograd::record("gelu", out, {x}, [xd = xc.detach()](const Tensor& g, const std::vector<char>&) {
        Tensor gx = Tensor::empty(g.shape(), g.dtype(), g.device());
        kernels::cpu::gelu_backward(xd.data<float>(), g.data<float>(), gx.data<float>(), g.numel());
        return std::vector<Tensor>{gx};
      });
    return out;
  }
  return detail::unary_op(
      "gelu", UnaryOp::gelu, 0, x, [](auto v) { return kernels::reference::gelu(v); },
      [](auto v, auto) { return kernels::reference::gelu_grad(v); });
}
inline Tensor silu(const Tensor& x) {
  return detail::unary_op(
      "silu", UnaryOp::silu, 0, x, [](auto v) { return kernels::reference::silu(v); },
      [](auto v, auto) { return kernels::reference::silu_grad(v); });
}

// SwiGLU's gated product silu(gate) * up (Llama's MLP) in one pass, with a one-pass backward: the
// float arithmetic of silu(gate) * up without its intermediate tensor. gate and up: one shape.
inline Tensor swiglu(const Tensor& gate, const Tensor& up) {
  MOA_CHECK(gate.defined() && up.defined(), ValueError, "swiglu: expected defined gate and up");
  MOA_CHECK(gate.dtype() == up.dtype() && is_floating(gate.dtype()), ValueError,
            "swiglu: expected floating gate and up of one dtype, got ", dtype_name(gate.dtype()), " and ",
            dtype_name(up.dtype()));
  MOA_CHECK(gate.device() == up.device(), DeviceError, "swiglu: expected gate and up on one device, got ",
            gate.device().str(), " and ", up.device().str());
  MOA_CHECK(gate.shape() == up.shape(), ShapeError, "swiglu: expected gate and up of one shape, got ",
            shape_str(gate.shape()), " and ", shape_str(up.shape()));
  const bool on_dev = on_device(gate);
  if (on_dev) detail::check_device_f32(gate, "swiglu");
  const Tensor g = gate.contiguous().detach(), u = up.contiguous().detach();
  Tensor out = Tensor::empty(gate.shape(), gate.dtype(), gate.device());
  const int64_t n = out.numel();
  if (on_dev) {
    if (n > 0) backend(gate.device()).swiglu_forward(out.data<float>(), g.data<float>(), u.data<float>(), n);
  } else {
    detail::dispatch_float(gate.dtype(), "swiglu", [&]<class T>() {
      const T *pg = g.data<T>(), *pu = u.data<T>();
      T* po = out.data<T>();
      detail::parallel_for(n, 8, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) po[i] = kernels::reference::silu(pg[i]) * pu[i];
      });
    });
  }
  if (autograd::needs_graph({&gate, &up})) {
    autograd::record("swiglu", out, {gate, up}, [g, u, n, on_dev](const Tensor& dy, const std::vector<char>& needs) {
      std::vector<Tensor> r(2);
      for (int i = 0; i < 2; ++i)
        if (needs[i]) r[i] = Tensor::empty(g.shape(), g.dtype(), g.device());
      if (n == 0) return r;
      if (on_dev) {
        auto ptr = [](const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; };
        backend(g.device())
            .swiglu_backward(ptr(r[0]), ptr(r[1]), dy.data<float>(), g.data<float>(), u.data<float>(), n);
        return r;
      }
      detail::dispatch_float(g.dtype(), "swiglu backward", [&]<class T>() {
        const T *pd = dy.data<T>(), *pg = g.data<T>(), *pu = u.data<T>();
        T* dg = r[0].defined() ? r[0].data<T>() : nullptr;
        T* du = r[1].defined() ? r[1].data<T>() : nullptr;
        detail::parallel_for(n, 8, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            if (du) du[i] = pd[i] * kernels::reference::silu(pg[i]);
            if (dg) dg[i] = (pd[i] * pu[i]) * kernels::reference::silu_grad(pg[i]);
          }
        });
      });
      return r;
    });
  }
  return out;
}

inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator-(const Tensor& x) { return neg(x); }
inline Tensor operator*(const Tensor& x, double s) { return scale(x, s); }
inline Tensor operator*(double s, const Tensor& x) { return scale(x, s); }
inline Tensor operator/(const Tensor& x, double s) { return scale(x, 1.0 / s); }
inline Tensor operator+(const Tensor& x, double c) { return shift(x, c); }
inline Tensor operator-(const Tensor& x, double c) { return shift(x, -c); }

}  // namespace moa
