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

TEST_CASE("device (mock): a GroupingCache uploads a routing once for all the calls that share it") {
  testing::MockDeviceScope mock;
  const Device dev = Device::cuda();
  Generator g(11);
  const int64_t N = 12, In = 8, Out = 6, R = 4, E = 3;
  std::vector<Tensor> A, B;
  for (int64_t e = 0; e < E; ++e) {
    A.push_back(Tensor::randn({R, In}, g).to(dev));
    B.push_back(Tensor::randn({Out, R}, g).to(dev));
  }
  const Tensor xh = Tensor::randn({N, In}, g), wh = Tensor::randn({N, Out}, g);
  std::vector<int32_t> rows(N), experts(N);
  for (int64_t n = 0; n < N; ++n) {
    rows[n] = static_cast<int32_t>(n);
    experts[n] = static_cast<int32_t>((n * 7) % E);
  }
  // value and input gradient of one call, on the device, with or without the cache
  auto run = [&](const std::vector<int32_t>& ex, GroupingCache* cache) {
    Tensor x = xh.to(dev).detach().set_requires_grad();
    Tensor y = grouped_lora(x, A, B, rows, ex, Tensor(), 0.5, cache);
    sum(y * wh.to(dev)).backward();
    return std::make_pair(y.to_vector<float>(), x.grad().to_vector<float>());
  };
  const auto plain = run(experts, nullptr);
  GroupingCache cache;
  const auto u0 = mock.device.uploads;
  const auto first = run(experts, &cache);
  const auto u1 = mock.device.uploads;
  const auto second = run(experts, &cache);  // another linear of the same layer: same routing
  const auto u2 = mock.device.uploads;
  CHECK(first == plain);
  CHECK(second == plain);
  CHECK(cache.size() == 1);
  CHECK(cache.hits() == 1);
  CHECK(u2 - u1 == (u1 - u0) - 3);  // the second call skipped the rows, segments and order uploads

  std::vector<int32_t> other = experts;
  std::swap(other[0], other[1]);  // a different routing is a miss, and is right
  CHECK(run(other, &cache) == run(other, nullptr));
  CHECK(cache.size() == 2);
  std::vector<int32_t> third(N, 2);
  CHECK(run(third, &cache) == run(third, nullptr));
  CHECK(cache.size() == 2);  // capacity 2: the least recently used went
  CHECK(run(experts, &cache) == plain);
  CHECK(cache.hits() == 1);  // `experts` had been dropped: uploaded again
  cache.clear();
  CHECK(cache.size() == 0);
}

TEST_CASE("device (mock): DeviceProfile times every kernel call of a training step and changes nothing") {
  testing::MockDeviceScope mock;
  const Device dev = Device::cuda();
  auto step = [&](nn::TransformerLM& m) {
    optim::AdamW opt(m.trainable_parameters(), {.lr = 1e-2});
    const Tensor loss = m.loss(device_suite::ids({2, 9}, 23, 7), device_suite::ids({2, 9}, 23, 8));
    opt.zero_grad();
    loss.backward();
    opt.step();
    return loss.item<double>();
  };
  nn::TransformerLM plain(device_suite::tiny(false), 4), profiled(device_suite::tiny(false), 4);
  plain.to(dev);
  profiled.to(dev);
  const double loss_plain = step(plain);
  Tensor outlives;  // allocated through the profile, released after it
  std::vector<ProfilingBackend::Entry> entries;
  std::string report;
  {
    DeviceProfile profile(dev);
    CHECK(&backend(dev) == &profile.backend());
    CHECK(step(profiled) == loss_plain);  // the same calls reach the same kernels
    outlives = Tensor::zeros({5}, DType::f32, dev);
    entries = profile.entries();
    report = profile.report(5);
  }
  CHECK(&backend(dev) == &mock.device);  // the plain backend again
  CHECK(outlives.to_vector<float>() == std::vector<float>(5, 0.f));
  outlives = Tensor();  // freed by the mock (memory_backend), not by the profile that is gone
  const auto pp = plain.named_parameters(), pq = profiled.named_parameters();
  for (std::size_t i = 0; i < pp.size(); ++i) CHECK(pp[i].second.to_vector<float>() == pq[i].second.to_vector<float>());

  auto find = [&](const std::string& prefix) {
    for (const auto& e : entries)
      if (e.name.rfind(prefix, 0) == 0) return e;
    return ProfilingBackend::Entry{};
  };
  // 2 sequences of 9 tokens, dim 16: the tied LM head's product is (18 x 16) x (16 x 23)
  const auto head = find("gemm f32 18x23x16");
  CHECK(head.calls >= 1);
  CHECK(head.flops == doctest::Approx(2.0 * 18 * 23 * 16 * head.calls));
  CHECK(find("attention_forward").calls == 2);  // one per layer
  CHECK(find("attention_backward").calls == 2);
  CHECK(find("cross_entropy_rows").calls == 1);  // the head and the loss: one chunk
  CHECK(find("adamw_step_all").calls == 1);  // every parameter of the step in one call
  for (std::size_t i = 1; i < entries.size(); ++i) CHECK(entries[i - 1].seconds >= entries[i].seconds);
  CHECK(report.find("| device call | calls | ms | share | TFLOP/s |") == 0);
  CHECK(report.find("more) |") != std::string::npos);
  CHECK(report.find("timed device calls:") != std::string::npos);
  CHECK_THROWS_AS(DeviceProfile(Device::cpu()), Error);
}

TEST_CASE("device (mock): DeviceProfile counts uploads, downloads, device copies and synchronizations") {
  testing::MockDeviceScope mock;
  const Device dev = Device::cuda();
  const Tensor before = Tensor::from_vector(std::vector<float>{1, 2, 3}).to(dev);  // not counted: no profile yet
  DeviceProfile profile(dev);
  const Tensor up = Tensor::from_vector(std::vector<float>{4, 5, 6, 7}).to(dev);  // 16 bytes up
  Tensor other = Tensor::empty({4}, DType::f32, dev);
  backend(dev).copy_device(other.data<float>(), up.data<float>(), 16, dev.index);
  backend(dev).synchronize(dev.index);
  CHECK(other.to_vector<float>() == std::vector<float>{4, 5, 6, 7});                  // 16 bytes down
  CHECK(before.to(Device::cpu()).to_vector<float>() == std::vector<float>{1, 2, 3});  // 12 more
  const auto& t = profile.transfers();
  CHECK(t.uploads == 1);
  CHECK(t.upload_bytes == 16);
  CHECK(t.downloads == 2);
  CHECK(t.download_bytes == 28);
  CHECK(t.device_copies == 1);
  CHECK(t.device_copy_bytes == 16);
  CHECK(t.synchronizes == 1);
  CHECK(profile.report().find("copies: 1 uploads (16 B), 2 downloads (28 B; each waits for the device), 1 on the "
                              "device (16 B); 1 explicit synchronizations") != std::string::npos);
  profile.reset();
  CHECK(profile.transfers().downloads == 0);
  CHECK(profile.transfers().upload_bytes == 0);
  // a value computed on the device and returned to the host waits like a download
  CHECK(backend(dev).sum_squares_all({{up.data<float>(), 4}}) == 16 + 25 + 36 + 49);
  CHECK(profile.transfers().downloads == 1);
  CHECK(profile.transfers().download_bytes == 8);
}
