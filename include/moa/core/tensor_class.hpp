// moa/core/tensor_class.hpp: the Tensor handle: shape, strides, dtype, device, shared storage, and the
// autograd state (requires_grad, grad, the node that made it).
//
// A Tensor is a cheap reference (shared_ptr) to a TensorImpl; copies alias. Views (reshape,
// transpose, narrow, ...) share storage. Ops are free functions in namespace moa (moa/ops/...);
// the members below that build graph nodes are defined in moa/ops/view.hpp and
// moa/autograd/engine.hpp. Include moa/core/tensor.hpp, which brings all three.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <type_traits>
#include <vector>

#include "moa/core/dtype.hpp"
#include "moa/core/error.hpp"
#include "moa/core/parallel.hpp"
#include "moa/core/rng.hpp"
#include "moa/core/shape.hpp"
#include "moa/core/storage.hpp"

namespace moa {

namespace autograd {
struct Node;
}

namespace detail {

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in elements
  Shape shape;
  Strides strides;
  DType dtype = DType::f32;
  bool requires_grad = false;                 // set on leaves by the user; true on outputs of graph ops
  std::shared_ptr<TensorImpl> grad;           // accumulated gradient of a leaf (contiguous, same shape)
  std::shared_ptr<autograd::Node> grad_fn;    // the node that produced this tensor (null for leaves)
};

}  // namespace detail

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<detail::TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- creation ---------------------------------------------------------------------------
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu()) {
    for (int64_t d : shape)
      MOA_CHECK(d >= 0, ShapeError, "empty: expected non-negative sizes, got shape ", shape_str(shape));
    MOA_CHECK(device.type == DeviceType::cpu || dtype != DType::f64, ValueError, "empty: f64 tensors stay on the cpu "
              "(they serve gradient checks); expected f32, bf16 or i32 on ", device.str());
    auto impl = std::make_shared<detail::TensorImpl>();
    impl->storage = Storage::allocate(static_cast<std::size_t>(numel_of(shape)) * dtype_size(dtype), device);
    impl->shape = shape;
    impl->strides = contiguous_strides(shape);
    impl->dtype = dtype;
    return Tensor(std::move(impl));
  }
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32, Device device = Device::cpu()) {
    Tensor t = empty(shape, dtype, device);
    t.fill_(value);
    return t;
  }
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu()) {
    return full(shape, 0.0, dtype, device);
  }
  static Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu()) {
    return full(shape, 1.0, dtype, device);
  }
  static Tensor scalar(double value, DType dtype = DType::f32) { return full({}, value, dtype); }
  template <class T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape) {
    MOA_CHECK(static_cast<int64_t>(values.size()) == numel_of(shape), ShapeError, "from_vector: expected ",
              numel_of(shape), " values for shape ", shape_str(shape), ", got ", values.size());
    Tensor t = empty(shape, dtype_of<T>::value);
    if (!values.empty()) std::memcpy(t.data_ptr(), values.data(), values.size() * sizeof(T));
    return t;
  }
  template <class T>
  static Tensor from_vector(const std::vector<T>& values) {
    return from_vector(values, Shape{static_cast<int64_t>(values.size())});
  }
  // Standard normal * std + mean, and uniform in [lo, hi), from `gen` (deterministic, thread-count independent).
  static Tensor randn(const Shape& shape, Generator& gen, DType dtype = DType::f32, double mean = 0.0,
                      double std = 1.0) {
    Tensor t = empty(shape, dtype);
    const int64_t n = t.numel();
    const std::uint64_t first = gen.reserve(static_cast<std::uint64_t>(n));
    detail::dispatch_float(dtype, "randn", [&]<class T>() {
      T* p = t.data<T>();
      detail::parallel_for(n, 64, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i)
          p[i] = static_cast<T>(mean + std * static_cast<double>(gen.normal_at<T>(first + i)));
      });
    });
    return t;
  }
  static Tensor rand(const Shape& shape, Generator& gen, DType dtype = DType::f32, double lo = 0.0,
                     double hi = 1.0) {
    Tensor t = empty(shape, dtype);
    const int64_t n = t.numel();
    const std::uint64_t first = gen.reserve(static_cast<std::uint64_t>(n));
    detail::dispatch_float(dtype, "rand", [&]<class T>() {
      T* p = t.data<T>();
      detail::parallel_for(n, 32, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i)
          p[i] = static_cast<T>(lo + (hi - lo) * static_cast<double>(gen.uniform_at<T>(first + i)));
      });
    });
    return t;
  }

  // ---- metadata ----------------------------------------------------------------------------
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl().shape; }
  const Strides& strides() const { return impl().strides; }
  int64_t dim() const { return static_cast<int64_t>(impl().shape.size()); }
  int64_t size(int64_t axis) const { return impl().shape[normalize_axis(axis, dim(), "size")]; }
  int64_t stride(int64_t axis) const { return impl().strides[normalize_axis(axis, dim(), "stride")]; }
  int64_t numel() const { return numel_of(impl().shape); }
  int64_t offset() const { return impl().offset; }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage->device; }
  bool is_contiguous() const {
    const auto& s = impl().shape;
    const auto& st = impl().strides;
    int64_t expected = 1;
    for (std::size_t i = s.size(); i-- > 0;) {
      if (s[i] != 1 && st[i] != expected) return false;
      expected *= s[i];
    }
    return true;
  }
  const std::shared_ptr<Storage>& storage() const { return impl().storage; }
  bool shares_storage_with(const Tensor& o) const { return impl().storage == o.impl().storage; }

  // ---- data access (host) ------------------------------------------------------------------
  void* data_ptr() const {
    return impl().storage->data.get() + static_cast<std::size_t>(impl().offset) * dtype_size(impl().dtype);
  }
  template <class T>
  T* data() const {
    MOA_CHECK(dtype_of<std::remove_const_t<T>>::value == impl().dtype, ValueError, "data: requested ",
              dtype_name(dtype_of<std::remove_const_t<T>>::value), " from a tensor of dtype ",
              dtype_name(impl().dtype));
    return static_cast<T*>(data_ptr());
  }
  // The elements in logical (row-major) order, converted to T; works for any strides.
  template <class T>
  std::vector<T> to_vector() const;
  template <class T>
  T item() const {
    MOA_CHECK(numel() == 1, ShapeError, "item: expected a tensor with one element, got shape ", shape_str(shape()));
    return to_vector<T>()[0];
  }

  // ---- in-place fills (not recorded by autograd) --------------------------------------------
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }
  // Copies src's values (same shape, any strides and floating dtype) into this tensor.
  Tensor& copy_(const Tensor& src);

  // ---- views and copies (recorded by autograd; defined in moa/ops/view.hpp) -----------------
  Tensor contiguous() const;
  Tensor clone() const;
  Tensor reshape(const Shape& shape) const;
  Tensor view(const Shape& shape) const;
  Tensor transpose(int64_t a, int64_t b) const;
  Tensor t() const { return transpose(-2, -1); }
  Tensor permute(const std::vector<int64_t>& order) const;
  Tensor narrow(int64_t axis, int64_t start, int64_t length) const;
  Tensor unsqueeze(int64_t axis) const;
  Tensor squeeze(int64_t axis) const;
  Tensor flatten() const { return reshape({numel()}); }
  Tensor to(DType dtype) const;
  // A copy on `device` (this tensor itself when already there); differentiable: the gradient goes back.
  Tensor to(Device device) const;
  // A tensor sharing storage but cut from the graph (no grad_fn, requires_grad false).
  Tensor detach() const {
    auto impl = std::make_shared<detail::TensorImpl>();
    impl->storage = impl_->storage;
    impl->offset = impl_->offset;
    impl->shape = impl_->shape;
    impl->strides = impl_->strides;
    impl->dtype = impl_->dtype;
    return Tensor(std::move(impl));
  }

  // ---- autograd ----------------------------------------------------------------------------
  bool requires_grad() const { return impl().requires_grad || impl().grad_fn != nullptr; }
  // Marks a leaf as a parameter whose gradient backward() accumulates into grad().
  Tensor& set_requires_grad(bool on = true) {
    MOA_CHECK(impl().grad_fn == nullptr, AutogradError,
              "set_requires_grad: only leaf tensors can be marked; this tensor was produced by an op");
    MOA_CHECK(!on || is_floating(dtype()), ValueError,
              "set_requires_grad: expected a floating dtype, got ", dtype_name(dtype()));
    impl().requires_grad = on;
    return *this;
  }
  bool is_leaf() const { return impl().grad_fn == nullptr; }
  Tensor grad() const { return impl().grad ? Tensor(impl().grad) : Tensor(); }
  void set_grad(const Tensor& g) { impl().grad = g.impl_; }
  void zero_grad() { impl().grad.reset(); }
  const std::shared_ptr<autograd::Node>& grad_fn() const { return impl().grad_fn; }
  // Reverse-mode differentiation from this tensor (a scalar unless `grad` is given).
  void backward(const Tensor& grad = Tensor(), bool retain_graph = false) const;

  detail::TensorImpl& impl() const {
    MOA_CHECK(impl_ != nullptr, ValueError, "tensor: the tensor is undefined (default-constructed)");
    return *impl_;
  }
  const std::shared_ptr<detail::TensorImpl>& impl_ptr() const { return impl_; }

 private:
  std::shared_ptr<detail::TensorImpl> impl_;
};

