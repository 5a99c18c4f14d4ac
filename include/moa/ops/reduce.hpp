// moa/ops/reduce.hpp: sum and mean over axes, expand (a broadcast view) and sum_to (its adjoint).
#pragma once

#include <algorithm>
#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"

namespace moa {

namespace detail {

// Sorted, unique, normalised axes; empty `axes` means all axes.
inline std::vector<int64_t> reduction_axes(const std::vector<int64_t>& axes, int64_t rank, const char* op) {
  std::vector<int64_t> out;
  if (axes.empty()) {
    for (int64_t i = 0; i < rank; ++i) out.push_back(i);
    return out;
  }
  for (int64_t a : axes) out.push_back(normalize_axis(a, rank, op));
  std::sort(out.begin(), out.end());
  MOA_CHECK(std::adjacent_find(out.begin(), out.end()) == out.end(), ShapeError, op,
            ": expected each axis once, got ", cat(axes));
  return out;
}

inline Shape reduced_shape(const Shape& s, const std::vector<int64_t>& axes, bool keepdim) {
  Shape out;
  for (int64_t i = 0; i < static_cast<int64_t>(s.size()); ++i) {
    const bool r = std::binary_search(axes.begin(), axes.end(), i);
    if (!r)
      out.push_back(s[i]);
    else if (keepdim)
      out.push_back(1);
  }
  return out;
}

// out[kept] = scale * sum over the reduced axes of x (out contiguous, keepdim layout).
template <class T>
Tensor sum_kernel(const Tensor& x, const std::vector<int64_t>& axes, double scale) {
  const Shape kshape = reduced_shape(x.shape(), axes, true);
  if (on_device(x)) {  // kept axes first, reduced axes last: one row sum per output element
    check_device_f32(x, "sum");
    std::vector<int64_t> order;
    int64_t cols = 1;
    for (int64_t i = 0; i < x.dim(); ++i)
      if (!std::binary_search(axes.begin(), axes.end(), i)) order.push_back(i);
    for (int64_t a : axes) {
      order.push_back(a);
      cols *= x.shape()[a];
    }
    const Tensor xp = make_view(x, [&] { Shape s; for (int64_t i : order) s.push_back(x.shape()[i]); return s; }(),
                                [&] { Strides s; for (int64_t i : order) s.push_back(x.strides()[i]); return s; }(),
                                x.offset());
    const Tensor xc = xp.is_contiguous() ? xp : [&] { Tensor c = Tensor::empty(xp.shape(), xp.dtype(), xp.device()); c.copy_(xp); return c; }();
    Tensor out = Tensor::empty(kshape, x.dtype(), x.device());
    const int64_t rows = out.numel();
    if (rows > 0) {
      if (cols == 0)
        out.fill_(0.0);
      else
        backend(x.device()).sum_rows(out.data<float>(), xc.data<float>(), rows, cols, scale);
    }
    return out;
  }
  Tensor out = Tensor::zeros(kshape, x.dtype(), x.device());
  T* o = out.data<T>();
  const T* px = static_cast<const T*>(x.data_ptr());
  const Strides so = broadcast_strides(kshape, out.strides(), x.shape());
  const Strides sx = x.strides();
  if (x.is_contiguous() && !axes.empty() && axes.back() == x.dim() - 1 &&
      static_cast<int64_t>(axes.size()) == 1) {
    // Fast path: rows of a contiguous tensor, reduced along the last axis.
    const int64_t cols = x.shape().back(), rows = x.numel() / std::max<int64_t>(cols, 1);
    parallel_for(rows, cols, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        T acc = 0;
        for (int64_t c = 0; c < cols; ++c) acc += px[r * cols + c];
        o[r] = acc;
      }
    });
  } else {
    for_each_row<2>(x.shape(), {&so, &sx},
                    [&](const std::array<int64_t, 2>& off, int64_t len, const std::array<int64_t, 2>& in) {
                      if (in[0] == 0) {
                        T acc = 0;
                        for (int64_t i = 0; i < len; ++i) acc += px[off[1] + i * in[1]];
                        o[off[0]] += acc;
                      } else {
                        for (int64_t i = 0; i < len; ++i) o[off[0] + i * in[0]] += px[off[1] + i * in[1]];
                      }
                    });
  }
  if (scale != 1.0) {
    const T s = static_cast<T>(scale);
    for (int64_t i = 0; i < out.numel(); ++i) o[i] *= s;
  }
  return out;
}

}  // namespace detail

