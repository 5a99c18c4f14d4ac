// moa::DeviceBackend on CUDA (include/moa/cuda.cuh, include/moa/kernels/cuda/backend.cuh): every
// method of the interface through moa::backend(Device::cuda(0)), on random inputs with odd sizes,
// against the CPU reference kernels (include/moa/kernels/reference/) or a host loop in double.
// Part of the moa_cuda_tests binary (main and the no-device skip, exit 77, are in test_cuda_ops.cu).
//
// Error measure: normwise relative error max_i |gpu_i - ref_i| / max_i |ref_i| (CHECK_REL). Bounds:
//   exact (bit-identical, compared with memcmp or ==):
//     copies and fills of f32/i32/bf16, dtype conversions (bf16 rounding as moa/core/half.hpp),
//     take, binary add/sub/mul/div (one IEEE rounding each), unary scale/shift/neg/sqrt/relu and
//     their derivatives, log's and sqrt's derivatives, rope (float tables computed on the host as
//     moa/ops/rope.hpp, unfused float arithmetic), AdamW (moa/optim/adamw.hpp's float operations).
//   f32, CUDA transcendental functions (exp, log, tanh, pow, GELU, SiLU; a few ulp):     1e-6
//   f32, their derivatives (a few roundings more):                                          2e-6
//   f32 sums in double (sum_rows, one final rounding):                                       1e-6
//   sum_squares (double, atomics in any order) vs a host double sum:                         1e-12
//   f32 accumulated with atomics (put_add, embedding backward, dweight, dA, dB):            1e-5
//   f32 row reductions (softmax, cross-entropy, norms), attention, grouped LoRA:        1e-5 .. 2e-5
//   gemm, MatmulPrecision::highest (true f32):                                              1e-5
//   gemm, tf32 (10-bit mantissa inputs, f32 accumulation):                                  5e-3
//   gemm, bf16 (8-bit mantissa inputs, f32 accumulation):                                   2e-2
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "grouped_lora_reference.hpp"
#include "moa/core/half.hpp"
#include "moa/cuda.cuh"
#include "moa/kernels/reference/activation.hpp"
#include "moa/kernels/reference/attention.hpp"
#include "moa/kernels/reference/cross_entropy.hpp"
#include "moa/kernels/reference/embedding.hpp"
#include "moa/kernels/reference/gemm.hpp"
#include "moa/kernels/reference/norm.hpp"
#include "moa/kernels/reference/softmax.hpp"
#include "strided_heads.hpp"

namespace ref = moa::kernels::reference;
using moa::BinaryOp;
using moa::DType;
using moa::UnaryOp;

namespace {

std::mt19937& gen() {
  static std::mt19937 g(20240607);
  return g;
}

std::vector<float> rnd(std::size_t n, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen());
  return v;
}

int64_t rndi(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen()); }

moa::DeviceBackend& be() {
  static const bool ok = moa::cuda::init();
  (void)ok;
  return moa::backend(moa::Device::cuda(0));
}

// A device buffer from the backend's allocator, released on destruction.
template <class T>
class Dev {
 public:
  explicit Dev(std::size_t n) : n_(n), bytes_(std::max<std::size_t>(n, 1) * sizeof(T)) {
    p_ = static_cast<T*>(be().allocate(bytes_, 0));
  }
  explicit Dev(const std::vector<T>& v) : Dev(v.size()) {
    if (!v.empty()) be().copy_to_device(p_, v.data(), v.size() * sizeof(T), 0);
  }
  Dev(Dev&& o) noexcept : p_(o.p_), n_(o.n_), bytes_(o.bytes_) { o.p_ = nullptr; }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  Dev& operator=(Dev&&) = delete;
  ~Dev() {
    if (p_) be().release(p_, bytes_, 0);
  }
  T* get() const { return p_; }
  std::size_t size() const { return n_; }
  std::vector<T> host(std::size_t n) const {
    std::vector<T> v(n);
    be().copy_to_host(v.data(), p_, n * sizeof(T), 0);  // synchronous, also for n == 0
    return v;
  }
  std::vector<T> host() const { return host(n_); }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0, bytes_ = 0;
};

template <class A, class B>
double rel_error(const std::vector<A>& got, const std::vector<B>& want) {
  REQUIRE(got.size() == want.size());
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!std::isfinite(d)) return INFINITY;  // a NaN or an infinity where the reference has none
    num = std::max(num, d);
    den = std::max(den, std::fabs(static_cast<double>(want[i])));
  }
  return den > 0 ? num / den : num;
}

#define CHECK_REL(got, want, bound)                   \
  do {                                                \
    const double e_ = rel_error(got, want);           \
    INFO(#got " vs " #want ": relative error ", e_);  \
    CHECK(e_ <= (bound));                             \
  } while (0)

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Unfused float arithmetic on the host whatever the compiler flags (no contraction into FMA):
// each result goes through a volatile.
float fmul(float a, float b) {
  volatile float r = a * b;
  return r;
}
float fadd(float a, float b) {
  volatile float r = a + b;
  return r;
}
float fsub(float a, float b) {
  volatile float r = a - b;
  return r;
}
float fdiv(float a, float b) {
  volatile float r = a / b;
  return r;
}

std::vector<float> bf16_widen(const std::vector<uint16_t>& v) {
  std::vector<float> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = moa::bf16_bits_to_f32(v[i]);
  return r;
}

// The element offset of flat index i of `shape` read with `strides`.
int64_t offset_of(int64_t i, const moa::Shape& shape, const moa::Strides& strides) {
  int64_t off = 0;
  for (std::size_t d = shape.size(); d-- > 0;) {
    off += (i % shape[d]) * strides[d];
    i /= shape[d];
  }
  return off;
}

}  // namespace

// ---- the device, errors ---------------------------------------------------------------------------------
TEST_CASE("backend: registered by <moa/cuda.cuh>, device count, errors for a missing device") {
  CHECK(moa::cuda::init());
  CHECK(moa::backend_available(moa::DeviceType::cuda));
  moa::DeviceBackend& b = be();
  CHECK(b.name() == "cuda");
  CHECK(b.device_count() >= 1);
  CHECK(moa::cuda::device_count() == b.device_count());
  CHECK_THROWS_AS(moa::backend(moa::Device::cuda(99)), moa::DeviceError);
  try {
    moa::backend(moa::Device::cuda(99));
  } catch (const moa::DeviceError& e) {
    CHECK(std::string(e.what()).find("cuda:99") != std::string::npos);
  }
  CHECK_THROWS_AS(b.allocate(16, 99), moa::DeviceError);
  CHECK_THROWS_AS(b.allocate(16, -1), moa::DeviceError);
  b.synchronize(0);
  CHECK(moa::cuda::stream(0) != nullptr);
  // Bad arguments name the method.
  Dev<float> buf(16);
  CHECK_THROWS_AS(b.fill(DType::f64, buf.get(), {4}, {1}, 1.0), moa::ValueError);
  CHECK_THROWS_AS(b.fill(DType::f32, buf.get(), {4, 2}, {1}, 1.0), moa::ShapeError);
  CHECK_THROWS_AS(b.rope(buf.get(), buf.get(), 1, 1, 3, 0, 10000.0, 1), moa::ShapeError);
  CHECK_THROWS_AS(b.gemm(false, false, 1, 2, 2, 3, 1.f, buf.get(), 2, 0, buf.get(), 2, 0, 0.f, buf.get(), 2, 0,
                         moa::MatmulPrecision::highest),
                  moa::ShapeError);  // lda 2 < K 3
  try {
    b.gemm(false, false, 1, 2, 2, 3, 1.f, buf.get(), 2, 0, buf.get(), 2, 0, 0.f, buf.get(), 2, 0,
           moa::MatmulPrecision::highest);
  } catch (const moa::ShapeError& e) {
    CHECK(std::string(e.what()).find("lda") != std::string::npos);
  }
  CHECK_THROWS_AS(b.gemm(false, false, 2, 2, 2, 2, 1.f, buf.get(), 2, 4, buf.get(), 2, 4, 0.f, buf.get(), 2, 1,
                         moa::MatmulPrecision::highest),
                  moa::ShapeError);  // the batch's C matrices overlap
}

// ---- memory ----------------------------------------------------------------------------------------------
TEST_CASE("memory: round trips, device copies, a warm allocate/release loop does no device malloc") {
  moa::DeviceBackend& b = be();
  for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(7), std::size_t(1000003)}) {
    std::vector<unsigned char> h(n);
    for (auto& c : h) c = static_cast<unsigned char>(rndi(0, 255));
    void* d1 = b.allocate(n, 0);
    void* d2 = b.allocate(n, 0);
    CHECK(d1 != nullptr);
    b.copy_to_device(d1, h.data(), n, 0);
    std::vector<unsigned char> h_copy = h;
    std::fill(h.begin(), h.end(), 0);  // the host buffer may be reused at once
    b.copy_device(d2, d1, n, 0);
    std::vector<unsigned char> back(n, 1);
    b.copy_to_host(back.data(), d2, n, 0);
    CHECK(back == h_copy);
    b.release(d1, n, 0);
    b.release(d2, n, 0);
  }
  const std::vector<std::size_t> sizes{1, 100, 4096, 33 * 1000, 3 << 20, 7, 4096, 513};
  auto step = [&] {
    std::vector<void*> ps;
    for (std::size_t s : sizes) ps.push_back(b.allocate(s, 0));
    for (std::size_t i = 0; i < ps.size(); ++i) b.release(ps[i], sizes[i], 0);
  };
  step();
  const int64_t warm = b.device_malloc_count(0);
  CHECK(moa::cuda::allocator_stats(0).malloc_count == warm);
  for (int i = 0; i < 5; ++i) step();
  CHECK(b.device_malloc_count(0) == warm);
  const auto before = moa::cuda::allocator_stats(0);
  b.empty_cache(0);
  const auto after = moa::cuda::allocator_stats(0);
  CHECK(after.bytes_cached == 0);
  CHECK(after.free_count > before.free_count);
  CHECK(b.device_malloc_count(0) == warm);  // a count of mallocs so far, not of live blocks
  b.release(nullptr, 0, 0);                 // ignored
}

