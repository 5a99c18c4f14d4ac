// moa/tokenizer/bpe.hpp: byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM and the vocabularies our
// trainer makes): added / special tokens, pre-tokenisation, then merges by rank.
//
// Encoding, as OpenAI's encoder.py and HF `tokenizers` do it:
//   1. the text is cut at added tokens (leftmost, longest first), which map to their ids directly;
//   2. each remaining segment goes through the pre-tokenizer steps (split regex, digits, prefix
//      space) into pieces;
//   3. each piece starts as its bytes and the adjacent pair of lowest merge rank is merged until no
//      pair has a rank (a heap of (rank, position) over a linked list of symbols; equal ranks go
//      left to right). For a vocabulary whose merges were learned in order (every merge creates a
//      pair of higher rank than its own) this is exactly encoder.py's "merge all occurrences of the
//      best bigram" loop and HF's word merge.
// Pieces seen earlier in the same encode() call are looked up in a per-call cache, so encode() is
// const and thread-safe. Token bytes are kept raw; the byte-level spelling ("Ġthe") is what
// token_to_id / id_to_token use.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>
#include <optional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "moa/core/error.hpp"
#include "moa/tokenizer/byte_level.hpp"
#include "moa/tokenizer/pair_map.hpp"
#include "moa/tokenizer/pretokenize.hpp"
#include "moa/tokenizer/tokenizer.hpp"

namespace moa {

// A token matched literally in the text before pre-tokenisation (HF's added_tokens; GPT-2's
// <|endoftext|>). `lstrip` / `rstrip`: the match also swallows whitespace on that side.
struct AddedToken {
  std::string content;
  std::int32_t id = 0;
  bool special = true;
  bool lstrip = false;
  bool rstrip = false;
};

// One step of the pre-tokenizer (HF's pre_tokenizer, flattened).
struct PreTokenizerStep {
  enum class Kind { split, digits, prefix_space };
  Kind kind = Kind::split;
  SplitPattern pattern = SplitPattern::gpt2;  // for split
  bool individual_digits = false;             // for digits
};

// GPT-2's pre-tokenizer: its regex, no prefix space.
inline std::vector<PreTokenizerStep> gpt2_pre_tokenizer() { return {PreTokenizerStep{}}; }

struct BpeOptions {
  std::vector<PreTokenizerStep> pre_tokenizer = gpt2_pre_tokenizer();
  bool ignore_merges = false;              // a piece that is itself a token maps to it (Llama-3)
  std::optional<std::int32_t> unk_id;      // for bytes without a token; ValueError when absent
  std::string name = "bpe";                // the file it came from, for messages
};

class BpeTokenizer : public Tokenizer {
 public:
  // vocab: id -> raw bytes of the BPE model's tokens ("" marks an id the model does not use, e.g.
  // one an added token takes); merges: pairs of ids in rank order (the merged token, the two
  // byte strings joined, must be in vocab; a repeated pair keeps its last rank, as encoder.py and
  // HF do); added: literal tokens, ids anywhere (in or beyond vocab).
  BpeTokenizer(std::vector<std::string> vocab, std::vector<std::pair<std::int32_t, std::int32_t>> merges,
               std::vector<AddedToken> added = {}, BpeOptions opts = {})
      : bytes_(std::move(vocab)), merges_(std::move(merges)), added_(std::move(added)), opts_(std::move(opts)) {
    const auto n_model = static_cast<std::int32_t>(bytes_.size());
    std::int32_t n = n_model;
    for (const AddedToken& a : added_) {
      MOA_CHECK(a.id >= 0, ValueError, opts_.name, ": expected added token ids >= 0, got ", a.id, " for '",
                a.content, "'");
      MOA_CHECK(!a.content.empty(), ValueError, opts_.name, ": expected non-empty added tokens, got an empty one (id ",
                a.id, ")");
      n = std::max(n, a.id + 1);
    }
    bytes_.resize(static_cast<std::size_t>(n));
    kind_.assign(static_cast<std::size_t>(n), 0);
    byte_id_.fill(-1);
    for (std::int32_t id = 0; id < n_model; ++id) {
      const std::string& b = bytes_[static_cast<std::size_t>(id)];
      if (b.empty()) continue;
      kind_[static_cast<std::size_t>(id)] = 1;
      auto [it, fresh] = bytes_to_id_.emplace(b, id);
      MOA_CHECK(fresh, ValueError, opts_.name, ": expected distinct tokens, got ids ", it->second, " and ", id,
                " both spelling '", detail::bytes_to_byte_level(b), "'");
      if (b.size() == 1) byte_id_[static_cast<unsigned char>(b[0])] = id;
    }
    for (const AddedToken& a : added_) {
      auto& k = kind_[static_cast<std::size_t>(a.id)];
      if (k == 1) bytes_to_id_.erase(bytes_[static_cast<std::size_t>(a.id)]);
      if (k == 1 && bytes_[static_cast<std::size_t>(a.id)].size() == 1)
        byte_id_[static_cast<unsigned char>(bytes_[static_cast<std::size_t>(a.id)][0])] = -1;
      k = 2;
      bytes_[static_cast<std::size_t>(a.id)] = a.content;
      by_first_byte_[static_cast<unsigned char>(a.content[0])].push_back(static_cast<std::int32_t>(&a - added_.data()));
    }
    for (auto& list : by_first_byte_)
      std::stable_sort(list.begin(), list.end(), [&](std::int32_t x, std::int32_t y) {
        return added_[static_cast<std::size_t>(x)].content.size() > added_[static_cast<std::size_t>(y)].content.size();
      });
    for (std::size_t r = 0; r < merges_.size(); ++r) {
      const auto [a, b] = merges_[r];
      MOA_CHECK(a >= 0 && a < n && b >= 0 && b < n && kind_[static_cast<std::size_t>(a)] == 1 &&
                    kind_[static_cast<std::size_t>(b)] == 1,
                ValueError, opts_.name, ": expected merge ", r, " to join two model tokens, got ids ", a, " and ", b);
      const std::string joined = bytes_[static_cast<std::size_t>(a)] + bytes_[static_cast<std::size_t>(b)];
      auto it = bytes_to_id_.find(joined);
      MOA_CHECK(it != bytes_to_id_.end(), ValueError, opts_.name, ": expected the result of merge ", r, " ('",
                detail::bytes_to_byte_level(bytes_[static_cast<std::size_t>(a)]), "' + '",
                detail::bytes_to_byte_level(bytes_[static_cast<std::size_t>(b)]), "') in the vocabulary, got none");
      pairs_.set(a, b, Merge{static_cast<std::int32_t>(r), it->second});
    }
    if (opts_.unk_id) check_id(opts_.unk_id, "unk_id");
  }

