// The transformer against Hugging Face transformers (PyTorch, float32) on tiny random GPT-2 and
// Llama checkpoints: logits, loss, every parameter gradient and greedy tokens
// (fixtures: tests/fixtures/lm/gen_lm_fixtures.py).
#include <doctest/doctest.h>

#include <algorithm>
#include <string>

#include "moa/eval/generate.hpp"
#include "moa/io/safetensors.hpp"
#include "moa/nn/pretrained.hpp"
#include "test_util.hpp"

using namespace moa;

namespace {

void check_model(const std::string& name) {
  const std::string dir = std::string(MOA_TEST_FIXTURES) + "/lm/" + name;
  nn::Pretrained p = nn::load_hf_pretrained(dir);
  auto ref = io::load_safetensors(dir + "/reference.safetensors").tensors;
  nn::TransformerLM& model = *p.model;
  model.eval();
  const Tensor ids = ref.at("ids"), targets = ref.at("targets");
  const Tensor logits = model.forward(ids);
  INFO(name);
  CHECK(test::rel_err(logits, ref.at("logits")) < 1e-4);
  const Tensor loss = cross_entropy(logits, targets);
  CHECK(std::abs(loss.item<double>() - ref.at("loss").item<double>()) < 1e-4 * ref.at("loss").item<double>());
  model.zero_grad();
  loss.backward();
  nn::NamedTensors grads;
  for (auto& [n, t] : model.named_parameters()) {
    REQUIRE_MESSAGE(t.grad().defined(), n);
    grads.emplace_back(n, t.grad());
  }
  const auto hf_grads = nn::state_to_hf(grads, p.info);
  int checked = 0;
  for (auto& [n, t] : ref) {
    if (n.rfind("grad.", 0) != 0) continue;
    const std::string hn = n.substr(5);
    REQUIRE_MESSAGE(hf_grads.count(hn), hn);
    INFO(hn);
    CHECK(test::rel_err(hf_grads.at(hn), t) < 1e-4);
    ++checked;
  }
  CHECK(checked == static_cast<int>(hf_grads.size()));
  // Greedy generation with the KV cache, one prompt at a time and both in one batch.
  std::vector<std::vector<int32_t>> prompts, expected;
  for (const char* k : {"greedy.0", "greedy.1"}) {
    const auto all = ref.at(k).to_vector<int32_t>();
    const std::size_t plen = std::string(k) == "greedy.0" ? 5 : 2;
    prompts.emplace_back(all.begin(), all.begin() + static_cast<long>(plen));
    expected.emplace_back(all.begin() + static_cast<long>(plen), all.end());
  }
  for (std::size_t i = 0; i < prompts.size(); ++i)
    CHECK(eval::generate(model, {prompts[i]}, {.max_new_tokens = 8})[0] == expected[i]);
  CHECK(eval::generate(model, prompts, {.max_new_tokens = 8}) == expected);
}

}  // namespace

TEST_CASE("GPT-2 matches Hugging Face: logits, loss, all gradients, greedy tokens") { check_model("gpt2"); }
TEST_CASE("Llama (GQA, RoPE, SwiGLU, RMSNorm) matches Hugging Face: logits, loss, all gradients, greedy tokens") {
  check_model("llama");
}
