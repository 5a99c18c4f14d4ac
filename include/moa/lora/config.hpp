// moa/lora/config.hpp: LoRAConfig, the options of one LoRA adapter (rank, alpha, dropout,
// rsLoRA scaling, which linear maps it adapts), and the scale it implies.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "moa/core/error.hpp"

namespace moa::lora {

// LoRA (Hu et al. 2021): y = W x + scale * B A dropout(x), A (R, In), B (Out, R).
//   scale = alpha / R            (the paper's and PEFT's default)
//   scale = alpha / sqrt(R)      with use_rslora (Kalajdzievski 2023, "rank-stabilised" LoRA)
//
// target_modules selects the nn::Linear maps to adapt by their dotted module path
// (`blocks.3.attn.q_proj`). It is an ECMAScript regular expression; a path matches when the
// expression matches, in full, the whole path or any tail of it that starts at a component
// boundary (`q_proj`, `attn.q_proj`, `3.attn.q_proj`, ..., `blocks.3.attn.q_proj`). So
//   "q_proj|v_proj"        the q and v projections of every block (PEFT's ["q_proj", "v_proj"])
//   "mlp\\..*"  or "mlp.*" every linear under an `mlp` module
//   "proj"                 only maps named exactly `proj` (GPT-2's MLP output), not `q_proj`
//   "blocks\\.0\\..*"      every linear of block 0
//   ".*"                   every linear, including `lm_head` when the model has one
//   "all-linear"           (a keyword, not a regex) every linear inside the blocks: all but lm_head
// Our module names (see moa/nn/transformer.hpp): attn.{q,k,v,o}_proj; mlp.fc / mlp.proj (GELU,
// GPT-2) or mlp.{gate,up,down}_proj (SwiGLU, Llama); lm_head.
struct LoRAConfig {
  int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool use_rslora = false;
  std::string target_modules = "q_proj|v_proj";

  // The factor on B A x.
  double scale() const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
  }

  // Throws ValueError on a rank < 1, a non-finite alpha, dropout outside [0, 1), or no targets.
  void validate() const {
    MOA_CHECK(rank >= 1, ValueError, "LoRAConfig: expected rank >= 1, got ", rank);
    MOA_CHECK(std::isfinite(alpha), ValueError, "LoRAConfig: expected a finite alpha, got ", alpha);
    MOA_CHECK(dropout >= 0.0 && dropout < 1.0, ValueError, "LoRAConfig: expected 0 <= dropout < 1, got ", dropout);
    MOA_CHECK(!target_modules.empty(), ValueError, "LoRAConfig: target_modules is empty");
  }
};

}  // namespace moa::lora
