// moa/kernels/cuda/elementwise.cuh: the layout and elementwise kernels behind moa::DeviceBackend
// (include/moa/core/backend.hpp) that the other kernel headers do not have:
//   - strided fill and strided copy with dtype conversion among f32, i32 and bf16;
//   - take (gather by offsets) and put_add (scatter-add by offsets, atomics);
//   - broadcast binary ops (add, sub, mul, div) with per-operand strides;
//   - the unary maps of moa::UnaryOp, forward and backward;
//   - row sums (double accumulation), rotary embedding from position tables, a strided batched
//     matrix scale (C = beta C: a product with K == 0) and attention's delta (dout . out per row).
//
// Layouts: a strided kernel gets shape and strides by value (StridedLayout, at most kMaxDeviceRank
// axes), after the host has dropped axes of size 1 and merged axes that are contiguous in every
// operand, so most calls run with rank 1 or 2. Indices are unsigned 32-bit below 2^31 elements
// (cheaper divisions; index + grid stride cannot wrap), 64-bit otherwise; offsets are 64-bit.
// Every kernel is a grid-stride loop, n == 0 launches nothing, and every launch is checked.
//
// Semantics match the cpu ops exactly where the cpu arithmetic is exact IEEE (copies, conversions,
// add/sub/mul/div, scale/shift/neg/sqrt/relu, rope from the same float tables): bit-identical.
// exp/log/tanh/pow/gelu/silu use CUDA's math functions (a few ulp from glibc).
// bf16 is stored as raw uint16_t bits; conversions are moa/core/half.hpp's, bit for bit (round to
// nearest even, NaN stays a quiet NaN with its payload's top bits).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moa/core/backend.hpp"
#include "moa/core/error.hpp"
#include "moa/core/head_layout.hpp"
#include "moa/core/shape.hpp"
#include "moa/kernels/cuda/check.cuh"
#include "moa/kernels/cuda/launch.cuh"
#include "moa/kernels/cuda/reduce.cuh"

namespace moa::kernels::cuda {

// Shape and per-operand strides (elements) of a strided kernel, passed by value.
template <int NOps>
struct StridedLayout {
  int rank = 0;
  int64_t shape[kMaxDeviceRank] = {};
  int64_t strides[NOps][kMaxDeviceRank] = {};
};

// The layout of `shape` read with NOps stride vectors, simplified: size-1 axes dropped, axes
// contiguous in every operand merged. Sets numel; a rank above kMaxDeviceRank after merging
// throws ShapeError naming `op`. A zero-size shape gives numel 0 (nothing to launch).
template <int NOps>
StridedLayout<NOps> make_layout(const char* op, const Shape& shape, const std::array<const Strides*, NOps>& strides,
                                int64_t& numel) {
  for (int k = 0; k < NOps; ++k)
    MOA_CHECK(strides[k]->size() == shape.size(), ShapeError, op, ": expected ", shape.size(),
              " strides for shape ", shape_str(shape), ", got ", strides[k]->size(), " in operand ", k);
  numel = 1;
  for (int64_t d : shape) {
    MOA_CHECK(d >= 0, ShapeError, op, ": expected non-negative sizes, got shape ", shape_str(shape));
    numel *= d;
  }
  StridedLayout<NOps> L;
  if (numel == 0) return L;
  // Axes of size > 1, outermost first, merged with the previous kept axis when contiguous in all.
  int64_t sh[64];
  int64_t st[NOps][64];
  int r = 0;
  MOA_CHECK(shape.size() <= 64, ShapeError, op, ": rank ", shape.size(), " is above 64");
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    if (r > 0) {
      bool merge = true;
      for (int k = 0; k < NOps; ++k)
        if (st[k][r - 1] != (*strides[k])[d] * shape[d]) merge = false;
      if (merge) {
        sh[r - 1] *= shape[d];
        for (int k = 0; k < NOps; ++k) st[k][r - 1] = (*strides[k])[d];
        continue;
      }
    }
    sh[r] = shape[d];
    for (int k = 0; k < NOps; ++k) st[k][r] = (*strides[k])[d];
    ++r;
  }
  if (r == 0) {  // one element
    sh[0] = 1;
    for (int k = 0; k < NOps; ++k) st[k][0] = 1;
    r = 1;
  }
  MOA_CHECK(r <= kMaxDeviceRank, ShapeError, op, ": shape ", shape_str(shape), " has ", r,
            " non-mergeable axes; device kernels take at most ", kMaxDeviceRank, " (make the tensor contiguous first)");
  L.rank = r;
  for (int d = 0; d < r; ++d) {
    L.shape[d] = sh[d];
    for (int k = 0; k < NOps; ++k) L.strides[k][d] = st[k][d];
  }
  return L;
}

