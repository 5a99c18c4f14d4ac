// moa/kernels/reference/activation.hpp: scalar definitions of the activations and their
// derivatives (the reference every activation kernel is checked against).
#pragma once

#include <cmath>

namespace moa::kernels::reference {

// GELU, tanh form (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <class T>
T gelu(T x) {
  const T c = static_cast<T>(0.7978845608028654);  // sqrt(2 / pi)
  const T u = c * (x + static_cast<T>(0.044715) * x * x * x);
  return static_cast<T>(0.5) * x * (static_cast<T>(1) + std::tanh(u));
}
template <class T>
T gelu_grad(T x) {
  const T c = static_cast<T>(0.7978845608028654);
  const T u = c * (x + static_cast<T>(0.044715) * x * x * x);
  const T th = std::tanh(u);
  const T du = c * (static_cast<T>(1) + static_cast<T>(3 * 0.044715) * x * x);
  return static_cast<T>(0.5) * (static_cast<T>(1) + th) + static_cast<T>(0.5) * x * (static_cast<T>(1) - th * th) * du;
}

// SiLU (swish): x * sigmoid(x).
template <class T>
T silu(T x) {
  return x / (static_cast<T>(1) + std::exp(-x));
}
template <class T>
T silu_grad(T x) {
  const T s = static_cast<T>(1) / (static_cast<T>(1) + std::exp(-x));
  return s * (static_cast<T>(1) + x * (static_cast<T>(1) - s));
}

}  // namespace moa::kernels::reference
