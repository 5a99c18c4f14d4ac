// moa/core/shape.hpp: shapes, strides and broadcasting rules.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moa/core/error.hpp"

namespace moa {

using Shape = std::vector<int64_t>;
using Strides = std::vector<int64_t>;

inline std::string shape_str(const Shape& s) { return detail::cat(s); }

inline int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// Row-major (C order) strides of a contiguous tensor, in elements.
inline Strides contiguous_strides(const Shape& s) {
  Strides st(s.size());
  int64_t acc = 1;
  for (std::size_t i = s.size(); i-- > 0;) {
    st[i] = acc;
    acc *= s[i] > 0 ? s[i] : 1;
  }
  return st;
}

// Normalises a possibly negative axis into [0, rank); throws IndexError naming `op`.
inline int64_t normalize_axis(int64_t axis, int64_t rank, const char* op) {
  const int64_t a = axis < 0 ? axis + rank : axis;
  MOA_CHECK(a >= 0 && a < rank, IndexError, op, ": axis ", axis, " is out of range for a tensor of rank ",
            rank, " (expected ", -rank, " <= axis < ", rank, ")");
  return a;
}

// NumPy broadcasting: shapes align on the right; a dimension of 1 stretches.
inline Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  const std::size_t n = a.size() > b.size() ? a.size() : b.size();
  Shape out(n);
  for (std::size_t i = 0; i < n; ++i) {
    const int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    const int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    MOA_CHECK(da == db || da == 1 || db == 1, ShapeError, op, ": shapes ", shape_str(a), " and ", shape_str(b),
              " cannot be broadcast (expected equal sizes or 1 in dimension ", i, ", got ", da, " and ", db, ")");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Strides that read a tensor of `shape`/`strides` as if it had `target` shape (stride 0 where broadcast).
inline Strides broadcast_strides(const Shape& shape, const Strides& strides, const Shape& target) {
  Strides out(target.size(), 0);
  const std::size_t off = target.size() - shape.size();
  for (std::size_t i = 0; i < shape.size(); ++i) out[off + i] = shape[i] == 1 ? 0 : strides[i];
  return out;
}

namespace detail {

// The multi-index of flat position `flat` in `shape`, e.g. [1, 3] (for error messages).
inline std::vector<int64_t> unravel_index(int64_t flat, const Shape& shape) {
  std::vector<int64_t> idx(shape.size());
  for (std::size_t d = shape.size(); d-- > 0;) {
    idx[d] = shape[d] > 0 ? flat % shape[d] : 0;
    flat = shape[d] > 0 ? flat / shape[d] : 0;
  }
  return idx;
}

}  // namespace detail
}  // namespace moa
