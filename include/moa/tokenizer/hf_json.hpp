// moa/tokenizer/hf_json.hpp: Hugging Face `tokenizers` files (tokenizer.json) whose model is
// byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM, what our trainer saves): load, save.
//
// Supported: model BPE (vocab, merges as "a b" strings or [a, b] pairs, ignore_merges, unk_token);
// added_tokens (matched literally before pre-tokenisation, lstrip / rstrip over ASCII whitespace;
// single_word and normalized are ignored); pre_tokenizer ByteLevel (add_prefix_space, use_regex),
// Split with the GPT-2, Llama-3 or Qwen2 regex (behavior Isolated), Digits, and Sequences of them;
// normalizer null (or NFC with HfLoadOptions{.assume_nfc = true}: the caller promises NFC input, as
// ASCII and most text already is; moa does not implement NFC). Anything else is a ValueError naming it (e.g. an NFC normalizer, a Metaspace /
// sentencepiece-style model, byte_fallback, an unknown Split regex). The post_processor is not
// applied: encode() adds BOS / EOS only when asked. BOS / EOS come from tokenizer_config.json beside
// the file when it names them, else from well-known names (<|begin_of_text|>, <s>,
// <|end_of_text|>, </s>, <|endoftext|>).
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/core/error.hpp"
#include "moa/tokenizer/bpe.hpp"
#include "moa/tokenizer/file_util.hpp"
#include "moa/tokenizer/gpt2_files.hpp"