// True when the layout is one axis with stride 1 in every operand (a flat loop needs no division).
template <int NOps>
bool layout_is_flat(const StridedLayout<NOps>& L) {
  if (L.rank != 1) return false;
  for (int k = 0; k < NOps; ++k)
    if (L.strides[k][0] != 1) return false;
  return true;
}

namespace detail {

constexpr int ew_threads = 256;

// The NOps element offsets of flat (row-major) index i of the layout.
template <int NOps, class Index>
__device__ __forceinline__ void strided_offsets(const StridedLayout<NOps>& L, Index i, int64_t (&off)[NOps]) {
  MOA_UNROLL
  for (int k = 0; k < NOps; ++k) off[k] = 0;
  MOA_UNROLL
  for (int d = kMaxDeviceRank - 1; d >= 0; --d) {
    if (d < L.rank) {
      const Index s = static_cast<Index>(L.shape[d]);
      const Index q = i / s, rem = i - q * s;
      MOA_UNROLL
      for (int k = 0; k < NOps; ++k) off[k] += static_cast<int64_t>(rem) * L.strides[k][d];
      i = q;
    }
  }
}

// ---- bf16 bits, as moa/core/half.hpp -----------------------------------------------------------
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}

__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);                                    // ties to even
  return static_cast<uint16_t>((x + rounding) >> 16);
}

// Element conversion; uint16_t is bf16 here (the only 16-bit type the kernels see).
template <class D, class S>
__device__ __forceinline__ D convert(S v) {
  if constexpr (std::is_same_v<D, S>) {
    return v;
  } else if constexpr (std::is_same_v<S, uint16_t>) {
    return convert<D, float>(bf16_bits_to_f32(v));
  } else if constexpr (std::is_same_v<D, uint16_t>) {
    return f32_to_bf16_bits(static_cast<float>(v));
  } else {
    return ::moa::convert_value<D>(v);  // f32 <-> i32: as on the host (moa/core/dtype.hpp)
  }
}

// ---- layout kernels -------------------------------------------------------------------------------
template <class T, class Index>
__global__ void fill_strided_kernel(T* dst, StridedLayout<1> L, Index n, T value) {
  for (Index i = blockIdx.x * Index(blockDim.x) + threadIdx.x; i < n; i += Index(gridDim.x) * blockDim.x) {
    int64_t off[1];
    strided_offsets(L, i, off);
    dst[off[0]] = value;
  }
}

template <class T>
__global__ void fill_flat_kernel(T* dst, int64_t n, T value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}

template <class D, class S, class Index>
__global__ void copy_strided_kernel(D* dst, const S* src, StridedLayout<2> L, Index n) {
  for (Index i = blockIdx.x * Index(blockDim.x) + threadIdx.x; i < n; i += Index(gridDim.x) * blockDim.x) {
    int64_t off[2];
    strided_offsets(L, i, off);
    dst[off[0]] = convert<D, S>(src[off[1]]);
  }
}

template <class D, class S>
__global__ void convert_flat_kernel(D* dst, const S* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = convert<D, S>(src[i]);
}

static __global__ void take_kernel(float* out, const float* x, const int32_t* offsets, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = x[offsets[i]];
}

static __global__ void put_add_kernel(float* out, const int32_t* offsets, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    atomicAdd(out + offsets[i], src[i]);
}

