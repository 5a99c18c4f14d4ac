// The grouped (segmented) LoRA product: equal to a per-sample loop, gradients by finite
// differences, experts without rows get no gradient, bad input.
#include <doctest/doctest.h>

#include "moa/ops/grouped_lora.hpp"
#include "test_util.hpp"

using namespace moa;

namespace {

struct Experts {
  std::vector<Tensor> A, B;
};

Experts make_experts(int64_t E, int64_t R, int64_t In, int64_t Out, Generator& g, DType dt, bool grad) {
  Experts ex;
  for (int64_t e = 0; e < E; ++e) {
    ex.A.push_back(Tensor::randn({R, In}, g, dt));
    ex.B.push_back(Tensor::randn({Out, R}, g, dt));
    if (grad) {
      ex.A.back().set_requires_grad();
      ex.B.back().set_requires_grad();
    }
  }
  return ex;
}

}  // namespace

TEST_CASE("grouped_lora: one expert per row equals a loop over samples with plain products (values and grads)") {
  Generator g(1);
  for (int trial = 0; trial < 3; ++trial) {
    const int64_t Bn = test::rand_size(1, 5), T = test::rand_size(1, 7), In = test::rand_size(1, 33),
                  Out = test::rand_size(1, 40), R = test::rand_size(1, 8), E = test::rand_size(1, 4);
    Tensor x = Tensor::randn({Bn * T, In}, g).set_requires_grad();
    Experts ex = make_experts(E, R, In, Out, g, DType::f32, true);
    std::vector<int32_t> seq_expert, rows, experts;
    for (int64_t b = 0; b < Bn; ++b) seq_expert.push_back(static_cast<int32_t>(g.next_below(E)));
    for (int64_t n = 0; n < Bn * T; ++n) {
      rows.push_back(static_cast<int32_t>(n));
      experts.push_back(seq_expert[n / T]);
    }
    const double s = 0.5;
    Tensor y = grouped_lora(x, ex.A, ex.B, rows, experts, Tensor(), s);
    Generator gw(2);
    Tensor w = Tensor::randn(y.shape(), gw);
    sum(y * w).backward();
    // Reference: sample by sample, x_b A_e^T B_e^T * s, through the ordinary ops.
    Tensor x2 = x.detach().clone().set_requires_grad();
    Experts ex2;
    for (int64_t e = 0; e < E; ++e) {
      ex2.A.push_back(ex.A[e].detach().clone().set_requires_grad());
      ex2.B.push_back(ex.B[e].detach().clone().set_requires_grad());
    }
    std::vector<Tensor> parts;
    for (int64_t b = 0; b < Bn; ++b) {
      const int32_t e = seq_expert[b];
      parts.push_back(scale(linear(linear(x2.narrow(0, b * T, T), ex2.A[e]), ex2.B[e]), s));
    }
    Tensor y2 = concat(parts, 0);
    sum(y2 * w).backward();
    CHECK(test::max_abs_diff(y, y2) < 1e-4);
    CHECK(test::max_abs_diff(x.grad(), x2.grad()) < 1e-4);
    for (int64_t e = 0; e < E; ++e) {
      const bool used = std::find(seq_expert.begin(), seq_expert.end(), e) != seq_expert.end();
      CHECK(ex.A[e].grad().defined() == used);
      CHECK(ex.B[e].grad().defined() == used);
      if (used) {
        CHECK(test::max_abs_diff(ex.A[e].grad(), ex2.A[e].grad()) < 1e-3);
        CHECK(test::max_abs_diff(ex.B[e].grad(), ex2.B[e].grad()) < 1e-3);
      }
    }
  }
}

TEST_CASE("gradcheck: grouped_lora with top-k gate weights, repeated rows, an unused expert") {
  Generator g(3);
  const int64_t N = 5, In = 4, Out = 3, R = 2, E = 3;
  Tensor x = Tensor::randn({N, In}, g, DType::f64).set_requires_grad();
  Experts ex = make_experts(E, R, In, Out, g, DType::f64, true);
  // Each row to two experts, never expert 2.
  const std::vector<int32_t> rows{0, 0, 1, 1, 2, 2, 3, 3, 4, 4};
  const std::vector<int32_t> experts{0, 1, 1, 0, 0, 1, 1, 0, 0, 1};
  Tensor w = Tensor::rand({10}, g, DType::f64, 0.1, 1.0).set_requires_grad();
  std::vector<Tensor> in{x, w};
  in.insert(in.end(), ex.A.begin(), ex.A.end());
  in.insert(in.end(), ex.B.begin(), ex.B.end());
  const auto f = [&](const std::vector<Tensor>& v) {
    return grouped_lora(v[0], {v[2], v[3], v[4]}, {v[5], v[6], v[7]}, rows, experts, v[1], 0.7);
  };
  // Expert 2 is unused: its analytic gradient is absent (zero), which gradcheck compares as zero.
  const auto r = autograd::gradcheck(f, in);
  INFO(r.message);
  CHECK(r.ok);
  CHECK_FALSE(ex.A[2].grad().defined());
}

