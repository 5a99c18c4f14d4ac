// Tests of the nn ops (softmax, log_softmax, layer_norm, rms_norm, embedding, causal_attention,
// cross_entropy): fast cpu kernels against the reference kernels, gradchecks in double, bad inputs,
// and values computed by independent formulas.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moa/autograd/gradcheck.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/softmax.hpp"
#include "moa/kernels/reference/softmax.hpp"
#include "moa/ops/softmax.hpp"

using moa::DType;
using moa::Generator;
using moa::Tensor;

namespace {

std::vector<float> randn_vec(int64_t n, Generator& gen, double std = 1.0) {
  return Tensor::randn({n}, gen, DType::f32, 0.0, std).to_vector<float>();
}

// Elementwise |a - b| <= atol + rtol * |b|; reports the first mismatch.
template <class T>
void check_close(const std::vector<T>& a, const std::vector<T>& b, double atol, double rtol, const std::string& what) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = a[i], y = b[i];
    if (!(std::abs(x - y) <= atol + rtol * std::abs(y))) {
      FAIL_CHECK(what << ": element " << i << " is " << x << ", expected " << y);
      return;
    }
  }
}

Tensor leaf(const moa::Shape& s, Generator& gen, double std = 1.0) {
  Tensor t = Tensor::randn(s, gen, DType::f64, 0.0, std);
  t.set_requires_grad();
  return t;
}

void check_grad(const std::function<Tensor(const std::vector<Tensor>&)>& f, const std::vector<Tensor>& inputs) {
  const auto r = moa::autograd::gradcheck(f, inputs);
  CHECK_MESSAGE(r.ok, r.message);
}

// Runs f, expects an exception of type E whose message contains every part.
template <class E, class F>
void check_throws(F&& f, const std::vector<std::string>& parts) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    const std::string msg = e.what();
    for (const auto& p : parts) CHECK_MESSAGE(msg.find(p) != std::string::npos, "'" << msg << "' lacks '" << p << "'");
  } catch (const std::exception& e) {
    FAIL_CHECK("wrong exception type: " << e.what());
    thrown = true;
  }
  CHECK_MESSAGE(thrown, "no exception thrown");
}

const int64_t kSizes[] = {1, 7, 33, 257};

}  // namespace

// ---------------------------------------------------------------------------------------------
// softmax / log_softmax
// ---------------------------------------------------------------------------------------------

TEST_CASE("softmax kernels: cpu matches reference (forward and backward)") {
  namespace ref = moa::kernels::reference;
  namespace cpu = moa::kernels::cpu;
  Generator gen(1);
  for (int64_t N : kSizes)
    for (int64_t C : kSizes) {
      const auto x = randn_vec(N * C, gen, 3.0);
      const auto dy = randn_vec(N * C, gen);
      std::vector<float> y0(N * C), y1(N * C), d0(N * C), d1(N * C);
      ref::softmax_forward(y0.data(), x.data(), N, C);
      cpu::softmax_forward(y1.data(), x.data(), N, C);
      check_close(y1, y0, 1e-7, 2e-5, "softmax forward");
      ref::softmax_backward(d0.data(), dy.data(), y0.data(), N, C);
      cpu::softmax_backward(d1.data(), dy.data(), y0.data(), N, C);
      check_close(d1, d0, 1e-6, 1e-4, "softmax backward");
      ref::log_softmax_forward(y0.data(), x.data(), N, C);
      cpu::log_softmax_forward(y1.data(), x.data(), N, C);
      check_close(y1, y0, 1e-5, 1e-5, "log_softmax forward");
      ref::log_softmax_backward(d0.data(), dy.data(), y0.data(), N, C);
      cpu::log_softmax_backward(d1.data(), dy.data(), y0.data(), N, C);
      check_close(d1, d0, 1e-5, 1e-4, "log_softmax backward");
    }
}

TEST_CASE("softmax kernels: the vectorised exp is accurate, and saturates cleanly") {
  using moa::kernels::cpu::detail::exp_f32;
  for (float x = -87.0f; x < 88.7f; x += 0.0137f) {
    const double e = std::exp(static_cast<double>(x));
    CHECK(std::abs(exp_f32(x) - e) <= 3e-7 * e);
  }
  CHECK(exp_f32(-INFINITY) == 0.0f);
  CHECK(exp_f32(-100.0f) == 0.0f);
  CHECK(std::isinf(exp_f32(100.0f)));
  CHECK(std::isnan(exp_f32(NAN)));
  // The eight-lane path (via exp_sub_sum) gives the same specials.
  std::vector<float> x = {-INFINITY, -100.0f, 0.0f, 1.0f, 100.0f, NAN, 88.7f, 2.0f, 3.0f};
  std::vector<float> y(x.size());
  moa::kernels::cpu::detail::exp_sub_sum(y.data(), x.data(), static_cast<int64_t>(x.size()), 0.0f);
  CHECK(y[0] == 0.0f);
  CHECK(y[1] == 0.0f);
  CHECK(y[2] == doctest::Approx(1.0));
  CHECK(y[3] == doctest::Approx(std::exp(1.0)));
  CHECK(std::isinf(y[4]));
  CHECK(std::isnan(y[5]));
  CHECK(y[6] == doctest::Approx(std::exp(88.7)));
  CHECK(y[8] == doctest::Approx(std::exp(3.0)));
  for (float v = -87.0f; v < 88.7f; v += 0.0137f * 8) {  // the eight-lane path alone
    std::vector<float> xs(8), ys(8);
    for (int i = 0; i < 8; ++i) xs[i] = v + 0.0137f * i;
    moa::kernels::cpu::detail::exp_sub_sum(ys.data(), xs.data(), 8, 0.0f);
    for (int i = 0; i < 8; ++i)
      if (xs[i] < 88.72f) CHECK(std::abs(ys[i] - std::exp(static_cast<double>(xs[i]))) <= 3e-7 * std::exp(static_cast<double>(xs[i])));
  }
}

