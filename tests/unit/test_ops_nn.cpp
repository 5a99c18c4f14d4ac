// Tests of the nn ops (softmax, log_softmax, layer_norm, rms_norm, embedding, causal_attention,
// cross_entropy): fast cpu kernels against the reference kernels, gradchecks in double, bad inputs,
// and values computed by independent formulas.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "../cuda/strided_heads.hpp"
#include "moa/autograd/gradcheck.hpp"
#include "moa/core/tensor.hpp"
#include "moa/kernels/cpu/attention.hpp"
#include "moa/kernels/cpu/cross_entropy.hpp"
#include "moa/kernels/cpu/embedding.hpp"
#include "moa/kernels/cpu/norm.hpp"
#include "moa/kernels/cpu/softmax.hpp"
#include "moa/kernels/reference/attention.hpp"
#include "moa/kernels/reference/cross_entropy.hpp"
#include "moa/kernels/reference/embedding.hpp"
#include "moa/kernels/reference/norm.hpp"
#include "moa/kernels/reference/softmax.hpp"
#include "moa/ops/attention.hpp"
#include "moa/ops/elementwise.hpp"
#include "moa/ops/embedding.hpp"
#include "moa/ops/linear_loss.hpp"
#include "moa/ops/loss.hpp"
#include "moa/ops/norm.hpp"
#include "moa/ops/reduce.hpp"
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

// n ids uniform in [0, V).
std::vector<int32_t> rand_ids(int64_t n, int64_t V, Generator& gen) {
  const auto u = Tensor::rand({n}, gen, DType::f64, 0.0, static_cast<double>(V)).to_vector<double>();
  std::vector<int32_t> out(u.size());
  for (std::size_t i = 0; i < u.size(); ++i) out[i] = std::min<int32_t>(static_cast<int32_t>(u[i]), V - 1);
  return out;
}

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

// ---------------------------------------------------------------------------------------------
// layer_norm / rms_norm
// ---------------------------------------------------------------------------------------------

TEST_CASE("norm kernels: cpu matches reference (forward and backward)") {
  namespace ref = moa::kernels::reference;
  namespace cpu = moa::kernels::cpu;
  Generator gen(3);
  for (int64_t N : kSizes)
    for (int64_t C : kSizes)
      for (bool with_bias : {true, false}) {
        const auto x = randn_vec(N * C, gen, 2.0);
        const auto w = randn_vec(C, gen);
        const auto bias = randn_vec(C, gen);
        const auto dy = randn_vec(N * C, gen);
        const float* b = with_bias ? bias.data() : nullptr;
        std::vector<float> y0(N * C), y1(N * C), m0(N), m1(N), r0(N), r1(N);
        ref::layer_norm_forward(y0.data(), m0.data(), r0.data(), x.data(), w.data(), b, N, C, 1e-5f);
        cpu::layer_norm_forward(y1.data(), m1.data(), r1.data(), x.data(), w.data(), b, N, C, 1e-5f);
        check_close(y1, y0, 1e-5, 1e-4, "layer_norm forward");
        check_close(m1, m0, 1e-6, 1e-5, "layer_norm mean");
        check_close(r1, r0, 1e-6, 1e-4, "layer_norm rstd");
        // dweight / dbias accumulate: start them from the same non-zero values.
        std::vector<float> dx0(N * C), dx1(N * C), dw0 = w, dw1 = w, db0 = bias, db1 = bias;
        ref::layer_norm_backward(dx0.data(), dw0.data(), db0.data(), dy.data(), x.data(), w.data(), m0.data(),
                                 r0.data(), N, C);
        cpu::layer_norm_backward(dx1.data(), dw1.data(), db1.data(), dy.data(), x.data(), w.data(), m0.data(),
                                 r0.data(), N, C);
        check_close(dx1, dx0, 1e-4, 1e-3, "layer_norm dx");
        check_close(dw1, dw0, 1e-4, 1e-4, "layer_norm dweight");
        check_close(db1, db0, 1e-4, 1e-4, "layer_norm dbias");
        // Only the parameter gradients (dx null), and only dx.
        std::vector<float> dw2 = w;
        cpu::layer_norm_backward<float>(nullptr, dw2.data(), nullptr, dy.data(), x.data(), w.data(), m0.data(),
                                        r0.data(), N, C);
        check_close(dw2, dw0, 1e-4, 1e-4, "layer_norm dweight alone");
        std::vector<float> dx2(N * C);
        cpu::layer_norm_backward<float>(dx2.data(), nullptr, nullptr, dy.data(), x.data(), w.data(), m0.data(),
                                        r0.data(), N, C);
        check_close(dx2, dx0, 1e-4, 1e-3, "layer_norm dx alone");

        ref::rms_norm_forward(y0.data(), r0.data(), x.data(), w.data(), N, C, 1e-6f);
        cpu::rms_norm_forward(y1.data(), r1.data(), x.data(), w.data(), N, C, 1e-6f);
        check_close(y1, y0, 1e-5, 1e-4, "rms_norm forward");
        check_close(r1, r0, 1e-6, 1e-4, "rms_norm rstd");
        dw0 = w;
        dw1 = w;
        ref::rms_norm_backward(dx0.data(), dw0.data(), dy.data(), x.data(), w.data(), r0.data(), N, C);
        cpu::rms_norm_backward(dx1.data(), dw1.data(), dy.data(), x.data(), w.data(), r0.data(), N, C);
        check_close(dx1, dx0, 1e-4, 1e-3, "rms_norm dx");
        check_close(dw1, dw0, 1e-4, 1e-4, "rms_norm dweight");
      }
}

