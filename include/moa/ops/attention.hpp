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
#include "moa/core/backend.hpp"
#include "moa/core/head_layout.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/attention.hpp"
#include "moa/ops/heads.hpp"

namespace moa {

// Returns (B, Hq, Tq, D) in q's dtype: a view of a (B, Tq, Hq, D) buffer, so that merging the heads
// (transpose(1, 2).reshape({B, Tq, Hq * D})) costs no copy. scale defaults to 1 / sqrt(D). q, k and
// v are read in place when their rows of D values are contiguous (any strides on B, H, T).
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

  // Operands are read in place when their head rows are contiguous (a projection's (B, T, H * D)
  // output viewed as heads needs no copy); the output and the gradients are written in the row
  // order of the heads' source, so merging heads back (transpose(1, 2).reshape) is free too.
  const Tensor qc = detail::heads_in_place(q), kc = detail::heads_in_place(k), vc = detail::heads_in_place(v);
  AttentionLayouts lay;
  lay.q = detail::head_layout(qc);
  lay.k = detail::head_layout(kc);
  lay.v = detail::head_layout(vc);
  Tensor out = detail::empty_heads(B, Hq, Tq, D, true, q.dtype(), q.device());  // (B, Hq, Tq, D), rows (B, Tq, Hq)
  lay.out = detail::head_layout(out);
  Tensor lse = Tensor::empty({B, Hq, Tq}, q.dtype(), q.device());
  const bool on_dev = on_device(q);
  if (on_dev) {
    detail::check_device_f32(q, "causal_attention");
    AttentionDims dims{B, Hq, Hkv, Tq, Tk, D};
    dims.layout = lay;
    if (out.numel() > 0)
      backend(q.device())
          .attention_forward(out.data<float>(), lse.data<float>(), qc.data<float>(), kc.data<float>(), vc.data<float>(),
                             dims, static_cast<float>(sc));
  } else {
    detail::dispatch_float(q.dtype(), "causal_attention", [&]<class T>() {
      kernels::cpu::attention_forward<T>(out.data<T>(), lse.data<T>(), qc.data<T>(), kc.data<T>(), vc.data<T>(), B, Hq,
                                         Hkv, Tq, Tk, D, static_cast<T>(sc), lay);
    });
  }
  if (autograd::needs_graph({&q, &k, &v})) {
    autograd::record(
        "causal_attention", out, {q, k, v},
        [qs = qc.detach(), ks = kc.detach(), vs = vc.detach(), os = out.detach(), lse, lay, B, Hq, Hkv, Tq, Tk, D, sc,
         on_dev](const Tensor& g, const std::vector<char>& needs) {
          std::vector<Tensor> grads(3);
          const Device d = qs.device();
          // Each gradient in its input's row order (contiguous for the caller's reshape back).
          if (needs[0]) grads[0] = detail::empty_heads(B, Hq, Tq, D, detail::rows_first(qs), qs.dtype(), d);
          if (needs[1]) grads[1] = detail::empty_heads(B, Hkv, Tk, D, detail::rows_first(ks), ks.dtype(), d);
          if (needs[2]) grads[2] = detail::empty_heads(B, Hkv, Tk, D, detail::rows_first(vs), vs.dtype(), d);
          const Tensor gc = detail::heads_in_place(g);
          AttentionLayouts L = lay;
          L.dout = detail::head_layout(gc);
          if (grads[0].defined()) L.dq = detail::head_layout(grads[0]);
          if (grads[1].defined()) L.dk = detail::head_layout(grads[1]);
          if (grads[2].defined()) L.dv = detail::head_layout(grads[2]);
          if (on_dev) {
            auto ptr = [](const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; };
            AttentionDims dims{B, Hq, Hkv, Tq, Tk, D};
            dims.layout = L;
            // (Tq == 0: the backend writes zero dk, dv, as the cpu kernel does.)
            backend(d).attention_backward(ptr(grads[0]), ptr(grads[1]), ptr(grads[2]), gc.data<float>(),
                                          qs.data<float>(), ks.data<float>(), vs.data<float>(), os.data<float>(),
                                          lse.data<float>(), dims, static_cast<float>(sc));
            return grads;
          }
          detail::dispatch_float(qs.dtype(), "causal_attention backward", [&]<class T>() {
            auto ptr = [](const Tensor& t) { return t.defined() ? t.data<T>() : nullptr; };
            kernels::cpu::attention_backward<T>(ptr(grads[0]), ptr(grads[1]), ptr(grads[2]), gc.data<T>(), qs.data<T>(),
                                                ks.data<T>(), vs.data<T>(), os.data<T>(), lse.data<T>(), B, Hq, Hkv, Tq,
                                                Tk, D, static_cast<T>(sc), L);
          });
          return grads;
        },
        /*strided_grad=*/true);  // g is read in place (heads_in_place) when its rows are contiguous
  }
  return out;
}

}  // namespace moa
