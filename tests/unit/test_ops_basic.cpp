// Elementwise, reduction, matrix-product, concat/gather and dropout ops: values against naive
// references, gradients against finite differences in double precision, bad input.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>

#include "test_util.hpp"

using namespace moa;
using autograd::gradcheck;
using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

namespace {

Tensor leaf(const Shape& s, Generator& g, double lo = -1.0, double hi = 1.0) {
  return Tensor::rand(s, g, DType::f64, lo, hi).set_requires_grad();
}

void check_grad(const Fn& f, const std::vector<Tensor>& in) {
  const auto r = gradcheck(f, in);
  INFO(r.message);
  CHECK(r.ok);
}

}  // namespace

TEST_CASE("elementwise: broadcasting values match a naive loop") {
  Generator g(11);
  Tensor a = Tensor::randn({3, 1, 5}, g);
  Tensor b = Tensor::randn({4, 1}, g);
  const auto av = a.to_vector<float>(), bv = b.to_vector<float>();
  const Tensor s = a + b, d = a - b, m = a * b, q = a / b;
  CHECK(s.shape() == Shape{3, 4, 5});
  const auto sv = s.to_vector<float>(), dv = d.to_vector<float>(), mv = m.to_vector<float>(), qv = q.to_vector<float>();
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < 5; ++k) {
        const float x = av[i * 5 + k], y = bv[j];
        const int o = (i * 4 + j) * 5 + k;
        CHECK(sv[o] == x + y);
        CHECK(dv[o] == x - y);
        CHECK(mv[o] == x * y);
        CHECK(qv[o] == x / y);
      }
  // Non-contiguous operands read through their strides.
  Tensor at = Tensor::randn({5, 3}, g).t();
  const auto r = (at * at).to_vector<float>();
  const auto atv = at.to_vector<float>();
  for (std::size_t i = 0; i < r.size(); ++i) CHECK(r[i] == atv[i] * atv[i]);
}

TEST_CASE("elementwise: unary maps match their scalar formulas") {
  Generator g(12);
  Tensor x = Tensor::randn({257}, g, DType::f64);
  const auto xv = x.to_vector<double>();
  auto check_map = [&](const Tensor& y, const std::function<double(double)>& f) {
    const auto yv = y.to_vector<double>();
    for (std::size_t i = 0; i < xv.size(); ++i) CHECK(yv[i] == doctest::Approx(f(xv[i])).epsilon(1e-12));
  };
  check_map(exp(x), [](double v) { return std::exp(v); });
  check_map(tanh(x), [](double v) { return std::tanh(v); });
  check_map(scale(x, -2.5), [](double v) { return -2.5 * v; });
  check_map(relu(x), [](double v) { return v > 0 ? v : 0.0; });
  // GELU (tanh form) and SiLU against their textbook definitions.
  check_map(gelu(x), [](double v) {
    return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
  });
  check_map(silu(x), [](double v) { return v / (1.0 + std::exp(-v)); });
  // Known values: GELU-tanh(1) = 0.8411919906082768, SiLU(1) = 0.7310585786300049.
  CHECK(gelu(Tensor::scalar(1.0, DType::f64)).item<double>() == doctest::Approx(0.8411919906082768).epsilon(1e-14));
  CHECK(silu(Tensor::scalar(1.0, DType::f64)).item<double>() == doctest::Approx(0.7310585786300049).epsilon(1e-14));
}

TEST_CASE("GELU: the vectorised float kernels against the reference formulas, odd sizes and extremes") {
  Generator g(19);
  for (int64_t n : {1, 7, 33, 257, 4099}) {
    Tensor x = Tensor::randn({n}, g, DType::f32, 0.0, 4.0);
    std::vector<float> xv = x.to_vector<float>();
    if (n > 8) {  // extremes: tanh saturates, exp overflows or underflows inside
      xv[0] = 0.0f;
      xv[1] = -1e-6f;
      xv[2] = 60.0f;
      xv[3] = -60.0f;
      xv[4] = 1e-30f;
    }
    Tensor gout = Tensor::randn({n}, g);
    const auto gv = gout.to_vector<float>();
    std::vector<float> y(xv.size()), dx(xv.size());
    kernels::cpu::gelu_forward(xv.data(), y.data(), n);
    kernels::cpu::gelu_backward(xv.data(), gv.data(), dx.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const double v = xv[i];
      const double ry = kernels::reference::gelu(v), rd = gv[i] * kernels::reference::gelu_grad(v);
      INFO("x = " << v);
      CHECK(std::abs(y[i] - ry) <= 2e-6 * (1.0 + std::abs(ry)));
      CHECK(std::abs(dx[i] - rd) <= 2e-6 * (1.0 + std::abs(rd)));
    }
  }
}