TEST_CASE("layer_norm / rms_norm: values against an independent formula") {
  const std::vector<double> xs = {1.0, 2.0, 3.0, 4.0, -2.0, 0.0, 5.0, 1.0};
  const std::vector<double> ws = {1.0, 0.5, -1.0, 2.0}, bs = {0.0, 1.0, 0.25, -3.0};
  Tensor x = Tensor::from_vector(xs, {2, 4});
  Tensor w = Tensor::from_vector(ws), b = Tensor::from_vector(bs);
  const auto y = moa::layer_norm(x, w, b, 1e-5).to_vector<double>();
  const auto y_nb = moa::layer_norm(x, w).to_vector<double>();
  const auto z = moa::rms_norm(x, w, 1e-6).to_vector<double>();
  for (int r = 0; r < 2; ++r) {
    double mean = 0, var = 0, ms = 0;
    for (int c = 0; c < 4; ++c) mean += xs[r * 4 + c] / 4;
    for (int c = 0; c < 4; ++c) var += (xs[r * 4 + c] - mean) * (xs[r * 4 + c] - mean) / 4;
    for (int c = 0; c < 4; ++c) ms += xs[r * 4 + c] * xs[r * 4 + c] / 4;
    for (int c = 0; c < 4; ++c) {
      const double xhat = (xs[r * 4 + c] - mean) / std::sqrt(var + 1e-5);
      CHECK(y[r * 4 + c] == doctest::Approx(xhat * ws[c] + bs[c]).epsilon(1e-12));
      CHECK(y_nb[r * 4 + c] == doctest::Approx(xhat * ws[c]).epsilon(1e-12));
      CHECK(z[r * 4 + c] == doctest::Approx(xs[r * 4 + c] / std::sqrt(ms + 1e-6) * ws[c]).epsilon(1e-12));
    }
  }
  // Hand-checked: layer_norm([1, 3]) with eps 0 = [-1, 1]; rms_norm([3, 4]) with eps 0 = [3, 4] / sqrt(12.5).
  const auto h = moa::layer_norm(Tensor::from_vector(std::vector<float>{1.0f, 3.0f}), Tensor::ones({2}), Tensor(), 0.0)
                     .to_vector<float>();
  CHECK(h[0] == doctest::Approx(-1.0));
  CHECK(h[1] == doctest::Approx(1.0));
  const auto h2 =
      moa::rms_norm(Tensor::from_vector(std::vector<float>{3.0f, 4.0f}), Tensor::ones({2}), 0.0).to_vector<float>();
  CHECK(h2[0] == doctest::Approx(3.0 / std::sqrt(12.5)));
  CHECK(h2[1] == doctest::Approx(4.0 / std::sqrt(12.5)));
  // A rank-1 input and a rank-3 input give per-row statistics.
  CHECK(moa::layer_norm(Tensor::zeros({5}), Tensor::ones({5})).shape() == moa::Shape{5});
  CHECK(moa::rms_norm(Tensor::zeros({2, 3, 5}), Tensor::ones({5})).shape() == moa::Shape{2, 3, 5});
}

TEST_CASE("layer_norm / rms_norm: gradcheck of x, weight and bias, including non-contiguous x") {
  Generator gen(4);
  Tensor x = leaf({3, 6}, gen), w = leaf({6}, gen), b = leaf({6}, gen);
  Tensor xt = leaf({6, 3}, gen), x3 = leaf({2, 3, 8}, gen), w3 = leaf({6}, gen);
  check_grad([](const std::vector<Tensor>& in) { return moa::layer_norm(in[0], in[1], in[2]); }, {x, w, b});
  check_grad([](const std::vector<Tensor>& in) { return moa::layer_norm(in[0], in[1]); }, {x, w});
  check_grad([](const std::vector<Tensor>& in) { return moa::layer_norm(in[0].transpose(0, 1), in[1], in[2]); },
             {xt, w, b});
  check_grad([](const std::vector<Tensor>& in) { return moa::layer_norm(in[0].narrow(2, 1, 6), in[1], in[2]); },
             {x3, w3, b});
  check_grad([](const std::vector<Tensor>& in) { return moa::rms_norm(in[0], in[1]); }, {x, w});
  check_grad([](const std::vector<Tensor>& in) { return moa::rms_norm(in[0].transpose(0, 1), in[1]); }, {xt, w});
  check_grad([](const std::vector<Tensor>& in) { return moa::rms_norm(in[0].narrow(2, 2, 6), in[1]); }, {x3, w3});
  // Only some inputs need a gradient.
  Tensor xc = Tensor::randn({4, 6}, gen, DType::f64);
  check_grad([&](const std::vector<Tensor>& in) { return moa::layer_norm(xc, in[0], in[1]); }, {w, b});
  check_grad([&](const std::vector<Tensor>& in) { return moa::rms_norm(xc, in[0]); }, {w});
}

TEST_CASE("layer_norm / rms_norm: bad inputs") {
  Tensor x = Tensor::zeros({2, 8});
  check_throws<moa::ShapeError>([&] { moa::layer_norm(x, Tensor::ones({7})); },
                                {"[moa.shape_error] layer_norm: expected weight of shape [8], got [7]"});
  check_throws<moa::ShapeError>([&] { moa::layer_norm(x, Tensor::ones({8}), Tensor::ones({8, 1})); },
                                {"layer_norm", "bias", "[8]", "[8, 1]"});
  check_throws<moa::ValueError>([&] { moa::layer_norm(x, Tensor::ones({8}, DType::f64)); },
                                {"layer_norm", "weight", "f32", "f64"});
  check_throws<moa::ValueError>([&] { moa::layer_norm(x, Tensor()); }, {"layer_norm", "weight", "undefined"});
  check_throws<moa::ValueError>([&] { moa::layer_norm(Tensor::zeros({2, 8}, DType::i32), Tensor::ones({8})); },
                                {"layer_norm", "i32"});
  check_throws<moa::ShapeError>([&] { moa::layer_norm(Tensor::scalar(1.0), Tensor::ones({1})); },
                                {"layer_norm", "[..., C]", "[]"});
  check_throws<moa::ShapeError>([&] { moa::layer_norm(Tensor::zeros({3, 0}), Tensor::ones({0})); },
                                {"layer_norm", "C >= 1", "[3, 0]"});
  check_throws<moa::ShapeError>([&] { moa::rms_norm(x, Tensor::ones({2})); },
                                {"[moa.shape_error] rms_norm: expected weight of shape [8], got [2]"});
  check_throws<moa::ValueError>([&] { moa::rms_norm(x, Tensor::ones({8}), -1.0); }, {"rms_norm", "eps"});
  // No rows is fine.
  CHECK(moa::rms_norm(Tensor::zeros({0, 8}), Tensor::ones({8})).shape() == moa::Shape{0, 8});
}

// ---------------------------------------------------------------------------------------------
// embedding
// ---------------------------------------------------------------------------------------------