// ---- binary ----------------------------------------------------------------------------------------
template <BinaryOp Op>
__device__ __forceinline__ float binary_apply(float a, float b) {
  if constexpr (Op == BinaryOp::add) return a + b;
  else if constexpr (Op == BinaryOp::sub) return a - b;
  else if constexpr (Op == BinaryOp::mul) return a * b;
  else return a / b;  // IEEE division (nvcc's default -prec-div=true)
}

template <BinaryOp Op, class Index>
__global__ void binary_strided_kernel(float* out, const float* a, const float* b, StridedLayout<3> L, Index n) {
  for (Index i = blockIdx.x * Index(blockDim.x) + threadIdx.x; i < n; i += Index(gridDim.x) * blockDim.x) {
    int64_t off[3];
    strided_offsets(L, i, off);
    out[off[0]] = binary_apply<Op>(a[off[1]], b[off[2]]);
  }
}

template <BinaryOp Op>
__global__ void binary_flat_kernel(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = binary_apply<Op>(a[i], b[i]);
}

// ---- unary -----------------------------------------------------------------------------------------
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// 1 + tanh(u) and 1 - tanh(u) from e = exp(2u), r = 1 / (e + 1), as kernels/cpu/activation.hpp:
// no cancellation where tanh is near -1 or 1; 2u capped at 80 so e r stays finite.
__device__ __forceinline__ void tanh_sides(float u, float& plus, float& minus) {
  const float e = expf(fminf(2.f * u, 80.f)), r = 1.f / (e + 1.f);
  plus = 2.f * e * r;
  minus = 2.f * r;
}

// y = f(x; p), with the cpu ops' arithmetic (moa/ops/elementwise.hpp): scale and shift in double
// rounded to float, pow in double.
template <UnaryOp Op>
__device__ __forceinline__ float unary_apply(float x, double p) {
  if constexpr (Op == UnaryOp::scale) return static_cast<float>(static_cast<double>(x) * p);
  else if constexpr (Op == UnaryOp::shift) return static_cast<float>(static_cast<double>(x) + p);
  else if constexpr (Op == UnaryOp::neg) return -x;
  else if constexpr (Op == UnaryOp::exp) return expf(x);
  else if constexpr (Op == UnaryOp::log) return logf(x);
  else if constexpr (Op == UnaryOp::sqrt) return sqrtf(x);
  else if constexpr (Op == UnaryOp::tanh) return tanhf(x);
  else if constexpr (Op == UnaryOp::pow)
    return static_cast<float>(::pow(static_cast<double>(x), p));
  else if constexpr (Op == UnaryOp::relu) return x > 0.f ? x : 0.f;
  else if constexpr (Op == UnaryOp::gelu) {
    float plus, minus;
    tanh_sides(kGeluC * (x + kGeluA * x * x * x), plus, minus);
    return 0.5f * x * plus;
  } else {  // silu
    return x / (1.f + expf(-x));
  }
}

// f'(x) (y = f(x) given), as the cpu ops' derivatives, rounded to float before multiplying by g.
template <UnaryOp Op>
__device__ __forceinline__ float unary_grad(float x, float y, double p) {
  if constexpr (Op == UnaryOp::scale) return static_cast<float>(p);
  else if constexpr (Op == UnaryOp::shift) return 1.f;
  else if constexpr (Op == UnaryOp::neg) return -1.f;
  else if constexpr (Op == UnaryOp::exp) return y;
  else if constexpr (Op == UnaryOp::log) return 1.f / x;
  else if constexpr (Op == UnaryOp::sqrt) return 1.f / (2.f * y);
  else if constexpr (Op == UnaryOp::tanh) return 1.f - y * y;
  else if constexpr (Op == UnaryOp::pow)
    return static_cast<float>(p * ::pow(static_cast<double>(x), p - 1.0));
  else if constexpr (Op == UnaryOp::relu) return x > 0.f ? 1.f : 0.f;
  else if constexpr (Op == UnaryOp::gelu) {
    float plus, minus;
    tanh_sides(kGeluC * (x + kGeluA * x * x * x), plus, minus);
    const float du = kGeluC * (1.f + 3.f * kGeluA * x * x);
    return 0.5f * plus + 0.5f * x * plus * minus * du;
  } else {  // silu
    const float s = 1.f / (1.f + expf(-x));
    return s * (1.f + x * (1.f - s));
  }
}

