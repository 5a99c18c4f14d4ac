// Shared definitions of the CPU matrix product: how a microkernel writes C, a scalar fused
// multiply-add, the OpenMP thread queries and the aligned per-thread packing workspace.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moa::kernels::cpu::detail {

// How a microkernel combines its accumulator `acc` (the product over one KC block) with C.
enum class update_mode : int {
  overwrite,  // C = alpha * acc              (first K block, beta == 0: C is never read)
  scale,      // C = alpha * acc + beta * C   (first K block, beta != 0)
  accumulate  // C = alpha * acc + C          (later K blocks)
};

// a * b + c, fused when the target has FMA so that the scalar edge code rounds exactly like the
// SIMD microkernels (which use explicit FMA instructions).
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The scalar form of the microkernel's write-back; the SIMD kernels compute exactly the same
// expression lane by lane (mul, or fma(acc, alpha, beta * c), or fma(acc, alpha, c)).
inline float update_one(float acc, float alpha, float beta, float c, update_mode mode) {
  switch (mode) {
    case update_mode::overwrite: return acc * alpha;
    case update_mode::scale: return fmadd(acc, alpha, beta * c);
    default: return fmadd(acc, alpha, c);
  }
}

// Writes an mr x nr corner of a dense accumulator tile (row stride ld_tile) into C.
inline void update_tile(const float* tile, int64_t ld_tile, int64_t mr, int64_t nr, float* c, int64_t ldc,
                        float alpha, float beta, update_mode mode) {
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = update_one(tile[i * ld_tile + j], alpha, beta, c[i * ldc + j], mode);
}

// C = beta * C over an M x N block (beta == 0 writes zeros, ignoring what C held).
inline void scale_c(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.0f)
      for (int64_t j = 0; j < N; ++j) c[j] = 0.0f;
    else if (beta != 1.0f)
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
  }
}

inline int max_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// A 64-byte aligned float buffer that only grows; one per thread and purpose, reused across calls
// so that the kernels never allocate in steady state.
class aligned_buffer {
 public:
  aligned_buffer() = default;
  aligned_buffer(const aligned_buffer&) = delete;
  aligned_buffer& operator=(const aligned_buffer&) = delete;
  ~aligned_buffer() { release(); }

  float* get(std::size_t n) {
    if (n > cap_) {
      release();
      std::size_t grown = n + n / 4;
      grown = (grown + 15) & ~std::size_t(15);
      ptr_ = static_cast<float*>(::operator new(grown * sizeof(float), std::align_val_t(64)));
      cap_ = grown;
    }
    return ptr_;
  }

 private:
  void release() {
    if (ptr_) ::operator delete(ptr_, std::align_val_t(64));
    ptr_ = nullptr;
    cap_ = 0;
  }
  float* ptr_ = nullptr;
  std::size_t cap_ = 0;
};

enum class workspace_slot : int { pack_a = 0, pack_b = 1, shared_a = 2, shared_b = 3 };

// The calling thread's workspace for `slot`, at least n floats, 64-byte aligned.
inline float* thread_workspace(workspace_slot slot, std::size_t n) {
  thread_local aligned_buffer buffers[4];
  return buffers[static_cast<int>(slot)].get(n);
}

}  // namespace moa::kernels::cpu::detail
