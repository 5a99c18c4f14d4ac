// moa/moa.hpp: the whole library in one include.
#pragma once

#include "moa/version.hpp"

#include "moa/core/dtype.hpp"
#include "moa/core/error.hpp"
#include "moa/core/half.hpp"
#include "moa/core/parallel.hpp"
#include "moa/core/profile.hpp"
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
#include "moa/ops/linear_loss.hpp"
#include "moa/ops/loss.hpp"
#include "moa/ops/matmul.hpp"
#include "moa/ops/norm.hpp"
#include "moa/ops/reduce.hpp"
#include "moa/ops/softmax.hpp"
#include "moa/ops/view.hpp"

#include "moa/ops/rope.hpp"

#include "moa/optim/adamw.hpp"
#include "moa/optim/clip.hpp"
#include "moa/optim/schedule.hpp"
#include "moa/optim/sgd.hpp"

#include "moa/io/checkpoint.hpp"
#include "moa/io/hf_checkpoint.hpp"
#include "moa/io/llama2c.hpp"
#include "moa/io/safetensors.hpp"

#include "moa/tokenizer/bpe_trainer.hpp"
#include "moa/tokenizer/gpt2_files.hpp"
#include "moa/tokenizer/hf_json.hpp"
#include "moa/tokenizer/llama2c.hpp"
#include "moa/tokenizer/load.hpp"

#include "moa/nn/config.hpp"
#include "moa/nn/hf_names.hpp"
#include "moa/nn/load.hpp"
#include "moa/nn/module.hpp"
#include "moa/nn/pretrained.hpp"
#include "moa/nn/transformer.hpp"

#include "moa/lora/adapter.hpp"
#include "moa/lora/config.hpp"
#include "moa/lora/lora.hpp"
#include "moa/lora/op.hpp"
#include "moa/lora/peft.hpp"
#include "moa/lora/target.hpp"

#include "moa/ops/grouped_lora.hpp"
#include "moa/mixture/moa.hpp"
#include "moa/mixture/moa_io.hpp"

#include "moa/eval/generate.hpp"

#include "moa/train/batches.hpp"
#include "moa/train/lm_trainer.hpp"

#include "moa/eval/metrics.hpp"

#include "moa/data/hash.hpp"
#include "moa/data/instruct.hpp"
#include "moa/data/prepare.hpp"
