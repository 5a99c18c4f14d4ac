// Portable microkernel of the blocked matrix product: plain loops over a 4 x 8 register tile that
// the compiler may auto-vectorise. Always compiled, whatever the target, so it can be tested anywhere.
#pragma once

#include <cstdint>

#include "gemm_common.hpp"
#include "gemm_pack.hpp"

namespace moa::kernels::cpu::detail {

struct ukernel_generic {
  static constexpr int64_t MR = 4;
  static constexpr int64_t NR = 8;
  static constexpr int64_t KC = 256;
  static constexpr int64_t MC = 128;
  static constexpr int64_t NC = 2048;
  static constexpr int64_t NJ_MIN = 64;  // narrowest column block of a threaded job

  static void pack_a(bool trans_a, const float* A, int64_t lda, int64_t i0, int64_t mc, int64_t k0, int64_t kc,
                     float* Ap) {
    detail::pack_a<MR>(trans_a, A, lda, i0, mc, k0, kc, Ap);
  }
  // Micro-panels [q0, q1) of the B block at columns j0.. (nc wide), rows k0.. (kc deep).
  static void pack_b(bool trans_b, const float* B, int64_t ldb, int64_t k0, int64_t kc, int64_t j0, int64_t nc,
                     int64_t q0, int64_t q1, float* Bp) {
    pack_b_block<NR>(trans_b, B, ldb, k0, kc, j0, nc, q0, q1, Bp, pack_b_panel<NR>);
  }

  // C[0:MR, 0:NR] (row stride ldc) <- update(sum_k a[k*MR + r] * b[k*NR + c]), a and b packed.
  static void run(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                  float alpha, float beta, update_mode mode) {
    float acc[MR][NR] = {};
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t r = 0; r < MR; ++r) {
        const float ar = a[k * MR + r];
        for (int64_t j = 0; j < NR; ++j) acc[r][j] = fmadd(ar, b[k * NR + j], acc[r][j]);
      }
    }
    update_tile(&acc[0][0], NR, MR, NR, c, ldc, alpha, beta, mode);
  }
};

}  // namespace moa::kernels::cpu::detail
