// moa/ops/embedding.hpp: embedding lookup (rows of a table picked by i32 ids), with its backward.
//
// Saved for backward: a copy of the ids (contiguous) and the table's shape; dweight is a zero table with
// the rows of dout scatter-added in (deterministic, see kernels/cpu/embedding.hpp).
#pragma once

#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/embedding.hpp"

namespace moa {

// weight: (V, C) f32/f64; ids: i32 of any shape S, each in [0, V). Returns (S..., C).
inline Tensor embedding(const Tensor& weight, const Tensor& ids) {
  MOA_CHECK(weight.defined() && ids.defined(), ValueError, "embedding: expected a defined weight and ids");
  MOA_CHECK(weight.dtype() == DType::f32 || weight.dtype() == DType::f64, ValueError,
            "embedding: expected weight of dtype f32 or f64, got ", dtype_name(weight.dtype()));
  MOA_CHECK(weight.dim() == 2, ShapeError, "embedding: expected weight of shape [V, C], got ",
            shape_str(weight.shape()));
  MOA_CHECK(ids.dtype() == DType::i32, ValueError, "embedding: expected ids of dtype i32, got ",
            dtype_name(ids.dtype()), " (ids shape ", shape_str(ids.shape()), ")");
  MOA_CHECK(!on_device(ids) || ids.device() == weight.device(), DeviceError,
            "embedding: expected ids on the cpu or on the weight's device ", weight.device().str(), ", got ",
            ids.device().str());
  const int64_t V = weight.shape()[0], C = weight.shape()[1], N = ids.numel();
  // An owned copy: the caller may refill its ids buffer (next batch) before this graph's backward.
  const Tensor idc = on_device(ids) ? detail::device_to_host(ids) : detail::copy_contiguous(ids.detach());
  const int32_t* id = idc.data<int32_t>();
  for (int64_t n = 0; n < N; ++n)
    MOA_CHECK(id[n] >= 0 && id[n] < V, IndexError, "embedding: id ", id[n], " at position ",
              detail::unravel_index(n, ids.shape()), " of ids ", shape_str(ids.shape()),
              " is out of range for weight ", shape_str(weight.shape()), " (expected 0 <= id < V = ", V, ")");
  const Tensor wc = weight.detach().contiguous();
  Shape out_shape = ids.shape();
  out_shape.push_back(C);
  if (on_device(weight)) {
    detail::check_device_f32(weight, "embedding");
    const Device dev = weight.device();
    // Device ids: an owned device copy (no second upload); host ids: uploaded once.
    const Tensor idd = on_device(ids) ? ids.detach().clone() : idc.to(dev);
    Tensor out = Tensor::empty(out_shape, weight.dtype(), dev);
    if (N > 0 && C > 0) backend(dev).embedding_forward(out.data<float>(), idd.data<int32_t>(), wc.data<float>(), N, C);
    if (autograd::needs_graph({&weight}))
      autograd::record("embedding", out, {weight}, [idd, V, C, N](const Tensor& g, const std::vector<char>&) {
        Tensor dw = Tensor::zeros({V, C}, DType::f32, g.device());
        if (N > 0 && C > 0)
          backend(g.device()).embedding_backward(dw.data<float>(), g.data<float>(), idd.data<int32_t>(), N, C);
        return std::vector<Tensor>{dw};
      });
    return out;
  }
  Tensor out = Tensor::empty(out_shape, weight.dtype());  // (N, C)
  detail::dispatch_float(weight.dtype(), "embedding", [&]<class T>() {
    kernels::cpu::embedding_forward<T>(out.data<T>(), id, wc.data<T>(), N, C);
  });
  if (autograd::needs_graph({&weight})) {
    autograd::record("embedding", out, {weight},
                     [idc, V, C, N, dt = weight.dtype()](const Tensor& g, const std::vector<char>&) {
                       Tensor dw = Tensor::zeros({V, C}, dt);  // (V, C)
                       detail::dispatch_float(dt, "embedding backward", [&]<class T>() {
                         kernels::cpu::embedding_backward<T>(dw.data<T>(), g.data<T>(), idc.data<int32_t>(), N, C);
                       });
                       return std::vector<Tensor>{dw};
                     });
  }
  return out;
}

}  // namespace moa
