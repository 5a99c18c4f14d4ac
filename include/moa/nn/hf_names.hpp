// moa/nn/hf_names.hpp: Hugging Face checkpoints <-> TransformerLM: the config.json fields of the
// GPT-2 and Llama families (llama, qwen2, mistral-style; SmolLM is llama) and the tensor names and
// layouts (GPT-2's Conv1D weights are stored transposed, q/k/v fused in c_attn).
#pragma once

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/nn/config.hpp"
#include "moa/ops/concat.hpp"
#include "moa/core/tensor.hpp"

namespace moa::nn {

enum class HfFamily { gpt2, llama };

struct HfModelInfo {
  TransformerConfig config;
  HfFamily family = HfFamily::gpt2;
  std::string model_type;
};

namespace detail {

template <class T>
T hf_get(const nlohmann::json& j, const char* key, const std::string& model_type) {
  MOA_CHECK(j.contains(key) && !j[key].is_null(), ValueError, "config.json (", model_type, "): missing field '",
            key, "'");
  try {
    return j[key].get<T>();
  } catch (const nlohmann::json::exception& e) {
    throw ValueError(::moa::detail::cat("config.json (", model_type, "): field '", key, "' has the wrong type: ", e.what()));
  }
}

}  // namespace detail

// Reads a Hugging Face config.json into our config.
inline HfModelInfo config_from_hf(const nlohmann::json& j) {
  MOA_CHECK(j.is_object() && j.contains("model_type"), ValueError, "config.json: expected an object with 'model_type'");
  HfModelInfo info;
  info.model_type = j["model_type"].get<std::string>();
  const std::string& mt = info.model_type;
  TransformerConfig& c = info.config;
  if (mt == "gpt2") {
    info.family = HfFamily::gpt2;
    c = TransformerConfig::gpt2();
    c.vocab_size = detail::hf_get<int64_t>(j, "vocab_size", mt);
    c.max_seq_len = detail::hf_get<int64_t>(j, "n_positions", mt);
    c.dim = detail::hf_get<int64_t>(j, "n_embd", mt);
    c.n_layers = detail::hf_get<int64_t>(j, "n_layer", mt);
    c.n_heads = detail::hf_get<int64_t>(j, "n_head", mt);
    c.hidden_dim = j.contains("n_inner") && !j["n_inner"].is_null() ? j["n_inner"].get<int64_t>() : 0;
    c.norm_eps = j.value("layer_norm_epsilon", 1e-5);
    const std::string act = j.value("activation_function", "gelu_new");
    MOA_CHECK(act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast", ValueError,
              "config.json (gpt2): activation_function '", act, "' is not supported (expected the tanh GELU: gelu_new)");
    MOA_CHECK(!j.value("scale_attn_by_inverse_layer_idx", false) && !j.value("reorder_and_upcast_attn", false),
              ValueError, "config.json (gpt2): scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported");
    c.tie_embeddings = j.value("tie_word_embeddings", true);
  } else if (mt == "llama" || mt == "qwen2" || mt == "mistral") {
    info.family = HfFamily::llama;
    c = TransformerConfig::llama();
    c.vocab_size = detail::hf_get<int64_t>(j, "vocab_size", mt);
    c.max_seq_len = detail::hf_get<int64_t>(j, "max_position_embeddings", mt);
    c.dim = detail::hf_get<int64_t>(j, "hidden_size", mt);
    c.n_layers = detail::hf_get<int64_t>(j, "num_hidden_layers", mt);
    c.n_heads = detail::hf_get<int64_t>(j, "num_attention_heads", mt);
    c.n_kv_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                       ? j["num_key_value_heads"].get<int64_t>()
                       : c.n_heads;
    c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null() ? j["head_dim"].get<int64_t>() : 0;
    c.hidden_dim = detail::hf_get<int64_t>(j, "intermediate_size", mt);
    c.norm_eps = j.value("rms_norm_eps", 1e-6);
    // transformers >= 5 keeps rope_theta inside rope_parameters.
    const nlohmann::json* rp = nullptr;
    if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) rp = &j["rope_parameters"];
    if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) rp = &j["rope_scaling"];
    if (rp) {
      const std::string type = rp->value("rope_type", rp->value("type", "default"));
      MOA_CHECK(type == "default", ValueError, "config.json (", mt, "): rope type '", type,
                "' is not supported (only default RoPE)");
      c.rope_theta = rp->value("rope_theta", j.value("rope_theta", 10000.0));
    } else {
      c.rope_theta = j.value("rope_theta", 10000.0);
    }
    const std::string act = j.value("hidden_act", "silu");
    MOA_CHECK(act == "silu", ValueError, "config.json (", mt, "): hidden_act '", act, "' is not supported (expected silu)");
    c.qkv_bias = mt == "qwen2" ? true : j.value("attention_bias", false);
    c.out_bias = mt == "qwen2" ? false : j.value("attention_bias", false);
    c.mlp_bias = j.value("mlp_bias", false);
    c.tie_embeddings = j.value("tie_word_embeddings", false);
  } else {
    throw ValueError(::moa::detail::cat("config.json: model_type '", mt,
                                        "' is not supported (expected gpt2, llama, qwen2 or mistral)"));
  }
  c.dropout = 0.0;
  c.validate();
  return info;
}

