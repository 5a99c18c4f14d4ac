// moa/tokenizer/gpt2_files.hpp: GPT-2's original tokenizer files, encoder.json (byte-level
// spelling -> id) and vocab.bpe ("#version" line, then one merge "left right" per line, in rank
// order): load into a BpeTokenizer, save one.
//
// Which tokens are special: those of encoder.json that are neither a single byte nor the result of
// a merge (GPT-2: <|endoftext|>, 50256). They are matched literally in the text by encode() (as
// HF's GPT2Tokenizer does; encode_ordinary() does not, as encoder.py). BOS = EOS = <|endoftext|>
// when present.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/core/error.hpp"
#include "moa/tokenizer/bpe.hpp"
#include "moa/tokenizer/file_util.hpp"

namespace moa {

namespace detail {

// Splits the merges text (vocab.bpe) into (left, right) spellings; `name` for messages.
inline std::vector<std::pair<std::string, std::string>> parse_merges_text(std::string_view text, const std::string& name) {
  std::vector<std::pair<std::string, std::string>> out;
  std::size_t line_no = 0, i = 0;
  while (i < text.size()) {
    std::size_t e = text.find('\n', i);
    if (e == std::string_view::npos) e = text.size();
    std::string_view line = text.substr(i, e - i);
    i = e + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (line_no == 1 && line.starts_with("#version"))) continue;
    const std::size_t sp = line.find(' ');
    MOA_CHECK(sp != std::string_view::npos && sp > 0 && sp + 1 < line.size() &&
                  line.find(' ', sp + 1) == std::string_view::npos,
              IOError, name, " line ", line_no, ": expected two tokens separated by one space, got '", line, "'");
    out.emplace_back(std::string(line.substr(0, sp)), std::string(line.substr(sp + 1)));
  }
  return out;
}

inline nlohmann::json parse_json_file(const std::filesystem::path& path, const char* op) {
  const std::string text = read_file_bytes(path, op);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw IOError(cat(op, ": expected valid JSON in ", path.string(), ", got ", e.what()));
  }
}

}  // namespace detail

// Loads encoder.json + vocab.bpe. IOError for missing / malformed files and for merges naming
// tokens that encoder.json lacks.
inline BpeTokenizer load_gpt2_tokenizer(const std::filesystem::path& encoder_json, const std::filesystem::path& vocab_bpe) {
  const std::string enc_name = encoder_json.filename().string(), bpe_name = vocab_bpe.filename().string();
  const nlohmann::json enc = detail::parse_json_file(encoder_json, "load_gpt2_tokenizer");
  MOA_CHECK(enc.is_object() && !enc.empty(), IOError, enc_name, ": expected a JSON object of token -> id, got ",
            enc.type_name());
  std::vector<std::string> spelling;
  std::unordered_map<std::string, std::int32_t> id_of;
  for (auto it = enc.begin(); it != enc.end(); ++it) {
    MOA_CHECK(it.value().is_number_integer(), IOError, enc_name, ": expected an integer id for token '", it.key(),
              "', got ", it.value().dump());
    const auto id = it.value().get<std::int64_t>();
    MOA_CHECK(id >= 0 && id < (1 << 30), IOError, enc_name, ": expected ids in [0, 2^30), got ", id, " for '",
              it.key(), "'");
    if (static_cast<std::size_t>(id) >= spelling.size()) spelling.resize(static_cast<std::size_t>(id) + 1);
    MOA_CHECK(spelling[static_cast<std::size_t>(id)].empty(), IOError, enc_name, ": expected distinct ids, got ", id,
              " for '", spelling[static_cast<std::size_t>(id)], "' and '", it.key(), "'");
    spelling[static_cast<std::size_t>(id)] = it.key();
    id_of[it.key()] = static_cast<std::int32_t>(id);
  }
  const std::string bpe_text = detail::read_file_bytes(vocab_bpe, "load_gpt2_tokenizer");
  const auto merge_names = detail::parse_merges_text(bpe_text, bpe_name);
  std::vector<std::pair<std::int32_t, std::int32_t>> merges;
  merges.reserve(merge_names.size());
  std::vector<char> is_result(spelling.size(), 0);
  for (std::size_t r = 0; r < merge_names.size(); ++r) {
    const auto& [a, b] = merge_names[r];
    auto ia = id_of.find(a), ib = id_of.find(b);
    MOA_CHECK(ia != id_of.end() && ib != id_of.end(), IOError, bpe_name, " merge ", r, " ('", a, " ", b,
              "'): expected tokens of ", enc_name, ", got unknown token '", (ia == id_of.end() ? a : b), "'");
    auto ic = id_of.find(a + b);
    MOA_CHECK(ic != id_of.end(), IOError, bpe_name, " merge ", r, " ('", a, " ", b, "'): expected '", a + b,
              "' in ", enc_name, ", got no such token");
    is_result[static_cast<std::size_t>(ic->second)] = 1;
    merges.emplace_back(ia->second, ib->second);
  }
  std::vector<std::string> vocab(spelling.size());
  std::vector<AddedToken> added;
  std::string raw;
  for (std::size_t id = 0; id < spelling.size(); ++id) {
    const std::string& s = spelling[id];
    if (s.empty()) continue;
    const bool decodable = detail::byte_level_to_bytes(s, raw);
    if (decodable && (raw.size() == 1 || is_result[id])) {
      vocab[id] = raw;
    } else {
      added.push_back(AddedToken{.content = s, .id = static_cast<std::int32_t>(id)});
    }
  }
  BpeOptions opts;
  opts.name = enc_name;
  BpeTokenizer tok(std::move(vocab), std::move(merges), std::move(added), std::move(opts));
  if (auto eot = tok.token_to_id("<|endoftext|>")) {
    tok.set_bos_id(eot);
    tok.set_eos_id(eot);
  }
  return tok;
}

