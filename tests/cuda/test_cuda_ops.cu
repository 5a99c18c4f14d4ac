// The CUDA kernels (include/moa/kernels/cuda/) against the CPU reference kernels
// (include/moa/kernels/reference/), forward and backward, on random inputs including odd sizes.
//
// Error measure: normwise relative error, max_i |gpu_i - ref_i| / max_i |ref_i|, with the reference
// computed in double (or in float with double sums, as the reference kernels do). Bounds per dtype:
//   float32, elementwise ops (activations forward, clip scaling):            1e-6
//   float32, activation derivatives (float tanhf/expf, a few roundings):    2e-6
//   embedding forward (a copy): exact
//   float32, row reductions (softmax, cross-entropy, norms) of up to ~5e4:   1e-5
//   float32, products and attention with sums of up to a few hundred terms:  1e-5 .. 2e-5
//     (float32 sums in a different order: about sqrt(K) * 2^-24 relative, far below these)
//   float32 accumulated with atomics (dweight, dA, dB, embedding backward):  1e-5
//   bf16 inputs, float32 accumulation, against a reference on the same bf16-rounded inputs: 1e-5
//     (the inputs' own rounding, 2^-9 relative per element, is excluded by construction)
//   AdamW: bit-identical to the same float32 operations on the host (0 ulp).
//
// Without a CUDA device the binary prints why and exits 77, which CTest reports as skipped
// (SKIP_RETURN_CODE); CI on machines without a GPU excludes the label `cuda` anyway.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "grouped_lora_reference.hpp"
#include "moa/kernels/cuda/activation.cuh"
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
#include "moa/kernels/reference/activation.hpp"
#include "moa/kernels/reference/attention.hpp"
#include "moa/kernels/reference/cross_entropy.hpp"
#include "moa/kernels/reference/embedding.hpp"
#include "moa/kernels/reference/gemm.hpp"
#include "moa/kernels/reference/norm.hpp"
#include "moa/kernels/reference/softmax.hpp"

namespace kc = moa::kernels::cuda;
namespace ref = moa::kernels::reference;

namespace {

std::mt19937& rng() {
  static std::mt19937 g(12345);
  return g;
}

std::vector<float> randv(std::size_t n, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng());
  return v;
}

int64_t randi(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng()); }

template <class T>
kc::DeviceBuffer<T> up(const std::vector<T>& v) {
  kc::DeviceBuffer<T> b(std::max<std::size_t>(v.size(), 1));
  if (!v.empty()) b.copy_from_host(v.data(), v.size());
  return b;
}

template <class T>
std::vector<T> down(const kc::DeviceBuffer<T>& b, std::size_t n) {
  std::vector<T> v(n);
  if (n) b.copy_to_host(v.data(), n);
  return v;
}

template <class T>
double rel_err(const std::vector<float>& got, const std::vector<T>& want) {
  REQUIRE(got.size() == want.size());
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!std::isfinite(d)) return INFINITY;  // std::max would drop a NaN
    num = std::max(num, d);
    den = std::max(den, std::fabs(static_cast<double>(want[i])));
  }
  return den > 0 ? num / den : num;
}

#define CHECK_CLOSE(got, want, bound)                    \
  do {                                                   \
    const double e_ = rel_err(got, want);                \
    INFO(#got " vs " #want ": relative error ", e_);     \
    CHECK(e_ <= (bound));                                \
  } while (0)

void sync() { MOA_CUDA_CHECK(cudaDeviceSynchronize()); }

}  // namespace

TEST_CASE("check: failures become DeviceError with the call, the place and the code") {
  try {
    MOA_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL("no throw");
  } catch (const moa::DeviceError& e) {
    const std::string w = e.what();
    CHECK(w.find("[moa.device_error]") == 0);
    CHECK(w.find("cudaErrorInvalidValue") != std::string::npos);
    CHECK(w.find("test_cuda_ops.cu:") != std::string::npos);
    CHECK(w.find("error 1 ") != std::string::npos);
  }
  try {
    MOA_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE);
    FAIL("no throw");
  } catch (const moa::DeviceError& e) {
    CHECK(std::string(e.what()).find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
  }
  // A bad launch (too many threads per block) is caught by MOA_CUDA_LAUNCH_CHECK.
  MOA_CUDA_LAUNCH(kc::detail::f32_to_bf16_kernel, 1, 4096, 0, nullptr, nullptr, nullptr, 1);
  CHECK_THROWS_AS(MOA_CUDA_LAUNCH_CHECK(), moa::DeviceError);
}

