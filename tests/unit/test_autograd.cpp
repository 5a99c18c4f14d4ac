// Autograd: iterative backward on deep graphs, accumulation, no-grad, freed graphs, retain_graph.
#include <doctest/doctest.h>

#include "test_util.hpp"

using namespace moa;

TEST_CASE("autograd: a 2,000-op chain and a 100,000-op chain run backward without recursion") {
  for (int depth : {2000, 100000}) {
    Tensor x = Tensor::full({4}, 1.0, DType::f64).set_requires_grad();
    Tensor y = x;
    for (int i = 0; i < depth; ++i) y = scale(y, 1.0001);
    Tensor loss = sum(y);
    loss.backward();
    const double expected = std::pow(1.0001, depth);
    for (double g : x.grad().to_vector<double>()) CHECK(g == doctest::Approx(expected).epsilon(1e-9));
    // Dropping the graph (here, at scope exit) must not overflow the stack either.
  }
}

TEST_CASE("autograd: gradients accumulate across backward calls and through shared inputs") {
  Tensor x = Tensor::from_vector(std::vector<double>{1, 2, 3}).set_requires_grad();
  // y = x * x + x: dy/dx = 2x + 1 (x used three times: a diamond).
  Tensor y = sum(x * x + x);
  y.backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{3, 5, 7});
  Tensor y2 = sum(x * 2.0);
  y2.backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{5, 7, 9});
  x.zero_grad();
  CHECK_FALSE(x.grad().defined());
}

TEST_CASE("autograd: the gradient of a leaf never aliases another tensor") {
  // add's backward passes the same gradient to both inputs; accumulating into one leaf must not
  // change the other's.
  Tensor a = Tensor::from_vector(std::vector<double>{1, 1}).set_requires_grad();
  Tensor b = Tensor::from_vector(std::vector<double>{1, 1}).set_requires_grad();
  sum(a + b).backward();
  sum(a * 3.0).backward();
  CHECK(a.grad().to_vector<double>() == std::vector<double>{4, 4});
  CHECK(b.grad().to_vector<double>() == std::vector<double>{1, 1});
}

TEST_CASE("autograd: no-grad guard records nothing; tensors without requires_grad build no graph") {
  Tensor w = Tensor::ones({3, 3}).set_requires_grad();
  Tensor x = Tensor::ones({2, 3});
  {
    NoGradGuard guard;
    CHECK_FALSE(is_grad_enabled());
    Tensor y = matmul(x, w);
    CHECK_FALSE(y.requires_grad());
    CHECK(y.grad_fn() == nullptr);
    {
      EnableGradGuard on;
      CHECK(matmul(x, w).grad_fn() != nullptr);
    }
  }
  CHECK(is_grad_enabled());
  Tensor z = gelu(matmul(x, x.t()));  // no input requires grad: no node anywhere
  CHECK(z.grad_fn() == nullptr);
  CHECK_FALSE(z.requires_grad());
}

TEST_CASE("autograd: a frozen weight gets no gradient; the input still does") {
  Generator gen(1);
  Tensor x = Tensor::randn({4, 5}, gen, DType::f64).set_requires_grad();
  Tensor w = Tensor::randn({3, 5}, gen, DType::f64);  // frozen
  Tensor b = Tensor::randn({3}, gen, DType::f64);     // frozen
  sum(linear(x, w, b)).backward();
  CHECK_FALSE(w.grad().defined());
  CHECK_FALSE(b.grad().defined());
  REQUIRE(x.grad().defined());
  // d/dx sum(x W^T) = column sums of W, per row.
  const auto wv = w.to_vector<double>();
  const auto gx = x.grad().to_vector<double>();
  for (int r = 0; r < 4; ++r)
    for (int k = 0; k < 5; ++k) CHECK(gx[r * 5 + k] == doctest::Approx(wv[k] + wv[5 + k] + wv[10 + k]));
}

TEST_CASE("autograd: backward twice through a freed graph is an error naming the op; retain_graph allows it") {
  Tensor x = Tensor::from_vector(std::vector<double>{1, 2}).set_requires_grad();
  Tensor y = sum(exp(x));
  y.backward();
  test::check_throws_with<AutogradError>([&] { y.backward(); }, {"already freed", "sum", "retain_graph"});

  Tensor x2 = Tensor::from_vector(std::vector<double>{1, 2}).set_requires_grad();
  Tensor y2 = sum(exp(x2));
  y2.backward(Tensor(), true);
  y2.backward();
  const auto g = x2.grad().to_vector<double>();
  CHECK(g[0] == doctest::Approx(2 * std::exp(1.0)));
  CHECK(g[1] == doctest::Approx(2 * std::exp(2.0)));
}