TEST_CASE("embedding kernels: cpu matches reference bit for bit, for any thread count") {
  namespace ref = moa::kernels::reference;
  namespace cpu = moa::kernels::cpu;
  Generator gen(6);
  const int threads = moa::num_threads();
  for (int64_t V : {1, 7, 33})
    for (int64_t N : kSizes)
      for (int64_t C : kSizes) {
        const auto w = randn_vec(V * C, gen);
        const auto ids = rand_ids(N, V, gen);  // repeats when N > V
        const auto dy = randn_vec(N * C, gen);
        std::vector<float> y0(N * C), y1(N * C);
        ref::embedding_forward(y0.data(), ids.data(), w.data(), N, C);
        cpu::embedding_forward(y1.data(), ids.data(), w.data(), N, C);
        CHECK(y1 == y0);
        std::vector<float> d0 = w, d1 = w, d2 = w;  // accumulates onto existing values
        ref::embedding_backward(d0.data(), dy.data(), ids.data(), N, C);
        cpu::embedding_backward(d1.data(), dy.data(), ids.data(), N, C);
        moa::set_num_threads(1);
        cpu::embedding_backward(d2.data(), dy.data(), ids.data(), N, C);
        moa::set_num_threads(threads);
        CHECK(d1 == d0);
        CHECK(d2 == d0);
      }
}

TEST_CASE("embedding: values, shapes and gradient by hand") {
  // weight rows are [10r, 10r + 1]; ids [[2, 0, 2], [1, 1, 1]].
  Tensor w = Tensor::from_vector(std::vector<float>{0, 1, 10, 11, 20, 21}, {3, 2});
  w.set_requires_grad();
  Tensor ids = Tensor::from_vector(std::vector<int32_t>{2, 0, 2, 1, 1, 1}, {2, 3});
  Tensor y = moa::embedding(w, ids);
  CHECK(y.shape() == moa::Shape{2, 3, 2});
  CHECK(y.to_vector<float>() == std::vector<float>{20, 21, 0, 1, 20, 21, 10, 11, 10, 11, 10, 11});
  // d(sum(y * k))/dw for k = ones: each row's gradient counts its occurrences.
  y.backward(Tensor::ones({2, 3, 2}));
  CHECK(w.grad().to_vector<float>() == std::vector<float>{1, 1, 3, 3, 2, 2});
  // A scalar id gives one row; no ids give an empty [0, C].
  CHECK(moa::embedding(w, Tensor::from_vector(std::vector<int32_t>{1}, {})).to_vector<float>() ==
        std::vector<float>{10, 11});
  CHECK(moa::embedding(w, Tensor::zeros({0}, DType::i32)).shape() == moa::Shape{0, 2});
}

TEST_CASE("embedding: gradcheck, including a non-contiguous table and non-contiguous ids") {
  Generator gen(7);
  Tensor w = leaf({5, 4}, gen), wt = leaf({4, 5}, gen);
  Tensor ids = Tensor::from_vector(std::vector<int32_t>{0, 3, 3, 4, 1, 3}, {2, 3});
  check_grad([&](const std::vector<Tensor>& in) { return moa::embedding(in[0], ids); }, {w});
  check_grad([&](const std::vector<Tensor>& in) { return moa::embedding(in[0].transpose(0, 1), ids.transpose(0, 1)); },
             {wt});
  check_grad([&](const std::vector<Tensor>& in) { return moa::embedding(in[0].narrow(1, 1, 3), ids); }, {w});
}

TEST_CASE("embedding: bad inputs") {
  Tensor w = Tensor::zeros({10, 4});
  Tensor ids = Tensor::from_vector(std::vector<int32_t>{1, 2, 3, 4, 5, 12}, {2, 3});
  check_throws<moa::IndexError>([&] { moa::embedding(w, ids); },
                                {"[moa.index_error] embedding", "id 12", "position [1, 2]", "V = 10", "[10, 4]"});
  Tensor neg = Tensor::from_vector(std::vector<int32_t>{0, -1});
  check_throws<moa::IndexError>([&] { moa::embedding(w, neg); }, {"embedding", "id -1", "position [1]"});
  check_throws<moa::ValueError>([&] { moa::embedding(w, Tensor::zeros({3})); }, {"embedding", "ids", "i32", "f32"});
  check_throws<moa::ValueError>([&] { moa::embedding(Tensor::zeros({10, 4}, DType::i32), ids); },
                                {"embedding", "weight", "i32"});
  check_throws<moa::ShapeError>([&] { moa::embedding(Tensor::zeros({10}), ids); },
                                {"embedding", "[V, C]", "[10]"});
  check_throws<moa::ValueError>([&] { moa::embedding(w, Tensor()); }, {"embedding", "defined"});
}

// ---------------------------------------------------------------------------------------------
// cross_entropy
// ---------------------------------------------------------------------------------------------

TEST_CASE("cross_entropy kernels: cpu matches reference, with ignored targets") {
  namespace ref = moa::kernels::reference;
  namespace cpu = moa::kernels::cpu;
  Generator gen(8);
  for (int64_t N : kSizes)
    for (int64_t V : kSizes) {
      const auto x = randn_vec(N * V, gen, 3.0);
      auto t = rand_ids(N, V, gen);
      for (int64_t n = 0; n < N; n += 3) t[n] = -100;  // every third row ignored (all of them when N == 1)
      std::vector<float> l0(N), l1(N), d0(N * V), d1(N * V, 7.0f);
      const float loss0 = ref::cross_entropy_forward(l0.data(), x.data(), t.data(), N, V, -100);
      const float loss1 = cpu::cross_entropy_forward(l1.data(), x.data(), t.data(), N, V, -100);
      CHECK(loss1 == doctest::Approx(loss0).epsilon(1e-5));
      check_close(l1, l0, 1e-5, 1e-5, "cross_entropy lse");
      ref::cross_entropy_backward(d0.data(), 1.5f, x.data(), l0.data(), t.data(), N, V, -100);
      cpu::cross_entropy_backward(d1.data(), 1.5f, x.data(), l0.data(), t.data(), N, V, -100);
      check_close(d1, d0, 1e-7, 1e-4, "cross_entropy dlogits");
    }
}

