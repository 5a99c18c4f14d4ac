// moa/nn/linear.hpp: Linear (y = x W^T + b), Embedding and the norm layers as modules.
#pragma once

#include <memory>
#include <string>

#include "moa/nn/module.hpp"
#include "moa/ops/embedding.hpp"
#include "moa/ops/matmul.hpp"
#include "moa/ops/norm.hpp"

namespace moa::nn {

// Something that changes a Linear's output, e.g. a LoRA adapter: y = adapter(x, base_y).
class LinearAdapter : public Module {
 public:
  virtual Tensor forward(const Tensor& x, const Tensor& base_out) = 0;
  // The same, with the linear's output handed over for good: an adapter may add into its memory
  // when nothing else holds it (LoRA does, which saves a copy of the output). By default: forward.
  virtual Tensor forward_owned(const Tensor& x, Tensor base_out) { return forward(x, base_out); }
  // The whole adapted layer from the linear's weight and bias. By default the linear's output handed
  // to forward_owned; an adapter may form both in one op (LoRA does: the input then gets one
  // gradient, not two for the engine to add).
  virtual Tensor forward_linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
    return forward_owned(x, linear(x, weight, bias));
  }
};

// weight: (Out, In), bias: (Out) or none. Initialised N(0, init_std), bias 0.
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias, Generator& gen, double init_std = 0.02)
      : in_(in_features), out_(out_features) {
    MOA_CHECK(in_features > 0 && out_features > 0, ShapeError, "Linear: expected positive sizes, got in ",
              in_features, " and out ", out_features);
    weight = register_parameter("weight", Tensor::randn({out_features, in_features}, gen, DType::f32, 0.0, init_std));
    if (bias) this->bias = register_parameter("bias", Tensor::zeros({out_features}));
  }

  // x: (..., In) -> (..., Out); the adapter, when one is attached, adds its part.
  Tensor forward(const Tensor& x) {
    return adapter_ ? adapter_->forward_linear(x, weight, bias) : linear(x, weight, bias);
  }

  // Attaches (or, with nullptr, removes) an adapter; its parameters appear under `name`.
  void set_adapter(const std::string& name, std::shared_ptr<LinearAdapter> adapter) {
    remove_child(adapter_name_);
    adapter_ = std::move(adapter);
    adapter_name_ = adapter_ ? name : std::string();
    if (adapter_) register_module(name, adapter_);
  }
  const std::shared_ptr<LinearAdapter>& adapter() const { return adapter_; }

  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

  Tensor weight, bias;

 private:
  int64_t in_, out_;
  std::shared_ptr<LinearAdapter> adapter_;
  std::string adapter_name_;
};

// weight: (V, C). ids (any shape, i32) -> (..., C).
class Embedding : public Module {
 public:
  Embedding(int64_t num, int64_t dim, Generator& gen, double init_std = 0.02) {
    MOA_CHECK(num > 0 && dim > 0, ShapeError, "Embedding: expected positive sizes, got ", num, " x ", dim);
    weight = register_parameter("weight", Tensor::randn({num, dim}, gen, DType::f32, 0.0, init_std));
  }
  Tensor forward(const Tensor& ids) const { return embedding(weight, ids); }
  Tensor weight;
};

class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, bool bias = true) : eps_(eps) {
    weight = register_parameter("weight", Tensor::ones({dim}));
    if (bias) this->bias = register_parameter("bias", Tensor::zeros({dim}));
  }
  Tensor forward(const Tensor& x) const { return layer_norm(x, weight, bias, eps_); }
  Tensor weight, bias;

 private:
  double eps_;
};

class RMSNorm : public Module {
 public:
  explicit RMSNorm(int64_t dim, double eps = 1e-6) : eps_(eps) { weight = register_parameter("weight", Tensor::ones({dim})); }
  Tensor forward(const Tensor& x) const { return rms_norm(x, weight, eps_); }
  Tensor weight;

 private:
  double eps_;
};

}  // namespace moa::nn
