// moa/ops/view.hpp: views and copies (reshape, transpose, permute, narrow, squeeze, contiguous,
// clone, dtype casts), each with its backward. Views share storage and copy nothing.
#pragma once

#include <numeric>
#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor_class.hpp"

namespace moa {

namespace detail {

// Resolves one -1 in `shape` so that it holds `numel` elements.
inline Shape infer_shape(const Shape& shape, int64_t numel, const char* op) {
  Shape out = shape;
  int64_t known = 1, infer_at = -1;
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (out[i] == -1) {
      MOA_CHECK(infer_at < 0, ShapeError, op, ": expected at most one -1 in shape ", shape_str(shape));
      infer_at = static_cast<int64_t>(i);
    } else {
      MOA_CHECK(out[i] >= 0, ShapeError, op, ": expected non-negative sizes, got shape ", shape_str(shape));
      known *= out[i];
    }
  }
  if (infer_at >= 0) {
    MOA_CHECK(known > 0 && numel % known == 0, ShapeError, op, ": cannot infer -1 in shape ", shape_str(shape),
              " for ", numel, " elements");
    out[static_cast<std::size_t>(infer_at)] = numel / known;
  }
  MOA_CHECK(numel_of(out) == numel, ShapeError, op, ": expected a shape with ", numel, " elements, got ",
            shape_str(shape), " (", numel_of(out), " elements)");
  return out;
}

inline Tensor copy_contiguous(const Tensor& x) {
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  out.copy_(x);
  return out;
}

}  // namespace detail

inline Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

inline Tensor Tensor::clone() const {
  Tensor out = detail::copy_contiguous(*this);
  if (autograd::needs_graph({this}))
    autograd::record("clone", out, {*this},
                     [](const Tensor& g, const std::vector<char>&) { return std::vector<Tensor>{g}; });
  return out;
}

inline Tensor Tensor::view(const Shape& new_shape) const {
  const Shape s = detail::infer_shape(new_shape, numel(), "view");
  MOA_CHECK(is_contiguous(), ShapeError, "view: expected a contiguous tensor, got shape ", shape_str(shape()),
            " with strides ", detail::cat(strides()), " (use reshape, which copies when needed)");
  Tensor out = detail::make_view(*this, s, contiguous_strides(s), offset());
  if (autograd::needs_graph({this})) {
    const Shape in_shape = shape();
    autograd::record("view", out, {*this}, [in_shape](const Tensor& g, const std::vector<char>&) {
      return std::vector<Tensor>{g.view(in_shape)};
    });
  }
  return out;
}

inline Tensor Tensor::reshape(const Shape& new_shape) const {
  if (is_contiguous()) return view(new_shape);
  return contiguous().view(new_shape);
}

inline Tensor Tensor::permute(const std::vector<int64_t>& order) const {
  const int64_t r = dim();
  MOA_CHECK(static_cast<int64_t>(order.size()) == r, ShapeError, "permute: expected ", r, " axes, got ",
            detail::cat(order));
  std::vector<int64_t> ax(order.size());
  std::vector<char> seen(order.size(), 0);
  Shape s(order.size());
  Strides st(order.size());
  for (std::size_t i = 0; i < order.size(); ++i) {
    ax[i] = normalize_axis(order[i], r, "permute");
    MOA_CHECK(!seen[ax[i]], ShapeError, "permute: expected each axis once, got ", detail::cat(order));
    seen[ax[i]] = 1;
    s[i] = shape()[ax[i]];
    st[i] = strides()[ax[i]];
  }
  Tensor out = detail::make_view(*this, s, st, offset());
  if (autograd::needs_graph({this})) {
    std::vector<int64_t> inverse(ax.size());
    for (std::size_t i = 0; i < ax.size(); ++i) inverse[ax[i]] = static_cast<int64_t>(i);
    autograd::record(
        "permute", out, {*this},
        [inverse](const Tensor& g, const std::vector<char>&) { return std::vector<Tensor>{g.permute(inverse)}; },
        /*strided_grad=*/true);
  }
  return out;
}

