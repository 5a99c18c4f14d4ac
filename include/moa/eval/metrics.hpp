// moa/eval/metrics.hpp: evaluation metrics with exact parity to the Python references:
// corpus BLEU as sacreBLEU 2.x `BLEU()` computes it (13a tokenizer, exp smoothing), ROUGE-L as
// Google's rouge_score `RougeScorer(['rougeL'])` computes it, perplexity, a routing confusion
// report, and a line reader for hypothesis / reference files.
//
// Text is UTF-8 bytes. Both references work on Python str (code points); every pattern they apply
// is ASCII except Python's whitespace (str.split / str.rstrip) and str.lower(), which are handled
// here code point by code point, so byte-wise processing gives the same tokens on valid UTF-8.
// Invalid UTF-8 (which the references cannot even receive) passes through byte by byte: in BLEU
// each stray byte is a non-space character, in ROUGE a separator.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include "moa/core/error.hpp"

namespace moa::eval {

namespace detail {

using moa::detail::cat;

// The length in bytes of the Python whitespace code point (str.isspace(), what str.split() and
// str.rstrip() remove) starting at s[i], or 0 if there is none. The set, for Python 3.11:
// U+0009..000D, U+001C..001F, U+0020, U+0085, U+00A0, U+1680, U+2000..200A, U+2028, U+2029,
// U+202F, U+205F, U+3000. Note U+001C..001F (file / group / record / unit separators) count.
inline std::size_t py_space_len(std::string_view s, std::size_t i) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const std::size_t left = s.size() - i;
  const unsigned char b0 = b(0);
  if ((b0 >= 0x09 && b0 <= 0x0D) || (b0 >= 0x1C && b0 <= 0x20)) return 1;
  if (b0 == 0xC2 && left >= 2 && (b(1) == 0x85 || b(1) == 0xA0)) return 2;
  if (left < 3) return 0;
  if (b0 == 0xE1 && b(1) == 0x9A && b(2) == 0x80) return 3;  // U+1680
  if (b0 == 0xE2 && b(1) == 0x80 &&
      ((b(2) >= 0x80 && b(2) <= 0x8A) || b(2) == 0xA8 || b(2) == 0xA9 || b(2) == 0xAF))
    return 3;  // U+2000..200A, U+2028, U+2029, U+202F
  if (b0 == 0xE2 && b(1) == 0x81 && b(2) == 0x9F) return 3;  // U+205F
  if (b0 == 0xE3 && b(1) == 0x80 && b(2) == 0x80) return 3;  // U+3000
  return 0;
}

// Python's s.split(): the maximal runs of non-whitespace code points. A whitespace sequence can
// only start at a lead byte, never inside a multi-byte character, so stepping over other
// characters byte by byte is safe.
inline std::vector<std::string> py_split(std::string_view s) {
  std::vector<std::string> out;
  std::size_t i = 0, start = 0;
  bool in_token = false;
  while (i < s.size()) {
    if (const std::size_t n = py_space_len(s, i)) {
      if (in_token) out.emplace_back(s.substr(start, i - start));
      in_token = false;
      i += n;
    } else {
      if (!in_token) start = i;
      in_token = true;
      ++i;
    }
  }
  if (in_token) out.emplace_back(s.substr(start));
  return out;
}

// Python's s.rstrip().
inline std::string_view py_rstrip(std::string_view s) {
  std::size_t i = 0, end = 0;
  while (i < s.size()) {
    if (const std::size_t n = py_space_len(s, i)) {
      i += n;
    } else {
      end = ++i;
    }
  }
  return s.substr(0, end);
}

// Python's s.replace(from, to): one left-to-right pass; what a replacement creates is not
// looked at again ("<skip<skipped>ped>" becomes "<skipped>").
inline std::string py_replace(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  std::size_t pos = 0;
  for (std::size_t hit = s.find(from); hit != std::string_view::npos; hit = s.find(from, pos)) {
    out.append(s.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(s.substr(pos));
  return out;
}

inline bool is_digit(char c) { return c >= '0' && c <= '9'; }

// sacreBLEU's TokenizerRegexp's first class, [\{-\~\[-\`-\&\(-\+\:-\@\/]: the ASCII punctuation
// and the space, except ' , - . (those are handled by the next rules or not at all).
inline bool is_13a_split_char(char c) {
  return (c >= '{' && c <= '~') || (c >= '[' && c <= '`') || (c >= ' ' && c <= '&') ||
         (c >= '(' && c <= '+') || (c >= ':' && c <= '@') || c == '/';
}

// The 13a tokens of a line: Tokenizer13a()(line).split().
inline std::vector<std::string> tokens_13a(std::string_view line) {
  // The language-independent part, in sacreBLEU's order (each a separate pass).
  std::string s = py_replace(line, "<skipped>", "");
  s = py_replace(s, "-\n", "");
  s = py_replace(s, "\n", " ");
  if (s.find('&') != std::string::npos) {
    s = py_replace(s, "&quot;", "\"");
    s = py_replace(s, "&amp;", "&");
    s = py_replace(s, "&lt;", "<");
    s = py_replace(s, "&gt;", ">");
  }
  s = " " + s + " ";

  // Each regex is one re.sub pass: matches are found left to right and do not overlap. All the
  // classes are ASCII ([^0-9] is "anything but an ASCII digit"), and every match involves an
  // ASCII character next to the other one, so matching bytes finds the same matches as matching
  // code points in valid UTF-8.
  std::string t;
  t.reserve(s.size() * 2);
  // ([\{-\~\[-\` -\&\(-\+\:-\@\/]) -> " \1 "
  for (const char c : s) {
    if (is_13a_split_char(c)) {
      t += ' ';
      t += c;
      t += ' ';
    } else {
      t += c;
    }
  }
  // A pass of a two-character pattern (a, b) -> replacement built by `emit`.
  const auto pass = [](const std::string& in, auto&& match, auto&& emit) {
    std::string out;
    out.reserve(in.size() + in.size() / 2);
    std::size_t i = 0;
    while (i < in.size()) {
      if (i + 1 < in.size() && match(in[i], in[i + 1])) {
        emit(out, in[i], in[i + 1]);
        i += 2;
      } else {
        out += in[i++];
      }
    }
    return out;
  };
  const auto is_period_comma = [](char c) { return c == '.' || c == ','; };
  // ([^0-9])([\.,]) -> "\1 \2 ": a period or comma not preceded by a digit.
  t = pass(
      t, [&](char a, char b) { return !is_digit(a) && is_period_comma(b); },
      [](std::string& o, char a, char b) {
        o += a;
        o += ' ';
        o += b;
        o += ' ';
      });
  // ([\.,])([^0-9]) -> " \1 \2": a period or comma not followed by a digit.
  t = pass(
      t, [&](char a, char b) { return is_period_comma(a) && !is_digit(b); },
      [](std::string& o, char a, char b) {
        o += ' ';
        o += a;
        o += ' ';
        o += b;
      });
  // ([0-9])(-) -> "\1 \2 ": a dash preceded by a digit.
  t = pass(
      t, [](char a, char b) { return is_digit(a) && b == '-'; },
      [](std::string& o, char a, char b) {
        o += a;
        o += ' ';
        o += b;
        o += ' ';
      });
  return py_split(t);
}

inline std::string join_tokens(const std::vector<std::string>& tokens) {
  std::string out;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (i) out += ' ';
    out += tokens[i];
  }
  return out;
}

inline constexpr std::size_t kBleuMaxOrder = 4;

// The sufficient statistics of BLEU, summed over segments.
struct BleuStats {
  int64_t sys_len = 0, ref_len = 0;
  std::array<int64_t, kBleuMaxOrder> correct{};  // matched n-grams, n = 1..4
  std::array<int64_t, kBleuMaxOrder> total{};    // hypothesis n-grams, n = 1..4
};

// Counts of every n-gram, n = 1..4, keyed by its tokens joined with ' ' (tokens hold no
// whitespace, so the key is unambiguous and also tells the order).
inline std::unordered_map<std::string, int64_t> ngram_counts(const std::vector<std::string>& tokens) {
  std::unordered_map<std::string, int64_t> counts;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    std::string key = tokens[i];
    ++counts[key];
    for (std::size_t n = 2; n <= kBleuMaxOrder && i + n <= tokens.size(); ++n) {
      key += ' ';
      key += tokens[i + n - 1];
      ++counts[key];
    }
  }
  return counts;
}

inline std::size_t ngram_order(const std::string& key) {
  std::size_t n = 1;
  for (const char c : key) n += c == ' ';
  return n;
}

// One segment, one reference: BLEU._compute_segment_statistics on preprocessed (rstripped,
// 13a-tokenised) text.
inline void add_bleu_segment(BleuStats& st, std::string_view hyp, std::string_view ref) {
  const std::vector<std::string> h = tokens_13a(py_rstrip(hyp));
  const std::vector<std::string> r = tokens_13a(py_rstrip(ref));
  st.sys_len += static_cast<int64_t>(h.size());
  st.ref_len += static_cast<int64_t>(r.size());
  const auto ref_counts = ngram_counts(r);
  for (const auto& [key, count] : ngram_counts(h)) {
    const std::size_t n = ngram_order(key) - 1;
    st.total[n] += count;
    if (const auto it = ref_counts.find(key); it != ref_counts.end()) st.correct[n] += std::min(count, it->second);
  }
}

// sacrebleu's my_log: log, with 0 mapped to -9999999999 (so that exp of the mean is 0).
inline double floored_log(double x) { return x == 0.0 ? -9999999999.0 : std::log(x); }

// BLEU.compute_bleu with smooth_method='exp', effective_order=False, max order 4; the floating
// point operations in the same order as the Python, so the results agree to the last bit.
inline void finish_bleu(const BleuStats& st, double& score, std::vector<double>& precisions, double& bp) {
  bp = 1.0;
  if (st.sys_len < st.ref_len)
    bp = st.sys_len > 0 ? std::exp(1.0 - static_cast<double>(st.ref_len) / static_cast<double>(st.sys_len)) : 0.0;
  precisions.assign(kBleuMaxOrder, 0.0);
  bool any_correct = false;
  for (const int64_t c : st.correct) any_correct = any_correct || c != 0;
  if (!any_correct) {  // sacreBLEU returns early (its issue #141): score 0, precisions all 0
    score = 0.0;
    return;
  }
  double smooth = 1.0;
  for (std::size_t n = 0; n < kBleuMaxOrder; ++n) {
    if (st.total[n] == 0) break;  // no n-grams of this order or above: their precision stays 0
    const auto total = static_cast<double>(st.total[n]);
    if (st.correct[n] == 0) {
      smooth *= 2.0;
      precisions[n] = 100.0 / (smooth * total);
    } else {
      precisions[n] = 100.0 * static_cast<double>(st.correct[n]) / total;
    }
  }
  double sum = 0.0;
  for (const double p : precisions) sum += floored_log(p);
  score = bp * std::exp(sum / static_cast<double>(kBleuMaxOrder));
}

}  // namespace detail