// Whether the derivative reads y (the forward's output).
constexpr bool unary_grad_reads_y(UnaryOp op) {
  return op == UnaryOp::exp || op == UnaryOp::sqrt || op == UnaryOp::tanh;
}
// Whether the derivative reads x.
constexpr bool unary_grad_reads_x(UnaryOp op) {
  return op == UnaryOp::log || op == UnaryOp::pow || op == UnaryOp::relu || op == UnaryOp::gelu ||
         op == UnaryOp::silu;
}

template <UnaryOp Op>
__global__ void unary_kernel(float* y, const float* x, int64_t n, double p) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = unary_apply<Op>(x[i], p);
}

template <UnaryOp Op>
__global__ void unary_backward_kernel(float* gx, const float* g, const float* x, const float* y, int64_t n, double p) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float xi = unary_grad_reads_x(Op) ? x[i] : 0.f;
    const float yi = unary_grad_reads_y(Op) ? y[i] : 0.f;
    gx[i] = g[i] * unary_grad<Op>(xi, yi, p);
  }
}

// ---- row sums (double accumulation) -------------------------------------------------------------------
// One warp per row (short rows); rows grid-strided over warps.
static __global__ void sum_rows_warp_kernel(float* out, const float* x, int64_t rows, int64_t cols, double scale) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const float* xr = x + r * cols;
    double s = 0.0;
    for (int64_t c = lane; c < cols; c += 32) s += static_cast<double>(xr[c]);
    s = warp_sum(s);
    if (lane == 0) out[r] = static_cast<float>(s * scale);
  }
}

// One block per row (long rows); rows grid-strided over blocks.
static __global__ void sum_rows_block_kernel(float* out, const float* x, int64_t rows, int64_t cols, double scale) {
  __shared__ double shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * cols;
    double s = 0.0;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += static_cast<double>(xr[c]);
    s = block_sum(s, shared);
    if (threadIdx.x == 0) out[r] = static_cast<float>(s * scale);
  }
}

// Few, very long rows: block b sums chunk (b % chunks) of row (b / chunks) into acc[row] (zeroed
// by the caller), then sum_rows_finish_kernel writes out = scale * acc.
static __global__ void sum_rows_partial_kernel(double* acc, const float* x, int64_t rows, int64_t cols,
                                               int64_t chunks, int64_t chunk) {
  __shared__ double shared[32];
  for (int64_t b = blockIdx.x; b < rows * chunks; b += gridDim.x) {
    const int64_t r = b / chunks, c0 = (b - r * chunks) * chunk;
    const int64_t c1 = c0 + chunk < cols ? c0 + chunk : cols;
    const float* xr = x + r * cols;
    double s = 0.0;
    for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) s += static_cast<double>(xr[c]);
    s = block_sum(s, shared);
    if (threadIdx.x == 0) atomicAdd(acc + r, s);
  }
}

static __global__ void sum_rows_finish_kernel(float* out, const double* acc, int64_t rows, double scale) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x)
    out[r] = static_cast<float>(acc[r] * scale);
}

