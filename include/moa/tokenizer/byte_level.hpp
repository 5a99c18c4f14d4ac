// moa/tokenizer/byte_level.hpp: GPT-2's byte <-> printable-character mapping, in which byte-level
// BPE vocabularies (encoder.json, tokenizer.json) spell their tokens.
//
// The printable bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF stand for themselves (as code points);
// the other 68 bytes, in increasing order, become U+0100, U+0101, ... (so ' ' is 'Ġ', '\n' 'Ċ').
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "moa/tokenizer/utf8.hpp"

namespace moa::detail {

struct ByteLevelTables {
  std::array<std::uint16_t, 256> byte_to_cp{};
  std::array<std::int16_t, 512> cp_to_byte{};  // -1 where no byte maps to the code point
  std::array<std::string, 256> byte_to_utf8{};
};

inline const ByteLevelTables& byte_level_tables() {
  static const ByteLevelTables t = [] {
    ByteLevelTables r;
    r.cp_to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const int cp = printable ? b : 256 + extra++;
      r.byte_to_cp[b] = static_cast<std::uint16_t>(cp);
      r.cp_to_byte[cp] = static_cast<std::int16_t>(b);
      utf8_append(r.byte_to_utf8[b], static_cast<std::uint32_t>(cp));
    }
    return r;
  }();
  return t;
}

// Raw bytes -> their byte-level spelling ("hello world" -> "helloĠworld").
inline std::string bytes_to_byte_level(std::string_view raw) {
  const auto& t = byte_level_tables();
  std::string out;
  out.reserve(raw.size() * 2);
  for (char c : raw) out += t.byte_to_utf8[static_cast<unsigned char>(c)];
  return out;
}

// Byte-level spelling -> raw bytes; false when `s` holds a character outside the mapping.
inline bool byte_level_to_bytes(std::string_view s, std::string& out) {
  const auto& t = byte_level_tables();
  out.clear();
  for (std::size_t i = 0; i < s.size();) {
    const Utf8Char u = utf8_next(s, i);
    if (!u.valid || u.cp >= t.cp_to_byte.size() || t.cp_to_byte[u.cp] < 0) return false;
    out += static_cast<char>(t.cp_to_byte[u.cp]);
    i += u.len;
  }
  return true;
}

}  // namespace moa::detail
