// moa/core/dtype.hpp: element types and devices a tensor can have.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "moa/core/error.hpp"

namespace moa {

// One element converted between the arithmetic dtypes (f32, f64, i32), the same on the host and in
// the device kernels: a floating value to i32 rounds toward zero and saturates at the int32 range,
// NaN gives 0 (what a GPU's conversion does; a plain cast of an out-of-range value is undefined
// behaviour in C++). Everything else is the ordinary conversion.
template <class D, class S>
constexpr D convert_value(S v) {
  if constexpr (std::is_same_v<D, std::int32_t> && std::is_floating_point_v<S>) {
    if (!(v == v)) return 0;
    if (v >= S(2147483648.0)) return INT32_MAX;
    if (v <= S(-2147483648.0)) return INT32_MIN;
    return static_cast<std::int32_t>(v);
  } else {
    return static_cast<D>(v);
  }
}

// f32 is the working type; f64 exists for gradient checks in double precision;
// i32 holds token ids and indices; bf16 is reserved for mixed precision (storage only for now).
enum class DType : std::uint8_t { f32, f64, i32, bf16 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
    case DType::bf16: return "bf16";
  }
  return "?";
}

inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::i32: return 4;
    case DType::bf16: return 2;
  }
  return 0;
}

inline bool is_floating(DType t) { return t == DType::f32 || t == DType::f64 || t == DType::bf16; }

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr DType value = DType::f32;
};
template <>
struct dtype_of<double> {
  static constexpr DType value = DType::f64;
};
template <>
struct dtype_of<std::int32_t> {
  static constexpr DType value = DType::i32;
};

enum class DeviceType : std::uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  friend bool operator==(const Device&, const Device&) = default;
  static Device cpu() { return {}; }
  static Device cuda(int i = 0) { return {DeviceType::cuda, i}; }
  std::string str() const { return type == DeviceType::cpu ? "cpu" : "cuda:" + std::to_string(index); }
};

namespace detail {

// Calls f.template operator()<T>() for the floating type T of `t`; other dtypes throw ValueError naming `op`.
template <class F>
decltype(auto) dispatch_float(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::f32: return f.template operator()<float>();
    case DType::f64: return f.template operator()<double>();
    default: break;
  }
  throw ValueError(cat(op, ": expected a floating tensor of dtype f32 or f64, got ", dtype_name(t)));
}

}  // namespace detail
}  // namespace moa