TEST_CASE("allocator: size classes, reuse without cudaMalloc after warm-up, stats, empty_cache") {
  CHECK(kc::CachingAllocator::round_size(1) == 512);
  CHECK(kc::CachingAllocator::round_size(513) == 1024);
  CHECK(kc::CachingAllocator::round_size(1 << 20) == (1 << 20));
  CHECK(kc::CachingAllocator::round_size((1 << 20) + 1) == (1 << 20) + (1 << 18));
  CHECK(kc::CachingAllocator::round_size(3 << 20) == (3u << 20) + (0u << 20));
  kc::CachingAllocator a;
  const std::vector<std::size_t> step_sizes{100, 4096, 33 * 1000, 3 << 20, 7, 4096};
  for (int step = 0; step < 5; ++step) {
    std::vector<void*> ptrs;
    for (std::size_t s : step_sizes) ptrs.push_back(a.allocate(s));
    CHECK(a.stats().bytes_in_use >= std::accumulate(step_sizes.begin(), step_sizes.end(), std::size_t(0)));
    for (void* p : ptrs) a.release(p);
    CHECK(a.stats().bytes_in_use == 0);
    CHECK(a.stats().malloc_count == static_cast<int64_t>(step_sizes.size()));  // only the first step mallocs
  }
  CHECK(a.stats().bytes_cached > 0);
  CHECK_THROWS_AS(a.release(reinterpret_cast<void*>(0x1234)), moa::ValueError);
  a.empty_cache();
  CHECK(a.stats().bytes_cached == 0);
  CHECK(a.stats().free_count == static_cast<int64_t>(step_sizes.size()));
}

TEST_CASE("gemm_f32: every transpose combination, odd sizes, alpha and beta") {
  const std::vector<std::array<int64_t, 3>> shapes{{1, 1, 1}, {7, 33, 1}, {33, 7, 257}, {257, 33, 7}, {64, 129, 96}};
  for (auto [M, N, K] : shapes)
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const int64_t lda = ta ? M : K, ldb = tb ? K : N;
      std::vector<float> A = randv(M * K), B = randv(K * N), C = randv(M * N);
      const float alpha = 0.75f, beta = t == 3 ? 0.f : 0.5f;
      std::vector<double> Ad(A.begin(), A.end()), Bd(B.begin(), B.end()), Cd(C.begin(), C.end());
      ref::gemm<double>(ta, tb, M, N, K, alpha, Ad.data(), lda, Bd.data(), ldb, beta, Cd.data(), N);
      auto dA = up(A), dB = up(B), dC = up(C);
      kc::gemm_f32(ta, tb, M, N, K, alpha, dA.data(), lda, dB.data(), ldb, beta, dC.data(), N);
      INFO("M ", M, " N ", N, " K ", K, " ta ", ta, " tb ", tb);
      CHECK_CLOSE(down(dC, M * N), Cd, 1e-5);
    }
  CHECK_THROWS_AS(kc::gemm_f32(false, false, 2, 2, 3, 1.f, nullptr, 2, nullptr, 2, 0.f, nullptr, 2), moa::ShapeError);
}

TEST_CASE("gemm_bf16_f32: bf16 inputs, float32 accumulation") {
  const std::vector<std::array<int64_t, 3>> shapes{{1, 1, 1}, {7, 33, 257}, {257, 64, 33}, {128, 128, 128}};
  for (auto [M, N, K] : shapes)
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const int64_t lda = ta ? M : K, ldb = tb ? K : N;
      std::vector<float> A = randv(M * K), B = randv(K * N);
      auto dA = up(A), dB = up(B);
      kc::DeviceBuffer<__nv_bfloat16> hA(M * K), hB(K * N);
      kc::f32_to_bf16(hA.data(), dA.data(), M * K);
      kc::f32_to_bf16(hB.data(), dB.data(), K * N);
      // The reference takes the same bf16-rounded inputs.
      std::vector<__nv_bfloat16> rA = down(hA, M * K), rB = down(hB, K * N);
      std::vector<double> Ad(M * K), Bd(K * N), Cd(M * N, 0.0);
      for (int64_t i = 0; i < M * K; ++i) Ad[i] = __bfloat162float(rA[i]);
      for (int64_t i = 0; i < K * N; ++i) Bd[i] = __bfloat162float(rB[i]);
      ref::gemm<double>(ta, tb, M, N, K, 1.0, Ad.data(), lda, Bd.data(), ldb, 0.0, Cd.data(), N);
      kc::DeviceBuffer<float> dC(M * N);
      kc::gemm_bf16_f32(ta, tb, M, N, K, 1.f, hA.data(), lda, hB.data(), ldb, 0.f, dC.data(), N);
      INFO("M ", M, " N ", N, " K ", K, " ta ", ta, " tb ", tb);
      CHECK_CLOSE(down(dC, M * N), Cd, 1e-5);
      // And the rounding of the inputs themselves stays within bf16's precision.
      std::vector<double> Cf(M * N, 0.0), Af(A.begin(), A.end()), Bf(B.begin(), B.end());
      ref::gemm<double>(ta, tb, M, N, K, 1.0, Af.data(), lda, Bf.data(), ldb, 0.0, Cf.data(), N);
      CHECK_CLOSE(down(dC, M * N), Cf, 2e-2);
    }
}