namespace moa {

namespace detail {

inline constexpr std::string_view kGpt2Regex = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

inline std::string_view split_regex(SplitPattern p) {
  switch (p) {
    case SplitPattern::gpt2: return kGpt2Regex;
    case SplitPattern::llama3: return kLlama3Regex;
    default: return kQwen2Regex;
  }
}

inline std::string json_type_of(const nlohmann::json& j) {
  return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : j.dump();
}

template <class T>
T json_get_or(const nlohmann::json& j, const char* key, T fallback) {
  if (!j.is_object() || !j.contains(key) || j[key].is_null()) return fallback;
  return j[key].get<T>();
}

// Flattens HF's pre_tokenizer into steps; sets `byte_level` when a ByteLevel step is present.
inline void parse_pre_tokenizer(const nlohmann::json& j, const std::string& name, std::vector<PreTokenizerStep>& steps,
                                bool& byte_level) {
  if (j.is_null()) return;
  const std::string type = json_type_of(j);
  if (type == "Sequence") {
    MOA_CHECK(j.contains("pretokenizers") && j["pretokenizers"].is_array(), IOError, name,
              ": expected pre_tokenizer.pretokenizers to be an array, got ", j.dump());
    for (const auto& sub : j["pretokenizers"]) parse_pre_tokenizer(sub, name, steps, byte_level);
  } else if (type == "ByteLevel") {
    byte_level = true;
    if (json_get_or(j, "add_prefix_space", false)) steps.push_back({.kind = PreTokenizerStep::Kind::prefix_space});
    if (json_get_or(j, "use_regex", true)) steps.push_back({.kind = PreTokenizerStep::Kind::split, .pattern = SplitPattern::gpt2});
  } else if (type == "Digits") {
    steps.push_back({.kind = PreTokenizerStep::Kind::digits, .individual_digits = json_get_or(j, "individual_digits", false)});
  } else if (type == "Split") {
    const auto& pat = j.value("pattern", nlohmann::json());
    const std::string behavior = json_get_or<std::string>(j, "behavior", "");
    MOA_CHECK(pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string(), ValueError, name,
              ": expected a Split pre-tokenizer with a Regex pattern, got ", pat.dump());
    const std::string re = pat["Regex"].get<std::string>();
    std::optional<SplitPattern> p;
    for (SplitPattern c : {SplitPattern::gpt2, SplitPattern::llama3, SplitPattern::qwen2})
      if (re == split_regex(c)) p = c;
    MOA_CHECK(p.has_value(), ValueError, name,
              ": expected a Split regex moa implements (GPT-2, Llama-3 or Qwen2), got unsupported regex ", re);
    MOA_CHECK(behavior == "Isolated" && !json_get_or(j, "invert", false), ValueError, name,
              ": expected Split behavior Isolated without invert, got behavior ", behavior);
    steps.push_back({.kind = PreTokenizerStep::Kind::split, .pattern = *p});
  } else {
    throw ValueError(cat(name, ": expected a pre_tokenizer moa supports (ByteLevel, Split, Digits, Sequence), got ", type));
  }
}

inline std::optional<std::string> config_token(const nlohmann::json& cfg, const char* key) {
  if (!cfg.is_object() || !cfg.contains(key)) return std::nullopt;
  const auto& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace detail

struct HfLoadOptions {
  bool assume_nfc = false;  // accept an NFC normalizer and skip it (Qwen2): the text must already be NFC
};

// Loads a tokenizer.json (see the header comment for what is supported).
inline BpeTokenizer load_hf_tokenizer(const std::filesystem::path& path, const HfLoadOptions& load = {}) {
  const std::string name = path.filename().string();
  const nlohmann::json j = detail::parse_json_file(path, "load_hf_tokenizer");
  try {
    MOA_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), IOError, name,
              ": expected an object with a \"model\" object, got ", j.type_name());
    const auto& m = j["model"];
    const std::string type = detail::json_get_or<std::string>(m, "type", m.contains("merges") ? "BPE" : "");
    MOA_CHECK(type == "BPE", ValueError, name, ": expected model type BPE, got ", (type.empty() ? "none" : type));
    MOA_CHECK(!detail::json_get_or(m, "byte_fallback", false), ValueError, name,
              ": expected a byte-level BPE, got byte_fallback (a sentencepiece-style model)");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      MOA_CHECK(detail::json_get_or<std::string>(m, k, "").empty(), ValueError, name, ": expected no ", k, ", got '",
                m[k].get<std::string>(), "'");
    const auto& norm = j.value("normalizer", nlohmann::json());
    const bool nfc_ok = load.assume_nfc && detail::json_type_of(norm) == "NFC";
    MOA_CHECK(norm.is_null() || nfc_ok ||
                  (detail::json_type_of(norm) == "Sequence" && norm.value("normalizers", nlohmann::json::array()).empty()),
              ValueError, name, ": expected no normalizer, got ", detail::json_type_of(norm),
              " (not implemented; for NFC pass HfLoadOptions{.assume_nfc = true} if the text is already NFC)");

    BpeOptions opts;
    opts.pre_tokenizer.clear();
    opts.ignore_merges = detail::json_get_or(m, "ignore_merges", false);
    opts.name = name;
    bool byte_level = false;
    detail::parse_pre_tokenizer(j.value("pre_tokenizer", nlohmann::json()), name, opts.pre_tokenizer, byte_level);
    if (!byte_level) byte_level = detail::json_type_of(j.value("decoder", nlohmann::json())) == "ByteLevel";
    MOA_CHECK(byte_level, ValueError, name, ": expected a byte-level BPE (a ByteLevel pre_tokenizer or decoder), got neither");

    MOA_CHECK(m.contains("vocab") && m["vocab"].is_object(), IOError, name, ": expected model.vocab to be an object");
    std::unordered_map<std::string, std::int32_t> id_of;
    std::vector<std::string> vocab;
    std::string raw;
    for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
      MOA_CHECK(it.value().is_number_integer() && it.value().get<std::int64_t>() >= 0 && it.value().get<std::int64_t>() < (1 << 30),
                IOError, name, ": expected an id in [0, 2^30) for token '", it.key(), "', got ", it.value().dump());
      const auto id = it.value().get<std::int32_t>();
      id_of[it.key()] = id;
      if (static_cast<std::size_t>(id) >= vocab.size()) vocab.resize(static_cast<std::size_t>(id) + 1);
      if (detail::byte_level_to_bytes(it.key(), raw)) vocab[static_cast<std::size_t>(id)] = raw;
    }
    std::vector<AddedToken> added;
    for (const auto& a : j.value("added_tokens", nlohmann::json::array())) {
      MOA_CHECK(a.is_object() && a.contains("id") && a.contains("content"), IOError, name,
                ": expected added_tokens entries with id and content, got ", a.dump());
      added.push_back(AddedToken{.content = a["content"].get<std::string>(),
                                 .id = a["id"].get<std::int32_t>(),
                                 .special = detail::json_get_or(a, "special", true),
                                 .lstrip = detail::json_get_or(a, "lstrip", false),
                                 .rstrip = detail::json_get_or(a, "rstrip", false)});
    }
    // Vocab entries that are not byte-level spellings (e.g. "<|endoftext|>" with a space or a
    // character outside the mapping) and are not added tokens cannot be produced: leave them out.
    std::vector<std::pair<std::int32_t, std::int32_t>> merges;
    const auto& jm = m.value("merges", nlohmann::json::array());
    MOA_CHECK(jm.is_array(), IOError, name, ": expected model.merges to be an array");
    merges.reserve(jm.size());
    for (std::size_t r = 0; r < jm.size(); ++r) {
      std::string a, b;
      if (jm[r].is_string()) {
        const std::string s = jm[r].get<std::string>();
        const std::size_t sp = s.find(' ');
        MOA_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos, IOError, name, ": merge ", r,
                  ": expected \"left right\", got '", s, "'");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {
        MOA_CHECK(jm[r].is_array() && jm[r].size() == 2 && jm[r][0].is_string() && jm[r][1].is_string(), IOError, name,
                  ": merge ", r, ": expected a string or a pair of strings, got ", jm[r].dump());
        a = jm[r][0].get<std::string>(), b = jm[r][1].get<std::string>();
      }
      auto ia = id_of.find(a), ib = id_of.find(b);
      MOA_CHECK(ia != id_of.end() && ib != id_of.end(), IOError, name, ": merge ", r, " ('", a, " ", b,
                "'): expected tokens of model.vocab, got unknown token '", (ia == id_of.end() ? a : b), "'");
      merges.emplace_back(ia->second, ib->second);
    }
    std::optional<std::int32_t> unk;
    if (const auto u = detail::json_get_or<std::string>(m, "unk_token", ""); !u.empty()) {
      auto it = id_of.find(u);
      MOA_CHECK(it != id_of.end(), IOError, name, ": expected unk_token '", u, "' in model.vocab, got none");
      unk = it->second;
    }
    opts.unk_id = unk;
    BpeTokenizer tok(std::move(vocab), std::move(merges), std::move(added), std::move(opts));

