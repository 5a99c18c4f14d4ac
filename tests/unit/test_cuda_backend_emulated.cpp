// The whole CUDA backend (moa/kernels/cuda/backend.cuh through <moa/cuda.cuh>: every kernel with its
// launcher, the caching allocator, the layout and pointer caches, the cuBLAS calls) compiled by the
// host compiler over tests/unit/cuda_emulator.hpp's CUDA runtime and cuBLAS, and run through the
// device suite (tests/device_suite.hpp) against the cpu: every op forward and backward, copies,
// training steps of GPT-2 and Llama-shaped models, LoRA, MoA, generation, train_lm with a
// checkpoint. The same suite runs on a real GPU in tests/cuda/test_cuda_device.cpp, with the same
// tolerance factors; what the emulator cannot show is what only the GPU does (speed, nvcc's code).
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "cuda_emulator.hpp"
// after the emulator
#include "../device_suite.hpp"
#include "moa/cuda.cuh"

using namespace moa;

namespace {

struct PrecisionScope {
  explicit PrecisionScope(MatmulPrecision p) : saved(matmul_precision()) { set_matmul_precision(p); }
  ~PrecisionScope() { set_matmul_precision(saved); }
  MatmulPrecision saved;
};

}  // namespace

TEST_CASE("emulated cuda device: copies, dtypes, views, fill, errors") {
  REQUIRE(moa::cuda::init());
  device_suite::copies(Device::cuda());
}
TEST_CASE("emulated cuda device: every op forward and backward against the cpu") {
  device_suite::ops(Device::cuda(), 2e-5);
}
TEST_CASE("emulated cuda device: three AdamW steps of GPT-2 and Llama-shaped models") {
  device_suite::train_steps(Device::cuda(), false, 50.0);
  device_suite::train_steps(Device::cuda(), true, 50.0);
}
TEST_CASE("emulated cuda device: LoRA training, frozen base, merge and unmerge") {
  device_suite::lora_steps(Device::cuda(), 50.0);
}
TEST_CASE("emulated cuda device: MoA, MoE-LoRA, routing and generation") {
  device_suite::moa_steps(Device::cuda(), 50.0);
}
TEST_CASE("emulated cuda device: batched generation with the KV cache") { device_suite::generation(Device::cuda()); }
TEST_CASE("emulated cuda device: train_lm checkpointed on the device and resumed") {
  device_suite::trainer(Device::cuda(), std::filesystem::temp_directory_path() / "moa_emulated_cuda_trainer", 50.0);
}

TEST_CASE("emulated cuda device: the work runs as kernels and emulated cuBLAS calls on device memory") {
  const Tensor a = device_suite::rnd({5, 7}, 1).to(Device::cuda()), b = device_suite::rnd({7, 3}, 2).to(Device::cuda());
  const std::int64_t launches = moa_emu::launch_count();
  const Tensor c = relu(matmul(a, b));
  CHECK(moa_emu::launch_count() > launches);  // relu is a kernel; matmul is the emulated cuBLAS
  CHECK(moa_emu::is_device_pointer(c.data<float>()));
  CHECK(moa::cuda::allocator_stats(0).malloc_count > 0);
  CHECK(device_suite::rel(c, relu(matmul(a.to(Device::cpu()), b.to(Device::cpu())))) < 1e-6);
}

TEST_CASE("emulated cuda device: a warm training step loop does no device malloc") {
  device_suite::warm_steps_no_malloc(Device::cuda());
}