TEST_CASE(
    "grouped_lora_add: base + the product in base's shape, gradients to base too; base reused only when handed over") {
  Generator g(4);
  const int64_t N = 6, In = 4, Out = 3, R = 2, E = 2;
  Tensor x = Tensor::randn({N, In}, g, DType::f64).set_requires_grad();
  Tensor base = Tensor::randn({2, 3, Out}, g, DType::f64).set_requires_grad();
  Experts ex = make_experts(E, R, In, Out, g, DType::f64, true);
  const std::vector<int32_t> rows{0, 0, 1, 2, 3, 4, 5, 5}, experts{0, 1, 1, 0, 0, 1, 0, 1};
  Tensor w = Tensor::rand({8}, g, DType::f64, 0.1, 1.0).set_requires_grad();
  const Tensor want = base + grouped_lora(x, ex.A, ex.B, rows, experts, w, 0.7).view(base.shape());
  const Tensor got = grouped_lora_add(base, x, ex.A, ex.B, rows, experts, w, 0.7);
  CHECK(got.shape() == base.shape());
  CHECK(test::max_abs_diff(got, want) < 1e-12);
  std::vector<Tensor> in{base, x, w};
  in.insert(in.end(), ex.A.begin(), ex.A.end());
  in.insert(in.end(), ex.B.begin(), ex.B.end());
  const auto f = [&](const std::vector<Tensor>& v) {
    return grouped_lora_add(v[0], v[1], {v[3], v[4]}, {v[5], v[6]}, rows, experts, v[2], 0.7);
  };
  const auto r = autograd::gradcheck(f, in);
  INFO(r.message);
  CHECK(r.ok);
  // Handed over (an rvalue) and held by nothing else: the result lives in base's memory; held by a
  // view as well, or given as an lvalue: base is left as it was.
  const Tensor before = base.detach().clone();
  Tensor owned = base.detach().clone();
  const void* p = owned.data_ptr();
  const Tensor y1 = grouped_lora_add(std::move(owned), x, ex.A, ex.B, rows, experts, w, 0.7);
  CHECK(y1.data_ptr() == p);
  CHECK(test::max_abs_diff(y1, want) < 1e-12);
  Tensor shared = base.detach().clone();
  const Tensor view = shared.view({-1});
  const Tensor y2 = grouped_lora_add(std::move(shared), x, ex.A, ex.B, rows, experts, w, 0.7);
  CHECK(y2.data_ptr() != view.data_ptr());
  CHECK(test::max_abs_diff(view.view(base.shape()), before) == 0);
  CHECK(test::max_abs_diff(base, before) == 0);
  test::check_throws_with<ShapeError>(
      [&] {
        (void)grouped_lora_add(Tensor::zeros({5, Out}, DType::f64), x, ex.A, ex.B, rows, experts, w, 0.7);
      },
      {"grouped_lora_add", "base"});
}

