// tests/unit/mock_device.hpp: a stand-in "GPU" for machines without one, so that every op's device
// path, the host <-> device copies and the device-aware modules, optimisers and trainers are tested
// on any machine (CI has no GPU).
//
// MockDevice implements moa::DeviceBackend with the host's kernels, but hands out device pointers
// that the host cannot dereference: each is the real host address plus 2^62, a non-canonical x86-64
// address, so any code that reads or writes "device" memory from the host (instead of going through
// the backend) crashes the test at once. Only the backend's own methods translate them back.
// Registered as DeviceType::cuda by MockDeviceScope for the scope of a test (the previous backend is
// restored after; declare the scope before any tensor of the test). The real CUDA backend runs the
// same suite in tests/cuda on a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moa/moa.hpp"

namespace moa::testing {

class MockDevice final : public DeviceBackend {
 public:
  static constexpr std::uintptr_t kTag = std::uintptr_t{1} << 62;

  template <class T>
  static T* host(T* p) {
    return p ? reinterpret_cast<T*>(reinterpret_cast<std::uintptr_t>(p) - kTag) : nullptr;
  }
  template <class T>
  static T* tagged(T* p) {
    return reinterpret_cast<T*>(reinterpret_cast<std::uintptr_t>(p) + kTag);
  }

  std::string name() const override { return "mock"; }
  int device_count() const override { return 1; }
  void synchronize(int) override {}

  void* allocate(std::size_t nbytes, int) override {
    ++mallocs_;
    void* p = ::operator new(nbytes == 0 ? 64 : nbytes, std::align_val_t(64));
    return tagged(p);
  }
  void release(void* p, std::size_t, int) noexcept override { ::operator delete(host(p), std::align_val_t(64)); }
  void empty_cache(int) override {}
  std::int64_t device_malloc_count(int) const override { return mallocs_; }
  void copy_to_device(void* dst, const void* src, std::size_t n, int) override {
    ++uploads;
    if (n) std::memcpy(host(dst), src, n);
  }
  void copy_to_host(void* dst, const void* src, std::size_t n, int) override {
    ++downloads;
    if (n) std::memcpy(dst, host(src), n);
  }
  void copy_device(void* dst, const void* src, std::size_t n, int) override {
    if (n) std::memcpy(host(dst), host(src), n);
  }