namespace {

// The grouped LoRA product in double, assignment by assignment, from the definition.
struct LoraCase {
  int64_t N, In, Out, R, E;
  bool weighted, unique;
};

void run_grouped_lora(const LoraCase& c) {
  const moa_test::GroupedAssignments asg = moa_test::grouped_assignments(c.N, c.E, c.unique, randi);
  const std::vector<int32_t>& rows = asg.rows;
  const std::vector<int32_t>& seg = asg.seg;
  const int64_t M = static_cast<int64_t>(rows.size());
  const float scale = 0.625f;
  std::vector<float> x = randv(c.N * c.In), y0 = randv(c.N * c.Out), g = randv(c.N * c.Out),
                     dx0 = randv(c.N * c.In), w = c.weighted ? randv(M, 0.1f, 1.f) : std::vector<float>();
  std::vector<std::vector<float>> A(c.E), B(c.E), dA0(c.E), dB0(c.E);
  for (int64_t e = 0; e < c.E; ++e) {
    A[e] = randv(c.R * c.In);
    B[e] = randv(c.Out * c.R);
    dA0[e] = randv(c.R * c.In);
    dB0[e] = randv(c.Out * c.R);
  }
  // Reference.
  const moa_test::GroupedReference ref = moa_test::grouped_lora_reference(
      c.N, c.In, c.Out, c.R, c.E, asg, x, A, B, y0, g, dx0, dA0, dB0, c.weighted ? &w : nullptr, scale);
  const auto& [y, h, dx, dw, dA, dB] = ref;
  // Device.
  std::vector<kc::DeviceBuffer<float>> dAe, dBe, ddA, ddB;
  std::vector<const float*> pA, pB;
  std::vector<float*> pdA, pdB;
  for (int64_t e = 0; e < c.E; ++e) {
    dAe.push_back(up(A[e]));
    dBe.push_back(up(B[e]));
    ddA.push_back(up(dA0[e]));
    ddB.push_back(up(dB0[e]));
    pA.push_back(dAe.back().data());
    pB.push_back(dBe.back().data());
    pdA.push_back(ddA.back().data());
    pdB.push_back(ddB.back().data());
  }
  auto d_pA = up(pA), d_pB = up(pB);
  auto d_pdA = up(pdA), d_pdB = up(pdB);
  auto dxv = up(x), dy = up(y0), dg = up(g), ddx = up(dx0);
  auto drows = up(rows), dseg = up(seg);
  auto dwts = up(w);
  kc::DeviceBuffer<float> dh(std::max<int64_t>(M * c.R, 1)), ddh(std::max<int64_t>(M * c.R, 1)),
      ddw(std::max<int64_t>(M, 1));
  const kc::GroupedLoRAShape s{.N = c.N, .M = M, .E = c.E, .In = c.In, .Out = c.Out, .R = c.R};
  const float* wptr = c.weighted ? dwts.data() : nullptr;
  kc::grouped_lora_forward(dy.data(), dh.data(), dxv.data(), d_pA.data(), d_pB.data(), drows.data(), dseg.data(), wptr,
                           scale, s, c.unique);
  kc::grouped_lora_backward(ddx.data(), d_pdA.data(), d_pdB.data(), ddw.data(), ddh.data(), dg.data(), dxv.data(),
                            dh.data(), d_pA.data(), d_pB.data(), drows.data(), dseg.data(), wptr, scale, s, c.unique);
  sync();
  INFO("N ", c.N, " In ", c.In, " Out ", c.Out, " R ", c.R, " E ", c.E, " M ", M, " weighted ", c.weighted, " unique ",
       c.unique);
  CHECK_CLOSE(down(dy, c.N * c.Out), y, 1e-5);
  CHECK_CLOSE(down(dh, M * c.R), h, 1e-5);
  CHECK_CLOSE(down(ddx, c.N * c.In), dx, 1e-5);
  if (c.weighted) CHECK_CLOSE(down(ddw, M), dw, 1e-5);
  for (int64_t e = 0; e < c.E; ++e) {
    CHECK_CLOSE(down(ddA[e], c.R * c.In), dA[e], 1e-5);
    CHECK_CLOSE(down(ddB[e], c.Out * c.R), dB[e], 1e-5);
  }
}

}  // namespace

TEST_CASE("grouped_lora: one launch per stage for all experts equals the per-assignment definition") {
  const std::vector<LoraCase> cases{
      {1, 1, 1, 1, 1, false, true},      {7, 33, 7, 7, 3, false, true},    {33, 257, 65, 16, 4, true, true},
      {257, 64, 33, 8, 4, false, false}, {100, 96, 130, 33, 2, true, false}, {64, 48, 40, 64, 5, true, true},
      {513, 768, 768, 16, 4, false, true}};
  for (const LoraCase& c : cases) run_grouped_lora(c);
  CHECK_THROWS_AS(kc::grouped_lora_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1.f,
                                           kc::GroupedLoRAShape{.N = 1, .M = 1, .E = 1, .In = 1, .Out = 1, .R = 65}),
                  moa::ShapeError);
}

