// The GPT-2 124M-shaped model (12 layers, 768 wide, vocab 50257, random weights): one full
// training step (forward, backward, AdamW) at batch 4 x 64 tokens, and decoding with the KV cache.
// LoRA: rank 16 (alpha 32) on every linear of the blocks, base frozen, AdamW on A and B, same batch.
// MoA: 4 experts of that LoRA beside every linear, a router per layer, the batch mixing all 4
// domains (one sequence each), the stage-2 loss L_LM + eta L_cls; its time over the LoRA step's is
// the cost of the mixture.
// The PyTorch side of the comparison is bench/torch_lm.py (same model, same shapes; LoRA by PEFT).
#include <benchmark/benchmark.h>

#include <moa/moa.hpp>
#include <moa/nn/transformer.hpp>
#include <moa/eval/generate.hpp>

namespace {

moa::nn::TransformerConfig gpt2_124m() { return moa::nn::TransformerConfig::gpt2(); }

std::pair<moa::Tensor, moa::Tensor> random_batch(int64_t B, int64_t T) {
  moa::Generator g(2);
  std::vector<int32_t> ids(static_cast<std::size_t>(B * T)), tg(ids.size());
  for (auto& v : ids) v = static_cast<int32_t>(g.next_below(50257));
  for (auto& v : tg) v = static_cast<int32_t>(g.next_below(50257));
  return {moa::Tensor::from_vector(ids, {B, T}), moa::Tensor::from_vector(tg, {B, T})};
}

// Times training steps: loss_of() builds the loss, then backward and the optimizer step.
template <class LossOf>
void time_steps(benchmark::State& state, moa::optim::AdamW& opt, LossOf&& loss_of) {
  for (auto _ : state) {
    moa::Tensor loss = loss_of();
    opt.zero_grad();
    loss.backward();
    opt.step();
    benchmark::DoNotOptimize(loss.item<float>());
  }
  state.counters["tokens/s"] = benchmark::Counter(256.0, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_gpt2_train_step(benchmark::State& state) {
  moa::set_num_threads(static_cast<int>(state.range(0)));
  moa::nn::TransformerLM model(gpt2_124m(), 1);
  moa::optim::AdamW opt(model.trainable_parameters(), {.lr = 1e-4});
  const auto [x, y] = random_batch(4, 64);
  time_steps(state, opt, [&] { return model.loss(x, y); });
}
BENCHMARK(BM_gpt2_train_step)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(5.0);

void BM_gpt2_decode(benchmark::State& state) {
  moa::set_num_threads(static_cast<int>(state.range(0)));
  moa::nn::TransformerLM model(gpt2_124m(), 1);
  const int64_t new_tokens = 32;
  for (auto _ : state) {
    auto out = moa::eval::generate(model, {{464, 2068, 7586, 21831}}, {.max_new_tokens = new_tokens});
    benchmark::DoNotOptimize(out);
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(new_tokens), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_gpt2_decode)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);

void BM_gpt2_lora_step(benchmark::State& state) {
  moa::set_num_threads(static_cast<int>(state.range(0)));
  moa::nn::TransformerLM model(gpt2_124m(), 1);
  moa::lora::attach_lora(model, "r16", {.rank = 16, .alpha = 32, .target_modules = "all-linear"}, 3);
  moa::optim::AdamW opt(model.trainable_parameters(), {.lr = 1e-4});
  const auto [x, y] = random_batch(4, 64);
  time_steps(state, opt, [&] { return model.loss(x, y); });
}
BENCHMARK(BM_gpt2_lora_step)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(5.0);

void BM_gpt2_moa_step(benchmark::State& state) {
  moa::set_num_threads(static_cast<int>(state.range(0)));
  auto base = std::make_shared<moa::nn::TransformerLM>(gpt2_124m(), 1);
  moa::mixture::MoAModel moa_model(base, {.domains = {"finance", "medicine", "stackoverflow", "leetcode"},
                                          .rank = 16, .alpha = 32, .target_modules = "attn\\..*|mlp\\..*"});
  moa::optim::AdamW opt(moa_model.trainable_parameters(), {.lr = 1e-4});
  const auto [x, y] = random_batch(4, 64);
  moa::mixture::MoABatch b{x, y, moa::Tensor::ones({4, 64}), {0, 1, 2, 3}};
  time_steps(state, opt, [&] { return moa_model.loss(b)[0]; });
}
BENCHMARK(BM_gpt2_moa_step)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(5.0);

// One layer's attention, forward and backward, at the steps' shape (batch 4 x 64, 12 heads of 64)
// from (B, T, H * D) projection outputs viewed as heads: arg 0 reads them in place and merges the
// output heads with a view (what causal_attention does); arg 1 makes the copies it made before it
// read strided heads: q, k, v contiguous, the output in (B, H, T, D) rows and merged by a copy, and
// the gradients copied back the same ways.
void BM_attention_heads(benchmark::State& state) {
  moa::set_num_threads(2);
  moa::Generator g(4);
  const int64_t B = 4, T = 64, H = 12, D = 64;
  moa::Tensor xq = moa::Tensor::randn({B, T, H * D}, g).set_requires_grad();
  moa::Tensor xk = moa::Tensor::randn({B, T, H * D}, g).set_requires_grad();
  moa::Tensor xv = moa::Tensor::randn({B, T, H * D}, g).set_requires_grad();
  const moa::Tensor w = moa::Tensor::randn({B, T, H * D}, g);
  const bool copies = state.range(0) == 1;
  auto heads = [&](const moa::Tensor& x) {
    moa::Tensor h = x.view({B, T, H, D}).transpose(1, 2);
    return copies ? h.contiguous() : h;
  };
  for (auto _ : state) {
    moa::Tensor o = moa::causal_attention(heads(xq), heads(xk), heads(xv));
    if (copies) o = o.contiguous();  // (B, H, T, D) rows, as the op wrote them before
    moa::Tensor y = o.transpose(1, 2).reshape({B, T, H * D});
    moa::sum(y * w).backward();
    xq.zero_grad();
    xk.zero_grad();
    xv.zero_grad();
  }
  state.SetLabel(copies ? "contiguous copies of the heads" : "heads read in place");
}
BENCHMARK(BM_attention_heads)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