// ---- layout -------------------------------------------------------------------------------------------------
TEST_CASE("fill: f32, i32, bf16; contiguous and strided views (the rest untouched); zero sizes") {
  moa::DeviceBackend& b = be();
  for (double value : {0.0, 2.5, -3.0, 1.0 / 3.0}) {
    // Contiguous, odd size.
    for (int64_t n : {1, 7, 1000, 100003}) {
      Dev<float> f(n);
      b.fill(DType::f32, f.get(), {n}, {1}, value);
      CHECK(f.host() == std::vector<float>(n, static_cast<float>(value)));
      Dev<int32_t> i(n);
      b.fill(DType::i32, i.get(), {n}, {1}, value);
      CHECK(i.host() == std::vector<int32_t>(n, static_cast<int32_t>(value)));
      Dev<uint16_t> h(n);
      b.fill(DType::bf16, h.get(), {n}, {1}, value);
      CHECK(h.host() == std::vector<uint16_t>(n, moa::f32_to_bf16_bits(static_cast<float>(value))));
    }
    // A transposed (7, 33) view of a (33, 9) buffer's first 7 columns: strides (1, 9).
    const moa::Shape shape{7, 33};
    const moa::Strides strides{1, 9};
    std::vector<float> init = rnd(33 * 9);
    Dev<float> f(init);
    b.fill(DType::f32, f.get(), shape, strides, value);
    std::vector<float> want = init;
    for (int64_t k = 0; k < 7 * 33; ++k) want[offset_of(k, shape, strides)] = static_cast<float>(value);
    CHECK(same_bits(f.host(), want));
    std::vector<uint16_t> init16(33 * 9, 0x1234);
    Dev<uint16_t> h(init16);
    b.fill(DType::bf16, h.get(), shape, strides, value);
    std::vector<uint16_t> want16 = init16;
    for (int64_t k = 0; k < 7 * 33; ++k)
      want16[offset_of(k, shape, strides)] = moa::f32_to_bf16_bits(static_cast<float>(value));
    CHECK(h.host() == want16);
  }
  // Zero elements: nothing is touched (null is fine).
  b.fill(DType::f32, nullptr, {3, 0, 5}, {0, 5, 1}, 1.0);
  // Nine axes that cannot merge are one above kMaxDeviceRank.
  moa::Shape s9(9, 2);
  moa::Strides st9(9);
  for (int d = 0; d < 9; ++d) st9[d] = int64_t(1) << (2 * (8 - d));
  Dev<float> big(1);
  CHECK_THROWS_AS(b.fill(DType::f32, big.get(), s9, st9, 1.0), moa::ShapeError);
  // Nine axes that merge are fine.
  Dev<float> m9(512);
  b.fill(DType::f32, m9.get(), s9, moa::contiguous_strides(s9), 4.0);
  CHECK(m9.host() == std::vector<float>(512, 4.f));
}

TEST_CASE("copy_strided: permuted views, f32 -> bf16 -> f32, i32, conversions, special values") {
  moa::DeviceBackend& b = be();
  // src (7, 33, 5) contiguous; dst (5, 7, 33) contiguous = src.permute(2, 0, 1).
  const int64_t A = 7, B = 33, C = 5;
  const moa::Shape pshape{C, A, B};
  const moa::Strides src_perm{1, B * C, C}, dst_contig = moa::contiguous_strides(pshape);
  std::vector<float> x = rnd(A * B * C, -100.f, 100.f);
  std::vector<float> want(A * B * C);
  for (int64_t k = 0; k < A * B * C; ++k) want[k] = x[offset_of(k, pshape, src_perm)];
  Dev<float> dx(x), dy(A * B * C);
  b.copy_strided(DType::f32, dy.get(), dst_contig, DType::f32, dx.get(), src_perm, pshape);
  CHECK(same_bits(dy.host(), want));

  // f32 -> bf16 (permuted), then bf16 -> f32 (contiguous): the bits of moa::f32_to_bf16_bits.
  Dev<uint16_t> dh(A * B * C);
  b.copy_strided(DType::bf16, dh.get(), dst_contig, DType::f32, dx.get(), src_perm, pshape);
  std::vector<uint16_t> want16(A * B * C);
  for (int64_t k = 0; k < A * B * C; ++k) want16[k] = moa::f32_to_bf16_bits(want[k]);
  const std::vector<uint16_t> got16 = dh.host();
  CHECK(got16 == want16);
  Dev<float> dback(A * B * C);
  b.copy_strided(DType::f32, dback.get(), dst_contig, DType::bf16, dh.get(), dst_contig, pshape);
  CHECK(same_bits(dback.host(), bf16_widen(want16)));
  CHECK_REL(dback.host(), want, 1.0 / 256);  // bf16 keeps 8 bits

  // i32, permuted, and the conversions i32 <-> f32 <-> bf16.
  std::vector<int32_t> xi(A * B * C);
  for (auto& v : xi) v = static_cast<int32_t>(rndi(-100000, 100000));
  std::vector<int32_t> wanti(A * B * C);
  for (int64_t k = 0; k < A * B * C; ++k) wanti[k] = xi[offset_of(k, pshape, src_perm)];
  Dev<int32_t> dxi(xi), dyi(A * B * C);
  b.copy_strided(DType::i32, dyi.get(), dst_contig, DType::i32, dxi.get(), src_perm, pshape);
  CHECK(dyi.host() == wanti);
  b.copy_strided(DType::f32, dy.get(), dst_contig, DType::i32, dxi.get(), src_perm, pshape);
  std::vector<float> wantf(A * B * C);
  for (int64_t k = 0; k < A * B * C; ++k) wantf[k] = static_cast<float>(wanti[k]);
  CHECK(same_bits(dy.host(), wantf));
  b.copy_strided(DType::i32, dyi.get(), dst_contig, DType::f32, dx.get(), src_perm, pshape);
  for (int64_t k = 0; k < A * B * C; ++k) wanti[k] = static_cast<int32_t>(want[k]);  // toward zero
  CHECK(dyi.host() == wanti);
  b.copy_strided(DType::bf16, dh.get(), dst_contig, DType::i32, dxi.get(), src_perm, pshape);
  for (int64_t k = 0; k < A * B * C; ++k)
    want16[k] = moa::f32_to_bf16_bits(static_cast<float>(xi[offset_of(k, pshape, src_perm)]));
  CHECK(dh.host() == want16);
  b.copy_strided(DType::i32, dyi.get(), dst_contig, DType::bf16, dh.get(), dst_contig, pshape);
  for (int64_t k = 0; k < A * B * C; ++k) wanti[k] = static_cast<int32_t>(moa::bf16_bits_to_f32(want16[k]));
  CHECK(dyi.host() == wanti);

  // Every rounding case of f32 -> bf16: random bit patterns (NaNs, infinities, subnormals, ties).
  const int64_t n = 100003;
  std::vector<uint32_t> bits(n);
  for (auto& u : bits) u = static_cast<uint32_t>(gen()());
  const uint32_t specials[] = {0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffbfffffu, 0x00000000u,
                               0x80000000u, 0x00000001u, 0x3f808000u, 0x3f818000u, 0x7f7fffffu, 0x3f7fffffu};
  for (std::size_t i = 0; i < std::size(specials); ++i) bits[i] = specials[i];
  std::vector<float> xs(n);
  std::memcpy(xs.data(), bits.data(), n * sizeof(float));
  Dev<float> dxs(xs);
  Dev<uint16_t> dhs(n);
  b.copy_strided(DType::bf16, dhs.get(), {1}, DType::f32, dxs.get(), {1}, {n});
  std::vector<uint16_t> wants(n);
  for (int64_t i = 0; i < n; ++i) wants[i] = moa::f32_to_bf16_bits(xs[i]);
  CHECK(dhs.host() == wants);

  // A strided destination (every other column of a (33, 14) buffer): the rest untouched.
  std::vector<float> init = rnd(33 * 14), src = rnd(33 * 7);
  Dev<float> ddst(init), dsrc(src);
  b.copy_strided(DType::f32, ddst.get() + 1, {14, 2}, DType::f32, dsrc.get(), {7, 1}, {33, 7});
  std::vector<float> wantd = init;
  for (int64_t r = 0; r < 33; ++r)
    for (int64_t c = 0; c < 7; ++c) wantd[r * 14 + 1 + 2 * c] = src[r * 7 + c];
  CHECK(same_bits(ddst.host(), wantd));

  // Eight non-mergeable axes (kMaxDeviceRank), a broadcast source axis (stride 0) and a flat copy.
  moa::Shape s8(8, 2);
  s8[7] = 3;
  moa::Strides gaps(8), zero_src(8);
  for (int d = 0; d < 8; ++d) gaps[d] = int64_t(1) << (2 * (7 - d) + 1);
  for (int d = 0; d < 8; ++d) zero_src[d] = d == 3 ? 0 : moa::contiguous_strides(s8)[d];
  const int64_t n8 = moa::numel_of(s8);
  std::vector<float> s8src = rnd(n8);
  Dev<float> d8src(s8src), d8dst(gaps[0] * 2);
  std::vector<float> d8init = rnd(gaps[0] * 2);
  be().copy_to_device(d8dst.get(), d8init.data(), d8init.size() * sizeof(float), 0);
  b.copy_strided(DType::f32, d8dst.get(), gaps, DType::f32, d8src.get(), zero_src, s8);
  std::vector<float> want8 = d8init;
  for (int64_t k = 0; k < n8; ++k) want8[offset_of(k, s8, gaps)] = s8src[offset_of(k, s8, zero_src)];
  CHECK(same_bits(d8dst.host(), want8));
  // Zero elements: nothing happens.
  b.copy_strided(DType::f32, nullptr, {1, 1}, DType::bf16, nullptr, {1, 1}, {0, 3});
}

TEST_CASE("take and put_add: gathers and scatter-adds with repeated offsets") {
  moa::DeviceBackend& b = be();
  for (int64_t n : {1, 7, 1000, 100003}) {
    INFO("n ", n);
    const int64_t X = std::max<int64_t>(n / 3, 1);  // offsets repeat
    std::vector<float> x = rnd(X), src = rnd(n), base = rnd(X);
    std::vector<int32_t> off(n);
    for (auto& o : off) o = static_cast<int32_t>(rndi(0, X - 1));
    Dev<float> dx(x), dout(n), dsrc(src), dbase(base);
    Dev<int32_t> doff(off);
    b.take(dout.get(), dx.get(), doff.get(), n);
    std::vector<float> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = x[off[i]];
    CHECK(same_bits(dout.host(), want));
    b.put_add(dbase.get(), doff.get(), dsrc.get(), n);
    std::vector<double> acc(base.begin(), base.end());
    for (int64_t i = 0; i < n; ++i) acc[off[i]] += src[i];
    CHECK_REL(dbase.host(), acc, 1e-5);
  }
  b.take(nullptr, nullptr, nullptr, 0);
  b.put_add(nullptr, nullptr, nullptr, 0);
}

