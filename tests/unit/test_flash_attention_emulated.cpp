// The tensor-core attention kernels (moa/kernels/cuda/flash_attention.cuh), run on the CPU by
// tests/unit/cuda_emulator.hpp and compared with the float64-accumulating reference
// (kernels/reference/attention.hpp): forward (out, lse) and backward (dq, dk, dv) for the tiling
// cases that matter: partial tiles, several query and key tiles, grouped-query heads, a KV cache
// (Tq < Tk), heads that are not a multiple of 16 (padded) or of 4 (no float4 loads), and every head
// width class up to 128. The launchers run as they are (grids, shared memory sizes); the same
// source runs on the GPU in tests/cuda/test_cuda_ops.cu.
//
// Bound: the products take bf16 inputs (relative rounding 2^-9) and P, dS are rounded to bf16, so
// each result is compared with max |error| <= 2e-2 * max |reference| of that tensor; a masking or
// tiling mistake gives errors of the order of the values themselves.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda_emulator.hpp"
#define MOA_CUDA_EMULATE
#include "../cuda/strided_heads.hpp"
#include "moa/kernels/cuda/attention.cuh"
#include "moa/kernels/reference/attention.hpp"

namespace {

namespace kc = moa::kernels::cuda;
using kc::AttentionShape;

std::vector<float> randn(std::size_t n, std::mt19937& g) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

// max |a - b| / max |b| (b the reference), with max |b| floored at 1e-6.
double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, scale = 1e-6;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    err = std::max(err, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return err / scale;
}

}  // namespace

TEST_CASE("flash attention kernels (emulated on the CPU): forward and backward against the reference") {
  namespace ref = moa::kernels::reference;
  std::mt19937 g(7);
  const AttentionShape shapes[] = {
      {1, 2, 1, 70, 70, 16},    // grouped-query, a full and a partial tile
      {1, 2, 2, 20, 100, 40},   // a KV cache: 20 queries at the end of 100 keys; head padded to 48
      {1, 1, 1, 130, 130, 64},  // three query and key tiles, float4 loads
      {2, 1, 1, 17, 17, 7},     // a head of 7 (padded to 16, scalar loads), two batches
      {1, 1, 1, 33, 33, 128},   // the widest head
      {1, 1, 1, 99, 100, 32},   // one cached key: the second key tile's first query is in tile 0
      {1, 2, 1, 0, 40, 16},     // no queries: dk and dv are written, zero (they start as NaN)
  };
  for (const AttentionShape& s : shapes) {
    CAPTURE(s.B);
    CAPTURE(s.Hq);
    CAPTURE(s.Hkv);
    CAPTURE(s.Tq);
    CAPTURE(s.Tk);
    CAPTURE(s.D);
    const std::size_t nq = static_cast<std::size_t>(s.B * s.Hq * s.Tq * s.D),
                      nk = static_cast<std::size_t>(s.B * s.Hkv * s.Tk * s.D),
                      nr = static_cast<std::size_t>(s.B * s.Hq * s.Tq);
    const float scale = 1.f / std::sqrt(static_cast<float>(s.D));
    const std::vector<float> q = randn(nq, g), k = randn(nk, g), v = randn(nk, g), dout = randn(nq, g);

    std::vector<float> out_ref(nq), lse_ref(nr), dq_ref(nq), dk_ref(nk), dv_ref(nk);
    ref::attention_forward<float>(out_ref.data(), lse_ref.data(), q.data(), k.data(), v.data(), s.B, s.Hq, s.Hkv,
                                  s.Tq, s.Tk, s.D, scale);
    ref::attention_backward<float>(dq_ref.data(), dk_ref.data(), dv_ref.data(), dout.data(), q.data(), k.data(),
                                   v.data(), out_ref.data(), lse_ref.data(), s.B, s.Hq, s.Hkv, s.Tq, s.Tk, s.D, scale);

    std::vector<float> out(nq, NAN), lse(nr, NAN);
    kc::flash_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s, scale);
    CHECK(rel_error(out, out_ref) < 2e-2);
    double lse_err = 0;
    for (std::size_t i = 0; i < nr; ++i) lse_err = std::max(lse_err, std::abs(double(lse[i]) - lse_ref[i]));
    CHECK(lse_err < 2e-2);

    // The backward from the reference's out and lse (delta = dout . out per row, as row_dot gives).
    std::vector<float> delta(nr);
    for (std::size_t r = 0; r < nr; ++r) {
      double d = 0;
      for (int64_t c = 0; c < s.D; ++c) d += double(dout[r * s.D + c]) * out_ref[r * s.D + c];
      delta[r] = static_cast<float>(d);
    }
    std::vector<float> dq(nq, NAN), dk(nk, NAN), dv(nk, NAN);
    kc::flash_attention_backward(dq.data(), dk.data(), dv.data(), delta.data(), dout.data(), q.data(), k.data(),
                                 v.data(), lse_ref.data(), s, scale);
    CHECK(rel_error(dq, dq_ref) < 2e-2);
    CHECK(rel_error(dk, dk_ref) < 2e-2);
    CHECK(rel_error(dv, dv_ref) < 2e-2);
  }
}

