// A real pretrained model: karpathy's stories260K (llama2.c format, tok512 tokenizer). Greedy
// decoding must reproduce, token for token, the temperature-0 sample in stories260K.md.
#include <doctest/doctest.h>

#include <fstream>
#include <sstream>

#include "moa/eval/generate.hpp"
#include "moa/io/llama2c.hpp"
#include "moa/nn/hf_names.hpp"
#include "moa/nn/transformer.hpp"
#include "moa/tokenizer/llama2c.hpp"
#include "test_util.hpp"

using namespace moa;

namespace {

// The sample printed by `./run stories260K.bin -z tok512.bin -t 0.0`, from the model card.
std::string documented_sample(const std::filesystem::path& md) {
  std::ifstream in(md);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  const std::string cmd = "-t 0.0\n";
  const auto at = text.find(cmd);
  REQUIRE(at != std::string::npos);
  const auto begin = at + cmd.size();
  const auto end = text.find("```", begin);
  REQUIRE(end != std::string::npos);
  std::string s = text.substr(begin, end - begin);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace

TEST_CASE("stories260K: greedy decoding reproduces the documented temperature-0 sample exactly") {
  const auto dir = test::shared_dir() / "models" / "stories260K";
  if (!std::filesystem::exists(dir / "stories260K.bin")) {
    MESSAGE("skipped: " << dir << " not found (set MOA_SHARED_DIR)");
    return;
  }
  const io::Llama2cModel ck = io::load_llama2c(dir / "stories260K.bin");
  const nn::HfModelInfo info = nn::config_from_hf(io::llama2c_hf_config(ck.config));
  nn::TransformerLM model(info.config);
  model.load_state_dict(nn::state_from_hf(std::map<std::string, Tensor>(ck.weights.begin(), ck.weights.end()), info));
  const auto tok = load_llama2c_tokenizer(dir / "tok512.bin", static_cast<int32_t>(ck.config.vocab_size));

  // run.c: start from BOS (1); each of its 256 steps forwards one position and samples one token;
  // a sampled BOS ends the text.
  const auto out = eval::generate(model, {{1}}, {.max_new_tokens = 256, .stop_tokens = {1}});
  std::vector<int32_t> ids = out[0];
  if (!ids.empty() && ids.back() == 1) ids.pop_back();
  std::string text;
  int32_t prev = 1;
  for (int32_t id : ids) {
    text += tok.decode_token(id, prev);
    prev = id;
  }
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  const std::string expected = documented_sample(dir / "stories260K.md");
  CHECK(text == expected);
  CHECK(text.rfind("Once upon a time, there was a little girl named Lily.", 0) == 0);
}