TEST_CASE("gradcheck: elementwise ops with broadcasting and non-contiguous inputs") {
  Generator g(13);
  for (int trial = 0; trial < 3; ++trial) {
    const int64_t B = test::rand_size(1, 3), T = test::rand_size(1, 4), C = test::rand_size(1, 5);
    Tensor a = leaf({B, T, C}, g), b = leaf({T, 1}, g), c = leaf({C, T}, g), pos = leaf({B, T, C}, g, 0.5, 2.0);
    check_grad([](auto& in) { return in[0] + in[1]; }, {a, b});
    check_grad([](auto& in) { return in[0] - in[1]; }, {a, b});
    check_grad([](auto& in) { return in[0] * in[1]; }, {a, b});
    check_grad([](auto& in) { return in[0] / in[1]; }, {a, pos});
    // c^T is a non-contiguous view [T, C] broadcast against [B, T, C].
    check_grad([](auto& in) { return in[0] * in[1].t(); }, {a, c});
    check_grad([](auto& in) { return in[1].t() / in[0]; }, {pos, c});
  }
}

TEST_CASE("gradcheck: unary ops") {
  Generator g(14);
  Tensor x = leaf({3, 7}, g);
  Tensor p = leaf({3, 7}, g, 0.3, 2.0);
  check_grad([](auto& in) { return exp(in[0]); }, {x});
  check_grad([](auto& in) { return log(in[0]); }, {p});
  check_grad([](auto& in) { return sqrt(in[0]); }, {p});
  check_grad([](auto& in) { return tanh(in[0]); }, {x});
  check_grad([](auto& in) { return pow(in[0], 3.0); }, {x});
  check_grad([](auto& in) { return gelu(in[0]); }, {x});
  check_grad([](auto& in) { return silu(in[0]); }, {x});
  check_grad([](auto& in) { return -in[0] * 2.0 + 1.0; }, {x});
  check_grad([](auto& in) { return gelu(in[0].t()); }, {x});
}

TEST_CASE("reduce: sum and mean over axes, values and gradients") {
  Generator g(15);
  Tensor x = Tensor::randn({2, 3, 4}, g, DType::f64);
  const auto xv = x.to_vector<double>();
  const auto s1 = sum(x, {1}).to_vector<double>();
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 4; ++k)
      CHECK(s1[i * 4 + k] == doctest::Approx(xv[i * 12 + k] + xv[i * 12 + 4 + k] + xv[i * 12 + 8 + k]));
  CHECK(sum(x, {0, 2}, true).shape() == Shape{1, 3, 1});
  CHECK(sum(x, {-1}).shape() == Shape{2, 3});
  double total = 0;
  for (double v : xv) total += v;
  CHECK(sum(x).item<double>() == doctest::Approx(total));
  CHECK(mean(x).item<double>() == doctest::Approx(total / 24));
  Tensor l = leaf({2, 3, 4}, g);
  check_grad([](auto& in) { return sum(in[0], {1}); }, {l});
  check_grad([](auto& in) { return sum(in[0], {0, 2}, true); }, {l});
  check_grad([](auto& in) { return mean(in[0], {-1}); }, {l});
  check_grad([](auto& in) { return mean(in[0]); }, {l});
  check_grad([](auto& in) { return sum(in[0].permute({2, 0, 1}), {0}); }, {l});
  check_grad([](auto& in) { return expand(in[0].narrow(1, 0, 1), {2, 3, 4}) * in[0]; }, {l});
}

