// moa/core/half.hpp: 16-bit floating formats <-> f32, bit-exact: bfloat16 (bf16, the top half of an
// f32) and IEEE binary16 (f16). Narrowing rounds to nearest, ties to even; NaN stays NaN (quiet),
// infinities stay infinities; widening is exact.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

namespace moa {

inline float bf16_bits_to_f32(std::uint16_t h) { return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16); }

inline std::uint16_t f32_to_bf16_bits(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  const std::uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);  // ties to even
  return static_cast<std::uint16_t>((x + rounding) >> 16);
}

inline float f16_bits_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in f32
    const float v = static_cast<float>(mant) * 0x1.0p-24f;
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline std::uint16_t f32_to_f16_bits(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u)  // inf, or NaN (kept quiet, top mantissa bits kept)
    return static_cast<std::uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u));
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  // Rounds q + rem / 2^shift to nearest, ties to even.
  auto round_shift = [](std::uint32_t v, std::uint32_t shift) {
    const std::uint32_t q = v >> shift, rem = v & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  };
  const std::uint32_t e = a >> 23;
  if (e < 113) {  // below 2^-14: an f16 subnormal (or zero); value = m * 2^(e - 150), unit 2^-24
    if (e < 102) return static_cast<std::uint16_t>(sign);  // below 2^-25: rounds to zero
    const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;
    return static_cast<std::uint16_t>(sign | round_shift(m, 126u - e));
  }
  // Normal: rebias the exponent (127 -> 15) and round 23 mantissa bits to 10; a carry moves into
  // the exponent, which is the right result (up to 0x7c00 = inf, excluded above).
  const std::uint32_t v = ((e - 112u) << 23) | (a & 0x7fffffu);
  return static_cast<std::uint16_t>(sign | round_shift(v, 13u));
}

// Array forms, for loaders and savers.
inline void bf16_to_f32(const std::uint16_t* src, float* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_f32(src[i]);
}
inline void f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16_bits(src[i]);
}
inline void f16_to_f32(const std::uint16_t* src, float* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = f16_bits_to_f32(src[i]);
}
inline void f32_to_f16(const float* src, std::uint16_t* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = f32_to_f16_bits(src[i]);
}

}  // namespace moa
