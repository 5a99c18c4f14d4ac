// moa/core/backend.hpp: the kernels of a non-cpu device, behind one interface, so that ops compiled
// by the host compiler (g++/clang in the user's .cpp files) run on a GPU whose kernels were compiled
// by nvcc in another translation unit.
//
// How it fits together:
//   - Tensors on Device::cuda(i) hold device memory from `backend(device).allocate`.
//   - Every op checks its inputs' device; a cpu tensor takes the cpu kernels as before, a device
//     tensor calls the methods below on raw device pointers (never dereferenced on the host).
//   - <moa/cuda.cuh>, included in one .cu file of the program (linked with moa::cuda), defines the
//     CUDA implementation and registers it (moa::cuda::init(), also run at static initialisation).
//     Without it, using a cuda tensor throws DeviceError saying so.
//
// Conventions for every method: pointers are device pointers of the backend's device (the current
// device is set by the backend from `device` where it matters), buffers are contiguous row-major
// unless strides are given, float means f32, "written" outputs are overwritten and "accumulated"
// outputs are added to (the caller zeroes them first). Methods may run asynchronously on the
// backend's stream; results are visible to later methods and to copy_to_host, which synchronises.
// Failures (bad launch, out of memory) throw DeviceError naming the call and the code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moa/core/dtype.hpp"
#include "moa/core/error.hpp"
#include "moa/core/head_layout.hpp"
#include "moa/core/shape.hpp"

namespace moa {

// Strided kernels take at most this many axes (ops coalesce or copy beyond it).
inline constexpr int kMaxDeviceRank = 8;

enum class BinaryOp : std::uint8_t { add, sub, mul, div };
// y = f(x; p): scale (x * p), shift (x + p), neg, exp, log, sqrt, tanh, pow (x^p), relu,
// gelu (tanh approximation), silu.
enum class UnaryOp : std::uint8_t { scale, shift, neg, exp, log, sqrt, tanh, pow, relu, gelu, silu };

// How float32 matrix products may run on a GPU (the cpu always computes in f32):
//   highest: true f32; tf32: tensor cores with tf32 inputs; bf16: tensor cores with bf16 inputs,
//   f32 accumulation (the fastest; relative error about 1e-2 per product).
enum class MatmulPrecision : std::uint8_t { highest, tf32, bf16 };

// The shapes of a fused causal attention call (see moa/ops/attention.hpp for the semantics) and the
// memory layout of each (B, H, T, D) operand (moa/core/head_layout.hpp; default: contiguous).
struct AttentionDims {
  int64_t B = 1, Hq = 1, Hkv = 1, Tq = 1, Tk = 1, D = 1;
  AttentionLayouts layout = {};
};

// The shapes of a grouped (segmented) LoRA call; see moa/kernels/cuda/grouped_lora.cuh.
struct GroupedLoRADims {
  int64_t N = 0;    // rows of x and y
  int64_t M = 0;    // assignments (row, expert) sorted by expert
  int64_t E = 0;    // experts
  int64_t In = 0;   // x columns
  int64_t Out = 0;  // y columns
  int64_t R = 0;    // rank shared by all experts
  // Backward: dx, dA_e and dB_e written (zeros where no assignment adds) instead of accumulated,
  // so the caller need not zero them; see grouped_lora_backward.
  bool write_grads = false;
  // With write_grads: dx is still accumulated (it holds another op's part of the input gradient,
  // e.g. g W of the linear the adapter sits beside); dA_e and dB_e are written.
  bool add_dx = false;
};

// One parameter of a multi-tensor AdamW step: n values of the weights w, moments m and v and the
// gradient g, all on one device.
struct AdamWBuffers {
  float* w = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  const float* g = nullptr;
  int64_t n = 0;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;

  // ---- the device ------------------------------------------------------------------------------
  virtual std::string name() const = 0;     // "cuda"
  virtual int device_count() const = 0;     // 0 when no device is present
  virtual void synchronize(int device) = 0; // waits for all queued work