// ---- BLEU ----------------------------------------------------------------------------------

struct BleuResult {
  double score = 0.0;               // 0..100, as sacreBLEU prints it
  std::vector<double> precisions;   // (4) n-gram precisions in percent, smoothed ('exp')
  double bp = 0.0;                  // brevity penalty
  double ratio = 0.0;               // sys_len / ref_len, 0 when ref_len is 0
  int64_t sys_len = 0, ref_len = 0; // tokens in the hypotheses / references
  std::vector<int64_t> counts;      // (4) matched n-grams, clipped by the reference counts
  std::vector<int64_t> totals;      // (4) n-grams in the hypotheses
};

// sacreBLEU's 13a tokenisation (mteval-v13a, the WMT standard): Tokenizer13a()(line), tokens
// joined with single spaces. corpus_bleu applies it to the right-stripped line.
inline std::string tokenize_13a(std::string_view line) { return detail::join_tokens(detail::tokens_13a(line)); }

// Corpus BLEU-4 with one reference per hypothesis, as sacreBLEU 2.x computes
// BLEU().corpus_score(hyps, [refs]) with its defaults: tokenize='13a', smooth_method='exp',
// lowercase=False, effective_order=False. n-gram matches are summed over the corpus before the
// precisions are taken (not an average of sentence scores).
inline BleuResult corpus_bleu(const std::vector<std::string>& hyps, const std::vector<std::string>& refs) {
  MOA_CHECK(hyps.size() == refs.size(), ValueError, "corpus_bleu: expected one reference per hypothesis (",
            hyps.size(), " references), found ", refs.size(), " references");
  // sacreBLEU fails on an empty corpus too (IndexError); the score is undefined.
  MOA_CHECK(!hyps.empty(), ValueError, "corpus_bleu: expected at least one hypothesis, found an empty corpus");
  detail::BleuStats st;
  for (std::size_t i = 0; i < hyps.size(); ++i) detail::add_bleu_segment(st, hyps[i], refs[i]);
  BleuResult r;
  detail::finish_bleu(st, r.score, r.precisions, r.bp);
  r.sys_len = st.sys_len;
  r.ref_len = st.ref_len;
  r.ratio = st.ref_len ? static_cast<double>(st.sys_len) / static_cast<double>(st.ref_len) : 0.0;
  r.counts.assign(st.correct.begin(), st.correct.end());
  r.totals.assign(st.total.begin(), st.total.end());
  return r;
}