// HF tensors (names as in model.safetensors) -> our parameter names and layouts. Known buffers
// (attention masks, rotary inv_freq) are skipped; any other unknown name is an error.
inline std::map<std::string, Tensor> state_from_hf(const std::map<std::string, Tensor>& hf, const HfModelInfo& info) {
  std::map<std::string, Tensor> out;
  const TransformerConfig& c = info.config;
  const int64_t C = c.dim;
  auto ends_with = [](const std::string& s, const std::string& suf) {
    return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
  };
  for (const auto& [full, t] : hf) {
    std::string n = full;
    if (info.family == HfFamily::gpt2) {
      if (n.rfind("transformer.", 0) == 0) n = n.substr(12);
      if (ends_with(n, ".attn.bias") || ends_with(n, ".attn.masked_bias")) continue;  // causal-mask buffers
      if (n == "wte.weight") {
        out["tok_emb.weight"] = t;
      } else if (n == "wpe.weight") {
        out["pos_emb.weight"] = t;
      } else if (n == "ln_f.weight" || n == "ln_f.bias") {
        out[n] = t;
      } else if (n == "lm_head.weight") {
        if (!c.tie_embeddings) out["lm_head.weight"] = t;
      } else if (n.rfind("h.", 0) == 0) {
        const auto dot = n.find('.', 2);
        const std::string layer = n.substr(2, dot - 2), rest = n.substr(dot + 1);
        const std::string p = "blocks." + layer + ".";
        if (rest == "ln_1.weight" || rest == "ln_1.bias") {
          out[p + "ln1." + rest.substr(5)] = t;
        } else if (rest == "ln_2.weight" || rest == "ln_2.bias") {
          out[p + "ln2." + rest.substr(5)] = t;
        } else if (rest == "attn.c_attn.weight") {  // (C, 3C), y = x W
          MOA_CHECK(t.dim() == 2 && t.size(0) == C && t.size(1) == 3 * C, ShapeError, "GPT-2 checkpoint: ", full,
                    " expected shape [", C, ", ", 3 * C, "], got ", shape_str(t.shape()));
          out[p + "attn.q_proj.weight"] = t.narrow(1, 0, C).t().contiguous();
          out[p + "attn.k_proj.weight"] = t.narrow(1, C, C).t().contiguous();
          out[p + "attn.v_proj.weight"] = t.narrow(1, 2 * C, C).t().contiguous();
        } else if (rest == "attn.c_attn.bias") {
          MOA_CHECK(t.dim() == 1 && t.size(0) == 3 * C, ShapeError, "GPT-2 checkpoint: ", full, " expected shape [",
                    3 * C, "], got ", shape_str(t.shape()));
          out[p + "attn.q_proj.bias"] = t.narrow(0, 0, C).contiguous();
          out[p + "attn.k_proj.bias"] = t.narrow(0, C, C).contiguous();
          out[p + "attn.v_proj.bias"] = t.narrow(0, 2 * C, C).contiguous();
        } else if (rest == "attn.c_proj.weight" || rest == "mlp.c_fc.weight" || rest == "mlp.c_proj.weight") {
          MOA_CHECK(t.dim() == 2, ShapeError, "GPT-2 checkpoint: ", full, " expected a matrix, got ", shape_str(t.shape()));
          const std::string ours = rest == "attn.c_proj.weight" ? "attn.o_proj.weight"
                                   : rest == "mlp.c_fc.weight"  ? "mlp.fc.weight"
                                                                : "mlp.proj.weight";
          out[p + ours] = t.t().contiguous();
        } else if (rest == "attn.c_proj.bias") {
          out[p + "attn.o_proj.bias"] = t;
        } else if (rest == "mlp.c_fc.bias") {
          out[p + "mlp.fc.bias"] = t;
        } else if (rest == "mlp.c_proj.bias") {
          out[p + "mlp.proj.bias"] = t;
        } else {
          throw IndexError(::moa::detail::cat("GPT-2 checkpoint: unknown tensor name '", full, "'"));
        }
      } else {
        throw IndexError(::moa::detail::cat("GPT-2 checkpoint: unknown tensor name '", full, "'"));
      }
    } else {
      if (ends_with(n, "rotary_emb.inv_freq")) continue;
      if (n == "model.embed_tokens.weight") {
        out["tok_emb.weight"] = t;
      } else if (n == "model.norm.weight") {
        out["ln_f.weight"] = t;
      } else if (n == "lm_head.weight") {
        if (!c.tie_embeddings) out["lm_head.weight"] = t;
      } else if (n.rfind("model.layers.", 0) == 0) {
        const auto dot = n.find('.', 13);
        const std::string layer = n.substr(13, dot - 13), rest = n.substr(dot + 1);
        const std::string p = "blocks." + layer + ".";
        if (rest == "input_layernorm.weight") {
          out[p + "ln1.weight"] = t;
        } else if (rest == "post_attention_layernorm.weight") {
          out[p + "ln2.weight"] = t;
        } else if (rest.rfind("self_attn.", 0) == 0) {
          out[p + "attn." + rest.substr(10)] = t;
        } else if (rest.rfind("mlp.", 0) == 0) {
          out[p + rest] = t;
        } else {
          throw IndexError(::moa::detail::cat("Llama checkpoint: unknown tensor name '", full, "'"));
        }
      } else {
        throw IndexError(::moa::detail::cat("Llama checkpoint: unknown tensor name '", full, "'"));
      }
    }
  }
  return out;
}

