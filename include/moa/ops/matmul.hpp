// moa/ops/matmul.hpp: matrix products: matmul (batched, broadcasting, transposed views read in
// place) and linear (x W^T + b, the layer product), each with a backward that computes only the
// gradients its inputs need (a frozen weight costs no weight-gradient product).
#pragma once

#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/autograd/node.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/gemm.hpp"
#include "moa/ops/reduce.hpp"

namespace moa {

namespace detail {

// How a rank >= 2 tensor is read as a stack of matrices: op(M) = trans ? M^T : M, row stride ld.
struct MatrixOperand {
  Tensor t;           // the tensor read (the input itself, or a contiguous copy)
  bool trans = false;
  int64_t ld = 0;
};

// Reads the last two axes in place when one of them has unit stride; otherwise copies.
inline MatrixOperand matrix_operand(const Tensor& x) {
  const int64_t r = x.dim(), rows = x.shape()[r - 2], cols = x.shape()[r - 1];
  const int64_t s_row = x.strides()[r - 2], s_col = x.strides()[r - 1];
  if ((s_col == 1 || cols == 1) && s_row >= cols && s_row > 0) return {x, false, s_row};
  if ((s_row == 1 || rows == 1) && s_col >= rows && s_col > 0) return {x, true, s_col};
  if (cols <= 1 && rows <= 1) return {x, false, 1};
  Tensor c = x.contiguous();
  return {c, false, cols > 0 ? cols : 1};
}

// C (contiguous [batch..., M, N]) = op(A) op(B) for every broadcast batch index.
template <class T>
void batched_gemm(const MatrixOperand& a, const MatrixOperand& b, Tensor& c, const Shape& batch, int64_t M,
                  int64_t N, int64_t K) {
  const int64_t nb = numel_of(batch);
  const int64_t ra = a.t.dim(), rb = b.t.dim();
  const Shape a_batch(a.t.shape().begin(), a.t.shape().end() - 2);
  const Shape b_batch(b.t.shape().begin(), b.t.shape().end() - 2);
  const Strides sa = broadcast_strides(a_batch, Strides(a.t.strides().begin(), a.t.strides().begin() + (ra - 2)), batch);
  const Strides sb = broadcast_strides(b_batch, Strides(b.t.strides().begin(), b.t.strides().begin() + (rb - 2)), batch);
  const T* pa = static_cast<const T*>(a.t.data_ptr());
  const T* pb = static_cast<const T*>(b.t.data_ptr());
  T* pc = c.data<T>();
  // Uniform batch strides (the usual [B*H, T, D] case) go to one batched call.
  auto uniform = [&](const Strides& s, int64_t& step) {
    step = 0;
    bool first = true;
    for (std::size_t i = batch.size(); i-- > 0;) {
      if (batch[i] == 1) continue;
      if (first) {
        step = s[i];
        first = false;
      }
      int64_t inner = 1;
      for (std::size_t j = i + 1; j < batch.size(); ++j) inner *= batch[j];
      if (s[i] != step * inner) return false;
    }
    return true;
  };
  // Element offsets of A and B for batch index i (row-major over `batch`).
  auto batch_offsets = [&](int64_t i) {
    int64_t oa = 0, ob = 0, rem = i;
    for (std::size_t d = batch.size(); d-- > 0;) {
      const int64_t k = rem % batch[d];
      rem /= batch[d];
      oa += k * sa[d];
      ob += k * sb[d];
    }
    return std::pair<int64_t, int64_t>{oa, ob};
  };
  int64_t step_a = 0, step_b = 0;
  if (on_device(c)) {  // one strided-batched product when the batch strides are uniform, else one per batch
    DeviceBackend& dev = backend(c.device());
    const MatmulPrecision prec = matmul_precision();
    if (nb == 0 || M == 0 || N == 0) return;
    if (uniform(sa, step_a) && uniform(sb, step_b)) {
      dev.gemm(a.trans, b.trans, nb, M, N, K, 1.0f, reinterpret_cast<const float*>(pa), a.ld, step_a,
               reinterpret_cast<const float*>(pb), b.ld, step_b, 0.0f, reinterpret_cast<float*>(pc), N, M * N, prec);
      return;
    }
    for (int64_t i = 0; i < nb; ++i) {
      const auto [oa, ob] = batch_offsets(i);
      dev.gemm(a.trans, b.trans, 1, M, N, K, 1.0f, reinterpret_cast<const float*>(pa + oa), a.ld, 0,
               reinterpret_cast<const float*>(pb + ob), b.ld, 0, 0.0f, reinterpret_cast<float*>(pc + i * M * N), N, 0,
               prec);
    }
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (uniform(sa, step_a) && uniform(sb, step_b)) {
      kernels::cpu::sgemm_batched(a.trans, b.trans, nb, M, N, K, 1.0f, pa, a.ld, step_a, pb, b.ld, step_b, 0.0f, pc,
                                  N, M * N);
      return;
    }
  }
  for (int64_t i = 0; i < nb; ++i) {
    const auto [oa, ob] = batch_offsets(i);
    kernels::cpu::gemm<T>(a.trans, b.trans, M, N, K, T(1), pa + oa, a.ld, pb + ob, b.ld, T(0), pc + i * M * N, N);
  }
}

// One product C = alpha op(A) op(B) + beta C on the host or on `dev` (pointers of that device).
template <class T>
void gemm_on(Device dev, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (dev.type == DeviceType::cpu) {
    kernels::cpu::gemm<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (M > 0 && N > 0)
      backend(dev).gemm(ta, tb, 1, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, matmul_precision());
  } else {
    throw ValueError(cat("gemm: expected f32 on ", dev.str()));
  }
}

inline void check_matmul_inputs(const Tensor& a, const Tensor& b, const char* op) {
  MOA_CHECK(a.defined() && b.defined(), ValueError, op, ": expected two defined tensors");
  MOA_CHECK(a.dtype() == b.dtype() && is_floating(a.dtype()), ValueError, op,
            ": expected floating operands of one dtype, got ", dtype_name(a.dtype()), " and ", dtype_name(b.dtype()));
  MOA_CHECK(a.device() == b.device(), DeviceError, op, ": expected tensors on one device, got ", a.device().str(),
            " and ", b.device().str());
  if (on_device(a)) check_device_f32(a, op);
}

// The product without autograd.
inline Tensor matmul_forward(const Tensor& a, const Tensor& b) {
  const int64_t K = a.shape().back(), M = a.shape()[a.dim() - 2], N = b.shape().back();
  if (b.dim() == 2 && a.dim() > 2 && a.is_contiguous()) {
    // [..., M, K] x [K, N]: one product with the batch folded into the rows.
    Shape out_shape = a.shape();
    out_shape.back() = N;
    Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
    const MatrixOperand a2{a.view({numel_of(Shape(a.shape().begin(), a.shape().end() - 1)), K}), false, K > 0 ? K : 1};
    const MatrixOperand b2 = matrix_operand(b);
    dispatch_float(a.dtype(), "matmul", [&]<class T>() {
      Tensor o2 = out.view({numel_of(Shape(out_shape.begin(), out_shape.end() - 1)), N});
      const int64_t rows = numel_of(Shape(a.shape().begin(), a.shape().end() - 1));
      batched_gemm<T>(a2, b2, o2, {}, rows, N, K);
    });
    return out;
  }
  const Shape a_batch(a.shape().begin(), a.shape().end() - 2);
  const Shape b_batch(b.shape().begin(), b.shape().end() - 2);
  const Shape batch = broadcast_shapes(a_batch, b_batch, "matmul");
  Shape out_shape = batch;
  out_shape.push_back(M);
  out_shape.push_back(N);
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  const MatrixOperand ma = matrix_operand(a), mb = matrix_operand(b);
  dispatch_float(a.dtype(), "matmul", [&]<class T>() { batched_gemm<T>(ma, mb, out, batch, M, N, K); });
  return out;
}

}  // namespace detail

// a [..., M, K] @ b [..., K, N] -> [..., M, N]; batch axes broadcast. Transposed views
// (x.transpose(-2, -1)) are read in place, without a copy.
inline Tensor matmul(const Tensor& a, const Tensor& b) {
  detail::check_matmul_inputs(a, b, "matmul");
  MOA_CHECK(a.dim() >= 2 && b.dim() >= 2, ShapeError, "matmul: expected A [..., M, K] and B [..., K, N] of rank >= 2, got A ",
            shape_str(a.shape()), " and B ", shape_str(b.shape()));
  MOA_CHECK(a.shape().back() == b.shape()[b.dim() - 2], ShapeError,
            "matmul: expected A [..., M, K] and B [..., K, N] with equal K, got A ", shape_str(a.shape()), " and B ",
            shape_str(b.shape()));
  Tensor out;
  {
    NoGradGuard no_grad;
    out = detail::matmul_forward(a, b);
  }
  if (autograd::needs_graph({&a, &b})) {
    autograd::record("matmul", out, {a, b},
                     [ad = a.detach(), bd = b.detach()](const Tensor& g, const std::vector<char>& needs) {
                       std::vector<Tensor> r(2);
                       if (needs[0]) r[0] = sum_to(detail::matmul_forward(g, bd.transpose(-2, -1)), ad.shape());
                       if (needs[1]) {
                         if (bd.dim() == 2 && ad.dim() > 2) {  // sum over the folded batch in one product
                           const int64_t K = ad.shape().back(), N = g.shape().back();
                           r[1] = detail::matmul_forward(ad.reshape({-1, K}).transpose(0, 1), g.reshape({-1, N}));
                         } else {
                           r[1] = sum_to(detail::matmul_forward(ad.transpose(-2, -1), g), bd.shape());
                         }
                       }
                       return r;
                     });
  }
  return out;
}

// The layer product y = x W^T + b: x [..., In], weight [Out, In], bias [Out] (may be undefined).
inline Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor()) {
  detail::check_matmul_inputs(x, weight, "linear");
  MOA_CHECK(weight.dim() == 2, ShapeError, "linear: expected weight [Out, In], got ", shape_str(weight.shape()));
  MOA_CHECK(x.dim() >= 1 && x.shape().back() == weight.shape()[1], ShapeError, "linear: expected x [..., ",
            weight.shape()[1], "] for weight ", shape_str(weight.shape()), ", got x ", shape_str(x.shape()));
  const int64_t in = weight.shape()[1], out_f = weight.shape()[0];
  if (bias.defined()) {
    detail::check_matmul_inputs(x, bias, "linear");
    MOA_CHECK(bias.dim() == 1 && bias.shape()[0] == out_f, ShapeError, "linear: expected bias of shape [", out_f,
              "], got ", shape_str(bias.shape()));
  }
  Shape out_shape = x.shape();
  out_shape.back() = out_f;
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());
  Tensor x2, w;
  {
    NoGradGuard no_grad;
    x2 = x.reshape({-1, in});
    w = weight.contiguous();
  }
  const int64_t rows = x2.shape()[0];
  const detail::MatrixOperand mx = detail::matrix_operand(x2);
  if (on_device(x)) {
    if (rows > 0 && out_f > 0) {
      DeviceBackend& dev = backend(x.device());
      const float* px = static_cast<const float*>(mx.t.data_ptr());
      if (bias.defined()) {  // one biased product (a fused epilogue where the backend has one)
        const Tensor bc = bias.contiguous();
        dev.gemm_bias(mx.trans, true, rows, out_f, in, px, mx.ld, w.data<float>(), in, bc.data<float>(),
                      out.data<float>(), out_f, matmul_precision());
      } else {
        dev.gemm(mx.trans, true, 1, rows, out_f, in, 1.0f, px, mx.ld, 0, w.data<float>(), in, 0, 0.0f,
                 out.data<float>(), out_f, 0, matmul_precision());
      }
    }
  } else
  detail::dispatch_float(x.dtype(), "linear", [&]<class T>() {
    T* o = out.data<T>();
    T beta = T(0);
    if (bias.defined()) {  // prefill rows with the bias; the product accumulates onto it
      const Tensor bc = bias.contiguous();
      const T* pb = bc.data<T>();
      detail::parallel_for(rows, out_f, [&](int64_t s, int64_t e) {
        for (int64_t r = s; r < e; ++r)
          for (int64_t j = 0; j < out_f; ++j) o[r * out_f + j] = pb[j];
      });
      beta = T(1);
    }
    kernels::cpu::gemm<T>(mx.trans, true, rows, out_f, in, T(1), static_cast<const T*>(mx.t.data_ptr()), mx.ld,
                          w.data<T>(), in, beta, o, out_f);
  });
  if (autograd::needs_graph({&x, &weight, &bias})) {
    autograd::record("linear", out, {x, weight, bias},
                     [xd = x.detach(), wd = weight.detach()](const Tensor& g, const std::vector<char>& needs) {
                       std::vector<Tensor> r(3);
                       const int64_t in = wd.shape()[1], out_f = wd.shape()[0];
                       const Tensor g2 = g.view({-1, out_f});
                       if (needs[0]) r[0] = detail::matmul_forward(g2, wd).view(xd.shape());       // (N, In)
                       if (needs[1]) r[1] = detail::matmul_forward(g2.transpose(0, 1), xd.reshape({-1, in}));  // (Out, In)
                       if (needs[2]) r[2] = sum(g2, {0});                                            // (Out)
                       return r;
                     });
  }
  return out;
}

}  // namespace moa
