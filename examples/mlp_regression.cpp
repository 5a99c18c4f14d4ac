// A two-layer GELU network learns a smooth function of 16 inputs with AdamW, a warmup + cosine
// schedule and gradient clipping: the core of moa (tensors, autograd, ops, optimizers) end to end.
//
//   moa_example_mlp [--steps N] [--check]     (--check: exit 1 unless the loss fell 20x)
#include <moa/moa.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char** argv) {
  int steps = 500;
  bool check = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else if (a == "--check") {
      check = true;
    } else {
      std::fprintf(stderr, "usage: %s [--steps N] [--check]\n", argv[0]);
      return 2;
    }
  }
  try {
    moa::Generator gen(2026);
    // Data: y = sin(x W_true^T) row sums, 512 samples of 16 features.      x: (N, 16), y: (N, 1)
    const moa::Tensor x = moa::Tensor::randn({512, 16}, gen);
    const moa::Tensor w_true = moa::Tensor::randn({4, 16}, gen, moa::DType::f32, 0.0, 0.3);
    moa::Tensor y;
    {
      moa::NoGradGuard no_grad;
      y = moa::sum(moa::tanh(moa::linear(x, w_true)), {1}, true);
    }
    // Model: 16 -> 64 -> 1.
    moa::Tensor w1 = moa::Tensor::randn({64, 16}, gen, moa::DType::f32, 0.0, 0.25).set_requires_grad();
    moa::Tensor b1 = moa::Tensor::zeros({64}).set_requires_grad();
    moa::Tensor w2 = moa::Tensor::randn({1, 64}, gen, moa::DType::f32, 0.0, 0.125).set_requires_grad();
    moa::optim::AdamW opt({w1, b1, w2}, {.lr = 3e-3, .weight_decay = 0.01});
    const moa::optim::WarmupCosine sched{.base_lr = 3e-3, .min_lr = 3e-5, .warmup_steps = steps / 10,
                                         .total_steps = steps};
    double first = 0, last = 0;
    for (int step = 0; step < steps; ++step) {
      opt.set_lr(sched.lr(step));
      const moa::Tensor pred = moa::linear(moa::gelu(moa::linear(x, w1, b1)), w2);
      const moa::Tensor err = pred - y;
      const moa::Tensor loss = moa::mean(err * err);
      opt.zero_grad();
      loss.backward();
      const double norm = moa::optim::clip_grad_norm({w1, b1, w2}, 1.0);
      opt.step();
      last = loss.item<double>();
      if (step == 0) first = last;
      if (step % 50 == 0 || step == steps - 1)
        std::printf("step %4d  loss %.6f  grad-norm %.4f  lr %.2e\n", step, last, norm, sched.lr(step));
    }
    std::printf("loss %.6f -> %.6f (%.1fx lower)\n", first, last, first / last);
    if (check && !(last * 20 < first)) {
      std::fprintf(stderr, "expected the loss to fall at least 20x\n");
      return 1;
    }
  } catch (const moa::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