  std::string decode(std::span<const std::int32_t> ids) const override {
    std::string out;
    for (std::int32_t id : ids) out += token_bytes(id);
    return out;
  }
  std::string decode_token(std::int32_t id, std::int32_t /*prev_id*/ = -1) const override { return token_bytes(id); }

  std::int32_t vocab_size() const override { return static_cast<std::int32_t>(bytes_.size()); }

  std::optional<std::int32_t> token_to_id(std::string_view token) const override {
    for (const AddedToken& a : added_)
      if (a.content == token) return a.id;
    std::string raw;
    if (!detail::byte_level_to_bytes(token, raw)) return std::nullopt;
    auto it = bytes_to_id_.find(raw);
    if (it == bytes_to_id_.end()) return std::nullopt;
    return it->second;
  }
  std::string id_to_token(std::int32_t id) const override {
    const std::string& b = token_bytes(id);
    return kind_[static_cast<std::size_t>(id)] == 2 ? b : detail::bytes_to_byte_level(b);
  }

  // The raw bytes of token `id` (the literal content for an added token). IndexError if unknown.
  const std::string& token_bytes(std::int32_t id) const {
    MOA_CHECK(id >= 0 && id < vocab_size() && kind_[static_cast<std::size_t>(id)] != 0, IndexError, opts_.name,
              ".decode: expected a token id in [0, ", vocab_size(), ")", (id >= 0 && id < vocab_size() ? " that is assigned" : ""),
              ", got ", id, " (vocab size ", vocab_size(), ")");
    return bytes_[static_cast<std::size_t>(id)];
  }
  // True for ids of added tokens (specials such as <|endoftext|>).
  bool is_added(std::int32_t id) const {
    return id >= 0 && id < vocab_size() && kind_[static_cast<std::size_t>(id)] == 2;
  }

