// moa/io/hf_checkpoint.hpp: the weights and config.json of a Hugging Face checkpoint directory
// (what `save_pretrained` writes): config.json plus model.safetensors, or a sharded
// model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor name: shard file}}) and
// its shards. Only safetensors checkpoints are read; PyTorch pickles (pytorch_model.bin) are refused
// with the command that converts them. Mapping names and config fields onto a model, and checking
// shapes against the config, is the model code's business (moa/nn/...).
#pragma once

#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/core/tensor.hpp"
#include "moa/io/file.hpp"
#include "moa/io/safetensors.hpp"

namespace moa::io {

struct HfCheckpointOptions {
  // Widen F64 tensors to f32 too (BF16 and F16 always are), so that every floating tensor is f32.
  bool f32 = true;
  // Copy tensors instead of viewing the files' (copy-on-write) mappings.
  bool copy = false;
};

struct HfCheckpoint {
  nlohmann::json config;                     // config.json as is
  TensorMap tensors;                         // the checkpoint's names
  std::vector<std::filesystem::path> files;  // the safetensors files read
};

namespace detail {

inline nlohmann::json read_json_file(const std::filesystem::path& path, const char* op) {
  const std::string text = read_text_file(path, op);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw IOError(cat(op, ": ", path, ": malformed JSON: ", e.what()));
  }
}

inline std::string hf_convert_hint(const std::filesystem::path& dir) {
  return cat("only safetensors checkpoints are supported; convert ", dir,
             " with: python -c \"import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('", dir.string(),
             "'); m.save_pretrained('OUT_DIR', safe_serialization=True)\" (and copy the tokenizer files)");
}

inline Tensor hf_tensor(const SafetensorsReader& r, const std::string& name, const HfCheckpointOptions& o) {
  Tensor t = r.load(name, {.keep_bf16 = false, .copy = o.copy});
  if (o.f32 && t.dtype() == DType::f64) t = t.to(DType::f32);
  return t;
}

}  // namespace detail

// The weights of a checkpoint directory (config.json not needed).
inline TensorMap load_hf_weights(const std::filesystem::path& dir, const HfCheckpointOptions& options = {},
                                 std::vector<std::filesystem::path>* files = nullptr) {
  namespace fs = std::filesystem;
  std::error_code ec;
  MOA_CHECK(fs::is_directory(dir, ec), IOError, "load_hf_checkpoint: ", dir, " is not a directory");
  const fs::path single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
  TensorMap out;
  if (fs::exists(single, ec)) {
    SafetensorsReader r(single);
    for (const auto& e : r.entries()) out.emplace(e.name, detail::hf_tensor(r, e.name, options));
    if (files) files->push_back(single);
    return out;
  }
  if (fs::exists(index, ec)) {
    const nlohmann::json j = detail::read_json_file(index, "load_hf_checkpoint");
    MOA_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), IOError,
              "load_hf_checkpoint: ", index, ": expected an object with a \"weight_map\" object");
    std::map<std::string, std::vector<std::string>> by_shard;  // shard -> names
    for (const auto& [name, shard] : j["weight_map"].items()) {
      MOA_CHECK(shard.is_string(), IOError, "load_hf_checkpoint: ", index, ": weight_map[\"", name,
                "\"] must be a file name, got ", shard.dump());
      const fs::path s = shard.get<std::string>();
      bool plain = !s.empty() && s.is_relative();
      for (const auto& part : s) plain = plain && part != "..";
      MOA_CHECK(plain, IOError, "load_hf_checkpoint: ", index, ": shard ", s, " of '", name,
                "' must be a file inside the checkpoint directory");
      by_shard[s.string()].push_back(name);
    }
    for (const auto& [shard, names] : by_shard) {
      const fs::path p = dir / shard;
      MOA_CHECK(fs::exists(p, ec), IOError, "load_hf_checkpoint: ", index, " names the shard ", shard, " (for '",
                names.front(), "' and ", names.size() - 1, " more), which does not exist in ", dir);
      SafetensorsReader r(p);
      for (const auto& name : names) {
        MOA_CHECK(r.contains(name), IOError, "load_hf_checkpoint: ", index, " puts '", name, "' in ", p,
                  ", which has no such tensor");
        out.emplace(name, detail::hf_tensor(r, name, options));
      }
      if (files) files->push_back(p);
    }
    return out;
  }
  const bool pickle = fs::exists(dir / "pytorch_model.bin", ec) || fs::exists(dir / "pytorch_model.bin.index.json", ec);
  MOA_CHECK(!pickle, IOError, "load_hf_checkpoint: ", dir, " holds pytorch_model.bin: ", detail::hf_convert_hint(dir));
  throw IOError(detail::cat("load_hf_checkpoint: ", dir, " has neither model.safetensors nor model.safetensors.index.json"));
}

// config.json and the weights of a checkpoint directory.
inline HfCheckpoint load_hf_checkpoint(const std::filesystem::path& dir, const HfCheckpointOptions& options = {}) {
  HfCheckpoint c;
  const std::filesystem::path cfg = dir / "config.json";
  std::error_code ec;
  MOA_CHECK(std::filesystem::is_directory(dir, ec), IOError, "load_hf_checkpoint: ", dir, " is not a directory");
  MOA_CHECK(std::filesystem::exists(cfg, ec), IOError, "load_hf_checkpoint: ", dir,
            " has no config.json (expected a Hugging Face checkpoint directory, as save_pretrained writes)");
  c.config = detail::read_json_file(cfg, "load_hf_checkpoint");
  MOA_CHECK(c.config.is_object(), IOError, "load_hf_checkpoint: ", cfg, ": expected a JSON object, got ",
            c.config.type_name());
  c.tensors = load_hf_weights(dir, options, &c.files);
  return c;
}

}  // namespace moa::io
