// tests/device_suite.hpp: checks that every op, the copies, the modules, LoRA, MoA, the optimisers
// and generation give on a device what they give on the cpu. Written once, run twice:
//   - tests/unit/test_device.cpp runs it on MockDevice (tests/unit/mock_device.hpp), on every machine:
//     the device paths and their plumbing (no host access to device memory, no forgotten op);
//   - tests/cuda/test_cuda_device.cu runs it on a real GPU (CTest label cuda): the CUDA kernels.
// Each function takes the device and a tolerance factor (1 on the mock, whose kernels are the cpu's;
// larger on a GPU, whose sums run in another order). Values are compared as normwise relative
// error: max |dev - cpu| / max(|cpu|, floor); parameters after training steps use floor 0.05, since
// some start at zero and move by rounding noise only (GPT-2's key bias has a zero gradient).
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "moa/moa.hpp"
#include "moa/train/lm_trainer.hpp"

namespace moa::device_suite {

inline double rel(const Tensor& dev, const Tensor& cpu, double floor = 1e-30) {
  const std::vector<double> a = dev.to_vector<double>(), b = cpu.to_vector<double>();
  REQUIRE(a.size() == b.size());
  double num = 0, den = floor;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / den;
}

// Runs f on cpu inputs and on copies on `dev`; compares the output and, for float inputs marked
// `grad`, the gradients of sum(out * G) for a random G.
inline void check_op(const std::string& name, Device dev, const std::vector<Tensor>& inputs,
                     const std::vector<bool>& grad, const std::function<Tensor(const std::vector<Tensor>&)>& f,
                     double tol) {
  CAPTURE(name);
  std::vector<Tensor> xc, xd;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    Tensor c = inputs[i].detach().clone();
    Tensor d = inputs[i].detach().to(dev);
    if (grad[i]) {
      c.set_requires_grad();
      d.set_requires_grad();
    }
    xc.push_back(c);
    xd.push_back(d);
  }
  const Tensor yc = f(xc), yd = f(xd);
  CHECK(yd.device() == dev);
  CHECK(yd.shape() == yc.shape());
  CHECK(rel(yd, yc) <= tol);
  bool any = false;
  for (bool g : grad) any = any || g;
  if (!any) return;
  Generator gen(99);
  const Tensor G = Tensor::randn(yc.shape(), gen);
  yc.backward(G);
  yd.backward(G.to(dev));
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    if (!grad[i]) continue;
    CAPTURE(i);
    REQUIRE(xd[i].grad().defined());
    CHECK(xd[i].grad().device() == dev);
    CHECK(rel(xd[i].grad(), xc[i].grad()) <= tol);
  }
}

inline Tensor rnd(const Shape& s, std::uint64_t seed, double lo = -1, double hi = 1) {
  Generator g(seed);
  return Tensor::rand(s, g, DType::f32, lo, hi);
}
inline Tensor ids(const Shape& s, int32_t V, std::uint64_t seed) {
  std::vector<int32_t> v(static_cast<std::size_t>(numel_of(s)));
  std::uint64_t x = seed * 2654435761u + 1;
  for (auto& t : v) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<int32_t>((x >> 33) % static_cast<std::uint64_t>(V));
  }
  return Tensor::from_vector(v, s);
}