TEST_CASE("cross_entropy: values against an independent formula and by hand") {
  // Rows: a clear winner, a uniform row (ignored), a row whose target is not the max.
  const std::vector<double> xs = {1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 0.0, 0.0, 5.0};
  Tensor x = Tensor::from_vector(xs, {3, 3});
  x.set_requires_grad();
  Tensor t = Tensor::from_vector(std::vector<int32_t>{2, -100, 0});
  Tensor loss = moa::cross_entropy(x, t);
  CHECK(loss.shape() == moa::Shape{});
  auto nll = [&](int r, int c) {
    double s = 0;
    for (int v = 0; v < 3; ++v) s += std::exp(xs[r * 3 + v]);
    return std::log(s) - xs[r * 3 + c];
  };
  const double expected = (nll(0, 2) + nll(2, 0)) / 2;
  CHECK(loss.item<double>() == doctest::Approx(expected).epsilon(1e-13));
  loss.backward();
  const auto g = x.grad().to_vector<double>();
  for (int r : {0, 2}) {
    double s = 0;
    for (int v = 0; v < 3; ++v) s += std::exp(xs[r * 3 + v]);
    for (int v = 0; v < 3; ++v)
      CHECK(g[r * 3 + v] == doctest::Approx((std::exp(xs[r * 3 + v]) / s - (v == (r == 0 ? 2 : 0))) / 2).epsilon(1e-12));
  }
  for (int v = 0; v < 3; ++v) CHECK(g[3 + v] == 0.0);
  // Hand-checked: two equal logits -> loss ln 2; [B, T, V] form with targets [B, T].
  Tensor x3 = Tensor::zeros({2, 1, 2});
  Tensor t3 = Tensor::from_vector(std::vector<int32_t>{0, 1}, {2, 1});
  CHECK(moa::cross_entropy(x3, t3).item<float>() == doctest::Approx(std::log(2.0)));
  // All ignored: loss 0 and an all-zero gradient.
  Tensor xa = Tensor::ones({2, 4}, DType::f64);
  xa.set_requires_grad();
  Tensor la = moa::cross_entropy(xa, Tensor::from_vector(std::vector<int32_t>{-1, -1}), -1);
  CHECK(la.item<double>() == 0.0);
  la.backward();
  CHECK(xa.grad().to_vector<double>() == std::vector<double>(8, 0.0));
  // No rows at all: like all ignored.
  CHECK(moa::cross_entropy(Tensor::zeros({0, 4}), Tensor::zeros({0}, DType::i32)).item<float>() == 0.0f);
  // A custom ignore_index inside [0, V) ignores that class.
  Tensor xi = Tensor::from_vector(std::vector<double>{0.0, 1.0, 1.0, 0.0}, {2, 2});
  CHECK(moa::cross_entropy(xi, Tensor::from_vector(std::vector<int32_t>{1, 1}), 1).item<double>() == 0.0);
}

TEST_CASE("cross_entropy: gradcheck, with ignored targets and non-contiguous logits") {
  Generator gen(9);
  Tensor x = leaf({5, 7}, gen, 2.0), xt = leaf({7, 5}, gen, 2.0), x3 = leaf({2, 3, 6}, gen);
  Tensor t = Tensor::from_vector(std::vector<int32_t>{3, -100, 0, 6, -100});
  check_grad([&](const std::vector<Tensor>& in) { return moa::cross_entropy(in[0], t); }, {x});
  check_grad([&](const std::vector<Tensor>& in) { return moa::cross_entropy(in[0].transpose(0, 1), t); }, {xt});
  Tensor t3 = Tensor::from_vector(std::vector<int32_t>{0, 4, -100, 1, 1, 4}, {2, 3});
  check_grad([&](const std::vector<Tensor>& in) { return moa::cross_entropy(in[0].narrow(2, 1, 5), t3); }, {x3});
  // (gradcheck projects the scalar loss on a random weight, so a non-unit upstream gradient is covered.)
}

TEST_CASE("cross_entropy: bad inputs") {
  Tensor x = Tensor::zeros({2, 3, 5});
  Tensor t = Tensor::from_vector(std::vector<int32_t>{0, 1, 2, 3, 4, 7}, {2, 3});
  check_throws<moa::IndexError>([&] { moa::cross_entropy(x, t); },
                                {"[moa.index_error] cross_entropy", "target 7", "position [1, 2]", "V = 5",
                                 "[2, 3, 5]", "ignore_index = -100"});
  check_throws<moa::IndexError>(
      [&] { moa::cross_entropy(Tensor::zeros({2, 5}), Tensor::from_vector(std::vector<int32_t>{-1, 0})); },
      {"cross_entropy", "target -1", "position [0]"});
  check_throws<moa::ShapeError>([&] { moa::cross_entropy(x, Tensor::zeros({6}, DType::i32)); },
                                {"cross_entropy", "targets of shape [2, 3]", "[2, 3, 5]", "got [6]"});
  check_throws<moa::ShapeError>([&] { moa::cross_entropy(Tensor::zeros({5}), Tensor::zeros({}, DType::i32)); },
                                {"cross_entropy", "[N, V]", "got [5]"});
  check_throws<moa::ShapeError>([&] { moa::cross_entropy(Tensor::zeros({2, 0}), Tensor::zeros({2}, DType::i32)); },
                                {"cross_entropy", "V >= 1", "[2, 0]"});
  check_throws<moa::ValueError>([&] { moa::cross_entropy(x, Tensor::zeros({2, 3})); },
                                {"cross_entropy", "targets", "i32", "f32"});
  check_throws<moa::ValueError>([&] { moa::cross_entropy(Tensor::zeros({2, 3}, DType::i32), t); },
                                {"cross_entropy", "logits", "i32"});
}

