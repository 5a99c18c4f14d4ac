// bench/gpu_lm.cpp (target bench_cuda_lm; bench_*.cpp names are for Google Benchmark programs): the
// issue-6 GPU targets, measured through the whole library (tensors, autograd, modules, AdamW) on
// Device::cuda(0), printed as a Markdown table. Run by bench/gpu_check.sh; compiled by the host
// compiler and linked with examples/cuda_backend.cu.
//
//   LoRA step: GPT-2 124M shape (12 x 768, vocab 50257), batch 16 x 512, rank 16 (alpha 32) on every
//     linear of the blocks, base frozen, AdamW on A and B, products in bf16 (f32 accumulation).
//     Model FLOPs per token (frozen base: forward + input gradients, no weight gradients):
//       4 (N_blocks + N_head) + 6 N_lora + 12 L T C       (attention counted as PaLM does)
//     reported against the bf16 dense peak (--peak-tflops, default 989 for H100/H200 SXM).
//   MoA step: the same model with 4 experts beside every linear, a router per layer, the batch mixing
//     4 domains (4 sequences each), the stage-2 loss; reported as its time over the LoRA step's.
//   Full fine-tuning step, same batch, and greedy decoding with the KV cache (tokens/s).
//
//   After the table, one profiled LoRA step and one MoA step: the 15 largest device calls of each
//   (moa/core/profile.hpp; --profile 0 leaves them out).
//
//   bench_cuda_lm [--batch 16] [--seq 512] [--steps 10] [--peak-tflops 989] [--precision bf16] [--profile 1]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>

#include <moa/moa.hpp>

namespace moa::cuda {
bool linked();
}

