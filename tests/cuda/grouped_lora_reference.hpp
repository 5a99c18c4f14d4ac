// tests/cuda/grouped_lora_reference.hpp: what the grouped (segmented) LoRA tests of the kernels
// (test_cuda_ops.cu) and of the backend (test_cuda_backend.cu) share: the random assignments and
// the product's definition in double, assignment by assignment.
#pragma once

#include <cstdint>
#include <vector>

namespace moa_test {

// Assignments grouped by expert: one per row (MoA; every 5th row gets none, unless every_row: then
// the rows are a permutation, M == N) or two per row (top-2, MoE-LoRA); expert 1 gets no rows when
// E > 2. randi(lo, hi) draws an integer in [lo, hi].
struct GroupedAssignments {
  std::vector<int32_t> rows, seg{0};
  std::vector<int64_t> expert;
};

template <class RandI>
GroupedAssignments grouped_assignments(int64_t N, int64_t E, bool unique, RandI&& randi, bool every_row = false) {
  std::vector<std::vector<int32_t>> by_expert(static_cast<std::size_t>(E));
  for (int64_t n = 0; n < N; ++n)
    for (int k = 0; k < (unique ? 1 : 2); ++k) {
      int64_t e = randi(0, E - 1);
      if (E > 2 && e == 1) e = 0;
      if (unique && !every_row && n % 5 == 4) continue;
      by_expert[static_cast<std::size_t>(e)].push_back(static_cast<int32_t>(n));
    }
  GroupedAssignments a;
  for (int64_t e = 0; e < E; ++e) {
    for (int32_t r : by_expert[static_cast<std::size_t>(e)]) {
      a.rows.push_back(r);
      a.expert.push_back(e);
    }
    a.seg.push_back(static_cast<int32_t>(a.rows.size()));
  }
  return a;
}

// y = y0 + scale w B_e A_e x (per assignment), h = A_e x, and the backward for g = dL/dy:
// dx = dx0 + ..., dA = dA0 + ..., dB = dB0 + ... (accumulated), dw written. w null: all 1.
struct GroupedReference {
  std::vector<double> y, h, dx, dw;
  std::vector<std::vector<double>> dA, dB;
};

inline GroupedReference grouped_lora_reference(int64_t N, int64_t In, int64_t Out, int64_t R, int64_t E,
                                               const GroupedAssignments& a, const std::vector<float>& x,
                                               const std::vector<std::vector<float>>& A,
                                               const std::vector<std::vector<float>>& B, const std::vector<float>& y0,
                                               const std::vector<float>& g, const std::vector<float>& dx0,
                                               const std::vector<std::vector<float>>& dA0,
                                               const std::vector<std::vector<float>>& dB0,
                                               const std::vector<float>* w, float scale) {
  (void)N;
  const int64_t M = static_cast<int64_t>(a.rows.size());
  GroupedReference ref{{y0.begin(), y0.end()}, std::vector<double>(static_cast<std::size_t>(M * R)),
                       {dx0.begin(), dx0.end()}, std::vector<double>(static_cast<std::size_t>(M)), {}, {}};
  for (int64_t e = 0; e < E; ++e) {
    ref.dA.emplace_back(dA0[e].begin(), dA0[e].end());
    ref.dB.emplace_back(dB0[e].begin(), dB0[e].end());
  }
  for (int64_t j = 0; j < M; ++j) {
    const int64_t e = a.expert[j], n = a.rows[j];
    const double s = scale * (w ? (*w)[j] : 1.0);
    std::vector<double> hj(R, 0.0), bt(R, 0.0);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < In; ++i) hj[r] += static_cast<double>(A[e][r * In + i]) * x[n * In + i];
    for (int64_t r = 0; r < R; ++r) ref.h[j * R + r] = hj[r];
    for (int64_t o = 0; o < Out; ++o)
      for (int64_t r = 0; r < R; ++r) {
        ref.y[n * Out + o] += s * B[e][o * R + r] * hj[r];
        bt[r] += static_cast<double>(B[e][o * R + r]) * g[n * Out + o];  // B^T g
      }
    double d = 0.0;
    for (int64_t r = 0; r < R; ++r) d += hj[r] * bt[r];
    ref.dw[j] = scale * d;
    for (int64_t r = 0; r < R; ++r) {
      const double dh = s * bt[r];
      for (int64_t i = 0; i < In; ++i) {
        ref.dx[n * In + i] += dh * A[e][r * In + i];
        ref.dA[e][r * In + i] += dh * x[n * In + i];
      }
      for (int64_t o = 0; o < Out; ++o) ref.dB[e][o * R + r] += s * g[n * Out + o] * hj[r];
    }
  }
  return ref;
}

}  // namespace moa_test