// ---- rope ----------------------------------------------------------------------------------------------
// One thread per pair (b, h, t, i < half) of x, y (B, H, T, 2 half) in their layouts (rows of D
// contiguous); cos_t / sin_t: (positions, half) float tables.
struct RopeShape {
  int64_t B = 0, H = 0, T = 0, half = 0;
  HeadLayout x, y;  // resolved
};
static __global__ void rope_kernel(float* y, const float* x, const float* cos_t, const float* sin_t, RopeShape sh,
                                   int64_t start, int sign) {
  const int64_t half = sh.half, n = sh.B * sh.H * sh.T * half;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rt = idx / half, i = idx - rt * half;  // rt = (b H + h) T + t
    const int64_t bh = rt / sh.T, t = rt - bh * sh.T, b = bh / sh.H, h = bh - b * sh.H;
    const int64_t tab = (start + t) * half + i;
    const float c = cos_t[tab], s = sign < 0 ? -sin_t[tab] : sin_t[tab];
    const float* xr = x + b * sh.x.batch + h * sh.x.head + t * sh.x.row;
    float* yr = y + b * sh.y.batch + h * sh.y.head + t * sh.y.row;
    const float a = xr[i], bb = xr[i + half];
    // Explicit roundings: no fused multiply-add, so the result is the cpu's unfused float arithmetic.
    yr[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(bb, s));
    yr[i + half] = __fadd_rn(__fmul_rn(bb, c), __fmul_rn(a, s));
  }
}

// ---- C = beta C for a strided batch of (M, N) matrices with row stride ldc (beta 0: zeros) ------------
static __global__ void scale_matrices_kernel(float* C, int64_t batch, int64_t M, int64_t N, int64_t ldc,
                                             int64_t stride_c, float beta) {
  const int64_t n = batch * M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bm = i / N, col = i - bm * N, b = bm / M, row = bm - b * M;
    float* c = C + b * stride_c + row * ldc + col;
    *c = beta == 0.f ? 0.f : beta * *c;
  }
}

// ---- attention: delta[row] = dout[row] . out[row], one warp per row ---------------------------------------
inline unsigned warp_rows_grid(int64_t rows, int warps_per_block) {
  int64_t b = (rows + warps_per_block - 1) / warps_per_block;
  if (b < 1) b = 1;
  if (b > 65535LL * 16) b = 65535LL * 16;
  return static_cast<unsigned>(b);
}

}  // namespace detail

// ---- launchers (stream given; n == 0 launches nothing) ------------------------------------------------------

// dst[i...] = value for each index of the layout (value: raw element bits of type T).
template <class T>
void fill_strided(T* dst, const StridedLayout<1>& L, int64_t n, T value, cudaStream_t stream) {
  if (n <= 0) return;
  const unsigned g = detail::grid_for(n, detail::ew_threads);
  if (layout_is_flat(L))
    MOA_CUDA_LAUNCH(detail::fill_flat_kernel<T>, g, detail::ew_threads, 0, stream, dst, n, value);
  else if (n <= 0x7fffffffLL)
    MOA_CUDA_LAUNCH((detail::fill_strided_kernel<T, uint32_t>), g, detail::ew_threads, 0, stream, dst, L,
                    static_cast<uint32_t>(n), value);
  else
    MOA_CUDA_LAUNCH((detail::fill_strided_kernel<T, uint64_t>), g, detail::ew_threads, 0, stream, dst, L,
                    static_cast<uint64_t>(n), value);
  MOA_CUDA_LAUNCH_CHECK();
}

// dst[off0(i)] = convert(src[off1(i)]) for each index of the layout (operand 0: dst, 1: src).
template <class D, class S>
void copy_strided(D* dst, const S* src, const StridedLayout<2>& L, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const unsigned g = detail::grid_for(n, detail::ew_threads);
  if (layout_is_flat(L))
    MOA_CUDA_LAUNCH((detail::convert_flat_kernel<D, S>), g, detail::ew_threads, 0, stream, dst, src, n);
  else if (n <= 0x7fffffffLL)
    MOA_CUDA_LAUNCH((detail::copy_strided_kernel<D, S, uint32_t>), g, detail::ew_threads, 0, stream, dst, src, L,
                    static_cast<uint32_t>(n));
  else
    MOA_CUDA_LAUNCH((detail::copy_strided_kernel<D, S, uint64_t>), g, detail::ew_threads, 0, stream, dst, src, L,
                    static_cast<uint64_t>(n));
  MOA_CUDA_LAUNCH_CHECK();
}

