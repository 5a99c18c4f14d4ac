// moa/tokenizer/tokenizer.hpp: the interface every tokenizer implements (byte-level BPE, the
// llama2.c sentencepiece-style tokenizer): text <-> token ids, the vocabulary, BOS / EOS.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moa/core/error.hpp"

namespace moa {

// What encode() adds around the text's tokens.
struct EncodeOptions {
  bool add_bos = false;  // prepend bos_id() (ValueError when the tokenizer has none)
  bool add_eos = false;  // append eos_id() (ValueError when the tokenizer has none)
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of `text` (bytes, normally UTF-8), with BOS / EOS as `opts` asks.
  std::vector<std::int32_t> encode(std::string_view text, EncodeOptions opts = {}) const {
    std::vector<std::int32_t> ids;
    if (opts.add_bos) ids.push_back(require(bos_id_, "add_bos", "a BOS token"));
    encode_into(text, ids);
    if (opts.add_eos) ids.push_back(require(eos_id_, "add_eos", "an EOS token"));
    return ids;
  }

  // The bytes the ids stand for. IndexError for an id outside the vocabulary. The result can be
  // invalid UTF-8 when the ids cut a character (Python's references would show U+FFFD there).
  virtual std::string decode(std::span<const std::int32_t> ids) const = 0;
  std::string decode(const std::vector<std::int32_t>& ids) const {
    return decode(std::span<const std::int32_t>(ids.data(), ids.size()));
  }

  // The bytes token `id` adds when it follows `prev_id` (-1: none), for streaming generation;
  // concatenating decode_token over a sequence gives decode() of it.
  virtual std::string decode_token(std::int32_t id, std::int32_t prev_id = -1) const = 0;

  // One past the largest id.
  virtual std::int32_t vocab_size() const = 0;
  // A token's id from its spelling in the vocabulary file ("Ġthe" in GPT-2's encoder.json).
  virtual std::optional<std::int32_t> token_to_id(std::string_view token) const = 0;
  // The spelling of token `id` in the vocabulary file; IndexError when out of range.
  virtual std::string id_to_token(std::int32_t id) const = 0;

  std::optional<std::int32_t> bos_id() const { return bos_id_; }
  std::optional<std::int32_t> eos_id() const { return eos_id_; }
  void set_bos_id(std::optional<std::int32_t> id) { bos_id_ = check_id(id, "set_bos_id"); }
  void set_eos_id(std::optional<std::int32_t> id) { eos_id_ = check_id(id, "set_eos_id"); }

 protected:
  // Appends the ids of `text` (no BOS / EOS) to `out`.
  virtual void encode_into(std::string_view text, std::vector<std::int32_t>& out) const = 0;

  std::optional<std::int32_t> check_id(std::optional<std::int32_t> id, const char* op) const {
    if (id) {
      MOA_CHECK(*id >= 0 && *id < vocab_size(), IndexError, "tokenizer.", op, ": expected an id in [0, ",
                vocab_size(), "), got ", *id);
    }
    return id;
  }

  std::optional<std::int32_t> bos_id_;
  std::optional<std::int32_t> eos_id_;

 private:
  static std::int32_t require(const std::optional<std::int32_t>& id, const char* what, const char* need) {
    MOA_CHECK(id.has_value(), ValueError, "tokenizer.encode: ", what, " expected ", need,
              ", got a tokenizer without one");
    return *id;
  }
};

}  // namespace moa
