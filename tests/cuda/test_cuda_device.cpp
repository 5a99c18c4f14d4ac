// The device suite (tests/device_suite.hpp) on a real GPU: every op forward and backward, copies,
// training steps of GPT-2 and Llama-shaped models, LoRA, MoA, train_lm with a checkpoint, and
// generation, against the cpu. Compiled by the host compiler, linked with examples/cuda_backend.cu
// (the CUDA backend); CTest label `cuda`; exits 77 (skipped) without a GPU.
//
// Tolerance factors over the mock device's (whose kernels are the cpu's): 20x for ops and 50x for
// whole training steps, since float32 sums run in another order on the GPU (cuBLAS, warp
// reductions, atomics in the weight gradients); products run in full float32 here
// (MatmulPrecision::highest, no TF32).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <filesystem>

#include "../device_suite.hpp"

namespace moa::cuda {
bool linked();
}

using namespace moa;

TEST_CASE("cuda device: copies, dtypes, views, fill, errors") { device_suite::copies(Device::cuda()); }
TEST_CASE("cuda device: every op forward and backward against the cpu") { device_suite::ops(Device::cuda(), 2e-5); }
TEST_CASE("cuda device: three AdamW steps of GPT-2 and Llama-shaped models") {
  device_suite::train_steps(Device::cuda(), false, 50.0);
  device_suite::train_steps(Device::cuda(), true, 50.0);
}
TEST_CASE("cuda device: LoRA training, frozen base, merge and unmerge") { device_suite::lora_steps(Device::cuda(), 50.0); }
TEST_CASE("cuda device: MoA, MoE-LoRA, routing and generation") { device_suite::moa_steps(Device::cuda(), 50.0); }
TEST_CASE("cuda device: batched generation with the KV cache") { device_suite::generation(Device::cuda()); }
TEST_CASE("cuda device: train_lm checkpointed on the GPU and resumed") {
  device_suite::trainer(Device::cuda(), std::filesystem::temp_directory_path() / "moa_cuda_device_trainer", 50.0);
}
TEST_CASE("cuda device: a warm training step loop does no device malloc") {
  device_suite::warm_steps_no_malloc(Device::cuda());
}

int main(int argc, char** argv) {
  (void)moa::cuda::linked();
  try {
    (void)backend(Device::cuda());
  } catch (const Error& e) {
    std::printf("moa_cuda_device_tests: skipped: %s\n", e.what());
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