namespace detail {

// A tensor viewing `base`'s storage with another shape, strides and offset (no autograd).
inline Tensor make_view(const Tensor& base, Shape shape, Strides strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = base.storage();
  impl->offset = offset;
  impl->shape = std::move(shape);
  impl->strides = std::move(strides);
  impl->dtype = base.dtype();
  return Tensor(std::move(impl));
}

// Calls f(offsets, inner_len, inner_strides) once per innermost row of `shape`, where offsets[k] is
// operand k's element offset at the start of the row (operand k read with strides[k]).
template <std::size_t N, class F>
void for_each_row(const Shape& shape, const std::array<const Strides*, N>& strides, F&& f) {
  const std::size_t rank = shape.size();
  std::array<int64_t, N> off{};
  std::array<int64_t, N> inner{};
  if (numel_of(shape) == 0) return;
  if (rank == 0) {
    f(off, int64_t{1}, inner);
    return;
  }
  for (std::size_t k = 0; k < N; ++k) inner[k] = (*strides[k])[rank - 1];
  const int64_t len = shape[rank - 1];
  std::vector<int64_t> idx(rank, 0);
  while (true) {
    f(off, len, inner);
    // Advance the multi-index over dims [0, rank - 1), last fastest.
    int64_t d = static_cast<int64_t>(rank) - 2;
    for (; d >= 0; --d) {
      ++idx[d];
      for (std::size_t k = 0; k < N; ++k) off[k] += (*strides[k])[d];
      if (idx[d] < shape[d]) break;
      for (std::size_t k = 0; k < N; ++k) off[k] -= (*strides[k])[d] * shape[d];
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}

template <class Dst, class Src>
void strided_convert(Dst* dst, const Src* src, const Shape& shape, const Strides& src_strides) {
  const Strides dst_strides = contiguous_strides(shape);
  for_each_row<2>(shape, {&dst_strides, &src_strides},
                  [&](const std::array<int64_t, 2>& off, int64_t len, const std::array<int64_t, 2>& inner) {
                    Dst* d = dst + off[0];
                    const Src* s = src + off[1];
                    for (int64_t i = 0; i < len; ++i) d[i] = convert_value<Dst>(s[i * inner[1]]);
                  });
}

// Calls f.template operator()<T>() for any dtype with host arithmetic (f32, f64, i32).
template <class F>
decltype(auto) dispatch_any(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::f32: return f.template operator()<float>();
    case DType::f64: return f.template operator()<double>();
    case DType::i32: return f.template operator()<std::int32_t>();
    default: break;
  }
  throw ValueError(cat(op, ": dtype ", dtype_name(t), " is not supported on the cpu yet"));
}

}  // namespace detail

// True for tensors whose memory the host cannot read (everything but the cpu).
inline bool on_device(const Tensor& t) { return t.device().type != DeviceType::cpu; }

namespace detail {

// Whether t is contiguous and alone holds its memory: no other handle, view or saved value shares
// the tensor or its storage. Such a tensor may be written in place by whoever holds it last (the
// autograd engine adding into a gradient, an op adding onto an input handed over as an rvalue).
inline bool holds_memory_alone(const Tensor& t) {
  return t.is_contiguous() && t.impl_ptr().use_count() == 1 && t.storage().use_count() == 1;
}

// A detached tensor with base's values to be written in place: base's own memory when it was
// handed over (handed_over) and holds it alone, else a copy. No autograd.
inline Tensor take_or_clone(const Tensor& base, bool handed_over) {
  if (handed_over && holds_memory_alone(base)) {
    Tensor t = base.detach();
    ++t.storage()->version;
    return t;
  }
  return base.detach().clone();
}

// The device tensor as a contiguous host tensor of the same dtype (no autograd).
inline Tensor device_to_host(const Tensor& x);

// Device kernels compute in f32 (bf16 and i32 are storage): the check every device op makes.
inline void check_device_f32(const Tensor& t, const char* op) {
  MOA_CHECK(t.dtype() == DType::f32, ValueError, op, ": expected f32 on ", t.device().str(), ", got ",
            dtype_name(t.dtype()), " (device kernels compute in f32; convert with .to(DType::f32))");
}

// Moves t's data (and its gradient) to `device` in place: every handle to this tensor sees the move.
// For parameters (Module::to); a view's other views keep the old storage.
inline void move_to(const Tensor& t, Device device) {
  if (t.device() == device) return;
  Tensor c = Tensor::empty(t.shape(), t.dtype(), device);
  c.copy_(t.detach());
  TensorImpl& impl = t.impl();
  impl.storage = c.storage();
  impl.offset = 0;
  impl.strides = contiguous_strides(impl.shape);
  if (impl.grad) {
    Tensor g(impl.grad);
    Tensor gc = Tensor::empty(g.shape(), g.dtype(), device);
    gc.copy_(g);
    impl.grad = gc.impl_ptr();
  }
}

}  // namespace detail

template <class T>
std::vector<T> Tensor::to_vector() const {
  if (on_device(*this)) return detail::device_to_host(*this).to_vector<T>();
  std::vector<T> out(static_cast<std::size_t>(numel()));
  detail::dispatch_any(dtype(), "to_vector", [&]<class S>() {
    detail::strided_convert(out.data(), static_cast<const S*>(data_ptr()), shape(), strides());
  });
  return out;
}

inline Tensor& Tensor::fill_(double value) {
  if (on_device(*this)) {
    if (numel() > 0) backend(device()).fill(dtype(), data_ptr(), shape(), strides(), value);
    ++storage()->version;
    return *this;
  }
  detail::dispatch_any(dtype(), "fill_", [&]<class T>() {
    T* p = static_cast<T*>(data_ptr());
    const T v = convert_value<T>(value);
    const Strides dst = strides();
    detail::for_each_row<1>(shape(), {&dst}, [&](const std::array<int64_t, 1>& off, int64_t len,
                                                 const std::array<int64_t, 1>& inner) {
      for (int64_t i = 0; i < len; ++i) p[off[0] + i * inner[0]] = v;
    });
  });
  ++storage()->version;
  return *this;
}

namespace detail {

// A dtype the device kernels convert to and from: f64 goes through f32 on the device side.
inline DType device_side_dtype(DType t) { return t == DType::f64 ? DType::f32 : t; }

// Host <-> device and device <-> device copies for Tensor::copy_ (shapes already checked).
inline void copy_across(Tensor& dst, const Tensor& src) {
  if (dst.numel() == 0) return;
  const Device dd = dst.device(), sd = src.device();
  if (dd == sd) {  // on one device: one strided, converting copy
    backend(dd).copy_strided(dst.dtype(), dst.data_ptr(), dst.strides(), src.dtype(), src.data_ptr(), src.strides(),
                             dst.shape());
    return;
  }
  if (sd.type == DeviceType::cpu) {  // upload: a contiguous host copy in a device dtype, then one transfer
    // The host converts to dst's dtype, except to bf16 (the device converts) or from bf16 (copied as is).
    const bool keep_src = src.dtype() == DType::bf16 || dst.dtype() == DType::bf16;
    const DType t = device_side_dtype(keep_src ? src.dtype() : dst.dtype());
    Tensor h = src;
    if (!(src.is_contiguous() && src.dtype() == t)) {
      h = Tensor::empty(src.shape(), t);
      h.copy_(src);
    }
    const std::size_t nbytes = static_cast<std::size_t>(h.numel()) * dtype_size(t);
    if (dst.is_contiguous() && dst.dtype() == t) {
      backend(dd).copy_to_device(dst.data_ptr(), h.data_ptr(), nbytes, dd.index);
      return;
    }
    Tensor d = Tensor::empty(src.shape(), t, dd);
    backend(dd).copy_to_device(d.data_ptr(), h.data_ptr(), nbytes, dd.index);
    copy_across(dst, d);
    return;
  }
  // Download (or between two devices, through the host): contiguous on the source device in the
  // destination's dtype, one transfer, then a host copy when the layout or dtype still differs.
  const DType t = dd.type == DeviceType::cpu ? device_side_dtype(dst.dtype() == DType::bf16 ? src.dtype() : dst.dtype())
                                              : src.dtype();
  Tensor d = src;
  if (!(src.is_contiguous() && src.dtype() == t)) {
    d = Tensor::empty(src.shape(), t, sd);
    copy_across(d, src);
  }
  Tensor h = (dd.type == DeviceType::cpu && dst.is_contiguous() && dst.dtype() == t) ? dst : Tensor::empty(src.shape(), t);
  backend(sd).copy_to_host(h.data_ptr(), d.data_ptr(), static_cast<std::size_t>(d.numel()) * dtype_size(t), sd.index);
  if (!h.shares_storage_with(dst)) dst.copy_(h);
}

inline Tensor device_to_host(const Tensor& x) {
  Tensor h = Tensor::empty(x.shape(), x.dtype());
  copy_across(h, x);
  return h;
}

}  // namespace detail

inline Tensor& Tensor::copy_(const Tensor& src) {
  MOA_CHECK(src.shape() == shape(), ShapeError, "copy_: expected a source of shape ", shape_str(shape()), ", got ",
            shape_str(src.shape()));
  if (on_device(*this) || on_device(src)) {
    detail::copy_across(*this, src);
    ++storage()->version;
    return *this;
  }
  detail::dispatch_any(dtype(), "copy_", [&]<class D>() {
    detail::dispatch_any(src.dtype(), "copy_", [&]<class S>() {
      D* d = static_cast<D*>(data_ptr());
      const S* s = static_cast<const S*>(src.data_ptr());
      const Strides ds = strides(), ss = src.strides();
      detail::for_each_row<2>(shape(), {&ds, &ss},
                              [&](const std::array<int64_t, 2>& off, int64_t len, const std::array<int64_t, 2>& inner) {
                                for (int64_t i = 0; i < len; ++i)
                                  d[off[0] + i * inner[0]] = convert_value<D>(s[off[1] + i * inner[1]]);
                              });
    });
  });
  ++storage()->version;
  return *this;
}

}  // namespace moa