// ---- elementwise -------------------------------------------------------------------------------------------------
TEST_CASE("binary: add, sub, mul, div with broadcast (stride 0) and transposed operands, bit-exact") {
  moa::DeviceBackend& b = be();
  struct Case {
    moa::Shape shape;
    moa::Shape a_shape;  // stored shape of a (contiguous) and the strides it is read with
    moa::Strides a_strides;
    moa::Shape b_shape;
    moa::Strides b_strides;
  };
  const std::vector<Case> cases{
      {{1000003}, {1000003}, {1}, {1000003}, {1}},                 // flat
      {{7, 33}, {7, 33}, {33, 1}, {33}, {0, 1}},                   // bias add
      {{3, 4, 5}, {3, 5}, {5, 0, 1}, {4}, {0, 1, 0}},              // both broadcast
      {{33, 7}, {7, 33}, {1, 33}, {1}, {0, 0}},                    // transposed a, scalar b
      {{2, 3, 1, 5, 7}, {7, 5, 3, 2}, {1, 2, 0, 6, 30}, {2, 3, 1, 5, 7}, {105, 35, 35, 7, 1}},  // permuted
      {{1}, {1}, {1}, {1}, {1}},
  };
  for (const Case& c : cases) {
    const int64_t n = moa::numel_of(c.shape);
    std::vector<float> a = rnd(moa::numel_of(c.a_shape)), bv = rnd(moa::numel_of(c.b_shape), 0.5f, 2.f);
    for (std::size_t i = 0; i < bv.size(); i += 2) bv[i] = -bv[i];
    Dev<float> da(a), db(bv), dout(n);
    for (BinaryOp op : {BinaryOp::add, BinaryOp::sub, BinaryOp::mul, BinaryOp::div}) {
      INFO("shape ", moa::shape_str(c.shape), " op ", static_cast<int>(op));
      b.binary(op, dout.get(), c.shape, da.get(), c.a_strides, db.get(), c.b_strides);
      std::vector<float> want(n);
      for (int64_t i = 0; i < n; ++i) {
        const float x = a[offset_of(i, c.shape, c.a_strides)], y = bv[offset_of(i, c.shape, c.b_strides)];
        want[i] = op == BinaryOp::add ? fadd(x, y) : op == BinaryOp::sub ? fsub(x, y) : op == BinaryOp::mul ? fmul(x, y)
                                                                                                          : fdiv(x, y);
      }
      CHECK(same_bits(dout.host(), want));
    }
  }
  b.binary(BinaryOp::add, nullptr, {0, 4}, nullptr, {0, 1}, nullptr, {4, 1});
}

namespace {

bool is_exact(UnaryOp op) {
  return op == UnaryOp::scale || op == UnaryOp::shift || op == UnaryOp::neg || op == UnaryOp::sqrt ||
         op == UnaryOp::relu;
}

double unary_ref(UnaryOp op, double x, double p) {
  switch (op) {
    case UnaryOp::scale: return x * p;
    case UnaryOp::shift: return x + p;
    case UnaryOp::neg: return -x;
    case UnaryOp::exp: return std::exp(x);
    case UnaryOp::log: return std::log(x);
    case UnaryOp::sqrt: return std::sqrt(x);
    case UnaryOp::tanh: return std::tanh(x);
    case UnaryOp::pow: return std::pow(x, p);
    case UnaryOp::relu: return x > 0 ? x : 0.0;
    case UnaryOp::gelu: return ref::gelu(x);
    case UnaryOp::silu: return ref::silu(x);
  }
  return NAN;
}

double unary_grad_ref(UnaryOp op, double x, double p) {
  switch (op) {
    case UnaryOp::scale: return p;
    case UnaryOp::shift: return 1.0;
    case UnaryOp::neg: return -1.0;
    case UnaryOp::exp: return std::exp(x);
    case UnaryOp::log: return 1.0 / x;
    case UnaryOp::sqrt: return 0.5 / std::sqrt(x);
    case UnaryOp::tanh: return 1.0 - std::tanh(x) * std::tanh(x);
    case UnaryOp::pow: return p * std::pow(x, p - 1);
    case UnaryOp::relu: return x > 0 ? 1.0 : 0.0;
    case UnaryOp::gelu: return ref::gelu_grad(x);
    case UnaryOp::silu: return ref::silu_grad(x);
  }
  return NAN;
}

// The float arithmetic of moa/ops/elementwise.hpp for the ops the device matches bit for bit.
float unary_cpu(UnaryOp op, float x, double p) {
  switch (op) {
    case UnaryOp::scale: return static_cast<float>(x * p);
    case UnaryOp::shift: return static_cast<float>(x + p);
    case UnaryOp::neg: return -x;
    case UnaryOp::sqrt: return std::sqrt(x);
    case UnaryOp::relu: return x > 0 ? x : 0.f;
    default: return NAN;
  }
}

float unary_grad_cpu(UnaryOp op, float g, float x, float y, double p) {
  switch (op) {
    case UnaryOp::scale: return fmul(g, static_cast<float>(p));
    case UnaryOp::shift: return fmul(g, 1.f);
    case UnaryOp::neg: return fmul(g, -1.f);
    case UnaryOp::sqrt: return fmul(g, fdiv(1.f, fmul(2.f, y)));
    case UnaryOp::log: return fmul(g, fdiv(1.f, x));
    case UnaryOp::relu: return fmul(g, x > 0 ? 1.f : 0.f);
    default: return NAN;
  }
}

}  // namespace

TEST_CASE("unary and unary_backward: every UnaryOp, odd sizes, in place") {
  moa::DeviceBackend& b = be();
  const UnaryOp ops[] = {UnaryOp::scale, UnaryOp::shift, UnaryOp::neg,  UnaryOp::exp,  UnaryOp::log, UnaryOp::sqrt,
                         UnaryOp::tanh,  UnaryOp::pow,   UnaryOp::relu, UnaryOp::gelu, UnaryOp::silu};
  for (int64_t n : {1, 7, 33, 1000, 100003})
    for (UnaryOp op : ops) {
      const bool positive = op == UnaryOp::log || op == UnaryOp::sqrt || op == UnaryOp::pow;
      const double p = op == UnaryOp::scale ? 0.37 : op == UnaryOp::shift ? -1.25 : op == UnaryOp::pow ? 2.5 : 0.0;
      INFO("n ", n, " op ", static_cast<int>(op));
      std::vector<float> x = positive ? rnd(n, 0.1f, 4.f) : rnd(n, -6.f, 6.f), g = rnd(n);
      if (op == UnaryOp::relu && n > 3) x[1] = 0.f;
      Dev<float> dx(x), dy(n), dg(g), dgx(n);
      b.unary(op, p, dy.get(), dx.get(), n);
      const std::vector<float> y = dy.host();
      b.unary_backward(op, p, dgx.get(), dg.get(), dx.get(), dy.get(), n);
      const std::vector<float> gx = dgx.host();
      std::vector<double> yr(n), gr(n);
      for (int64_t i = 0; i < n; ++i) {
        yr[i] = unary_ref(op, x[i], p);
        gr[i] = g[i] * unary_grad_ref(op, x[i], p);
      }
      if (is_exact(op)) {
        std::vector<float> yc(n), gc(n);
        for (int64_t i = 0; i < n; ++i) {
          yc[i] = unary_cpu(op, x[i], p);
          gc[i] = unary_grad_cpu(op, g[i], x[i], yc[i], p);
        }
        CHECK(same_bits(y, yc));
        CHECK(same_bits(gx, gc));
      } else if (op == UnaryOp::log) {
        CHECK_REL(y, yr, 1e-6);
        std::vector<float> gc(n);
        for (int64_t i = 0; i < n; ++i) gc[i] = unary_grad_cpu(op, g[i], x[i], y[i], p);
        CHECK(same_bits(gx, gc));
      } else {
        CHECK_REL(y, yr, 1e-6);
        CHECK_REL(gx, gr, 2e-6);
      }
      CHECK_REL(gx, gr, 2e-6);
      // In place: y == x.
      b.unary(op, p, dx.get(), dx.get(), n);
      CHECK(same_bits(dx.host(), y));
    }
  b.unary(UnaryOp::exp, 0.0, nullptr, nullptr, 0);
  b.unary_backward(UnaryOp::exp, 0.0, nullptr, nullptr, nullptr, nullptr, 0);
}

TEST_CASE("swiglu_forward / swiglu_backward: one pass each, as the unary and binary calls they replace") {
  moa::DeviceBackend& b = be();
  for (int64_t n : {1, 7, 1000, 100003}) {
    INFO("n ", n);
    const std::vector<float> g = rnd(n, -8.f, 8.f), u = rnd(n, -2.f, 2.f), dy = rnd(n);
    std::vector<double> yr(n), dgr(n), dur(n);
    for (int64_t i = 0; i < n; ++i) {
      const double gi = g[i], s = gi / (1.0 + std::exp(-gi)), sig = 1.0 / (1.0 + std::exp(-gi));
      yr[i] = s * u[i];
      dur[i] = double(dy[i]) * s;
      dgr[i] = double(dy[i]) * u[i] * sig * (1.0 + gi * (1.0 - sig));
    }
    Dev<float> dg_in(g), du_in(u), ddy(dy), y(n), y2(n), dg(n), du(n), dg2(n), du2(n), only(n);
    b.swiglu_forward(y.get(), dg_in.get(), du_in.get(), n);
    b.swiglu_backward(dg.get(), du.get(), ddy.get(), dg_in.get(), du_in.get(), n);
    CHECK_REL(y.host(), yr, 2e-6);
    CHECK_REL(dg.host(), dgr, 4e-6);
    CHECK_REL(du.host(), dur, 2e-6);
    // the base implementation (silu, then mul; mul, then silu's backward): the same float products
    b.moa::DeviceBackend::swiglu_forward(y2.get(), dg_in.get(), du_in.get(), n);
    b.moa::DeviceBackend::swiglu_backward(dg2.get(), du2.get(), ddy.get(), dg_in.get(), du_in.get(), n);
#ifdef MOA_CUDA_EMULATE
    CHECK(same_bits(y.host(), y2.host()));
    CHECK(same_bits(dg.host(), dg2.host()));
    CHECK(same_bits(du.host(), du2.host()));
#else
    CHECK_REL(y2.host(), yr, 2e-6);
    CHECK_REL(dg2.host(), dgr, 4e-6);
    CHECK_REL(du2.host(), dur, 2e-6);
#endif
    // one gradient only
    b.swiglu_backward(only.get(), nullptr, ddy.get(), dg_in.get(), du_in.get(), n);
    CHECK(same_bits(only.host(), dg.host()));
    b.swiglu_backward(nullptr, only.get(), ddy.get(), dg_in.get(), du_in.get(), n);
    CHECK(same_bits(only.host(), du.host()));
  }
  b.swiglu_forward(nullptr, nullptr, nullptr, 0);
  b.swiglu_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 0);
}

