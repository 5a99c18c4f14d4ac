// bench/device_calls.cpp: the device calls of one LoRA and one MoA training step, counted on the
// CUDA backend running on the CPU emulator (tests/unit/cuda_emulator.hpp), so without a GPU. On a
// GPU every call costs a launch and every copy a full pass over memory: these counts (the `calls`
// column of moa::DeviceProfile's report; its times are the emulator's, meaningless) are what
// bench/RESULTS.md's "Device calls per training step" table reports. A 12-layer GPT-2-shaped model
// at dim 64: the 124M model's layers, small enough to emulate in seconds. Not built by CMake:
//
//   g++ -std=c++20 -O1 -fopenmp -Iinclude -Itests/unit bench/device_calls.cpp -o /tmp/device_calls -lz -pthread
//   OMP_NUM_THREADS=2 /tmp/device_calls
#include "cuda_emulator.hpp"
// after the emulator
#include <cstdio>
#include <moa/cuda.cuh>
#include <moa/moa.hpp>

namespace {

// On the host, as a training loop has them (device ones would be read back to be checked).
std::pair<moa::Tensor, moa::Tensor> batch(int64_t B, int64_t T, int64_t V) {
  moa::Generator g(2);
  std::vector<int32_t> ids(static_cast<std::size_t>(B * T)), tg(ids.size());
  for (auto& v : ids) v = static_cast<int32_t>(g.next_below(static_cast<std::uint64_t>(V)));
  for (auto& v : tg) v = static_cast<int32_t>(g.next_below(static_cast<std::uint64_t>(V)));
  return {moa::Tensor::from_vector(ids, {B, T}), moa::Tensor::from_vector(tg, {B, T})};
}

// One warm-up step, then one profiled step: its device calls by method.
void profile(const char* title, moa::optim::AdamW& opt, const std::function<moa::Tensor()>& loss, moa::Device dev) {
  auto step = [&] {
    moa::Tensor l = loss();
    opt.zero_grad();
    l.backward();
    opt.step();
    return l.item<double>();
  };
  (void)step();
  const std::int64_t launches = moa_emu::launch_count();
  moa::DeviceProfile p(dev);
  const double l = step();
  std::printf("\n### %s (loss %.6f, %lld kernel launches)\n\n%s", title, l,
              static_cast<long long>(moa_emu::launch_count() - launches), p.report(40).c_str());
}

// One profiled step of `c` with rank-16 LoRA on every linear, batch 2 x 32.
void lora_step(const char* title, const moa::nn::TransformerConfig& c, moa::Device dev) {
  const auto [x, y] = batch(2, 32, c.vocab_size);
  moa::nn::TransformerLM model(c, 1);
  model.to(dev);
  moa::lora::attach_lora(model, "r16", {.rank = 16, .alpha = 32, .target_modules = "all-linear"}, 3);
  moa::optim::AdamW opt(model.trainable_parameters(), {.lr = 1e-4});
  profile(
      title, opt, [&] { return model.loss(x, y); }, dev);
}

}  // namespace

int main() {
  moa::set_matmul_precision(moa::MatmulPrecision::bf16);
  const moa::Device dev = moa::Device::cuda();
  moa::nn::TransformerConfig c = moa::nn::TransformerConfig::gpt2();
  c.dim = 64;
  c.n_heads = 4;
  c.vocab_size = 512;
  c.max_seq_len = 64;
  lora_step("LoRA step, 72 adapters, batch 2 x 32", c, dev);
  // the paper's models are Llama-shaped: RoPE, SwiGLU, RMSNorm, no biases, untied head
  moa::nn::TransformerConfig lc = moa::nn::TransformerConfig::llama();
  lc.dim = 64;
  lc.n_layers = 12;
  lc.n_heads = 4;
  lc.n_kv_heads = 2;
  lc.hidden_dim = 176;
  lc.vocab_size = 512;
  lc.max_seq_len = 64;
  lora_step("Llama-shaped LoRA step (12 layers, GQA 4/2 heads, RoPE), batch 2 x 32", lc, dev);
  {
    const int64_t B = 4;
    const auto [x, y] = batch(B, 32, c.vocab_size);
    auto base = std::make_shared<moa::nn::TransformerLM>(c, 1);
    base->to(dev);
    moa::mixture::MoAModel m(base, {.domains = {"finance", "medicine", "stackoverflow", "leetcode"}, .rank = 16,
                                    .alpha = 32, .target_modules = "attn\\..*|mlp\\..*"});
    moa::optim::AdamW opt(m.trainable_parameters(), {.lr = 1e-4});
    std::vector<int32_t> dom;
    for (int64_t b = 0; b < B; ++b) dom.push_back(static_cast<int32_t>(b % 4));
    moa::mixture::MoABatch mb{x, y, moa::Tensor::ones({B, 32}), dom};
    profile("MoA step, 4 experts, batch 4 x 32 from 4 domains", opt, [&] { return m.loss(mb)[0]; }, dev);
  }
}