// MatmulPrecision::bf16 is what the GPU benchmark trains with: cuBLAS products with bf16 inputs
// (emulated: inputs rounded to bf16, float32 sums) and, for 16 or more queries, the tensor-core
// attention (flash_attention.cuh). Against the cpu's float32: errors of bf16 rounding, 1e-4 to 2e-2
// of the largest value; under `highest` the same ops stay within float32 rounding.
TEST_CASE("emulated cuda device: bf16 products and tensor-core attention against the cpu's float32") {
  using V = std::vector<Tensor>;
  const auto attention = [](const V& x) { return causal_attention(x[0], x[1], x[2]); };
  struct Case {
    const char* name;
    V inputs;
  };
  const std::vector<Case> cases = {
      {"GQA, 20 queries, head 16",
       {device_suite::rnd({2, 4, 20, 16}, 1), device_suite::rnd({2, 2, 20, 16}, 2),
        device_suite::rnd({2, 2, 20, 16}, 3)}},
      {"KV cache, 17 queries over 40 keys, head 40",
       {device_suite::rnd({1, 2, 17, 40}, 4), device_suite::rnd({1, 2, 40, 40}, 5),
        device_suite::rnd({1, 2, 40, 40}, 6)}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    {
      const PrecisionScope bf16(MatmulPrecision::bf16);
      device_suite::check_op(c.name, Device::cuda(), c.inputs, {true, true, true}, attention, 2e-2);
      const Tensor got =
          attention({c.inputs[0].to(Device::cuda()), c.inputs[1].to(Device::cuda()), c.inputs[2].to(Device::cuda())});
      CHECK(device_suite::rel(got, attention(c.inputs)) > 1e-4);  // the bf16 tensor-core path ran
    }
    device_suite::check_op(c.name, Device::cuda(), c.inputs, {true, true, true}, attention, 2e-5);
  }
  const PrecisionScope bf16(MatmulPrecision::bf16);
  device_suite::check_op(
      "matmul A B^T", Device::cuda(), {device_suite::rnd({3, 33, 65}, 7), device_suite::rnd({17, 65}, 8)}, {true, true},
      [](const V& x) { return matmul(x[0], x[1].transpose(0, 1)); }, 2e-2);
}

TEST_CASE("emulated cuda device: a LoRA training step in bf16 follows the cpu's float32 one") {
  nn::TransformerLM mc(device_suite::tiny(true), 4), md(device_suite::tiny(true), 4);
  md.to(Device::cuda());
  const lora::LoRAConfig cfg{.rank = 4, .alpha = 8, .target_modules = "q_proj|v_proj|down_proj"};
  lora::attach_lora(mc, "a", cfg, 9);
  lora::attach_lora(md, "a", cfg, 9);
  const PrecisionScope bf16(MatmulPrecision::bf16);
  const Tensor x = device_suite::ids({2, 20}, 23, 31), y = device_suite::ids({2, 20}, 23, 32);
  Tensor lc = mc.loss(x, y), ld = md.loss(x, y);
  CHECK(std::abs(ld.item<double>() - lc.item<double>()) <= 1e-2 * std::abs(lc.item<double>()));
  lc.backward();
  ld.backward();
  const auto pc = mc.named_parameters(), pd = md.named_parameters();
  REQUIRE(pc.size() == pd.size());
  for (std::size_t i = 0; i < pc.size(); ++i) {
    if (!pc[i].second.requires_grad()) continue;
    CAPTURE(pc[i].first);
    CHECK(device_suite::rel(pd[i].second.grad(), pc[i].second.grad(), 1e-3) < 5e-2);
  }
}

TEST_CASE("emulated cuda device: a full device is a DeviceError naming cudaMalloc, and the device recovers") {
  backend(Device::cuda()).empty_cache(0);
  const std::size_t in_use = moa_emu::device_bytes_in_use();
  moa_emu::set_device_memory(in_use + (std::size_t(1) << 20));
  std::string message;
  try {
    (void)Tensor::zeros({1 << 20}, DType::f32, Device::cuda());  // 4 MiB
  } catch (const DeviceError& e) {
    message = e.what();
  }
  moa_emu::set_device_memory(std::size_t(8) << 30);
  CHECK(message.find("cudaMalloc") != std::string::npos);
  CHECK(message.find("cudaErrorMemoryAllocation") != std::string::npos);
  const Tensor t = Tensor::full({1 << 20}, 2.0, DType::f32, Device::cuda());
  CHECK(sum(t).item<double>() == doctest::Approx(2.0 * (1 << 20)));
}
