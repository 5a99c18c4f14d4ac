// moa/moa.hpp: the whole library in one include.
#pragma once

#include "moa/version.hpp"

#include "moa/core/dtype.hpp"
#include "moa/core/error.hpp"
#include "moa/core/parallel.hpp"
#include "moa/core/rng.hpp"
#include "moa/core/shape.hpp"
#include "moa/core/storage.hpp"
#include "moa/core/tensor.hpp"

#include "moa/autograd/engine.hpp"
#include "moa/autograd/grad_mode.hpp"
#include "moa/autograd/gradcheck.hpp"

#include "moa/kernels/cpu/gemm.hpp"
#include "moa/kernels/reference/gemm.hpp"

#include "moa/ops/attention.hpp"
#include "moa/ops/concat.hpp"
#include "moa/ops/dropout.hpp"
#include "moa/ops/elementwise.hpp"
#include "moa/ops/embedding.hpp"
#include "moa/ops/loss.hpp"
#include "moa/ops/matmul.hpp"
#include "moa/ops/norm.hpp"
#include "moa/ops/reduce.hpp"
#include "moa/ops/softmax.hpp"
#include "moa/ops/view.hpp"

#include "moa/optim/adamw.hpp"
#include "moa/optim/clip.hpp"
#include "moa/optim/schedule.hpp"
#include "moa/optim/sgd.hpp"
