// Tests of the matrix product kernels: the fast CPU sgemm (native and portable microkernels),
// batched sgemm and gemm<T>, all checked against the reference kernel run in double precision.
#include <doctest/doctest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "moa/kernels/cpu/gemm.hpp"
#include "moa/kernels/reference/gemm.hpp"

namespace {

namespace cpu = moa::kernels::cpu;
namespace ref = moa::kernels::reference;

struct gemm_case {
  bool ta = false, tb = false;
  int64_t M = 1, N = 1, K = 1;
  float alpha = 1.0f, beta = 0.0f;
  int64_t pad_a = 0, pad_b = 0, pad_c = 0;  // extra elements per row beyond the minimum stride
};

template <class T>
using gemm_fn = std::function<void(bool, bool, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T,
                                   T*, int64_t)>;

// Operands of one case, in float and in double, with C's padding filled with a sentinel.
template <class T>
struct operands {
  int64_t lda, ldb, ldc;
  std::vector<T> A, B, C0;
};

constexpr float kSentinel = 12345.0f;

template <class T>
operands<T> make_operands(const gemm_case& c, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  operands<T> op;
  const int64_t a_rows = c.ta ? c.K : c.M, a_cols = c.ta ? c.M : c.K;
  const int64_t b_rows = c.tb ? c.N : c.K, b_cols = c.tb ? c.K : c.N;
  op.lda = a_cols + c.pad_a;
  op.ldb = b_cols + c.pad_b;
  op.ldc = c.N + c.pad_c;
  if (op.lda == 0) op.lda = 1;
  if (op.ldb == 0) op.ldb = 1;
  op.A.resize(static_cast<size_t>(a_rows * op.lda));
  op.B.resize(static_cast<size_t>(b_rows * op.ldb));
  op.C0.resize(static_cast<size_t>(c.M * op.ldc));
  for (auto& x : op.A) x = static_cast<T>(u(rng));
  for (auto& x : op.B) x = static_cast<T>(u(rng));
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = 0; j < op.ldc; ++j)
      op.C0[i * op.ldc + j] = j >= c.N ? static_cast<T>(kSentinel)
                              : c.beta == 0.0f ? std::numeric_limits<T>::quiet_NaN()
                                               : static_cast<T>(u(rng));
  return op;
}

// Runs `fn` on the case and compares with a double-precision reference: each element must be
// within eps * (K + 2) * (|alpha| * sum_k |a b| + |beta c|) of it; C's padding must be untouched.
template <class T>
void check_against_reference(const gemm_fn<T>& fn, const gemm_case& c, std::mt19937& rng, double eps) {
  CAPTURE(c.ta);
  CAPTURE(c.tb);
  CAPTURE(c.M);
  CAPTURE(c.N);
  CAPTURE(c.K);
  CAPTURE(c.alpha);
  CAPTURE(c.beta);
  CAPTURE(c.pad_a);
  CAPTURE(c.pad_b);
  CAPTURE(c.pad_c);
  const operands<T> op = make_operands<T>(c, rng);
  std::vector<T> C = op.C0;
  fn(c.ta, c.tb, c.M, c.N, c.K, static_cast<T>(c.alpha), op.A.data(), op.lda, op.B.data(), op.ldb,
     static_cast<T>(c.beta), C.data(), op.ldc);

  // Reference in double, and the magnitude sum that scales the tolerance.
  std::vector<double> Ad(op.A.begin(), op.A.end()), Bd(op.B.begin(), op.B.end()), Cd(op.C0.begin(), op.C0.end());
  std::vector<double> Aabs(Ad.size()), Babs(Bd.size()), mag(static_cast<size_t>(c.M * op.ldc), 0.0);
  for (size_t i = 0; i < Ad.size(); ++i) Aabs[i] = std::fabs(Ad[i]);
  for (size_t i = 0; i < Bd.size(); ++i) Babs[i] = std::fabs(Bd[i]);
  ref::gemm<double>(c.ta, c.tb, c.M, c.N, c.K, c.alpha, Ad.data(), op.lda, Bd.data(), op.ldb, c.beta, Cd.data(),
                    op.ldc);
  ref::gemm<double>(c.ta, c.tb, c.M, c.N, c.K, std::fabs(c.alpha), Aabs.data(), op.lda, Babs.data(), op.ldb, 0.0,
                    mag.data(), op.ldc);

  int64_t bad = 0;
  for (int64_t i = 0; i < c.M; ++i) {
    for (int64_t j = 0; j < op.ldc; ++j) {
      const size_t idx = static_cast<size_t>(i * op.ldc + j);
      const double got = static_cast<double>(C[idx]);
      if (j >= c.N) {
        if (C[idx] != static_cast<T>(kSentinel)) ++bad;
        continue;
      }
      const double c0 = c.beta == 0.0f ? 0.0 : std::fabs(static_cast<double>(op.C0[idx]) * c.beta);
      const double tol = eps * static_cast<double>(c.K + 2) * (mag[idx] + c0) + 1e-30;
      if (!std::isfinite(got) || std::fabs(got - Cd[idx]) > tol) {
        if (bad < 5) {
          CAPTURE(i);
          CAPTURE(j);
          CAPTURE(got);
          CAPTURE(Cd[idx]);
          CAPTURE(tol);
          CHECK(std::fabs(got - Cd[idx]) <= tol);
        }
        ++bad;
      }
    }
  }
  CHECK(bad == 0);
}