TEST_CASE("matmul: values against the reference kernel, batched and transposed, odd sizes") {
  Generator g(16);
  for (int64_t M : {1, 7, 33}) {
    for (int64_t K : {1, 9, 65}) {
      for (int64_t N : {1, 5, 40}) {
        Tensor a = Tensor::randn({2, M, K}, g, DType::f64), b = Tensor::randn({2, K, N}, g, DType::f64);
        Tensor c = matmul(a, b);
        std::vector<double> ref(static_cast<std::size_t>(2 * M * N));
        const auto av = a.to_vector<double>(), bv = b.to_vector<double>();
        for (int bt = 0; bt < 2; ++bt)
          kernels::reference::gemm<double>(false, false, M, N, K, 1.0, av.data() + bt * M * K, K,
                                           bv.data() + bt * K * N, N, 0.0, ref.data() + bt * M * N, N);
        CHECK(test::max_abs_diff(c.to_vector<double>(), ref) < 1e-12);
        // The same through transposed views (read in place) and in float.
        Tensor ct = matmul(a.transpose(-2, -1).contiguous().transpose(-2, -1),
                           b.transpose(-2, -1).contiguous().transpose(-2, -1));
        CHECK(test::max_abs_diff(ct.to_vector<double>(), ref) < 1e-12);
        Tensor cf = matmul(a.to(DType::f32), b.to(DType::f32));
        CHECK(test::max_abs_diff(cf.to_vector<double>(), ref) < 1e-4 * static_cast<double>(K));
      }
    }
  }
}

TEST_CASE("gradcheck: matmul (2-D, batched, broadcast weight, transposed views) and linear") {
  Generator g(17);
  Tensor a = leaf({2, 3, 4}, g), b = leaf({2, 4, 5}, g), w = leaf({4, 5}, g), wt = leaf({5, 4}, g);
  Tensor x2 = leaf({3, 4}, g), y2 = leaf({4, 6}, g), bias = leaf({5}, g);
  check_grad([](auto& in) { return matmul(in[0], in[1]); }, {x2, y2});
  check_grad([](auto& in) { return matmul(in[0], in[1]); }, {a, b});
  check_grad([](auto& in) { return matmul(in[0], in[1]); }, {a, w});
  check_grad([](auto& in) { return matmul(in[0], in[1].t()); }, {a, wt});
  check_grad([](auto& in) { return matmul(in[0].transpose(1, 2), in[1]); }, {b, leaf({2, 4, 3}, g)});
  check_grad([](auto& in) { return matmul(in[0], in[1]); }, {x2, b});  // 2-D A broadcast over B's batch
  check_grad([](auto& in) { return linear(in[0], in[1], in[2]); }, {a, wt, bias});
  check_grad([](auto& in) { return linear(in[0], in[1]); }, {x2, wt});
  check_grad([](auto& in) { return linear(in[0].transpose(0, 1), in[1]); }, {leaf({4, 3}, g), wt});
}

TEST_CASE("matmul and linear: bad shapes name the op and both shapes") {
  Tensor a = Tensor::zeros({2, 3}), b = Tensor::zeros({4, 5});
  test::check_throws_with<ShapeError>([&] { (void)matmul(a, b); }, {"matmul", "equal K", "[2, 3]", "[4, 5]"});
  test::check_throws_with<ShapeError>([&] { (void)matmul(Tensor::zeros({3}), b); }, {"matmul", "rank >= 2", "[3]"});
  test::check_throws_with<ShapeError>([&] { (void)matmul(Tensor::zeros({2, 2, 3}), Tensor::zeros({3, 3, 4})); },
                                      {"matmul", "broadcast"});
  test::check_throws_with<ValueError>([&] { (void)matmul(a, Tensor::zeros({3, 2}, DType::f64)); }, {"matmul", "f64"});
  test::check_throws_with<ShapeError>([&] { (void)linear(a, b); }, {"linear", "[4, 5]", "[2, 3]"});
  test::check_throws_with<ShapeError>([&] { (void)linear(a, Tensor::zeros({4, 3}), Tensor::zeros({5})); },
                                      {"linear", "bias", "[4]", "[5]"});
  test::check_throws_with<ShapeError>([&] { (void)(a + b); }, {"add", "[2, 3]", "[4, 5]", "broadcast"});
  test::check_throws_with<ShapeError>([&] { (void)sum(a, {1, 1}); }, {"sum", "once"});
  test::check_throws_with<IndexError>([&] { (void)mean(a, {2}); }, {"mean", "axis 2"});
  test::check_throws_with<ShapeError>([&] { (void)mean(Tensor::zeros({0, 3}), {0}); }, {"mean", "non-empty"});
}

