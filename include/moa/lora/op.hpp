// moa/lora/op.hpp: the LoRA product as one autograd op,
//   y = base + scale * (x A^T) B^T,
// computed as two thin matrix products (x A^T is (N, R), R the rank) with the scale and the add
// fused into the second one; B A (Out, In) is never formed. The backward computes only the
// gradients its inputs need.
#pragma once

#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/gemm.hpp"
#include "moa/ops/matmul.hpp"

namespace moa::lora {

namespace detail {

// u_out, when given, receives x A^T (N, R).
inline Tensor lora_add(const Tensor& base, bool reuse_base, const Tensor& x, const Tensor& A, const Tensor& B,
                       double scale, Tensor* u_out = nullptr) {
  MOA_CHECK(base.defined() && x.defined() && A.defined() && B.defined(), ValueError,
            "lora_add: expected defined tensors");
  for (const Tensor* t : {&base, &A, &B}) {
    MOA_CHECK(t->dtype() == x.dtype() && is_floating(x.dtype()), ValueError,
              "lora_add: expected floating tensors of one dtype, got ", dtype_name(x.dtype()), " and ",
              dtype_name(t->dtype()));
    MOA_CHECK(t->device() == x.device(), DeviceError, "lora_add: expected tensors on one device, got ",
              x.device().str(), " and ", t->device().str());
  }
  MOA_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(0) == B.size(1), ShapeError,
            "lora_add: expected A (R, In) and B (Out, R) with one rank R, got A ", shape_str(A.shape()), " and B ",
            shape_str(B.shape()));
  const int64_t R = A.size(0), In = A.size(1), Out = B.size(0);
  MOA_CHECK(x.dim() >= 1 && x.shape().back() == In, ShapeError, "lora_add: expected x (..., ", In, ") for A ",
            shape_str(A.shape()), ", got x ", shape_str(x.shape()));
  Shape out_shape = x.shape();
  out_shape.back() = Out;
  MOA_CHECK(base.shape() == out_shape, ShapeError, "lora_add: expected base of shape ", shape_str(out_shape),
            " for x ", shape_str(x.shape()), " and B ", shape_str(B.shape()), ", got ", shape_str(base.shape()));

  Tensor xc, Ac, Bc, u, out;
  {
    NoGradGuard no_grad;
    xc = x.contiguous().view({-1, In});  // (N, In)
    Ac = A.contiguous();
    Bc = B.contiguous();
    u = ::moa::detail::matmul_forward(xc, Ac.t());  // (N, R)
    out = ::moa::detail::take_or_clone(base, reuse_base);  // (..., Out), accumulated onto below
  }
  const int64_t N = xc.size(0);
  const Device dev = x.device();
  if (on_device(x)) ::moa::detail::check_device_f32(x, "lora_add");
  ::moa::detail::dispatch_float(x.dtype(), "lora_add", [&]<class T>() {
    ::moa::detail::gemm_on<T>(dev, false, true, N, Out, R, static_cast<T>(scale), u.data<T>(), R, Bc.data<T>(), R, T(1),
                          out.data<T>(), Out);
  });
  if (u_out) *u_out = u;
  if (autograd::needs_graph({&base, &x, &A, &B})) {
    autograd::record(
        "lora_add", out, {base, x, A, B},
        [xd = xc.detach(), Ad = Ac.detach(), Bd = Bc.detach(), ud = u.detach(), scale, x_shape = x.shape()](
            const Tensor& g, const std::vector<char>& needs) {
          std::vector<Tensor> r(4);
          const int64_t R = Ad.size(0), In = Ad.size(1), Out = Bd.size(0), N = xd.size(0);
          const Device dev = g.device();
          if (needs[0]) r[0] = g;
          ::moa::detail::dispatch_float(g.dtype(), "lora_add backward", [&]<class T>() {
            const T* pg = g.data<T>();  // (N, Out), contiguous (the engine makes it so)
            const T s = static_cast<T>(scale);
            if (needs[3]) {  // dB (Out, R) = s g^T u
              r[3] = Tensor::empty({Out, R}, g.dtype(), dev);
              ::moa::detail::gemm_on<T>(dev, true, false, Out, R, N, s, pg, Out, ud.data<T>(), R, T(0), r[3].data<T>(), R);
            }
            if (needs[1] || needs[2]) {
              Tensor gu = Tensor::empty({N, R}, g.dtype(), dev);  // d(x A^T) (N, R) = s g B
              ::moa::detail::gemm_on<T>(dev, false, false, N, R, Out, s, pg, Out, Bd.data<T>(), R, T(0), gu.data<T>(), R);
              if (needs[2]) {  // dA (R, In) = gu^T x
                r[2] = Tensor::empty({R, In}, g.dtype(), dev);
                ::moa::detail::gemm_on<T>(dev, true, false, R, In, N, T(1), gu.data<T>(), R, xd.data<T>(), In, T(0),
                                      r[2].data<T>(), In);
              }
              if (needs[1]) {  // dx (N, In) = gu A
                Tensor gx = Tensor::empty({N, In}, g.dtype(), dev);
                ::moa::detail::gemm_on<T>(dev, false, false, N, In, R, T(1), gu.data<T>(), R, Ad.data<T>(), In, T(0),
                                      gx.data<T>(), In);
                r[1] = gx.view(x_shape);
              }
            }
          });
          return r;
        });
  }
  return out;
}

}  // namespace detail