// ---- copies -----------------------------------------------------------------------------------------
inline void copies(Device dev) {
  const Tensor a = rnd({3, 5, 7}, 1);
  // round trip, contiguous and through a permuted view, both directions
  CHECK(rel(a.to(dev).to(Device::cpu()), a) == 0);
  const Tensor p = a.permute({2, 0, 1});
  const Tensor pd = p.to(dev);
  CHECK(pd.is_contiguous());
  CHECK(rel(pd, p) == 0);
  const Tensor ad = a.to(dev);
  CHECK(rel(ad.permute({2, 0, 1}).contiguous(), p) == 0);             // device strided copy
  CHECK(rel(ad.narrow(1, 1, 3).transpose(0, 2).contiguous(), a.narrow(1, 1, 3).transpose(0, 2).contiguous()) == 0);
  // into a strided device view from the host
  Tensor z = Tensor::zeros({7, 3}, DType::f32, dev);
  z.transpose(0, 1).detach().copy_(a.narrow(1, 0, 1).squeeze(1));
  CHECK(rel(z, a.narrow(1, 0, 1).squeeze(1).t().contiguous()) == 0);
  // dtypes: i32 and bf16 on the device, f64 converted through f32
  const Tensor i = ids({4, 9}, 1000, 2);
  CHECK(i.to(dev).to_vector<int32_t>() == i.to_vector<int32_t>());
  const Tensor bd = ad.to(DType::bf16);
  CHECK(bd.device() == dev);
  const Tensor back = bd.to(DType::f32);
  CHECK(rel(back, a) < 4e-3);  // bf16 keeps 8 bits
  Tensor f64 = Tensor::zeros({3, 5, 7}, DType::f64);
  f64.copy_(ad);
  CHECK(rel(f64, a) == 0);
  CHECK_THROWS_AS(Tensor::zeros({2}, DType::f64, dev), ValueError);
  // f32 -> i32 on the device as on the host: toward zero, saturating, NaN -> 0
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> odd{std::nanf(""), 3e9f, -3e9f, inf, -inf, 2.7f, -2.7f, -2147483648.f, 2147483520.f};
  const std::vector<int32_t> odd_i{0, INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN, 2, -2, INT32_MIN, 2147483520};
  const Tensor od = Tensor::from_vector(odd).to(dev);
  CHECK(od.to(DType::i32).device() == dev);
  CHECK(od.to(DType::i32).to_vector<int32_t>() == odd_i);                                // the device kernel converts
  CHECK(Tensor::from_vector(odd).to(DType::i32).to(dev).to_vector<int32_t>() == odd_i);  // the host converts
  Tensor fi = Tensor::zeros({3}, DType::i32, dev);  // fill_ on the device converts its value alike
  CHECK(fi.fill_(std::nan("")).to_vector<int32_t>() == std::vector<int32_t>(3, 0));
  CHECK(fi.fill_(3e9).to_vector<int32_t>() == std::vector<int32_t>(3, INT32_MAX));
  CHECK(fi.fill_(-7.9).to_vector<int32_t>() == std::vector<int32_t>(3, -7));
  // fill_ on a strided view, item, to_vector
  Tensor f = Tensor::zeros({4, 6}, DType::f32, dev);
  f.narrow(1, 2, 3).detach().fill_(2.5);
  const auto fv = f.to_vector<float>();
  CHECK(fv[2] == 2.5f);
  CHECK(fv[5] == 0.0f);
  CHECK(Tensor::full({}, 7.0, DType::f32, dev).item<double>() == 7.0);
  // an index outside the backend's devices
  CHECK_THROWS_AS(Tensor::zeros({2}, DType::f32, Device::cuda(97)), DeviceError);
  // mixing devices in one op is an error, not a silent copy
  CHECK_THROWS_AS(add(ad, a), DeviceError);
}

