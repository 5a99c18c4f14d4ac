// Cache-blocked, OpenMP-parallel driver of the float matrix product (GotoBLAS / BLIS loop order:
// NC columns of B -> KC slice of K -> pack B panel (shared by the threads) -> MC rows of A -> pack A
// block (per thread) -> NR micro-panels -> MR micro-panels -> microkernel). Generic over the
// microkernel, which supplies its register tile MR x NR and its block sizes KC, MC, NC.
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemm_common.hpp"

namespace moa::kernels::cpu::detail {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Splits `total` into ceil(total / max_block) nearly equal blocks, each a multiple of `multiple`.
constexpr int64_t balanced_block(int64_t total, int64_t max_block, int64_t multiple) {
  const int64_t blocks = ceil_div(total, max_block);
  return std::min(round_up(ceil_div(total, blocks), multiple), round_up(max_block, multiple));
}

// C = alpha * op(A) * op(B) + beta * C on the packed path, with `nthreads` OpenMP threads (1: none).
// Work is split over rows (or columns) of C only, never over K, and every element of C goes
// through the same microkernel arithmetic wherever it lands, so the result does not depend on
// the number of threads. Expects M, N, K > 0.
template <class Ukr>
inline void sgemm_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int nthreads) {
  constexpr int64_t MR = Ukr::MR, NR = Ukr::NR;
  const int64_t kcb = balanced_block(K, Ukr::KC, 1);
  const int64_t ncb = balanced_block(round_up(N, NR), Ukr::NC, NR);
  const int64_t b_block = kcb * ncb;
  // Two B buffers when threaded: packing the next panel never waits for the slowest reader of the
  // previous one, so one barrier per panel suffices.
  float* const b_buf = thread_workspace(workspace_slot::pack_b, static_cast<std::size_t>(b_block * (nthreads > 1 ? 2 : 1)));

  auto body = [&](int tid, int nt) {
    // Thread grid: tm groups of rows x tn groups of NR micro-panels.
    const int64_t m_units = ceil_div(M, MR);
    const int tm = (m_units >= 4 * nt) ? nt : 1;
    const int tn = nt / tm;
    const int gm = tid % tm, gn = tid / tm;
    const bool idle = gn >= tn;  // nt not divisible by tm cannot happen (tm is 1 or nt); kept for safety
    const int64_t m0 = std::min(M, m_units * gm / tm * MR);
    const int64_t m1 = std::min(M, m_units * (gm + 1) / tm * MR);
    const int64_t mcb = (m1 > m0) ? balanced_block(m1 - m0, Ukr::MC, MR) : MR;
    float* const a_buf = thread_workspace(workspace_slot::pack_a, static_cast<std::size_t>(mcb * kcb));

    int64_t iter = 0;
    for (int64_t jc = 0; jc < N; jc += ncb) {
      const int64_t nc = std::min(ncb, N - jc);
      const int64_t panels = ceil_div(nc, NR);
      for (int64_t pc = 0; pc < K; pc += kcb, ++iter) {
        const int64_t kc = std::min(kcb, K - pc);
        float* const b_pack = b_buf + (nt > 1 ? (iter & 1) * b_block : 0);
        // Every thread packs its share of the B panel's micro-panels.
        for (int64_t q = panels * tid / nt; q < panels * (tid + 1) / nt; ++q)
          Ukr::pack_b_panel(trans_b, B, ldb, pc, kc, jc + q * NR, std::min(NR, nc - q * NR), b_pack + q * NR * kc);
#ifdef _OPENMP
        if (nt > 1) {
#pragma omp barrier
        }
#endif
        if (idle || m1 <= m0) continue;
        const update_mode mode = (pc > 0 || beta == 1.0f) ? update_mode::accumulate
                                 : (beta == 0.0f)        ? update_mode::overwrite
                                                         : update_mode::scale;
        const int64_t q0 = panels * gn / tn, q1 = panels * (gn + 1) / tn;
        for (int64_t ic = m0; ic < m1; ic += mcb) {
          const int64_t mc = std::min(mcb, m1 - ic);
          Ukr::pack_a(trans_a, A, lda, ic, mc, pc, kc, a_buf);
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t j = jc + q * NR;
            const int64_t nr = std::min(NR, N - j);
            const float* bp = b_pack + q * NR * kc;
            for (int64_t ir = 0; ir < mc; ir += MR) {
              const int64_t mr = std::min(MR, mc - ir);
              const float* ap = a_buf + ir * kc;
              float* cp = C + (ic + ir) * ldc + j;
              if (mr == MR && nr == NR) {
                Ukr::run(kc, ap, bp, cp, ldc, alpha, beta, mode);
              } else {
                alignas(64) float tile[MR * NR];
                Ukr::run(kc, ap, bp, tile, NR, 1.0f, 0.0f, update_mode::overwrite);
                update_tile(tile, NR, mr, nr, cp, ldc, alpha, beta, mode);
              }
            }
          }
        }
      }
    }
  };

  if (nthreads <= 1) {
    body(0, 1);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
  body(thread_id(), num_threads());
#else
  body(0, 1);
#endif
}

}  // namespace moa::kernels::cpu::detail