// Reads x as `shape` (NumPy broadcasting) without copying: a view with stride 0 where stretched.
inline Tensor expand(const Tensor& x, const Shape& shape);

// Sums x down to `shape` (the adjoint of broadcasting): over leading axes and axes where shape is 1.
inline Tensor sum_to(const Tensor& x, const Shape& shape);

namespace detail {

inline Tensor reduce_op(const char* name, const Tensor& x, const std::vector<int64_t>& axes_in, bool keepdim,
                        bool average) {
  MOA_CHECK(x.defined() && is_floating(x.dtype()), ValueError, name, ": expected a floating tensor");
  const std::vector<int64_t> axes = reduction_axes(axes_in, x.dim(), name);
  int64_t count = 1;
  for (int64_t a : axes) count *= x.shape()[a];
  if (average)
    MOA_CHECK(count > 0, ShapeError, name, ": expected a non-empty reduction, got shape ", shape_str(x.shape()));
  const double scale = average ? 1.0 / static_cast<double>(count) : 1.0;
  Tensor k = dispatch_float(x.dtype(), name, [&]<class T>() { return sum_kernel<T>(x, axes, scale); });
  const Shape kshape = k.shape();
  Tensor out = keepdim ? k : k.view(reduced_shape(x.shape(), axes, false));
  if (autograd::needs_graph({&x})) {
    const Shape in_shape = x.shape();
    autograd::record(name, out, {x}, [in_shape, kshape, scale](const Tensor& g, const std::vector<char>&) {
      Tensor gk = expand(g.view(kshape), in_shape).contiguous();
      if (scale != 1.0 && on_device(gk)) {
        if (gk.numel() > 0) backend(gk.device()).unary(UnaryOp::scale, scale, gk.data<float>(), gk.data<float>(), gk.numel());
      } else if (scale != 1.0)
        dispatch_float(gk.dtype(), "mean", [&]<class T>() {
          T* p = gk.data<T>();
          for (int64_t i = 0; i < gk.numel(); ++i) p[i] *= static_cast<T>(scale);
        });
      return std::vector<Tensor>{gk};
    });
  }
  return out;
}

}  // namespace detail

// Sum over `axes` (all axes when empty); keepdim keeps reduced axes with size 1.
inline Tensor sum(const Tensor& x, const std::vector<int64_t>& axes, bool keepdim = false) {
  return detail::reduce_op("sum", x, axes, keepdim, false);
}
inline Tensor sum(const Tensor& x) { return detail::reduce_op("sum", x, {}, false, false); }
inline Tensor mean(const Tensor& x, const std::vector<int64_t>& axes, bool keepdim = false) {
  return detail::reduce_op("mean", x, axes, keepdim, true);
}
inline Tensor mean(const Tensor& x) { return detail::reduce_op("mean", x, {}, false, true); }

inline Tensor expand(const Tensor& x, const Shape& shape) {
  const Shape target = broadcast_shapes(x.shape(), shape, "expand");
  MOA_CHECK(target == shape, ShapeError, "expand: cannot expand shape ", shape_str(x.shape()), " to ",
            shape_str(shape));
  Tensor out = detail::make_view(x, shape, broadcast_strides(x.shape(), x.strides(), shape), x.offset());
  if (autograd::needs_graph({&x})) {
    const Shape in_shape = x.shape();
    autograd::record("expand", out, {x}, [in_shape](const Tensor& g, const std::vector<char>&) {
      return std::vector<Tensor>{sum_to(g, in_shape)};
    });
  }
  return out;
}

inline Tensor sum_to(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x;
  MOA_CHECK(x.dim() >= static_cast<int64_t>(shape.size()), ShapeError, "sum_to: cannot sum shape ",
            shape_str(x.shape()), " to ", shape_str(shape));
  const std::size_t lead = x.shape().size() - shape.size();
  std::vector<int64_t> axes;
  for (std::size_t i = 0; i < x.shape().size(); ++i) {
    if (i < lead) {
      axes.push_back(static_cast<int64_t>(i));
      continue;
    }
    const int64_t want = shape[i - lead];
    MOA_CHECK(want == x.shape()[i] || want == 1, ShapeError, "sum_to: cannot sum shape ", shape_str(x.shape()),
              " to ", shape_str(shape));
    if (want == 1 && x.shape()[i] != 1) axes.push_back(static_cast<int64_t>(i));
  }
  if (axes.empty()) return x.reshape(shape);
  return sum(x, axes, true).reshape(shape);
}

}  // namespace moa