// ---- every op, forward and backward -----------------------------------------------------------------
inline void ops(Device dev, double tol) {
  using V = std::vector<Tensor>;
  const double t = tol;
  check_op("add broadcast", dev, {rnd({4, 1, 6}, 1), rnd({5, 1}, 2)}, {true, true}, [](const V& x) { return x[0] + x[1]; }, t);
  check_op("sub", dev, {rnd({3, 7}, 3), rnd({3, 7}, 4)}, {true, true}, [](const V& x) { return x[0] - x[1]; }, t);
  check_op("mul broadcast", dev, {rnd({2, 3, 4}, 5), rnd({4}, 6)}, {true, true}, [](const V& x) { return x[0] * x[1]; }, t);
  check_op("div", dev, {rnd({3, 5}, 7), rnd({3, 5}, 8, 0.5, 2.0)}, {true, true}, [](const V& x) { return x[0] / x[1]; }, t);
  check_op("mul transposed", dev, {rnd({5, 3}, 9), rnd({3, 5}, 10)}, {true, true},
           [](const V& x) { return x[0].t() * x[1]; }, t);
  const Tensor pos = rnd({6, 9}, 11, 0.1, 2.0);
  check_op("scale", dev, {rnd({6, 9}, 12)}, {true}, [](const V& x) { return scale(x[0], -1.7); }, t);
  check_op("shift", dev, {rnd({6, 9}, 12)}, {true}, [](const V& x) { return shift(x[0], 0.3); }, t);
  check_op("neg", dev, {rnd({6, 9}, 12)}, {true}, [](const V& x) { return neg(x[0]); }, t);
  check_op("exp", dev, {rnd({6, 9}, 12)}, {true}, [](const V& x) { return exp(x[0]); }, t);
  check_op("log", dev, {pos}, {true}, [](const V& x) { return log(x[0]); }, t);
  check_op("sqrt", dev, {pos}, {true}, [](const V& x) { return sqrt(x[0]); }, t);
  check_op("tanh", dev, {rnd({6, 9}, 12)}, {true}, [](const V& x) { return tanh(x[0]); }, t);
  check_op("pow", dev, {pos}, {true}, [](const V& x) { return pow(x[0], 1.5); }, t);
  check_op("relu", dev, {rnd({6, 9}, 12)}, {true}, [](const V& x) { return relu(x[0]); }, t);
  check_op("gelu", dev, {rnd({6, 9}, 12, -3, 3)}, {true}, [](const V& x) { return gelu(x[0]); }, 2e-6 * t + t);
  check_op("silu", dev, {rnd({6, 9}, 12, -3, 3)}, {true}, [](const V& x) { return silu(x[0]); }, t);
  check_op("sum axes", dev, {rnd({3, 4, 5}, 13)}, {true}, [](const V& x) { return sum(x[0], {0, 2}); }, t);
  check_op("sum all", dev, {rnd({3, 4, 5}, 13)}, {true}, [](const V& x) { return sum(x[0]); }, t);
  check_op("mean keepdim", dev, {rnd({3, 4, 5}, 14)}, {true}, [](const V& x) { return mean(x[0], {1}, true); }, t);
  check_op("matmul batched broadcast", dev, {rnd({2, 3, 5, 7}, 15), rnd({3, 7, 4}, 16)}, {true, true},
           [](const V& x) { return matmul(x[0], x[1]); }, t);
  check_op("matmul transposed views", dev, {rnd({2, 7, 5}, 17), rnd({2, 4, 7}, 18)}, {true, true},
           [](const V& x) { return matmul(x[0].transpose(1, 2), x[1].transpose(1, 2)); }, t);
  check_op("matmul folded rows", dev, {rnd({2, 6, 5}, 19), rnd({5, 3}, 20)}, {true, true},
           [](const V& x) { return matmul(x[0], x[1]); }, t);
  check_op("linear bias", dev, {rnd({2, 3, 8}, 21), rnd({5, 8}, 22), rnd({5}, 23)}, {true, true, true},
           [](const V& x) { return linear(x[0], x[1], x[2]); }, t);
  check_op("softmax", dev, {rnd({4, 11}, 24, -3, 3)}, {true}, [](const V& x) { return softmax(x[0], -1); }, t);
  check_op("softmax axis 0", dev, {rnd({4, 11}, 24, -3, 3)}, {true}, [](const V& x) { return softmax(x[0], 0); }, t);
  check_op("log_softmax", dev, {rnd({4, 11}, 25, -3, 3)}, {true}, [](const V& x) { return log_softmax(x[0]); }, t);
  {
    Tensor tg = ids({3, 5}, 13, 26);
    tg.data<int32_t>()[4] = -100;  // an ignored position
    check_op("cross_entropy", dev, {rnd({3, 5, 13}, 27, -2, 2), tg}, {true, false},
             [](const V& x) { return cross_entropy(x[0], x[1]); }, t);
    check_op("cross_entropy device targets", dev, {rnd({3, 5, 13}, 27, -2, 2), tg}, {true, false},
             [](const V& x) { return cross_entropy(x[0], x[1].to(x[0].device())); }, t);
    // the head and the loss in one op: one chunk, chunks of 4 rows (the last partial), one row
    for (int64_t chunk : {0, 4, 1})
      check_op(
          "linear_cross_entropy chunk " + std::to_string(chunk), dev, {rnd({3, 5, 8}, 94), rnd({13, 8}, 95, -2, 2), tg},
          {true, true, false}, [chunk](const V& x) { return linear_cross_entropy(x[0], x[1], x[2], -100, chunk); }, t);
    {  // an upstream gradient of 2.5 on the device: retained (new tensors), then handed over (in place)
      const Tensor w = rnd({13, 8}, 95, -2, 2);
      Tensor xc = rnd({3, 5, 8}, 94).set_requires_grad();
      (linear_cross_entropy(xc, w, tg, -100, 4) * 2.5).backward();
      Tensor xd = rnd({3, 5, 8}, 94).to(dev).set_requires_grad();
      Tensor ld = linear_cross_entropy(xd, w.to(dev), tg, -100, 4) * 2.5;
      ld.backward(Tensor(), true);
      ld.backward();
      CHECK(rel(xd.grad(), xc.grad() * 2.0) <= t);
      // a gradient for a device loss must be on the device
      Tensor xe = rnd({3, 5, 8}, 94).to(dev).set_requires_grad();
      CHECK_THROWS_AS(linear_cross_entropy(xe, w.to(dev), tg, -100, 4).backward(Tensor::ones({})), DeviceError);
    }
  }
  check_op("layer_norm", dev, {rnd({3, 4, 10}, 28), rnd({10}, 29), rnd({10}, 30)}, {true, true, true},
           [](const V& x) { return layer_norm(x[0], x[1], x[2]); }, t);
  check_op("rms_norm", dev, {rnd({3, 4, 10}, 31), rnd({10}, 32)}, {true, true},
           [](const V& x) { return rms_norm(x[0], x[1]); }, t);
  check_op("embedding (repeated ids)", dev, {rnd({9, 6}, 33), ids({4, 5}, 9, 34)}, {true, false},
           [](const V& x) { return embedding(x[0], x[1]); }, t);
  check_op("causal attention GQA, Tq < Tk", dev, {rnd({2, 4, 3, 8}, 35), rnd({2, 2, 5, 8}, 36), rnd({2, 2, 5, 8}, 37)},
           {true, true, true}, [](const V& x) { return causal_attention(x[0], x[1], x[2]); }, t);
  check_op("causal attention", dev, {rnd({1, 2, 7, 16}, 38), rnd({1, 2, 7, 16}, 39), rnd({1, 2, 7, 16}, 40)},
           {true, true, true}, [](const V& x) { return causal_attention(x[0], x[1], x[2]); }, t);
  check_op("rope", dev, {rnd({2, 3, 5, 8}, 41)}, {true}, [](const V& x) { return rope(x[0], 3, 10000.0); }, t);
  check_op("concat", dev, {rnd({2, 3}, 42), rnd({2, 4}, 43)}, {true, true},
           [](const V& x) { return concat({x[0], x[1]}, 1); }, t);
  check_op("gather (repeats)", dev, {rnd({3, 5, 2}, 44), ids({3, 4, 2}, 5, 45)}, {true, false},
           [](const V& x) { return gather(x[0], 1, x[1]); }, t);
  check_op("dropout (same mask)", dev, {rnd({5, 8}, 46)}, {true}, [](const V& x) {
    Generator g(5);
    return dropout(x[0], 0.3, g, true);
  }, t);
  check_op("lora_add", dev, {rnd({2, 3, 8}, 47), rnd({2, 3, 6}, 48), rnd({4, 8}, 49), rnd({6, 4}, 50)},
           {true, true, true, true}, [](const V& x) { return lora::lora_add(x[1], x[0], x[2], x[3], 0.5); }, t);
  // grouped LoRA: one expert per row (MoA), and top-2 with gate weights (rows repeat)
  {
    const std::vector<int32_t> rows{0, 1, 2, 3, 4, 5, 6}, experts{2, 0, 2, 1, 0, 2, 2};
    check_op("grouped_lora", dev,
             {rnd({7, 8}, 51), rnd({4, 8}, 52), rnd({4, 8}, 53), rnd({4, 8}, 54), rnd({6, 4}, 55), rnd({6, 4}, 56),
              rnd({6, 4}, 57)},
             {true, true, true, true, true, true, true}, [&](const V& x) {
               return grouped_lora(x[0], {x[1], x[2], x[3]}, {x[4], x[5], x[6]}, rows, experts, Tensor(), 2.0);
             }, t);
    const std::vector<int32_t> rows2{0, 0, 1, 1, 2, 2}, experts2{1, 0, 0, 2, 2, 1};
    check_op("grouped_lora top-2 gates", dev,
             {rnd({3, 8}, 58), rnd({4, 8}, 59), rnd({4, 8}, 60), rnd({4, 8}, 61), rnd({6, 4}, 62), rnd({6, 4}, 63),
              rnd({6, 4}, 64), rnd({6}, 65, 0.1, 1.0)},
             {true, true, true, true, true, true, true, true}, [&](const V& x) {
               return grouped_lora(x[0], {x[1], x[2], x[3]}, {x[4], x[5], x[6]}, rows2, experts2, x[7], 0.5);
             }, t);
    check_op(
        "grouped_lora_add top-2 gates onto a base", dev,
        {rnd({3, 8}, 66), rnd({4, 8}, 67), rnd({4, 8}, 68), rnd({6, 4}, 69), rnd({6, 4}, 70), rnd({6}, 71, 0.1, 1.0),
         rnd({3, 6}, 72)},
        {true, true, true, true, true, true, true},
        [&](const V& x) {
          return grouped_lora_add(x[6] * 1.0, x[0], {x[1], x[2]}, {x[3], x[4]}, rows2, {1, 0, 0, 1, 1, 0}, x[5], 0.5);
        },
        t);
    // The layer and its experts as one op: x's gradient is g W with the experts' part accumulated
    // onto it (one expert per row: the backend's stored-dx path must add here), then top-2 gates
    // (rows repeat), then no assignment at all (x's gradient is g W alone).
    check_op(
        "grouped_lora_linear one expert per row", dev,
        {rnd({2, 3, 8}, 73), rnd({6, 8}, 74), rnd({6}, 75), rnd({4, 8}, 76), rnd({4, 8}, 77), rnd({6, 4}, 78),
         rnd({6, 4}, 79)},
        {true, true, true, true, true, true, true},
        [&](const V& x) {
          return grouped_lora_linear(x[0], x[1], x[2], {x[3], x[4]}, {x[5], x[6]}, {0, 1, 2, 3, 4, 5},
                                     {1, 0, 1, 1, 0, 0}, Tensor(), 2.0);
        },
        t);
    check_op(
        "grouped_lora_linear top-2 gates, no bias", dev,
        {rnd({3, 8}, 80), rnd({6, 8}, 81), rnd({4, 8}, 82), rnd({4, 8}, 83), rnd({4, 8}, 84), rnd({6, 4}, 85),
         rnd({6, 4}, 86), rnd({6, 4}, 87), rnd({6}, 88, 0.1, 1.0)},
        {true, true, true, true, true, true, true, true, true},
        [&](const V& x) {
          return grouped_lora_linear(x[0], x[1], Tensor(), {x[2], x[3], x[4]}, {x[5], x[6], x[7]}, rows2, experts2,
                                     x[8], 0.5);
        },
        t);
    check_op(
        "grouped_lora_linear without assignments", dev,
        {rnd({3, 8}, 89), rnd({6, 8}, 90), rnd({6}, 91), rnd({4, 8}, 92), rnd({6, 4}, 93)},
        {true, true, true, false, false},
        [&](const V& x) { return grouped_lora_linear(x[0], x[1], x[2], {x[3]}, {x[4]}, {}, {}, Tensor(), 1.0); }, t);
  }
}

