// moa/ops/concat.hpp: concat (join along an axis) and gather (pick elements along an axis by an
// i32 index tensor), with their backwards (slices of the gradient; scatter-add).
#pragma once

#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"

namespace moa {

// Joins `xs` along `axis`; all other sizes must agree.
inline Tensor concat(const std::vector<Tensor>& xs, int64_t axis) {
  MOA_CHECK(!xs.empty(), ShapeError, "concat: expected at least one tensor, got none");
  const Tensor& first = xs[0];
  const int64_t ax = normalize_axis(axis, first.dim(), "concat");
  Shape out_shape = first.shape();
  out_shape[ax] = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const Tensor& x = xs[i];
    MOA_CHECK(x.dtype() == first.dtype(), ValueError, "concat: expected one dtype, got ", dtype_name(first.dtype()),
              " and ", dtype_name(x.dtype()), " (tensor ", i, ")");
    MOA_CHECK(x.device() == first.device(), DeviceError, "concat: expected tensors on one device (tensor ", i, ")");
    bool fits = x.dim() == first.dim();
    for (int64_t d = 0; fits && d < first.dim(); ++d) fits = d == ax || x.shape()[d] == first.shape()[d];
    MOA_CHECK(fits, ShapeError, "concat: expected shapes equal except on axis ", ax, ", got ",
              shape_str(first.shape()), " and ", shape_str(x.shape()), " (tensor ", i, ")");
    out_shape[ax] += x.shape()[ax];
  }
  Tensor out = Tensor::empty(out_shape, first.dtype(), first.device());
  std::vector<int64_t> sizes;
  int64_t at = 0;
  for (const Tensor& x : xs) {
    out.narrow(ax, at, x.shape()[ax]).detach().copy_(x);
    sizes.push_back(x.shape()[ax]);
    at += x.shape()[ax];
  }
  if (autograd::needs_graph(xs)) {
    autograd::record("concat", out, xs, [ax, sizes](const Tensor& g, const std::vector<char>& needs) {
      std::vector<Tensor> r(sizes.size());
      int64_t start = 0;
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        if (needs[i]) r[i] = g.narrow(ax, start, sizes[i]).contiguous();
        start += sizes[i];
      }
      return r;
    });
  }
  return out;
}