TEST_CASE("linear_cross_entropy: gradcheck in f64, chunked, with ignored targets") {
  Generator gen(21);
  Tensor x = leaf({2, 3, 4}, gen), w = leaf({7, 4}, gen);
  Tensor t = Tensor::from_vector(std::vector<int32_t>{3, -100, 0, 6, -100, 2}, {2, 3});
  for (int64_t chunk : {0, 1, 4, 6}) {  // default (one chunk), one row, a partial last chunk, exact
    CAPTURE(chunk);
    check_grad([&](const std::vector<Tensor>& in) { return moa::linear_cross_entropy(in[0], in[1], t, -100, chunk); },
               {x, w});
  }
  // a non-contiguous x, and x alone needing a gradient
  Tensor xt = leaf({4, 6}, gen), w2 = w.detach();
  Tensor t6 = Tensor::from_vector(std::vector<int32_t>{0, 1, 2, 3, 4, 5});
  check_grad(
      [&](const std::vector<Tensor>& in) { return moa::linear_cross_entropy(in[0].transpose(0, 1), w2, t6, -100, 4); },
      {xt});
}

TEST_CASE("linear_cross_entropy: cross_entropy(linear(x, W)) in value and gradients, for any chunk size") {
  Generator gen(22);
  const int64_t B = 3, T = 7, C = 16, V = 37;
  const Tensor x0 = Tensor::randn({B, T, C}, gen), w0 = Tensor::randn({V, C}, gen, DType::f32, 0.0, 0.3);
  std::vector<int32_t> tv(static_cast<std::size_t>(B * T));
  for (std::size_t i = 0; i < tv.size(); ++i) tv[i] = i % 5 == 2 ? -100 : static_cast<int32_t>((i * 11) % V);
  const Tensor t = Tensor::from_vector(tv, {B, T});
  auto run = [&](int64_t chunk, double upstream) {  // chunk < 0: the unfused ops
    Tensor x = x0.clone().set_requires_grad(), w = w0.clone().set_requires_grad();
    Tensor loss =
        chunk < 0 ? moa::cross_entropy(moa::linear(x, w), t) : moa::linear_cross_entropy(x, w, t, -100, chunk);
    (loss * upstream).backward();
    return std::vector<Tensor>{loss, x.grad(), w.grad()};
  };
  const auto want = run(-1, 1.0);
  for (int64_t chunk : {0, 1, 5, 8, 21, 100}) {
    CAPTURE(chunk);
    const auto got = run(chunk, 1.0);
    CHECK(got[0].shape() == moa::Shape{});
    CHECK(got[0].item<double>() == doctest::Approx(want[0].item<double>()).epsilon(1e-6));
    check_close(got[1].to_vector<float>(), want[1].to_vector<float>(), 1e-6, 1e-4, "dx");
    check_close(got[2].to_vector<float>(), want[2].to_vector<float>(), 1e-6, 1e-4, "dW");
  }
  // The upstream gradient scales both gradients (they are formed in the forward for 1).
  const auto scaled = run(5, -2.5);
  check_close(scaled[1].to_vector<float>(), (want[1] * -2.5).to_vector<float>(), 1e-6, 1e-4, "dx * -2.5");
  check_close(scaled[2].to_vector<float>(), (want[2] * -2.5).to_vector<float>(), 1e-6, 1e-4, "dW * -2.5");
  // A retained graph is gone through twice (the gradients handed over only when it is not).
  {
    Tensor x = x0.clone().set_requires_grad(), w = w0.clone().set_requires_grad();
    Tensor loss = moa::linear_cross_entropy(x, w, t, -100, 5);
    loss.backward(Tensor(), true);
    loss.backward();
    check_close(x.grad().to_vector<float>(), (want[1] * 2.0).to_vector<float>(), 1e-6, 1e-4, "dx twice");
    check_close(w.grad().to_vector<float>(), (want[2] * 2.0).to_vector<float>(), 1e-6, 1e-4, "dW twice");
    CHECK_THROWS_AS(loss.backward(), moa::AutogradError);
  }
  {  // the same with an upstream gradient of -1.5: new tensors while retained, then scaled in place
    Tensor x = x0.clone().set_requires_grad(), w = w0.clone().set_requires_grad();
    Tensor loss = moa::linear_cross_entropy(x, w, t, -100, 5) * -1.5;
    loss.backward(Tensor(), true);
    loss.backward();
    check_close(x.grad().to_vector<float>(), (want[1] * -3.0).to_vector<float>(), 1e-6, 1e-4, "dx twice, scaled");
    check_close(w.grad().to_vector<float>(), (want[2] * -3.0).to_vector<float>(), 1e-6, 1e-4, "dW twice, scaled");
  }
  // A backward that fails after this op has handed its gradients over: a retry says so, where it
  // would otherwise find them gone and leave x without a gradient.
  {
    // x's copy whose backward throws the first time it runs, then passes the gradient through.
    bool fail = true;
    auto fails_once = [&fail](const Tensor& x) {
      Tensor h = x.detach().clone();
      fail = true;
      moa::autograd::record("fails_once", h, {x}, [&fail](const Tensor& g, const std::vector<char>&) {
        if (fail) {
          fail = false;
          throw moa::ValueError("injected failure");
        }
        return std::vector<Tensor>{g};
      });
      return h;
    };
    Tensor x = x0.clone().set_requires_grad();
    Tensor loss = moa::linear_cross_entropy(fails_once(x), w0, t, -100, 5);
    CHECK_THROWS_AS(loss.backward(), moa::ValueError);
    check_throws<moa::AutogradError>([&] { loss.backward(); },
                                     {"linear_cross_entropy", "already handed", "retain_graph = true"});
    // With the graph retained, the same failure leaves it whole: the retry gives the gradient.
    Tensor x2 = x0.clone().set_requires_grad();
    Tensor loss2 = moa::linear_cross_entropy(fails_once(x2), w0, t, -100, 5);
    CHECK_THROWS_AS(loss2.backward(Tensor(), true), moa::ValueError);
    loss2.backward();
    check_close(x2.grad().to_vector<float>(), want[1].to_vector<float>(), 1e-6, 1e-4, "dx after a retry");
  }
  // Every target ignored: loss 0 and zero gradients, as cross_entropy.
  Tensor xi = x0.clone().set_requires_grad();
  Tensor li = moa::linear_cross_entropy(xi, w0, Tensor::full({B, T}, -100, DType::i32), -100, 4);
  li.backward();
  CHECK(li.item<double>() == 0.0);
  for (float v : xi.grad().to_vector<float>()) CHECK(v == 0.f);
  // No gradient wanted: the value alone, no graph.
  {
    moa::NoGradGuard ng;
    Tensor x = x0.clone().set_requires_grad();
    const Tensor l = moa::linear_cross_entropy(x, w0, t, -100, 5);
    CHECK(l.item<double>() == doctest::Approx(want[0].item<double>()).epsilon(1e-6));
    CHECK_FALSE(l.requires_grad());
  }
}

