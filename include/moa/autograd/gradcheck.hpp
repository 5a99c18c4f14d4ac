// moa/autograd/gradcheck.hpp: compares an op's analytic gradient with central finite differences.
//
// The check runs in double precision: inputs must be f64 leaves. With a fixed random projection w
// of the output, L(x) = sum(f(x) * w); backward(w) gives dL/dx, and each element of x is perturbed
// by +-eps to get the numeric derivative.
#pragma once

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "moa/autograd/engine.hpp"
#include "moa/autograd/grad_mode.hpp"
#include "moa/core/tensor.hpp"

namespace moa::autograd {

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-6;
  double rtol = 1e-5;
  std::uint64_t seed = 1234;
};

struct GradcheckResult {
  bool ok = true;
  double max_abs_error = 0.0;
  std::string message;  // the first mismatch, for the test log
  explicit operator bool() const { return ok; }
};

inline double projected_sum(const Tensor& y, const std::vector<double>& w) {
  const std::vector<double> v = y.to_vector<double>();
  double s = 0.0;
  for (std::size_t i = 0; i < v.size(); ++i) s += v[i] * w[i];
  return s;
}

// f: the function under test, of the tensors in `inputs` (f64 leaves; those with requires_grad
// are checked). Returns whether every analytic derivative matches the numeric one.
inline GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                                 const std::vector<Tensor>& inputs, const GradcheckOptions& opt = {}) {
  for (const Tensor& x : inputs)
    MOA_CHECK(x.dtype() == DType::f64 && x.is_leaf() && x.is_contiguous(), ValueError,
              "gradcheck: expected contiguous f64 leaf inputs, got dtype ", dtype_name(x.dtype()));
  for (const Tensor& x : inputs)
    if (x.requires_grad()) const_cast<Tensor&>(x).zero_grad();

  Tensor y = f(inputs);
  MOA_CHECK(y.dtype() == DType::f64, ValueError, "gradcheck: expected an f64 output, got ", dtype_name(y.dtype()));
  Generator gen(opt.seed);
  Tensor w = Tensor::randn(y.shape(), gen, DType::f64);
  const std::vector<double> wv = w.to_vector<double>();
  y.backward(w);

  GradcheckResult res;
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    const Tensor& x = inputs[k];
    if (!x.requires_grad()) continue;
    Tensor g = x.grad();
    const std::vector<double> analytic =
        g.defined() ? g.to_vector<double>() : std::vector<double>(static_cast<std::size_t>(x.numel()), 0.0);
    double* p = x.data<double>();
    NoGradGuard no_grad;
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double orig = p[i];
      p[i] = orig + opt.eps;
      const double up = projected_sum(f(inputs), wv);
      p[i] = orig - opt.eps;
      const double down = projected_sum(f(inputs), wv);
      p[i] = orig;
      const double numeric = (up - down) / (2.0 * opt.eps);
      const double err = std::abs(numeric - analytic[static_cast<std::size_t>(i)]);
      res.max_abs_error = std::max(res.max_abs_error, err);
      if (res.ok && !(err <= opt.atol + opt.rtol * std::abs(numeric))) {
        res.ok = false;
        res.message = ::moa::detail::cat("gradcheck: input ", k, " element ", i, ": analytic ",
                                  analytic[static_cast<std::size_t>(i)], " vs numeric ", numeric);
      }
    }
  }
  return res;
}

}  // namespace moa::autograd
