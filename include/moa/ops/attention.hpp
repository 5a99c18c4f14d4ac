// moa/ops/attention.hpp: fused causal self-attention (scores, causal mask, softmax, weighted sum),
// multi-head and grouped-query, with its backward.
//
// q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) with Hq % Hkv == 0 (query head h uses kv head
// h / (Hq / Hkv)) and Tk >= Tq: query i sits at absolute position Tk - Tq + i and attends to keys
// 0 .. Tk - Tq + i (Tq == Tk is ordinary causal self-attention; Tq < Tk is new tokens against a
// KV cache, differentiable too).
// Saved for backward: q, k, v, the output and lse (B, Hq, Tq), the log-sum-exp of each row of
// scaled scores; the backward recomputes the probabilities from them (no (T x T) matrix is kept).
#pragma once

#include <cmath>
#include <optional>
#include <vector>

#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/attention.hpp"

namespace moa {

// Returns (B, Hq, Tq, D) in q's dtype. scale defaults to 1 / sqrt(D).
inline Tensor causal_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                               std::optional<double> scale = std::nullopt) {
  MOA_CHECK(q.defined() && k.defined() && v.defined(), ValueError, "causal_attention: expected defined q, k and v");
  MOA_CHECK(q.dtype() == DType::f32 || q.dtype() == DType::f64, ValueError,
            "causal_attention: expected q of dtype f32 or f64, got ", dtype_name(q.dtype()));
  MOA_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(), ValueError,
            "causal_attention: expected q, k and v of one dtype, got ", dtype_name(q.dtype()), ", ",
            dtype_name(k.dtype()), " and ", dtype_name(v.dtype()));
  MOA_CHECK(k.device() == q.device() && v.device() == q.device(), DeviceError,
            "causal_attention: expected q, k and v on one device, got q on ", q.device().str(), ", k on ", k.device().str(),
            " and v on ", v.device().str());
  MOA_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, ShapeError,
            "causal_attention: expected q [B, Hq, Tq, D] and k, v [B, Hkv, Tk, D], got q ", shape_str(q.shape()),
            ", k ", shape_str(k.shape()), " and v ", shape_str(v.shape()));
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2);
  MOA_CHECK(k.shape() == v.shape(), ShapeError, "causal_attention: expected k and v of one shape, got k ",
            shape_str(k.shape()), " and v ", shape_str(v.shape()));
  MOA_CHECK(k.size(0) == B && k.size(3) == D, ShapeError,
            "causal_attention: expected k, v of shape [", B, ", Hkv, Tk, ", D, "] (B and D of q ",
            shape_str(q.shape()), "), got ", shape_str(k.shape()));
  MOA_CHECK(D >= 1 && Hq >= 1 && Hkv >= 1, ShapeError,
            "causal_attention: expected D >= 1, Hq >= 1 and Hkv >= 1, got q ", shape_str(q.shape()), " and k ",
            shape_str(k.shape()));
  MOA_CHECK(Hq % Hkv == 0, ShapeError, "causal_attention: expected Hq (", Hq, ") to be a multiple of Hkv (", Hkv,
            "), got q ", shape_str(q.shape()), " and k ", shape_str(k.shape()));
  MOA_CHECK(Tk >= Tq, ShapeError, "causal_attention: expected Tk >= Tq (keys include the queries' positions), got q ",
            shape_str(q.shape()), " and k ", shape_str(k.shape()));
  const double sc = scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  MOA_CHECK(std::isfinite(sc), ValueError, "causal_attention: expected a finite scale, got ", sc);

  const Tensor qc = q.detach().contiguous(), kc = k.detach().contiguous(), vc = v.detach().contiguous();
  if (on_device(q)) {
    detail::check_device_f32(q, "causal_attention");
    const Device dev = q.device();
    const AttentionDims dims{B, Hq, Hkv, Tq, Tk, D};
    Tensor out = Tensor::empty({B, Hq, Tq, D}, q.dtype(), dev);
    Tensor lse = Tensor::empty({B, Hq, Tq}, q.dtype(), dev);
    if (out.numel() > 0)
      backend(dev).attention_forward(out.data<float>(), lse.data<float>(), qc.data<float>(), kc.data<float>(),
                                     vc.data<float>(), dims, static_cast<float>(sc));
    if (autograd::needs_graph({&q, &k, &v}))
      autograd::record("causal_attention", out, {q, k, v},
                       [qs = qc.detach(), ks = kc.detach(), vs = vc.detach(), os = out.detach(), lse, dims,
                        sc](const Tensor& g, const std::vector<char>& needs) {
                         std::vector<Tensor> grads(3);
                         const Device d = qs.device();
                         if (needs[0]) grads[0] = Tensor::empty(qs.shape(), qs.dtype(), d);
                         if (needs[1]) grads[1] = Tensor::empty(ks.shape(), ks.dtype(), d);
                         if (needs[2]) grads[2] = Tensor::empty(vs.shape(), vs.dtype(), d);
                         auto ptr = [](const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; };
                         if (qs.numel() > 0)
                           backend(d).attention_backward(ptr(grads[0]), ptr(grads[1]), ptr(grads[2]), g.data<float>(),
                                                         qs.data<float>(), ks.data<float>(), vs.data<float>(),
                                                         os.data<float>(), lse.data<float>(), dims,
                                                         static_cast<float>(sc));
                         return grads;
                       });
    return out;
  }
  Tensor out = Tensor::empty({B, Hq, Tq, D}, q.dtype());  // (B, Hq, Tq, D)
  Tensor lse = Tensor::empty({B, Hq, Tq}, q.dtype());     // (B, Hq, Tq)
  detail::dispatch_float(q.dtype(), "causal_attention", [&]<class T>() {
    kernels::cpu::attention_forward<T>(out.data<T>(), lse.data<T>(), qc.data<T>(), kc.data<T>(), vc.data<T>(), B, Hq,
                                       Hkv, Tq, Tk, D, static_cast<T>(sc));
  });
  if (autograd::needs_graph({&q, &k, &v})) {
    autograd::record(
        "causal_attention", out, {q, k, v},
        [qs = qc.detach(), ks = kc.detach(), vs = vc.detach(), os = out.detach(), lse, B, Hq, Hkv, Tq, Tk, D,
         sc](const Tensor& g, const std::vector<char>& needs) {
          std::vector<Tensor> grads(3);
          if (needs[0]) grads[0] = Tensor::empty(qs.shape(), qs.dtype());
          if (needs[1]) grads[1] = Tensor::empty(ks.shape(), ks.dtype());
          if (needs[2]) grads[2] = Tensor::empty(vs.shape(), vs.dtype());
          detail::dispatch_float(qs.dtype(), "causal_attention backward", [&]<class T>() {
            auto ptr = [](const Tensor& t) { return t.defined() ? t.data<T>() : nullptr; };
            kernels::cpu::attention_backward<T>(ptr(grads[0]), ptr(grads[1]), ptr(grads[2]), g.data<T>(),
                                                qs.data<T>(), ks.data<T>(), vs.data<T>(), os.data<T>(),
                                                lse.data<T>(), B, Hq, Hkv, Tq, Tk, D, static_cast<T>(sc));
          });
          return grads;
        });
  }
  return out;
}

}  // namespace moa
