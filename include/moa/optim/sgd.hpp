// moa/optim/sgd.hpp: stochastic gradient descent with momentum, dampening, Nesterov and (coupled)
// weight decay, the update torch.optim.SGD makes.
#pragma once

#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/core/tensor.hpp"
#include "moa/ops/elementwise.hpp"

namespace moa::optim {

struct SGDConfig {
  double lr = 1e-2;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

class SGD {
 public:
  SGD(std::vector<Tensor> params, SGDConfig config = {}) : params_(std::move(params)), config_(config) {
    MOA_CHECK(!config_.nesterov || (config_.momentum > 0 && config_.dampening == 0), ValueError,
              "SGD: Nesterov momentum needs momentum > 0 and dampening 0, got momentum ", config_.momentum,
              " and dampening ", config_.dampening);
    for (std::size_t i = 0; i < params_.size(); ++i)
      MOA_CHECK(params_[i].defined() && params_[i].is_leaf() && params_[i].is_contiguous(), ValueError,
                "SGD: expected contiguous leaf parameters, parameter ", i, " is not");
    buf_.resize(params_.size());
  }

  void set_lr(double lr) { config_.lr = lr; }
  SGDConfig& config() { return config_; }

  void step() {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Tensor& p = params_[i];
      const Tensor g = p.grad();
      if (!g.defined()) continue;
      const bool first = !buf_[i].defined();
      if (config_.momentum != 0 && first) buf_[i] = Tensor::zeros(p.shape(), p.dtype(), p.device());
      if (on_device(p)) {  // the same update composed from device ops
        NoGradGuard no_grad;
        const Tensor w = p.detach();
        Tensor d = config_.weight_decay != 0 ? add(g, scale(w, config_.weight_decay)) : g;
        if (config_.momentum != 0) {
          buf_[i].copy_(first ? d : add(scale(buf_[i], config_.momentum), scale(d, 1.0 - config_.dampening)));
          d = config_.nesterov ? add(d, scale(buf_[i], config_.momentum)) : buf_[i];
        }
        p.detach().copy_(sub(w, scale(d, config_.lr)));
        continue;
      }
      detail::dispatch_float(p.dtype(), "SGD", [&]<class T>() {
        T* w = p.data<T>();
        const T* gp = g.data<T>();
        T* b = config_.momentum != 0 ? buf_[i].data<T>() : nullptr;
        const T lr = static_cast<T>(config_.lr), wd = static_cast<T>(config_.weight_decay);
        const T mu = static_cast<T>(config_.momentum), damp = static_cast<T>(config_.dampening);
        const bool nesterov = config_.nesterov;
        detail::parallel_for(p.numel(), 4, [&](int64_t s, int64_t e) {
          for (int64_t k = s; k < e; ++k) {
            T d = gp[k] + wd * w[k];
            if (b) {
              b[k] = first ? d : mu * b[k] + (T(1) - damp) * d;
              d = nesterov ? d + mu * b[k] : b[k];
            }
            w[k] -= lr * d;
          }
        });
      });
      ++p.storage()->version;
    }
  }

  void zero_grad() {
    for (Tensor& p : params_) p.zero_grad();
  }

 private:
  std::vector<Tensor> params_;
  SGDConfig config_;
  std::vector<Tensor> buf_;
};

}  // namespace moa::optim
