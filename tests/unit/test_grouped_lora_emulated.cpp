// The segmented LoRA kernels (moa/kernels/cuda/grouped_lora.cuh: shrink and expand with several
// assignments per warp, the weight-gradient outer products, the gate gradient), launchers and all,
// run on the CPU by tests/unit/cuda_emulator.hpp and compared with the per-assignment definition
// in double (tests/cuda/grouped_lora_reference.hpp, which the GPU tests use too). Covered: every
// rank class (8, 16, 32, 64 accumulators: 8, 4, 2, 1 assignments per warp), warps whose assignments
// cross from one expert to the next, experts without rows, rows without assignments, top-2
// assignments (atomic adds), gate weights. Bound 1e-5 of the largest reference value (float32
// sums of at most a few hundred terms), as on the GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda_emulator.hpp"
#define MOA_CUDA_EMULATE
#include "../cuda/grouped_lora_reference.hpp"
#include "moa/kernels/cuda/grouped_lora.cuh"

namespace {

namespace kc = moa::kernels::cuda;

std::mt19937& rng() {
  static std::mt19937 g(5);
  return g;
}
std::vector<float> randv(std::size_t n, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng());
  return v;
}
int64_t randi(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng()); }

double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::abs(double(got[i]) - want[i]);
    if (!std::isfinite(d)) return INFINITY;
    num = std::max(num, d);
    den = std::max(den, std::abs(want[i]));
  }
  return den > 0 ? num / den : num;
}

struct Case {
  int64_t N, In, Out, R, E;
  bool weighted, unique;
  bool write = false;      // GroupedLoRAShape::write_grads: dx, dA, dB start as NaN and are written
  bool every_row = false;  // one assignment per row (M == N: dx stored directly when written)
  bool add_dx = false;     // GroupedLoRAShape::add_dx: with write, dx keeps what it holds and is added onto
};

void run(const Case& c) {
  CAPTURE(c.N);
  CAPTURE(c.In);
  CAPTURE(c.Out);
  CAPTURE(c.R);
  CAPTURE(c.E);
  CAPTURE(c.weighted);
  CAPTURE(c.unique);
  CAPTURE(c.write);
  CAPTURE(c.every_row);
  CAPTURE(c.add_dx);
  const moa_test::GroupedAssignments a = moa_test::grouped_assignments(c.N, c.E, c.unique, randi, c.every_row);
  const auto M = static_cast<int64_t>(a.rows.size());
  const float scale = 0.625f;
  std::vector<float> x = randv(c.N * c.In), y = randv(c.N * c.Out), g = randv(c.N * c.Out), dx = randv(c.N * c.In),
                     w = c.weighted ? randv(M, 0.1f, 1.f) : std::vector<float>();
  std::vector<std::vector<float>> A(c.E), B(c.E), dA(c.E), dB(c.E);
  std::vector<const float*> pA, pB;
  std::vector<float*> pdA, pdB;
  for (int64_t e = 0; e < c.E; ++e) {
    A[e] = randv(c.R * c.In);
    B[e] = randv(c.Out * c.R);
    dA[e] = randv(c.R * c.In);
    dB[e] = randv(c.Out * c.R);
  }
  if (c.write) {  // the reference adds onto zeros; the kernels must overwrite what is there
    if (!c.add_dx) std::fill(dx.begin(), dx.end(), 0.f);
    for (int64_t e = 0; e < c.E; ++e) {
      std::fill(dA[e].begin(), dA[e].end(), 0.f);
      std::fill(dB[e].begin(), dB[e].end(), 0.f);
    }
  }
  const moa_test::GroupedReference ref = moa_test::grouped_lora_reference(
      c.N, c.In, c.Out, c.R, c.E, a, x, A, B, y, g, dx, dA, dB, c.weighted ? &w : nullptr, scale);
  if (c.write) {
    if (!c.add_dx) std::fill(dx.begin(), dx.end(), NAN);
    for (int64_t e = 0; e < c.E; ++e) {
      std::fill(dA[e].begin(), dA[e].end(), NAN);
      std::fill(dB[e].begin(), dB[e].end(), NAN);
    }
  }
  for (int64_t e = 0; e < c.E; ++e) {
    pA.push_back(A[e].data());
    pB.push_back(B[e].data());
    pdA.push_back(dA[e].data());
    pdB.push_back(dB[e].data());
  }
  std::vector<float> h(static_cast<std::size_t>(std::max<int64_t>(M * c.R, 1)), NAN), dh(h.size(), NAN),
      dw(static_cast<std::size_t>(std::max<int64_t>(M, 1)), NAN);
  const kc::GroupedLoRAShape s{
      .N = c.N, .M = M, .E = c.E, .In = c.In, .Out = c.Out, .R = c.R, .write_grads = c.write, .add_dx = c.add_dx};
  const float* wp = c.weighted ? w.data() : nullptr;
  kc::grouped_lora_forward(y.data(), h.data(), x.data(), pA.data(), pB.data(), a.rows.data(), a.seg.data(), wp, scale,
                           s, c.unique);
  kc::grouped_lora_backward(dx.data(), pdA.data(), pdB.data(), dw.data(), dh.data(), g.data(), x.data(), h.data(),
                            pA.data(), pB.data(), a.rows.data(), a.seg.data(), wp, scale, s, c.unique);
  h.resize(static_cast<std::size_t>(M * c.R));
  dw.resize(static_cast<std::size_t>(M));
  CHECK(rel_err(y, ref.y) < 1e-5);
  CHECK(rel_err(h, ref.h) < 1e-5);
  CHECK(rel_err(dx, ref.dx) < 1e-5);
  if (c.weighted) CHECK(rel_err(dw, ref.dw) < 1e-5);
  for (int64_t e = 0; e < c.E; ++e) {
    CHECK(rel_err(dA[e], ref.dA[e]) < 1e-5);
    CHECK(rel_err(dB[e], ref.dB[e]) < 1e-5);
  }
}

}  // namespace

