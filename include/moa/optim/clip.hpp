// moa/optim/clip.hpp: global-norm gradient clipping (as torch.nn.utils.clip_grad_norm_).
#pragma once

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "moa/core/tensor.hpp"

namespace moa::optim {

// Scales every gradient by max_norm / (norm + 1e-6) when the global L2 norm exceeds max_norm.
// Returns the norm before clipping. A non-finite norm (a NaN or inf gradient) throws ValueError
// unless error_if_nonfinite is false, so a diverged run stops with a message, not garbage.
inline double clip_grad_norm(const std::vector<Tensor>& params, double max_norm, bool error_if_nonfinite = true) {
  MOA_CHECK(max_norm > 0, ValueError, "clip_grad_norm: expected max_norm > 0, got ", max_norm);
  double total = 0.0;
  // Device gradients: one batched sum of squares per device (one synchronisation, not one per tensor).
  std::vector<std::pair<Device, std::vector<std::pair<const float*, int64_t>>>> on_devices;
  std::vector<Tensor> keep;  // contiguous copies stay alive until summed
  for (const Tensor& p : params) {
    const Tensor g = p.grad();
    if (!g.defined()) continue;
    if (on_device(g)) {
      detail::check_device_f32(g, "clip_grad_norm");
      keep.push_back(g.contiguous());
      detail::group_of(on_devices, g.device()).emplace_back(keep.back().data<float>(), keep.back().numel());
      continue;
    }
    detail::dispatch_float(g.dtype(), "clip_grad_norm", [&]<class T>() {
      const T* d = g.data<T>();
      double s = 0.0;
      for (int64_t i = 0; i < g.numel(); ++i) s += static_cast<double>(d[i]) * static_cast<double>(d[i]);
      total += s;
    });
  }
  for (const auto& [dev, buffers] : on_devices) total += backend(dev).sum_squares_all(buffers);
  const double norm = std::sqrt(total);
  MOA_CHECK(std::isfinite(norm) || !error_if_nonfinite, ValueError,
            "clip_grad_norm: the total gradient norm is not finite (", norm, "); the loss has probably diverged");
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    // Device gradients: all of a device's in one call (a few launches). They are owned contiguous
    // tensors (the engine makes them so).
    std::vector<std::pair<Device, std::vector<std::pair<float*, int64_t>>>> to_scale;
    for (const Tensor& p : params) {
      Tensor g = p.grad();
      if (!g.defined()) continue;
      if (on_device(g)) {
        detail::group_of(to_scale, g.device()).emplace_back(g.data<float>(), g.numel());
        continue;
      }
      detail::dispatch_float(g.dtype(), "clip_grad_norm", [&]<class T>() {
        T* d = g.data<T>();
        for (int64_t i = 0; i < g.numel(); ++i) d[i] *= static_cast<T>(coef);
      });
    }
    for (const auto& [dev, buffers] : to_scale) backend(dev).scale_all(buffers, coef);
  }
  return norm;
}

}  // namespace moa::optim