TEST_CASE("sum_rows: warp, block and split kernels; sum_squares in double") {
  moa::DeviceBackend& b = be();
  const std::vector<std::array<int64_t, 2>> shapes{{1, 1},     {7, 33},   {33, 1000}, {100000, 3},
                                                   {5000, 2000}, {3, 100003}, {2, 3000001}, {4, 0}};
  for (auto [rows, cols] : shapes) {
    INFO("rows ", rows, " cols ", cols);
    const double scale = 0.3;
    std::vector<float> x = rnd(rows * cols, -1.f, 2.f);
    Dev<float> dx(x), dout(rows);
    b.sum_rows(dout.get(), dx.get(), rows, cols, scale);
    std::vector<double> want(rows, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0.0;
      for (int64_t c = 0; c < cols; ++c) s += x[r * cols + c];
      want[r] = s * scale;
    }
    CHECK_REL(dout.host(), want, 1e-6);
  }
  b.sum_rows(nullptr, nullptr, 0, 5, 1.0);
  for (int64_t n : {1, 7, 1000, 1000003}) {
    std::vector<float> x = rnd(n, -3.f, 3.f);
    Dev<float> dx(x);
    double want = 0.0;
    for (float v : x) want += static_cast<double>(v) * v;
    const double got = b.sum_squares(dx.get(), n);
    INFO("n ", n, " got ", got, " want ", want);
    CHECK(std::fabs(got - want) <= 1e-12 * want);
  }
  CHECK(b.sum_squares(nullptr, 0) == 0.0);
}

// ---- gemm ---------------------------------------------------------------------------------------------------------
TEST_CASE("gemm: strided batches, both transposes, padded leading dimensions, alpha/beta, each precision") {
  moa::DeviceBackend& b = be();
  const std::vector<std::array<int64_t, 4>> shapes{{1, 1, 1, 1},    {1, 7, 33, 1},   {3, 33, 7, 257},
                                                   {2, 257, 33, 7}, {3, 64, 129, 96}, {1, 128, 128, 128}};
  for (auto [batch, M, N, K] : shapes)
    for (int t = 0; t < 4; ++t)
      for (moa::MatmulPrecision prec :
           {moa::MatmulPrecision::highest, moa::MatmulPrecision::tf32, moa::MatmulPrecision::bf16}) {
        const bool ta = t & 1, tb = t & 2;
        const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
        const int64_t stride_a = (ta ? K : M) * lda + 5, stride_b = (t == 3 ? 0 : (tb ? N : K) * ldb + 1),
                      stride_c = M * ldc + 7;  // t == 3: one B for the whole batch
        const int64_t na = batch * stride_a, nb = batch * std::max<int64_t>(stride_b, (tb ? N : K) * ldb),
                      nc = batch * stride_c;
        std::vector<float> A = rnd(na), B = rnd(nb), C = rnd(nc);
        const float alpha = 0.75f, beta = t == 2 ? 0.f : 0.5f;
        if (beta == 0.f) std::fill(C.begin(), C.end(), std::numeric_limits<float>::quiet_NaN());
        std::vector<double> Cd(C.begin(), C.end());
        const std::vector<double> Ad(A.begin(), A.end()), Bd(B.begin(), B.end());
        for (int64_t i = 0; i < batch; ++i)
          ref::gemm<double>(ta, tb, M, N, K, alpha, Ad.data() + i * stride_a, lda, Bd.data() + i * stride_b, ldb, beta,
                            Cd.data() + i * stride_c, ldc);
        Dev<float> dA(A), dB(B), dC(C);
        b.gemm(ta, tb, batch, M, N, K, alpha, dA.get(), lda, stride_a, dB.get(), ldb, stride_b, beta, dC.get(), ldc,
               stride_c, prec);
        std::vector<float> got = dC.host();
        // Only the matrices' elements: the padding is compared as-is (untouched, NaN when beta 0).
        std::vector<float> g_in;
        std::vector<double> w_in;
        bool pad_ok = true;
        for (int64_t i = 0; i < nc; ++i) {
          const int64_t within = i % stride_c, row = within / ldc, col = within % ldc;
          if (row < M && col < N) {
            g_in.push_back(got[i]);
            w_in.push_back(Cd[i]);
          } else {
            pad_ok = pad_ok && std::memcmp(&got[i], &C[i], sizeof(float)) == 0;
          }
        }
        INFO("batch ", batch, " M ", M, " N ", N, " K ", K, " ta ", ta, " tb ", tb, " precision ",
             static_cast<int>(prec));
        CHECK(pad_ok);
        const double bound = prec == moa::MatmulPrecision::highest ? 1e-5 : prec == moa::MatmulPrecision::tf32 ? 5e-3
                                                                                                                : 2e-2;
        CHECK_REL(g_in, w_in, bound);
      }
  // K == 0: C = beta C (beta 0: zeros even over NaN); M, N or batch 0: nothing.
  std::vector<float> C = rnd(3 * 4 * 5);
  Dev<float> dC(C);
  b.gemm(false, false, 3, 4, 5, 0, 1.f, nullptr, 1, 0, nullptr, 5, 0, 0.5f, dC.get(), 5, 20,
         moa::MatmulPrecision::highest);
  std::vector<float> want(C.size());
  for (std::size_t i = 0; i < C.size(); ++i) want[i] = 0.5f * C[i];
  CHECK(same_bits(dC.host(), want));
  std::vector<float> nan(60, std::numeric_limits<float>::quiet_NaN());
  be().copy_to_device(dC.get(), nan.data(), 60 * sizeof(float), 0);
  b.gemm(true, true, 3, 4, 5, 0, 1.f, nullptr, 4, 0, nullptr, 1, 0, 0.f, dC.get(), 5, 20,
         moa::MatmulPrecision::bf16);
  CHECK(dC.host() == std::vector<float>(60, 0.f));
  b.gemm(false, false, 0, 4, 5, 6, 1.f, nullptr, 6, 0, nullptr, 5, 0, 0.f, nullptr, 5, 0,
         moa::MatmulPrecision::highest);
  b.gemm(false, false, 2, 0, 5, 6, 1.f, nullptr, 6, 0, nullptr, 5, 0, 0.f, nullptr, 5, 0,
         moa::MatmulPrecision::highest);
  b.gemm(false, false, 2, 4, 0, 6, 1.f, nullptr, 6, 0, nullptr, 5, 0, 0.f, nullptr, 5, 0,
         moa::MatmulPrecision::highest);
}

TEST_CASE("gemm_bias: the layer product with its bias, each transpose and precision, unaligned operands") {
  moa::DeviceBackend& b = be();
  const std::vector<std::array<int64_t, 3>> shapes{{1, 1, 1}, {7, 33, 1}, {33, 7, 257}, {64, 129, 96}, {128, 96, 64}};
  for (auto [M, N, K] : shapes)
    for (int t = 0; t < 4; ++t)
      for (moa::MatmulPrecision prec :
           {moa::MatmulPrecision::highest, moa::MatmulPrecision::tf32, moa::MatmulPrecision::bf16})
        for (int64_t off : {0, 1}) {  // off 1: A, B, bias and C one float past 16-byte alignment
          const bool ta = t & 1, tb = t & 2;
          const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
          const int64_t na = (ta ? K : M) * lda, nb = (tb ? N : K) * ldb, nc = M * ldc;
          std::vector<float> A = rnd(na + off), B = rnd(nb + off), bias = rnd(N + off, -2.f, 2.f);
          std::vector<float> C(nc + off, std::numeric_limits<float>::quiet_NaN());
          std::vector<double> Cd(nc);
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) Cd[i * ldc + j] = bias[off + j];
          const std::vector<double> Ad(A.begin() + off, A.end()), Bd(B.begin() + off, B.end());
          ref::gemm<double>(ta, tb, M, N, K, 1.0, Ad.data(), lda, Bd.data(), ldb, 1.0, Cd.data(), ldc);
          // error bounds relative to the magnitude |bias| + |A| |B| (a sum may cancel to near zero)
          std::vector<double> Aabs(Ad), Babs(Bd), mag(nc);
          for (double& v : Aabs) v = std::fabs(v);
          for (double& v : Babs) v = std::fabs(v);
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) mag[i * ldc + j] = std::fabs(bias[off + j]);
          ref::gemm<double>(ta, tb, M, N, K, 1.0, Aabs.data(), lda, Babs.data(), ldb, 1.0, mag.data(), ldc);
          Dev<float> dA(A), dB(B), dbias(bias), dC(C), dC2(C);
          b.gemm_bias(ta, tb, M, N, K, dA.get() + off, lda, dB.get() + off, ldb, dbias.get() + off, dC.get() + off, ldc,
                      prec);
          // the base implementation (bias broadcast, then a beta = 1 product) for comparison
          b.moa::DeviceBackend::gemm_bias(ta, tb, M, N, K, dA.get() + off, lda, dB.get() + off, ldb, dbias.get() + off,
                                          dC2.get() + off, ldc, prec);
          const std::vector<float> got = dC.host(), base = dC2.host();
          std::vector<float> g_in, base_in;
          double err = 0, base_err = 0, scale = 0;
          bool pad_ok = std::isnan(got[0]) || off == 0;
          for (int64_t i = 0; i < nc; ++i) {
            if (i % ldc < N) {
              g_in.push_back(got[off + i]);
              base_in.push_back(base[off + i]);
              err = std::max(err, std::fabs(got[off + i] - Cd[i]));  // NaN fails below
              if (std::isnan(got[off + i])) err = INFINITY;
              base_err = std::max(base_err, std::fabs(base[off + i] - Cd[i]));
              if (std::isnan(base[off + i])) base_err = INFINITY;
              scale = std::max(scale, mag[i]);
            } else {
              pad_ok = pad_ok && std::isnan(got[off + i]);
            }
          }
          const double bound = prec == moa::MatmulPrecision::highest ? 1e-5
                               : prec == moa::MatmulPrecision::tf32  ? 5e-3
                                                                     : 2e-2;
          INFO("M ", M, " N ", N, " K ", K, " ta ", ta, " tb ", tb, " precision ", static_cast<int>(prec), " offset ",
               off, ": error ", err, " (base path ", base_err, ") against magnitude ", scale);
          CHECK(pad_ok);
          CHECK(err <= bound * scale);
          CHECK(base_err <= bound * scale);
#ifdef MOA_CUDA_EMULATE
          CHECK(same_bits(g_in, base_in));  // the emulated epilogue adds the bias as the beta = 1 product does
