// moa/ops/linear_loss.hpp: a language model's head and loss in one op,
//   linear_cross_entropy(x, W, targets) = cross_entropy(linear(x, W), targets),
// without the (N, V) logits. For GPT-2 at 16 x 512 tokens those are 8192 x 50257 floats, 1.6 GB,
// written by the head's product and read back by the loss, and as many again for their gradient.
//
// The rows run in chunks. Each chunk's logits go to one reused buffer (on a device about 32 MB by
// default: small enough to stay in the GPU's L2 cache between the kernels that use it). The chunk's loss is
// formed there, and then, when a gradient is wanted, the logit gradient in the same buffer. From it
// come the chunk's rows of dx = dlogits W and its part of dW += dlogits^T x. So the gradients are
// formed in the forward (as Liger-Kernel's fused linear cross-entropy does); backward only scales
// them by the upstream gradient.
#pragma once

#include <algorithm>
#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/autograd/node.hpp"
#include "moa/core/parallel.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/cross_entropy.hpp"
#include "moa/ops/elementwise.hpp"
#include "moa/ops/loss.hpp"
#include "moa/ops/matmul.hpp"
#include "moa/ops/reduce.hpp"

namespace moa {

namespace detail {

// t *= s in place: t contiguous, s one element of t's dtype on t's device.
inline void scale_by_scalar(Tensor& t, const Tensor& s) {
  if (t.numel() == 0) return;
  if (on_device(t)) {
    backend(t.device())
        .binary(BinaryOp::mul, t.data<float>(), t.shape(), t.data<float>(), t.strides(), s.data<float>(),
                Strides(static_cast<std::size_t>(t.dim()), 0));
    return;
  }
  dispatch_float(t.dtype(), "linear_cross_entropy backward", [&]<class T>() {
    T* p = t.data<T>();
    const T v = s.data<T>()[0];
    parallel_for(t.numel(), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) p[i] *= v;
    });
  });
}

}  // namespace detail

// The default chunk, at least one row: on a device about 2^23 logits (32 MB in f32, what an H100's
// or H200's L2 cache holds); on the cpu about 2^26 (256 MB in f32), since its products slow down on
// thin chunks: each chunk packs the whole weight again, and dW is read and written once per chunk.
inline int64_t linear_cross_entropy_chunk_rows(int64_t V, Device dev = Device::cpu()) {
  const int64_t logits = int64_t{1} << (dev.type == DeviceType::cpu ? 26 : 23);
  return std::max<int64_t>(1, logits / V);
}

