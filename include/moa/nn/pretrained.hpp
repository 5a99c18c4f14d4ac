// moa/nn/pretrained.hpp: load a Hugging Face checkpoint directory (config.json +
// model.safetensors, or a sharded model.safetensors.index.json) into a TransformerLM, and save one.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "moa/io/hf_checkpoint.hpp"
#include "moa/nn/hf_names.hpp"
#include "moa/nn/transformer.hpp"

namespace moa::nn {

struct Pretrained {
  std::shared_ptr<TransformerLM> model;
  HfModelInfo info;
};

// Loads a HF GPT-2 / Llama-family checkpoint directory. Shapes are checked against config.json;
// unknown tensor names are errors.
inline Pretrained load_hf_pretrained(const std::filesystem::path& dir) {
  MOA_CHECK(std::filesystem::is_directory(dir), IOError, "load_hf_pretrained: ", dir.string(), " is not a directory");
  Pretrained p;
  const io::HfCheckpoint ck = io::load_hf_checkpoint(dir);
  p.info = config_from_hf(ck.config);
  p.model = std::make_shared<TransformerLM>(p.info.config);
  std::map<std::string, Tensor> ours = state_from_hf(ck.tensors, p.info);
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