  // The model's tokens (raw bytes; "" for unused ids and for added tokens' ids), merges, added tokens.
  std::vector<std::string> model_tokens() const {
    std::vector<std::string> v(bytes_.size());
    for (std::size_t i = 0; i < v.size(); ++i)
      if (kind_[i] == 1) v[i] = bytes_[i];
    return v;
  }
  const std::vector<std::pair<std::int32_t, std::int32_t>>& merges() const { return merges_; }
  const std::vector<AddedToken>& added_tokens() const { return added_; }
  const BpeOptions& options() const { return opts_; }

  // The pieces the pre-tokenizer cuts `text` into (no added-token handling): for tests and tools.
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> out;
    std::deque<std::string> arena;
    auto f = [&](std::string_view p) { out.emplace_back(p); };
    run_steps(text, 0, arena, f);
    return out;
  }

  // Appends the ids of `text` with added tokens treated as ordinary text (tiktoken's
  // encode_ordinary; OpenAI's encoder.py).
  std::vector<std::int32_t> encode_ordinary(std::string_view text) const {
    std::vector<std::int32_t> out;
    Scratch sc;
    encode_segment(text, sc, out);
    return out;
  }

 protected:
  void encode_into(std::string_view text, std::vector<std::int32_t>& out) const override {
    Scratch sc;
    out.reserve(out.size() + text.size() / 3);
    std::size_t seg_start = 0, i = 0;
    while (i < text.size()) {
      const auto& cands = by_first_byte_[static_cast<unsigned char>(text[i])];
      const AddedToken* hit = nullptr;
      for (std::int32_t c : cands) {
        const AddedToken& a = added_[static_cast<std::size_t>(c)];
        if (text.compare(i, a.content.size(), a.content) == 0) {
          hit = &a;
          break;
        }
      }
      if (!hit) {
        ++i;
        continue;
      }
      std::size_t seg_end = i, next = i + hit->content.size();
      if (hit->lstrip)
        while (seg_end > seg_start && is_ascii_space(text[seg_end - 1])) --seg_end;
      if (hit->rstrip)
        while (next < text.size() && is_ascii_space(text[next])) ++next;
      encode_segment(text.substr(seg_start, seg_end - seg_start), sc, out);
      out.push_back(hit->id);
      seg_start = i = next;
    }
    encode_segment(text.substr(seg_start), sc, out);
  }

 private:
  struct Merge {
    std::int32_t rank = 0;
    std::int32_t id = 0;
  };
  struct Symbol {
    std::int32_t id;
    std::int32_t prev;
    std::int32_t next;
  };
  struct Scratch {
    std::unordered_map<std::string_view, std::pair<std::uint32_t, std::uint32_t>> cache;  // piece -> (offset, count)
    std::vector<std::int32_t> cached_ids;
    std::deque<std::string> arena;  // pieces made by prefix_space steps
    std::vector<Symbol> symbols;
    std::vector<std::pair<std::int32_t, std::int32_t>> heap;  // (rank, position), min-heap
  };

  static bool is_ascii_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

  template <class F>
  void run_steps(std::string_view seg, std::size_t step, std::deque<std::string>& arena, F& f) const {
    if (seg.empty()) return;
    if (step == opts_.pre_tokenizer.size()) {
      f(seg);
      return;
    }
    const PreTokenizerStep& st = opts_.pre_tokenizer[step];
    auto next = [&](std::string_view p) { run_steps(p, step + 1, arena, f); };
    switch (st.kind) {
      case PreTokenizerStep::Kind::split: split_pretokens(seg, st.pattern, next); break;
      case PreTokenizerStep::Kind::digits: split_digits(seg, st.individual_digits, next); break;
      case PreTokenizerStep::Kind::prefix_space:
        if (seg[0] != ' ') {
          std::string& s = arena.emplace_back();
          s.reserve(seg.size() + 1);
          s.push_back(' ');
          s.append(seg);
          seg = s;
        }
        next(seg);
        break;
    }
  }