// ---- a whole model: training steps, LoRA, MoA, generation ---------------------------------------------
inline nn::TransformerConfig tiny(bool llama) {
  nn::TransformerConfig c = llama ? nn::TransformerConfig::llama() : nn::TransformerConfig::gpt2();
  c.vocab_size = 23;
  c.max_seq_len = 24;
  c.dim = 16;
  c.n_layers = 2;
  c.n_heads = 4;
  if (llama) c.n_kv_heads = 2;
  c.hidden_dim = 40;
  return c;
}

inline void params_close(const nn::Module& d, const nn::Module& c, double tol) {
  const auto pd = d.named_parameters(), pc = c.named_parameters();
  REQUIRE(pd.size() == pc.size());
  for (std::size_t i = 0; i < pd.size(); ++i) {
    CAPTURE(pd[i].first);
    CHECK(pd[i].second.device() == d.device());
    CHECK(rel(pd[i].second, pc[i].second, 0.05) <= tol);
  }
}

// A warm training step loop asks the device for no new memory (the caching allocator's blocks are
// reused): five steps after three warm-up steps leave device_malloc_count unchanged.
inline void warm_steps_no_malloc(Device dev) {
  nn::TransformerLM m(tiny(true), 1);
  m.to(dev);
  optim::AdamW opt(m.trainable_parameters());
  const Tensor x = ids({2, 9}, 23, 1), y = ids({2, 9}, 23, 2);
  auto step = [&] {
    Tensor l = m.loss(x, y);
    opt.zero_grad();
    l.backward();
    opt.step();
    return l.item<double>();
  };
  for (int i = 0; i < 3; ++i) (void)step();
  const auto before = backend(dev).device_malloc_count(dev.index);
  for (int i = 0; i < 5; ++i) (void)step();
  CHECK(backend(dev).device_malloc_count(dev.index) == before);
}