TEST_CASE("autograd: bad backward calls") {
  Tensor x = Tensor::ones({2, 2}).set_requires_grad();
  Tensor y = x * 2.0;
  test::check_throws_with<AutogradError>([&] { y.backward(); }, {"scalar", "[2, 2]"});
  test::check_throws_with<ShapeError>([&] { y.backward(Tensor::ones({3})); }, {"backward", "[2, 2]", "[3]"});
  test::check_throws_with<AutogradError>([] { Tensor::ones({1}).backward(); }, {"does not require grad"});
  test::check_throws_with<AutogradError>([&] { y.set_requires_grad(false); }, {"leaf"});
  y.backward(Tensor::ones({2, 2}));
  CHECK(x.grad().to_vector<float>() == std::vector<float>{2, 2, 2, 2});
}

TEST_CASE("autograd: backward of a leaf itself, and of views of a leaf") {
  Tensor x = Tensor::from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {2, 3}).set_requires_grad();
  x.backward(Tensor::full({2, 3}, 0.5, DType::f64));
  CHECK(x.grad().to_vector<double>() == std::vector<double>(6, 0.5));
  x.zero_grad();
  // d/dx sum(x^T[1:3] * c) with c = [[1],[2]] broadcast over columns.
  Tensor c = Tensor::from_vector(std::vector<double>{1, 2}, {2, 1});
  sum(x.t().narrow(0, 1, 2) * c).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{0, 1, 2, 0, 1, 2});
}

TEST_CASE("autograd: a forward + backward repeats bitwise with the same seed and thread count") {
  auto run = [] {
    Generator g(77);
    Tensor x = Tensor::randn({33, 64}, g);
    Tensor w1 = Tensor::randn({128, 64}, g, DType::f32, 0.0, 0.1).set_requires_grad();
    Tensor w2 = Tensor::randn({16, 128}, g, DType::f32, 0.0, 0.1).set_requires_grad();
    Generator gd(5);
    Tensor h = dropout(gelu(linear(x, w1)), 0.1, gd);
    Tensor loss = mean(linear(h, w2) * linear(h, w2));
    loss.backward();
    return std::make_tuple(loss.item<float>(), w1.grad().to_vector<float>(), w2.grad().to_vector<float>());
  };
  const auto a = run();
  const auto b = run();
  CHECK(std::get<0>(a) == std::get<0>(b));
  CHECK(std::get<1>(a) == std::get<1>(b));
  CHECK(std::get<2>(a) == std::get<2>(b));
}

TEST_CASE("autograd: a gradient the engine alone holds is kept, not copied; a shared one is copied") {
  // A custom op whose backward returns a fresh tensor: the leaf's first gradient is that tensor.
  const void* produced = nullptr;
  Tensor x = Tensor::from_vector(std::vector<double>{1, 2, 3}).set_requires_grad();
  Tensor y = x.detach().clone();
  autograd::record("probe", y, {x}, [&](const Tensor& g, const std::vector<char>&) {
    Tensor r = g * 2.0;
    produced = r.data_ptr();
    return std::vector<Tensor>{r};
  });
  sum(y).backward();
  CHECK(x.grad().data_ptr() == produced);
  CHECK(x.grad().to_vector<double>() == std::vector<double>{2, 2, 2});

  // Shared: add's backward hands one gradient to both inputs; each leaf gets its own memory.
  Tensor a = Tensor::from_vector(std::vector<double>{1, 1}).set_requires_grad();
  Tensor b = Tensor::from_vector(std::vector<double>{2, 2}).set_requires_grad();
  sum(a + b).backward();
  CHECK(a.grad().data_ptr() != b.grad().data_ptr());

  // A node's gradient from two consumers (h feeds h * h and h itself), accumulated in place when the
  // engine alone holds the first; the values are the chain rule's: d/dx sum(h^2 + h), h = 3x.
  Tensor w = Tensor::from_vector(std::vector<double>{1, -2}).set_requires_grad();
  Tensor h = w * 3.0;
  (sum(h * h) + sum(h)).backward();
  CHECK(w.grad().to_vector<double>() == std::vector<double>{3 * (2 * 3 + 1), 3 * (2 * -6 + 1)});
}

TEST_CASE("autograd: a node recorded with strided_grad gets its gradient as it is, others a contiguous one") {
  // identity(t) whose backward notes the layout of the gradient it receives; its output is read
  // transposed, so the incoming gradient is a transposed (non-contiguous) view.
  auto identity = [](const Tensor& t, bool strided, bool* got_contiguous) {
    Tensor out = t.detach().clone();
    autograd::record(
        "identity", out, {t},
        [got_contiguous](const Tensor& g, const std::vector<char>&) {
          *got_contiguous = g.is_contiguous();
          return std::vector<Tensor>{g};
        },
        strided);
    return out;
  };
  const Tensor w = Tensor::from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {3, 2});
  for (const bool strided : {true, false}) {
    Tensor x = Tensor::from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {2, 3}).set_requires_grad();
    bool got_contiguous = false;
    sum(identity(x, strided, &got_contiguous).transpose(0, 1) * w).backward();
    CHECK(got_contiguous == !strided);
    // d/dx sum(x^T * w) = w^T, whatever layout the gradient travelled in; the leaf's is contiguous.
    CHECK(x.grad().is_contiguous());
    CHECK(x.grad().to_vector<double>() == std::vector<double>{1, 3, 5, 2, 4, 6});
  }
}