TEST_CASE("softmax and log-softmax: forward and backward") {
  const std::vector<std::array<int64_t, 2>> shapes{{1, 1}, {7, 33}, {3, 257}, {33, 1000}, {2, 50257}};
  for (auto [N, C] : shapes) {
    std::vector<float> x = randv(N * C, -4.f, 4.f), g = randv(N * C), y(N * C), dx(N * C);
    auto dxv = up(x), dg = up(g);
    kc::DeviceBuffer<float> dy(N * C), ddx(N * C);
    INFO("N ", N, " C ", C);
    ref::softmax_forward<float>(y.data(), x.data(), N, C);
    kc::softmax_forward(dy.data(), dxv.data(), N, C);
    CHECK_CLOSE(down(dy, N * C), y, 1e-5);
    ref::softmax_backward<float>(dx.data(), g.data(), y.data(), N, C);
    kc::softmax_backward(ddx.data(), dg.data(), dy.data(), N, C);
    CHECK_CLOSE(down(ddx, N * C), dx, 1e-5);
    ref::log_softmax_forward<float>(y.data(), x.data(), N, C);
    kc::log_softmax_forward(dy.data(), dxv.data(), N, C);
    CHECK_CLOSE(down(dy, N * C), y, 1e-5);
    ref::log_softmax_backward<float>(dx.data(), g.data(), y.data(), N, C);
    kc::log_softmax_backward(ddx.data(), dg.data(), dy.data(), N, C);
    CHECK_CLOSE(down(ddx, N * C), dx, 1e-5);
  }
}

TEST_CASE("softmax's one-pass log-sum-exp: growing maxima, masked entries, large values, NaN and all-masked rows") {
  const int64_t C = 1000;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<std::vector<float>> rows;
  std::vector<float> r(C);
  for (int64_t c = 0; c < C; ++c) r[c] = 0.01f * float(c);  // the maximum grows at every step of every thread
  rows.push_back(r);
  for (int64_t c = 0; c < C; ++c) r[c] = c % 3 ? -inf : float(c % 11);  // masked (-inf) entries, some threads all
  rows.push_back(r);
  for (int64_t c = 0; c < C; ++c) r[c] = 80.f + 0.1f * float((c * 37) % 101);  // exp(x) overflows float
  rows.push_back(r);
  std::fill(r.begin(), r.end(), -inf);
  r[C - 1] = -3.f;  // one finite value, in the last thread's range
  rows.push_back(r);
  const int64_t finite_rows = static_cast<int64_t>(rows.size());
  std::fill(r.begin(), r.end(), -inf);  // all masked: NaN, as the reference (exp(-inf - -inf))
  rows.push_back(r);
  std::mt19937 gen(7);  // its own generator: the other tests' random inputs stay as they were
  std::uniform_real_distribution<float> u(-4.f, 4.f);
  for (float& v : r) v = u(gen);
  r[C / 2] = std::numeric_limits<float>::quiet_NaN();
  rows.push_back(r);
  const int64_t N = static_cast<int64_t>(rows.size());
  std::vector<float> x;
  for (const auto& row : rows) x.insert(x.end(), row.begin(), row.end());
  std::vector<float> y(N * C);
  ref::log_softmax_forward<float>(y.data(), x.data(), N, C);
  auto dx = up(x);
  kc::DeviceBuffer<float> dy(N * C);
  kc::log_softmax_forward(dy.data(), dx.data(), N, C);
  const std::vector<float> got = down(dy, N * C);
  for (int64_t n = 0; n < N; ++n) {
    INFO("row ", n);
    for (int64_t c = 0; c < C; ++c) {
      const float w = y[n * C + c], g = got[n * C + c];
      if (n >= finite_rows) {
        CHECK(std::isnan(g));
        if (!std::isnan(g)) break;
      } else if (std::isinf(w)) {
        CHECK(g == w);  // a masked entry: -inf
      } else if (!(std::fabs(g - w) <= 1e-5f * std::max(1.f, std::fabs(w)))) {  // NaN fails too
        CHECK(g == doctest::Approx(w).epsilon(1e-5));
        break;
      }
    }
  }
}