// Three AdamW steps with clipping, full weights, on the cpu and on the device from the same init.
inline void train_steps(Device dev, bool llama, double tol) {
  CAPTURE(llama);
  nn::TransformerLM mc(tiny(llama), 3), md(tiny(llama), 3);
  md.to(dev);
  CHECK(md.device() == dev);
  // eps = 0.1 keeps the update nearly linear in the gradient: with eps = 1e-8 AdamW's first steps are
  // lr * sign(g), which turns rounding-level differences of near-zero gradients into lr-sized ones.
  const optim::AdamWConfig ac{.lr = 1e-1, .eps = 1e-1};
  optim::AdamW oc(mc.trainable_parameters(), ac), od(md.trainable_parameters(), ac);
  for (int step = 0; step < 3; ++step) {
    const Tensor x = ids({2, 9}, 23, 100 + step), y = ids({2, 9}, 23, 200 + step);
    const Tensor lc = mc.loss(x, y), ld = md.loss(x, y);
    CHECK(ld.device() == dev);
    CHECK(std::abs(ld.item<double>() - lc.item<double>()) <= 1e-5 * tol * std::abs(lc.item<double>()));
    oc.zero_grad();
    od.zero_grad();
    lc.backward();
    ld.backward();
    const double nc = optim::clip_grad_norm(mc.trainable_parameters(), 0.5);
    const double nd = optim::clip_grad_norm(md.trainable_parameters(), 0.5);
    CHECK(std::abs(nd - nc) <= 1e-5 * tol * nc);
    oc.step();
    od.step();
  }
  params_close(md, mc, 1e-4 * tol);
}