// ---- ROUGE-L -------------------------------------------------------------------------------

struct RougeScore {
  double precision = 0.0;  // LCS / hypothesis tokens
  double recall = 0.0;     // LCS / reference tokens
  double fmeasure = 0.0;   // 2 P R / (P + R), 0 when P + R is 0
};

// rouge_score's default tokenizer (use_stemmer=False): Python str.lower(), every run of
// characters outside [a-z0-9] becomes a separator, empty tokens dropped. Non-ASCII characters are
// separators ("café" gives "caf", CJK gives nothing), except the two whose Python lower() is
// ASCII: U+0130 (İ, lowers to "i" + U+0307, so it gives "i" and then a separator) and U+212A (the
// Kelvin sign, lowers to "k").
inline std::vector<std::string> rouge_tokenize(std::string_view text) {
  std::vector<std::string> out;
  std::string cur;
  const auto flush = [&] {
    if (!cur.empty()) out.push_back(std::move(cur));
    cur.clear();
  };
  std::size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    const auto u = [&](std::size_t k) { return static_cast<unsigned char>(text[i + k]); };
    if ((c >= 'a' && c <= 'z') || detail::is_digit(c)) {
      cur += c;
      ++i;
    } else if (c >= 'A' && c <= 'Z') {
      cur += static_cast<char>(c - 'A' + 'a');
      ++i;
    } else if (u(0) == 0xC4 && i + 1 < text.size() && u(1) == 0xB0) {  // U+0130
      cur += 'i';
      flush();
      i += 2;
    } else if (u(0) == 0xE2 && i + 2 < text.size() && u(1) == 0x84 && u(2) == 0xAA) {  // U+212A
      cur += 'k';
      i += 3;
    } else {
      flush();
      ++i;
    }
  }
  flush();
  return out;
}