inline Tensor Tensor::transpose(int64_t a, int64_t b) const {
  const int64_t r = dim();
  MOA_CHECK(r >= 2, ShapeError, "transpose: expected a tensor of rank >= 2, got shape ",
            shape_str(shape()));
  std::vector<int64_t> order(r);
  std::iota(order.begin(), order.end(), 0);
  std::swap(order[normalize_axis(a, r, "transpose")], order[normalize_axis(b, r, "transpose")]);
  return permute(order);
}

inline Tensor Tensor::narrow(int64_t axis, int64_t start, int64_t length) const {
  const int64_t ax = normalize_axis(axis, dim(), "narrow");
  const int64_t n = shape()[ax];
  MOA_CHECK(start >= 0 && length >= 0 && start + length <= n, IndexError, "narrow: expected 0 <= start and start + "
            "length <= ", n, " on axis ", ax, ", got start ", start, " and length ", length);
  Shape s = shape();
  s[ax] = length;
  Tensor out = detail::make_view(*this, s, strides(), offset() + start * strides()[ax]);
  if (autograd::needs_graph({this})) {
    const Shape in_shape = shape();
    const DType dt = dtype();
    autograd::record("narrow", out, {*this},
                     [in_shape, dt, ax, start, length](const Tensor& g, const std::vector<char>&) {
                       Tensor gi = Tensor::zeros(in_shape, dt, g.device());
                       gi.narrow(ax, start, length).copy_(g);
                       return std::vector<Tensor>{gi};
                     });
  }
  return out;
}

inline Tensor Tensor::unsqueeze(int64_t axis) const {
  const int64_t ax = normalize_axis(axis, dim() + 1, "unsqueeze");
  Shape s = shape();
  s.insert(s.begin() + ax, 1);
  Strides st = strides();
  st.insert(st.begin() + ax, ax < dim() ? strides()[ax] * shape()[ax] : 1);
  Tensor out = detail::make_view(*this, s, st, offset());
  if (autograd::needs_graph({this}))
    autograd::record("unsqueeze", out, {*this}, [ax](const Tensor& g, const std::vector<char>&) {
      return std::vector<Tensor>{g.squeeze(ax)};
    });
  return out;
}

inline Tensor Tensor::squeeze(int64_t axis) const {
  const int64_t ax = normalize_axis(axis, dim(), "squeeze");
  MOA_CHECK(shape()[ax] == 1, ShapeError, "squeeze: expected size 1 on axis ", ax, ", got shape ",
            shape_str(shape()));
  Shape s = shape();
  Strides st = strides();
  s.erase(s.begin() + ax);
  st.erase(st.begin() + ax);
  Tensor out = detail::make_view(*this, s, st, offset());
  if (autograd::needs_graph({this}))
    autograd::record("squeeze", out, {*this}, [ax](const Tensor& g, const std::vector<char>&) {
      return std::vector<Tensor>{g.unsqueeze(ax)};
    });
  return out;
}

inline Tensor Tensor::to(DType target) const {
  if (target == dtype()) return *this;
  Tensor out = Tensor::empty(shape(), target, device());
  out.copy_(*this);
  if (is_floating(target) && autograd::needs_graph({this})) {
    const DType src = dtype();
    autograd::record("to", out, {*this},
                     [src](const Tensor& g, const std::vector<char>&) { return std::vector<Tensor>{g.to(src)}; });
  }
  return out;
}

inline Tensor Tensor::to(Device target) const {
  if (target == device()) return *this;
  Tensor out = Tensor::empty(shape(), dtype(), target);
  out.copy_(*this);
  if (autograd::needs_graph({this})) {
    const Device src = device();
    autograd::record("to_device", out, {*this},
                     [src](const Tensor& g, const std::vector<char>&) { return std::vector<Tensor>{g.to(src)}; });
  }
  return out;
}

// Free-function spellings.
inline Tensor reshape(const Tensor& x, const Shape& s) { return x.reshape(s); }
inline Tensor transpose(const Tensor& x, int64_t a, int64_t b) { return x.transpose(a, b); }
inline Tensor permute(const Tensor& x, const std::vector<int64_t>& order) { return x.permute(order); }
inline Tensor narrow(const Tensor& x, int64_t axis, int64_t start, int64_t length) {
  return x.narrow(axis, start, length);
}

}  // namespace moa
