// moa/autograd/grad_mode.hpp: whether ops record the graph (thread-local), and the no-grad guard.
#pragma once

namespace moa {

namespace detail {
inline bool& grad_mode_flag() {
  thread_local bool enabled = true;
  return enabled;
}
}  // namespace detail

inline bool is_grad_enabled() { return detail::grad_mode_flag(); }

// While alive, ops build no graph (inference, optimizer updates). Restores the previous mode.
class NoGradGuard {
 public:
  NoGradGuard() : prev_(detail::grad_mode_flag()) { detail::grad_mode_flag() = false; }
  ~NoGradGuard() { detail::grad_mode_flag() = prev_; }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// The opposite: re-enables recording inside a no-grad region.
class EnableGradGuard {
 public:
  EnableGradGuard() : prev_(detail::grad_mode_flag()) { detail::grad_mode_flag() = true; }
  ~EnableGradGuard() { detail::grad_mode_flag() = prev_; }
  EnableGradGuard(const EnableGradGuard&) = delete;
  EnableGradGuard& operator=(const EnableGradGuard&) = delete;

 private:
  bool prev_;
};

}  // namespace moa
