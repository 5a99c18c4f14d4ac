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

// Number of row groups tm (a divisor of nt; tn = nt / tm column groups) that minimises the
// slowest thread's work: its microkernel tiles plus packing its rows of A (about a quarter tile
// per MR rows). Splitting columns duplicates A packing; splitting rows can leave a ragged share.
inline int choose_row_groups(int64_t m_units, int64_t n_panels, int nt) {
  int best = nt;
  double best_cost = 0.0;
  for (int tm = nt; tm >= 1; --tm) {
    if (nt % tm != 0) continue;
    const int64_t rows = ceil_div(m_units, tm), cols = ceil_div(n_panels, nt / tm);
    const double cost = static_cast<double>(rows) * (static_cast<double>(cols) + 0.25);
    if (tm == nt || cost < best_cost) {
      best = tm;
      best_cost = cost;
    }
  }
  return best;
}

inline void prefetch_l1(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// Prefetches the cache lines of one B micro-panel (packed, or its source rows in B) spread
// evenly over `steps` calls of fetch(0), fetch(1), ...
class b_prefetcher {
 public:
  b_prefetcher() = default;

  static b_prefetcher packed(const float* panel, int64_t floats, int64_t steps) {
    b_prefetcher p;
    p.base_ = panel;
    p.rows_ = 1;
    p.row_lines_ = ceil_div(floats, 16);
    p.per_step_ = ceil_div(p.row_lines_, steps);
    return p;
  }

  // Rows [k0, k0 + kc) x columns [j, j + nr) of op(B), as stored in B.
  static b_prefetcher source(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc, int64_t j, int64_t nr,
                             int64_t steps) {
    b_prefetcher p;
    if (nr <= 0) return p;
    if (!trans_b) {
      p.base_ = B + k0 * ldb + j;  // kc rows of nr floats
      p.rows_ = kc;
      p.row_lines_ = ceil_div(nr, 16);
    } else {
      p.base_ = B + j * ldb + k0;  // nr rows of kc floats
      p.rows_ = nr;
      p.row_lines_ = ceil_div(kc, 16);
    }
    p.ld_ = ldb;
    p.per_step_ = ceil_div(p.rows_ * p.row_lines_, steps);
    return p;
  }

  void fetch(int64_t step) const {
    const int64_t total = rows_ * row_lines_;
    const int64_t end = std::min(total, (step + 1) * per_step_);
    for (int64_t i = step * per_step_; i < end; ++i)
      prefetch_l1(base_ + (i / row_lines_) * ld_ + (i % row_lines_) * 16);
  }

 private:
  const float* base_ = nullptr;
  int64_t rows_ = 0, row_lines_ = 0, ld_ = 0, per_step_ = 0;
};

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
    const int tm = choose_row_groups(m_units, ceil_div(std::min(ncb, N), NR), nt);
    const int tn = nt / tm;
    const int gm = tid % tm, gn = tid / tm;
    const int64_t m0 = std::min(M, m_units * gm / tm * MR);
    const int64_t m1 = std::min(M, m_units * (gm + 1) / tm * MR);
    const int64_t mcb = (m1 > m0) ? balanced_block(m1 - m0, Ukr::MC, MR) : MR;
    float* const a_buf = thread_workspace(workspace_slot::pack_a, static_cast<std::size_t>(mcb * kcb));

    // With a single row group every thread packs exactly the B micro-panels it uses, so it packs
    // each one just before its first use (while the previous one computes, its source is being
    // prefetched) and no barrier is needed. Otherwise the threads share the whole B panel.
    const bool private_b = (tm == 1);

    int64_t iter = 0;
    for (int64_t jc = 0; jc < N; jc += ncb) {
      const int64_t nc = std::min(ncb, N - jc);
      const int64_t panels = ceil_div(nc, NR);
      const int64_t q0 = panels * gn / tn, q1 = panels * (gn + 1) / tn;
      for (int64_t pc = 0; pc < K; pc += kcb, ++iter) {
        const int64_t kc = std::min(kcb, K - pc);
        float* const b_pack = b_buf + (nt > 1 ? (iter & 1) * b_block : 0);
        if (!private_b) {
          // Every thread packs its share of the B panel's micro-panels, then waits for the others.
          Ukr::pack_b(trans_b, B, ldb, pc, kc, jc, nc, panels * tid / nt, panels * (tid + 1) / nt, b_pack);
#ifdef _OPENMP
#pragma omp barrier
#endif
        }
        if (m1 <= m0) continue;
        const update_mode mode = (pc > 0 || beta == 1.0f) ? update_mode::accumulate
                                 : (beta == 0.0f)        ? update_mode::overwrite
                                                         : update_mode::scale;
        for (int64_t ic = m0; ic < m1; ic += mcb) {
          const int64_t mc = std::min(mcb, m1 - ic);
          const bool pack_here = private_b && ic == m0;
          Ukr::pack_a(trans_a, A, lda, ic, mc, pc, kc, a_buf);
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t j = jc + q * NR;
            const int64_t nr = std::min(NR, N - j);
            float* const bp = b_pack + q * NR * kc;
            if (pack_here) Ukr::pack_b(trans_b, B, ldb, pc, kc, jc, nc, q, q + 1, b_pack);
            // What the next micro-panel needs is fetched a slice per microkernel call: its packed
            // form (from L3 to L1), or when it is packed next, its source in B.
            const b_prefetcher pf = (q + 1 >= q1) ? b_prefetcher{}
                                    : pack_here   ? b_prefetcher::source(trans_b, B, ldb, pc, kc, j + NR,
                                                                         std::min(NR, N - j - NR), ceil_div(mc, MR))
                                                  : b_prefetcher::packed(bp + NR * kc, NR * kc, ceil_div(mc, MR));
            int64_t step = 0;
            for (int64_t ir = 0; ir < mc; ir += MR, ++step) {
              const int64_t mr = std::min(MR, mc - ir);
              pf.fetch(step);
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