  // ---- memory ----------------------------------------------------------------------------------
  // Served by a caching allocator: no device malloc once a repeated step loop is warm.
  virtual void* allocate(std::size_t nbytes, int device) = 0;  // never null; throws DeviceError
  virtual void release(void* p, std::size_t nbytes, int device) noexcept = 0;
  virtual void empty_cache(int device) = 0;
  virtual std::int64_t device_malloc_count(int device) const = 0;  // real device mallocs so far
  // The backend whose release() frees what allocate() returns; storage keeps this one, so it may
  // outlive a wrapper (moa/core/profile.hpp) that forwards allocate().
  virtual DeviceBackend& memory_backend() { return *this; }
  virtual void copy_to_device(void* dst, const void* host_src, std::size_t nbytes, int device) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, std::size_t nbytes, int device) = 0;  // synchronous
  virtual void copy_device(void* dst, const void* src, std::size_t nbytes, int device) = 0;

  // ---- layout (dtypes f32, i32, bf16) ------------------------------------------------------------
  // dst[i...] = value for every index of `shape`, dst read with `strides` (elements).
  virtual void fill(DType t, void* dst, const Shape& shape, const Strides& strides, double value) = 0;
  // dst[i...] = convert(src[i...]); each side with its own dtype and strides. Rank <= kMaxDeviceRank.
  virtual void copy_strided(DType dst_t, void* dst, const Strides& dst_strides, DType src_t, const void* src,
                            const Strides& src_strides, const Shape& shape) = 0;
  // out[i] = x[offsets[i]] for i < n (float).
  virtual void take(float* out, const float* x, const int32_t* offsets, int64_t n) = 0;
  // out[offsets[i]] += src[i] for i < n (float; offsets may repeat).
  virtual void put_add(float* out, const int32_t* offsets, const float* src, int64_t n) = 0;

  // ---- elementwise and reductions (float) --------------------------------------------------------
  // out (contiguous, `shape`) = a op b, a and b read with broadcast strides (0 on stretched axes).
  // out may be a or b itself when that operand is contiguous with `shape` (in-place accumulation).
  virtual void binary(BinaryOp op, float* out, const Shape& shape, const float* a, const Strides& a_strides,
                      const float* b, const Strides& b_strides) = 0;
  // y = f(x; p) elementwise over n contiguous values (y may equal x).
  virtual void unary(UnaryOp op, double p, float* y, const float* x, int64_t n) = 0;
  // gx = g * f'(x) elementwise; y = f(x) is given too (some derivatives read it).
  virtual void unary_backward(UnaryOp op, double p, float* gx, const float* g, const float* x, const float* y,
                              int64_t n) = 0;
  // SwiGLU's gated product y = silu(g) * u over n contiguous values (y a buffer of its own), and its
  // backward dg = dy * u * silu'(g), du = dy * silu(g) (either may be null). Base: unary and binary
  // calls in the order of silu(g) * u; backends with a fused kernel override them.
  virtual void swiglu_forward(float* y, const float* g, const float* u, int64_t n) {
    if (n <= 0) return;
    unary(UnaryOp::silu, 0, y, g, n);
    binary(BinaryOp::mul, y, {n}, y, {1}, u, {1});
  }
  virtual void swiglu_backward(float* dg, float* du, const float* dy, const float* g, const float* u, int64_t n) {
    if (n <= 0) return;
    if (du) {
      unary(UnaryOp::silu, 0, du, g, n);
      binary(BinaryOp::mul, du, {n}, dy, {1}, du, {1});
    }
    if (dg) {
      binary(BinaryOp::mul, dg, {n}, dy, {1}, u, {1});
      unary_backward(UnaryOp::silu, 0, dg, dg, g, g, n);  // silu' reads x only: g stands in for y
    }
  }
  // out[r] = scale * sum_c x[r, c], x (rows, cols).
  virtual void sum_rows(float* out, const float* x, int64_t rows, int64_t cols, double scale) = 0;
  // sum over all buffers of sum_i x[i]^2, in double, returned to the host: one synchronisation for
  // all of them (gradient clipping over every parameter).
  virtual double sum_squares_all(const std::vector<std::pair<const float*, int64_t>>& buffers) = 0;
  double sum_squares(const float* x, int64_t n) { return sum_squares_all({{x, n}}); }