// out[i] = x[offsets[i]], i < n.
inline void take(float* out, const float* x, const int32_t* offsets, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  MOA_CUDA_LAUNCH(detail::take_kernel, detail::grid_for(n, detail::ew_threads), detail::ew_threads, 0, stream, out, x,
                  offsets, n);
  MOA_CUDA_LAUNCH_CHECK();
}

// out[offsets[i]] += src[i], i < n (atomics: repeated offsets add up, in no fixed order).
inline void put_add(float* out, const int32_t* offsets, const float* src, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  MOA_CUDA_LAUNCH(detail::put_add_kernel, detail::grid_for(n, detail::ew_threads), detail::ew_threads, 0, stream, out,
                  offsets, src, n);
  MOA_CUDA_LAUNCH_CHECK();
}

// out = a op b over the layout (operand 0: out, 1: a, 2: b; strides 0 on broadcast axes).
inline void binary(BinaryOp op, float* out, const float* a, const float* b, const StridedLayout<3>& L, int64_t n,
                   cudaStream_t stream) {
  if (n <= 0) return;
  const unsigned g = detail::grid_for(n, detail::ew_threads);
  const bool flat = layout_is_flat(L), small = n <= 0x7fffffffLL;
  auto launch = [&]<BinaryOp Op>() {
    if (flat)
      MOA_CUDA_LAUNCH(detail::binary_flat_kernel<Op>, g, detail::ew_threads, 0, stream, out, a, b, n);
    else if (small)
      MOA_CUDA_LAUNCH((detail::binary_strided_kernel<Op, uint32_t>), g, detail::ew_threads, 0, stream, out, a, b, L,
                      static_cast<uint32_t>(n));
    else
      MOA_CUDA_LAUNCH((detail::binary_strided_kernel<Op, uint64_t>), g, detail::ew_threads, 0, stream, out, a, b, L,
                      static_cast<uint64_t>(n));
  };
  switch (op) {
    case BinaryOp::add: launch.template operator()<BinaryOp::add>(); break;
    case BinaryOp::sub: launch.template operator()<BinaryOp::sub>(); break;
    case BinaryOp::mul: launch.template operator()<BinaryOp::mul>(); break;
    case BinaryOp::div: launch.template operator()<BinaryOp::div>(); break;
    default: throw ValueError(::moa::detail::cat("binary: unknown op ", static_cast<int>(op)));
  }
  MOA_CUDA_LAUNCH_CHECK();
}

namespace detail {

// Calls f.template operator()<Op>() for the runtime op.
template <class F>
void dispatch_unary(UnaryOp op, const char* name, F&& f) {
  switch (op) {
    case UnaryOp::scale: f.template operator()<UnaryOp::scale>(); return;
    case UnaryOp::shift: f.template operator()<UnaryOp::shift>(); return;
    case UnaryOp::neg: f.template operator()<UnaryOp::neg>(); return;
    case UnaryOp::exp: f.template operator()<UnaryOp::exp>(); return;
    case UnaryOp::log: f.template operator()<UnaryOp::log>(); return;
    case UnaryOp::sqrt: f.template operator()<UnaryOp::sqrt>(); return;
    case UnaryOp::tanh: f.template operator()<UnaryOp::tanh>(); return;
    case UnaryOp::pow: f.template operator()<UnaryOp::pow>(); return;
    case UnaryOp::relu: f.template operator()<UnaryOp::relu>(); return;
    case UnaryOp::gelu: f.template operator()<UnaryOp::gelu>(); return;
    case UnaryOp::silu: f.template operator()<UnaryOp::silu>(); return;
  }
  throw ValueError(::moa::detail::cat(name, ": unknown unary op ", static_cast<int>(op)));
}

}  // namespace detail

// y = f(x; p) over n contiguous values (y may be x).
inline void unary(UnaryOp op, double p, float* y, const float* x, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const unsigned g = detail::grid_for(n, detail::ew_threads);
  detail::dispatch_unary(op, "unary", [&]<UnaryOp Op>() {
    MOA_CUDA_LAUNCH(detail::unary_kernel<Op>, g, detail::ew_threads, 0, stream, y, x, n, p);
  });
  MOA_CUDA_LAUNCH_CHECK();
}

