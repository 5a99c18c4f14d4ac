// moa/core/head_layout.hpp: where the rows of an attention operand lie in memory.
//
// Attention reads and writes (B, H, T, D) tensors whose D values of a row are contiguous; the other
// three axes may be strided. The usual case besides the contiguous one is the heads of a projection
// output (B, T, H * D) viewed as (B, H, T, D) without a copy: batch stride T H D, head stride D,
// row stride H D. Kernels take one HeadLayout per operand, so the projections feed attention and
// its output feeds the output projection with no transpose copies in between.
#pragma once

#include <cstdint>

namespace moa {

// Row t of head h of batch b starts at base + b * batch + h * head + t * row (in elements).
// All three zero means the contiguous layout, batch = H T D, head = T D, row = D (resolved by the
// kernels' launchers with resolve()).
struct HeadLayout {
  int64_t batch = 0, head = 0, row = 0;

  bool is_default() const { return batch == 0 && head == 0 && row == 0; }
  static HeadLayout contiguous(int64_t H, int64_t T, int64_t D) { return {H * T * D, T * D, D}; }
  // This layout, or the contiguous one for (H, T, D) when it is the default.
  HeadLayout resolve(int64_t H, int64_t T, int64_t D) const { return is_default() ? contiguous(H, T, D) : *this; }
  // Whether rows are whole contiguous (B, H, T, D) blocks of D with nothing between them.
  bool is_contiguous(int64_t H, int64_t T, int64_t D) const {
    const HeadLayout c = contiguous(H, T, D);
    return is_default() || (batch == c.batch && head == c.head && row == c.row);
  }
};

// The layouts of every operand of a causal attention call: q, out, dout, dq are (B, Hq, Tq, D);
// k, v, dk, dv are (B, Hkv, Tk, D). Defaults: all contiguous.
struct AttentionLayouts {
  HeadLayout q, k, v, out, dout, dq, dk, dv;

  // Every default layout replaced by the contiguous one of its shape.
  AttentionLayouts resolve(int64_t Hq, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D) const {
    return {q.resolve(Hq, Tq, D),    k.resolve(Hkv, Tk, D), v.resolve(Hkv, Tk, D),  out.resolve(Hq, Tq, D),
            dout.resolve(Hq, Tq, D), dq.resolve(Hq, Tq, D), dk.resolve(Hkv, Tk, D), dv.resolve(Hkv, Tk, D)};
  }
};

}  // namespace moa