// ROUGE-L of one pair, as rouge_scorer.RougeScorer(['rougeL']).score(target=ref, prediction=hyp):
// all zero when either side has no tokens.
inline RougeScore rouge_l(std::string_view hyp, std::string_view ref) {
  const std::vector<std::string> h = rouge_tokenize(hyp), r = rouge_tokenize(ref);
  if (h.empty() || r.empty()) return {};
  // Tokens to ids, so the O(|r| |h|) table compares integers.
  std::unordered_map<std::string, int32_t> ids;
  const auto to_ids = [&](const std::vector<std::string>& toks) {
    std::vector<int32_t> v;
    v.reserve(toks.size());
    for (const auto& t : toks) v.push_back(ids.emplace(t, static_cast<int32_t>(ids.size())).first->second);
    return v;
  };
  const std::vector<int32_t> hi = to_ids(h), ri = to_ids(r);
  // The LCS table row by row: prev (|h| + 1) is row i - 1, cur row i.
  std::vector<int64_t> prev(hi.size() + 1, 0), cur(hi.size() + 1, 0);
  for (std::size_t a = 0; a < ri.size(); ++a) {
    for (std::size_t b = 1; b <= hi.size(); ++b)
      cur[b] = ri[a] == hi[b - 1] ? prev[b - 1] + 1 : std::max(prev[b], cur[b - 1]);
    std::swap(prev, cur);
  }
  const auto lcs = static_cast<double>(prev[hi.size()]);
  RougeScore s;
  s.precision = lcs / static_cast<double>(hi.size());
  s.recall = lcs / static_cast<double>(ri.size());
  if (s.precision + s.recall > 0) s.fmeasure = 2 * s.precision * s.recall / (s.precision + s.recall);
  return s;
}

inline double rouge_l_f(std::string_view hyp, std::string_view ref) { return rouge_l(hyp, ref).fmeasure; }

// The mean ROUGE-L F-measure over pairs (summed in order, then divided by the count).
inline double corpus_rouge_l_f(const std::vector<std::string>& hyps, const std::vector<std::string>& refs) {
  MOA_CHECK(hyps.size() == refs.size(), ValueError, "corpus_rouge_l_f: expected one reference per hypothesis (",
            hyps.size(), " references), found ", refs.size(), " references");
  MOA_CHECK(!hyps.empty(), ValueError, "corpus_rouge_l_f: expected at least one hypothesis, found an empty corpus");
  double sum = 0.0;
  for (std::size_t i = 0; i < hyps.size(); ++i) sum += rouge_l_f(hyps[i], refs[i]);
  return sum / static_cast<double>(hyps.size());
}

// ---- Perplexity ----------------------------------------------------------------------------