// Our parameters (or their gradients, with the same names) -> HF names and layouts.
inline std::map<std::string, Tensor> state_to_hf(const std::vector<std::pair<std::string, Tensor>>& ours,
                                                 const HfModelInfo& info) {
  std::map<std::string, Tensor> in(ours.begin(), ours.end()), out;
  auto take = [&](const std::string& n) {
    auto it = in.find(n);
    MOA_CHECK(it != in.end(), IndexError, "state_to_hf: missing '", n, "'");
    return it->second;
  };
  const TransformerConfig& c = info.config;
  for (const auto& [n, t] : in) {
    if (info.family == HfFamily::gpt2) {
      if (n == "tok_emb.weight") {
        out["transformer.wte.weight"] = t;
      } else if (n == "pos_emb.weight") {
        out["transformer.wpe.weight"] = t;
      } else if (n.rfind("ln_f.", 0) == 0) {
        out["transformer." + n] = t;
      } else if (n == "lm_head.weight") {
        out[n] = t;
      } else if (n.rfind("blocks.", 0) == 0) {
        const auto dot = n.find('.', 7);
        const std::string layer = n.substr(7, dot - 7), rest = n.substr(dot + 1);
        const std::string p = "transformer.h." + layer + ".", b = "blocks." + layer + ".";
        if (rest.rfind("ln1.", 0) == 0) out[p + "ln_1." + rest.substr(4)] = t;
        else if (rest.rfind("ln2.", 0) == 0) out[p + "ln_2." + rest.substr(4)] = t;
        else if (rest == "attn.q_proj.weight")
          out[p + "attn.c_attn.weight"] = concat({t.t(), take(b + "attn.k_proj.weight").t(), take(b + "attn.v_proj.weight").t()}, 1);
        else if (rest == "attn.q_proj.bias")
          out[p + "attn.c_attn.bias"] = concat({t, take(b + "attn.k_proj.bias"), take(b + "attn.v_proj.bias")}, 0);
        else if (rest == "attn.o_proj.weight") out[p + "attn.c_proj.weight"] = t.t().contiguous();
        else if (rest == "attn.o_proj.bias") out[p + "attn.c_proj.bias"] = t;
        else if (rest == "mlp.fc.weight") out[p + "mlp.c_fc.weight"] = t.t().contiguous();
        else if (rest == "mlp.fc.bias") out[p + "mlp.c_fc.bias"] = t;
        else if (rest == "mlp.proj.weight") out[p + "mlp.c_proj.weight"] = t.t().contiguous();
        else if (rest == "mlp.proj.bias") out[p + "mlp.c_proj.bias"] = t;
        // k/v parts were folded into c_attn with q.
      }
    } else {
      if (n == "tok_emb.weight") {
        out["model.embed_tokens.weight"] = t;
      } else if (n == "ln_f.weight") {
        out["model.norm.weight"] = t;
      } else if (n == "lm_head.weight") {
        out[n] = t;
      } else if (n.rfind("blocks.", 0) == 0) {
        const auto dot = n.find('.', 7);
        const std::string layer = n.substr(7, dot - 7), rest = n.substr(dot + 1);
        const std::string p = "model.layers." + layer + ".";
        if (rest == "ln1.weight") out[p + "input_layernorm.weight"] = t;
        else if (rest == "ln2.weight") out[p + "post_attention_layernorm.weight"] = t;
        else if (rest.rfind("attn.", 0) == 0) out[p + "self_attn." + rest.substr(5)] = t;
        else out[p + rest] = t;
      }
    }
  }
  (void)c;
  return out;
}

}  // namespace moa::nn
