// Benchmark of the float matrix product at transformer shapes: moa's sgemm against OpenBLAS's
// cblas_sgemm and Eigen, all with 2 threads, reporting GFLOP/s (2 * M * N * K per call).
//
// Names: gemm/<NN|NT>/M<m>xK<k>xN<n>/<moa|openblas|eigen>; NT means C = A * B^T with B stored
// N x K (x @ W^T in a linear layer). bench/gemm_table.py turns the JSON output into a table.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <new>
#include <random>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "moa/kernels/cpu/gemm.hpp"

#if defined(MOA_BENCH_HAVE_OPENBLAS)
extern "C" {
// The CBLAS prototype (row major = 101, no transpose = 111, transpose = 112), and OpenBLAS's
// thread control, declared here so the bench does not depend on which cblas.h is installed.
void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc);
void openblas_set_num_threads(int);
}
#endif

#if defined(MOA_BENCH_HAVE_EIGEN)
#include <Eigen/Core>
#endif

namespace {

constexpr int kThreads = 2;

// A 64-byte aligned float array filled with uniform values in [-1, 1].
struct buffer {
  explicit buffer(int64_t n, uint32_t seed) : size(n) {
    data = static_cast<float*>(::operator new(static_cast<size_t>(n) * sizeof(float), std::align_val_t(64)));
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int64_t i = 0; i < n; ++i) data[i] = u(rng);
  }
  ~buffer() { ::operator delete(data, std::align_val_t(64)); }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  int64_t size;
  float* data;
};

enum class impl { moa, openblas, eigen };

void run_gemm(benchmark::State& state, impl which, bool trans_b, int64_t M, int64_t K, int64_t N) {
  buffer A(M * K, 1), B(K * N, 2), C(M * N, 3);
  const int64_t lda = K, ldb = trans_b ? K : N, ldc = N;
  auto once = [&] {
    switch (which) {
      case impl::moa:
        moa::kernels::cpu::sgemm(false, trans_b, M, N, K, 1.0f, A.data, lda, B.data, ldb, 0.0f, C.data, ldc);
        break;
      case impl::openblas:
#if defined(MOA_BENCH_HAVE_OPENBLAS)
        cblas_sgemm(101, 111, trans_b ? 112 : 111, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                    1.0f, A.data, static_cast<int>(lda), B.data, static_cast<int>(ldb), 0.0f, C.data,
                    static_cast<int>(ldc));
#endif
        break;
      case impl::eigen:
#if defined(MOA_BENCH_HAVE_EIGEN)
      {
        using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        Eigen::Map<const RowMat> a(A.data, M, K);
        Eigen::Map<RowMat> c(C.data, M, N);
        if (trans_b) {
          Eigen::Map<const RowMat> b(B.data, N, K);
          c.noalias() = a * b.transpose();
        } else {
          Eigen::Map<const RowMat> b(B.data, K, N);
          c.noalias() = a * b;
        }
      }
#endif
        break;
    }
  };
  once();  // warm up: caches, thread pools, packing buffers
  for (auto _ : state) {
    once();
    benchmark::DoNotOptimize(C.data);
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(M) * static_cast<double>(N) *
                                                     static_cast<double>(K) * 1e-9 * static_cast<double>(state.iterations()),
                                                 benchmark::Counter::kIsRate);
}

void register_shape(bool trans_b, int64_t M, int64_t K, int64_t N) {
  struct entry {
    impl which;
    const char* name;
    bool available;
  };
  const entry impls[] = {
      {impl::moa, "moa", true},
#if defined(MOA_BENCH_HAVE_OPENBLAS)
      {impl::openblas, "openblas", true},
#else
      {impl::openblas, "openblas", false},
#endif
#if defined(MOA_BENCH_HAVE_EIGEN)
      {impl::eigen, "eigen", true},
#else
      {impl::eigen, "eigen", false},
#endif
  };
  for (const entry& e : impls) {
    if (!e.available) continue;
    const std::string name = std::string("gemm/") + (trans_b ? "NT" : "NN") + "/M" + std::to_string(M) + "xK" +
                             std::to_string(K) + "xN" + std::to_string(N) + "/" + e.name;
    const impl which = e.which;
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { run_gemm(st, which, trans_b, M, K, N); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
#ifdef _OPENMP
  omp_set_num_threads(kThreads);
#endif
#if defined(MOA_BENCH_HAVE_OPENBLAS)
  openblas_set_num_threads(kThreads);
#endif
#if defined(MOA_BENCH_HAVE_EIGEN)
  Eigen::setNbThreads(kThreads);
#endif
  const int64_t dims[] = {768, 2304, 3072};
  for (int64_t M : {256, 2048})
    for (int64_t K : dims)
      for (int64_t N : dims) register_shape(false, M, K, N);
  for (int64_t K : dims)
    for (int64_t N : dims) register_shape(true, 2048, K, N);
  for (int64_t S : {1024, 2048}) register_shape(false, S, S, S);

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