TEST_CASE("softmax / log_softmax: values against an independent formula") {
  const std::vector<double> xs = {1.0, 2.0, 3.0, -1.0, 0.5, 1000.0};  // two rows of 3; 1000 tests the max shift
  Tensor x = Tensor::from_vector(xs, {2, 3});
  const auto y = moa::softmax(x).to_vector<double>();
  const auto ly = moa::log_softmax(x).to_vector<double>();
  for (int r = 0; r < 2; ++r) {
    double m = -INFINITY;
    for (int c = 0; c < 3; ++c) m = std::max(m, xs[r * 3 + c]);
    double s = 0;
    for (int c = 0; c < 3; ++c) s += std::exp(xs[r * 3 + c] - m);
    for (int c = 0; c < 3; ++c) {
      CHECK(y[r * 3 + c] == doctest::Approx(std::exp(xs[r * 3 + c] - m) / s).epsilon(1e-12));
      CHECK(ly[r * 3 + c] == doctest::Approx(xs[r * 3 + c] - m - std::log(s)).epsilon(1e-12));
    }
  }
  // Hand-checked: softmax([0, ln 3]) = [1/4, 3/4].
  const auto h = moa::softmax(Tensor::from_vector(std::vector<float>{0.0f, std::log(3.0f)})).to_vector<float>();
  CHECK(h[0] == doctest::Approx(0.25));
  CHECK(h[1] == doctest::Approx(0.75));
  // Along axis 0 of a [3, 2] tensor = along axis -1 of its transpose.
  Tensor x2 = Tensor::from_vector(xs, {3, 2});
  const auto a0 = moa::softmax(x2, 0).to_vector<double>();
  const auto a1 = moa::softmax(x2.transpose(0, 1).contiguous(), 1).transpose(0, 1).to_vector<double>();
  check_close(a0, a1, 1e-15, 1e-12, "softmax axis 0");
  // Float path with the vectorised exp, against doubles.
  Generator gen(5);
  Tensor xf = Tensor::randn({5, 300}, gen, DType::f32, 0.0, 4.0);
  check_close(moa::softmax(xf).to_vector<double>(), moa::softmax(xf.to(DType::f64)).to_vector<double>(), 1e-9, 1e-5,
              "softmax f32 vs f64");
  check_close(moa::log_softmax(xf).to_vector<double>(), moa::log_softmax(xf.to(DType::f64)).to_vector<double>(), 1e-5,
              1e-5, "log_softmax f32 vs f64");
}

TEST_CASE("softmax / log_softmax: gradcheck, including a non-contiguous input and another axis") {
  Generator gen(2);
  Tensor x = leaf({3, 5}, gen);
  check_grad([](const std::vector<Tensor>& in) { return moa::softmax(in[0]); }, {x});
  check_grad([](const std::vector<Tensor>& in) { return moa::log_softmax(in[0]); }, {x});
  check_grad([](const std::vector<Tensor>& in) { return moa::softmax(in[0].transpose(0, 1)); }, {x});
  check_grad([](const std::vector<Tensor>& in) { return moa::log_softmax(in[0].transpose(0, 1)); }, {x});
  Tensor x3 = leaf({2, 4, 3}, gen);
  check_grad([](const std::vector<Tensor>& in) { return moa::softmax(in[0], 1); }, {x3});
  check_grad([](const std::vector<Tensor>& in) { return moa::log_softmax(in[0], 0); }, {x3});
  check_grad([](const std::vector<Tensor>& in) { return moa::softmax(in[0].narrow(2, 1, 2)); }, {x3});
}

TEST_CASE("softmax / log_softmax: bad inputs") {
  Tensor ids = Tensor::zeros({2, 3}, DType::i32);
  check_throws<moa::ValueError>([&] { moa::softmax(ids); }, {"softmax", "i32"});
  check_throws<moa::ValueError>([&] { moa::log_softmax(ids); }, {"log_softmax", "i32"});
  check_throws<moa::ShapeError>([&] { moa::softmax(Tensor::scalar(1.0)); }, {"softmax", "rank >= 1", "[]"});
  check_throws<moa::IndexError>([&] { moa::softmax(Tensor::zeros({2, 3}), 2); }, {"softmax", "axis 2"});
  check_throws<moa::ValueError>([&] { moa::log_softmax(Tensor()); }, {"log_softmax", "undefined"});
  // Empty tensors are fine (nothing to normalise).
  CHECK(moa::softmax(Tensor::zeros({0, 4})).shape() == moa::Shape{0, 4});
  CHECK(moa::log_softmax(Tensor::zeros({3, 0})).shape() == moa::Shape{3, 0});
}
