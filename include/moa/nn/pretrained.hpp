// moa/nn/pretrained.hpp: load a Hugging Face checkpoint directory (config.json +
// model.safetensors, or a sharded model.safetensors.index.json) into a TransformerLM, and save one.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "moa/io/safetensors.hpp"
#include "moa/nn/hf_names.hpp"
#include "moa/nn/transformer.hpp"

namespace moa::nn {

struct Pretrained {
  std::shared_ptr<TransformerLM> model;
  HfModelInfo info;
};

inline nlohmann::json read_json_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  MOA_CHECK(in.good(), IOError, "cannot open ", path.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw IOError(::moa::detail::cat(path.string(), ": malformed JSON: ", e.what()));
  }
}

// The tensors of a checkpoint directory: model.safetensors, or the shards an index names.
inline std::map<std::string, Tensor> read_hf_weights(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const fs::path single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
  if (fs::exists(single)) return io::load_safetensors(single).tensors;
  if (fs::exists(index)) {
    const nlohmann::json j = read_json_file(index);
    MOA_CHECK(j.contains("weight_map") && j["weight_map"].is_object(), IOError, index.string(),
              ": expected a 'weight_map' object");
    std::set<std::string> shards;
    for (auto& [name, file] : j["weight_map"].items()) shards.insert(file.get<std::string>());
    std::map<std::string, Tensor> all;
    for (const std::string& s : shards)
      for (auto& [n, t] : io::load_safetensors(dir / s).tensors) all[n] = t;
    return all;
  }
  MOA_CHECK(!fs::exists(dir / "pytorch_model.bin"), IOError, dir.string(),
            ": only safetensors checkpoints are supported; convert pytorch_model.bin with "
            "transformers (model.save_pretrained(dir, safe_serialization=True))");
  throw IOError(::moa::detail::cat(dir.string(), ": no model.safetensors or model.safetensors.index.json"));
}

// Loads a HF GPT-2 / Llama-family checkpoint directory. Shapes are checked against config.json;
// unknown tensor names are errors.
inline Pretrained load_hf_pretrained(const std::filesystem::path& dir) {
  MOA_CHECK(std::filesystem::is_directory(dir), IOError, "load_hf_pretrained: ", dir.string(), " is not a directory");
  Pretrained p;
  p.info = config_from_hf(read_json_file(dir / "config.json"));
  p.model = std::make_shared<TransformerLM>(p.info.config);
  std::map<std::string, Tensor> ours = state_from_hf(read_hf_weights(dir), p.info);
  for (auto& [n, t] : ours) {
    MOA_CHECK(is_floating(t.dtype()), ValueError, "load_hf_pretrained: tensor '", n, "' has dtype ", dtype_name(t.dtype()));
  }
  const std::string where = dir.string() + ": the weights do not fit config.json: ";
  try {
    p.model->load_state_dict(ours, true);
  } catch (const ShapeError& e) {
    throw ShapeError(where + e.what());
  } catch (const IndexError& e) {
    throw IndexError(where + e.what());
  } catch (const ValueError& e) {
    throw ValueError(where + e.what());
  }
  return p;
}

}  // namespace moa::nn
