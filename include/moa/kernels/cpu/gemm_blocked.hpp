// Cache-blocked, OpenMP-parallel driver of the float matrix product. C is cut into jobs (blocks
// of rows x columns) that the threads take from a shared counter; a job runs the GotoBLAS / BLIS
// loops over its block: KC slice of K -> MC rows of A (packed) -> NR micro-panels of B (packed on
// first use) -> MR micro-panels -> microkernel. Generic over the microkernel, which supplies its
// register tile MR x NR and its block sizes KC, MC, NC.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>

#include "gemm_common.hpp"

namespace moa::kernels::cpu::detail {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Splits `total` into ceil(total / max_block) nearly equal blocks, each a multiple of `multiple`.
constexpr int64_t balanced_block(int64_t total, int64_t max_block, int64_t multiple) {
  const int64_t blocks = ceil_div(total, max_block);
  return std::min(round_up(ceil_div(total, blocks), multiple), round_up(max_block, multiple));
}

inline void prefetch_l1(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// Prefetches the cache lines of a packed B micro-panel, a slice per call of fetch(0), fetch(1), ...
// so that it is in L1 when the loop over A micro-panels moves on to it.
class b_prefetcher {
 public:
  b_prefetcher() = default;
  b_prefetcher(const float* panel, int64_t floats, int64_t steps)
      : base_(panel), lines_(ceil_div(floats, 16)), per_step_(ceil_div(lines_, steps)) {}

  void fetch(int64_t step) const {
    const int64_t end = std::min(lines_, (step + 1) * per_step_);
    for (int64_t i = step * per_step_; i < end; ++i) prefetch_l1(base_ + i * 16);
  }

 private:
  const float* base_ = nullptr;
  int64_t lines_ = 0, per_step_ = 0;
};

// Waits until `counter` reaches `target`, yielding the CPU while it waits. The threads of a product
// wait for each other this way rather than in OpenMP barriers, which busy-wait: on a machine shared
// with other processes, a busy-waiting thread can keep the very thread it waits for off the CPU.
inline void spin_until(const std::atomic<int64_t>& counter, int64_t target) {
  while (counter.load(std::memory_order_acquire) < target) std::this_thread::yield();
}

// A reusable barrier for a fixed team of nt threads, built on spin_until: the b-th call (b = 0, 1,
// ...) of every thread returns once all nt threads have made their b-th call.
class yielding_barrier {
 public:
  void wait(int nt, int64_t& calls) {
    arrived_.fetch_add(1, std::memory_order_acq_rel);
    spin_until(arrived_, nt * ++calls);
  }

 private:
  std::atomic<int64_t> arrived_{0};
};

// The macro-kernel: C rows [ic, ic + mc) x columns [j0, j1) (NR-wide micro-panels of the packed B
// block b_pack) += the product of one packed A block (mc x kc) and that B block. While one B
// micro-panel is in use, the next one is prefetched into L1 a slice per microkernel call.
template <class Ukr>
inline void macro_kernel(int64_t ic, int64_t mc, int64_t j0, int64_t j1, int64_t kc, const float* a_pack,
                         const float* b_pack, float* C, int64_t ldc, float alpha, float beta, update_mode mode) {
  constexpr int64_t MR = Ukr::MR, NR = Ukr::NR;
  const int64_t panels = ceil_div(j1 - j0, NR), steps = ceil_div(mc, MR);
  for (int64_t q = 0; q < panels; ++q) {
    const int64_t j = j0 + q * NR, nr = std::min(NR, j1 - j);
    const float* bp = b_pack + q * NR * kc;
    const b_prefetcher pf = (q + 1 < panels) ? b_prefetcher(bp + NR * kc, NR * kc, steps) : b_prefetcher{};
    int64_t step = 0;
    for (int64_t ir = 0; ir < mc; ir += MR, ++step) {
      const int64_t mr = std::min(MR, mc - ir);
      pf.fetch(step);
      const float* ap = a_pack + ir * kc;
      float* cp = C + (ic + ir) * ldc + j;
      if (mr == MR && nr == NR) {
        Ukr::run(kc, ap, bp, cp, ldc, alpha, beta, mode);
      } else {
        // Edge tile: the same microkernel into a local tile, then the same update, element-wise.
        alignas(64) float tile[MR * NR];
        Ukr::run(kc, ap, bp, tile, NR, 1.0f, 0.0f, update_mode::overwrite);
        update_tile(tile, NR, mr, nr, cp, ldc, alpha, beta, mode);
      }
    }
  }
}

// How the first K block combines with C; later blocks accumulate.
inline update_mode first_block_mode(float beta) {
  return beta == 1.0f ? update_mode::accumulate : beta == 0.0f ? update_mode::overwrite : update_mode::scale;
}

#ifdef _OPENMP
// The threaded product for many rows of C: in phases, one per (NC columns, KC slice of K) block.
// In each phase the threads first pack the B panel together (into one of two shared buffers),
// then take MC-row jobs dynamically, each packing its own A block and sweeping the whole panel.
// So A and B are each packed exactly once, whatever the number of threads. One barrier per phase:
// a thread that finishes its jobs goes on to pack the next panel into the other buffer, and the
// barrier after that packing also closes the previous phase. The last barrier also means that the
// threads leave the parallel region together, so OpenMP's own (busy-waiting) barrier is short.
template <class Ukr>
inline void sgemm_blocked_phased(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                                 const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                                 int64_t ldc, int nthreads) {
  constexpr int64_t MR = Ukr::MR, NR = Ukr::NR;
  const int64_t kcb = balanced_block(K, Ukr::KC, 1);
  const int64_t ncb = balanced_block(round_up(N, NR), Ukr::NC, NR);
  const int64_t b_block = kcb * ncb;
  const int64_t k_blocks = ceil_div(K, kcb), n_blocks = ceil_div(N, ncb);
  const int64_t phases = k_blocks * n_blocks;
  // Row jobs of at most about MC rows, as many as a multiple of the thread count and equal to
  // within MR rows, so that the threads finish each phase together.
  const int64_t m_units = ceil_div(M, MR);
  const int64_t m_jobs = std::min(m_units, round_up(ceil_div(M, Ukr::MC), nthreads));
  const int64_t mc_max = ceil_div(m_units, m_jobs) * MR;
  float* const b_shared = thread_workspace(workspace_slot::shared_b, static_cast<std::size_t>(2 * b_block));

  auto pack_phase = [&](int64_t phase, int tid, int nt) {
    const int64_t jc = (phase / k_blocks) * ncb, pc = (phase % k_blocks) * kcb;
    const int64_t nc = std::min(ncb, N - jc), kc = std::min(kcb, K - pc), panels = ceil_div(nc, NR);
    Ukr::pack_b(trans_b, B, ldb, pc, kc, jc, nc, panels * tid / nt, panels * (tid + 1) / nt,
                b_shared + (phase & 1) * b_block);
  };

  yielding_barrier barrier;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = thread_id(), nt = num_threads();
    int64_t barriers = 0;
    float* const a_buf = thread_workspace(workspace_slot::pack_a, static_cast<std::size_t>(mc_max * kcb));
    pack_phase(0, tid, nt);
    barrier.wait(nt, barriers);
    for (int64_t phase = 0; phase < phases; ++phase) {
      const int64_t jc = (phase / k_blocks) * ncb, pc = (phase % k_blocks) * kcb;
      const int64_t nc = std::min(ncb, N - jc), kc = std::min(kcb, K - pc);
      const update_mode mode = pc > 0 ? update_mode::accumulate : first_block_mode(beta);
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t job = 0; job < m_jobs; ++job) {
        const int64_t ic = m_units * job / m_jobs * MR, ic_end = std::min(M, m_units * (job + 1) / m_jobs * MR);
        Ukr::pack_a(trans_a, A, lda, ic, ic_end - ic, pc, kc, a_buf);
        macro_kernel<Ukr>(ic, ic_end - ic, jc, jc + nc, kc, a_buf, b_shared + (phase & 1) * b_block, C, ldc, alpha,
                          beta, mode);
      }
      if (phase + 1 < phases) pack_phase(phase + 1, tid, nt);
      barrier.wait(nt, barriers);
    }
  }
}
#endif