constexpr double kFloatEps = FLT_EPSILON;
constexpr double kDoubleEps = DBL_EPSILON;

const gemm_fn<float> kSgemm = [](bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cpu::sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
};
const gemm_fn<float> kGeneric = [](bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cpu::detail::sgemm_generic(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
};
const gemm_fn<float> kGemmFloat = [](bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                                     int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cpu::gemm<float>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
};
const gemm_fn<float> kRefFloat = [](bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                                    int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  ref::gemm<float>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
};
const gemm_fn<double> kGemmDouble = [](bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha,
                                       const double* A, int64_t lda, const double* B, int64_t ldb, double beta,
                                       double* C, int64_t ldc) {
  cpu::gemm<double>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
};

// Fixed shapes: degenerate, odd, around the register tiles (4x8, 6x16, 12x32) and past the
// cache blocks (KC = 256, MC = 128..192, NC = 2048..3072). M = 700 takes the threaded many-rows
// path (shared B panel, row jobs), M <= 576 the few-rows one (shared A, column jobs).
struct shape {
  int64_t M, N, K;
};
const shape kShapes[] = {
    {1, 1, 1},     {1, 7, 33},     {7, 1, 33},     {7, 33, 1},     {2, 300, 257},  {300, 2, 129},
    {3, 3, 3},     {6, 16, 64},    {12, 32, 256},  {13, 17, 257},  {33, 257, 7},   {257, 33, 65},
    {25, 49, 600}, {37, 1100, 33}, {150, 70, 300}, {200, 1100, 600}, {20, 3100, 40}, {700, 333, 290},
};

// All shapes x all four transposes, cycling through alpha, beta in {0, 1, 0.5} and strides.
template <class T>
void run_shape_sweep(const gemm_fn<T>& fn, double eps, bool big_shapes) {
  std::mt19937 rng(1234);
  const float betas[] = {0.0f, 1.0f, 0.5f};
  const float alphas[] = {1.0f, -0.75f, 2.5f};
  int n = 0;
  for (const shape& s : kShapes) {
    if (!big_shapes && s.M * s.N * s.K > 5'000'000) continue;
    for (int t = 0; t < 4; ++t, ++n) {
      gemm_case c;
      c.ta = (t & 1) != 0;
      c.tb = (t & 2) != 0;
      c.M = s.M;
      c.N = s.N;
      c.K = s.K;
      c.alpha = alphas[n % 3];
      c.beta = betas[(n / 3 + t) % 3];
      c.pad_a = (n % 2) ? 3 : 0;
      c.pad_b = (n % 3) ? 5 : 0;
      c.pad_c = (n % 4) ? 7 : 0;
      check_against_reference<T>(fn, c, rng, eps);
    }
  }
}

template <class T>
void run_random_cases(const gemm_fn<T>& fn, double eps, int count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> dim(1, 300), pad(0, 9), pick(0, 2);
  const float betas[] = {0.0f, 1.0f, 0.5f};
  for (int n = 0; n < count; ++n) {
    gemm_case c;
    c.ta = (rng() & 1) != 0;
    c.tb = (rng() & 1) != 0;
    c.M = dim(rng);
    c.N = dim(rng);
    c.K = dim(rng);
    c.alpha = (n % 2) ? 1.0f : 0.625f;
    c.beta = betas[pick(rng)];
    c.pad_a = pad(rng);
    c.pad_b = pad(rng);
    c.pad_c = pad(rng);
    check_against_reference<T>(fn, c, rng, eps);
  }
}

}  // namespace

