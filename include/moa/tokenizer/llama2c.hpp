// moa/tokenizer/llama2c.hpp: the tokenizer of karpathy/llama2.c (tokenizer.bin, tok512.bin), a
// sentencepiece-style BPE over pieces with scores, encoding and decoding as run.c does.
//
// File (little-endian): int32 max_token_length, then per token: float32 score, int32 length,
// `length` bytes. The file does not store the vocabulary size; pass it (the model's vocab_size)
// to check the file ends where it should, or -1 to read tokens until the end of the file.
// Ids 0, 1, 2 are <unk>, BOS, EOS; ids 3..258 are the byte pieces <0x00>..<0xFF>.
//
// encode(text), as run.c's encode(): nothing for the empty text; else the dummy-prefix token " ",
// then each UTF-8 code point (up to 4 bytes, split as run.c splits them) as its piece or, when there
// is none, as byte tokens (byte + 3); then repeatedly merge the adjacent pair whose concatenation
// is a piece with the highest score (the leftmost among equals). add_bos puts BOS in front (run.c
// merges across it too, which changes nothing unless "\n<s>\n" + piece is itself a piece).
// decode, as run.c's decode(): a piece after BOS loses its leading space, <0xHH> is byte HH; BOS and
// EOS themselves print nothing (run.c never prints them).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "moa/core/error.hpp"
#include "moa/tokenizer/file_util.hpp"
#include "moa/tokenizer/tokenizer.hpp"

namespace moa {

class Llama2cTokenizer : public Tokenizer {
 public:
  static constexpr std::int32_t kBos = 1;
  static constexpr std::int32_t kEos = 2;

  Llama2cTokenizer(std::vector<std::string> pieces, std::vector<float> scores, std::int32_t max_token_length,
                   std::string name = "tokenizer.bin")
      : pieces_(std::move(pieces)), scores_(std::move(scores)), max_token_length_(max_token_length), name_(std::move(name)) {
    MOA_CHECK(pieces_.size() == scores_.size(), ValueError, name_, ": expected one score per piece, got ",
              pieces_.size(), " pieces and ", scores_.size(), " scores");
    for (std::size_t i = 0; i < pieces_.size(); ++i) lookup_.emplace(pieces_[i], static_cast<std::int32_t>(i));
    if (vocab_size() > kBos) bos_id_ = kBos;
    if (vocab_size() > kEos) eos_id_ = kEos;
  }

  std::string decode(std::span<const std::int32_t> ids) const override {
    std::string out;
    std::int32_t prev = -1;
    for (std::int32_t id : ids) {
      out += decode_token(id, prev);
      prev = id;
    }
    return out;
  }

  std::string decode_token(std::int32_t id, std::int32_t prev_id = -1) const override {
    std::string_view piece = id_piece(id, "decode");
    if (id == kBos || id == kEos) return {};
    if (prev_id == kBos && !piece.empty() && piece[0] == ' ') piece.remove_prefix(1);
    if (const int b = byte_piece_value(piece); b >= 0) return std::string(1, static_cast<char>(b));
    return std::string(piece);
  }

  std::int32_t vocab_size() const override { return static_cast<std::int32_t>(pieces_.size()); }
  std::optional<std::int32_t> token_to_id(std::string_view token) const override {
    auto it = lookup_.find(std::string(token));
    if (it == lookup_.end()) return std::nullopt;
    return it->second;
  }
  std::string id_to_token(std::int32_t id) const override { return std::string(id_piece(id, "id_to_token")); }
  float score(std::int32_t id) const {
    id_piece(id, "score");
    return scores_[static_cast<std::size_t>(id)];
  }
  std::int32_t max_token_length() const { return max_token_length_; }

 protected:
  void encode_into(std::string_view text, std::vector<std::int32_t>& out) const override {
    if (text.empty()) return;
    std::vector<std::int32_t> ids;
    ids.reserve(text.size() + 1);
    auto space = lookup_.find(" ");
    MOA_CHECK(space != lookup_.end(), ValueError, name_, ".encode: expected a \" \" piece for the dummy prefix, got none");
    ids.push_back(space->second);
    std::string buf;
    for (std::size_t i = 0; i < text.size(); ++i) {
      const auto c = static_cast<unsigned char>(text[i]);
      if ((c & 0xC0) != 0x80) buf.clear();
      buf += static_cast<char>(c);
      const unsigned char next = i + 1 < text.size() ? static_cast<unsigned char>(text[i + 1]) : 0;
      if ((next & 0xC0) == 0x80 && buf.size() < 4) continue;
      auto it = lookup_.find(buf);
      if (it != lookup_.end()) {
        ids.push_back(it->second);
      } else {
        for (char b : buf) {
          const std::int32_t id = static_cast<unsigned char>(b) + 3;
          MOA_CHECK(id < vocab_size(), ValueError, name_, ".encode: expected byte-fallback token ", id,
                    " in the vocabulary, got vocab size ", vocab_size());
          ids.push_back(id);
        }
      }
      buf.clear();
    }
    merge(ids);
    out.insert(out.end(), ids.begin(), ids.end());
  }

 private:
  struct Candidate {
    float score;
    std::int32_t pos, left, right, merged;
    bool operator<(const Candidate& o) const {  // priority_queue top: highest score, then leftmost
      if (score != o.score) return score < o.score;
      return pos > o.pos;
    }
  };