TEST_CASE("grouped_lora_linear: the layer and its experts in one op, as linear() then grouped_lora_add()") {
  Generator g(6);
  const int64_t In = 5, Out = 4, R = 2, E = 3;
  // f64 against finite differences: x (2, 3, In), top-2 gates with repeated rows and an unused
  // expert, every input needing a gradient; with and without bias.
  Tensor x = Tensor::randn({2, 3, In}, g, DType::f64).set_requires_grad();
  Tensor W = Tensor::randn({Out, In}, g, DType::f64).set_requires_grad();
  Tensor b = Tensor::randn({Out}, g, DType::f64).set_requires_grad();
  Experts ex = make_experts(E, R, In, Out, g, DType::f64, true);
  const std::vector<int32_t> rows{0, 0, 1, 2, 3, 4, 5, 5}, experts{0, 1, 1, 0, 0, 1, 0, 1};
  Tensor w = Tensor::rand({8}, g, DType::f64, 0.1, 1.0).set_requires_grad();
  std::vector<Tensor> in{x, W, b, w};
  in.insert(in.end(), ex.A.begin(), ex.A.end());
  in.insert(in.end(), ex.B.begin(), ex.B.end());
  const auto f = [&](const std::vector<Tensor>& v) {
    return grouped_lora_linear(v[0], v[1], v[2], {v[4], v[5], v[6]}, {v[7], v[8], v[9]}, rows, experts, v[3], 0.7);
  };
  const auto r = autograd::gradcheck(f, in);
  INFO(r.message);
  CHECK(r.ok);
  const auto f_nobias = [&](const std::vector<Tensor>& v) {
    return grouped_lora_linear(v[0], v[1], Tensor(), {v[3], v[4], v[5]}, {v[6], v[7], v[8]}, rows, experts, v[2], 0.7);
  };
  std::vector<Tensor> in2{x, W, w};
  in2.insert(in2.end(), ex.A.begin(), ex.A.end());
  in2.insert(in2.end(), ex.B.begin(), ex.B.end());
  const auto r2 = autograd::gradcheck(f_nobias, in2);
  INFO(r2.message);
  CHECK(r2.ok);
  const Tensor y = f(in);
  CHECK(y.shape() == Shape{2, 3, Out});
  CHECK(test::max_abs_diff(
            y, grouped_lora_add(linear(x, W, b), x.reshape({6, In}), ex.A, ex.B, rows, experts, w, 0.7)) < 1e-12);

  // f32, one expert per row (MoA), the base frozen: the same values and expert gradients as the two
  // ops it replaces, bit for bit; dx sums the same two terms in another order.
  auto run = [&](bool fused) {
    Generator g2(7);
    Tensor xf = Tensor::randn({3, 5, In}, g2).set_requires_grad();
    Tensor Wf = Tensor::randn({Out, In}, g2), bf = Tensor::randn({Out}, g2);
    Experts e2 = make_experts(2, R, In, Out, g2, DType::f32, true);
    std::vector<int32_t> rr(15), ee(15);
    for (int32_t n = 0; n < 15; ++n) {
      rr[n] = n;
      ee[n] = n / 5 == 1 ? 1 : 0;
    }
    Tensor yf = fused ? grouped_lora_linear(xf, Wf, bf, e2.A, e2.B, rr, ee, Tensor(), 2.0)
                      : grouped_lora_add(linear(xf, Wf, bf), xf.reshape({15, In}), e2.A, e2.B, rr, ee, Tensor(), 2.0);
    sum(yf * yf).backward();
    return std::vector<Tensor>{yf, xf.grad(), e2.A[0].grad(), e2.B[1].grad()};
  };
  const auto fused = run(true), plain = run(false);
  CHECK(fused[0].to_vector<float>() == plain[0].to_vector<float>());
  double mag = 0;
  for (double v : plain[1].to_vector<double>()) mag = std::max(mag, std::fabs(v));
  CHECK(test::max_abs_diff(fused[1], plain[1]) <= 1e-6 * mag);
  CHECK(fused[2].to_vector<float>() == plain[2].to_vector<float>());
  CHECK(fused[3].to_vector<float>() == plain[3].to_vector<float>());

  test::check_throws_with<ShapeError>(
      [&] {
        (void)grouped_lora_linear(x, Tensor::zeros({Out + 1, In}, DType::f64), Tensor(), ex.A, ex.B, rows, experts, w,
                                  0.7);
      },
      {"grouped_lora_linear", "expert 0's B (5, R)", "[5, 5]", "[4, 2]"});
  test::check_throws_with<ShapeError>(
      [&] {
        (void)grouped_lora_linear(Tensor::zeros({6, In + 1}, DType::f64), W, b, ex.A, ex.B, rows, experts, w, 0.7);
      },
      {"linear", "[6, 6]"});
  test::check_throws_with<ShapeError>([&] { (void)grouped_lora_linear(x, b, b, ex.A, ex.B, rows, experts, w, 0.7); },
                                      {"grouped_lora_linear", "weight (Out, In)"});
}

TEST_CASE("grouped_lora: bad input") {
  Generator g(4);
  Tensor x = Tensor::randn({3, 4}, g);
  Experts ex = make_experts(2, 2, 4, 5, g, DType::f32, false);
  test::check_throws_with<IndexError>([&] { (void)grouped_lora(x, ex.A, ex.B, {0, 1}, {0, 2}, Tensor(), 1.0); },
                                      {"grouped_lora", "expert 2", "[0, 2)"});
  test::check_throws_with<IndexError>([&] { (void)grouped_lora(x, ex.A, ex.B, {3}, {0}, Tensor(), 1.0); },
                                      {"row 3", "[0, 3)"});
  test::check_throws_with<ShapeError>([&] { (void)grouped_lora(Tensor::randn({3, 5}, g), ex.A, ex.B, {0}, {0}, Tensor(), 1.0); },
                                      {"expert 0", "(R, 5)", "[2, 4]"});
  test::check_throws_with<ValueError>([&] { (void)grouped_lora(x, {}, {}, {}, {}, Tensor(), 1.0); }, {"at least one expert"});
}
