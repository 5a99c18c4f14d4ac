// moa/optim/adamw.hpp: AdamW (Loshchilov & Hutter) with decoupled weight decay, the update
// PyTorch's torch.optim.AdamW makes:
//   p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
#pragma once

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "moa/core/tensor.hpp"

namespace moa::optim {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

class AdamW {
 public:
  AdamW(std::vector<Tensor> params, AdamWConfig config = {}) : params_(std::move(params)), config_(config) {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const Tensor& p = params_[i];
      MOA_CHECK(p.defined() && p.is_leaf() && p.is_contiguous() && is_floating(p.dtype()), ValueError,
                "AdamW: expected contiguous floating leaf parameters, parameter ", i, " is not");
      for (std::size_t j = 0; j < i; ++j)  // one update each: a device step updates all at once
        MOA_CHECK(p.numel() == 0 || params_[j].storage() != p.storage(), ValueError, "AdamW: parameters ", j, " and ",
                  i, " share their memory (a parameter listed twice?)");
      m_.push_back(Tensor::zeros(p.shape(), p.dtype(), p.device()));
      v_.push_back(Tensor::zeros(p.shape(), p.dtype(), p.device()));
    }
  }

  AdamWConfig& config() { return config_; }
  void set_lr(double lr) { config_.lr = lr; }
  std::int64_t step_count() const { return step_; }
  // Moment estimates, for checkpoints: exp_avg (m) and exp_avg_sq (v) per parameter.
  std::vector<Tensor>& exp_avg() { return m_; }
  std::vector<Tensor>& exp_avg_sq() { return v_; }
  void set_step_count(std::int64_t t) { step_ = t; }

  // One update of every parameter that has a gradient.
  void step() {
    ++step_;
    const double bc1 = 1.0 - std::pow(config_.beta1, static_cast<double>(step_));
    const double bc2 = 1.0 - std::pow(config_.beta2, static_cast<double>(step_));
    // Device parameters: the same arithmetic, every parameter of a device in one backend call
    // (a few launches for all of them); moments follow the parameter's device.
    std::vector<std::pair<Device, std::vector<AdamWBuffers>>> on_devices;
    std::vector<Tensor> keep;  // contiguous gradients alive until the updates are queued
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Tensor& p = params_[i];
      const Tensor g = p.grad();
      if (!g.defined()) continue;
      if (on_device(p)) {
        detail::check_device_f32(p, "AdamW");
        if (m_[i].device() != p.device()) m_[i] = m_[i].to(p.device());
        if (v_[i].device() != p.device()) v_[i] = v_[i].to(p.device());
        keep.push_back(g.device() == p.device() ? g.contiguous() : g.to(p.device()).contiguous());
        detail::group_of(on_devices, p.device())
            .push_back(
                {p.data<float>(), m_[i].data<float>(), v_[i].data<float>(), keep.back().data<float>(), p.numel()});
        ++p.storage()->version;
        continue;
      }
      if (m_[i].device() != p.device()) m_[i] = m_[i].to(p.device());
      if (v_[i].device() != p.device()) v_[i] = v_[i].to(p.device());
      detail::dispatch_float(p.dtype(), "AdamW", [&]<class T>() {
        T* w = p.data<T>();
        T* m = m_[i].data<T>();
        T* v = v_[i].data<T>();
        const T* gp = g.data<T>();
        const T b1 = static_cast<T>(config_.beta1), b2 = static_cast<T>(config_.beta2);
        const T decay = static_cast<T>(1.0 - config_.lr * config_.weight_decay);
        const T step_size = static_cast<T>(config_.lr / bc1);
        const T inv_sqrt_bc2 = static_cast<T>(1.0 / std::sqrt(bc2));
        const T eps = static_cast<T>(config_.eps);
        detail::parallel_for(p.numel(), 8, [&](int64_t s, int64_t e) {
          for (int64_t k = s; k < e; ++k) {
            w[k] *= decay;
            m[k] = b1 * m[k] + (T(1) - b1) * gp[k];
            v[k] = b2 * v[k] + (T(1) - b2) * gp[k] * gp[k];
            w[k] -= step_size * m[k] / (std::sqrt(v[k]) * inv_sqrt_bc2 + eps);
          }
        });
      });
      ++p.storage()->version;
    }
    for (const auto& [dev, buffers] : on_devices)
      backend(dev).adamw_step_all(buffers, config_.lr, config_.beta1, config_.beta2, config_.eps, config_.weight_decay,
                                  step_);
  }

  void zero_grad() {
    for (Tensor& p : params_) p.zero_grad();
  }
  const std::vector<Tensor>& params() const { return params_; }

 private:
  std::vector<Tensor> params_;
  AdamWConfig config_;
  std::vector<Tensor> m_, v_;
  std::int64_t step_ = 0;
};

}  // namespace moa::optim