  std::string_view id_piece(std::int32_t id, const char* op) const {
    MOA_CHECK(id >= 0 && id < vocab_size(), IndexError, name_, ".", op, ": expected a token id in [0, ", vocab_size(),
              "), got ", id, " (vocab size ", vocab_size(), ")");
    return pieces_[static_cast<std::size_t>(id)];
  }

  static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  }
  // HH for a piece "<0xHH>", else -1.
  static int byte_piece_value(std::string_view p) {
    if (p.size() != 6 || !p.starts_with("<0x") || p[5] != '>') return -1;
    const int hi = hex_digit(p[3]), lo = hex_digit(p[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
  }

  std::optional<Candidate> candidate(const std::vector<std::int32_t>& id, std::int32_t pos, std::int32_t nxt) const {
    const std::int32_t a = id[static_cast<std::size_t>(pos)], b = id[static_cast<std::size_t>(nxt)];
    auto it = lookup_.find(pieces_[static_cast<std::size_t>(a)] + pieces_[static_cast<std::size_t>(b)]);
    if (it == lookup_.end()) return std::nullopt;
    return Candidate{scores_[static_cast<std::size_t>(it->second)], pos, a, b, it->second};
  }

  // run.c's merge loop, with a heap over a linked list instead of a rescan per merge.
  void merge(std::vector<std::int32_t>& ids) const {
    const auto n = static_cast<std::int32_t>(ids.size());
    std::vector<std::int32_t> next(static_cast<std::size_t>(n)), prev(static_cast<std::size_t>(n));
    for (std::int32_t i = 0; i < n; ++i) next[static_cast<std::size_t>(i)] = i + 1 < n ? i + 1 : -1, prev[static_cast<std::size_t>(i)] = i - 1;
    std::vector<Candidate> heap;
    auto push = [&](std::int32_t pos) {
      const std::int32_t nx = next[static_cast<std::size_t>(pos)];
      if (nx < 0) return;
      if (auto c = candidate(ids, pos, nx)) {
        heap.push_back(*c);
        std::push_heap(heap.begin(), heap.end());
      }
    };
    for (std::int32_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end());
      const Candidate c = heap.back();
      heap.pop_back();
      const auto pos = static_cast<std::size_t>(c.pos);
      const std::int32_t nx = next[pos];
      if (ids[pos] != c.left || nx < 0 || ids[static_cast<std::size_t>(nx)] != c.right) continue;  // stale
      ids[pos] = c.merged;
      ids[static_cast<std::size_t>(nx)] = -1;
      next[pos] = next[static_cast<std::size_t>(nx)];
      if (next[pos] >= 0) prev[static_cast<std::size_t>(next[pos])] = c.pos;
      if (prev[pos] >= 0) push(prev[pos]);
      push(c.pos);
    }
    std::size_t w = 0;
    for (std::int32_t i = 0; i >= 0; i = next[static_cast<std::size_t>(i)]) ids[w++] = ids[static_cast<std::size_t>(i)];
    ids.resize(w);
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::int32_t max_token_length_;
  std::string name_;
  std::unordered_map<std::string, std::int32_t> lookup_;  // first id of each piece
};

// Reads a llama2.c tokenizer file. vocab_size: the number of tokens the file must hold (the model's
// vocab_size), or -1 to read tokens to the end of the file. IOError for a missing, truncated or
// corrupted file, naming the file, the token and the offset.
inline Llama2cTokenizer load_llama2c_tokenizer(const std::filesystem::path& path, std::int32_t vocab_size = -1) {
  const std::string name = path.filename().string();
  const std::string data = detail::read_file_bytes(path, "load_llama2c_tokenizer");
  std::size_t off = 0;
  auto read_i32 = [&](const std::string& what) {
    MOA_CHECK(off + 4 <= data.size(), IOError, name, ": expected 4 bytes of ", what, " at offset ", off,
              ", file ends at ", data.size());
    std::int32_t v;
    std::memcpy(&v, data.data() + off, 4);
    off += 4;
    return v;
  };
  const std::int32_t max_len = read_i32("max_token_length");
  MOA_CHECK(max_len > 0 && max_len < (1 << 20), IOError, name, ": expected a max_token_length in [1, 2^20), got ", max_len);
  std::vector<std::string> pieces;
  std::vector<float> scores;
  for (std::int32_t i = 0; vocab_size < 0 ? off < data.size() : i < vocab_size; ++i) {
    const std::string tag = "token " + std::to_string(i) + "'s ";
    const std::int32_t bits = read_i32(tag + "score");
    float score;
    std::memcpy(&score, &bits, 4);
    const std::int32_t len = read_i32(tag + "length");
    MOA_CHECK(len >= 0 && len <= max_len, IOError, name, ": expected token ", i, "'s length in [0, ", max_len,
              "] (max_token_length) at offset ", off - 4, ", got ", len);
    MOA_CHECK(off + static_cast<std::size_t>(len) <= data.size(), IOError, name, ": expected ", len, " bytes of token ",
              i, " at offset ", off, ", file ends at ", data.size());
    pieces.emplace_back(data.substr(off, static_cast<std::size_t>(len)));
    scores.push_back(score);
    off += static_cast<std::size_t>(len);
  }
  MOA_CHECK(off == data.size(), IOError, name, ": expected the file to end after ", vocab_size, " tokens at offset ", off,
            ", got ", data.size() - off, " more bytes (wrong vocab_size?)");
  return Llama2cTokenizer(std::move(pieces), std::move(scores), max_len, name);
}

}  // namespace moa