// LoRA on a device model: the frozen base gets no gradient, merge/unmerge, save as PEFT equals the cpu's.
inline void lora_steps(Device dev, double tol) {
  nn::TransformerLM mc(tiny(true), 4), md(tiny(true), 4);
  md.to(dev);
  lora::LoRAConfig cfg{.rank = 4, .alpha = 8, .target_modules = "q_proj|v_proj|down_proj"};
  lora::attach_lora(mc, "a", cfg, 9);
  lora::attach_lora(md, "a", cfg, 9);
  for (auto& [n, p] : md.named_parameters()) CHECK(p.device() == dev);
  const optim::AdamWConfig ac{.lr = 1e-1, .eps = 1e-1};
  optim::AdamW oc(mc.trainable_parameters(), ac), od(md.trainable_parameters(), ac);
  for (int step = 0; step < 2; ++step) {
    const Tensor x = ids({2, 7}, 23, 300 + step), y = ids({2, 7}, 23, 400 + step);
    Tensor lc = mc.loss(x, y), ld = md.loss(x, y);
    CHECK(std::abs(ld.item<double>() - lc.item<double>()) <= 1e-5 * tol * std::abs(lc.item<double>()));
    oc.zero_grad();
    od.zero_grad();
    lc.backward();
    ld.backward();
    oc.step();
    od.step();
  }
  for (auto& [n, p] : md.named_parameters())
    if (!p.requires_grad()) CHECK(!p.grad().defined());
  params_close(md, mc, 1e-4 * tol);
  const Tensor x = ids({1, 6}, 23, 500);
  const Tensor before = md.forward(x);
  lora::merge_lora(md, "a");
  CHECK(rel(md.forward(x), before) <= 1e-5 * tol);
  lora::unmerge_lora(md);
  CHECK(rel(md.forward(x), before) <= 1e-5 * tol);
}