// C = alpha * op(A) * op(B) + beta * C on the packed path, with `nthreads` OpenMP threads (1: none).
// Single-threaded: one job, the classic loop nest. Few rows (one row block): the threads pack A
// once together, then take column jobs from a counter, each packing its own B, with no barrier.
// Many rows: sgemm_blocked_phased. Threads never split K, and every element of C goes through the
// same microkernel arithmetic whichever thread computes it, so the result is bitwise the same for
// any thread count and any schedule. Expects M, N, K > 0.
template <class Ukr>
inline void sgemm_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int nthreads) {
  constexpr int64_t MR = Ukr::MR, NR = Ukr::NR;
  const int64_t kcb = balanced_block(K, Ukr::KC, 1);
  const int64_t k_blocks = ceil_div(K, kcb);

  // Job grid. One thread: a single row block, so B is packed once. Several: row blocks of at most
  // 4 * MC rows and enough column blocks for about eight jobs per thread, so that a thread slowed
  // down by other processes does not hold up the whole product.
  int64_t hb = round_up(M, MR), wmax = Ukr::NC;
  if (nthreads > 1) {
    hb = balanced_block(M, 4 * Ukr::MC, MR);
    const int64_t col_jobs_wanted = ceil_div(8 * nthreads, ceil_div(M, hb));
    wmax = std::clamp(ceil_div(N, col_jobs_wanted), Ukr::NJ_MIN, Ukr::NC);
  }
  const int64_t wb = balanced_block(round_up(N, NR), wmax, NR);
  const int64_t row_jobs = ceil_div(M, hb), jobs = row_jobs * ceil_div(N, wb);
  const int64_t mcb = balanced_block(hb, Ukr::MC, MR);

  // With a single row block and several jobs, all jobs need the same packed A: it is packed once,
  // for all of K, into a buffer the threads share (in tasks of a few micro-panels that any thread
  // may take), instead of once per job.
  const bool shared_a = row_jobs == 1 && jobs > 1 && nthreads > 1;
  const int64_t m_panels = ceil_div(M, MR);
  constexpr int64_t kTaskPanels = 8;
  const int64_t a_chunks = ceil_div(m_panels, kTaskPanels), a_tasks = shared_a ? k_blocks * a_chunks : 0;
  const int64_t a_block = m_panels * MR * kcb;  // one K block of the shared packed A
  float* const a_shared =
      shared_a ? thread_workspace(workspace_slot::shared_a, static_cast<std::size_t>(k_blocks * a_block)) : nullptr;

  // One job: rows [i0, i1) x columns [j0, j1) of C, all of K.
  auto run_job = [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, float* a_buf, float* b_buf) {
    const int64_t nc = j1 - j0;
    for (int64_t pc = 0, kb = 0; pc < K; pc += kcb, ++kb) {
      const int64_t kc = std::min(kcb, K - pc);
      const update_mode mode = pc > 0 ? update_mode::accumulate : first_block_mode(beta);
      Ukr::pack_b(trans_b, B, ldb, pc, kc, j0, nc, 0, ceil_div(nc, NR), b_buf);
      for (int64_t ic = i0; ic < i1; ic += mcb) {
        const int64_t mc = std::min(mcb, i1 - ic);
        const float* a_pack = a_buf;
        if (shared_a) {
          a_pack = a_shared + kb * a_block + ic * kc;  // ic is a multiple of MR
        } else {
          Ukr::pack_a(trans_a, A, lda, ic, mc, pc, kc, a_buf);
        }
        macro_kernel<Ukr>(ic, mc, j0, j1, kc, a_pack, b_buf, C, ldc, alpha, beta, mode);
      }
    }
  };

  std::atomic<int64_t> a_claimed{0}, a_packed{0}, jobs_done{0};
  // Job j covers row block j % row_jobs and column block j / row_jobs, so that jobs running at
  // the same time tend to share their rows of A.
  auto work = [&](auto&& next_job) {
    if (shared_a) {
      for (int64_t t = a_claimed.fetch_add(1, std::memory_order_relaxed); t < a_tasks;
           t = a_claimed.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t kb = t / a_chunks, p0 = (t % a_chunks) * kTaskPanels;
        const int64_t pc = kb * kcb, kc = std::min(kcb, K - pc);
        const int64_t r0 = p0 * MR, r1 = std::min(M, (p0 + kTaskPanels) * MR);
        Ukr::pack_a(trans_a, A, lda, r0, r1 - r0, pc, kc, a_shared + kb * a_block + r0 * kc);
        a_packed.fetch_add(1, std::memory_order_release);
      }
      spin_until(a_packed, a_tasks);
    }
    float* const a_buf =
        shared_a ? nullptr : thread_workspace(workspace_slot::pack_a, static_cast<std::size_t>(mcb * kcb));
    float* const b_buf = thread_workspace(workspace_slot::pack_b, static_cast<std::size_t>(wb * kcb));
    for (int64_t job = next_job(); job < jobs; job = next_job()) {
      const int64_t i0 = (job % row_jobs) * hb, j0 = (job / row_jobs) * wb;
      run_job(i0, std::min(M, i0 + hb), j0, std::min(N, j0 + wb), a_buf, b_buf);
      jobs_done.fetch_add(1, std::memory_order_release);
    }
    // Leave the parallel region together (see spin_until).
    spin_until(jobs_done, jobs);
  };

  if (nthreads <= 1 || jobs <= 1) {
    int64_t counter = 0;
    work([&] { return counter++; });
    return;
  }
#ifdef _OPENMP
  if (row_jobs > 1) {
    sgemm_blocked_phased<Ukr>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, nthreads);
    return;
  }
#endif
  std::atomic<int64_t> counter{0};
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(nthreads, jobs)))
#endif
  work([&] { return counter.fetch_add(1, std::memory_order_relaxed); });
}

}  // namespace moa::kernels::cpu::detail