TEST_CASE("cross_entropy: forward (mean over kept rows) and backward, ignore_index -100") {
  const std::vector<std::array<int64_t, 2>> shapes{{1, 1}, {7, 33}, {33, 257}, {5, 50257}, {4, 7}};
  for (std::size_t k = 0; k < shapes.size(); ++k) {
    const auto [N, V] = shapes[k];
    std::vector<float> x = randv(N * V, -6.f, 6.f), lse(N), dl(N * V);
    std::vector<int32_t> t(N);
    for (int64_t n = 0; n < N; ++n) t[n] = n % 3 == 1 ? -100 : static_cast<int32_t>(randi(0, V - 1));
    if (k == shapes.size() - 1) std::fill(t.begin(), t.end(), -100);  // every row ignored: loss 0, grads 0
    INFO("N ", N, " V ", V);
    const float loss = ref::cross_entropy_forward<float>(lse.data(), x.data(), t.data(), N, V, -100);
    auto dxv = up(x), dloss = up(std::vector<float>{1.5f});
    auto dt = up(t);
    kc::DeviceBuffer<float> dlse(N), dL(1), ddl(N * V), scratch(1);
    kc::cross_entropy_forward(dL.data(), dlse.data(), dxv.data(), dt.data(), N, V);
    CHECK_CLOSE(down(dL, 1), std::vector<float>{loss}, 1e-5);
    CHECK_CLOSE(down(dlse, N), lse, 1e-5);
    ref::cross_entropy_backward<float>(dl.data(), 1.5f, x.data(), lse.data(), t.data(), N, V, -100);
    kc::cross_entropy_backward(ddl.data(), dloss.data(), dxv.data(), dlse.data(), dt.data(), N, V, scratch.data());
    CHECK_CLOSE(down(ddl, N * V), dl, 1e-5);
    // cross_entropy_rows (linear_cross_entropy's chunks): each row's loss times a scale and, written
    // in place over the logits, its gradient; then without the gradient (the logits untouched).
    const float sc = 0.25f;
    std::vector<float> want_rows(N), want_d(N * V);
    for (int64_t n = 0; n < N; ++n) {
      want_rows[n] = t[n] == -100 ? 0.f : sc * (lse[n] - x[n * V + t[n]]);
      ref::cross_entropy_backward<float>(want_d.data() + n * V, sc, x.data() + n * V, lse.data() + n, t.data() + n, 1,
                                         V, -100);
    }
    auto inplace = up(x), kept = up(x);
    kc::DeviceBuffer<float> rows1(N), rows2(N);
    kc::cross_entropy_rows(rows1.data(), inplace.data(), inplace.data(), dt.data(), N, V, -100, sc);
    CHECK_CLOSE(down(rows1, N), want_rows, 1e-5);
    CHECK_CLOSE(down(inplace, N * V), want_d, 1e-5);
    kc::cross_entropy_rows(rows2.data(), nullptr, kept.data(), dt.data(), N, V, -100, sc);
    CHECK_CLOSE(down(rows2, N), want_rows, 1e-5);
    CHECK(down(kept, N * V) == x);
  }
}

TEST_CASE("layer_norm and rms_norm: forward, backward, weight gradients accumulate") {
  // Not C = 1 or 2: there dx is what is left of a cancellation, of the size of eps, in float32 noise
  // for any kernel: rms_norm at C = 1, dx = r g w (1 - x^2 / (x^2 + eps)); layer_norm at C = 2,
  // where x-hat = (a, -a) with a^2 = var / (var + eps), dx = r (g0 - g1) w (1 - a^2) / 2 (found by the
  // CPU emulator: 1e-2 relative error against the reference, both right to float32).
  const std::vector<std::array<int64_t, 2>> shapes{{1, 3}, {7, 33}, {257, 7}, {33, 768}, {5, 4097}};
  for (auto [N, C] : shapes)
    for (int with_bias = 0; with_bias < 2; ++with_bias) {
      INFO("N ", N, " C ", C, " bias ", with_bias);
      std::vector<float> x = randv(N * C, -2.f, 3.f), wt = randv(C, 0.5f, 1.5f), b = randv(C), g = randv(N * C);
      std::vector<float> y(N * C), mean(N), rstd(N), dx(N * C), dw = randv(C), db = randv(C);
      auto dxv = up(x), dwt = up(wt), dbias = up(b), dg = up(g), ddw = up(dw), ddb = up(db);
      kc::DeviceBuffer<float> dy(N * C), dmean(N), drstd(N), ddx(N * C);
      ref::layer_norm_forward<float>(y.data(), mean.data(), rstd.data(), x.data(), wt.data(),
                                     with_bias ? b.data() : nullptr, N, C, 1e-5f);
      kc::layer_norm_forward(dy.data(), dmean.data(), drstd.data(), dxv.data(), dwt.data(),
                             with_bias ? dbias.data() : nullptr, N, C, 1e-5f);
      CHECK_CLOSE(down(dy, N * C), y, 1e-5);
      CHECK_CLOSE(down(dmean, N), mean, 1e-5);
      CHECK_CLOSE(down(drstd, N), rstd, 1e-5);
      ref::layer_norm_backward<float>(dx.data(), dw.data(), with_bias ? db.data() : nullptr, g.data(), x.data(),
                                      wt.data(), mean.data(), rstd.data(), N, C);
      kc::layer_norm_backward(ddx.data(), ddw.data(), with_bias ? ddb.data() : nullptr, dg.data(), dxv.data(),
                              dwt.data(), dmean.data(), drstd.data(), N, C);
      CHECK_CLOSE(down(ddx, N * C), dx, 1e-5);
      CHECK_CLOSE(down(ddw, C), dw, 1e-5);
      CHECK_CLOSE(down(ddb, C), db, 1e-5);

      ref::rms_norm_forward<float>(y.data(), rstd.data(), x.data(), wt.data(), N, C, 1e-6f);
      kc::rms_norm_forward(dy.data(), drstd.data(), dxv.data(), dwt.data(), N, C, 1e-6f);
      CHECK_CLOSE(down(dy, N * C), y, 1e-5);
      CHECK_CLOSE(down(drstd, N), rstd, 1e-5);
      ref::rms_norm_backward<float>(dx.data(), with_bias ? dw.data() : nullptr, g.data(), x.data(), wt.data(),
                                    rstd.data(), N, C);
      kc::rms_norm_backward(ddx.data(), with_bias ? ddw.data() : nullptr, dg.data(), dxv.data(), dwt.data(),
                            drstd.data(), N, C);
      CHECK_CLOSE(down(ddx, N * C), dx, 1e-5);
      CHECK_CLOSE(down(ddw, C), dw, 1e-5);
    }
}