  // ---- products ------------------------------------------------------------------------------------
  // For b < batch: C_b = alpha op(A_b) op(B_b) + beta C_b, row-major; op(X) = X^T when trans.
  // A_b = A + b * stride_a (likewise B, C); lda/ldb/ldc are row strides of the stored matrices.
  virtual void gemm(bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K, float alpha,
                    const float* A, int64_t lda, int64_t stride_a, const float* B, int64_t ldb, int64_t stride_b,
                    float beta, float* C, int64_t ldc, int64_t stride_c, MatmulPrecision precision) = 0;
  // One biased product, the layer's x W^T + b: C = op(A) op(B) + 1 bias^T (C (M, N), row stride ldc;
  // bias (N) contiguous, added to every row). Base: the bias broadcast into C's rows, then gemm with
  // beta 1 (a full extra pass over C); backends with a fused epilogue override it.
  virtual void gemm_bias(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                         const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc,
                         MatmulPrecision precision) {
    if (M <= 0 || N <= 0) return;
    copy_strided(DType::f32, C, {ldc, 1}, DType::f32, bias, {0, 1}, {M, N});
    gemm(trans_a, trans_b, 1, M, N, K, 1.0f, A, lda, 0, B, ldb, 0, 1.0f, C, ldc, 0, precision);
  }