// An MoA on a device: stage-2 loss and its gradients, routing, and generation with the routed experts.
inline void moa_steps(Device dev, double tol) {
  auto bc = std::make_shared<nn::TransformerLM>(tiny(true), 5);
  auto bd = std::make_shared<nn::TransformerLM>(tiny(true), 5);
  bd->to(dev);
  mixture::MoAConfig cfg;
  cfg.domains = {"a", "b", "c"};
  cfg.rank = 4;
  mixture::MoAModel mc(bc, cfg, 11), md(bd, cfg, 11);
  CHECK(md.device() == dev);
  // non-zero B so that the experts differ
  for (auto* m : {&mc, &md}) {
    NoGradGuard ng;
    Generator g(12);
    for (auto& [n, p] : m->named_parameters())
      if (n.find("lora_B") != std::string::npos) p.detach().copy_(Tensor::randn(p.shape(), g, DType::f32, 0, 0.1));
  }
  mixture::MoABatch b;
  b.ids = ids({3, 8}, 23, 600);
  b.targets = ids({3, 8}, 23, 601);
  b.domain = {2, 0, 1};
  const auto lc = mc.loss(b), ld = md.loss(b);
  CHECK(std::abs(ld[0].item<double>() - lc[0].item<double>()) <= 1e-5 * tol * std::abs(lc[0].item<double>()));
  // One routing for every layer (the batch's domains): one uploaded grouping (ops/grouped_lora.hpp:
  // GroupingCache), that the first adapted linear uploads and the other three (q_proj and v_proj of
  // 2 layers) reuse.
  CHECK(md.routing().groupings.size() == 1);
  CHECK(md.routing().groupings.hits() == 3);
  lc[0].backward();
  ld[0].backward();
  const auto pc = mc.named_parameters(), pd = md.named_parameters();
  for (std::size_t i = 0; i < pc.size(); ++i) {
    CAPTURE(pc[i].first);
    CHECK(pd[i].second.grad().defined() == pc[i].second.grad().defined());
    if (pc[i].second.grad().defined()) CHECK(rel(pd[i].second.grad(), pc[i].second.grad()) <= 1e-4 * tol);
  }
  CHECK(md.route(b) == mc.route(b));
  // MoE-LoRA: token-level top-k routing with gate weights and the balance loss
  Tensor bal_c, bal_d;
  const Tensor tc = mc.forward_token_topk(b.ids, &bal_c), td = md.forward_token_topk(b.ids, &bal_d);
  CHECK(td.device() == dev);
  CHECK(rel(td, tc) <= 1e-5 * tol);
  CHECK(std::abs(bal_d.item<double>() - bal_c.item<double>()) <= 1e-5 * tol);
  // generation: the routed experts, greedy, with the KV cache on the device
  md.use_experts({1});
  mc.use_experts({1});
  eval::GenerateOptions go;
  go.max_new_tokens = 6;
  CHECK(eval::generate(md.base(), {{1, 2, 3}}, go) == eval::generate(mc.base(), {{1, 2, 3}}, go));
}