TEST_CASE("activations: GELU (tanh) and SiLU, forward and backward") {
  for (int64_t n : {1, 7, 33, 257, 100003}) {
    std::vector<float> x = randv(n, -6.f, 6.f), g = randv(n);
    auto dxv = up(x), dg = up(g);
    kc::DeviceBuffer<float> dy(n), ddx(n);
    for (kc::Activation a : {kc::Activation::gelu, kc::Activation::silu}) {
      INFO("n ", n, " act ", static_cast<int>(a));
      std::vector<double> y(n), dx(n);
      for (int64_t i = 0; i < n; ++i) {
        const double xi = x[i];
        y[i] = a == kc::Activation::gelu ? ref::gelu(xi) : ref::silu(xi);
        dx[i] = g[i] * (a == kc::Activation::gelu ? ref::gelu_grad(xi) : ref::silu_grad(xi));
      }
      kc::activation_forward(a, dy.data(), dxv.data(), n);
      kc::activation_backward(a, ddx.data(), dg.data(), dxv.data(), n);
      // Errors relative to the largest output, at least 1: a single input near -6 has an output of about
      // -1e-8, which float rounds to 0 (an absolute error far below the bounds).
      y.push_back(1.0);
      dx.push_back(1.0);
      std::vector<float> gy = down(dy, n), gdx = down(ddx, n);
      gy.push_back(1.f);
      gdx.push_back(1.f);
      CHECK_CLOSE(gy, y, 1e-6);
      CHECK_CLOSE(gdx, dx, 5e-6);  // gelu' amplifies tanhf's error (2 ulp) up to ~14x near |x| = 6
    }
  }
}

TEST_CASE("embedding: gather forward, scatter-add backward with repeated ids") {
  for (auto [N, V, C] : std::vector<std::array<int64_t, 3>>{{1, 1, 1}, {7, 3, 33}, {257, 50, 768}, {33, 1000, 7}}) {
    INFO("N ", N, " V ", V, " C ", C);
    std::vector<int32_t> ids(N);
    for (auto& i : ids) i = static_cast<int32_t>(randi(0, V - 1));
    std::vector<float> w = randv(V * C), g = randv(N * C), out(N * C), dw = randv(V * C);
    auto dids = up(ids);
    auto dwt = up(w), dg = up(g), ddw = up(dw);
    kc::DeviceBuffer<float> dout(N * C);
    ref::embedding_forward<float>(out.data(), ids.data(), w.data(), N, C);
    kc::embedding_forward(dout.data(), dids.data(), dwt.data(), N, C);
    CHECK(down(dout, N * C) == out);  // a copy: exact
    std::vector<double> dwd(dw.begin(), dw.end());
    std::vector<double> gd(g.begin(), g.end());
    ref::embedding_backward<double>(dwd.data(), gd.data(), ids.data(), N, C);
    kc::embedding_backward(ddw.data(), dg.data(), dids.data(), N, C);
    CHECK_CLOSE(down(ddw, V * C), dwd, 1e-5);
  }
}