  // ---- fused transformer kernels (float; semantics of moa/kernels/cpu/*) ------------------------------
  virtual void softmax_forward(bool log, float* y, const float* x, int64_t N, int64_t C) = 0;
  virtual void softmax_backward(bool log, float* dx, const float* dy, const float* y, int64_t N, int64_t C) = 0;
  // loss (one float, written) = mean over rows with targets != ignore of lse - logit[target] (0 when
  // none); lse (N) written.
  virtual void cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* targets, int64_t N,
                                     int64_t V, int32_t ignore_index) = 0;
  // dlogits (N, V) written = (softmax - onehot) * dloss[0] / count (0 on ignored rows); dlogits may
  // be logits itself (linear_cross_entropy forms the gradient in the logits' buffer).
  virtual void cross_entropy_backward(float* dlogits, const float* dloss, const float* logits, const float* lse,
                                      const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index) = 0;
  // Per row: loss_rows[n] = scale * (logsumexp(logits[n]) - logits[n, t_n]) (0 on ignored rows),
  // written; with dlogits (may be null), its gradient dlogits[n, :] = scale * (softmax - onehot)
  // (0 on ignored rows), written, and dlogits may be logits itself.
  virtual void cross_entropy_rows(float* loss_rows, float* dlogits, const float* logits, const int32_t* targets,
                                  int64_t N, int64_t V, int32_t ignore_index, float scale) = 0;
  // out, mean, rstd written; bias may be null.
  virtual void layer_norm_forward(float* out, float* mean, float* rstd, const float* x, const float* weight,
                                  const float* bias, int64_t N, int64_t C, float eps) = 0;
  // dx written (may be null); dweight, dbias accumulated (either may be null).
  virtual void layer_norm_backward(float* dx, float* dweight, float* dbias, const float* dout, const float* x,
                                   const float* weight, const float* mean, const float* rstd, int64_t N,
                                   int64_t C) = 0;
  virtual void rms_norm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t N, int64_t C,
                                float eps) = 0;
  virtual void rms_norm_backward(float* dx, float* dweight, const float* dout, const float* x, const float* weight,
                                 const float* rstd, int64_t N, int64_t C) = 0;
  // out (N, C) = weight[ids]; ids already checked to be in range.
  virtual void embedding_forward(float* out, const int32_t* ids, const float* weight, int64_t N, int64_t C) = 0;
  // dweight (V, C) accumulated: dweight[ids[n]] += dout[n].
  virtual void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t C) = 0;
  // out (B, Hq, Tq, D), lse (B, Hq, Tq) written.
  virtual void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                                 const AttentionDims& d, float scale) = 0;
  // dq, dk, dv written (each may be null); scratch is the backend's.
  virtual void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                                  const float* v, const float* out, const float* lse, const AttentionDims& d,
                                  float scale) = 0;
  // y = R x (sign +1) or R^T x (sign -1), x and y (B, H, T, D) in their layouts (rows of D
  // contiguous; default: contiguous); y may be x with the same layout. Positions start .. start + T - 1;
  // angles p * theta^(-2i/D) computed in double (as moa/ops/rope.hpp).
  virtual void rope_heads(float* y, const HeadLayout& y_layout, const float* x, const HeadLayout& x_layout, int64_t B,
                          int64_t H, int64_t T, int64_t D, int64_t start, double theta, int sign) = 0;
  // The contiguous (BH, T, D) form.
  void rope(float* y, const float* x, int64_t BH, int64_t T, int64_t D, int64_t start, double theta, int sign) {
    rope_heads(y, {}, x, {}, 1, BH, T, D, start, theta, sign);
  }

  // ---- optimiser ------------------------------------------------------------------------------------
  // One AdamW update of n values, exactly the arithmetic of moa::optim::AdamW::step (step counts from 1).
  virtual void adamw_step(float* w, float* m, float* v, const float* g, int64_t n, double lr, double beta1,
                          double beta2, double eps, double weight_decay, int64_t step) = 0;
  // adamw_step for every parameter of the list (one device), in as few launches as the backend can
  // (CUDA: 40 tensors per launch). The default calls adamw_step once per tensor.
  virtual void adamw_step_all(const std::vector<AdamWBuffers>& params, double lr, double beta1, double beta2,
                              double eps, double weight_decay, int64_t step) {
    for (const AdamWBuffers& p : params)
      if (p.n > 0) adamw_step(p.w, p.m, p.v, p.g, p.n, lr, beta1, beta2, eps, weight_decay, step);
  }
  // x *= float(coef), one float32 rounding (the cpu's clip_grad_norm), for every buffer, in as few
  // launches as the backend can. The default calls unary(scale) once per buffer (the product of two
  // floats is exact in double, so rounding it once gives the same float).
  virtual void scale_all(const std::vector<std::pair<float*, int64_t>>& buffers, double coef) {
    const double c = static_cast<double>(static_cast<float>(coef));
    for (const auto& [x, n] : buffers)
      if (n > 0) unary(UnaryOp::scale, c, x, x, n);
  }

  // ---- the segmented LoRA product (Punica's SGMV) ----------------------------------------------------
  // rows (M, i32, device): the row of each assignment, sorted by expert; seg (E + 1, i32, device):
  // expert e owns assignments seg[e] .. seg[e + 1]; A, B: E device pointers (host vector), each
  // (R, In) and (Out, R); w (M, grouped order) or null (all 1).
  // Forward: h (M, R) written = x[rows] A_e^T; y[rows] += scale * w * h B_e^T (accumulated).
  virtual void grouped_lora_forward(float* y, float* h, const float* x, const std::vector<const float*>& A,
                                    const std::vector<const float*>& B, const int32_t* rows, const int32_t* seg,
                                    const float* w, float scale, const GroupedLoRADims& d, bool rows_unique) = 0;
  // Backward with g = dL/dy (N, Out): dx (N, In) accumulated, dA_e / dB_e accumulated (host vectors
  // of device pointers; a null entry or an empty vector: not wanted), dw (M, grouped order) written
  // (null: not wanted); dh (M, R) scratch supplied by the caller. With d.write_grads, dx, dA_e and
  // dB_e are written instead: every element, also when M == 0 or expert e has no assignment (dx
  // stays accumulated when d.add_dx).
  virtual void grouped_lora_backward(float* dx, const std::vector<float*>& dA, const std::vector<float*>& dB,
                                     float* dw, float* dh, const float* g, const float* x, const float* h,
                                     const std::vector<const float*>& A, const std::vector<const float*>& B,
                                     const int32_t* rows, const int32_t* seg, const float* w, float scale,
                                     const GroupedLoRADims& d, bool rows_unique) = 0;
};

