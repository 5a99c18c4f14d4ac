// bench/head_memory.cpp: the memory and time of a language model's head and loss, forward and
// backward, at GPT-2's sizes (C = 768, V = 50257, the head frozen as in LoRA, x needing a gradient):
// linear() then cross_entropy() against linear_cross_entropy(). Each mode runs in its own process,
// so the peak resident memory (getrusage) is that mode's. The printed "extra" is the peak minus the
// resident memory once the inputs exist.
//
//   g++ -std=c++20 -O2 -march=native -fopenmp -Iinclude bench/head_memory.cpp -o /tmp/head_memory
//   for m in unfused fused; do OMP_NUM_THREADS=2 /tmp/head_memory $m 2048; done
//   OMP_NUM_THREADS=2 /tmp/head_memory fused 2048 166     # a device's default chunk (2^23 logits)
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>

#include "moa/moa.hpp"

namespace {

double resident_mb() {  // now
  std::ifstream f("/proc/self/statm");
  long pages = 0, resident = 0;
  f >> pages >> resident;
  return static_cast<double>(resident) * 4096.0 / (1024.0 * 1024.0);
}

double peak_mb() {  // so far
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

}  // namespace

int main(int argc, char** argv) {
  if ((argc != 3 && argc != 4) || (std::string(argv[1]) != "fused" && std::string(argv[1]) != "unfused")) {
    std::fprintf(stderr, "usage: %s fused|unfused TOKENS [CHUNK_ROWS]\n", argv[0]);
    return 2;
  }
  const bool fused = std::string(argv[1]) == "fused";
  const int64_t N = std::stoll(argv[2]), C = 768, V = 50257, chunk = argc == 4 ? std::stoll(argv[3]) : 0;
  moa::Generator gen(1);
  const moa::Tensor w = moa::Tensor::randn({V, C}, gen, moa::DType::f32, 0.0, 0.02);
  moa::Tensor x = moa::Tensor::randn({N, C}, gen).set_requires_grad();
  std::vector<int32_t> t(static_cast<std::size_t>(N));
  for (int64_t n = 0; n < N; ++n) t[static_cast<std::size_t>(n)] = static_cast<int32_t>((n * 7919) % V);
  const moa::Tensor targets = moa::Tensor::from_vector(t);
  const double before = resident_mb();
  const auto t0 = std::chrono::steady_clock::now();
  moa::Tensor loss = fused ? moa::linear_cross_entropy(x, w, targets, -100, chunk) : moa::cross_entropy(moa::linear(x, w), targets);
  loss.backward();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%-8s N=%lld loss %.6f |dx|^2 %.6f  time %.0f ms  extra peak memory %.0f MB (logits %.0f MB)\n",
              argv[1], static_cast<long long>(N), loss.item<double>(),
              moa::sum(x.grad() * x.grad()).item<double>(), ms, peak_mb() - before,
              static_cast<double>(N * V) * 4.0 / (1024.0 * 1024.0));
  return 0;
}
