// moa/tokenizer/bpe_trainer.hpp: learns a byte-level BPE vocabulary from a corpus (GPT-2's
// recipe: pre-tokenise, count pieces, repeatedly merge the most frequent adjacent pair).
//
// Layout of the result: ids 0..S-1 are the special tokens (in the order given), S..S+255 the 256
// bytes (in byte order), then one token per merge, in the order learned. Special tokens found in the
// corpus cut it (they are not learned from). Tie-breaking is deterministic: among pairs with the
// same count the one with the smaller left id wins, then the smaller right id (so older tokens win).
// A merge whose bytes equal an existing token's reuses that token. Training stops at vocab_size
// tokens or when no pair occurs min_frequency times.
//
// Pair counts are updated incrementally: a merge touches only the words that contain the pair
// (an index pair -> words) and, in them, only the neighbours of each occurrence; a lazy max-heap
// (stale entries are re-pushed with their current count when popped) picks the next pair.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <queue>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "moa/core/error.hpp"
#include "moa/tokenizer/bpe.hpp"
#include "moa/tokenizer/pair_map.hpp"

namespace moa {

struct BpeTrainerOptions {
  std::int32_t vocab_size = 8000;  // total: special tokens + 256 bytes + merges
  std::vector<std::string> special_tokens = {"<|endoftext|>"};
  std::int64_t min_frequency = 2;  // a pair seen fewer times is never merged
  std::vector<PreTokenizerStep> pre_tokenizer = gpt2_pre_tokenizer();
};

namespace detail {

struct TrainWord {
  std::vector<std::int32_t> syms;
  std::int64_t count = 0;
  std::int32_t stamp = -1;  // the last merge that visited this word
};

}  // namespace detail

// Trains on `corpus`, any range of things convertible to std::string_view.
template <class Corpus>
BpeTokenizer train_bpe(const Corpus& corpus, const BpeTrainerOptions& opts = {}) {
  const auto n_special = static_cast<std::int32_t>(opts.special_tokens.size());
  MOA_CHECK(opts.vocab_size >= n_special + 256, ValueError, "train_bpe: expected vocab_size >= ", n_special + 256,
            " (special tokens + 256 bytes), got ", opts.vocab_size);
  MOA_CHECK(opts.min_frequency >= 1, ValueError, "train_bpe: expected min_frequency >= 1, got ", opts.min_frequency);
  std::vector<AddedToken> added;
  for (std::int32_t i = 0; i < n_special; ++i) {
    const std::string& s = opts.special_tokens[static_cast<std::size_t>(i)];
    MOA_CHECK(!s.empty(), ValueError, "train_bpe: expected non-empty special tokens, got an empty one at ", i);
    for (const AddedToken& a : added)
      MOA_CHECK(a.content != s, ValueError, "train_bpe: expected distinct special tokens, got '", s, "' twice");
    added.push_back(AddedToken{.content = s, .id = i});
  }

  // 1. Count the pieces. Keys view the corpus or `arena` (pieces made by prefix-space steps).
  std::vector<std::string> vocab(static_cast<std::size_t>(n_special));
  for (int b = 0; b < 256; ++b) vocab.emplace_back(1, static_cast<char>(b));
  BpeOptions popts;
  popts.pre_tokenizer = opts.pre_tokenizer;
  const BpeTokenizer splitter(vocab, {}, {}, popts);
  std::unordered_map<std::string_view, std::int64_t> piece_count;
  std::deque<std::string> arena;
  for (const auto& item : corpus) {
    const std::string_view text(item);
    std::size_t start = 0;
    while (start <= text.size()) {
      std::size_t cut = std::string_view::npos, len = 0;
      for (const std::string& s : opts.special_tokens) {
        const std::size_t p = text.find(s, start);
        if (p < cut || (p == cut && p != std::string_view::npos && s.size() > len)) cut = p, len = s.size();
      }
      const std::string_view seg = text.substr(start, cut == std::string_view::npos ? std::string_view::npos : cut - start);
      for (std::string& piece : splitter.pre_tokenize(seg)) {
        if (piece.size() < 2) continue;  // no pairs
        auto it = piece_count.find(piece);
        if (it != piece_count.end()) {
          ++it->second;
        } else {
          arena.push_back(std::move(piece));
          piece_count.emplace(arena.back(), 1);
        }
      }
      if (cut == std::string_view::npos) break;
      start = cut + len;
    }
  }

  // 2. Words, pair counts, the pair -> words index.
  std::vector<detail::TrainWord> words;
  words.reserve(piece_count.size());
  for (const auto& [piece, count] : piece_count) {
    detail::TrainWord w;
    w.count = count;
    for (char c : piece) w.syms.push_back(n_special + static_cast<unsigned char>(c));
    words.push_back(std::move(w));
  }
  std::unordered_map<std::uint64_t, std::int64_t> counts;
  std::unordered_map<std::uint64_t, std::vector<std::int32_t>> where;
  for (std::size_t w = 0; w < words.size(); ++w) {
    const auto& s = words[w].syms;
    for (std::size_t i = 0; i + 1 < s.size(); ++i) {
      const std::uint64_t k = detail::pair_key(s[i], s[i + 1]);
      counts[k] += words[w].count;
      auto& list = where[k];
      if (list.empty() || list.back() != static_cast<std::int32_t>(w)) list.push_back(static_cast<std::int32_t>(w));
    }
  }
  // Max-heap on count, then min left id, then min right id.
  using Entry = std::tuple<std::int64_t, std::int32_t, std::int32_t>;
  auto worse = [](const Entry& x, const Entry& y) {
    if (std::get<0>(x) != std::get<0>(y)) return std::get<0>(x) < std::get<0>(y);
    if (std::get<1>(x) != std::get<1>(y)) return std::get<1>(x) > std::get<1>(y);
    return std::get<2>(x) > std::get<2>(y);
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(worse)> heap(worse);
  for (const auto& [k, c] : counts)
    heap.emplace(c, static_cast<std::int32_t>(k >> 32), static_cast<std::int32_t>(k & 0xFFFFFFFFu));

  // 3. Merge.
  std::unordered_map<std::string, std::int32_t> id_of;
  for (std::size_t id = static_cast<std::size_t>(n_special); id < vocab.size(); ++id) id_of.emplace(vocab[id], static_cast<std::int32_t>(id));
  std::vector<std::pair<std::int32_t, std::int32_t>> merges;
  std::unordered_set<std::uint64_t> touched;
  std::vector<std::int32_t> out;
  auto count_of = [&](std::uint64_t k) {
    auto it = counts.find(k);
    return it == counts.end() ? std::int64_t{0} : it->second;
  };
  while (static_cast<std::int32_t>(vocab.size()) < opts.vocab_size && !heap.empty()) {
    const auto [cnt, a, b] = heap.top();
    heap.pop();
    const std::uint64_t key = detail::pair_key(a, b);
    const std::int64_t actual = count_of(key);
    if (actual != cnt) {
      if (actual > 0) heap.emplace(actual, a, b);
      continue;
    }
    if (cnt < opts.min_frequency) break;
    const std::string joined = vocab[static_cast<std::size_t>(a)] + vocab[static_cast<std::size_t>(b)];
    std::int32_t c;
    if (auto it = id_of.find(joined); it != id_of.end()) {
      c = it->second;
    } else {
      c = static_cast<std::int32_t>(vocab.size());
      vocab.push_back(joined);
      id_of.emplace(joined, c);
    }
    const auto stamp = static_cast<std::int32_t>(merges.size());
    merges.emplace_back(a, b);
    touched.clear();
    const std::vector<std::int32_t> affected = std::move(where[key]);
    where.erase(key);
    for (std::int32_t w : affected) {
      detail::TrainWord& word = words[static_cast<std::size_t>(w)];
      if (word.stamp == stamp) continue;
      word.stamp = stamp;
      const std::int64_t n = word.count;
      auto change = [&](std::int32_t x, std::int32_t y, std::int64_t d) {
        const std::uint64_t k = detail::pair_key(x, y);
        auto& v = counts[k];
        v += d;
        if (v == 0) counts.erase(k);
        if (d > 0) {
          touched.insert(k);
          auto& list = where[k];
          if (list.empty() || list.back() != w) list.push_back(w);
        }
      };
      const auto& s = word.syms;
      out.clear();
      for (std::size_t i = 0; i < s.size();) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          if (!out.empty()) change(out.back(), a, -n), change(out.back(), c, n);
          if (i + 2 < s.size()) change(b, s[i + 2], -n), change(c, s[i + 2], n);
          change(a, b, -n);
          out.push_back(c);
          i += 2;
        } else {
          out.push_back(s[i]);
          ++i;
        }
      }
      word.syms.assign(out.begin(), out.end());
    }
    for (std::uint64_t k : touched)
      if (const std::int64_t v = count_of(k); v > 0)
        heap.emplace(v, static_cast<std::int32_t>(k >> 32), static_cast<std::int32_t>(k & 0xFFFFFFFFu));
  }

  BpeTokenizer tok(std::move(vocab), std::move(merges), std::move(added), std::move(popts));
  if (auto eot = tok.token_to_id("<|endoftext|>")) {
    tok.set_bos_id(eot);
    tok.set_eos_id(eot);
  }
  return tok;
}

}  // namespace moa