namespace detail {

// The list of device d in per-device groups (appended when d has none yet): batched backend calls
// (clipping, AdamW) gather every buffer of a device first.
template <class T>
std::vector<T>& group_of(std::vector<std::pair<Device, std::vector<T>>>& groups, Device d) {
  for (auto& [dev, list] : groups)
    if (dev == d) return list;
  return groups.emplace_back(d, std::vector<T>{}).second;
}

inline DeviceBackend*& backend_slot(DeviceType t) {
  static DeviceBackend* slots[2] = {nullptr, nullptr};
  return slots[static_cast<int>(t)];
}

inline MatmulPrecision& matmul_precision_slot() {
  static MatmulPrecision p = MatmulPrecision::highest;
  return p;
}

}  // namespace detail

// Installs the kernels of a device type (done by <moa/cuda.cuh>; tests may install their own).
// Passing null uninstalls. Returns the previous backend.
inline DeviceBackend* register_backend(DeviceType t, DeviceBackend* b) {
  MOA_CHECK(t != DeviceType::cpu, DeviceError, "register_backend: the cpu's kernels are built in");
  DeviceBackend* old = detail::backend_slot(t);
  detail::backend_slot(t) = b;
  return old;
}

inline bool backend_available(DeviceType t) { return t == DeviceType::cpu || detail::backend_slot(t) != nullptr; }

// The kernels for a non-cpu device; DeviceError when none is installed or the index is out of range.
inline DeviceBackend& backend(Device d) {
  MOA_CHECK(d.type != DeviceType::cpu, DeviceError, "backend: the cpu has no device backend");
  DeviceBackend* b = detail::backend_slot(d.type);
  MOA_CHECK(b != nullptr, DeviceError, "device ", d.str(),
            " is not available in this program: include <moa/cuda.cuh> in one .cu file and link moa::cuda "
            "(the moa tool: build with -DMOA_CUDA=ON)");
  const int n = b->device_count();
  MOA_CHECK(d.index >= 0 && d.index < n, DeviceError, "device ", d.str(), " is not available: ", b->name(), " has ", n,
            " device(s)", n == 0 ? " (no GPU found or the driver is missing)" : "");
  return *b;
}

// How float32 products run on GPUs (see MatmulPrecision); the default is highest.
inline void set_matmul_precision(MatmulPrecision p) { detail::matmul_precision_slot() = p; }
inline MatmulPrecision matmul_precision() { return detail::matmul_precision_slot(); }

// Parses "cpu", "cuda", "cuda:1" (the --device option of the tools).
inline Device parse_device(const std::string& s) {
  if (s == "cpu") return Device::cpu();
  if (s == "cuda") return Device::cuda(0);
  if (s.rfind("cuda:", 0) == 0 && s.size() > 5) {
    int i = 0;
    for (std::size_t k = 5; k < s.size(); ++k) {
      MOA_CHECK(s[k] >= '0' && s[k] <= '9' && i < 100000, ValueError,
                "device: expected cpu, cuda or cuda:N, got '", s, "'");
      i = i * 10 + (s[k] - '0');
    }
    return Device::cuda(i);
  }
  throw ValueError(detail::cat("device: expected cpu, cuda or cuda:N, got '", s, "'"));
}

}  // namespace moa
