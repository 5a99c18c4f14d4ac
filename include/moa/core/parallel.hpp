// moa/core/parallel.hpp: OpenMP helpers that fall back to serial loops without -fopenmp.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

// `#pragma omp simd` (with a reduction) where OpenMP is on, nothing otherwise (no -Wunknown-pragmas).
#ifdef _OPENMP
#define MOA_DETAIL_PRAGMA(x) _Pragma(#x)
#define MOA_OMP_SIMD MOA_DETAIL_PRAGMA(omp simd)
#define MOA_OMP_SIMD_REDUCE(op, var) MOA_DETAIL_PRAGMA(omp simd reduction(op : var))
#else
#define MOA_OMP_SIMD
#define MOA_OMP_SIMD_REDUCE(op, var)
#endif

namespace moa {

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline void set_num_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(n < 1 ? 1 : n);
#else
  (void)n;
#endif
}

namespace detail {

// Runs f(begin, end) over [0, n) in contiguous chunks, one per thread, when n * cost_per_item is
// large enough to pay for the threads. Chunks are fixed by (n, threads), so results are
// deterministic for a given thread count.
template <class F>
void parallel_for(int64_t n, int64_t cost_per_item, F&& f) {
  if (n <= 0) return;
#ifdef _OPENMP
  const int64_t work = n * (cost_per_item > 0 ? cost_per_item : 1);
  const int threads = omp_get_max_threads();
  if (threads > 1 && work >= (int64_t{1} << 15) && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t chunk = (n + nt - 1) / nt;
      const int64_t b = t * chunk, e = b + chunk < n ? b + chunk : n;
      if (b < e) f(b, e);
    }
    return;
  }
#endif
  (void)cost_per_item;
  f(int64_t{0}, n);
}

}  // namespace detail
}  // namespace moa