// out[i][j][k] = x[i][index[i][j][k]][k] for axis 1 (likewise for any axis): index (i32) has x's
// rank and, off `axis`, sizes no larger than x's; out has index's shape.
inline Tensor gather(const Tensor& x, int64_t axis, const Tensor& index) {
  MOA_CHECK(index.dtype() == DType::i32, ValueError, "gather: expected an i32 index, got ", dtype_name(index.dtype()));
  MOA_CHECK(is_floating(x.dtype()), ValueError, "gather: expected a floating tensor, got ", dtype_name(x.dtype()));
  MOA_CHECK(index.dim() == x.dim(), ShapeError, "gather: expected an index of rank ", x.dim(), " like x ",
            shape_str(x.shape()), ", got ", shape_str(index.shape()));
  const int64_t ax = normalize_axis(axis, x.dim(), "gather");
  for (int64_t d = 0; d < x.dim(); ++d)
    MOA_CHECK(d == ax || index.shape()[d] <= x.shape()[d], ShapeError, "gather: expected index sizes <= x's off axis ",
              ax, ", got index ", shape_str(index.shape()), " for x ", shape_str(x.shape()));
  const Tensor idx = on_device(index) ? detail::device_to_host(index) : index.contiguous();
  const int32_t* pi = idx.data<int32_t>();
  const int64_t n_axis = x.shape()[ax];
  for (int64_t i = 0; i < idx.numel(); ++i)
    MOA_CHECK(pi[i] >= 0 && pi[i] < n_axis, IndexError, "gather: index ", pi[i], " at position ", i,
              " is out of range for axis ", ax, " of size ", n_axis);
  // Read x with its own strides at the index's positions, the axis stride replaced by the index value.
  Strides sx = x.strides();
  const int64_t ax_stride = sx[ax];
  sx[ax] = 0;
  const Strides si = idx.strides();
  if (on_device(x)) {  // element offsets computed on the host, then one take (backward: one put_add)
    detail::check_device_f32(x, "gather");
    const Device dev = x.device();
    const Strides sgx = [&] {
      Strides c = contiguous_strides(x.shape());
      c[ax] = 0;
      return c;
    }();
    const int64_t gx_ax = contiguous_strides(x.shape())[ax];
    std::vector<int32_t> fwd(static_cast<std::size_t>(idx.numel())), bwd(fwd.size());
    MOA_CHECK(x.storage()->nbytes / 4 < (std::size_t{1} << 31), ShapeError, "gather: on ", dev.str(),
              " x must have fewer than 2^31 elements");
    detail::for_each_row<3>(index.shape(), {&si, &sx, &sgx},
                            [&](const std::array<int64_t, 3>& off, int64_t len, const std::array<int64_t, 3>& in) {
                              for (int64_t k = 0; k < len; ++k) {
                                const int64_t p = off[0] + k * in[0];
                                fwd[p] = static_cast<int32_t>(off[1] + k * in[1] + pi[p] * ax_stride);
                                bwd[p] = static_cast<int32_t>(off[2] + k * in[2] + pi[p] * gx_ax);
                              }
                            });
    const Tensor fwd_d = Tensor::from_vector(fwd, index.shape()).to(dev);
    Tensor out = Tensor::empty(index.shape(), x.dtype(), dev);
    if (out.numel() > 0)
      backend(dev).take(out.data<float>(), static_cast<const float*>(x.data_ptr()), fwd_d.data<int32_t>(), out.numel());
    if (autograd::needs_graph({&x})) {
      const Tensor bwd_d = Tensor::from_vector(bwd, index.shape()).to(dev);
      const Shape xs = x.shape();
      autograd::record("gather", out, {x}, [xs, bwd_d](const Tensor& g, const std::vector<char>&) {
        Tensor gx = Tensor::zeros(xs, g.dtype(), g.device());
        const Tensor gc = g.contiguous();
        if (gc.numel() > 0)
          backend(g.device()).put_add(gx.data<float>(), bwd_d.data<int32_t>(), gc.data<float>(), gc.numel());
        return std::vector<Tensor>{gx};
      });
    }
    return out;
  }
  Tensor out = Tensor::empty(index.shape(), x.dtype(), x.device());
  detail::dispatch_float(x.dtype(), "gather", [&]<class T>() {
    const T* px = static_cast<const T*>(x.data_ptr());
    T* o = out.data<T>();
    detail::for_each_row<2>(index.shape(), {&si, &sx},
                            [&](const std::array<int64_t, 2>& off, int64_t len, const std::array<int64_t, 2>& in) {
                              for (int64_t k = 0; k < len; ++k) {
                                const int64_t p = off[0] + k * in[0];
                                o[p] = px[off[1] + k * in[1] + pi[p] * ax_stride];
                              }
                            });
  });
  if (autograd::needs_graph({&x})) {
    const Shape xs = x.shape();
    autograd::record("gather", out, {x}, [xs, ax, idxd = idx.detach()](const Tensor& g, const std::vector<char>&) {
      Tensor gx = Tensor::zeros(xs, g.dtype(), g.device());
      Strides sgx = gx.strides();
      const int64_t st = sgx[ax];
      sgx[ax] = 0;
      const Strides sidx = idxd.strides();
      const int32_t* p = idxd.data<int32_t>();
      detail::dispatch_float(g.dtype(), "gather", [&]<class T>() {
        const T* pg = g.data<T>();
        T* o = gx.data<T>();
        // Serial scatter-add: positions may repeat, and a fixed order keeps sums deterministic.
        detail::for_each_row<2>(idxd.shape(), {&sidx, &sgx},
                                [&](const std::array<int64_t, 2>& off, int64_t len, const std::array<int64_t, 2>& in) {
                                  for (int64_t k = 0; k < len; ++k) {
                                    const int64_t q = off[0] + k * in[0];
                                    o[off[1] + k * in[1] + p[q] * st] += pg[q];
                                  }
                                });
      });
      return std::vector<Tensor>{gx};
    });
  }
  return out;
}

}  // namespace moa