    nlohmann::json cfg;
    const auto cfg_path = path.parent_path() / "tokenizer_config.json";
    std::error_code ec;
    if (std::filesystem::is_regular_file(cfg_path, ec)) cfg = detail::parse_json_file(cfg_path, "load_hf_tokenizer");
    auto pick = [&](const char* key, std::initializer_list<const char*> names) -> std::optional<std::int32_t> {
      if (auto t = detail::config_token(cfg, key)) return tok.token_to_id(*t);
      for (const char* n : names)
        if (auto id = tok.token_to_id(n)) return id;
      return std::nullopt;
    };
    tok.set_bos_id(pick("bos_token", {"<|begin_of_text|>", "<s>", "<|endoftext|>"}));
    tok.set_eos_id(pick("eos_token", {"<|end_of_text|>", "</s>", "<|endoftext|>"}));
    return tok;
  } catch (const nlohmann::json::exception& e) {
    throw IOError(detail::cat("load_hf_tokenizer: ", name, ": expected the tokenizer.json layout, got ", e.what()));
  }
}

// Writes `tok` as a tokenizer.json (atomically) that load_hf_tokenizer and HF `tokenizers`
// (Tokenizer.from_file, PreTrainedTokenizerFast) read back to the same encodings.
inline void save_hf_tokenizer(const BpeTokenizer& tok, const std::filesystem::path& path) {
  using ojson = nlohmann::ordered_json;
  ojson added = ojson::array();
  for (const AddedToken& a : tok.added_tokens())
    added.push_back({{"id", a.id}, {"content", a.content}, {"single_word", false}, {"lstrip", a.lstrip},
                     {"rstrip", a.rstrip}, {"normalized", false}, {"special", a.special}});
  ojson pre_steps = ojson::array();
  for (const PreTokenizerStep& s : tok.options().pre_tokenizer) {
    switch (s.kind) {
      case PreTokenizerStep::Kind::split:
        pre_steps.push_back({{"type", "Split"}, {"pattern", {{"Regex", std::string(detail::split_regex(s.pattern))}}},
                             {"behavior", "Isolated"}, {"invert", false}});
        break;
      case PreTokenizerStep::Kind::digits:
        pre_steps.push_back({{"type", "Digits"}, {"individual_digits", s.individual_digits}});
        break;
      case PreTokenizerStep::Kind::prefix_space:
        throw ValueError("save_hf_tokenizer: expected no prefix-space step (not representable on its own), got one");
    }
  }
  pre_steps.push_back({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}});
  ojson pre = pre_steps.size() == 2 && tok.options().pre_tokenizer[0].kind == PreTokenizerStep::Kind::split &&
                      tok.options().pre_tokenizer[0].pattern == SplitPattern::gpt2
                  ? ojson{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}
                  : ojson{{"type", "Sequence"}, {"pretokenizers", pre_steps}};
  const std::vector<std::string> model = tok.model_tokens();
  ojson vocab = ojson::object();
  for (std::size_t id = 0; id < model.size(); ++id)
    if (!model[id].empty()) vocab[detail::bytes_to_byte_level(model[id])] = id;
  for (const AddedToken& a : tok.added_tokens()) vocab[a.content] = a.id;  // HF keeps specials in the vocab too
  ojson merges = ojson::array();
  for (const auto& [a, b] : tok.merges())
    merges.push_back(ojson::array({detail::bytes_to_byte_level(model[static_cast<std::size_t>(a)]),
                                   detail::bytes_to_byte_level(model[static_cast<std::size_t>(b)])}));
  ojson j = {{"version", "1.0"},
             {"truncation", nullptr},
             {"padding", nullptr},
             {"added_tokens", added},
             {"normalizer", nullptr},
             {"pre_tokenizer", pre},
             {"post_processor", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}}},
             {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
             {"model",
              {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
               {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
               {"ignore_merges", tok.options().ignore_merges}, {"vocab", vocab}, {"merges", merges}}}};
  std::string text;
  try {
    text = j.dump(1);
  } catch (const nlohmann::json::exception& e) {
    throw ValueError(detail::cat("save_hf_tokenizer: expected UTF-8 added tokens, got ", e.what()));
  }
  detail::write_file_atomic(path, text, "save_hf_tokenizer");
}

}  // namespace moa