TEST_CASE("grouped LoRA kernels (emulated on the CPU): forward and backward against the definition") {
  const Case cases[] = {
      {1, 1, 1, 1, 1, false, true},     // the smallest
      {37, 33, 7, 7, 3, false, true},   // rank <= 8: 8 assignments per warp, expert 1 empty
      {30, 40, 33, 16, 4, true, true},  // rank 16: 4 per warp, gate weights
      {40, 40, 20, 8, 4, false, false}, // top-2: rows repeat, atomic adds
      {24, 40, 24, 20, 5, true, true},  // rank 20 (32 class): 2 per warp
      {20, 40, 30, 33, 2, true, false}, // rank 33 (64 class): 1 per warp, top-2 with gates
  };
  for (const Case& c : cases) run(c);
}

TEST_CASE("grouped LoRA kernels (emulated on the CPU): backward writing dx, dA and dB over garbage") {
  // write_grads: the outputs start as NaN. Covered: dx stored directly (every row one assignment)
  // or zeroed and added (rows without or with two assignments); dA / dB stored (one slice per
  // expert) or zeroed in one launch and added by several slices (M >= 128 E); an expert without
  // rows (E > 2) gets zeros either way.
  const Case cases[] = {
      {37, 33, 7, 7, 3, false, true, true, true},      // stored dx, stored dA / dB, expert 1 empty
      {37, 33, 7, 7, 3, true, true, true, false},      // rows without assignments: dx zeroed and added
      {40, 40, 20, 8, 4, false, false, true, false},   // top-2: atomics onto a zeroed dx
      {520, 24, 20, 16, 3, true, true, true, true},    // 2 slices per expert: dA / dB zeroed, atomics
      {300, 20, 36, 4, 2, false, false, true, false},  // top-2 and 4 slices
  };
  for (const Case& c : cases) run(c);
}

TEST_CASE("grouped LoRA kernels (emulated on the CPU): written dA and dB, dx added onto what it holds (add_dx)") {
  // grouped_lora_linear: dx already holds g W. Where dx would be stored (every row one assignment)
  // or zeroed first, it must be added onto instead; dA and dB are still written over NaN.
  const Case cases[] = {
      {37, 33, 7, 7, 3, false, true, true, true, true},     // every row one assignment: no store
      {37, 33, 7, 7, 3, true, true, true, false, true},     // rows without assignments: no zeroing
      {40, 40, 20, 8, 4, false, false, true, false, true},  // top-2: atomics onto what dx holds
      {520, 24, 20, 16, 3, true, true, true, true, true},   // 2 slices per expert
  };
  for (const Case& c : cases) run(c);
}