inline void generation(Device dev) {
  nn::TransformerLM mc(tiny(false), 6), md(tiny(false), 6);
  md.to(dev);
  eval::GenerateOptions go;
  go.max_new_tokens = 8;
  // a batch with prompts of different lengths (row-by-row prefill into the batch cache)
  const std::vector<std::vector<int32_t>> prompts{{1, 2, 3}, {4, 5}, {6}};
  CHECK(eval::generate(md, prompts, go) == eval::generate(mc, prompts, go));
}

// train_lm on the device: the logged losses equal the cpu's; a run checkpointed on the device and
// resumed on a fresh device model (other init: everything must come from the checkpoint) continues
// as the same two runs on the cpu do.
inline void trainer(Device dev, const std::filesystem::path& dir, double tol) {
  std::vector<int32_t> stream;
  for (int i = 0; i < 400; ++i) stream.push_back((7 * i + i / 5) % 23);
  const train::LMTrainOptions opt{.steps = 6, .adamw = {.lr = 1e-2, .eps = 1e-1}, .min_lr = 1e-3, .warmup_steps = 1,
                                  .eval_every = 0, .log_every = 1, .seed = 3, .quiet = true};
  const auto valid = train::PackedTokens(stream, 2, 8).sequential(2);
  struct Run {
    train::TrainResult first, resumed;
    std::unique_ptr<nn::TransformerLM> model;
  };
  auto run = [&](Device d, const std::filesystem::path& ck) {
    std::filesystem::remove_all(ck);
    Run r;
    nn::TransformerLM m1(tiny(true), 8);
    m1.to(d);
    train::PackedTokens s1(stream, 2, 8);
    train::LMTrainOptions o1 = opt;
    o1.steps = 3;
    o1.checkpoint_dir = ck;
    r.first = train::train_lm(m1, s1, valid, o1);
    r.model = std::make_unique<nn::TransformerLM>(tiny(true), 99);
    r.model->to(d);
    train::PackedTokens s2(stream, 2, 8);
    train::LMTrainOptions o2 = opt;
    o2.checkpoint_dir = ck;
    r.resumed = train::train_lm(*r.model, s2, valid, o2);
    std::filesystem::remove_all(ck);
    return r;
  };
  const Run c = run(Device::cpu(), dir / "cpu"), g = run(dev, dir / "device");
  CHECK(g.resumed.start_step == 3);
  REQUIRE(g.first.history.size() == 3);
  REQUIRE(g.resumed.history.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(std::abs(g.first.history[i].loss - c.first.history[i].loss) <= 1e-5 * tol * c.first.history[i].loss);
    CHECK(std::abs(g.resumed.history[i].loss - c.resumed.history[i].loss) <= 1e-5 * tol * c.resumed.history[i].loss);
  }
  REQUIRE(g.resumed.final_val_loss.has_value());
  CHECK(std::abs(*g.resumed.final_val_loss - *c.resumed.final_val_loss) <= 1e-5 * tol * *c.resumed.final_val_loss);
  params_close(*g.model, *c.model, 1e-4 * tol);
}

}  // namespace moa::device_suite