// x (..., C) f32/f64, weight (V, C), targets (...) i32 with each in [0, V) or == ignore_index.
// Returns a scalar: the mean of -log_softmax(x W^T)[target] over the non-ignored rows (0 when none),
// as cross_entropy(linear(x, weight), targets, ignore_index). chunk_rows: rows per chunk (0: the
// default above). With x or weight needing a gradient the forward also forms the gradients (dx the
// size of x, dW the size of weight), at about twice the forward's cost again, and holds them until
// backward or until the graph is dropped; no (N, V) buffer is ever held. (A loss computed only to be
// read, under grad mode, therefore costs a backward's products: use NoGradGuard.)
inline Tensor linear_cross_entropy(const Tensor& x, const Tensor& weight, const Tensor& targets,
                                   int32_t ignore_index = -100, int64_t chunk_rows = 0) {
  MOA_CHECK(x.defined() && weight.defined() && targets.defined(), ValueError,
            "linear_cross_entropy: expected defined x, weight and targets");
  detail::check_matmul_inputs(x, weight, "linear_cross_entropy");
  MOA_CHECK(weight.dim() == 2 && x.dim() >= 2 && x.shape().back() == weight.size(1) && weight.size(0) >= 1, ShapeError,
            "linear_cross_entropy: expected x (..., C) with a batch dimension and weight (V, C), V >= 1, got x ",
            shape_str(x.shape()), " and weight ", shape_str(weight.shape()));
  MOA_CHECK(chunk_rows >= 0, ValueError, "linear_cross_entropy: expected chunk_rows >= 0 (0: default), got ",
            chunk_rows);
  MOA_CHECK(!on_device(targets) || targets.device() == x.device(), DeviceError,
            "linear_cross_entropy: expected targets on the cpu or on x's device ", x.device().str(), ", got ",
            targets.device().str());
  const int64_t V = weight.size(0), C = weight.size(1);
  const Shape rows(x.shape().begin(), x.shape().end() - 1);
  Shape logits_shape = rows;
  logits_shape.push_back(V);
  const Tensor tc = detail::checked_targets(logits_shape, targets, ignore_index, "linear_cross_entropy");
  const int32_t* t = tc.data<int32_t>();
  const int64_t N = numel_of(rows);
  const int64_t chunk =
      std::min(std::max<int64_t>(N, 1), chunk_rows > 0 ? chunk_rows : linear_cross_entropy_chunk_rows(V, x.device()));
  const int64_t chunks = (N + chunk - 1) / chunk;
  int64_t count = 0;
  std::vector<int64_t> chunk_count(static_cast<std::size_t>(chunks), 0);
  for (int64_t n = 0; n < N; ++n)
    if (t[n] != ignore_index) {
      ++chunk_count[static_cast<std::size_t>(n / chunk)];
      ++count;
    }

  const Device dev = x.device();
  const DType dt = x.dtype();
  const bool need_x = autograd::needs_graph({&x}), need_w = autograd::needs_graph({&weight});
  Tensor xc, wc, dx, dw, out;
  {
    NoGradGuard no_grad;
    xc = x.contiguous().view({N, C});
    wc = weight.contiguous();
  }
  if (need_x) dx = Tensor::empty({N, C}, dt, dev);
  if (need_w) dw = N > 0 ? Tensor::empty({V, C}, dt, dev) : Tensor::zeros({V, C}, dt, dev);  // written by chunk 0
  Tensor buf = Tensor::empty({std::min(chunk, N), V}, dt, dev);  // one chunk's logits, then their gradient

  if (on_device(x)) {
    // Per chunk: the logits' product, one kernel for the rows' losses and the logit gradient in
    // place (both scaled by 1 / count, known here), and the gradients' products. The loss is the
    // sum of the rows' losses, taken once at the end.
    DeviceBackend& be = backend(dev);
    const Tensor td = on_device(targets) ? targets.detach().contiguous() : tc.to(dev);
    Tensor row_loss = Tensor::empty({N}, DType::f32, dev);
    const float inv_count = count ? static_cast<float>(1.0 / static_cast<double>(count)) : 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = c * chunk, nc = std::min(chunk, N - r0);
      const float* xr = xc.data<float>() + r0 * C;
      float* pb = buf.data<float>();
      detail::gemm_on<float>(dev, false, true, nc, V, C, 1.f, xr, C, wc.data<float>(), C, 0.f, pb, V);
      be.cross_entropy_rows(row_loss.data<float>() + r0, need_x || need_w ? pb : nullptr, pb, td.data<int32_t>() + r0,
                            nc, V, ignore_index, inv_count);
      if (need_x)
        detail::gemm_on<float>(dev, false, false, nc, C, V, 1.f, pb, V, wc.data<float>(), C, 0.f,
                               dx.data<float>() + r0 * C, C);
      if (need_w)
        detail::gemm_on<float>(dev, true, false, V, C, nc, 1.f, pb, V, xr, C, c == 0 ? 0.f : 1.f, dw.data<float>(), C);
    }
    NoGradGuard no_grad;
    out = N > 0 ? sum(row_loss) : Tensor::zeros({}, dt, dev);
  } else {
    // Each chunk's weight in the mean: count_c / count. The cpu kernels' logit gradient of a chunk
    // with weight w_c is (softmax - onehot) * w_c / count_c = (softmax - onehot) / count.
    std::vector<double> share(static_cast<std::size_t>(chunks), 0.0);
    for (int64_t c = 0; c < chunks; ++c)
      share[c] = count ? static_cast<double>(chunk_count[c]) / static_cast<double>(count) : 0.0;
    const Tensor lse = Tensor::empty({std::min(chunk, N)}, dt);
    double total = 0;
    detail::dispatch_float(dt, "linear_cross_entropy", [&]<class T>() {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t r0 = c * chunk, nc = std::min(chunk, N - r0);
        const T* xr = xc.data<T>() + r0 * C;
        T* pb = buf.data<T>();
        kernels::cpu::gemm<T>(false, true, nc, V, C, T(1), xr, C, wc.data<T>(), C, T(0), pb, V);
        total += static_cast<double>(
                     kernels::cpu::cross_entropy_forward<T>(lse.data<T>(), pb, t + r0, nc, V, ignore_index)) *
                 share[c];
        if (!need_x && !need_w) continue;
        kernels::cpu::cross_entropy_backward<T>(pb, static_cast<T>(share[c]), pb, lse.data<T>(), t + r0, nc, V,
                                                ignore_index);
        if (need_x)
          kernels::cpu::gemm<T>(false, false, nc, C, V, T(1), pb, V, wc.data<T>(), C, T(0), dx.data<T>() + r0 * C, C);
        if (need_w)
          kernels::cpu::gemm<T>(true, false, V, C, nc, T(1), pb, V, xr, C, c == 0 ? T(0) : T(1), dw.data<T>(), C);
      }
    });
    out = Tensor::full({}, total, dt);
  }
  if (need_x || need_w)
    autograd::record(
        "linear_cross_entropy", out, {x, weight},
        [dx, dw, x_shape = x.shape(), dev, dt, handed = false](const Tensor& g,
                                                               const std::vector<char>& needs) mutable {
          MOA_CHECK(!handed, AutogradError,
                    "backward: linear_cross_entropy already handed its gradients to an earlier "
                    "backward() (one that failed later on); pass retain_graph = true to go through it "
                    "twice");
          MOA_CHECK(g.numel() == 1 && g.dtype() == dt && g.device() == dev, DeviceError,
                    "linear_cross_entropy backward: expected one ", dtype_name(dt), " value on ", dev.str(),
                    " as the upstream gradient, got ", shape_str(g.shape()), " ", dtype_name(g.dtype()), " on ",
                    g.device().str());
          MOA_CHECK((!needs[0] || dx.defined()) && (!needs[1] || dw.defined()), AutogradError,
                    "linear_cross_entropy backward: asked for a gradient its forward did not form");
          // The gradients were formed for dloss = 1. Scaled by the upstream gradient
          // here: in place and handed over, or, when the graph is retained (it may be
          // gone through again), into new tensors. Not scaled when that is 1 on the host.
          const bool keep = autograd::retaining_graph();
          const bool one = !on_device(g) && g.item<double>() == 1.0;
          if (!keep) handed = true;  // from here on, whatever happens
          auto give = [&](Tensor& grad) -> Tensor {
            if (keep) return one ? grad : mul(grad, g);
            if (!one) detail::scale_by_scalar(grad, g);
            return std::move(grad);
          };
          std::vector<Tensor> r(2);
          if (needs[0]) r[0] = give(dx).view(x_shape);
          if (needs[1]) r[1] = give(dw);
          if (!keep) dx = dw = Tensor();
          return r;
        });
  return out;
}

}  // namespace moa