#endif
        }
  // K == 0: every row is the bias; M or N 0: nothing (null pointers are not read).
  const std::vector<float> bias = rnd(5);
  Dev<float> dbias(bias), dC(std::vector<float>(4 * 6, std::numeric_limits<float>::quiet_NaN()));
  b.gemm_bias(false, true, 4, 5, 0, nullptr, 1, nullptr, 1, dbias.get(), dC.get(), 6, moa::MatmulPrecision::bf16);
  const std::vector<float> got = dC.host();
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 6; ++j)
      if (j < 5)
        CHECK(got[i * 6 + j] == bias[j]);
      else
        CHECK(std::isnan(got[i * 6 + j]));
  b.gemm_bias(false, true, 0, 5, 3, nullptr, 3, nullptr, 3, nullptr, nullptr, 5, moa::MatmulPrecision::highest);
  b.gemm_bias(false, true, 4, 0, 3, nullptr, 3, nullptr, 3, nullptr, nullptr, 1, moa::MatmulPrecision::highest);
  CHECK_THROWS_AS(b.gemm_bias(false, true, 4, 5, 3, dC.get(), 3, dC.get(), 3, dbias.get(), dC.get(), 4,
                              moa::MatmulPrecision::highest),
                  moa::ShapeError);  // ldc < N
  CHECK_THROWS_AS(b.gemm_bias(false, true, 4, 5, 3, dC.get(), 2, dC.get(), 3, dbias.get(), dC.get(), 6,
                              moa::MatmulPrecision::highest),
                  moa::ShapeError);  // lda < K
}

#ifdef MOA_CUDA_EMULATE
TEST_CASE("gemm_bias: cuBLASLt's epilogue where it has an algorithm, the broadcast and product where it has none") {
  moa::DeviceBackend& b = be();
  const int64_t M = 9, N = 11, K = 13;
  const std::vector<float> A = rnd(M * K), W = rnd(N * K), bias = rnd(N);
  std::vector<double> want(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) want[i * N + j] = bias[j];
  const std::vector<double> Ad(A.begin(), A.end()), Wd(W.begin(), W.end());
  ref::gemm<double>(false, true, M, N, K, 1.0, Ad.data(), K, Wd.data(), K, 1.0, want.data(), N);
  Dev<float> dA(A), dW(W), db(bias), dC(std::vector<float>(M * N));
  const long products = moa_emu::lt_matmul_calls, asked = moa_emu::lt_heuristic_calls;
  b.gemm_bias(false, true, M, N, K, dA.get(), K, dW.get(), K, db.get(), dC.get(), N, moa::MatmulPrecision::highest);
  b.gemm_bias(false, true, M, N, K, dA.get(), K, dW.get(), K, db.get(), dC.get(), N, moa::MatmulPrecision::highest);
  CHECK(moa_emu::lt_matmul_calls == products + 2);
  CHECK(moa_emu::lt_heuristic_calls == asked + 1);  // the plan is kept per shape
  CHECK_REL(dC.host(), want, 1e-5);
  // No algorithm for a new shape (N + 1 columns of a wider C): asked once, then the base path each time.
  moa_emu::lt_heuristic_finds = false;
  Dev<float> dC2(std::vector<float>(M * (N + 1), std::numeric_limits<float>::quiet_NaN()));
  for (int rep = 0; rep < 2; ++rep)
    b.gemm_bias(false, true, M, N, K, dA.get(), K, dW.get(), K, db.get(), dC2.get(), N + 1,
                moa::MatmulPrecision::highest);
  moa_emu::lt_heuristic_finds = true;
  CHECK(moa_emu::lt_matmul_calls == products + 2);
  CHECK(moa_emu::lt_heuristic_calls == asked + 2);
  const std::vector<float> got = dC2.host();
  std::vector<float> in;
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) in.push_back(got[i * (N + 1) + j]);
    CHECK(std::isnan(got[i * (N + 1) + N]));
  }
  CHECK_REL(in, want, 1e-5);
}
#endif

// ---- fused kernels ---------------------------------------------------------------------------------------
TEST_CASE("softmax and log-softmax through the backend: forward and backward") {
  moa::DeviceBackend& b = be();
  for (auto [N, C] : std::vector<std::array<int64_t, 2>>{{1, 1}, {7, 33}, {33, 1000}, {2, 50257}}) {
    INFO("N ", N, " C ", C);
    std::vector<float> x = rnd(N * C, -4.f, 4.f), g = rnd(N * C), y(N * C), dx(N * C);
    Dev<float> dxv(x), dg(g), dy(N * C), ddx(N * C);
    for (bool log : {false, true}) {
      if (log)
        ref::log_softmax_forward<float>(y.data(), x.data(), N, C);
      else
        ref::softmax_forward<float>(y.data(), x.data(), N, C);
      b.softmax_forward(log, dy.get(), dxv.get(), N, C);
      CHECK_REL(dy.host(), y, 1e-5);
      if (log)
        ref::log_softmax_backward<float>(dx.data(), g.data(), y.data(), N, C);
      else
        ref::softmax_backward<float>(dx.data(), g.data(), y.data(), N, C);
      b.softmax_backward(log, ddx.get(), dg.get(), dy.get(), N, C);
      CHECK_REL(ddx.host(), dx, 1e-5);
    }
  }
  b.softmax_forward(false, nullptr, nullptr, 0, 5);
  b.softmax_backward(true, nullptr, nullptr, nullptr, 0, 5);
}

TEST_CASE("cross_entropy through the backend: dloss on the device, ignored rows, all ignored, no rows") {
  moa::DeviceBackend& b = be();
  const std::vector<std::array<int64_t, 2>> shapes{{1, 1}, {7, 33}, {33, 1000}, {5, 50257}, {4, 7}};
  for (std::size_t k = 0; k < shapes.size(); ++k) {
    const auto [N, V] = shapes[k];
    INFO("N ", N, " V ", V);
    std::vector<float> x = rnd(N * V, -6.f, 6.f), lse(N), dl(N * V);
    std::vector<int32_t> t(N);
    for (int64_t n = 0; n < N; ++n) t[n] = n % 3 == 1 ? -7 : static_cast<int32_t>(rndi(0, V - 1));
    if (k == shapes.size() - 1) std::fill(t.begin(), t.end(), -7);
    const float loss = ref::cross_entropy_forward<float>(lse.data(), x.data(), t.data(), N, V, -7);
    ref::cross_entropy_backward<float>(dl.data(), 1.5f, x.data(), lse.data(), t.data(), N, V, -7);
    Dev<float> dx(x), dlse(N), dloss(1), ddl(N * V), dg(std::vector<float>{1.5f});
    Dev<int32_t> dt(t);
    b.cross_entropy_forward(dloss.get(), dlse.get(), dx.get(), dt.get(), N, V, -7);
    CHECK_REL(dloss.host(), std::vector<float>{loss}, 1e-5);
    CHECK_REL(dlse.host(), lse, 1e-5);
    b.cross_entropy_backward(ddl.get(), dg.get(), dx.get(), dlse.get(), dt.get(), N, V, -7);
    CHECK_REL(ddl.host(), dl, 1e-5);
  }
  Dev<float> dloss(std::vector<float>{42.f});
  b.cross_entropy_forward(dloss.get(), nullptr, nullptr, nullptr, 0, 10, -100);
  CHECK(dloss.host() == std::vector<float>{0.f});
  b.cross_entropy_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 10, -100);
}

TEST_CASE("layer_norm and rms_norm through the backend: dx written, dweight/dbias accumulated, nulls") {
  moa::DeviceBackend& b = be();
  // Not C = 1 or 2 (see test_cuda_ops.cu: rms_norm's and layer_norm's dx have no stable float32
  // answer there).
  for (auto [N, C] : std::vector<std::array<int64_t, 2>>{{1, 3}, {7, 33}, {257, 7}, {33, 768}, {5, 4097}})
    for (int variant = 0; variant < 3; ++variant) {
      // variant 0: everything; 1: no bias, no dx; 2: only dx.
      INFO("N ", N, " C ", C, " variant ", variant);
      const bool with_bias = variant == 0, want_dx = variant != 1, want_dw = variant != 2;
      std::vector<float> x = rnd(N * C, -2.f, 3.f), wt = rnd(C, 0.5f, 1.5f), bias = rnd(C), g = rnd(N * C);
      std::vector<float> y(N * C), mean(N), rstd(N), dx(N * C), dw = rnd(C), db = rnd(C);
      Dev<float> dxv(x), dwt(wt), dbias(bias), dg(g), ddw(dw), ddb(db), dy(N * C), dmean(N), drstd(N), ddx(N * C);
      ref::layer_norm_forward<float>(y.data(), mean.data(), rstd.data(), x.data(), wt.data(),
                                     with_bias ? bias.data() : nullptr, N, C, 1e-5f);
      b.layer_norm_forward(dy.get(), dmean.get(), drstd.get(), dxv.get(), dwt.get(), with_bias ? dbias.get() : nullptr,
                           N, C, 1e-5f);
      CHECK_REL(dy.host(), y, 1e-5);
      CHECK_REL(dmean.host(), mean, 1e-5);
      CHECK_REL(drstd.host(), rstd, 1e-5);
      ref::layer_norm_backward<float>(want_dx ? dx.data() : nullptr, want_dw ? dw.data() : nullptr,
                                      with_bias ? db.data() : nullptr, g.data(), x.data(), wt.data(), mean.data(),
                                      rstd.data(), N, C);
      b.layer_norm_backward(want_dx ? ddx.get() : nullptr, want_dw ? ddw.get() : nullptr,
                            with_bias ? ddb.get() : nullptr, dg.get(), dxv.get(), dwt.get(), dmean.get(), drstd.get(),
                            N, C);
      if (want_dx) CHECK_REL(ddx.host(), dx, 1e-5);
      CHECK_REL(ddw.host(), dw, 1e-5);
      CHECK_REL(ddb.host(), db, 1e-5);

      ref::rms_norm_forward<float>(y.data(), rstd.data(), x.data(), wt.data(), N, C, 1e-6f);
      b.rms_norm_forward(dy.get(), drstd.get(), dxv.get(), dwt.get(), N, C, 1e-6f);
      CHECK_REL(dy.host(), y, 1e-5);
      CHECK_REL(drstd.host(), rstd, 1e-5);
      ref::rms_norm_backward<float>(want_dx ? dx.data() : nullptr, want_dw ? dw.data() : nullptr, g.data(), x.data(),
                                    wt.data(), rstd.data(), N, C);
      b.rms_norm_backward(want_dx ? ddx.get() : nullptr, want_dw ? ddw.get() : nullptr, dg.get(), dxv.get(), dwt.get(),
                          drstd.get(), N, C);
      if (want_dx) CHECK_REL(ddx.host(), dx, 1e-5);
      CHECK_REL(ddw.host(), dw, 1e-5);
    }
  b.layer_norm_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 8, 1e-5f);
  b.layer_norm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 8);
  b.rms_norm_forward(nullptr, nullptr, nullptr, nullptr, 0, 8, 1e-5f);
  b.rms_norm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 8);
}