// exp(total_nll / n_tokens): total_nll is the summed negative log-likelihood in nats.
inline double perplexity(double total_nll, int64_t n_tokens) {
  MOA_CHECK(n_tokens > 0, ValueError, "perplexity: expected n_tokens > 0, got ", n_tokens);
  MOA_CHECK(!std::isnan(total_nll), ValueError, "perplexity: expected a total NLL that is a number, got NaN");
  return std::exp(total_nll / static_cast<double>(n_tokens));
}

// ---- Routing -------------------------------------------------------------------------------

// How a router's choices compare with the true classes (tasks, experts) of the samples.
struct RoutingReport {
  int64_t n_classes = 0;
  int64_t n_samples = 0;
  int64_t n_correct = 0;
  std::vector<std::vector<int64_t>> confusion;  // (n_classes, n_classes): [truth][predicted] counts
  std::vector<int64_t> support;                 // (n_classes): samples whose truth is the class
  std::vector<double> per_class_accuracy;       // (n_classes): recall, correct / support; 0 if no support
  double accuracy = 0.0;                        // n_correct / n_samples
};

inline RoutingReport routing_report(const std::vector<int32_t>& predicted, const std::vector<int32_t>& truth,
                                    int64_t n_classes) {
  MOA_CHECK(n_classes > 0, ValueError, "routing_report: expected n_classes > 0, got ", n_classes);
  MOA_CHECK(predicted.size() == truth.size(), ShapeError,
            "routing_report: expected as many predicted labels as true labels, got ", predicted.size(),
            " predicted and ", truth.size(), " true");
  MOA_CHECK(!truth.empty(), ValueError, "routing_report: expected at least one sample, got none");
  RoutingReport rep;
  rep.n_classes = n_classes;
  rep.n_samples = static_cast<int64_t>(truth.size());
  const auto C = static_cast<std::size_t>(n_classes);
  rep.confusion.assign(C, std::vector<int64_t>(C, 0));
  rep.support.assign(C, 0);
  rep.per_class_accuracy.assign(C, 0.0);
  for (std::size_t i = 0; i < truth.size(); ++i) {
    MOA_CHECK(truth[i] >= 0 && truth[i] < n_classes, IndexError, "routing_report: true label ", truth[i],
              " at position ", i, " is out of range [0, ", n_classes, ")");
    MOA_CHECK(predicted[i] >= 0 && predicted[i] < n_classes, IndexError, "routing_report: predicted label ",
              predicted[i], " at position ", i, " is out of range [0, ", n_classes, ")");
    const auto t = static_cast<std::size_t>(truth[i]), p = static_cast<std::size_t>(predicted[i]);
    ++rep.confusion[t][p];
    ++rep.support[t];
    rep.n_correct += t == p;
  }
  for (std::size_t c = 0; c < C; ++c)
    if (rep.support[c] > 0)
      rep.per_class_accuracy[c] = static_cast<double>(rep.confusion[c][c]) / static_cast<double>(rep.support[c]);
  rep.accuracy = static_cast<double>(rep.n_correct) / static_cast<double>(rep.n_samples);
  return rep;
}

// ---- Files ---------------------------------------------------------------------------------

// The lines of a text file, one segment each (as sacreBLEU reads hypothesis / reference files):
// split at '\n', one trailing '\r' removed from each line, no extra empty segment after a final
// '\n' ("a\nb\n" and "a\nb" both give {"a", "b"}; an empty file gives none). Bytes are kept as
// they are (no BOM removal, no Unicode checks).
inline std::vector<std::string> read_lines(const std::filesystem::path& path) {
  std::error_code ec;
  MOA_CHECK(std::filesystem::is_regular_file(path, ec), IOError, "read_lines: expected a file at ", path.string(),
            ", found ", (std::filesystem::exists(path, ec) ? "something that is not a regular file" : "nothing"));
  std::ifstream in(path, std::ios::binary);
  MOA_CHECK(in.good(), IOError, "read_lines: expected to open ", path.string(), " for reading, got an error");
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MOA_CHECK(!in.bad(), IOError, "read_lines: expected to read ", path.string(), ", got a read error");
  std::vector<std::string> lines;
  std::size_t pos = 0;
  while (pos < data.size()) {
    std::size_t nl = data.find('\n', pos);
    if (nl == std::string::npos) nl = data.size();
    std::size_t end = nl;
    if (end > pos && data[end - 1] == '\r') --end;
    lines.emplace_back(data, pos, end - pos);
    pos = nl + 1;
  }
  return lines;
}

}  // namespace moa::eval