TEST_CASE("reference gemm<float> agrees with the double reference") {
  run_shape_sweep<float>(kRefFloat, kFloatEps, false);
}

TEST_CASE("sgemm matches the reference on fixed shapes, all transposes") {
  run_shape_sweep<float>(kSgemm, kFloatEps, true);
}

TEST_CASE("sgemm matches the reference on random shapes") {
  run_random_cases<float>(kSgemm, kFloatEps, 60, 42);
}

TEST_CASE("portable sgemm_generic matches the reference") {
  run_shape_sweep<float>(kGeneric, kFloatEps, true);
  run_random_cases<float>(kGeneric, kFloatEps, 30, 7);
}

TEST_CASE("gemm<float> dispatches to sgemm") {
  run_random_cases<float>(kGemmFloat, kFloatEps, 10, 99);
}

TEST_CASE("gemm<double> matches the reference") {
  run_shape_sweep<double>(kGemmDouble, kDoubleEps, false);
  run_random_cases<double>(kGemmDouble, kDoubleEps, 10, 5);
}

TEST_CASE("sgemm with K == 0 scales C by beta") {
  for (const gemm_fn<float>* fn : {&kSgemm, &kGeneric, &kRefFloat}) {
    const int64_t M = 5, N = 9, ldc = 11;
    std::vector<float> C(M * ldc, std::numeric_limits<float>::quiet_NaN());
    const float a = 1.0f, b = 1.0f;
    (*fn)(false, false, M, N, 0, 1.0f, &a, 1, &b, N, 0.0f, C.data(), ldc);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) CHECK(C[i * ldc + j] == 0.0f);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = static_cast<float>(i + j);
    (*fn)(true, true, M, N, 0, 2.0f, &a, 1, &b, 1, 0.5f, C.data(), ldc);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) CHECK(C[i * ldc + j] == 0.5f * static_cast<float>(i + j));
    CHECK(std::isnan(C[N]));  // padding untouched
  }
}

TEST_CASE("sgemm with beta == 0 ignores NaN in C on every path") {
  std::mt19937 rng(3);
  for (const shape s : {shape{1, 1, 1}, shape{1, 500, 40}, shape{9, 9, 9}, shape{100, 130, 70}, shape{301, 299, 513}}) {
    for (int t = 0; t < 4; ++t) {
      gemm_case c;
      c.ta = (t & 1) != 0;
      c.tb = (t & 2) != 0;
      c.M = s.M;
      c.N = s.N;
      c.K = s.K;
      c.alpha = 1.5f;
      c.beta = 0.0f;  // make_operands fills C with NaN
      c.pad_c = 2;
      check_against_reference<float>(kSgemm, c, rng, kFloatEps);
      check_against_reference<float>(kGeneric, c, rng, kFloatEps);
    }
  }
}