namespace {

using Clock = std::chrono::steady_clock;

std::pair<moa::Tensor, moa::Tensor> random_batch(int64_t B, int64_t T, int64_t V) {
  moa::Generator g(2);
  std::vector<int32_t> ids(static_cast<std::size_t>(B * T)), tg(ids.size());
  for (auto& v : ids) v = static_cast<int32_t>(g.next_below(static_cast<std::uint64_t>(V)));
  for (auto& v : tg) v = static_cast<int32_t>(g.next_below(static_cast<std::uint64_t>(V)));
  // On the host, as a training loop has them: checked there and uploaded (a small upload does not
  // wait for queued work; device ids and targets would be read back to be checked, each read a wait).
  return {moa::Tensor::from_vector(ids, {B, T}), moa::Tensor::from_vector(tg, {B, T})};
}

// Mean milliseconds of `steps` training steps after 3 warm-up steps (synchronised by item()).
double time_steps(moa::optim::AdamW& opt, const std::function<moa::Tensor()>& loss_of, int steps) {
  auto one = [&] {
    moa::Tensor loss = loss_of();
    opt.zero_grad();
    loss.backward();
    opt.step();
    return loss.item<double>();
  };
  for (int i = 0; i < 3; ++i) (void)one();
  const auto t0 = Clock::now();
  for (int i = 0; i < steps; ++i) (void)one();
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / steps;
}

// One more step with every device call timed (moa/core/profile.hpp): where the step's time goes.
std::string profile_step(moa::optim::AdamW& opt, const std::function<moa::Tensor()>& loss_of, moa::Device dev) {
  moa::DeviceProfile profile(dev);
  moa::Tensor loss = loss_of();
  opt.zero_grad();
  loss.backward();
  opt.step();
  (void)loss.item<double>();
  return profile.report(15);
}

void row(const char* what, double ms, const std::string& value) {
  std::printf("| %-62s | %9.2f | %-30s |\n", what, ms, value.c_str());
}

std::string fmt(const char* f, double a, double b = 0) {
  char buf[128];
  std::snprintf(buf, sizeof buf, f, a, b);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  (void)moa::cuda::linked();
  int64_t B = 16, T = 512;
  int steps = 10;
  double peak = 989.0;
  std::string precision = "bf16";
  bool profile = true;
  std::string profiles;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--profile") profile = std::string(argv[i + 1]) != "0";
    if (k == "--batch") B = std::atoll(argv[i + 1]);
    else if (k == "--seq") T = std::atoll(argv[i + 1]);
    else if (k == "--steps") steps = std::atoi(argv[i + 1]);
    else if (k == "--peak-tflops") peak = std::atof(argv[i + 1]);
    else if (k == "--precision") precision = argv[i + 1];
  }
  try {
    (void)moa::backend(moa::Device::cuda());
  } catch (const moa::Error& e) {
    std::printf("bench_cuda_lm: %s\n", e.what());
    return 77;
  }
  moa::set_matmul_precision(precision == "bf16" ? moa::MatmulPrecision::bf16
                            : precision == "tf32" ? moa::MatmulPrecision::tf32
                                                  : moa::MatmulPrecision::highest);
  const moa::Device dev = moa::Device::cuda();
  moa::nn::TransformerConfig c = moa::nn::TransformerConfig::gpt2();
  c.max_seq_len = std::max<int64_t>(1024, T);
  const double L = static_cast<double>(c.n_layers), C = static_cast<double>(c.dim);
  const double n_blocks = L * (4 * C * C + 2 * C * static_cast<double>(c.mlp_hidden()));
  const double n_head = static_cast<double>(c.vocab_size) * C;
  const double tokens = static_cast<double>(B * T);
  std::printf("GPT-2 124M shape, batch %lld x %lld, products %s, %d timed steps\n\n", static_cast<long long>(B),
              static_cast<long long>(T), precision.c_str(), steps);
  std::printf("| %-62s | %9s | %-30s |\n", "step", "ms", "throughput");
  std::printf("|%s|%s|%s|\n", std::string(64, '-').c_str(), std::string(11, '-').c_str(), std::string(32, '-').c_str());
  const auto [x, y] = random_batch(B, T, c.vocab_size);
  double lora_ms = 0;
  {
    moa::nn::TransformerLM model(c, 1);
    model.to(dev);
    moa::lora::attach_lora(model, "r16", {.rank = 16, .alpha = 32, .target_modules = "all-linear"}, 3);
    double n_lora = 0;
    for (const auto& t : model.trainable_parameters()) n_lora += static_cast<double>(t.numel());
    moa::optim::AdamW opt(model.trainable_parameters(), {.lr = 1e-4});
    lora_ms = time_steps(opt, [&] { return model.loss(x, y); }, steps);
    if (profile) profiles += "\n### LoRA step, by device call\n\n" + profile_step(opt, [&] { return model.loss(x, y); }, dev);
    const double flops = tokens * (4 * (n_blocks + n_head) + 6 * n_lora + 12 * L * static_cast<double>(T) * C);
    const double tflops = flops / (lora_ms * 1e-3) / 1e12;
    row("LoRA r16 step (all linears), model FLOPs", lora_ms, fmt("%.1f TFLOP/s = %.1f%% of peak", tflops, 100 * tflops / peak));
  }
  {
    auto base = std::make_shared<moa::nn::TransformerLM>(c, 1);
    base->to(dev);
    moa::mixture::MoAModel m(base, {.domains = {"finance", "medicine", "stackoverflow", "leetcode"}, .rank = 16,
                                    .alpha = 32, .target_modules = "attn\\..*|mlp\\..*"});
    moa::optim::AdamW opt(m.trainable_parameters(), {.lr = 1e-4});
    std::vector<int32_t> dom;
    for (int64_t b = 0; b < B; ++b) dom.push_back(static_cast<int32_t>(b % 4));
    moa::mixture::MoABatch mb{x, y, moa::Tensor::ones({B, T}, moa::DType::f32, dev), dom};
    const double ms = time_steps(opt, [&] { return m.loss(mb)[0]; }, steps);
    if (profile) profiles += "\n### MoA step, by device call\n\n" + profile_step(opt, [&] { return m.loss(mb)[0]; }, dev);
    row("MoA step, 4 experts, batch mixing 4 domains", ms, fmt("%.3fx the LoRA step (target <= 1.1)", ms / lora_ms));
  }
  {
    moa::nn::TransformerLM model(c, 1);
    model.to(dev);
    moa::optim::AdamW opt(model.trainable_parameters(), {.lr = 1e-4});
    const double ms = time_steps(opt, [&] { return model.loss(x, y); }, steps);
    const double flops = tokens * (6 * (n_blocks + n_head) + 12 * L * static_cast<double>(T) * C);
    row("full fine-tuning step, model FLOPs", ms, fmt("%.1f TFLOP/s", flops / (ms * 1e-3) / 1e12));
  }
  {
    moa::nn::TransformerLM model(c, 1);
    model.to(dev);
    const int64_t n = 64;
    (void)moa::eval::generate(model, {{464, 2068, 7586, 21831}}, {.max_new_tokens = 4});
    const auto t0 = Clock::now();
    (void)moa::eval::generate(model, {{464, 2068, 7586, 21831}}, {.max_new_tokens = n});
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    row("greedy decoding with the KV cache, batch 1, 64 tokens", ms, fmt("%.1f tokens/s", 1000.0 * n / ms));
  }
  std::printf("\ndevice mallocs: %lld (the caching allocator reuses blocks across steps)\n",
              static_cast<long long>(moa::backend(dev).device_malloc_count(0)));
  // The profiled steps wait for the device around every call, so they run slower than the timed
  // ones; the split is what they are for.
  std::fputs(profiles.c_str(), stdout);
  return 0;
}
