// Optimizers, clipping and the schedule: trajectories against PyTorch (fixtures from
// tests/fixtures/gen_optim.py), in double and float.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <string>

#include "fixture.hpp"
#include "test_util.hpp"

using namespace moa;

namespace {

// Runs `make(params)` for the fixture's five steps of gradients and compares every step with torch.
template <class Opt>
void check_trajectory(const std::string& name, DType dtype, double tol,
                      const std::function<Opt(std::vector<Tensor>)>& make) {
  const test::Fixture fx("optim.txt");
  Tensor p = Tensor::from_vector(fx["p0"], {5, 3}).to(dtype).set_requires_grad();
  Opt opt = make({p});
  for (int i = 0; i < 5; ++i) {
    p.set_grad(Tensor::from_vector(fx["grad" + std::to_string(i)], {5, 3}).to(dtype));
    opt.step();
    INFO(name << " step " << i);
    CHECK(test::max_abs_diff(p.to_vector<double>(), fx[name + "_step" + std::to_string(i)]) < tol);
  }
}

}  // namespace

TEST_CASE("AdamW matches torch.optim.AdamW step for step") {
  for (auto [dtype, tol] : {std::pair{DType::f64, 1e-13}, std::pair{DType::f32, 2e-6}}) {
    check_trajectory<optim::AdamW>("adamw", dtype, tol, [](std::vector<Tensor> ps) {
      return optim::AdamW(ps, {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1});
    });
    check_trajectory<optim::AdamW>("adamw_default", dtype, tol,
                                   [](std::vector<Tensor> ps) { return optim::AdamW(ps); });
  }
}

TEST_CASE("SGD matches torch.optim.SGD (plain, momentum with dampening, Nesterov, weight decay)") {
  for (auto [dtype, tol] : {std::pair{DType::f64, 1e-13}, std::pair{DType::f32, 2e-6}}) {
    check_trajectory<optim::SGD>("sgd_plain", dtype, tol,
                                 [](std::vector<Tensor> ps) { return optim::SGD(ps, {.lr = 0.5}); });
    check_trajectory<optim::SGD>("sgd_momentum", dtype, tol, [](std::vector<Tensor> ps) {
      return optim::SGD(ps, {.lr = 0.1, .momentum = 0.9, .dampening = 0.1, .weight_decay = 0.01});
    });
    check_trajectory<optim::SGD>("sgd_nesterov", dtype, tol, [](std::vector<Tensor> ps) {
      return optim::SGD(ps, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01, .nesterov = true});
    });
  }
  test::check_throws_with<ValueError>(
      [] { (void)optim::SGD({Tensor::zeros({1}).set_requires_grad()}, {.nesterov = true}); }, {"SGD", "Nesterov"});
}

TEST_CASE("clip_grad_norm matches torch.nn.utils.clip_grad_norm_") {
  const test::Fixture fx("optim.txt");
  for (const std::string tag : {"small", "large"}) {
    Tensor a = Tensor::zeros({4, 3}, DType::f64).set_requires_grad();
    Tensor b = Tensor::zeros({7}, DType::f64).set_requires_grad();
    a.set_grad(Tensor::from_vector(fx["clip_ga"], {4, 3}));
    b.set_grad(Tensor::from_vector(fx["clip_gb"], {7}));
    const double norm = optim::clip_grad_norm({a, b}, tag == "small" ? 1.0 : 100.0);
    CHECK(norm == doctest::Approx(fx["clip_" + tag + "_norm"][0]).epsilon(1e-14));
    CHECK(test::max_abs_diff(a.grad().to_vector<double>(), fx["clip_" + tag + "_ga"]) < 1e-14);
    CHECK(test::max_abs_diff(b.grad().to_vector<double>(), fx["clip_" + tag + "_gb"]) < 1e-14);
  }
  Tensor n = Tensor::zeros({2}).set_requires_grad();
  n.set_grad(Tensor::from_vector(std::vector<float>{1.0f, NAN}));
  test::check_throws_with<ValueError>([&] { (void)optim::clip_grad_norm({n}, 1.0); }, {"clip_grad_norm", "not finite"});
  CHECK(std::isnan(optim::clip_grad_norm({n}, 1.0, false)));
}

TEST_CASE("AdamW refuses a parameter listed twice (each gets one update per step)") {
  Tensor w = Tensor::zeros({3}).set_requires_grad();
  Tensor other = Tensor::zeros({3}).set_requires_grad();
  test::check_throws_with<ValueError>(
      [&] {
        (void)optim::AdamW({w, other, w});
      },
      {"AdamW", "parameters 0 and 2", "share their memory"});
  CHECK_NOTHROW((void)optim::AdamW({w, other}));
}

TEST_CASE("warmup + cosine schedule follows its formula") {
  const optim::WarmupCosine s{.base_lr = 1.0, .min_lr = 0.1, .warmup_steps = 4, .total_steps = 14};
  CHECK(s.lr(0) == doctest::Approx(0.25));
  CHECK(s.lr(3) == doctest::Approx(1.0));
  CHECK(s.lr(4) == doctest::Approx(1.0));                                    // cosine starts at the peak
  CHECK(s.lr(9) == doctest::Approx(0.55));                                   // halfway: (1 + 0.1) / 2
  CHECK(s.lr(6) == doctest::Approx(0.1 + 0.45 * (1 + std::cos(M_PI * 0.2))));
  CHECK(s.lr(14) == doctest::Approx(0.1));
  CHECK(s.lr(100) == doctest::Approx(0.1));
  for (int i = 4; i < 14; ++i) CHECK(s.lr(i + 1) <= s.lr(i));
  test::check_throws_with<ValueError>([&] { (void)s.lr(-1); }, {"WarmupCosine", "-1"});
  test::check_throws_with<ValueError>(
      [] { (void)optim::WarmupCosine{.warmup_steps = 5, .total_steps = 3}.lr(0); }, {"warmup", "5", "3"});
}

TEST_CASE("a tiny model trains: linear regression loss falls with AdamW under the schedule") {
  Generator g(21);
  Tensor x = Tensor::randn({64, 8}, g);
  Tensor w_true = Tensor::randn({1, 8}, g);
  Tensor y;
  {
    NoGradGuard ng;
    y = linear(x, w_true);
  }
  Tensor w = Tensor::zeros({1, 8}).set_requires_grad();
  optim::AdamW opt({w}, {.lr = 0.1, .weight_decay = 0.0});
  const optim::WarmupCosine sched{.base_lr = 0.1, .min_lr = 0.001, .warmup_steps = 10, .total_steps = 200};
  double first = 0, last = 0;
  for (int step = 0; step < 200; ++step) {
    opt.set_lr(sched.lr(step));
    Tensor d = linear(x, w) - y;
    Tensor loss = mean(d * d);
    opt.zero_grad();
    loss.backward();
    optim::clip_grad_norm({w}, 10.0);
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  CHECK(last < 1e-3 * first);
}