TEST_CASE("embedding through the backend: gather, scatter-add with repeated ids") {
  moa::DeviceBackend& b = be();
  for (auto [N, V, C] : std::vector<std::array<int64_t, 3>>{{1, 1, 1}, {7, 3, 33}, {257, 50, 768}, {33, 1000, 7}}) {
    INFO("N ", N, " V ", V, " C ", C);
    std::vector<int32_t> ids(N);
    for (auto& i : ids) i = static_cast<int32_t>(rndi(0, V - 1));
    std::vector<float> w = rnd(V * C), g = rnd(N * C), out(N * C), dw = rnd(V * C);
    Dev<int32_t> dids(ids);
    Dev<float> dwt(w), dg(g), ddw(dw), dout(N * C);
    ref::embedding_forward<float>(out.data(), ids.data(), w.data(), N, C);
    b.embedding_forward(dout.get(), dids.get(), dwt.get(), N, C);
    CHECK(same_bits(dout.host(), out));
    std::vector<double> dwd(dw.begin(), dw.end()), gd(g.begin(), g.end());
    ref::embedding_backward<double>(dwd.data(), gd.data(), ids.data(), N, C);
    b.embedding_backward(ddw.get(), dg.get(), dids.get(), N, C);
    CHECK_REL(ddw.host(), dwd, 1e-5);
  }
  b.embedding_forward(nullptr, nullptr, nullptr, 0, 4);
  b.embedding_backward(nullptr, nullptr, nullptr, 0, 4);
}

// With MatmulPrecision::bf16 the shapes the tensor-core kernels take (Tq >= 16, D <= 128) run on
// them (bound 2e-2, bf16 products); the others, and highest, run the exact kernels (2e-5).
TEST_CASE("attention through the backend: causal, GQA, Tq < Tk (a KV cache), odd D, optional gradients") {
  moa::DeviceBackend& b = be();
  const std::vector<moa::AttentionDims> shapes{{1, 1, 1, 1, 1, 1},   {2, 4, 2, 7, 7, 33},   {1, 2, 1, 5, 9, 64},
                                               {1, 3, 3, 33, 33, 128}, {1, 6, 2, 17, 40, 96}, {1, 1, 1, 7, 7, 256},
                                               {2, 6, 2, 1, 17, 24},   {2, 4, 2, 70, 70, 64}};
  const moa::MatmulPrecision before = moa::matmul_precision();
  for (const moa::MatmulPrecision prec : {moa::MatmulPrecision::highest, moa::MatmulPrecision::bf16})
  for (const moa::AttentionDims& s : shapes)
    for (int wanted = 0; wanted < 4; ++wanted) {  // 0: all; 1: dq only; 2: dk only; 3: dv, dk (no dq)
      moa::set_matmul_precision(prec);
      const bool tc = prec == moa::MatmulPrecision::bf16 &&
                      moa::kernels::cuda::flash_attention_supported({s.B, s.Hq, s.Hkv, s.Tq, s.Tk, s.D});
      const double bound = tc ? 2e-2 : 2e-5, lse_bound = tc ? 2e-2 : 1e-5;
      INFO("B ", s.B, " Hq ", s.Hq, " Hkv ", s.Hkv, " Tq ", s.Tq, " Tk ", s.Tk, " D ", s.D, " wanted ", wanted,
           " tensor cores ", tc);
      const int64_t nq = s.B * s.Hq * s.Tq * s.D, nk = s.B * s.Hkv * s.Tk * s.D, nl = s.B * s.Hq * s.Tq;
      const float scale = 1.f / std::sqrt(static_cast<float>(s.D));
      std::vector<float> q = rnd(nq, -2.f, 2.f), k = rnd(nk, -2.f, 2.f), v = rnd(nk), g = rnd(nq);
      std::vector<float> out(nq), lse(nl), dq(nq), dk(nk), dv(nk);
      ref::attention_forward<float>(out.data(), lse.data(), q.data(), k.data(), v.data(), s.B, s.Hq, s.Hkv, s.Tq,
                                    s.Tk, s.D, scale);
      ref::attention_backward<float>(dq.data(), dk.data(), dv.data(), g.data(), q.data(), k.data(), v.data(),
                                     out.data(), lse.data(), s.B, s.Hq, s.Hkv, s.Tq, s.Tk, s.D, scale);
      Dev<float> dqv(q), dkv(k), dvv(v), dg(g), dout(nq), dlse(nl);
      const std::vector<float> poison(std::max(nq, nk), 1234.5f);
      Dev<float> ddq(poison), ddk(poison), ddv(poison);
      b.attention_forward(dout.get(), dlse.get(), dqv.get(), dkv.get(), dvv.get(), s, scale);
      CHECK_REL(dout.host(), out, bound);
      CHECK_REL(dlse.host(), lse, lse_bound);
      const bool wq = wanted == 0 || wanted == 1, wk = wanted == 0 || wanted == 2 || wanted == 3,
                 wv = wanted == 0 || wanted == 3;
      b.attention_backward(wq ? ddq.get() : nullptr, wk ? ddk.get() : nullptr, wv ? ddv.get() : nullptr, dg.get(),
                           dqv.get(), dkv.get(), dvv.get(), dout.get(), dlse.get(), s, scale);
      if (wq)
        CHECK_REL(ddq.host(nq), dq, bound);
      else
        CHECK(ddq.host(nq) == std::vector<float>(nq, 1234.5f));
      if (wk)
        CHECK_REL(ddk.host(nk), dk, bound);
      else
        CHECK(ddk.host(nk) == std::vector<float>(nk, 1234.5f));
      if (wv)
        CHECK_REL(ddv.host(nk), dv, bound);
      else
        CHECK(ddv.host(nk) == std::vector<float>(nk, 1234.5f));
    }
  moa::set_matmul_precision(before);
  b.attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, {0, 2, 1, 3, 3, 8}, 1.f);
  b.attention_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                       {1, 2, 1, 3, 3, 8}, 1.f);
  CHECK_THROWS_AS(b.attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, {1, 3, 2, 3, 3, 8}, 1.f),
                  moa::ShapeError);  // Hq not a multiple of Hkv
}

// Operands in the heads layout of a projection output (tests/cuda/strided_heads.hpp), as
// causal_attention passes them: the same values as the contiguous call, bit for bit, on both the
// tensor-core and the exact kernels, with any subset of gradients (an unwanted dk or dv gets the
// backend's contiguous scratch whatever layout it was given); nothing written between rows.
TEST_CASE("attention through the backend: strided operands give the contiguous results bit for bit") {
  using moa_test::StridedHeads;
  moa::DeviceBackend& b = be();
  const moa::MatmulPrecision before = moa::matmul_precision();
  const std::vector<moa::AttentionDims> shapes{{2, 4, 2, 40, 40, 32}, {1, 2, 1, 20, 33, 7}, {2, 3, 3, 3, 9, 16}};
  for (const moa::MatmulPrecision prec : {moa::MatmulPrecision::highest, moa::MatmulPrecision::bf16})
    for (const moa::AttentionDims& s : shapes)
      for (int wanted = 0; wanted < 3; ++wanted) {  // 0: all; 1: dq only; 2: dk only
        moa::set_matmul_precision(prec);
        INFO("B ", s.B, " Hq ", s.Hq, " Hkv ", s.Hkv, " Tq ", s.Tq, " Tk ", s.Tk, " D ", s.D, " wanted ", wanted,
             " bf16 ", prec == moa::MatmulPrecision::bf16);
        const int64_t nq = s.B * s.Hq * s.Tq * s.D, nk = s.B * s.Hkv * s.Tk * s.D, nl = s.B * s.Hq * s.Tq;
        const float scale = 0.25f;
        const std::vector<float> q = rnd(nq), k = rnd(nk), v = rnd(nk), g = rnd(nq);
        const bool wq = wanted != 2, wk = wanted != 1, wv = wanted == 0;
        // Contiguous.
        Dev<float> dqv(q), dkv(k), dvv(v), dg(g), dout(nq), dlse(nl), ddq(nq), ddk(nk), ddv(nk);
        b.attention_forward(dout.get(), dlse.get(), dqv.get(), dkv.get(), dvv.get(), s, scale);
        b.attention_backward(wq ? ddq.get() : nullptr, wk ? ddk.get() : nullptr, wv ? ddv.get() : nullptr, dg.get(),
                             dqv.get(), dkv.get(), dvv.get(), dout.get(), dlse.get(), s, scale);
        // Strided.
        StridedHeads sq(q, s.B, s.Hq, s.Tq, s.D, 4), sk(k, s.B, s.Hkv, s.Tk, s.D, 1), sv(v, s.B, s.Hkv, s.Tk, s.D, 0),
            sg(g, s.B, s.Hq, s.Tq, s.D, 2), so(s.B, s.Hq, s.Tq, s.D, 3), sdq(s.B, s.Hq, s.Tq, s.D, 0),
            sdk(s.B, s.Hkv, s.Tk, s.D, 4), sdv(s.B, s.Hkv, s.Tk, s.D, 1);
        moa::AttentionDims st = s;
        st.layout = {sq.layout, sk.layout, sv.layout, so.layout, sg.layout, sdq.layout, sdk.layout, sdv.layout};
        Dev<float> xq(sq.buf), xk(sk.buf), xv(sv.buf), xg(sg.buf), xo(so.buf), xlse(nl), xdq(sdq.buf), xdk(sdk.buf),
            xdv(sdv.buf);
        b.attention_forward(xo.get(), xlse.get(), xq.get(), xk.get(), xv.get(), st, scale);
        b.attention_backward(wq ? xdq.get() : nullptr, wk ? xdk.get() : nullptr, wv ? xdv.get() : nullptr, xg.get(),
                             xq.get(), xk.get(), xv.get(), xo.get(), xlse.get(), st, scale);
        so.buf = xo.host();
        CHECK(same_bits(so.gather(), dout.host()));
        CHECK(same_bits(xlse.host(), dlse.host()));
        CHECK(so.gaps_untouched());
        const std::pair<StridedHeads*, std::pair<Dev<float>*, Dev<float>*>> grads[] = {
            {&sdq, {&xdq, &ddq}}, {&sdk, {&xdk, &ddk}}, {&sdv, {&xdv, &ddv}}};
        const bool want[] = {wq, wk, wv};
        for (int i = 0; i < 3; ++i) {
          StridedHeads& sh = *grads[i].first;
          sh.buf = grads[i].second.first->host();
          if (want[i]) CHECK(same_bits(sh.gather(), grads[i].second.second->host()));
          CHECK(sh.gaps_untouched());
          if (!want[i]) CHECK(std::all_of(sh.buf.begin(), sh.buf.end(), [](float x) { return std::isnan(x); }));
        }
      }
  moa::set_matmul_precision(before);
}