TEST_CASE("concat and gather: values, gradients, bad input") {
  Generator g(18);
  Tensor a = Tensor::from_vector(std::vector<float>{1, 2, 3, 4}, {2, 2});
  Tensor b = Tensor::from_vector(std::vector<float>{5, 6}, {2, 1});
  CHECK(concat({a, b}, 1).to_vector<float>() == std::vector<float>{1, 2, 5, 3, 4, 6});
  CHECK(concat({a, a}, 0).shape() == Shape{4, 2});
  Tensor idx = Tensor::from_vector(std::vector<int32_t>{1, 0, 0, 0, 1, 1}, {2, 3});
  CHECK(gather(a, 1, idx).to_vector<float>() == std::vector<float>{2, 1, 1, 3, 4, 4});

  Tensor x = leaf({2, 3}, g), y = leaf({2, 4}, g), z = leaf({3, 5}, g);
  check_grad([](auto& in) { return concat({in[0], in[1]}, 1); }, {x, y});
  check_grad([](auto& in) { return concat({in[0].t(), in[1]}, 0); }, {x, z.narrow(1, 0, 2).contiguous().detach().set_requires_grad()});
  Tensor gi = Tensor::from_vector(std::vector<int32_t>{2, 2, 0, 1, 1, 1}, {2, 3});  // repeats: scatter-add
  check_grad([gi](auto& in) { return gather(in[0], 1, gi); }, {x});
  Tensor gi0 = Tensor::from_vector(std::vector<int32_t>{1, 0, 1}, {1, 3});
  check_grad([gi0](auto& in) { return gather(in[0].t(), 0, gi0.t().contiguous()); }, {x});

  test::check_throws_with<ShapeError>([&] { (void)concat({a, Tensor::zeros({3, 1})}, 1); }, {"concat", "[2, 2]", "[3, 1]"});
  test::check_throws_with<ShapeError>([&] { (void)concat({}, 0); }, {"concat", "at least one"});
  test::check_throws_with<IndexError>(
      [&] { (void)gather(a, 1, Tensor::from_vector(std::vector<int32_t>{0, 2}, {2, 1})); },
      {"gather", "index 2", "size 2"});
  test::check_throws_with<ValueError>([&] { (void)gather(a, 1, Tensor::zeros({2, 1})); }, {"gather", "i32"});
}

TEST_CASE("dropout: keeps about 1 - p, scales by 1 / (1 - p), repeats with the seed; gradient") {
  Generator g1(9), g2(9);
  Tensor x = Tensor::ones({10000});
  const auto y1 = dropout(x, 0.25, g1).to_vector<float>();
  const auto y2 = dropout(x, 0.25, g2).to_vector<float>();
  CHECK(y1 == y2);
  int kept = 0;
  for (float v : y1) {
    CHECK((v == 0.0f || v == doctest::Approx(1.0f / 0.75f)));
    kept += v != 0.0f;
  }
  CHECK(std::abs(kept / 10000.0 - 0.75) < 0.02);
  CHECK(dropout(x, 0.5, g1, false).shares_storage_with(x));  // eval: identity
  Generator g3(4);
  Tensor l = leaf({3, 7}, g3);
  check_grad(
      [](auto& in) {
        Generator gd(123);  // the same mask on every evaluation
        return dropout(in[0], 0.3, gd);
      },
      {l});
  test::check_throws_with<ValueError>([&] { (void)dropout(x, 1.0, g1); }, {"dropout", "p < 1", "1"});
}
