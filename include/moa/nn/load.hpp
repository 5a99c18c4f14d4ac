// moa/nn/load.hpp: open any supported model: a Hugging Face checkpoint directory (config.json),
// a llama2.c .bin file, or a moa training checkpoint directory (state.json with the model config).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "moa/io/checkpoint.hpp"
#include "moa/io/llama2c.hpp"
#include "moa/nn/pretrained.hpp"

namespace moa::nn {

struct LoadedModel {
  std::shared_ptr<TransformerLM> model;
  std::string kind;                          // "hf", "llama2c" or "moa"
  std::optional<HfModelInfo> hf;             // for "hf" and "llama2c"
  std::filesystem::path tokenizer_hint;      // where a tokenizer probably is (may not exist)
  nlohmann::json metadata = nlohmann::json::object();  // a moa checkpoint's metadata
};

inline LoadedModel load_model(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  LoadedModel out;
  if (fs::is_regular_file(path) && path.extension() == ".bin") {
    const io::Llama2cModel ck = io::load_llama2c(path);
    const HfModelInfo info = config_from_hf(io::llama2c_hf_config(ck.config));
    out.model = std::make_shared<TransformerLM>(info.config);
    out.model->load_state_dict(state_from_hf(std::map<std::string, Tensor>(ck.weights.begin(), ck.weights.end()), info));
    out.kind = "llama2c";
    out.hf = info;
    // llama2.c keeps its tokenizer beside the model: tokenizer.bin, or tok<vocab>.bin.
    const fs::path dir = path.parent_path();
    const fs::path sized = dir / ("tok" + std::to_string(ck.config.vocab_size) + ".bin");
    out.tokenizer_hint = fs::exists(sized) ? sized : dir / "tokenizer.bin";
    return out;
  }
  MOA_CHECK(fs::is_directory(path), IOError, "load_model: ", path.string(),
            " is neither a model directory (config.json or state.json) nor a llama2.c .bin file");
  if (fs::exists(path / "config.json")) {
    Pretrained p = load_hf_pretrained(path);
    out.model = p.model;
    out.kind = "hf";
    out.hf = p.info;
    out.tokenizer_hint = path;
    return out;
  }
  if (fs::exists(path / "state.json")) {
    const io::TrainingCheckpoint ck = io::load_checkpoint(path);
    MOA_CHECK(ck.metadata.contains("model_config"), IOError, "load_model: ", path.string(),
              "/state.json has no model_config in its metadata (not a language-model checkpoint)");
    out.model = std::make_shared<TransformerLM>(TransformerConfig::from_json(ck.metadata["model_config"]));
    out.model->load_state_dict(std::map<std::string, Tensor>(ck.model.begin(), ck.model.end()));
    out.kind = "moa";
    out.metadata = ck.metadata;
    if (ck.metadata.contains("tokenizer")) out.tokenizer_hint = ck.metadata["tokenizer"].get<std::string>();
    return out;
  }
  throw IOError(::moa::detail::cat("load_model: ", path.string(), " has neither config.json nor state.json"));
}

}  // namespace moa::nn
