// The device paths of every op, copy, module, optimiser, LoRA, MoA and generation, run on
// MockDevice (a backend with the cpu's kernels whose "device" pointers crash when the host touches
// them) and compared with the cpu: see tests/device_suite.hpp. The same suite runs on a real GPU
// in tests/cuda/test_cuda_device.cu.
#include <doctest/doctest.h>

#include "../device_suite.hpp"
#include "mock_device.hpp"

using namespace moa;

TEST_CASE("device: without a backend, a cuda tensor is a clear DeviceError naming moa/cuda.cuh") {
  if (backend_available(DeviceType::cuda)) return;  // a real backend is linked into this binary
  try {
    (void)Tensor::zeros({2}, DType::f32, Device::cuda());
    FAIL("expected DeviceError");
  } catch (const DeviceError& e) {
    CHECK(std::string(e.what()).find("moa/cuda.cuh") != std::string::npos);
  }
  CHECK(parse_device("cuda:3") == Device::cuda(3));
  CHECK(parse_device("cpu") == Device::cpu());
  CHECK_THROWS_AS(parse_device("gpu"), ValueError);
  CHECK_THROWS_AS(parse_device("cuda:x"), ValueError);
}

TEST_CASE("device (mock): copies, dtypes, views, fill, errors") {
  testing::MockDeviceScope mock;
  device_suite::copies(Device::cuda());
  CHECK(mock.device.uploads > 0);
  CHECK(mock.device.downloads > 0);
}

TEST_CASE("device (mock): every op forward and backward equals the cpu") {
  testing::MockDeviceScope mock;
  device_suite::ops(Device::cuda(), 1e-5);  // summation order differs in a few reductions
  CHECK(mock.device.kernel_calls > 0);
}

TEST_CASE("device (mock): three AdamW steps of GPT-2 and Llama-shaped models equal the cpu") {
  testing::MockDeviceScope mock;
  device_suite::train_steps(Device::cuda(), false, 1.0);
  device_suite::train_steps(Device::cuda(), true, 1.0);
}

TEST_CASE("device (mock): LoRA training, frozen base, merge and unmerge") {
  testing::MockDeviceScope mock;
  device_suite::lora_steps(Device::cuda(), 1.0);
}

TEST_CASE("device (mock): MoA stage-2 loss, gradients, routing, MoE-LoRA and generation") {
  testing::MockDeviceScope mock;
  device_suite::moa_steps(Device::cuda(), 1.0);
}

TEST_CASE("device (mock): batched generation with the KV cache on the device") {
  testing::MockDeviceScope mock;
  device_suite::generation(Device::cuda());
}

TEST_CASE("device (mock): train_lm with a checkpoint written on the device and resumed on a fresh model") {
  testing::MockDeviceScope mock;
  device_suite::trainer(Device::cuda(), std::filesystem::temp_directory_path() / "moa_test_device_trainer", 1.0);
}