TEST_CASE("linear_cross_entropy: bad inputs") {
  const Tensor x = Tensor::zeros({2, 3, 4}), w = Tensor::zeros({5, 4});
  const Tensor t = Tensor::from_vector(std::vector<int32_t>{0, 1, 2, 3, 4, 5}, {2, 3});
  check_throws<moa::IndexError>([&] { moa::linear_cross_entropy(x, w, t); },
                                {"linear_cross_entropy", "target 5", "position [1, 2]", "V = 5", "[2, 3, 5]"});
  check_throws<moa::ShapeError>([&] { moa::linear_cross_entropy(x, w, Tensor::zeros({6}, DType::i32)); },
                                {"linear_cross_entropy", "targets of shape [2, 3]", "got [6]"});
  check_throws<moa::ShapeError>(
      [&] {
        moa::linear_cross_entropy(x, Tensor::zeros({5, 3}), t);
      },
      {"linear_cross_entropy", "weight (V, C)", "[2, 3, 4]", "[5, 3]"});
  check_throws<moa::ShapeError>([&] { moa::linear_cross_entropy(Tensor::zeros({4}), w, t); },
                                {"linear_cross_entropy", "x (..., C)", "[4]"});
  check_throws<moa::ValueError>(
      [&] {
        moa::linear_cross_entropy(x, w, Tensor::zeros({2, 3}));
      },
      {"linear_cross_entropy", "targets", "i32"});
  check_throws<moa::ValueError>([&] { moa::linear_cross_entropy(x, w.to(DType::f64), t); },
                                {"linear_cross_entropy", "one dtype"});
  check_throws<moa::ValueError>([&] { moa::linear_cross_entropy(x, w, t, -100, -1); },
                                {"linear_cross_entropy", "chunk_rows >= 0", "-1"});
}

// ---------------------------------------------------------------------------------------------
// causal_attention
// ---------------------------------------------------------------------------------------------

TEST_CASE("attention kernels: cpu matches reference (MHA, GQA, Tq < Tk, odd sizes)") {
  namespace ref = moa::kernels::reference;
  namespace cpu = moa::kernels::cpu;
  struct Case {
    int64_t B, Hq, Hkv, Tq, Tk, D;
  };
  const Case cases[] = {{1, 1, 1, 1, 1, 1},    {2, 4, 2, 7, 7, 8},     {1, 2, 2, 33, 33, 7},  {1, 4, 1, 257, 257, 16},
                        {2, 3, 3, 5, 12, 4},   {1, 2, 1, 65, 130, 33}, {1, 1, 1, 129, 129, 1}, {3, 4, 2, 1, 257, 7},
                        {1, 8, 2, 100, 100, 64}};
  Generator gen(10);
  for (const Case& c : cases) {
    CAPTURE(c.B);
    CAPTURE(c.Hq);
    CAPTURE(c.Hkv);
    CAPTURE(c.Tq);
    CAPTURE(c.Tk);
    CAPTURE(c.D);
    const int64_t nq = c.B * c.Hq * c.Tq * c.D, nk = c.B * c.Hkv * c.Tk * c.D, nl = c.B * c.Hq * c.Tq;
    const auto q = randn_vec(nq, gen), k = randn_vec(nk, gen), v = randn_vec(nk, gen), dy = randn_vec(nq, gen);
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.D)) * 1.7f;
    std::vector<float> o0(nq), o1(nq), l0(nl), l1(nl);
    ref::attention_forward(o0.data(), l0.data(), q.data(), k.data(), v.data(), c.B, c.Hq, c.Hkv, c.Tq, c.Tk, c.D, scale);
    cpu::attention_forward(o1.data(), l1.data(), q.data(), k.data(), v.data(), c.B, c.Hq, c.Hkv, c.Tq, c.Tk, c.D, scale);
    check_close(o1, o0, 1e-5, 1e-4, "attention out");
    check_close(l1, l0, 1e-5, 1e-5, "attention lse");
    std::vector<float> dq0(nq), dq1(nq), dk0(nk), dk1(nk, 5.0f), dv0(nk), dv1(nk, 5.0f);  // dk, dv are written
    ref::attention_backward(dq0.data(), dk0.data(), dv0.data(), dy.data(), q.data(), k.data(), v.data(), o0.data(),
                            l0.data(), c.B, c.Hq, c.Hkv, c.Tq, c.Tk, c.D, scale);
    cpu::attention_backward(dq1.data(), dk1.data(), dv1.data(), dy.data(), q.data(), k.data(), v.data(), o0.data(),
                            l0.data(), c.B, c.Hq, c.Hkv, c.Tq, c.Tk, c.D, scale);
    check_close(dq1, dq0, 2e-5, 1e-3, "attention dq");
    check_close(dk1, dk0, 2e-5, 1e-3, "attention dk");
    check_close(dv1, dv0, 2e-5, 1e-3, "attention dv");
    // Only some gradients wanted.
    std::vector<float> dv2(nk);
    cpu::attention_backward<float>(nullptr, nullptr, dv2.data(), dy.data(), q.data(), k.data(), v.data(), o0.data(),
                                   l0.data(), c.B, c.Hq, c.Hkv, c.Tq, c.Tk, c.D, scale);
    check_close(dv2, dv1, 0.0, 0.0, "attention dv alone");
    // Every operand strided as a projection output's heads ((B, T, H * D + gap) memory): the same
    // values bit for bit, and nothing written between the rows.
    using moa_test::StridedHeads;
    StridedHeads sq(q, c.B, c.Hq, c.Tq, c.D, 1), sk(k, c.B, c.Hkv, c.Tk, c.D, 2), sv(v, c.B, c.Hkv, c.Tk, c.D, 0),
        sg(dy, c.B, c.Hq, c.Tq, c.D, 3), so(c.B, c.Hq, c.Tq, c.D, 1), sdq(c.B, c.Hq, c.Tq, c.D, 2),
        sdk(c.B, c.Hkv, c.Tk, c.D, 0), sdv(c.B, c.Hkv, c.Tk, c.D, 1);
    const moa::AttentionLayouts lay{sq.layout, sk.layout,  sv.layout,  so.layout,
                                    sg.layout, sdq.layout, sdk.layout, sdv.layout};
    std::vector<float> l2(nl);
    cpu::attention_forward(so.buf.data(), l2.data(), sq.buf.data(), sk.buf.data(), sv.buf.data(), c.B, c.Hq, c.Hkv,
                           c.Tq, c.Tk, c.D, scale, lay);
    CHECK(moa_test::same_floats(so.gather(), o1));
    CHECK(moa_test::same_floats(l2, l1));
    StridedHeads so0(o0, c.B, c.Hq, c.Tq, c.D, 1);  // the backward reads the reference's out, strided
    moa::AttentionLayouts lay0 = lay;
    lay0.out = so0.layout;
    cpu::attention_backward(sdq.buf.data(), sdk.buf.data(), sdv.buf.data(), sg.buf.data(), sq.buf.data(), sk.buf.data(),
                            sv.buf.data(), so0.buf.data(), l0.data(), c.B, c.Hq, c.Hkv, c.Tq, c.Tk, c.D, scale, lay0);
    CHECK(moa_test::same_floats(sdq.gather(), dq1));
    CHECK(moa_test::same_floats(sdk.gather(), dk1));
    CHECK(moa_test::same_floats(sdv.gather(), dv1));
    for (const StridedHeads* t : {&so, &sdq, &sdk, &sdv}) CHECK(t->gaps_untouched());
  }
}

