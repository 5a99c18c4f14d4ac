// moa/nn/config.hpp: one configuration for decoder-only transformer LMs, covering the GPT-2 family
// (learned positions, LayerNorm, GELU MLP, biases, tied embeddings) and the Llama family
// (Llama, Qwen2, SmolLM: RoPE, RMSNorm, SwiGLU, grouped-query attention).
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "moa/core/error.hpp"

namespace moa::nn {

enum class NormKind { layernorm, rmsnorm };
enum class MlpKind { gelu, swiglu };
enum class PositionKind { learned, rope };

struct TransformerConfig {
  int64_t vocab_size = 50257;
  int64_t max_seq_len = 1024;   // context length (learned positions, KV cache capacity)
  int64_t dim = 768;            // C
  int64_t n_layers = 12;
  int64_t n_heads = 12;         // H (query heads)
  int64_t n_kv_heads = 0;       // key/value heads (grouped-query); 0: n_heads
  int64_t head_dim = 0;         // D; 0: dim / n_heads
  int64_t hidden_dim = 0;       // MLP inner size; 0: 4 * dim
  NormKind norm = NormKind::layernorm;
  double norm_eps = 1e-5;
  MlpKind mlp = MlpKind::gelu;
  PositionKind position = PositionKind::learned;
  double rope_theta = 10000.0;
  bool qkv_bias = true;         // GPT-2 and Qwen2: yes; Llama: no
  bool out_bias = true;         // attention output projection bias
  bool mlp_bias = true;
  bool norm_bias = true;        // LayerNorm bias (RMSNorm has none)
  bool tie_embeddings = true;   // lm_head shares the token embedding
  double init_std = 0.02;
  double dropout = 0.0;         // residual and embedding dropout while training

  int64_t kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  int64_t head_size() const { return head_dim > 0 ? head_dim : dim / n_heads; }
  int64_t mlp_hidden() const { return hidden_dim > 0 ? hidden_dim : 4 * dim; }

  // GPT-2 124M by default; change sizes with designated fields afterwards.
  static TransformerConfig gpt2() { return {}; }
  // A Llama-style config (no biases, RMSNorm, SwiGLU, RoPE, untied head).
  static TransformerConfig llama() {
    TransformerConfig c;
    c.vocab_size = 32000;
    c.max_seq_len = 2048;
    c.dim = 4096;
    c.n_layers = 32;
    c.n_heads = 32;
    c.hidden_dim = 11008;
    c.norm = NormKind::rmsnorm;
    c.norm_eps = 1e-6;
    c.mlp = MlpKind::swiglu;
    c.position = PositionKind::rope;
    c.qkv_bias = c.out_bias = c.mlp_bias = c.norm_bias = false;
    c.tie_embeddings = false;
    return c;
  }

  void validate() const {
    MOA_CHECK(vocab_size > 0 && max_seq_len > 0 && dim > 0 && n_layers > 0 && n_heads > 0, ValueError,
              "TransformerConfig: expected positive vocab_size, max_seq_len, dim, n_layers and n_heads, got ",
              vocab_size, ", ", max_seq_len, ", ", dim, ", ", n_layers, ", ", n_heads);
    MOA_CHECK(head_dim > 0 || dim % n_heads == 0, ValueError, "TransformerConfig: dim ", dim,
              " is not divisible by n_heads ", n_heads);
    MOA_CHECK(n_heads % kv_heads() == 0, ValueError, "TransformerConfig: n_heads ", n_heads,
              " is not a multiple of n_kv_heads ", kv_heads());
    MOA_CHECK(position != PositionKind::rope || head_size() % 2 == 0, ValueError,
              "TransformerConfig: RoPE needs an even head size, got ", head_size());
    MOA_CHECK(dropout >= 0 && dropout < 1, ValueError, "TransformerConfig: expected 0 <= dropout < 1, got ", dropout);
  }

  // Our own JSON form (saved beside checkpoints).
  nlohmann::json to_json() const {
    return {{"vocab_size", vocab_size},
            {"max_seq_len", max_seq_len},
            {"dim", dim},
            {"n_layers", n_layers},
            {"n_heads", n_heads},
            {"n_kv_heads", kv_heads()},
            {"head_dim", head_size()},
            {"hidden_dim", mlp_hidden()},
            {"norm", norm == NormKind::layernorm ? "layernorm" : "rmsnorm"},
            {"norm_eps", norm_eps},
            {"mlp", mlp == MlpKind::gelu ? "gelu" : "swiglu"},
            {"position", position == PositionKind::learned ? "learned" : "rope"},
            {"rope_theta", rope_theta},
            {"qkv_bias", qkv_bias},
            {"out_bias", out_bias},
            {"mlp_bias", mlp_bias},
            {"norm_bias", norm_bias},
            {"tie_embeddings", tie_embeddings},
            {"init_std", init_std},
            {"dropout", dropout}};
  }
  static TransformerConfig from_json(const nlohmann::json& j) {
    TransformerConfig c;
    try {
      c.vocab_size = j.at("vocab_size");
      c.max_seq_len = j.at("max_seq_len");
      c.dim = j.at("dim");
      c.n_layers = j.at("n_layers");
      c.n_heads = j.at("n_heads");
      c.n_kv_heads = j.value("n_kv_heads", int64_t{0});
      c.head_dim = j.value("head_dim", int64_t{0});
      c.hidden_dim = j.value("hidden_dim", int64_t{0});
      const std::string norm = j.value("norm", "layernorm"), mlp = j.value("mlp", "gelu"),
                        pos = j.value("position", "learned");
      MOA_CHECK(norm == "layernorm" || norm == "rmsnorm", ValueError, "expected norm layernorm or rmsnorm, got ", norm);
      MOA_CHECK(mlp == "gelu" || mlp == "swiglu", ValueError, "expected mlp gelu or swiglu, got ", mlp);
      MOA_CHECK(pos == "learned" || pos == "rope", ValueError, "expected position learned or rope, got ", pos);
      c.norm = norm == "layernorm" ? NormKind::layernorm : NormKind::rmsnorm;
      c.mlp = mlp == "gelu" ? MlpKind::gelu : MlpKind::swiglu;
      c.position = pos == "learned" ? PositionKind::learned : PositionKind::rope;
      c.norm_eps = j.value("norm_eps", 1e-5);
      c.rope_theta = j.value("rope_theta", 10000.0);
      c.qkv_bias = j.value("qkv_bias", true);
      c.out_bias = j.value("out_bias", true);
      c.mlp_bias = j.value("mlp_bias", true);
      c.norm_bias = j.value("norm_bias", true);
      c.tie_embeddings = j.value("tie_embeddings", true);
      c.init_std = j.value("init_std", 0.02);
      c.dropout = j.value("dropout", 0.0);
    } catch (const nlohmann::json::exception& e) {
      throw ValueError(::moa::detail::cat("TransformerConfig: bad config JSON: ", e.what()));
    }
    c.validate();
    return c;
  }
};

}  // namespace moa::nn
