// moa/tokenizer/load.hpp: load_tokenizer(path) picks the loader by what `path` holds:
//   a file named *.json                           -> load_hf_tokenizer
//   a file named *.bin                            -> load_llama2c_tokenizer (all tokens in the file)
//   a directory with tokenizer.json               -> load_hf_tokenizer
//   a directory with encoder.json and vocab.bpe   -> load_gpt2_tokenizer
//   a directory with tokenizer.bin                -> load_llama2c_tokenizer
// in that order of preference. IOError naming what was looked for when nothing fits.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "moa/core/error.hpp"
#include "moa/tokenizer/bpe.hpp"
#include "moa/tokenizer/gpt2_files.hpp"
#include "moa/tokenizer/hf_json.hpp"
#include "moa/tokenizer/llama2c.hpp"
#include "moa/tokenizer/tokenizer.hpp"

namespace moa {

inline std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    const std::string ext = path.extension().string();
    if (ext == ".json") return std::make_unique<BpeTokenizer>(load_hf_tokenizer(path));
    if (ext == ".bin") return std::make_unique<Llama2cTokenizer>(load_llama2c_tokenizer(path));
    throw IOError(detail::cat("load_tokenizer: expected a .json (tokenizer.json) or .bin (llama2.c) file, got ", path.string()));
  }
  MOA_CHECK(fs::is_directory(path, ec), IOError, "load_tokenizer: expected a tokenizer file or directory at ", path.string(),
            ", got nothing");
  if (fs::is_regular_file(path / "tokenizer.json", ec)) return std::make_unique<BpeTokenizer>(load_hf_tokenizer(path / "tokenizer.json"));
  if (fs::is_regular_file(path / "encoder.json", ec) && fs::is_regular_file(path / "vocab.bpe", ec))
    return std::make_unique<BpeTokenizer>(load_gpt2_tokenizer(path));
  if (fs::is_regular_file(path / "tokenizer.bin", ec))
    return std::make_unique<Llama2cTokenizer>(load_llama2c_tokenizer(path / "tokenizer.bin"));
  throw IOError(detail::cat("load_tokenizer: expected tokenizer.json, encoder.json + vocab.bpe, or tokenizer.bin in ",
                            path.string(), ", got none of them"));
}

}  // namespace moa
