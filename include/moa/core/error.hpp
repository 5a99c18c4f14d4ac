// moa/core/error.hpp: the exception family every moa function throws on bad input.
//
// Every message names the operation, what was expected and what was found, e.g.
//   [moa.shape_error] matmul: expected A (M, K) and B (K, N) with equal K, got A [2, 3] and B [4, 5]
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace moa {

// The base of every exception moa throws. `id()` is a short stable name ("shape_error").
class Error : public std::runtime_error {
 public:
  Error(std::string id, const std::string& what)
      : std::runtime_error("[moa." + id + "] " + what), id_(std::move(id)) {}
  explicit Error(const std::string& what) : Error("error", what) {}
  const std::string& id() const noexcept { return id_; }

 private:
  std::string id_;
};

// Shapes that do not fit the operation (mismatched, wrong rank, empty where not allowed).
class ShapeError : public Error {
 public:
  explicit ShapeError(const std::string& what) : Error("shape_error", what) {}
};

// An index out of range (a token id, an axis, an expert index).
class IndexError : public Error {
 public:
  explicit IndexError(const std::string& what) : Error("index_error", what) {}
};

// A value or argument outside what the operation accepts (a dtype, a probability, a NaN).
class ValueError : public Error {
 public:
  explicit ValueError(const std::string& what) : Error("value_error", what) {}
};

// Misuse of the autograd graph (backward twice through a freed graph, no gradient to give).
class AutogradError : public Error {
 public:
  explicit AutogradError(const std::string& what) : Error("autograd_error", what) {}
};

// A device that is not available or tensors on different devices.
class DeviceError : public Error {
 public:
  explicit DeviceError(const std::string& what) : Error("device_error", what) {}
};

// Files: missing, truncated, corrupted.
class IOError : public Error {
 public:
  explicit IOError(const std::string& what) : Error("io_error", what) {}
};

namespace detail {

template <class T>
void append_one(std::ostringstream& os, const std::vector<T>& v) {
  os << '[';
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << ']';
}
template <class T>
void append_one(std::ostringstream& os, const T& v) {
  os << v;
}

// Concatenates anything streamable (vectors print as [a, b, c]) into one string.
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (append_one(os, args), ...);
  return os.str();
}

}  // namespace detail
}  // namespace moa

// MOA_CHECK(cond, ErrorType, parts...): throw ErrorType(cat(parts...)) when cond is false.
#define MOA_CHECK(cond, ErrorType, ...)                          \
  do {                                                           \
    if (!(cond)) throw ErrorType(::moa::detail::cat(__VA_ARGS__)); \
  } while (0)
