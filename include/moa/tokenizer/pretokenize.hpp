// moa/tokenizer/pretokenize.hpp: the pre-tokenisation regexes of GPT-2, Llama-3 and Qwen2, written
// by hand (no std::regex: too slow, and no \p{..} classes), plus HF's `Digits` splitter.
//
// GPT-2 (OpenAI encoder.py, HF ByteLevel with use_regex):
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Llama-3 (Qwen2 is the same with \p{N} instead of \p{N}{1,3}):
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
// Each matcher returns the end of the leftmost-first match at position i; the alternatives cover
// every code point, so splitting is a partition of the text. Classes are those of utf8.hpp
// (invalid UTF-8 bytes are single `other` code points). The only case folding (?i) needs here is
// s/S/U+017F (long s); the other contraction letters have no non-ASCII case variants.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "moa/tokenizer/utf8.hpp"

namespace moa {

// The split regexes supported; anything else in a tokenizer.json is a ValueError.
enum class SplitPattern { gpt2, llama3, qwen2 };

namespace detail {

// The byte index after the run of code points of class `k` starting at i.
inline std::size_t run_of(std::string_view s, std::size_t i, CharClass k) {
  const std::size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      if (kAsciiClasses[c] != k) break;
      ++i;
    } else {
      const Utf8Char u = utf8_next(s, i);
      if (char_class(u) != k) break;
      i += u.len;
    }
  }
  return i;
}

// \s+(?!\S)|\s+ at i (s[i] is whitespace): the whole run when it ends the text or is one code point
// long, else the run without its last code point (which then prefixes the next word).
inline std::size_t match_space_run(std::string_view s, std::size_t i) {
  std::size_t j = i, last = i, count = 0;
  while (j < s.size()) {
    const Utf8Char u = utf8_next(s, j);
    if (char_class(u) != CharClass::space) break;
    last = j;
    j += u.len;
    ++count;
  }
  if (j == s.size() || count == 1) return j;
  return last;
}

inline std::size_t match_gpt2(std::string_view s, std::size_t i) {
  const std::size_t n = s.size();
  const char c = s[i];
  if (c == '\'' && i + 1 < n) {
    const char c1 = s[i + 1];
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
    if (i + 2 < n) {
      const char c2 = s[i + 2];
      if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return i + 3;
    }
  }
  std::size_t j = i;
  if (c == ' ' && i + 1 < n) j = i + 1;  // ` ?` then a letter / number / other run
  const Utf8Char u = utf8_next(s, j);
  const CharClass k = char_class(u);
  if (k != CharClass::space) return run_of(s, j + u.len, k);
  return match_space_run(s, i);
}

inline bool is_cr_lf(char c) { return c == '\r' || c == '\n'; }

// (?i:'s|'t|'re|'ve|'m|'ll|'d): the length matched after the apostrophe at i, or 0.
inline std::size_t match_contraction_ci(std::string_view s, std::size_t i) {
  const std::size_t n = s.size();
  if (i + 1 >= n) return 0;
  auto lower = [](char ch) { return static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch); };
  const char c1 = lower(s[i + 1]);
  if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
  if (static_cast<unsigned char>(s[i + 1]) == 0xC5 && i + 2 < n && static_cast<unsigned char>(s[i + 2]) == 0xBF)
    return 3;  // U+017F LATIN SMALL LETTER LONG S folds to s
  if (i + 2 < n) {
    const char c2 = lower(s[i + 2]);
    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
  }
  return 0;
}

inline std::size_t match_llama3(std::string_view s, std::size_t i, int max_digits) {
  const std::size_t n = s.size();
  if (s[i] == '\'') {
    if (const std::size_t m = match_contraction_ci(s, i)) return i + m;
  }
  const Utf8Char u = utf8_next(s, i);
  const CharClass k = char_class(u);
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (k == CharClass::letter) return run_of(s, i + u.len, CharClass::letter);
  if (k != CharClass::number && !is_cr_lf(s[i]) && i + u.len < n) {
    const Utf8Char v = utf8_next(s, i + u.len);
    if (char_class(v) == CharClass::letter) return run_of(s, i + u.len + v.len, CharClass::letter);
  }
  // \p{N}{1,max}
  if (k == CharClass::number) {
    std::size_t j = i + u.len;
    for (int d = 1; d < max_digits && j < n; ++d) {
      const Utf8Char w = utf8_next(s, j);
      if (char_class(w) != CharClass::number) break;
      j += w.len;
    }
    return j;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n]*
  std::size_t j = i;
  if (s[i] == ' ' && i + 1 < n) j = i + 1;
  const Utf8Char w = j == i ? u : utf8_next(s, j);
  if (char_class(w) == CharClass::other) {
    j = run_of(s, j + w.len, CharClass::other);
    while (j < n && is_cr_lf(s[j])) ++j;
    return j;
  }
  // \s*[\r\n]+ : up to the last CR/LF of the whitespace run
  std::size_t e = i, last_nl = 0;
  bool has_nl = false;
  while (e < n) {
    const Utf8Char x = utf8_next(s, e);
    if (char_class(x) != CharClass::space) break;
    if (is_cr_lf(s[e])) has_nl = true, last_nl = e + 1;
    e += x.len;
  }
  if (has_nl) return last_nl;
  return match_space_run(s, i);
}

}  // namespace detail

// Calls f(piece) for each pre-token of `text` under `pattern`, in order; the pieces concatenate
// to `text`.
template <class F>
void split_pretokens(std::string_view text, SplitPattern pattern, F&& f) {
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t e;
    switch (pattern) {
      case SplitPattern::gpt2: e = detail::match_gpt2(text, i); break;
      case SplitPattern::llama3: e = detail::match_llama3(text, i, 3); break;
      default: e = detail::match_llama3(text, i, 1); break;
    }
    f(text.substr(i, e - i));
    i = e;
  }
}

// HF's `Digits` pre-tokenizer: runs of \p{N} (each digit alone when `individual`) and the runs of
// everything else between them.
template <class F>
void split_digits(std::string_view text, bool individual, F&& f) {
  std::size_t i = 0;
  while (i < text.size()) {
    const detail::Utf8Char u = detail::utf8_next(text, i);
    const bool num = detail::char_class(u) == detail::CharClass::number;
    std::size_t e = i + u.len;
    if (!num) {
      while (e < text.size()) {
        const detail::Utf8Char v = detail::utf8_next(text, e);
        if (detail::char_class(v) == detail::CharClass::number) break;
        e += v.len;
      }
    } else if (!individual) {
      e = detail::run_of(text, e, detail::CharClass::number);
    }
    f(text.substr(i, e - i));
    i = e;
  }
}

}  // namespace moa