// Loads `dir`/encoder.json + `dir`/vocab.bpe.
inline BpeTokenizer load_gpt2_tokenizer(const std::filesystem::path& dir) {
  return load_gpt2_tokenizer(dir / "encoder.json", dir / "vocab.bpe");
}

// Writes `dir`/encoder.json and `dir`/vocab.bpe (each atomically) so that load_gpt2_tokenizer and
// HF's GPT2Tokenizer(vocab_file, merges_file) read `tok` back. Every model token must be a byte or a
// merge result (true of GPT-2's files and of train_bpe's output), else ValueError: the format has
// no other way to tell specials apart.
inline void save_gpt2_tokenizer(const BpeTokenizer& tok, const std::filesystem::path& dir) {
  const std::vector<std::string> model = tok.model_tokens();
  std::vector<char> ok(model.size(), 0);
  for (std::size_t i = 0; i < model.size(); ++i) ok[i] = model[i].size() == 1;
  std::string merges_text = "#version: 0.2\n";
  for (const auto& [a, b] : tok.merges()) {
    const std::string joined = model[static_cast<std::size_t>(a)] + model[static_cast<std::size_t>(b)];
    if (auto id = tok.token_to_id(detail::bytes_to_byte_level(joined))) ok[static_cast<std::size_t>(*id)] = 1;
    merges_text += detail::bytes_to_byte_level(model[static_cast<std::size_t>(a)]);
    merges_text += ' ';
    merges_text += detail::bytes_to_byte_level(model[static_cast<std::size_t>(b)]);
    merges_text += '\n';
  }
  nlohmann::ordered_json enc = nlohmann::ordered_json::object();
  for (std::int32_t id = 0; id < tok.vocab_size(); ++id) {
    if (tok.is_added(id)) {
      enc[tok.token_bytes(id)] = id;
    } else if (!model[static_cast<std::size_t>(id)].empty()) {
      MOA_CHECK(ok[static_cast<std::size_t>(id)], ValueError, "save_gpt2_tokenizer: expected every token to be a byte or a merge result, got '",
                tok.id_to_token(id), "' (id ", id, ")");
      enc[tok.id_to_token(id)] = id;
    }
  }
  std::string enc_text;
  try {
    enc_text = enc.dump();
  } catch (const nlohmann::json::exception& e) {
    throw ValueError(detail::cat("save_gpt2_tokenizer: expected UTF-8 added tokens, got ", e.what()));
  }
  detail::write_file_atomic(dir / "encoder.json", enc_text, "save_gpt2_tokenizer");
  detail::write_file_atomic(dir / "vocab.bpe", merges_text, "save_gpt2_tokenizer");
}

}  // namespace moa
