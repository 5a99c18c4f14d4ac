// moa/kernels/cuda/backend.cuh: the CUDA implementation of moa::DeviceBackend
// (include/moa/core/backend.hpp): every method of the interface on the kernels of
// include/moa/kernels/cuda/. Users include <moa/cuda.cuh>, which registers one instance.
//
// Per device (created on first use, never destroyed: no CUDA call after the driver unloads):
//   - one non-blocking stream: every kernel, copy and cuBLAS call of the device goes to it, so work
//     runs in call order and a block released to the allocator is only reused by later work;
//   - one cuBLAS handle bound to that stream (calls serialised by a mutex: a handle is not meant to
//     be used by two host threads at once), and on first use of gemm_bias a cuBLASLt handle, its
//     32 MiB workspace and its plans per product shape and operand alignment (at most 256; under the
//     same mutex; empty_cache drops the plans and the workspace);
//   - one CachingAllocator (allocate/release, and the scratch of the fused kernels: no cudaMalloc
//     once a repeated step loop is warm);
//   - two small caches besides: the device arrays of expert pointers for the grouped LoRA kernels (keyed by
//     the pointer values, so a training loop uploads them once) and the float cos/sin tables of
//     rope (computed on the host in double exactly as moa/ops/rope.hpp, so rope is bit-identical
//     to the cpu's float arithmetic).
//
// Which device: methods with a `device` argument use it; the others take the device of their
// output pointer (cudaPointerGetAttributes; skipped when there is one device). Each method makes
// that device current (cudaSetDevice only when it differs) and leaves it current.
//
// Errors: a CUDA or cuBLAS failure throws moa::DeviceError naming the call and the code
// (check.cuh); bad sizes throw ShapeError, unsupported dtypes ValueError, naming the method.
#pragma once

#include <array>
#include <atomic>
#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "moa/core/backend.hpp"
#include "moa/core/error.hpp"
#include "moa/core/half.hpp"
#include "moa/core/shape.hpp"
#include "moa/kernels/cuda/adamw.cuh"
#include "moa/kernels/cuda/allocator.cuh"
#include "moa/kernels/cuda/attention.cuh"
#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/elementwise.cuh"
#include "moa/kernels/cuda/embedding.cuh"
#include "moa/kernels/cuda/gemm.cuh"
#include "moa/kernels/cuda/grouped_lora.cuh"
#include "moa/kernels/cuda/launch.cuh"
#include "moa/kernels/cuda/norm.cuh"
#include "moa/kernels/cuda/softmax_xent.cuh"

namespace moa::kernels::cuda {

namespace detail {

struct PointerKeyHash {
  std::size_t operator()(const std::vector<uintptr_t>& v) const noexcept {
    std::size_t h = 0xcbf29ce484222325ull ^ v.size();
    for (uintptr_t p : v) h = (h ^ static_cast<std::size_t>(p)) * 0x100000001b3ull;
    return h;
  }
};

// Calls f.template operator()<T>() with the device storage type of `t`: float, int32_t, or
// uint16_t for bf16 bits. f64 has no device storage (ValueError naming `op`).
template <class F>
void dispatch_storage(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::f32: f.template operator()<float>(); return;
    case DType::i32: f.template operator()<int32_t>(); return;
    case DType::bf16: f.template operator()<uint16_t>(); return;
    default: break;
  }
  throw ValueError(::moa::detail::cat(op, ": dtype ", dtype_name(t),
                                      " is not supported on cuda devices (expected f32, i32 or bf16)"));
}

}  // namespace detail

class CudaBackend final : public DeviceBackend {
 public:
  static constexpr int kMaxDevices = 64;

  // Everything the backend keeps for one device.
  struct DeviceState {
    int device = 0;
    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;
    CachingAllocator alloc;
    std::mutex blas_mutex;
    std::mutex cache_mutex;  // the two caches below
    std::unordered_map<std::vector<uintptr_t>, void*, detail::PointerKeyHash> pointer_arrays;
    struct RopeTable {
      int64_t D = 0;
      double theta = 0;
      int64_t positions = 0;  // rows of each table
      float* data = nullptr;  // cos (positions, D/2), then sin (positions, D/2)
    };
    std::vector<RopeTable> rope_tables;
    // cuBLASLt, for the biased products (gemm_bias): created on first use, guarded by blas_mutex.
    struct LtPlan {  // one product shape: descriptors and the heuristic's algorithm, or none found
      bool usable = false;
      cublasLtMatmulDesc_t desc = nullptr;
      cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
      cublasLtMatmulAlgo_t algo{};
      std::size_t workspace = 0;
    };
    cublasLtHandle_t lt = nullptr;
    void* lt_workspace = nullptr;  // kLtWorkspace bytes from `alloc`, kept
    std::unordered_map<std::vector<uintptr_t>, LtPlan, detail::PointerKeyHash> lt_plans;
  };
  // cuBLASLt's workspace per device (NVIDIA's recommendation for Hopper), and the most plans kept
  // (then all are dropped and planned again as they come).
  static constexpr std::size_t kLtWorkspace = std::size_t(32) << 20;
  static constexpr std::size_t kMaxLtPlans = 256;

  CudaBackend() = default;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;
  ~CudaBackend() override = default;  // device states are leaked on purpose (see the file comment)

  // ---- the device ----------------------------------------------------------------------------------
  std::string name() const override { return "cuda"; }