TEST_CASE("adamw: bit-identical to the float32 update of moa::optim::AdamW; grad norm and clipping") {
  const double lr = 3e-4, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  for (int64_t n : {1, 7, 257, 65537}) {
    std::vector<float> w = randv(n), m(n, 0.f), v(n, 0.f);
    auto dw = up(w), dm = up(m), dv = up(v);
    for (int64_t step = 1; step <= 3; ++step) {
      std::vector<float> g = randv(n);
      auto dg = up(g);
      const kc::AdamWScalars s = kc::AdamWScalars::make(lr, b1, b2, eps, wd, step);
      // The loop of moa::optim::AdamW::step with T = float, the same scalars.
      {
        const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step));
        const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step));
        const float fb1 = static_cast<float>(b1), fb2 = static_cast<float>(b2);
        const float decay = static_cast<float>(1.0 - lr * wd), step_size = static_cast<float>(lr / bc1);
        const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2)), feps = static_cast<float>(eps);
        CHECK(decay == s.decay);
        CHECK(step_size == s.step_size);
        CHECK(inv_sqrt_bc2 == s.inv_sqrt_bc2);
        // volatile: no FMA contraction on hosts that have it (the kernel does not fuse either)
        auto mul = [](float a, float b) { volatile float r = a * b; return static_cast<float>(r); };
        auto add = [](float a, float b) { volatile float r = a + b; return static_cast<float>(r); };
        for (int64_t k = 0; k < n; ++k) {
          w[k] = mul(w[k], decay);
          m[k] = add(mul(fb1, m[k]), mul(1.f - fb1, g[k]));
          v[k] = add(mul(fb2, v[k]), mul(mul(1.f - fb2, g[k]), g[k]));
          w[k] -= mul(step_size, m[k]) / add(mul(std::sqrt(v[k]), inv_sqrt_bc2), feps);
        }
      }
      kc::adamw_step(dw.data(), dm.data(), dv.data(), dg.data(), n, s);
      INFO("n ", n, " step ", step);
      const std::vector<float> gw = down(dw, n), gm = down(dm, n), gv = down(dv, n);
      CHECK(std::memcmp(gw.data(), w.data(), n * sizeof(float)) == 0);
      CHECK(std::memcmp(gm.data(), m.data(), n * sizeof(float)) == 0);
      CHECK(std::memcmp(gv.data(), v.data(), n * sizeof(float)) == 0);
    }
  }
  // Global norm over several buffers, then clipping (moa::optim::clip_grad_norm's rule).
  std::vector<std::vector<float>> grads{randv(1), randv(33), randv(70001, -3.f, 3.f)};
  std::vector<kc::DeviceBuffer<float>> dgrads;
  double total = 0.0;
  for (const auto& g : grads) {
    dgrads.push_back(up(g));
    for (float x : g) total += static_cast<double>(x) * x;
  }
  kc::DeviceBuffer<double> acc(1);
  for (double max_norm : {1e9, 1.0}) {
    MOA_CUDA_CHECK(cudaMemset(acc.data(), 0, sizeof(double)));
    for (std::size_t i = 0; i < grads.size(); ++i)
      kc::grad_norm_sq_accumulate(acc.data(), dgrads[i].data(), static_cast<int64_t>(grads[i].size()));
    const double got = std::sqrt(down(acc, 1)[0]), norm = std::sqrt(total);
    CHECK(std::fabs(got - norm) <= 1e-12 * norm);
    for (std::size_t i = 0; i < grads.size(); ++i)
      kc::clip_grad_scale(dgrads[i].data(), static_cast<int64_t>(grads[i].size()), acc.data(), max_norm);
    const double coef = max_norm / (norm + 1e-6);
    for (std::size_t i = 0; i < grads.size(); ++i) {
      std::vector<double> want(grads[i].begin(), grads[i].end());
      if (coef < 1.0)
        for (std::size_t k = 0; k < want.size(); ++k) {
          grads[i][k] *= static_cast<float>(coef);
          want[k] = grads[i][k];
        }
      CHECK_CLOSE(down(dgrads[i], grads[i].size()), want, 1e-6);
    }
    total = 0.0;
    for (const auto& g : grads)
      for (float x : g) total += static_cast<double>(x) * x;
  }
}

namespace {

// Random q, k, v (B, H, T, D), an upstream gradient g, and the reference forward and backward.
struct AttentionCase {
  int64_t nq, nk, nl;
  float scale;
  std::vector<float> q, k, v, g, out, lse, dq, dk, dv;
};

AttentionCase attention_case(const kc::AttentionShape& s) {
  AttentionCase c;
  c.nq = s.B * s.Hq * s.Tq * s.D;
  c.nk = s.B * s.Hkv * s.Tk * s.D;
  c.nl = s.B * s.Hq * s.Tq;
  c.scale = 1.f / std::sqrt(static_cast<float>(s.D));
  c.q = randv(c.nq, -2.f, 2.f);
  c.k = randv(c.nk, -2.f, 2.f);
  c.v = randv(c.nk);
  c.g = randv(c.nq);
  c.out.resize(c.nq);
  c.lse.resize(c.nl);
  c.dq.resize(c.nq);
  c.dk.resize(c.nk);
  c.dv.resize(c.nk);
  ref::attention_forward<float>(c.out.data(), c.lse.data(), c.q.data(), c.k.data(), c.v.data(), s.B, s.Hq, s.Hkv,
                                s.Tq, s.Tk, s.D, c.scale);
  ref::attention_backward<float>(c.dq.data(), c.dk.data(), c.dv.data(), c.g.data(), c.q.data(), c.k.data(),
                                 c.v.data(), c.out.data(), c.lse.data(), s.B, s.Hq, s.Hkv, s.Tq, s.Tk, s.D, c.scale);
  return c;
}

}  // namespace

