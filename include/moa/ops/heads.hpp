// moa/ops/heads.hpp: (B, H, T, D) attention operands as views of projection outputs, shared by the
// ops that read and write them in place (causal_attention, rope): which tensors are read as they
// are, their HeadLayout (moa/core/head_layout.hpp), and outputs and gradients allocated in the row
// order of their inputs, so splitting and merging heads is a view and never a copy.
#pragma once

#include "moa/core/head_layout.hpp"
#include "moa/core/tensor.hpp"

namespace moa::detail {

// x (B, H, T, D) as attention and rope read it: x itself when each row's D values are contiguous
// and rows do not all alias (a head view of a projection output, a cache narrowed to its filled
// part), else a contiguous copy. Detached either way.
inline Tensor heads_in_place(const Tensor& x) {
  const bool rows_ok = x.size(3) <= 1 || x.stride(3) == 1;
  bool any = false;  // a layout of three zero strides would read as the default (contiguous) one
  for (int a = 0; a < 3; ++a) any = any || (x.size(a) > 1 && x.stride(a) != 0);
  const bool single_row = x.size(0) * x.size(1) * x.size(2) <= 1;
  return rows_ok && (any || single_row) ? x.detach() : x.detach().contiguous();
}

// The HeadLayout of a (B, H, T, D) tensor accepted by heads_in_place (axes of size 1 get the
// stride they would have in a contiguous tensor, so the layout is never the all-zero default by
// accident).
inline HeadLayout head_layout(const Tensor& x) {
  const HeadLayout c = HeadLayout::contiguous(x.size(1), x.size(2), x.size(3));
  return {x.size(0) > 1 ? x.stride(0) : c.batch, x.size(1) > 1 ? x.stride(1) : c.head,
          x.size(2) > 1 ? x.stride(2) : c.row};
}

// Whether x's rows of one position lie together (heads interleaved within a token: a projection
// output viewed as heads), rather than each head's rows together.
inline bool rows_first(const Tensor& x) { return x.size(1) > 1 && x.size(2) > 1 && x.stride(2) > x.stride(1); }

// An uninitialised (B, H, T, D) tensor: contiguous, or (rows_first) a (B, T, H, D) buffer seen
// as (B, H, T, D), whose transpose(1, 2) is contiguous.
inline Tensor empty_heads(int64_t B, int64_t H, int64_t T, int64_t D, bool rows_first, DType t, Device dev) {
  if (!rows_first) return Tensor::empty({B, H, T, D}, t, dev);
  return Tensor::empty({B, T, H, D}, t, dev).transpose(1, 2);
}

}  // namespace moa::detail