TEST_CASE("causal_attention reads projection heads in place and writes rows for a free head merge") {
  // q, k, v as the attention module makes them: (B, T, H * D) outputs viewed as (B, H, T, D).
  Generator gen(13);
  const int64_t B = 2, T = 70, Hq = 4, Hkv = 2, D = 8;
  Tensor xq = Tensor::randn({B, T, Hq * D}, gen).set_requires_grad();
  Tensor xk = Tensor::randn({B, T, Hkv * D}, gen).set_requires_grad();
  Tensor xv = Tensor::randn({B, T, Hkv * D}, gen).set_requires_grad();
  auto heads = [&](const Tensor& x, int64_t H) { return x.view({B, T, H, D}).transpose(1, 2); };
  Tensor y = moa::causal_attention(heads(xq, Hq), heads(xk, Hkv), heads(xv, Hkv));
  CHECK(y.shape() == moa::Shape{B, Hq, T, D});
  Tensor merged = y.transpose(1, 2).reshape({B, T, Hq * D});
  CHECK(merged.is_contiguous());
  CHECK(merged.storage() == y.storage());  // no copy to merge the heads
  // The same values and gradients as from contiguous copies of the heads.
  Tensor cq = heads(xq, Hq).contiguous().detach().set_requires_grad();
  Tensor ck = heads(xk, Hkv).contiguous().detach().set_requires_grad();
  Tensor cv = heads(xv, Hkv).contiguous().detach().set_requires_grad();
  Tensor yc = moa::causal_attention(cq, ck, cv);
  CHECK(y.to_vector<float>() == yc.to_vector<float>());
  Tensor w = Tensor::randn({B, Hq, T, D}, gen);
  moa::sum(y * w).backward();
  moa::sum(yc * w).backward();
  // The gradients arrive in the projections' (B, T, H * D) layout without a copy back.
  CHECK(xq.grad().to_vector<float>() == cq.grad().transpose(1, 2).contiguous().to_vector<float>());
  CHECK(xk.grad().to_vector<float>() == ck.grad().transpose(1, 2).contiguous().to_vector<float>());
  CHECK(xv.grad().to_vector<float>() == cv.grad().transpose(1, 2).contiguous().to_vector<float>());
}

TEST_CASE("causal_attention: values against an independent formula, by hand, and KV-cache consistency") {
  // Independent formula: scores, a -inf mask and moa::softmax, then a weighted sum, in double.
  Generator gen(11);
  const int64_t B = 2, Hq = 4, Hkv = 2, T = 5, D = 3;
  Tensor q = Tensor::randn({B, Hq, T, D}, gen, DType::f64);
  Tensor k = Tensor::randn({B, Hkv, T, D}, gen, DType::f64);
  Tensor v = Tensor::randn({B, Hkv, T, D}, gen, DType::f64);
  const auto y = moa::causal_attention(q, k, v).to_vector<double>();
  const auto qv = q.to_vector<double>(), kv = k.to_vector<double>(), vv = v.to_vector<double>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / (Hq / Hkv);
      std::vector<double> sc(T * T);
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j < T; ++j) {
          double d = 0;
          for (int64_t c = 0; c < D; ++c) d += qv[((b * Hq + h) * T + i) * D + c] * kv[((b * Hkv + hk) * T + j) * D + c];
          sc[i * T + j] = j <= i ? d / std::sqrt(3.0) : -INFINITY;
        }
      const auto p = moa::softmax(Tensor::from_vector(sc, {T, T})).to_vector<double>();
      for (int64_t i = 0; i < T; ++i)
        for (int64_t c = 0; c < D; ++c) {
          double o = 0;
          for (int64_t j = 0; j < T; ++j) o += p[i * T + j] * vv[((b * Hkv + hk) * T + j) * D + c];
          CHECK(y[((b * Hq + h) * T + i) * D + c] == doctest::Approx(o).epsilon(1e-12));
        }
    }
  // By hand: with q = 0 every visible key weighs the same, so out_i = mean(v_0..v_i).
  Tensor vh = Tensor::from_vector(std::vector<float>{1, 10, 3, 20, 8, 0}, {1, 1, 3, 2});
  const auto yh = moa::causal_attention(Tensor::zeros({1, 1, 3, 2}), Tensor::ones({1, 1, 3, 2}), vh).to_vector<float>();
  const std::vector<float> expected = {1, 10, 2, 15, 4, 10};
  check_close(yh, expected, 1e-6, 1e-6, "attention by hand");
  // KV cache: the last Tq queries against all Tk keys = the last Tq rows of full attention.
  Tensor qf = Tensor::randn({1, 4, 9, 6}, gen), kf = Tensor::randn({1, 2, 9, 6}, gen), vf = Tensor::randn({1, 2, 9, 6}, gen);
  const auto full = moa::causal_attention(qf, kf, vf).narrow(2, 6, 3).to_vector<float>();
  const auto tail = moa::causal_attention(qf.narrow(2, 6, 3), kf, vf).to_vector<float>();
  check_close(tail, full, 1e-6, 1e-5, "attention kv cache");
  // A custom scale: scale 0 makes every visible key weigh the same.
  const auto y0 = moa::causal_attention(qf, kf, vf, 0.0).narrow(2, 0, 2).to_vector<float>();
  const auto v0 = vf.to_vector<float>();
  CHECK(y0[0] == doctest::Approx(v0[0]));                                // head 0, row 0 = v[0]
  CHECK(y0[6] == doctest::Approx((v0[0] + v0[6]) / 2).epsilon(1e-5));   // head 0, row 1 = mean(v[0], v[1])
}