TEST_CASE("attention kernels (emulated on the CPU): strided operands give the contiguous results bit for bit") {
  // Every operand in the (B, T, H * D + gap) layout of a projection output (tests/cuda/strided_heads.hpp),
  // through the tensor-core kernels and the f32 row kernels: the same values as the contiguous run,
  // and nothing written between rows. gap 4 keeps float4 loads, gap 1 forces scalar ones.
  std::mt19937 g(11);
  struct Case {
    AttentionShape s;
    int64_t gap;
  };
  const Case cases[] = {{{2, 4, 2, 40, 40, 16}, 4}, {{1, 2, 1, 17, 30, 32}, 1}, {{1, 3, 3, 16, 16, 8}, 0}};
  for (const Case& c : cases) {
    for (const bool flash : {true, false}) {
      const AttentionShape& s = c.s;
      CAPTURE(s.Hq);
      CAPTURE(s.Tq);
      CAPTURE(s.D);
      CAPTURE(c.gap);
      CAPTURE(flash);
      using moa_test::StridedHeads;
      const std::size_t nq = static_cast<std::size_t>(s.B * s.Hq * s.Tq * s.D),
                        nk = static_cast<std::size_t>(s.B * s.Hkv * s.Tk * s.D),
                        nr = static_cast<std::size_t>(s.B * s.Hq * s.Tq);
      const float scale = 0.3f;
      const std::vector<float> q = randn(nq, g), k = randn(nk, g), v = randn(nk, g), dout = randn(nq, g);
      // Contiguous.
      std::vector<float> out(nq), lse(nr), delta(nr), dq(nq), dk(nk), dv(nk);
      auto forward = [&](float* o, float* l, const float* qp, const float* kp, const float* vp,
                         const AttentionShape& sh) {
        if (flash)
          kc::flash_attention_forward(o, l, qp, kp, vp, sh, scale);
        else
          kc::attention_forward(o, l, qp, kp, vp, sh, scale);
      };
      auto backward = [&](float* gq, float* gk, float* gv, float* dl, const float* gp, const float* qp, const float* kp,
                          const float* vp, const float* o, const float* l, const AttentionShape& sh) {
        if (flash) {
          kc::attention_delta(dl, gp, o, sh);
          kc::flash_attention_backward(gq, gk, gv, dl, gp, qp, kp, vp, l, sh, scale);
        } else {
          kc::attention_backward(gq, gk, gv, dl, gp, qp, kp, vp, o, l, sh, scale);
        }
      };
      forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s);
      backward(dq.data(), dk.data(), dv.data(), delta.data(), dout.data(), q.data(), k.data(), v.data(), out.data(),
               lse.data(), s);
      // Strided.
      StridedHeads sq(q, s.B, s.Hq, s.Tq, s.D, c.gap), sk(k, s.B, s.Hkv, s.Tk, s.D, c.gap),
          sv(v, s.B, s.Hkv, s.Tk, s.D, c.gap + 1), sg(dout, s.B, s.Hq, s.Tq, s.D, c.gap),
          so(s.B, s.Hq, s.Tq, s.D, c.gap), sdq(s.B, s.Hq, s.Tq, s.D, c.gap + 2), sdk(s.B, s.Hkv, s.Tk, s.D, c.gap),
          sdv(s.B, s.Hkv, s.Tk, s.D, c.gap + 3);
      AttentionShape st = s;
      st.layout = {sq.layout, sk.layout, sv.layout, so.layout, sg.layout, sdq.layout, sdk.layout, sdv.layout};
      std::vector<float> lse2(nr), delta2(nr);
      forward(so.buf.data(), lse2.data(), sq.buf.data(), sk.buf.data(), sv.buf.data(), st);
      backward(sdq.buf.data(), sdk.buf.data(), sdv.buf.data(), delta2.data(), sg.buf.data(), sq.buf.data(),
               sk.buf.data(), sv.buf.data(), so.buf.data(), lse2.data(), st);
      CHECK(moa_test::same_floats(so.gather(), out));
      CHECK(moa_test::same_floats(lse2, lse));
      CHECK(moa_test::same_floats(sdq.gather(), dq));
      CHECK(moa_test::same_floats(sdk.gather(), dk));
      CHECK(moa_test::same_floats(sdv.gather(), dv));
      for (const StridedHeads* t : {&so, &sdq, &sdk, &sdv}) CHECK(t->gaps_untouched());
    }
  }
}

TEST_CASE("the CUDA emulator itself: barriers order shared memory, shuffles exchange, WMMA checks alignment") {
  // A block-wide reversal through shared memory needs the barrier; a butterfly sum needs shuffles.
  std::vector<float> out(64, 0.f);
  moa_emu::launch({1}, {64}, 64 * sizeof(float), [&] {
    MOA_CUDA_DYNAMIC_SMEM(smem);
    float* buf = reinterpret_cast<float*>(smem);
    const unsigned t = threadIdx.x;
    buf[t] = static_cast<float>(t);
    __syncthreads();
    float x = buf[63 - t];
    for (int m = 16; m >= 1; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    out[t] = x;
  });
  // warp 0 reads 63..32 (sum 1520), warp 1 reads 31..0 (sum 496)
  for (unsigned t = 0; t < 64; ++t) CHECK(out[t] == (t < 32 ? 1520.f : 496.f));

  CHECK_THROWS_AS(moa_emu::launch({1}, {32}, 256, [&] {
                    MOA_CUDA_DYNAMIC_SMEM(smem);
                    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
                    nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<float*>(smem) + 1, 16,
                                                   nvcuda::wmma::mem_row_major);
                  }),
                  std::logic_error);
  CHECK_THROWS_AS(moa_emu::launch({1}, {48}, 0, [] {}), std::invalid_argument);
}