namespace {

// moa::detail::rope_tables + rope_apply (moa/ops/rope.hpp) for float, unfused.
std::vector<float> rope_host(const std::vector<float>& x, int64_t BH, int64_t T, int64_t D, int64_t start,
                             double theta, int sign) {
  const int64_t half = D / 2;
  std::vector<double> cos_t(T * half), sin_t(T * half);
  for (int64_t i = 0; i < half; ++i) {
    const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(D));
    for (int64_t t = 0; t < T; ++t) {
      const double a = static_cast<double>(start + t) * inv_freq;
      cos_t[t * half + i] = std::cos(a);
      sin_t[t * half + i] = std::sin(a);
    }
  }
  std::vector<float> y(x.size());
  for (int64_t r = 0; r < BH; ++r)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const float ci = static_cast<float>(cos_t[t * half + i]), si = static_cast<float>(sign * sin_t[t * half + i]);
        const float a = x[(r * T + t) * D + i], bb = x[(r * T + t) * D + i + half];
        y[(r * T + t) * D + i] = fsub(fmul(a, ci), fmul(bb, si));
        y[(r * T + t) * D + i + half] = fadd(fmul(bb, ci), fmul(a, si));
      }
  return y;
}

}  // namespace

TEST_CASE("rope: bit-identical to moa/ops/rope.hpp's float arithmetic, both signs, offsets, in place") {
  moa::DeviceBackend& b = be();
  struct Case {
    int64_t BH, T, D, start;
    double theta;
  };
  const std::vector<Case> cases{{1, 1, 2, 0, 10000.0},   {3, 7, 64, 0, 10000.0},   {2, 33, 6, 5, 10000.0},
                                {4, 1, 128, 1000, 10000.0}, {2, 300, 64, 0, 500000.0}, {1, 5, 64, 4095, 10000.0},
                                {5, 2000, 8, 17, 10000.0}};
  for (const Case& c : cases)
    for (int sign : {1, -1}) {
      INFO("BH ", c.BH, " T ", c.T, " D ", c.D, " start ", c.start, " theta ", c.theta, " sign ", sign);
      const int64_t n = c.BH * c.T * c.D;
      std::vector<float> x = rnd(n, -3.f, 3.f);
      Dev<float> dx(x), dy(n);
      b.rope(dy.get(), dx.get(), c.BH, c.T, c.D, c.start, c.theta, sign);
      const std::vector<float> want = rope_host(x, c.BH, c.T, c.D, c.start, c.theta, sign);
      CHECK(same_bits(dy.host(), want));
      b.rope(dx.get(), dx.get(), c.BH, c.T, c.D, c.start, c.theta, sign);  // in place
      CHECK(same_bits(dx.host(), want));
      b.rope(dx.get(), dx.get(), c.BH, c.T, c.D, c.start, c.theta, -sign);  // the inverse rotation
      CHECK_REL(dx.host(), x, 1e-6);
    }
  b.rope(nullptr, nullptr, 3, 0, 8, 0, 10000.0, 1);
}

TEST_CASE("rope_heads: strided heads (a projection output's) read and written in place, bit-identical") {
  moa::DeviceBackend& b = be();
  for (auto [B, H, T, D, start] :
       std::vector<std::array<int64_t, 5>>{{2, 3, 7, 8, 0}, {1, 4, 33, 64, 5}, {3, 1, 2, 6, 9}})
    for (int sign : {1, -1}) {
      INFO("B ", B, " H ", H, " T ", T, " D ", D, " start ", start, " sign ", sign);
      const int64_t n = B * H * T * D;
      const std::vector<float> x = rnd(n, -3.f, 3.f);
      const std::vector<float> want = rope_host(x, B * H, T, D, start, 10000.0, sign);
      moa_test::StridedHeads xs(x, B, H, T, D, 3), ys(B, H, T, D, 5);
      Dev<float> dxs(xs.buf), dys(ys.buf), dc(n);
      // strided -> contiguous, contiguous -> strided, strided in place
      b.rope_heads(dc.get(), {}, dxs.get(), xs.layout, B, H, T, D, start, 10000.0, sign);
      CHECK(same_bits(dc.host(), want));
      Dev<float> dx(x);
      b.rope_heads(dys.get(), ys.layout, dx.get(), {}, B, H, T, D, start, 10000.0, sign);
      ys.buf = dys.host();
      CHECK(same_bits(ys.gather(), want));
      CHECK(ys.gaps_untouched());
      b.rope_heads(dxs.get(), xs.layout, dxs.get(), xs.layout, B, H, T, D, start, 10000.0, sign);
      xs.buf = dxs.host();
      CHECK(same_bits(xs.gather(), want));
      CHECK(xs.gaps_untouched());
    }
}

TEST_CASE("adamw_step: bit-identical to moa::optim::AdamW::step's float arithmetic") {
  moa::DeviceBackend& b = be();
  struct Hyper {
    double lr, b1, b2, eps, wd;
  };
  for (const Hyper hp : {Hyper{3e-4, 0.9, 0.95, 1e-8, 0.1}, Hyper{1e-2, 0.8, 0.999, 1e-6, 0.0}})
    for (int64_t n : {1, 7, 257, 65537}) {
      std::vector<float> w = rnd(n), m(n, 0.f), v(n, 0.f);
      Dev<float> dw(w), dm(m), dv(v);
      for (int64_t step = 1; step <= 3; ++step) {
        std::vector<float> g = rnd(n);
        Dev<float> dg(g);
        const double bc1 = 1.0 - std::pow(hp.b1, static_cast<double>(step));
        const double bc2 = 1.0 - std::pow(hp.b2, static_cast<double>(step));
        const float b1 = static_cast<float>(hp.b1), b2 = static_cast<float>(hp.b2);
        const float decay = static_cast<float>(1.0 - hp.lr * hp.wd), step_size = static_cast<float>(hp.lr / bc1);
        const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2)), eps = static_cast<float>(hp.eps);
        for (int64_t k = 0; k < n; ++k) {  // AdamW::step's loop, each operation rounded
          w[k] = fmul(w[k], decay);
          m[k] = fadd(fmul(b1, m[k]), fmul(fsub(1.f, b1), g[k]));
          v[k] = fadd(fmul(b2, v[k]), fmul(fmul(fsub(1.f, b2), g[k]), g[k]));
          w[k] = fsub(w[k], fdiv(fmul(step_size, m[k]), fadd(fmul(std::sqrt(v[k]), inv_sqrt_bc2), eps)));
        }
        b.adamw_step(dw.get(), dm.get(), dv.get(), dg.get(), n, hp.lr, hp.b1, hp.b2, hp.eps, hp.wd, step);
        INFO("n ", n, " step ", step, " lr ", hp.lr);
        CHECK(same_bits(dw.host(), w));
        CHECK(same_bits(dm.host(), m));
        CHECK(same_bits(dv.host(), v));
      }
    }
  b.adamw_step(nullptr, nullptr, nullptr, nullptr, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1);
  CHECK_THROWS_AS(b.adamw_step(nullptr, nullptr, nullptr, nullptr, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0),
                  moa::ValueError);
}

TEST_CASE("adamw_step_all, scale_all, sum_squares_all: many buffers in few launches, each as alone") {
  moa::DeviceBackend& b = be();
  // 97 tensors (3 launches of at most 40 for AdamW) of mixed sizes, empty ones included.
  const int64_t sizes[] = {0, 1, 7, 33, 257, 1000, 12288, 65537};
  std::vector<int64_t> n;
  for (int i = 0; i < 97; ++i) n.push_back(sizes[(i * 5 + i / 8) % 8]);
  std::vector<std::vector<float>> w, m, v, g;
  std::vector<Dev<float>> dw, dm, dv, dg, rw, rm, rv;
  for (int64_t k : n) {
    w.push_back(rnd(k));
    m.push_back(rnd(k, 0.f, 0.1f));
    v.push_back(rnd(k, 0.f, 0.1f));
    g.push_back(rnd(k));
    dw.emplace_back(w.back());
    dm.emplace_back(m.back());
    dv.emplace_back(v.back());
    dg.emplace_back(g.back());
    rw.emplace_back(w.back());  // the reference: one adamw_step per tensor (itself bit-checked above)
    rm.emplace_back(m.back());
    rv.emplace_back(v.back());
  }
  std::vector<moa::AdamWBuffers> list;
  for (std::size_t i = 0; i < n.size(); ++i) {
    list.push_back({dw[i].get(), dm[i].get(), dv[i].get(), dg[i].get(), n[i]});
    b.adamw_step(rw[i].get(), rm[i].get(), rv[i].get(), dg[i].get(), n[i], 3e-4, 0.9, 0.95, 1e-8, 0.1, 5);
  }
  b.adamw_step_all(list, 3e-4, 0.9, 0.95, 1e-8, 0.1, 5);
  for (std::size_t i = 0; i < n.size(); ++i) {
    INFO("tensor ", i, " n ", n[i]);
    CHECK(same_bits(dw[i].host(), rw[i].host()));
    CHECK(same_bits(dm[i].host(), rm[i].host()));
    CHECK(same_bits(dv[i].host(), rv[i].host()));
  }
  CHECK_THROWS_AS(b.adamw_step_all(list, 3e-4, 0.9, 0.95, 1e-8, 0.1, 0), moa::ValueError);
  b.adamw_step_all({}, 3e-4, 0.9, 0.95, 1e-8, 0.1, 1);

  // 300 buffers: 3 launches of at most 128 for the squares and the scaling.
  std::vector<std::pair<const float*, int64_t>> cbuf;
  std::vector<std::pair<float*, int64_t>> buf;
  double want = 0.0;
  std::vector<std::vector<float>> scaled;
  const double coef = 0.3183098861837907;
  const float c = static_cast<float>(coef);
  for (int i = 0; i < 300; ++i) {
    const std::size_t t = static_cast<std::size_t>(i % 97);
    cbuf.emplace_back(dg[t].get(), n[t]);
    for (float x : g[t]) want += static_cast<double>(x) * x;
  }
  const double got = b.sum_squares_all(cbuf);
  CHECK(std::abs(got - want) <= 1e-12 * want);
  for (std::size_t t = 0; t < n.size(); ++t) {
    buf.emplace_back(dg[t].get(), n[t]);
    scaled.push_back(g[t]);
    for (float& x : scaled.back()) x = fmul(x, c);  // the cpu's clip: x *= float(coef)
  }
  b.scale_all(buf, coef);
  for (std::size_t t = 0; t < n.size(); ++t) CHECK(same_bits(dg[t].host(), scaled[t]));
  b.scale_all({}, coef);
}

