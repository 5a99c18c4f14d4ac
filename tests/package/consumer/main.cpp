// A program built against an installed moa (find_package(moa COMPONENTS openmp), moa::openmp):
// checks that the package's usage requirements (C++20, OpenMP) reached this translation unit and
// that the installed headers are the version the package reports.
#include <moa/moa.hpp>

#include <omp.h>

#include <cstdio>
#include <string>
#include <vector>

static_assert(__cplusplus >= 202002L, "moa::moa must give its users C++20");
#ifndef _OPENMP
#error "moa::openmp must give its users OpenMP"
#endif

int main() {
  const std::string from_macros = std::to_string(MOA_VERSION_MAJOR) + "." +
                                  std::to_string(MOA_VERSION_MINOR) + "." +
                                  std::to_string(MOA_VERSION_PATCH);
  if (moa::version() != from_macros || moa::version() != MOA_CONSUMER_PACKAGE_VERSION) {
    std::fprintf(stderr, "version mismatch: moa::version() %s, macros %s, package %s\n",
                 std::string(moa::version()).c_str(), from_macros.c_str(),
                 MOA_CONSUMER_PACKAGE_VERSION);
    return 1;
  }

  // OpenMP works in this program: a parallel sum of 1..n.
  constexpr long n = 100000;
  long sum = 0;
#pragma omp parallel for reduction(+ : sum)
  for (long i = 1; i <= n; ++i) sum += i;
  if (sum != n * (n + 1) / 2) {
    std::fprintf(stderr, "OpenMP reduction gave %ld, expected %ld\n", sum, n * (n + 1) / 2);
    return 1;
  }

  // The library works from the installed headers: a product and its gradient.
  // d/dA sum(A B) = row sums of B, for every row of A.
  try {
    moa::Generator gen(1);
    const moa::Tensor a = moa::Tensor::randn({3, 4}, gen).set_requires_grad();
    const moa::Tensor b = moa::Tensor::from_vector(std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8}, {4, 2});
    moa::sum(moa::matmul(a, b)).backward();
    const std::vector<float> g = a.grad().to_vector<float>();
    for (int r = 0; r < 3; ++r)
      for (int k = 0; k < 4; ++k)
        if (g[r * 4 + k] != static_cast<float>(4 * k + 3)) {
          std::fprintf(stderr, "gradient %d,%d is %f, expected %d\n", r, k, g[r * 4 + k], 4 * k + 3);
          return 1;
        }
  } catch (const moa::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }

  std::printf("moa %s (package %s), OpenMP threads: %d\n", std::string(moa::version()).c_str(),
              MOA_CONSUMER_PACKAGE_VERSION, omp_get_max_threads());
  return 0;
}