TEST_CASE("attention: causal forward and backward, multi-head, grouped-query, a KV cache, odd sizes") {
  const std::vector<kc::AttentionShape> shapes{
      {1, 1, 1, 1, 1, 1},   {2, 4, 2, 7, 7, 33},  {1, 2, 1, 5, 9, 64},  {1, 3, 3, 33, 33, 128},
      {1, 2, 2, 257, 257, 64}, {1, 1, 1, 7, 7, 256}, {2, 6, 2, 1, 17, 96}};
  for (const kc::AttentionShape& s : shapes) {
    INFO("B ", s.B, " Hq ", s.Hq, " Hkv ", s.Hkv, " Tq ", s.Tq, " Tk ", s.Tk, " D ", s.D);
    const AttentionCase c = attention_case(s);
    const int64_t nq = c.nq, nk = c.nk, nl = c.nl;
    const float scale = c.scale;
    const auto &out = c.out, &lse = c.lse, &dq = c.dq, &dk = c.dk, &dv = c.dv;
    auto dqv = up(c.q), dkv = up(c.k), dvv = up(c.v), dg = up(c.g);
    kc::DeviceBuffer<float> dout(nq), dlse(nl), ddq(nq), ddk(nk), ddv(nk), delta(nl);
    kc::attention_forward(dout.data(), dlse.data(), dqv.data(), dkv.data(), dvv.data(), s, scale);
    kc::attention_backward(ddq.data(), ddk.data(), ddv.data(), delta.data(), dg.data(), dqv.data(), dkv.data(),
                           dvv.data(), dout.data(), dlse.data(), s, scale);
    CHECK_CLOSE(down(dout, nq), out, 2e-5);
    CHECK_CLOSE(down(dlse, nl), lse, 1e-5);
    CHECK_CLOSE(down(ddq, nq), dq, 2e-5);
    CHECK_CLOSE(down(ddk, nk), dk, 2e-5);
    CHECK_CLOSE(down(ddv, nk), dv, 2e-5);
  }
}

// The tensor-core kernels (flash_attention.cuh; the same source runs on the CPU emulator in
// tests/unit/test_flash_attention_emulated.cpp). bf16 products and bf16 P, dS: bound 2e-2 of the
// largest reference value per tensor (measured on the emulator: 1e-3 .. 1.1e-2).
TEST_CASE("flash attention (tensor cores, bf16 products): forward and backward against the reference") {
  const std::vector<kc::AttentionShape> shapes{{1, 2, 1, 70, 70, 16},   {1, 2, 2, 20, 100, 40},
                                               {2, 4, 2, 300, 300, 64}, {2, 1, 1, 17, 17, 7},
                                               {1, 3, 3, 129, 129, 128}, {1, 1, 1, 99, 100, 32},
                                               {1, 2, 1, 64, 200, 80}};
  for (const kc::AttentionShape& s : shapes) {
    INFO("B ", s.B, " Hq ", s.Hq, " Hkv ", s.Hkv, " Tq ", s.Tq, " Tk ", s.Tk, " D ", s.D);
    CHECK(kc::flash_attention_supported(s));
    const AttentionCase c = attention_case(s);
    const int64_t nq = c.nq, nk = c.nk, nl = c.nl;
    const float scale = c.scale;
    const auto &out = c.out, &lse = c.lse, &dq = c.dq, &dk = c.dk, &dv = c.dv;
    auto dqv = up(c.q), dkv = up(c.k), dvv = up(c.v), dg = up(c.g);
    kc::DeviceBuffer<float> dout(nq), dlse(nl), ddq(nq), ddk(nk), ddv(nk), delta(nl);
    kc::flash_attention_forward(dout.data(), dlse.data(), dqv.data(), dkv.data(), dvv.data(), s, scale);
    kc::attention_delta(delta.data(), dg.data(), dout.data(), s);
    kc::flash_attention_backward(ddq.data(), ddk.data(), ddv.data(), delta.data(), dg.data(), dqv.data(), dkv.data(),
                                 dvv.data(), dlse.data(), s, scale);
    CHECK_CLOSE(down(dout, nq), out, 2e-2);
    CHECK_CLOSE(down(ddq, nq), dq, 2e-2);
    CHECK_CLOSE(down(ddk, nk), dk, 2e-2);
    CHECK_CLOSE(down(ddv, nk), dv, 2e-2);
    double lse_err = 0;
    const std::vector<float> got_lse = down(dlse, nl);
    for (int64_t i = 0; i < nl; ++i) lse_err = std::max(lse_err, std::fabs(double(got_lse[i]) - lse[i]));
    CHECK(lse_err < 2e-2);
  }
  CHECK_FALSE(kc::flash_attention_supported({1, 1, 1, 1, 9, 64}));     // decoding stays on the row kernels
  CHECK_FALSE(kc::flash_attention_supported({1, 1, 1, 64, 64, 256}));  // heads over 128 too
  CHECK_THROWS_AS(kc::flash_attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, {1, 1, 1, 64, 64, 256}, 1.f),
                  moa::ShapeError);
}

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("moa_cuda_tests: no CUDA device (%s); skipped\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "device count 0");
    return 77;  // CTest SKIP_RETURN_CODE
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