  void encode_segment(std::string_view seg, Scratch& sc, std::vector<std::int32_t>& out) const {
    auto f = [&](std::string_view piece) {
      if (piece.size() == 1) {
        out.push_back(byte_token(static_cast<unsigned char>(piece[0])));
        return;
      }
      auto it = sc.cache.find(piece);
      if (it != sc.cache.end()) {
        const auto [off, cnt] = it->second;
        out.insert(out.end(), sc.cached_ids.begin() + off, sc.cached_ids.begin() + off + cnt);
        return;
      }
      const auto off = static_cast<std::uint32_t>(sc.cached_ids.size());
      bpe_piece(piece, sc, sc.cached_ids);
      const auto cnt = static_cast<std::uint32_t>(sc.cached_ids.size() - off);
      out.insert(out.end(), sc.cached_ids.begin() + off, sc.cached_ids.end());
      sc.cache.emplace(piece, std::make_pair(off, cnt));
    };
    run_steps(seg, 0, sc.arena, f);
  }

  std::int32_t byte_token(unsigned char b) const {
    const std::int32_t id = byte_id_[b];
    if (id >= 0) return id;
    MOA_CHECK(opts_.unk_id.has_value(), ValueError, opts_.name, ".encode: expected a token for byte 0x", std::hex,
              static_cast<int>(b), std::dec, " or an unk token, got neither");
    return *opts_.unk_id;
  }

  // BPE on one piece: appends its ids to `out`.
  void bpe_piece(std::string_view piece, Scratch& sc, std::vector<std::int32_t>& out) const {
    if (opts_.ignore_merges) {
      auto it = bytes_to_id_.find(std::string(piece));
      if (it != bytes_to_id_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    const auto n = static_cast<std::int32_t>(piece.size());
    auto& sym = sc.symbols;
    auto& heap = sc.heap;
    sym.resize(static_cast<std::size_t>(n));
    heap.clear();
    auto greater = [](const std::pair<std::int32_t, std::int32_t>& x, const std::pair<std::int32_t, std::int32_t>& y) {
      return x > y;
    };
    for (std::int32_t i = 0; i < n; ++i)
      sym[static_cast<std::size_t>(i)] = {byte_token(static_cast<unsigned char>(piece[static_cast<std::size_t>(i)])), i - 1,
                                          i + 1 < n ? i + 1 : -1};
    for (std::int32_t i = 0; i + 1 < n; ++i)
      if (const Merge* m = pairs_.find(sym[static_cast<std::size_t>(i)].id, sym[static_cast<std::size_t>(i + 1)].id))
        heap.emplace_back(m->rank, i);
    std::make_heap(heap.begin(), heap.end(), greater);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), greater);
      const auto [rank, pos] = heap.back();
      heap.pop_back();
      Symbol& s = sym[static_cast<std::size_t>(pos)];
      if (s.id < 0 || s.next < 0) continue;  // merged away, or last
      Symbol& t = sym[static_cast<std::size_t>(s.next)];
      const Merge* m = pairs_.find(s.id, t.id);
      if (!m || m->rank != rank) continue;  // stale entry
      s.id = m->id;
      t.id = -1;
      s.next = t.next;
      if (s.next >= 0) sym[static_cast<std::size_t>(s.next)].prev = pos;
      if (s.prev >= 0) {
        if (const Merge* p = pairs_.find(sym[static_cast<std::size_t>(s.prev)].id, s.id)) {
          heap.emplace_back(p->rank, s.prev);
          std::push_heap(heap.begin(), heap.end(), greater);
        }
      }
      if (s.next >= 0) {
        if (const Merge* p = pairs_.find(s.id, sym[static_cast<std::size_t>(s.next)].id)) {
          heap.emplace_back(p->rank, pos);
          std::push_heap(heap.begin(), heap.end(), greater);
        }
      }
    }
    for (std::int32_t i = 0; i >= 0; i = sym[static_cast<std::size_t>(i)].next) out.push_back(sym[static_cast<std::size_t>(i)].id);
  }

  std::vector<std::string> bytes_;     // id -> raw bytes (literal content for added tokens)
  std::vector<std::uint8_t> kind_;     // id -> 0 unused, 1 model token, 2 added token
  std::vector<std::pair<std::int32_t, std::int32_t>> merges_;
  std::vector<AddedToken> added_;
  BpeOptions opts_;
  std::unordered_map<std::string, std::int32_t> bytes_to_id_;  // model tokens only
  std::array<std::int32_t, 256> byte_id_{};
  std::array<std::vector<std::int32_t>, 256> by_first_byte_;  // indices into added_, longest first
  detail::PairMap<Merge> pairs_;
};

}  // namespace moa
