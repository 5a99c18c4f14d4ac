// moa/core/tensor.hpp: the Tensor with everything its members need: the class, the autograd
// engine (backward) and the view ops (reshape, transpose, ...). Include this, not the parts.
#pragma once

#include "moa/core/tensor_class.hpp"
#include "moa/autograd/node.hpp"
#include "moa/autograd/engine.hpp"
#include "moa/ops/view.hpp"
