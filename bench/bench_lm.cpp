// The GPT-2 124M-shaped model (12 layers, 768 wide, vocab 50257, random weights): one full
// training step (forward, backward, AdamW) at batch 4 x 64 tokens, and decoding with the KV cache.
// The PyTorch side of the comparison is bench/torch_lm.py (same model, same shapes).
#include <benchmark/benchmark.h>

#include <moa/moa.hpp>
#include <moa/nn/transformer.hpp>
#include <moa/eval/generate.hpp>

namespace {

moa::nn::TransformerConfig gpt2_124m() { return moa::nn::TransformerConfig::gpt2(); }

void BM_gpt2_train_step(benchmark::State& state) {
  moa::set_num_threads(static_cast<int>(state.range(0)));
  moa::nn::TransformerLM model(gpt2_124m(), 1);
  moa::optim::AdamW opt(model.trainable_parameters(), {.lr = 1e-4});
  moa::Generator g(2);
  const int64_t B = 4, T = 64;
  std::vector<int32_t> ids(B * T), tg(B * T);
  for (auto& v : ids) v = static_cast<int32_t>(g.next_below(50257));
  for (auto& v : tg) v = static_cast<int32_t>(g.next_below(50257));
  const moa::Tensor x = moa::Tensor::from_vector(ids, {B, T}), y = moa::Tensor::from_vector(tg, {B, T});
  for (auto _ : state) {
    moa::Tensor loss = model.loss(x, y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    benchmark::DoNotOptimize(loss.item<float>());
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(B * T), benchmark::Counter::kIsIterationInvariantRate);
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

}  // namespace

BENCHMARK_MAIN();