  // cudaGetDeviceCount once per process; 0 (never a throw) without a device or a driver.
  int device_count() const override {
    static const int n = [] {
      int c = 0;
      const cudaError_t e = cudaGetDeviceCount(&c);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();  // clear the error so later calls do not report it
        return 0;
      }
      return c < kMaxDevices ? c : kMaxDevices;
    }();
    return n;
  }

  void synchronize(int device) override {
    DeviceState& s = activate(device);
    MOA_CUDA_CHECK(cudaStreamSynchronize(s.stream));
  }

  // ---- beyond the interface: what <moa/cuda.cuh> and tests use -------------------------------------
  cudaStream_t stream(int device) { return activate(device).stream; }
  CachingAllocator& allocator(int device) { return state(device).alloc; }
  AllocatorStats allocator_stats(int device) const { return state(device).alloc.stats(); }

  // ---- memory ----------------------------------------------------------------------------------------
  void* allocate(std::size_t nbytes, int device) override {
    DeviceState& s = activate(device);
    return s.alloc.allocate(nbytes, s.stream);
  }

  void release(void* p, std::size_t /*nbytes*/, int device) noexcept override {
    if (!p) return;
    try {
      state(device).alloc.release(p);
    } catch (const std::exception& e) {  // noexcept: a bad pointer is a bug upstream; say so
      std::fprintf(stderr, "moa: cuda release(%p) on device %d failed: %s\n", p, device, e.what());
    }
  }

  // Frees every cached block of the device (and the backend's own caches), after its queued work.
  void empty_cache(int device) override {
    DeviceState& s = activate(device);
    {
      std::lock_guard<std::mutex> lock(s.cache_mutex);
      for (auto& [key, p] : s.pointer_arrays) s.alloc.release(p);
      s.pointer_arrays.clear();
      for (auto& t : s.rope_tables) s.alloc.release(t.data);
      s.rope_tables.clear();
    }
    {
      std::lock_guard<std::mutex> lock(s.blas_mutex);
      clear_lt_plans(s);
      if (s.lt_workspace) s.alloc.release(s.lt_workspace);
      s.lt_workspace = nullptr;
    }
    MOA_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    s.alloc.empty_cache();
  }

  std::int64_t device_malloc_count(int device) const override { return state(device).alloc.stats().malloc_count; }

  // The host buffer may be reused as soon as this returns: pageable memory is staged by the driver
  // before cudaMemcpyAsync returns; page-locked memory is waited for.
  void copy_to_device(void* dst, const void* host_src, std::size_t nbytes, int device) override {
    if (nbytes == 0) return;
    DeviceState& s = activate(device);
    MOA_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, nbytes, cudaMemcpyHostToDevice, s.stream));
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, host_src) != cudaSuccess) {
      (void)cudaGetLastError();
      MOA_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    } else if (a.type == cudaMemoryTypeHost) {
      MOA_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    }
  }

  void copy_to_host(void* host_dst, const void* src, std::size_t nbytes, int device) override {
    DeviceState& s = activate(device);
    if (nbytes > 0) MOA_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, nbytes, cudaMemcpyDeviceToHost, s.stream));
    MOA_CUDA_CHECK(cudaStreamSynchronize(s.stream));  // also reports a fault of earlier queued work
  }

  void copy_device(void* dst, const void* src, std::size_t nbytes, int device) override {
    if (nbytes == 0) return;
    DeviceState& s = activate(device);
    MOA_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, s.stream));
  }

  // ---- layout ------------------------------------------------------------------------------------------
  void fill(DType t, void* dst, const Shape& shape, const Strides& strides, double value) override {
    int64_t n = 0;
    const StridedLayout<1> L = make_layout<1>("fill", shape, {&strides}, n);
    if (n == 0) return;
    DeviceState& s = activate_for(dst, "fill");
    detail::dispatch_storage(t, "fill", [&]<class T>() {
      T v;
      if constexpr (std::is_same_v<T, uint16_t>)
        v = ::moa::f32_to_bf16_bits(static_cast<float>(value));
      else
        v = ::moa::convert_value<T>(value);  // as the cpu's fill_
      bool zero_bits = true;
      const unsigned char* b = reinterpret_cast<const unsigned char*>(&v);
      for (std::size_t i = 0; i < sizeof(T); ++i) zero_bits = zero_bits && b[i] == 0;
      if (zero_bits && layout_is_flat(L)) {
        MOA_CUDA_CHECK(cudaMemsetAsync(dst, 0, static_cast<std::size_t>(n) * sizeof(T), s.stream));
        return;
      }
      // Filled as raw bits of the same width (one kernel per width).
      if constexpr (sizeof(T) == 4)
        fill_strided<uint32_t>(static_cast<uint32_t*>(dst), L, n, std::bit_cast<uint32_t>(v), s.stream);
      else
        fill_strided<uint16_t>(static_cast<uint16_t*>(dst), L, n, v, s.stream);
    });
  }

  void copy_strided(DType dst_t, void* dst, const Strides& dst_strides, DType src_t, const void* src,
                    const Strides& src_strides, const Shape& shape) override {
    int64_t n = 0;
    const StridedLayout<2> L = make_layout<2>("copy_strided", shape, {&dst_strides, &src_strides}, n);
    if (n == 0) return;
    DeviceState& s = activate_for(dst, "copy_strided");
    if (dst_t == src_t && layout_is_flat(L)) {
      detail::dispatch_storage(dst_t, "copy_strided", [&]<class T>() {
        MOA_CUDA_CHECK(
            cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(T), cudaMemcpyDeviceToDevice, s.stream));
      });
      return;
    }
    detail::dispatch_storage(dst_t, "copy_strided", [&]<class D>() {
      detail::dispatch_storage(src_t, "copy_strided", [&]<class S>() {
        ::moa::kernels::cuda::copy_strided<D, S>(static_cast<D*>(dst), static_cast<const S*>(src), L, n, s.stream);
      });
    });
  }

  void take(float* out, const float* x, const int32_t* offsets, int64_t n) override {
    if (n <= 0) return;
    DeviceState& s = activate_for(out, "take");
    ::moa::kernels::cuda::take(out, x, offsets, n, s.stream);
  }

  void put_add(float* out, const int32_t* offsets, const float* src, int64_t n) override {
    if (n <= 0) return;
    DeviceState& s = activate_for(out, "put_add");
    ::moa::kernels::cuda::put_add(out, offsets, src, n, s.stream);
  }

  // ---- elementwise and reductions ------------------------------------------------------------------------
  void binary(BinaryOp op, float* out, const Shape& shape, const float* a, const Strides& a_strides, const float* b,
              const Strides& b_strides) override {
    const Strides out_strides = contiguous_strides(shape);
    int64_t n = 0;
    const StridedLayout<3> L = make_layout<3>("binary", shape, {&out_strides, &a_strides, &b_strides}, n);
    if (n == 0) return;
    DeviceState& s = activate_for(out, "binary");
    ::moa::kernels::cuda::binary(op, out, a, b, L, n, s.stream);
  }

  void unary(UnaryOp op, double p, float* y, const float* x, int64_t n) override {
    if (n <= 0) return;
    DeviceState& s = activate_for(y, "unary");
    ::moa::kernels::cuda::unary(op, p, y, x, n, s.stream);
  }

  void unary_backward(UnaryOp op, double p, float* gx, const float* g, const float* x, const float* y,
                      int64_t n) override {
    if (n <= 0) return;
    DeviceState& s = activate_for(gx, "unary_backward");
    ::moa::kernels::cuda::unary_backward(op, p, gx, g, x, y, n, s.stream);
  }

  void swiglu_forward(float* y, const float* g, const float* u, int64_t n) override {
    if (n <= 0) return;
    DeviceState& s = activate_for(y, "swiglu_forward");
    ::moa::kernels::cuda::swiglu_forward(y, g, u, n, s.stream);
  }

  void swiglu_backward(float* dg, float* du, const float* dy, const float* g, const float* u, int64_t n) override {
    if (n <= 0 || (!dg && !du)) return;
    DeviceState& s = activate_for(dg ? dg : du, "swiglu_backward");
    ::moa::kernels::cuda::swiglu_backward(dg, du, dy, g, u, n, s.stream);
  }

  void sum_rows(float* out, const float* x, int64_t rows, int64_t cols, double scale) override {
    MOA_CHECK(rows >= 0 && cols >= 0, ShapeError, "sum_rows: expected rows, cols >= 0, got ", rows, ", ", cols);
    if (rows == 0) return;
    DeviceState& s = activate_for(out, "sum_rows");
    if (plan_sum_rows(rows, cols).kind == SumRowsPlan::split) {
      Scratch acc(s, static_cast<std::size_t>(rows) * sizeof(double));
      ::moa::kernels::cuda::sum_rows(out, x, rows, cols, scale, acc.as<double>(), s.stream);
    } else {
      ::moa::kernels::cuda::sum_rows(out, x, rows, cols, scale, nullptr, s.stream);
    }
  }

  double sum_squares_all(const std::vector<std::pair<const float*, int64_t>>& buffers) override {
    const float* first = nullptr;
    for (const auto& [x, n] : buffers)
      if (n > 0 && !first) first = x;
    if (!first) return 0.0;
    DeviceState& s = activate_for(first, "sum_squares");
    Scratch acc(s, sizeof(double));
    MOA_CUDA_CHECK(cudaMemsetAsync(acc.get(), 0, sizeof(double), s.stream));
    // One accumulator, 128 buffers per launch, one synchronisation.
    sum_squares_multi(acc.as<double>(), buffers.data(), buffers.size(), s.stream);
    double r = 0.0;
    MOA_CUDA_CHECK(cudaMemcpyAsync(&r, acc.get(), sizeof(double), cudaMemcpyDeviceToHost, s.stream));
    MOA_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    return r;
  }

  // ---- products ----------------------------------------------------------------------------------------------
  void gemm(bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
            int64_t lda, int64_t stride_a, const float* B, int64_t ldb, int64_t stride_b, float beta, float* C,
            int64_t ldc, int64_t stride_c, MatmulPrecision precision) override {
    constexpr int64_t imax = INT_MAX;
    MOA_CHECK(batch >= 0 && batch <= imax && M >= 0 && M <= imax && N >= 0 && N <= imax && K >= 0 && K <= imax,
              ShapeError, "gemm: expected batch, M, N, K in [0, 2^31), got batch ", batch, ", M ", M, ", N ", N,
              ", K ", K);
    if (batch == 0 || M == 0 || N == 0) return;
    MOA_CHECK(ldc >= N && ldc <= imax, ShapeError, "gemm: expected ldc >= N (", N, ") and below 2^31, got ", ldc);
    MOA_CHECK(batch == 1 || stride_c >= (M - 1) * ldc + N, ShapeError,
              "gemm: the C matrices of the batch overlap: stride_c ", stride_c, " < (M - 1) * ldc + N = ",
              (M - 1) * ldc + N, " (M ", M, ", N ", N, ", ldc ", ldc, ", batch ", batch, ")");
    DeviceState& s = activate_for(C, "gemm");
    if (K == 0 || alpha == 0.f) {  // C = beta C without reading A or B (as the cpu gemm)
      scale_matrices(C, batch, M, N, ldc, stride_c, beta, s.stream);
      return;
    }
    detail::check_gemm_args("gemm", trans_a, trans_b, M, N, K, lda, ldb, ldc);
    MOA_CHECK(batch == 1 || (stride_a >= 0 && stride_b >= 0), ShapeError,
              "gemm: expected non-negative batch strides, got stride_a ", stride_a, ", stride_b ", stride_b);
    const cublasComputeType_t compute = compute_type(precision, "gemm");
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
    std::lock_guard<std::mutex> lock(s.blas_mutex);
    MOA_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        s.blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N),
        static_cast<int>(M), static_cast<int>(K), &alpha, B, CUDA_R_32F, static_cast<int>(ldb),
        static_cast<long long>(stride_b), A, CUDA_R_32F, static_cast<int>(lda), static_cast<long long>(stride_a), &beta,
        C, CUDA_R_32F, static_cast<int>(ldc), static_cast<long long>(stride_c), static_cast<int>(batch), compute,
        CUBLAS_GEMM_DEFAULT));
  }

  // The layer product with its bias in cuBLASLt's epilogue: C is written once, where the base
  // implementation writes the broadcast bias and then reads it back in a beta = 1 product. Shapes the
  // heuristic finds no algorithm for (remembered per shape and pointer alignment) take the base path.
  void gemm_bias(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                 const float* B, int64_t ldb, const float* bias, float* C, int64_t ldc,
                 MatmulPrecision precision) override {
    constexpr int64_t imax = INT_MAX;
    MOA_CHECK(M >= 0 && M <= imax && N >= 0 && N <= imax && K >= 0 && K <= imax, ShapeError,
              "gemm_bias: expected M, N, K in [0, 2^31), got M ", M, ", N ", N, ", K ", K);
    if (M == 0 || N == 0) return;
    MOA_CHECK(bias != nullptr, ValueError, "gemm_bias: expected a bias pointer, got null");
    MOA_CHECK(ldc >= N && ldc <= imax, ShapeError, "gemm_bias: expected ldc >= N (", N, ") and below 2^31, got ", ldc);
    if (K > 0) {
      detail::check_gemm_args("gemm_bias", trans_a, trans_b, M, N, K, lda, ldb, ldc);
      DeviceState& s = activate_for(C, "gemm_bias");
      std::lock_guard<std::mutex> lock(s.blas_mutex);
      if (LtPlan* plan = lt_plan(s, trans_a, trans_b, M, N, K, A, lda, B, ldb, bias, C, ldc, precision)) {
        MOA_CUBLAS_CHECK(
            cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
        const float one = 1.0f, zero = 0.0f;
        // Column-major C^T = op(B)^T op(A)^T, as in gemm; the bias runs along C^T's rows (N of them).
        const cublasStatus_t st = cublasLtMatmul(s.lt, plan->desc, &one, B, plan->a, A, plan->b, &zero, C, plan->c, C,
                                                 plan->c, &plan->algo, s.lt_workspace, plan->workspace, s.stream);
        if (st == CUBLAS_STATUS_SUCCESS) return;
        if (st != CUBLAS_STATUS_NOT_SUPPORTED)
          detail::throw_cublas(st, "cublasLtMatmul(bias epilogue)", __FILE__, __LINE__);
        plan->usable = false;  // refused at run time: this shape takes the base path from now on
      }
    }
    DeviceBackend::gemm_bias(trans_a, trans_b, M, N, K, A, lda, B, ldb, bias, C, ldc, precision);
  }

  // ---- fused transformer kernels -------------------------------------------------------------------------------
  void softmax_forward(bool log, float* y, const float* x, int64_t N, int64_t C) override {
    if (N <= 0 || C <= 0) return;
    DeviceState& s = activate_for(y, "softmax_forward");
    if (log)
      ::moa::kernels::cuda::log_softmax_forward(y, x, N, C, s.stream);
    else
      ::moa::kernels::cuda::softmax_forward(y, x, N, C, s.stream);
  }

  void softmax_backward(bool log, float* dx, const float* dy, const float* y, int64_t N, int64_t C) override {
    if (N <= 0 || C <= 0) return;
    DeviceState& s = activate_for(dx, "softmax_backward");
    if (log)
      ::moa::kernels::cuda::log_softmax_backward(dx, dy, y, N, C, s.stream);
    else
      ::moa::kernels::cuda::softmax_backward(dx, dy, y, N, C, s.stream);
  }

  void cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* targets, int64_t N, int64_t V,
                             int32_t ignore_index) override {
    DeviceState& s = activate_for(loss, "cross_entropy_forward");
    ::moa::kernels::cuda::cross_entropy_forward(loss, lse, logits, targets, N, V, ignore_index, s.stream);
  }

  void cross_entropy_backward(float* dlogits, const float* dloss, const float* logits, const float* lse,
                              const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index) override {
    detail::check_rows("cross_entropy_backward", N, V);
    if (N == 0) return;
    DeviceState& s = activate_for(dlogits, "cross_entropy_backward");
    Scratch scratch(s, sizeof(float));
    ::moa::kernels::cuda::cross_entropy_backward(dlogits, dloss, logits, lse, targets, N, V, scratch.as<float>(),
                                                 ignore_index, s.stream);
  }

  void cross_entropy_rows(float* loss_rows, float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                          int64_t V, int32_t ignore_index, float scale) override {
    detail::check_rows("cross_entropy_rows", N, V);
    if (N == 0) return;
    DeviceState& s = activate_for(loss_rows, "cross_entropy_rows");
    ::moa::kernels::cuda::cross_entropy_rows(loss_rows, dlogits, logits, targets, N, V, ignore_index, scale, s.stream);
  }

  void layer_norm_forward(float* out, float* mean, float* rstd, const float* x, const float* weight, const float* bias,
                          int64_t N, int64_t C, float eps) override {
    detail::check_norm("layer_norm_forward", N, C);
    if (N == 0) return;
    DeviceState& s = activate_for(out, "layer_norm_forward");
    ::moa::kernels::cuda::layer_norm_forward(out, mean, rstd, x, weight, bias, N, C, eps, s.stream);
  }

  void layer_norm_backward(float* dx, float* dweight, float* dbias, const float* dout, const float* x,
                           const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) override {
    detail::check_norm("layer_norm_backward", N, C);
    const void* any = dx ? static_cast<const void*>(dx) : dweight ? static_cast<const void*>(dweight) : dbias;
    if (N == 0 || !any) return;
    DeviceState& s = activate_for(any, "layer_norm_backward");
    ::moa::kernels::cuda::layer_norm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd, N, C, s.stream);
  }

  void rms_norm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t N, int64_t C,
                        float eps) override {
    detail::check_norm("rms_norm_forward", N, C);
    if (N == 0) return;
    DeviceState& s = activate_for(out, "rms_norm_forward");
    ::moa::kernels::cuda::rms_norm_forward(out, rstd, x, weight, N, C, eps, s.stream);
  }

  void rms_norm_backward(float* dx, float* dweight, const float* dout, const float* x, const float* weight,
                         const float* rstd, int64_t N, int64_t C) override {
    detail::check_norm("rms_norm_backward", N, C);
    const void* any = dx ? static_cast<const void*>(dx) : dweight;
    if (N == 0 || !any) return;
    DeviceState& s = activate_for(any, "rms_norm_backward");
    ::moa::kernels::cuda::rms_norm_backward(dx, dweight, dout, x, weight, rstd, N, C, s.stream);
  }

  void embedding_forward(float* out, const int32_t* ids, const float* weight, int64_t N, int64_t C) override {
    if (N <= 0 || C <= 0) return;
    DeviceState& s = activate_for(out, "embedding_forward");
    ::moa::kernels::cuda::embedding_forward(out, ids, weight, N, C, s.stream);
  }

  void embedding_backward(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t C) override {
    if (N <= 0 || C <= 0) return;
    DeviceState& s = activate_for(dweight, "embedding_backward");
    ::moa::kernels::cuda::embedding_backward(dweight, dout, ids, N, C, s.stream);
  }

  void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v, const AttentionDims& d,
                         float scale) override {
    const AttentionShape sh = attention_shape(d);
    detail::check_attention("attention_forward", sh);
    if (sh.B * sh.Hq * sh.Tq == 0) return;
    DeviceState& s = activate_for(out, "attention_forward");
    if (use_flash_attention(sh))
      flash_attention_forward(out, lse, q, k, v, sh, scale, s.stream);
    else
      ::moa::kernels::cuda::attention_forward(out, lse, q, k, v, sh, scale, s.stream);
  }

  // dq written by the dq kernel (which also writes delta = dout . out); without dq, delta comes
  // from row_dot. dk and dv come from one kernel: a missing one gets scratch.
  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                          const float* v, const float* out, const float* lse, const AttentionDims& d,
                          float scale) override {
    AttentionShape sh = attention_shape(d);
    detail::check_attention("attention_backward", sh);
    const void* any = dq ? static_cast<const void*>(dq) : dk ? static_cast<const void*>(dk) : dv;
    const int64_t qrows = sh.B * sh.Hq * sh.Tq, krows = sh.B * sh.Hkv * sh.Tk;
    if (!any || (qrows == 0 && krows == 0)) return;
    DeviceState& s = activate_for(any, "attention_backward");
    const bool want_kv = (dk || dv) && krows > 0;
    if (qrows == 0 && !want_kv) return;
    Scratch delta(s, static_cast<std::size_t>(qrows > 0 ? qrows : 1) * sizeof(float));
    Scratch kv_scratch(s, want_kv && (!dk || !dv) ? static_cast<std::size_t>(krows * sh.D) * sizeof(float) : 0);
    float* dk_out = dk ? dk : kv_scratch.as<float>();
    float* dv_out = dv ? dv : kv_scratch.as<float>();
    if (!dk) sh.layout.dk = HeadLayout::contiguous(sh.Hkv, sh.Tk, sh.D);  // the scratch's layout
    if (!dv) sh.layout.dv = HeadLayout::contiguous(sh.Hkv, sh.Tk, sh.D);
    if (use_flash_attention(sh)) {  // delta first, then the dq and dk/dv kernels
      attention_delta(delta.as<float>(), dout, out, sh, s.stream);
      flash_attention_backward(dq, want_kv ? dk_out : nullptr, want_kv ? dv_out : nullptr, delta.as<float>(), dout, q,
                               k, v, lse, sh, scale, s.stream);
      return;
    }
    sh = sh.resolved();  // the row kernels below are launched here, not through their launcher
    detail::dispatch_head(sh.D, [&]<int DPL>() {
      if (qrows > 0) {
        if (dq) {
          MOA_CUDA_LAUNCH(detail::attention_dq_kernel<DPL>, detail::attn_blocks(qrows), 32 * detail::attn_warps, 0,
                          s.stream, dq, delta.as<float>(), dout, q, k, v, out, lse, sh, scale);
          MOA_CUDA_LAUNCH_CHECK();
        } else if (want_kv) {
          attention_delta(delta.as<float>(), dout, out, sh, s.stream);
        }
      }
      if (want_kv) {
        MOA_CUDA_LAUNCH(detail::attention_dkv_kernel<DPL>, detail::attn_blocks(krows), 32 * detail::attn_warps, 0,
                        s.stream, dk_out, dv_out, dout, q, k, v, lse, delta.as<float>(), sh, scale);
        MOA_CUDA_LAUNCH_CHECK();
      }
    });
  }

  void rope_heads(float* y, const HeadLayout& y_layout, const float* x, const HeadLayout& x_layout, int64_t B,
                  int64_t H, int64_t T, int64_t D, int64_t start, double theta, int sign) override {
    MOA_CHECK(B >= 0 && H >= 0 && T >= 0 && D >= 0 && D % 2 == 0, ShapeError,
              "rope: expected B, H, T >= 0 and an even head size D, got B ", B, ", H ", H, ", T ", T, ", D ", D);
    MOA_CHECK(start >= 0 && theta > 0 && (sign == 1 || sign == -1), ValueError,
              "rope: expected start >= 0, theta > 0 and sign +1 or -1, got start ", start, ", theta ", theta,
              ", sign ", sign);
    if (B == 0 || H == 0 || T == 0 || D == 0) return;
    DeviceState& s = activate_for(y, "rope");
    const int64_t half = D / 2;
    // Locked until the launch is queued: another thread growing the table releases the old one.
    std::lock_guard<std::mutex> lock(s.cache_mutex);
    const DeviceState::RopeTable& t = rope_table_locked(s, D, theta, start + T);
    ::moa::kernels::cuda::rope(y, y_layout, x, x_layout, t.data, t.data + t.positions * half, B, H, T, half, start,
                               sign, s.stream);
  }

  // ---- optimiser ---------------------------------------------------------------------------------------------------
  void adamw_step(float* w, float* m, float* v, const float* g, int64_t n, double lr, double beta1, double beta2,
                  double eps, double weight_decay, int64_t step) override {
    MOA_CHECK(step >= 1, ValueError, "adamw_step: expected step >= 1 (steps count from 1), got ", step);
    if (n <= 0) return;
    DeviceState& s = activate_for(w, "adamw_step");
    ::moa::kernels::cuda::adamw_step(w, m, v, g, n, AdamWScalars::make(lr, beta1, beta2, eps, weight_decay, step),
                                     s.stream);
  }

  void adamw_step_all(const std::vector<AdamWBuffers>& params, double lr, double beta1, double beta2, double eps,
                      double weight_decay, int64_t step) override {
    MOA_CHECK(step >= 1, ValueError, "adamw_step: expected step >= 1 (steps count from 1), got ", step);
    std::vector<AdamWTensor> list;
    list.reserve(params.size());
    for (const AdamWBuffers& p : params)
      if (p.n > 0) list.push_back({p.w, p.m, p.v, p.g, p.n});
    if (list.empty()) return;
    DeviceState& s = activate_for(list.front().w, "adamw_step_all");
    adamw_step_multi(list.data(), list.size(), AdamWScalars::make(lr, beta1, beta2, eps, weight_decay, step), s.stream);
  }

  void scale_all(const std::vector<std::pair<float*, int64_t>>& buffers, double coef) override {
    const float* first = nullptr;
    for (const auto& [x, n] : buffers)
      if (n > 0 && !first) first = x;
    if (!first) return;
    DeviceState& s = activate_for(first, "scale_all");
    scale_multi(buffers.data(), buffers.size(), static_cast<float>(coef), s.stream);
  }

  // ---- grouped LoRA ------------------------------------------------------------------------------------------------
  void grouped_lora_forward(float* y, float* h, const float* x, const std::vector<const float*>& A,
                            const std::vector<const float*>& B, const int32_t* rows, const int32_t* seg,
                            const float* w, float scale, const GroupedLoRADims& d, bool rows_unique) override {
    const GroupedLoRAShape sh = lora_shape(d);
    detail::check_grouped_shape("grouped_lora_forward", sh);
    check_expert_vectors("grouped_lora_forward", d.E, A.size(), B.size(), 0, 0);
    if (sh.M == 0) return;
    DeviceState& s = activate_for(h, "grouped_lora_forward");
    std::vector<uintptr_t> key;
    key.reserve(2 * A.size());
    for (const float* p : A) key.push_back(reinterpret_cast<uintptr_t>(p));
    for (const float* p : B) key.push_back(reinterpret_cast<uintptr_t>(p));
    std::lock_guard<std::mutex> lock(s.cache_mutex);
    const float* const* arr = reinterpret_cast<const float* const*>(pointer_array_locked(s, std::move(key)));
    ::moa::kernels::cuda::grouped_lora_forward(y, h, x, arr, arr + d.E, rows, seg, w, scale, sh, rows_unique,
                                               s.stream);
  }

  void grouped_lora_backward(float* dx, const std::vector<float*>& dA, const std::vector<float*>& dB, float* dw,
                             float* dh, const float* g, const float* x, const float* h,
                             const std::vector<const float*>& A, const std::vector<const float*>& B,
                             const int32_t* rows, const int32_t* seg, const float* w, float scale,
                             const GroupedLoRADims& d, bool rows_unique) override {
    const GroupedLoRAShape sh = lora_shape(d);
    detail::check_grouped_shape("grouped_lora_backward", sh);
    check_expert_vectors("grouped_lora_backward", d.E, A.size(), B.size(), dA.size(), dB.size());
    if (sh.M == 0 && !d.write_grads) return;
    const void* any = sh.M > 0 ? dh : dx;  // with M == 0 only the written gradients are touched
    for (float* p : dA) any = any ? any : p;
    for (float* p : dB) any = any ? any : p;
    if (!any) return;
    DeviceState& s = activate_for(any, "grouped_lora_backward");
    bool want_dA = false, want_dB = false;
    for (float* p : dA) want_dA = want_dA || p;
    for (float* p : dB) want_dB = want_dB || p;
    const std::size_t E = static_cast<std::size_t>(d.E);
    std::vector<uintptr_t> key(4 * E, 0);  // A, B, dA, dB (null entries: not wanted)
    for (std::size_t e = 0; e < E; ++e) {
      key[e] = reinterpret_cast<uintptr_t>(A[e]);
      key[E + e] = reinterpret_cast<uintptr_t>(B[e]);
      if (want_dA) key[2 * E + e] = reinterpret_cast<uintptr_t>(dA[e]);
      if (want_dB) key[3 * E + e] = reinterpret_cast<uintptr_t>(dB[e]);
    }
    std::lock_guard<std::mutex> lock(s.cache_mutex);
    const uintptr_t* arr = pointer_array_locked(s, std::move(key));
    const float* const* dev_A = reinterpret_cast<const float* const*>(arr);
    const float* const* dev_B = reinterpret_cast<const float* const*>(arr + E);
    float* const* dev_dA = want_dA ? reinterpret_cast<float* const*>(arr + 2 * E) : nullptr;
    float* const* dev_dB = want_dB ? reinterpret_cast<float* const*>(arr + 3 * E) : nullptr;
    ::moa::kernels::cuda::grouped_lora_backward(dx, dev_dA, dev_dB, dw, dh, g, x, h, dev_A, dev_B, rows, seg, w, scale,
                                                sh, rows_unique, s.stream);
  }

 private:
  using LtPlan = DeviceState::LtPlan;

  static cublasComputeType_t compute_type(MatmulPrecision precision, const char* op) {
    switch (precision) {
      case MatmulPrecision::highest: return CUBLAS_COMPUTE_32F;
      case MatmulPrecision::tf32: return CUBLAS_COMPUTE_32F_FAST_TF32;
      case MatmulPrecision::bf16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    }
    throw ValueError(::moa::detail::cat(op, ": unknown precision ", static_cast<int>(precision)));
  }

  // The cuBLASLt plan of a biased product (caller holds s.blas_mutex), or null when cuBLASLt has no
  // algorithm for it. Keyed by the shape, the precision and the operands' alignments, which the
  // heuristic is told (it cannot see the pointers).
  LtPlan* lt_plan(DeviceState& s, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                  const float* B, int64_t ldb, const float* bias, const float* C, int64_t ldc,
                  MatmulPrecision precision) {
    // The largest power of two up to 256 dividing the address: the heuristic must only pick algorithms
    // that work at the operands' alignment (its default assumes 256 bytes; a row view may have 4).
    const auto alignment = [](const void* p) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(p);
      uint32_t align = 256;
      while (align > 1 && a % align != 0) align /= 2;
      return align;
    };
    const uint32_t align_a = alignment(A), align_b = alignment(B), align_c = alignment(C);
    const uintptr_t flags = uintptr_t(ta) | uintptr_t(tb) << 1 | uintptr_t(precision) << 2;
    std::vector<uintptr_t> key{flags,
                               uintptr_t(M),
                               uintptr_t(N),
                               uintptr_t(K),
                               uintptr_t(lda),
                               uintptr_t(ldb),
                               uintptr_t(ldc),
                               uintptr_t(align_a),
                               uintptr_t(align_b),
                               uintptr_t(align_c),
                               uintptr_t(alignment(bias))};
    auto it = s.lt_plans.find(key);
    if (it != s.lt_plans.end()) return it->second.usable ? &it->second : nullptr;
    const cublasComputeType_t compute = compute_type(precision, "gemm_bias");
    if (!s.lt) MOA_CUBLAS_CHECK(cublasLtCreate(&s.lt));
    if (!s.lt_workspace) s.lt_workspace = s.alloc.allocate(kLtWorkspace, s.stream);
    if (s.lt_plans.size() >= kMaxLtPlans) clear_lt_plans(s);  // e.g. one per prompt length when serving
    LtPlan plan;
    try {
      MOA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, compute, CUDA_R_32F));
      const int32_t op_a = tb ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
      const uint32_t epilogue = CUBLASLT_EPILOGUE_BIAS;
      MOA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
      MOA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
      MOA_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
      MOA_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
      // Column-major views of the row-major operands: cuBLASLt's A is our B, its B our A, its D C^T.
      MOA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_32F, tb ? K : N, tb ? N : K, ldb));
      MOA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_32F, ta ? M : K, ta ? K : M, lda));
      MOA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_32F, N, M, ldc));
      cublasLtMatmulPreference_t pref = nullptr;
      MOA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
      const uint64_t max_ws = kLtWorkspace;
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      cublasStatus_t st =
          cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_ws, sizeof(max_ws));
      // cuBLASLt's A is our B, its B our A, its C and D our C.
      const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
          {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}};
      for (const auto& [attr, value] : aligns)
        if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value));
      if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulAlgoGetHeuristic(s.lt, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1, &result, &found);
      cublasLtMatmulPreferenceDestroy(pref);
      if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED)
        detail::throw_cublas(st, "cublasLtMatmulAlgoGetHeuristic(bias epilogue)", __FILE__, __LINE__);
      plan.usable = st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS &&
                    result.workspaceSize <= kLtWorkspace;
      plan.algo = result.algo;
      plan.workspace = result.workspaceSize;
    } catch (...) {
      destroy_lt_plan(plan);
      throw;
    }
    LtPlan& stored = s.lt_plans.emplace(std::move(key), plan).first->second;
    return stored.usable ? &stored : nullptr;
  }

  static void destroy_lt_plan(LtPlan& plan) noexcept {
    if (plan.a) cublasLtMatrixLayoutDestroy(plan.a);
    if (plan.b) cublasLtMatrixLayoutDestroy(plan.b);
    if (plan.c) cublasLtMatrixLayoutDestroy(plan.c);
    if (plan.desc) cublasLtMatmulDescDestroy(plan.desc);
    plan = LtPlan{};
  }
  // Every plan (caller holds s.blas_mutex). Descriptors are host objects: no device work waits on them.
  static void clear_lt_plans(DeviceState& s) noexcept {
    for (auto& [key, plan] : s.lt_plans) destroy_lt_plan(plan);
    s.lt_plans.clear();
  }

  // A block of the device's allocator for the duration of one call (released when the call has
  // queued its work: later work on the stream runs after it).
  class Scratch {
   public:
    Scratch(DeviceState& s, std::size_t nbytes) : s_(&s), p_(nbytes ? s.alloc.allocate(nbytes, s.stream) : nullptr) {}
    ~Scratch() {
      if (p_) {
        try {
          s_->alloc.release(p_);
        } catch (...) {
        }
      }
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    void* get() const { return p_; }
    template <class T>
    T* as() const {
      return static_cast<T*>(p_);
    }

   private:
    DeviceState* s_;
    void* p_;
  };

  static void set_device(int device) {
    int cur = -1;
    MOA_CUDA_CHECK(cudaGetDevice(&cur));
    if (cur != device) MOA_CUDA_CHECK(cudaSetDevice(device));
  }

  // The device's state, created on first use (stream, cuBLAS handle, allocator).
  DeviceState& state(int device) const {
    const int n = device_count();
    MOA_CHECK(device >= 0 && device < n, DeviceError, "cuda: device ", device, " is not available: ", n,
              " device(s)", n == 0 ? " (no GPU found or the driver is missing)" : "");
    DeviceState* s = states_[device].load(std::memory_order_acquire);
    if (s) return *s;
    std::lock_guard<std::mutex> lock(init_mutex_);
    s = states_[device].load(std::memory_order_relaxed);
    if (s) return *s;
    set_device(device);
    auto st = std::make_unique<DeviceState>();
    st->device = device;
    MOA_CUDA_CHECK(cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking));
    try {
      MOA_CUBLAS_CHECK(cublasCreate(&st->blas));
      MOA_CUBLAS_CHECK(cublasSetStream(st->blas, st->stream));
    } catch (...) {
      if (st->blas) cublasDestroy(st->blas);
      cudaStreamDestroy(st->stream);
      throw;
    }
    s = st.release();  // never destroyed (see the file comment)
    states_[device].store(s, std::memory_order_release);
    return *s;
  }

  // Makes `device` current and returns its state.
  DeviceState& activate(int device) const {
    DeviceState& s = state(device);
    set_device(device);
    return s;
  }

  // The device that owns the device pointer p (one device: 0, without asking the driver).
  int device_of(const void* p, const char* op) const {
    if (device_count() <= 1) return 0;
    cudaPointerAttributes a{};
    MOA_CUDA_CHECK(cudaPointerGetAttributes(&a, p));
    MOA_CHECK(a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged, DeviceError, op, ": pointer ", p,
              " is not cuda device memory");
    return a.device;
  }

  DeviceState& activate_for(const void* p, const char* op) const { return activate(device_of(p, op)); }

  // With bf16 products (MatmulPrecision::bf16) attention runs on tensor cores too, where the tiles
  // fit (flash_attention.cuh); highest and tf32 keep the exact float32 kernels.
  static bool use_flash_attention(const AttentionShape& sh) {
    return ::moa::matmul_precision() == MatmulPrecision::bf16 && flash_attention_supported(sh);
  }

  static AttentionShape attention_shape(const AttentionDims& d) {
    return AttentionShape{.B = d.B, .Hq = d.Hq, .Hkv = d.Hkv, .Tq = d.Tq, .Tk = d.Tk, .D = d.D, .layout = d.layout};
  }

  static GroupedLoRAShape lora_shape(const GroupedLoRADims& d) {
    return GroupedLoRAShape{.N = d.N,
                            .M = d.M,
                            .E = d.E,
                            .In = d.In,
                            .Out = d.Out,
                            .R = d.R,
                            .write_grads = d.write_grads,
                            .add_dx = d.add_dx};
  }

  static void check_expert_vectors(const char* op, int64_t E, std::size_t nA, std::size_t nB, std::size_t ndA,
                                   std::size_t ndB) {
    const auto e = static_cast<std::size_t>(E);
    MOA_CHECK(nA == e && nB == e, ShapeError, op, ": expected ", E, " expert pointers in A and B, got ", nA, " and ",
              nB);
    MOA_CHECK((ndA == 0 || ndA == e) && (ndB == 0 || ndB == e), ShapeError, op,
              ": expected dA and dB empty or with ", E, " entries, got ", ndA, " and ", ndB);
  }

  // A device copy of `key` (pointer values), cached by value: a repeated call uploads nothing.
  // The caller holds s.cache_mutex until its launches are queued (an eviction releases the block).
  const uintptr_t* pointer_array_locked(DeviceState& s, std::vector<uintptr_t>&& key) {
    auto it = s.pointer_arrays.find(key);
    if (it != s.pointer_arrays.end()) return static_cast<const uintptr_t*>(it->second);
    if (s.pointer_arrays.size() >= 256) {  // bounded: start over (blocks go back to the allocator)
      for (auto& [k, p] : s.pointer_arrays) s.alloc.release(p);
      s.pointer_arrays.clear();
    }
    const std::size_t bytes = key.size() * sizeof(uintptr_t);
    void* p = s.alloc.allocate(bytes, s.stream);
    try {
      // Uploaded from the key kept in the map, which lives as long as the device copy.
      it = s.pointer_arrays.emplace(std::move(key), p).first;
      MOA_CUDA_CHECK(cudaMemcpyAsync(p, it->first.data(), bytes, cudaMemcpyHostToDevice, s.stream));
    } catch (...) {
      for (auto j = s.pointer_arrays.begin(); j != s.pointer_arrays.end(); ++j)
        if (j->second == p) {
          s.pointer_arrays.erase(j);
          break;
        }
      s.alloc.release(p);
      throw;
    }
    return static_cast<const uintptr_t*>(p);
  }

  // The rope tables for (D, theta) covering positions [0, needed): cos (P, D/2) then sin (P, D/2),
  // float, computed as moa::detail::rope_tables computes them (double, then rounded to float).
  // The caller holds s.cache_mutex.
  const DeviceState::RopeTable& rope_table_locked(DeviceState& s, int64_t D, double theta, int64_t needed) {
    DeviceState::RopeTable* t = nullptr;
    for (auto& r : s.rope_tables)
      if (r.D == D && r.theta == theta) t = &r;
    if (t && t->positions >= needed) return *t;
    if (!t) {
      if (s.rope_tables.size() >= 16) {  // bounded: drop the oldest
        s.alloc.release(s.rope_tables.front().data);
        s.rope_tables.erase(s.rope_tables.begin());
      }
      s.rope_tables.push_back(DeviceState::RopeTable{D, theta, 0, nullptr});
      t = &s.rope_tables.back();
    }
    int64_t P = t->positions * 2;
    if (P < needed) P = needed;
    if (P < 64) P = 64;
    const int64_t half = D / 2;
    std::vector<float> host(static_cast<std::size_t>(2 * P * half));
    for (int64_t i = 0; i < half; ++i) {
      const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(D));
      for (int64_t p = 0; p < P; ++p) {
        const double a = static_cast<double>(p) * inv_freq;
        host[static_cast<std::size_t>(p * half + i)] = static_cast<float>(std::cos(a));
        host[static_cast<std::size_t>(P * half + p * half + i)] = static_cast<float>(std::sin(a));
      }
    }
    float* data = static_cast<float*>(s.alloc.allocate(host.size() * sizeof(float), s.stream));
    try {
      // Pageable host memory: staged before cudaMemcpyAsync returns, so `host` may go.
      MOA_CUDA_CHECK(cudaMemcpyAsync(data, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice, s.stream));
    } catch (...) {
      s.alloc.release(data);
      throw;
    }
    if (t->data) s.alloc.release(t->data);  // stream order: work queued before still reads it first
    t->data = data;
    t->positions = P;
    return *t;
  }

  mutable std::array<std::atomic<DeviceState*>, kMaxDevices> states_{};
  mutable std::mutex init_mutex_;
};

}  // namespace moa::kernels::cuda