// The adapted layer y = x W^T + b + scale (x A^T) B^T as one autograd op: the products of linear()
// followed by lora_add(), with one gradient for x instead of two for the engine to add: dx = g W,
// then the adapter's (scale g B) A is accumulated onto it by its product (beta 1). x (..., In),
// weight (Out, In), bias (Out) or undefined, A (R, In), B (Out, R) -> (..., Out).
inline Tensor lora_linear(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& A, const Tensor& B,
                          double scale) {
  MOA_CHECK(x.defined() && weight.defined() && A.defined() && B.defined(), ValueError,
            "lora_linear: expected defined x, weight, A and B");
  MOA_CHECK(weight.dim() == 2 && A.dim() == 2 && B.dim() == 2 && A.size(1) == weight.size(1) &&
                B.size(0) == weight.size(0) && A.size(0) == B.size(1),
            ShapeError, "lora_linear: expected weight (Out, In), A (R, ", weight.dim() == 2 ? weight.size(1) : -1,
            ") and B (", weight.dim() == 2 ? weight.size(0) : -1, ", R), got weight ", shape_str(weight.shape()),
            ", A ", shape_str(A.shape()), " and B ", shape_str(B.shape()));
  Tensor out, xc, Ac, Bc, u;
  {
    NoGradGuard no_grad;
    out = linear(x, weight, bias);                          // checks x, weight and bias
    out = detail::lora_add(out, true, x, A, B, scale, &u);  // checks A and B against x and out
  }
  if (!autograd::needs_graph({&x, &weight, &bias, &A, &B})) return out;
  {
    NoGradGuard no_grad;
    xc = x.contiguous().view({-1, A.size(1)});
    Ac = A.contiguous();
    Bc = B.contiguous();
  }
  autograd::record("lora_linear", out, {x, weight, bias, A, B},
                   [xd = xc.detach(), wd = weight.detach(), Ad = Ac.detach(), Bd = Bc.detach(), ud = u.detach(), scale,
                    x_shape = x.shape()](const Tensor& g, const std::vector<char>& needs) {
                     std::vector<Tensor> r(5);
                     const int64_t R = Ad.size(0), In = Ad.size(1), Out = Bd.size(0), N = xd.size(0);
                     const Device dev = g.device();
                     const Tensor g2 = g.view({-1, Out});  // contiguous (the engine makes it so)
                     if (needs[1]) r[1] = ::moa::detail::matmul_forward(g2.transpose(0, 1), xd);  // dW (Out, In)
                     if (needs[2]) r[2] = sum(g2, {0});                                           // db (Out)
                     Tensor dx;
                     if (needs[0]) dx = ::moa::detail::matmul_forward(g2, wd.contiguous());  // (N, In) = g W
                     ::moa::detail::dispatch_float(g.dtype(), "lora_linear backward", [&]<class T>() {
                       const T* pg = g2.data<T>();
                       const T s = static_cast<T>(scale);
                       if (needs[4]) {  // dB (Out, R) = s g^T (x A^T)
                         r[4] = Tensor::empty({Out, R}, g.dtype(), dev);
                         ::moa::detail::gemm_on<T>(dev, true, false, Out, R, N, s, pg, Out, ud.data<T>(), R, T(0),
                                                   r[4].data<T>(), R);
                       }
                       if (needs[0] || needs[3]) {
                         Tensor gu = Tensor::empty({N, R}, g.dtype(), dev);  // d(x A^T) (N, R) = s g B
                         ::moa::detail::gemm_on<T>(dev, false, false, N, R, Out, s, pg, Out, Bd.data<T>(), R, T(0),
                                                   gu.data<T>(), R);
                         if (needs[3]) {  // dA (R, In) = gu^T x
                           r[3] = Tensor::empty({R, In}, g.dtype(), dev);
                           ::moa::detail::gemm_on<T>(dev, true, false, R, In, N, T(1), gu.data<T>(), R, xd.data<T>(),
                                                     In, T(0), r[3].data<T>(), In);
                         }
                         if (needs[0])  // dx += gu A
                           ::moa::detail::gemm_on<T>(dev, false, false, N, In, R, T(1), gu.data<T>(), R, Ad.data<T>(),
                                                     In, T(1), dx.data<T>(), In);
                       }
                     });
                     if (needs[0]) r[0] = dx.view(x_shape);
                     return r;
                   });
  return out;
}

// x (..., In), base (..., Out), A (R, In), B (Out, R) -> (..., Out).
inline Tensor lora_add(const Tensor& base, const Tensor& x, const Tensor& A, const Tensor& B, double scale) {
  return detail::lora_add(base, false, x, A, B, scale);
}
// The same with base handed over (an rvalue): its memory holds the result when nothing else shares it.
inline Tensor lora_add(Tensor&& base, const Tensor& x, const Tensor& A, const Tensor& B, double scale) {
  return detail::lora_add(base, true, x, A, B, scale);
}

}  // namespace moa::lora