TEST_CASE("sgemm_batched matches per-matrix reference products") {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  struct bcase {
    int64_t batch, M, N, K;
    bool ta, tb;
    float beta;
  };
  // Small products (parallel over the batch) and large ones (parallel inside each product).
  for (const bcase bc : {bcase{7, 5, 9, 13, false, false, 0.0f}, bcase{16, 33, 17, 64, true, false, 1.0f},
                         bcase{5, 64, 64, 64, false, true, 0.5f}, bcase{3, 257, 300, 129, true, true, 0.5f},
                         bcase{1, 40, 50, 60, false, false, 0.0f}, bcase{4, 1, 70, 30, false, true, 0.0f}}) {
    CAPTURE(bc.batch);
    CAPTURE(bc.M);
    CAPTURE(bc.N);
    CAPTURE(bc.K);
    const int64_t lda = (bc.ta ? bc.M : bc.K) + 2, ldb = (bc.tb ? bc.K : bc.N) + 1, ldc = bc.N + 3;
    const int64_t sa = (bc.ta ? bc.K : bc.M) * lda + 5, sb = (bc.tb ? bc.N : bc.K) * ldb + 3, sc = bc.M * ldc + 1;
    std::vector<float> A(static_cast<size_t>(bc.batch * sa)), B(static_cast<size_t>(bc.batch * sb));
    std::vector<float> C(static_cast<size_t>(bc.batch * sc));
    for (auto& x : A) x = u(rng);
    for (auto& x : B) x = u(rng);
    for (auto& x : C) x = bc.beta == 0.0f ? std::numeric_limits<float>::quiet_NaN() : u(rng);
    std::vector<float> expect = C;
    const float alpha = 0.75f;
    cpu::sgemm_batched(bc.ta, bc.tb, bc.batch, bc.M, bc.N, bc.K, alpha, A.data(), lda, sa, B.data(), ldb, sb, bc.beta,
                       C.data(), ldc, sc);
    for (int64_t b = 0; b < bc.batch; ++b) {
      std::vector<double> Ad(A.begin() + b * sa, A.begin() + (b + 1) * sa);
      std::vector<double> Bd(B.begin() + b * sb, B.begin() + (b + 1) * sb);
      std::vector<double> Cd(expect.begin() + b * sc, expect.begin() + (b + 1) * sc);
      ref::gemm<double>(bc.ta, bc.tb, bc.M, bc.N, bc.K, alpha, Ad.data(), lda, Bd.data(), ldb, bc.beta, Cd.data(), ldc);
      int64_t bad = 0;
      for (int64_t i = 0; i < bc.M; ++i)
        for (int64_t j = 0; j < bc.N; ++j) {
          const double got = C[static_cast<size_t>(b * sc + i * ldc + j)];
          if (!(std::fabs(got - Cd[static_cast<size_t>(i * ldc + j)]) <= 1e-5 * static_cast<double>(bc.K + 2))) ++bad;
        }
      CHECK(bad == 0);
      // The gap between matrices (last element of each C stride) is never written.
      if (bc.beta == 0.0f) CHECK(std::isnan(C[static_cast<size_t>(b * sc + sc - 1)]));
    }
  }
}