// gx = g * f'(x) over n contiguous values; y = f(x) (read by exp, sqrt, tanh only; x by log, pow,
// relu, gelu, silu only). gx may be g.
inline void unary_backward(UnaryOp op, double p, float* gx, const float* g, const float* x, const float* y, int64_t n,
                           cudaStream_t stream) {
  if (n <= 0) return;
  const unsigned grid = detail::grid_for(n, detail::ew_threads);
  detail::dispatch_unary(op, "unary_backward", [&]<UnaryOp Op>() {
    MOA_CUDA_LAUNCH(detail::unary_backward_kernel<Op>, grid, detail::ew_threads, 0, stream, gx, g, x, y, n, p);
  });
  MOA_CUDA_LAUNCH_CHECK();
}

// ---- SwiGLU: y = silu(g) * u in one pass, and its backward in one pass --------------------------------------
namespace detail {
static __global__ void swiglu_forward_kernel(float* y, const float* g, const float* u, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = unary_apply<UnaryOp::silu>(g[i], 0.0) * u[i];
}
// dg = (dy * u) * silu'(g), du = dy * silu(g): the products of mul's and silu's backward, in their order.
static __global__ void swiglu_backward_kernel(float* dg, float* du, const float* dy, const float* g, const float* u,
                                              int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float gi = g[i], d = dy[i];
    if (du) du[i] = d * unary_apply<UnaryOp::silu>(gi, 0.0);
    if (dg) dg[i] = (d * u[i]) * unary_grad<UnaryOp::silu>(gi, 0.f, 0.0);
  }
}
}  // namespace detail

// y = silu(g) * u over n contiguous values (y a buffer of its own).
inline void swiglu_forward(float* y, const float* g, const float* u, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  MOA_CUDA_LAUNCH(detail::swiglu_forward_kernel, detail::grid_for(n, detail::ew_threads), detail::ew_threads, 0, stream,
                  y, g, u, n);
  MOA_CUDA_LAUNCH_CHECK();
}
// dg = dy * u * silu'(g) and du = dy * silu(g) (either may be null) in one pass.
inline void swiglu_backward(float* dg, float* du, const float* dy, const float* g, const float* u, int64_t n,
                            cudaStream_t stream) {
  if (n <= 0 || (!dg && !du)) return;
  MOA_CUDA_LAUNCH(detail::swiglu_backward_kernel, detail::grid_for(n, detail::ew_threads), detail::ew_threads, 0,
                  stream, dg, du, dy, g, u, n);
  MOA_CUDA_LAUNCH_CHECK();
}

// The launch plan of sum_rows: which kernel, and for the split one, the chunks per row.
struct SumRowsPlan {
  enum Kind { warp, block, split } kind = warp;
  int64_t chunks = 1, chunk = 0;
};

inline SumRowsPlan plan_sum_rows(int64_t rows, int64_t cols) {
  SumRowsPlan p;
  if (cols <= 1024) return p;  // a warp per row
  constexpr int64_t per_block = 32768;  // elements a block sums when rows are split
  p.chunks = (cols + per_block - 1) / per_block;
  if (p.chunks > 1024) p.chunks = 1024;
  if (p.chunks <= 1 || rows >= 2048) {  // enough rows to fill the GPU with a block each
    p.kind = SumRowsPlan::block;
    p.chunks = 1;
    return p;
  }
  p.kind = SumRowsPlan::split;
  p.chunk = (cols + p.chunks - 1) / p.chunks;
  return p;
}