// ---- grouped LoRA --------------------------------------------------------------------------------------------------
namespace {

struct LoraCase {
  int64_t N, In, Out, R, E;
  bool weighted, unique;
  int grads;  // 0: dA and dB for every expert, dw; 1: dA only (dB empty), no dw; 2: dB with a null entry, no dx
  bool write = false;      // GroupedLoRADims::write_grads: dx, dA, dB start as NaN and are written
  bool every_row = false;  // one assignment per row (M == N)
};

void check_grouped_lora(const LoraCase& c) {
  moa::DeviceBackend& be_ = be();
  const moa_test::GroupedAssignments asg = moa_test::grouped_assignments(c.N, c.E, c.unique, rndi, c.every_row);
  const std::vector<int32_t>& rows = asg.rows;
  const std::vector<int32_t>& seg = asg.seg;
  const int64_t M = static_cast<int64_t>(rows.size());
  const float scale = 0.625f;
  std::vector<float> x = rnd(c.N * c.In), y0 = rnd(c.N * c.Out), g = rnd(c.N * c.Out), dx0 = rnd(c.N * c.In);
  // Written gradients: the reference adds onto zeros, the device buffers start as NaN.
  auto start = [&](const std::vector<float>& v) { return c.write ? std::vector<float>(v.size(), NAN) : v; };
  auto ref_start = [&](const std::vector<float>& v) { return c.write ? std::vector<float>(v.size(), 0.f) : v; };
  std::vector<float> w = c.weighted ? rnd(M, 0.1f, 1.f) : std::vector<float>();
  std::vector<std::vector<float>> A(c.E), B(c.E), dA0(c.E), dB0(c.E);
  for (int64_t e = 0; e < c.E; ++e) {
    A[e] = rnd(c.R * c.In);
    B[e] = rnd(c.Out * c.R);
    dA0[e] = rnd(c.R * c.In);
    dB0[e] = rnd(c.Out * c.R);
  }
  const bool want_dA = c.grads != 2, want_dB = c.grads != 1, want_dw = c.grads == 0, want_dx = c.grads != 2;
  const int64_t null_dB = c.grads == 2 ? c.E - 1 : -1;  // this expert's dB is not wanted
  // The definition, assignment by assignment, in double.
  std::vector<std::vector<float>> dA0_ref, dB0_ref;
  for (int64_t e = 0; e < c.E; ++e) {
    dA0_ref.push_back(ref_start(dA0[e]));
    dB0_ref.push_back(ref_start(dB0[e]));
    dA0[e] = start(dA0[e]);
    dB0[e] = start(dB0[e]);
  }
  const moa_test::GroupedReference ref =
      moa_test::grouped_lora_reference(c.N, c.In, c.Out, c.R, c.E, asg, x, A, B, y0, g, ref_start(dx0), dA0_ref,
                                       dB0_ref, c.weighted ? &w : nullptr, scale);
  dx0 = start(dx0);
  const auto& [y, h, dx, dw, dA, dB] = ref;
  // The device, through the backend.
  std::vector<Dev<float>> dAe, dBe, ddA, ddB;
  std::vector<const float*> pA, pB;
  std::vector<float*> pdA, pdB;
  for (int64_t e = 0; e < c.E; ++e) {
    dAe.emplace_back(A[e]);
    dBe.emplace_back(B[e]);
    ddA.emplace_back(dA0[e]);
    ddB.emplace_back(dB0[e]);
  }
  for (int64_t e = 0; e < c.E; ++e) {
    pA.push_back(dAe[e].get());
    pB.push_back(dBe[e].get());
    if (want_dA) pdA.push_back(ddA[e].get());
    if (want_dB) pdB.push_back(e == null_dB ? nullptr : ddB[e].get());
  }
  Dev<float> dxv(x), dy(y0), dg(g), ddx(dx0), dwts(w), dh(M * c.R), ddh(M * c.R), ddw(M);
  Dev<int32_t> drows(rows), dseg(seg);
  const moa::GroupedLoRADims d{.N = c.N, .M = M, .E = c.E, .In = c.In, .Out = c.Out, .R = c.R, .write_grads = c.write};
  const float* wptr = c.weighted ? dwts.get() : nullptr;
  be_.grouped_lora_forward(dy.get(), dh.get(), dxv.get(), pA, pB, drows.get(), dseg.get(), wptr, scale, d, c.unique);
  be_.grouped_lora_backward(want_dx ? ddx.get() : nullptr, pdA, pdB, want_dw ? ddw.get() : nullptr, ddh.get(),
                            dg.get(), dxv.get(), dh.get(), pA, pB, drows.get(), dseg.get(), wptr, scale, d, c.unique);
  INFO("N ", c.N, " In ", c.In, " Out ", c.Out, " R ", c.R, " E ", c.E, " M ", M, " weighted ", c.weighted, " unique ",
       c.unique, " grads ", c.grads, " write ", c.write, " every_row ", c.every_row);
  CHECK_REL(dy.host(c.N * c.Out), y, 1e-5);
  CHECK_REL(dh.host(M * c.R), h, 1e-5);
  if (want_dx)
    CHECK_REL(ddx.host(c.N * c.In), dx, 1e-5);
  else
    CHECK(same_bits(ddx.host(c.N * c.In), dx0));
  if (want_dw) CHECK_REL(ddw.host(M), dw, 1e-5);
  for (int64_t e = 0; e < c.E; ++e) {
    if (want_dA)
      CHECK_REL(ddA[e].host(), dA[e], 1e-5);
    else
      CHECK(same_bits(ddA[e].host(), dA0[e]));
    if (want_dB && e != null_dB)
      CHECK_REL(ddB[e].host(), dB[e], 1e-5);
    else
      CHECK(same_bits(ddB[e].host(), dB0[e]));
  }
}

}  // namespace

TEST_CASE("grouped_lora through the backend: per-assignment definition, unique and repeated rows, optional grads") {
  const std::vector<LoraCase> cases{
      {1, 1, 1, 1, 1, false, true, 0},       {7, 33, 7, 7, 3, false, true, 0},    {33, 257, 65, 16, 4, true, true, 1},
      {257, 64, 33, 8, 4, false, false, 0},  {100, 96, 130, 33, 2, true, false, 2}, {64, 48, 40, 64, 5, true, true, 2},
      {513, 768, 768, 16, 4, false, true, 0}, {300, 40, 50, 4, 3, true, false, 1}};
  for (const LoraCase& c : cases) check_grouped_lora(c);
  // The same case twice: the cached pointer arrays are reused (and new buffers upload new ones).
  check_grouped_lora(cases[2]);
  check_grouped_lora(cases[2]);
  // Written gradients (write_grads) over NaN: dx stored (rows a permutation) or zeroed and added;
  // dA / dB stored (one slice per expert, expert 1 of 3 empty: zeros) or zeroed and added by slices.
  const std::vector<LoraCase> written{{37, 33, 7, 7, 3, false, true, 0, true, true},
                                      {37, 33, 7, 7, 3, true, true, 1, true, false},
                                      {520, 24, 20, 16, 3, true, true, 0, true, true},
                                      {300, 20, 36, 4, 2, false, false, 2, true, false},
                                      {513, 768, 768, 16, 4, false, true, 0, true, true}};
  for (const LoraCase& c : written) check_grouped_lora(c);
  moa::DeviceBackend& b = be();
  const moa::GroupedLoRADims d{.N = 2, .M = 2, .E = 2, .In = 4, .Out = 4, .R = 2};
  CHECK_THROWS_AS(b.grouped_lora_forward(nullptr, nullptr, nullptr, {nullptr}, {nullptr, nullptr}, nullptr, nullptr,
                                         nullptr, 1.f, d, true),
                  moa::ShapeError);  // one A pointer for two experts
  const moa::GroupedLoRADims empty{.N = 2, .M = 0, .E = 2, .In = 4, .Out = 4, .R = 2};
  b.grouped_lora_forward(nullptr, nullptr, nullptr, {nullptr, nullptr}, {nullptr, nullptr}, nullptr, nullptr, nullptr,
                         1.f, empty, true);
  b.grouped_lora_backward(nullptr, {}, {}, nullptr, nullptr, nullptr, nullptr, nullptr, {nullptr, nullptr},
                          {nullptr, nullptr}, nullptr, nullptr, nullptr, 1.f, empty, true);
  // No assignments but written gradients: dx, dA and dB become zeros.
  Dev<float> zx(std::vector<float>(8, NAN)), za0(std::vector<float>(8, NAN)), za1(std::vector<float>(8, NAN)),
      zb1(std::vector<float>(8, NAN));
  moa::GroupedLoRADims empty_written = empty;
  empty_written.write_grads = true;
  b.grouped_lora_backward(zx.get(), {za0.get(), za1.get()}, {nullptr, zb1.get()}, nullptr, nullptr, nullptr, nullptr,
                          nullptr, {nullptr, nullptr}, {nullptr, nullptr}, nullptr, nullptr, nullptr, 1.f,
                          empty_written, true);
  for (const Dev<float>* z : {&zx, &za0, &za1, &zb1}) CHECK(same_bits(z->host(), std::vector<float>(8, 0.f)));
}

// ---- a warm step does no device malloc ----------------------------------------------------------------------
TEST_CASE("allocator: a repeated step of every scratch-using method does no device malloc once warm") {
  moa::DeviceBackend& b = be();
  const int64_t N = 37, C = 1000, V = 301;
  std::vector<float> x = rnd(N * C), big = rnd(3 * 200001), logits = rnd(N * V);
  std::vector<int32_t> t(N);
  for (auto& v : t) v = static_cast<int32_t>(rndi(0, V - 1));
  const moa::AttentionDims ad{1, 4, 2, 9, 13, 32};
  const int64_t nq = ad.B * ad.Hq * ad.Tq * ad.D, nk = ad.B * ad.Hkv * ad.Tk * ad.D;
  auto step = [&] {
    Dev<float> dx(x), dbig(big), dl(logits), out(N * C), lse(N), loss(1), dlog(N * V), one(std::vector<float>{1.f});
    Dev<int32_t> dt(t);
    b.sum_rows(out.get(), dbig.get(), 3, 200001, 1.0);  // the split kernel's scratch
    (void)b.sum_squares(dx.get(), N * C);
    b.cross_entropy_forward(loss.get(), lse.get(), dl.get(), dt.get(), N, V, -100);
    b.cross_entropy_backward(dlog.get(), one.get(), dl.get(), lse.get(), dt.get(), N, V, -100);
    Dev<float> q(rnd(nq)), k(rnd(nk)), v(rnd(nk)), o(nq), ls(nq / ad.D), dk(nk);
    b.attention_forward(o.get(), ls.get(), q.get(), k.get(), v.get(), ad, 0.2f);
    b.attention_backward(nullptr, dk.get(), nullptr, q.get(), q.get(), k.get(), v.get(), o.get(), ls.get(), ad, 0.2f);
    b.rope(q.get(), q.get(), ad.B * ad.Hq, ad.Tq, ad.D, 3, 10000.0, 1);
    b.gemm(false, true, 2, 7, 9, 11, 1.f, dx.get(), 11, 77, dx.get(), 11, 99, 0.f, out.get(), 9, 63,
           moa::MatmulPrecision::highest);
    b.synchronize(0);
  };
  step();
  step();
  const int64_t warm = b.device_malloc_count(0);
  for (int i = 0; i < 3; ++i) step();
  CHECK(b.device_malloc_count(0) == warm);
}
