// moa/optim/schedule.hpp: learning-rate schedule: linear warmup, then cosine decay to a floor.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

#include "moa/core/error.hpp"

namespace moa::optim {

struct WarmupCosine {
  double base_lr = 1e-3;
  double min_lr = 0.0;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;

  // The learning rate for 0-based step `step`: (step + 1) / warmup * base during warmup, then a
  // half cosine from base_lr down to min_lr at total_steps, and min_lr after that.
  double lr(std::int64_t step) const {
    MOA_CHECK(total_steps > 0 && warmup_steps >= 0 && warmup_steps <= total_steps, ValueError,
              "WarmupCosine: expected 0 <= warmup_steps <= total_steps and total_steps > 0, got warmup ",
              warmup_steps, " and total ", total_steps);
    MOA_CHECK(step >= 0, ValueError, "WarmupCosine: expected a step >= 0, got ", step);
    if (step < warmup_steps) return base_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
    const std::int64_t decay = total_steps - warmup_steps;
    if (decay <= 0 || step >= total_steps) return min_lr;
    const double progress = static_cast<double>(step - warmup_steps) / static_cast<double>(decay);
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
  }
};

}  // namespace moa::optim