// out[r] = scale * sum_c x[r, c] (double accumulation, rounded once). x (rows, cols) contiguous.
// acc: `rows` doubles of scratch when plan_sum_rows(rows, cols).kind is split (else unused).
inline void sum_rows(float* out, const float* x, int64_t rows, int64_t cols, double scale, double* acc,
                     cudaStream_t stream) {
  if (rows <= 0) return;
  if (cols <= 0) {  // empty rows sum to 0
    MOA_CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<std::size_t>(rows) * sizeof(float), stream));
    return;
  }
  const SumRowsPlan p = plan_sum_rows(rows, cols);
  if (p.kind == SumRowsPlan::warp) {
    MOA_CUDA_LAUNCH(detail::sum_rows_warp_kernel, detail::warp_rows_grid(rows, 8), 256, 0, stream, out, x, rows, cols,
                    scale);
    MOA_CUDA_LAUNCH_CHECK();
  } else if (p.kind == SumRowsPlan::block) {
    const unsigned g = static_cast<unsigned>(rows < 65535LL * 16 ? rows : 65535LL * 16);
    MOA_CUDA_LAUNCH(detail::sum_rows_block_kernel, g, 256, 0, stream, out, x, rows, cols, scale);
    MOA_CUDA_LAUNCH_CHECK();
  } else {
    MOA_CUDA_CHECK(cudaMemsetAsync(acc, 0, static_cast<std::size_t>(rows) * sizeof(double), stream));
    const int64_t blocks = rows * p.chunks;
    const unsigned grid = static_cast<unsigned>(blocks < 65535LL * 16 ? blocks : 65535LL * 16);
    MOA_CUDA_LAUNCH(detail::sum_rows_partial_kernel, grid, 256, 0, stream, acc, x, rows, cols, p.chunks, p.chunk);
    MOA_CUDA_LAUNCH_CHECK();
    MOA_CUDA_LAUNCH(detail::sum_rows_finish_kernel, detail::grid_for(rows, 256), 256, 0, stream, out, acc, rows, scale);
    MOA_CUDA_LAUNCH_CHECK();
  }
}

// y = R x (sign +1) or R^T x (sign -1) for x, y (B, H, T, 2 half) in their layouts (default:
// contiguous); cos_t, sin_t: (P, half) with P >= start + T (row p: position p). y may be x with the
// same layout.
inline void rope(float* y, const HeadLayout& y_layout, const float* x, const HeadLayout& x_layout, const float* cos_t,
                 const float* sin_t, int64_t B, int64_t H, int64_t T, int64_t half, int64_t start, int sign,
                 cudaStream_t stream) {
  const int64_t n = B * H * T * half;
  if (n <= 0) return;
  const detail::RopeShape sh{B, H, T, half, x_layout.resolve(H, T, 2 * half), y_layout.resolve(H, T, 2 * half)};
  MOA_CUDA_LAUNCH(detail::rope_kernel, detail::grid_for(n, detail::ew_threads), detail::ew_threads, 0, stream, y, x,
                  cos_t, sin_t, sh, start, sign);
  MOA_CUDA_LAUNCH_CHECK();
}

// The contiguous (BH, T, 2 half) form.
inline void rope(float* y, const float* x, const float* cos_t, const float* sin_t, int64_t BH, int64_t T, int64_t half,
                 int64_t start, int sign, cudaStream_t stream) {
  rope(y, HeadLayout{}, x, HeadLayout{}, cos_t, sin_t, 1, BH, T, half, start, sign, stream);
}

// C_b = beta C_b for b < batch, C_b (M, N) with row stride ldc at C + b * stride_c; beta == 0
// writes zeros (NaN in C does not survive, as in BLAS).
inline void scale_matrices(float* C, int64_t batch, int64_t M, int64_t N, int64_t ldc, int64_t stride_c, float beta,
                           cudaStream_t stream) {
  const int64_t n = batch * M * N;
  if (n <= 0 || beta == 1.f) return;
  MOA_CUDA_LAUNCH(detail::scale_matrices_kernel, detail::grid_for(n, detail::ew_threads), detail::ew_threads, 0, stream,
                  C, batch, M, N, ldc, stride_c, beta);
  MOA_CUDA_LAUNCH_CHECK();
}

}  // namespace moa::kernels::cuda