// The matrix-vector path (decoding: one row times a weight stored (N, K)) computes 4 columns per
// pass over the row; each column must still be exactly the one-column dot product.
TEST_CASE("sgemm, one row times B^T: each column bit-identical to the one-column dot product") {
  std::mt19937 rng(91);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const shape s : {shape{1, 4, 16}, shape{1, 7, 33}, shape{1, 203, 768}, shape{2, 37, 771}, shape{1, 1030, 5}}) {
    for (const bool ta : {false, true}) {
      const int64_t M = s.M, N = s.N, K = s.K, lda = ta ? M + 2 : K + 3, ldb = K + 1, ldc = N;
      std::vector<float> A(static_cast<size_t>((ta ? K : M) * lda)), B(static_cast<size_t>(N * ldb));
      for (auto& x : A) x = u(rng);
      for (auto& x : B) x = u(rng);
      std::vector<float> C(static_cast<size_t>(M * N), NAN);
      cpu::sgemm(ta, true, M, N, K, 1.0f, A.data(), lda, B.data(), ldb, 0.0f, C.data(), ldc);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          const float* a = ta ? A.data() + i : A.data() + i * lda;
          const float want = cpu::detail::dot_strided(a, ta ? lda : 1, B.data() + j * ldb, K);
          CAPTURE(i);
          CAPTURE(j);
          CHECK(std::memcmp(&C[static_cast<size_t>(i * ldc + j)], &want, sizeof(float)) == 0);
        }
      // and against the float64 reference, with beta (the 4-column and 1-column stores)
      gemm_case c;
      c.ta = ta;
      c.tb = true;
      c.M = M;
      c.N = N;
      c.K = K;
      c.alpha = -0.75f;
      c.beta = 0.5f;
      c.pad_b = 3;
      check_against_reference<float>(kSgemm, c, rng, kFloatEps);
    }
  }
}

#ifdef _OPENMP
// A matrix-vector product takes threads by the matrix's size, but no more than the direct path can
// split it into (64-column blocks for one or two rows, rows for one or two columns).
TEST_CASE("sgemm thread counts: matrix-vector products by size, capped by what the split can use") {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(16);
  CHECK(cpu::detail::sgemm_threads_for(1, 768, 3072) == 12);      // 36 by size, 12 column blocks
  CHECK(cpu::detail::sgemm_threads_for(1, 768, 768) == 9);        // 9 by size (2^16 elements each)
  CHECK(cpu::detail::sgemm_threads_for(1, 50257, 768) == 16);     // all
  CHECK(cpu::detail::sgemm_threads_for(2000, 1, 768) == 16);      // rows
  CHECK(cpu::detail::sgemm_threads_for(1, 100, 5000) == 1);       // one column block
  CHECK(cpu::detail::sgemm_threads_for(1, 768, 100) == 1);        // 76800 elements: one thread
  CHECK(cpu::detail::sgemm_threads_for(256, 768, 768) == 16);     // by flops
  CHECK(cpu::detail::sgemm_threads_for_flops(1, 768, 768) == 1);  // what the batched heads use
  omp_set_num_threads(saved);
}
#endif

TEST_CASE("sgemm is deterministic: repeated runs and different thread counts agree bitwise") {
  std::mt19937 rng(77);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const shape s :
       {shape{517, 391, 611}, shape{901, 700, 530}, shape{64, 3100, 300}, shape{2, 2000, 300}, shape{1, 3001, 769}}) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
      const int64_t M = s.M, N = s.N, K = s.K;
      const int64_t lda = ta ? M : K, ldb = tb ? K : N, ldc = N;
      std::vector<float> A(static_cast<size_t>(M * K)), B(static_cast<size_t>(K * N)), C0(static_cast<size_t>(M * N));
      for (auto& x : A) x = u(rng);
      for (auto& x : B) x = u(rng);
      for (auto& x : C0) x = u(rng);
      std::vector<float> C1 = C0, C2 = C0;
      cpu::sgemm(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 0.5f, C1.data(), ldc);
      cpu::sgemm(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 0.5f, C2.data(), ldc);
      CHECK(std::memcmp(C1.data(), C2.data(), C1.size() * sizeof(float)) == 0);
#ifdef _OPENMP
      const int saved = omp_get_max_threads();
      for (int threads : {1, 3}) {
        omp_set_num_threads(threads);
        std::vector<float> C3 = C0;
        cpu::sgemm(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 0.5f, C3.data(), ldc);
        CAPTURE(threads);
        CHECK(std::memcmp(C1.data(), C3.data(), C1.size() * sizeof(float)) == 0);
      }
      omp_set_num_threads(saved);
#endif
    }
  }
}
