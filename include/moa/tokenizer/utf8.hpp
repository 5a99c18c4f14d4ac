// moa/tokenizer/utf8.hpp: UTF-8 decoding and the letter / number / space classes of code points
// that the pre-tokenisation regexes use.
//
// Invalid UTF-8 (a stray continuation byte, a truncated or overlong sequence, a surrogate, a value
// above U+10FFFF) is not an error: each offending byte counts as one code point of class `other`
// (as U+FFFD would be), so byte-level BPE still encodes it and decode gives the same bytes back.
// The Python and Rust references only take valid strings, so there is nothing else to match.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "moa/tokenizer/unicode_tables.hpp"

namespace moa::detail {

// A decoded code point and how many bytes it took; `valid` false for a lone invalid byte.
struct Utf8Char {
  std::uint32_t cp;
  std::uint32_t len;
  bool valid;
};

// Decodes the code point starting at s[i] (i < s.size()).
inline Utf8Char utf8_next(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {b0, 1, true};
  std::uint32_t len = 0, cp = 0, min = 0;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, cp = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, cp = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, cp = b0 & 0x07, min = 0x10000;
  } else {
    return {0xFFFD, 1, false};
  }
  if (i + len > s.size()) return {0xFFFD, 1, false};
  for (std::uint32_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return {0xFFFD, 1, false};
    cp = (cp << 6) | (b & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {0xFFFD, 1, false};
  return {cp, len, true};
}

// Appends the UTF-8 encoding of cp (assumed a valid scalar value).
inline void utf8_append(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

inline constexpr std::array<CharClass, 128> make_ascii_classes() {
  std::array<CharClass, 128> t{};
  for (int c = 0; c < 128; ++c) {
    if (c >= '0' && c <= '9') t[c] = CharClass::number;
    else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) t[c] = CharClass::letter;
    else if (c == ' ' || (c >= '\t' && c <= '\r')) t[c] = CharClass::space;
    else t[c] = CharClass::other;
  }
  return t;
}
inline constexpr std::array<CharClass, 128> kAsciiClasses = make_ascii_classes();

// The class of a code point: \p{L}, \p{N}, \s (White_Space) or none of them.
inline CharClass char_class(std::uint32_t cp) {
  if (cp < 128) return kAsciiClasses[cp];
  auto it = std::upper_bound(kCodePointRanges.begin(), kCodePointRanges.end(), cp,
                             [](std::uint32_t c, const CodePointRange& r) { return c < r.first; });
  if (it == kCodePointRanges.begin()) return CharClass::other;
  --it;
  return cp <= it->last ? it->cls : CharClass::other;
}

// The class of a decoded char; invalid bytes are `other`.
inline CharClass char_class(const Utf8Char& c) { return c.valid ? char_class(c.cp) : CharClass::other; }

}  // namespace moa::detail