TEST_CASE("causal_attention: gradcheck of q, k, v (MHA, GQA, non-contiguous, Tq < Tk)") {
  Generator gen(12);
  // MHA, q/k/v from [B, T, H, D] leaves transposed to [B, H, T, D] (non-contiguous).
  Tensor q = leaf({2, 5, 2, 3}, gen), k = leaf({2, 5, 2, 3}, gen), v = leaf({2, 5, 2, 3}, gen);
  check_grad(
      [](const std::vector<Tensor>& in) {
        return moa::causal_attention(in[0].transpose(1, 2), in[1].transpose(1, 2), in[2].transpose(1, 2));
      },
      {q, k, v});
  // GQA: Hq = 4, Hkv = 2, with a custom scale.
  Tensor qg = leaf({1, 4, 6, 3}, gen), kg = leaf({1, 2, 6, 3}, gen), vg = leaf({1, 2, 6, 3}, gen);
  check_grad([](const std::vector<Tensor>& in) { return moa::causal_attention(in[0], in[1], in[2], 0.8); },
             {qg, kg, vg});
  // Query length below key length (KV-cache form), GQA, q a narrow of a bigger leaf.
  Tensor qb = leaf({1, 4, 7, 2}, gen), kb = leaf({1, 1, 6, 2}, gen), vb = leaf({1, 1, 6, 2}, gen);
  check_grad([](const std::vector<Tensor>& in) { return moa::causal_attention(in[0].narrow(2, 1, 4), in[1], in[2]); },
             {qb, kb, vb});
  // T > 64: several kernel tiles of queries and keys, GQA, in double through the fast kernel.
  Tensor ql = leaf({1, 2, 66, 2}, gen), kl = leaf({1, 1, 66, 2}, gen), vl = leaf({1, 1, 66, 2}, gen);
  check_grad([](const std::vector<Tensor>& in) { return moa::causal_attention(in[0], in[1], in[2]); }, {ql, kl, vl});
}

TEST_CASE("causal_attention: bad inputs") {
  Tensor q = Tensor::zeros({2, 4, 5, 8}), k = Tensor::zeros({2, 2, 5, 8});
  check_throws<moa::ShapeError>([&] { moa::causal_attention(q, Tensor::zeros({2, 3, 5, 8}), Tensor::zeros({2, 3, 5, 8})); },
                                {"causal_attention", "multiple of Hkv", "[2, 4, 5, 8]", "[2, 3, 5, 8]"});
  check_throws<moa::ShapeError>([&] { moa::causal_attention(q, k, Tensor::zeros({2, 2, 5, 7})); },
                                {"causal_attention", "k and v of one shape", "[2, 2, 5, 7]"});
  check_throws<moa::ShapeError>([&] { moa::causal_attention(q, Tensor::zeros({2, 2, 5, 4}), Tensor::zeros({2, 2, 5, 4})); },
                                {"causal_attention", "[2, Hkv, Tk, 8]", "got [2, 2, 5, 4]"});
  check_throws<moa::ShapeError>([&] { moa::causal_attention(q, Tensor::zeros({1, 2, 5, 8}), Tensor::zeros({1, 2, 5, 8})); },
                                {"causal_attention", "[2, Hkv, Tk, 8]", "got [1, 2, 5, 8]"});
  check_throws<moa::ShapeError>([&] { moa::causal_attention(q, Tensor::zeros({2, 2, 4, 8}), Tensor::zeros({2, 2, 4, 8})); },
                                {"causal_attention", "Tk >= Tq", "[2, 4, 5, 8]", "[2, 2, 4, 8]"});
  check_throws<moa::ShapeError>([&] { moa::causal_attention(Tensor::zeros({4, 5, 8}), k, k); },
                                {"causal_attention", "[B, Hq, Tq, D]", "[4, 5, 8]"});
  check_throws<moa::ValueError>([&] { moa::causal_attention(q, k.to(DType::f64), k); },
                                {"causal_attention", "one dtype", "f64"});
  check_throws<moa::ValueError>([&] { moa::causal_attention(Tensor::zeros({2, 4, 5, 8}, DType::i32), k, k); },
                                {"causal_attention", "i32"});
  check_throws<moa::ShapeError>([&] { moa::causal_attention(Tensor::zeros({2, 4, 5, 0}), Tensor::zeros({2, 2, 5, 0}),
                                                            Tensor::zeros({2, 2, 5, 0})); },
                                {"causal_attention", "D >= 1"});
  check_throws<moa::ValueError>([&] { moa::causal_attention(q, k, k, INFINITY); }, {"causal_attention", "scale"});
  // Empty batch or no queries are fine.
  CHECK(moa::causal_attention(Tensor::zeros({0, 4, 5, 8}), Tensor::zeros({0, 2, 5, 8}), Tensor::zeros({0, 2, 5, 8}))
            .shape() == moa::Shape{0, 4, 5, 8});
  Tensor k0 = Tensor::zeros({1, 2, 3, 8});
  k0.set_requires_grad();
  Tensor y0 = moa::causal_attention(Tensor::zeros({1, 2, 0, 8}), k0, k0);
  CHECK(y0.shape() == moa::Shape{1, 2, 0, 8});
  y0.backward(Tensor::zeros({1, 2, 0, 8}));
  CHECK(k0.grad().to_vector<float>() == std::vector<float>(48, 0.0f));
}