  // ---- layout ----------------------------------------------------------------------------------
  static double load(DType t, const void* p, int64_t i) {
    switch (t) {
      case DType::f32: return static_cast<const float*>(p)[i];
      case DType::i32: return static_cast<const std::int32_t*>(p)[i];
      case DType::bf16: return bf16_bits_to_f32(static_cast<const std::uint16_t*>(p)[i]);
      default: throw DeviceError("mock: dtype not on the device");
    }
  }
  static void store(DType t, void* p, int64_t i, double v) {
    switch (t) {
      case DType::f32: static_cast<float*>(p)[i] = static_cast<float>(v); return;
      case DType::i32: static_cast<std::int32_t*>(p)[i] = convert_value<std::int32_t>(v); return;
      case DType::bf16: static_cast<std::uint16_t*>(p)[i] = f32_to_bf16_bits(static_cast<float>(v)); return;
      default: throw DeviceError("mock: dtype not on the device");
    }
  }
  // Calls f(offset_0, offset_1, ...) for every index of `shape` (row-major order).
  template <class F>
  static void each(const Shape& shape, const std::vector<const Strides*>& st, F&& f) {
    const int64_t n = numel_of(shape);
    const std::size_t r = shape.size();
    std::vector<int64_t> idx(r, 0), off(st.size(), 0);
    for (int64_t i = 0; i < n; ++i) {
      f(off);
      for (std::size_t d = r; d-- > 0;) {
        ++idx[d];
        for (std::size_t k = 0; k < st.size(); ++k) off[k] += (*st[k])[d];
        if (idx[d] < shape[d]) break;
        for (std::size_t k = 0; k < st.size(); ++k) off[k] -= (*st[k])[d] * shape[d];
        idx[d] = 0;
      }
    }
  }
  void fill(DType t, void* dst, const Shape& shape, const Strides& strides, double value) override {
    void* d = host(dst);
    each(shape, {&strides}, [&](const std::vector<int64_t>& o) { store(t, d, o[0], value); });
  }
  void copy_strided(DType dt, void* dst, const Strides& ds, DType st, const void* src, const Strides& ss,
                    const Shape& shape) override {
    MOA_CHECK(static_cast<int>(shape.size()) <= kMaxDeviceRank, ShapeError, "mock copy_strided: rank ", shape.size());
    void* d = host(dst);
    const void* s = host(src);
    each(shape, {&ds, &ss}, [&](const std::vector<int64_t>& o) { store(dt, d, o[0], load(st, s, o[1])); });
  }
  void take(float* out, const float* x, const int32_t* offsets, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) host(out)[i] = host(x)[host(offsets)[i]];
  }
  void put_add(float* out, const int32_t* offsets, const float* src, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) host(out)[host(offsets)[i]] += host(src)[i];
  }

  // ---- elementwise -------------------------------------------------------------------------------
  void binary(BinaryOp op, float* out, const Shape& shape, const float* a, const Strides& sa, const float* b,
              const Strides& sb) override {
    ++kernel_calls;
    float* o = host(out);
    const float* pa = host(a);
    const float* pb = host(b);
    const Strides so = contiguous_strides(shape);
    each(shape, {&so, &sa, &sb}, [&](const std::vector<int64_t>& f) {
      const float x = pa[f[1]], y = pb[f[2]];
      o[f[0]] = op == BinaryOp::add ? x + y : op == BinaryOp::sub ? x - y : op == BinaryOp::mul ? x * y : x / y;
    });
  }
  static float apply(UnaryOp op, double p, float v) {
    switch (op) {
      case UnaryOp::scale: return static_cast<float>(v * p);
      case UnaryOp::shift: return static_cast<float>(v + p);
      case UnaryOp::neg: return -v;
      case UnaryOp::exp: return std::exp(v);
      case UnaryOp::log: return std::log(v);
      case UnaryOp::sqrt: return std::sqrt(v);
      case UnaryOp::tanh: return std::tanh(v);
      case UnaryOp::pow: return static_cast<float>(std::pow(v, p));
      case UnaryOp::relu: return v > 0 ? v : 0.f;
      case UnaryOp::gelu: return kernels::reference::gelu(v);
      case UnaryOp::silu: return kernels::reference::silu(v);
    }
    return 0;
  }
  static double derivative(UnaryOp op, double p, float v, float y) {
    switch (op) {
      case UnaryOp::scale: return p;
      case UnaryOp::shift: return 1.0;
      case UnaryOp::neg: return -1.0;
      case UnaryOp::exp: return y;
      case UnaryOp::log: return 1 / v;
      case UnaryOp::sqrt: return 1 / (2 * y);
      case UnaryOp::tanh: return 1 - y * y;
      case UnaryOp::pow: return p * std::pow(v, p - 1);
      case UnaryOp::relu: return v > 0 ? 1.0 : 0.0;
      case UnaryOp::gelu: return kernels::reference::gelu_grad(v);
      case UnaryOp::silu: return kernels::reference::silu_grad(v);
    }
    return 0;
  }
  void unary(UnaryOp op, double p, float* y, const float* x, int64_t n) override {
    ++kernel_calls;
    for (int64_t i = 0; i < n; ++i) host(y)[i] = apply(op, p, host(x)[i]);
  }
  void unary_backward(UnaryOp op, double p, float* gx, const float* g, const float* x, const float* y,
                      int64_t n) override {
    for (int64_t i = 0; i < n; ++i)
      host(gx)[i] = host(g)[i] * static_cast<float>(derivative(op, p, host(x)[i], host(y)[i]));
  }
  void sum_rows(float* out, const float* x, int64_t rows, int64_t cols, double scale) override {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0;
      for (int64_t c = 0; c < cols; ++c) acc += host(x)[r * cols + c];
      host(out)[r] = static_cast<float>(acc * scale);
    }
  }
  double sum_squares_all(const std::vector<std::pair<const float*, int64_t>>& buffers) override {
    double s = 0;
    for (const auto& [x, n] : buffers)
      for (int64_t i = 0; i < n; ++i) s += static_cast<double>(host(x)[i]) * host(x)[i];
    return s;
  }

  // ---- products and fused kernels: the cpu's -------------------------------------------------------
  void gemm(bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            int64_t sa, const float* B, int64_t ldb, int64_t sb, float beta, float* C, int64_t ldc, int64_t sc,
            MatmulPrecision) override {
    ++kernel_calls;
    for (int64_t b = 0; b < batch; ++b)
      kernels::cpu::gemm<float>(ta, tb, M, N, K, alpha, host(A) + b * sa, lda, host(B) + b * sb, ldb, beta,
                                host(C) + b * sc, ldc);
  }
  void softmax_forward(bool log, float* y, const float* x, int64_t N, int64_t C) override {
    if (log)
      kernels::cpu::log_softmax_forward<float>(host(y), host(x), N, C);
    else
      kernels::cpu::softmax_forward<float>(host(y), host(x), N, C);
  }
  void softmax_backward(bool log, float* dx, const float* dy, const float* y, int64_t N, int64_t C) override {
    if (log)
      kernels::cpu::log_softmax_backward<float>(host(dx), host(dy), host(y), N, C);
    else
      kernels::cpu::softmax_backward<float>(host(dx), host(dy), host(y), N, C);
  }
  void cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* t, int64_t N, int64_t V,
                             int32_t ignore) override {
    host(loss)[0] = kernels::cpu::cross_entropy_forward<float>(host(lse), host(logits), host(t), N, V, ignore);
  }
  void cross_entropy_backward(float* dlogits, const float* dloss, const float* logits, const float* lse,
                              const int32_t* t, int64_t N, int64_t V, int32_t ignore) override {
    kernels::cpu::cross_entropy_backward<float>(host(dlogits), host(dloss)[0], host(logits), host(lse), host(t), N, V,
                                                ignore);
  }
  void cross_entropy_rows(float* loss_rows, float* dlogits, const float* logits, const int32_t* t, int64_t N, int64_t V,
                          int32_t ignore, float scale) override {
    for (int64_t n = 0; n < N; ++n) {  // one row at a time through the cpu kernels (count 1 or 0)
      float lse = 0;
      host(loss_rows)[n] =
          scale * kernels::cpu::cross_entropy_forward<float>(&lse, host(logits) + n * V, host(t) + n, 1, V, ignore);
      if (dlogits)
        kernels::cpu::cross_entropy_backward<float>(host(dlogits) + n * V, scale, host(logits) + n * V, &lse,
                                                    host(t) + n, 1, V, ignore);
    }
  }
  void layer_norm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                          int64_t N, int64_t C, float eps) override {
    kernels::cpu::layer_norm_forward<float>(host(out), host(mean), host(rstd), host(x), host(w), host(b), N, C, eps);
  }
  void layer_norm_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w,
                           const float* mean, const float* rstd, int64_t N, int64_t C) override {
    kernels::cpu::layer_norm_backward<float>(host(dx), host(dw), host(db), host(dout), host(x), host(w), host(mean),
                                             host(rstd), N, C);
  }
  void rms_norm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C,
                        float eps) override {
    kernels::cpu::rms_norm_forward<float>(host(out), host(rstd), host(x), host(w), N, C, eps);
  }
  void rms_norm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                         int64_t N, int64_t C) override {
    kernels::cpu::rms_norm_backward<float>(host(dx), host(dw), host(dout), host(x), host(w), host(rstd), N, C);
  }
  void embedding_forward(float* out, const int32_t* ids, const float* w, int64_t N, int64_t C) override {
    kernels::cpu::embedding_forward<float>(host(out), host(ids), host(w), N, C);
  }
  void embedding_backward(float* dw, const float* dout, const int32_t* ids, int64_t N, int64_t C) override {
    kernels::cpu::embedding_backward<float>(host(dw), host(dout), host(ids), N, C);
  }
  void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                         const AttentionDims& d, float scale) override {
    kernels::cpu::attention_forward<float>(host(out), host(lse), host(q), host(k), host(v), d.B, d.Hq, d.Hkv, d.Tq,
                                           d.Tk, d.D, scale, d.layout);
  }
  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                          const float* v, const float* out, const float* lse, const AttentionDims& d,
                          float scale) override {
    kernels::cpu::attention_backward<float>(host(dq), host(dk), host(dv), host(dout), host(q), host(k), host(v),
                                            host(out), host(lse), d.B, d.Hq, d.Hkv, d.Tq, d.Tk, d.D, scale, d.layout);
  }
  void rope_heads(float* y, const HeadLayout& yl, const float* x, const HeadLayout& xl, int64_t B, int64_t H, int64_t T,
                  int64_t D, int64_t start, double theta, int sign) override {
    std::vector<double> c, s;
    detail::rope_tables(T, D, start, theta, c, s);
    detail::rope_apply<float>(host(x), xl, host(y), yl, B, H, T, D, c, s, sign);
  }
  void adamw_step(float* w, float* m, float* v, const float* g, int64_t n, double lr, double beta1, double beta2,
                  double eps, double wd, int64_t step) override {
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
    const float decay = static_cast<float>(1.0 - lr * wd), step_size = static_cast<float>(lr / bc1);
    const float inv = static_cast<float>(1.0 / std::sqrt(bc2)), e = static_cast<float>(eps);
    float *W = host(w), *Mm = host(m), *Vv = host(v);
    const float* G = host(g);
    for (int64_t k = 0; k < n; ++k) {
      W[k] *= decay;
      Mm[k] = b1 * Mm[k] + (1.f - b1) * G[k];
      Vv[k] = b2 * Vv[k] + (1.f - b2) * G[k] * G[k];
      W[k] -= step_size * Mm[k] / (std::sqrt(Vv[k]) * inv + e);
    }
  }

  // ---- grouped LoRA: the definition, one assignment at a time ----------------------------------------
  void grouped_lora_forward(float* y, float* h, const float* x, const std::vector<const float*>& A,
                            const std::vector<const float*>& B, const int32_t* rows, const int32_t* seg,
                            const float* w, float scale, const GroupedLoRADims& d, bool) override {
    ++kernel_calls;
    for (int64_t e = 0; e < d.E; ++e)
      for (int64_t j = host(seg)[e]; j < host(seg)[e + 1]; ++j) {
        const float* xr = host(x) + host(rows)[j] * d.In;
        float* hj = host(h) + j * d.R;
        for (int64_t r = 0; r < d.R; ++r) {
          float acc = 0;
          for (int64_t i = 0; i < d.In; ++i) acc += host(A[e])[r * d.In + i] * xr[i];
          hj[r] = acc;
        }
        const float s = scale * (w ? host(w)[j] : 1.f);
        float* yr = host(y) + host(rows)[j] * d.Out;
        for (int64_t o = 0; o < d.Out; ++o) {
          float acc = 0;
          for (int64_t r = 0; r < d.R; ++r) acc += host(B[e])[o * d.R + r] * hj[r];
          yr[o] += s * acc;
        }
      }
  }
  void grouped_lora_backward(float* dx, const std::vector<float*>& dA, const std::vector<float*>& dB, float* dw,
                             float* dh, const float* g, const float* x, const float* h,
                             const std::vector<const float*>& A, const std::vector<const float*>& B,
                             const int32_t* rows, const int32_t* seg, const float* w, float scale,
                             const GroupedLoRADims& d, bool) override {
    if (d.write_grads) {  // written, not accumulated: as if zeroed first
      if (dx && !d.add_dx) std::fill(host(dx), host(dx) + d.N * d.In, 0.f);
      for (float* p : dA)
        if (p) std::fill(host(p), host(p) + d.R * d.In, 0.f);
      for (float* p : dB)
        if (p) std::fill(host(p), host(p) + d.Out * d.R, 0.f);
    }
    for (int64_t e = 0; e < d.E; ++e)
      for (int64_t j = host(seg)[e]; j < host(seg)[e + 1]; ++j) {
        const int64_t row = host(rows)[j];
        const float* gr = host(g) + row * d.Out;
        const float* xr = host(x) + row * d.In;
        const float* hj = host(h) + j * d.R;
        const float wj = w ? host(w)[j] : 1.f;
        float* dhj = host(dh) + j * d.R;
        float dot = 0;
        for (int64_t r = 0; r < d.R; ++r) {  // u = scale B^T g; dh = w u; dw = h . u
          float acc = 0;
          for (int64_t o = 0; o < d.Out; ++o) acc += host(B[e])[o * d.R + r] * gr[o];
          const float u = scale * acc;
          dot += hj[r] * u;
          dhj[r] = wj * u;
        }
        if (dw) host(dw)[j] = dot;
        if (dx)
          for (int64_t i = 0; i < d.In; ++i) {
            float acc = 0;
            for (int64_t r = 0; r < d.R; ++r) acc += dhj[r] * host(A[e])[r * d.In + i];
            host(dx)[row * d.In + i] += acc;
          }
        if (!dA.empty() && dA[e])
          for (int64_t r = 0; r < d.R; ++r)
            for (int64_t i = 0; i < d.In; ++i) host(dA[e])[r * d.In + i] += dhj[r] * xr[i];
        if (!dB.empty() && dB[e])
          for (int64_t o = 0; o < d.Out; ++o)
            for (int64_t r = 0; r < d.R; ++r) host(dB[e])[o * d.R + r] += scale * wj * gr[o] * hj[r];
      }
  }

  std::int64_t uploads = 0, downloads = 0, kernel_calls = 0;

 private:
  std::int64_t mallocs_ = 0;
};

// Installs a MockDevice as the cuda backend for one scope (then restores what was there).
class MockDeviceScope {
 public:
  MockDeviceScope() { previous_ = register_backend(DeviceType::cuda, &device); }
  ~MockDeviceScope() { register_backend(DeviceType::cuda, previous_); }
  MockDeviceScope(const MockDeviceScope&) = delete;
  MockDeviceScope& operator=(const MockDeviceScope&) = delete;
  MockDevice device;

 private:
  DeviceBackend* previous_ = nullptr;
};

}  // namespace moa::testing
