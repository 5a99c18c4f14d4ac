// moa/nn/transformer.hpp: the decoder-only language model: embeddings, pre-norm blocks
// (attention + MLP with residuals), final norm and the LM head, for GPT-2 and Llama families.
//
// Parameter names: tok_emb.weight, pos_emb.weight (learned positions), blocks.{i}.ln1.weight,
// blocks.{i}.attn.{q,k,v,o}_proj.{weight,bias}, blocks.{i}.ln2.weight,
// blocks.{i}.mlp.{fc,proj}.* (GELU) or blocks.{i}.mlp.{gate,up,down}_proj.weight (SwiGLU),
// ln_f.weight, lm_head.weight (when not tied to tok_emb).
#pragma once

#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "moa/nn/attention.hpp"
#include "moa/nn/config.hpp"
#include "moa/nn/linear.hpp"
#include "moa/ops/dropout.hpp"
#include "moa/ops/elementwise.hpp"
#include "moa/ops/linear_loss.hpp"
#include "moa/ops/loss.hpp"

namespace moa::nn {

// While alive, forward passes cover only these rows of the full batch (generation prefills
// prompts of different lengths one row at a time); per-row state such as MoA routing reads it.
class RowScope {
 public:
  explicit RowScope(std::vector<int64_t> rows) : prev_(current()), rows_(std::move(rows)) { current() = &rows_; }
  ~RowScope() { current() = prev_; }
  RowScope(const RowScope&) = delete;
  RowScope& operator=(const RowScope&) = delete;
  // The rows of the current forward, or nullptr: all rows.
  static const std::vector<int64_t>* rows() { return current(); }

 private:
  static const std::vector<int64_t>*& current() {
    thread_local const std::vector<int64_t>* rows = nullptr;
    return rows;
  }
  const std::vector<int64_t>* prev_;
  std::vector<int64_t> rows_;
};

class MLP : public Module {
 public:
  MLP(const TransformerConfig& c, Generator& gen) : kind_(c.mlp) {
    const double out_std = c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers));
    const int64_t h = c.mlp_hidden();
    if (kind_ == MlpKind::gelu) {
      fc = register_module("fc", std::make_shared<Linear>(c.dim, h, c.mlp_bias, gen, c.init_std));
      proj = register_module("proj", std::make_shared<Linear>(h, c.dim, c.mlp_bias, gen, out_std));
    } else {
      gate_proj = register_module("gate_proj", std::make_shared<Linear>(c.dim, h, c.mlp_bias, gen, c.init_std));
      up_proj = register_module("up_proj", std::make_shared<Linear>(c.dim, h, c.mlp_bias, gen, c.init_std));
      down_proj = register_module("down_proj", std::make_shared<Linear>(h, c.dim, c.mlp_bias, gen, out_std));
    }
  }
  // (B, T, C) -> (B, T, C)
  Tensor forward(const Tensor& x) {
    if (kind_ == MlpKind::gelu) return proj->forward(gelu(fc->forward(x)));
    return down_proj->forward(swiglu(gate_proj->forward(x), up_proj->forward(x)));
  }
  std::shared_ptr<Linear> fc, proj, gate_proj, up_proj, down_proj;

 private:
  MlpKind kind_;
};

// Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x)).
class Block : public Module {
 public:
  Block(const TransformerConfig& c, Generator& gen) : c_(c) {
    if (c.norm == NormKind::layernorm) {
      ln1 = register_module("ln1", std::make_shared<LayerNorm>(c.dim, c.norm_eps, c.norm_bias));
    } else {
      rms1 = register_module("ln1", std::make_shared<RMSNorm>(c.dim, c.norm_eps));
    }
    attn = register_module("attn", std::make_shared<CausalSelfAttention>(c, gen));
    if (c.norm == NormKind::layernorm) {
      ln2 = register_module("ln2", std::make_shared<LayerNorm>(c.dim, c.norm_eps, c.norm_bias));
    } else {
      rms2 = register_module("ln2", std::make_shared<RMSNorm>(c.dim, c.norm_eps));
    }
    mlp = register_module("mlp", std::make_shared<MLP>(c, gen));
  }

  Tensor forward(const Tensor& x, KVCache* cache, int64_t layer, Generator* dropout_gen) {
    Tensor a = attn->forward(norm(x, 1), cache, layer);
    if (dropout_gen && c_.dropout > 0) a = dropout(a, c_.dropout, *dropout_gen, is_training());
    Tensor h = x + a;
    Tensor m = mlp->forward(norm(h, 2));
    if (dropout_gen && c_.dropout > 0) m = dropout(m, c_.dropout, *dropout_gen, is_training());
    return h + m;
  }

  std::shared_ptr<LayerNorm> ln1, ln2;
  std::shared_ptr<RMSNorm> rms1, rms2;
  std::shared_ptr<CausalSelfAttention> attn;
  std::shared_ptr<MLP> mlp;

 private:
  Tensor norm(const Tensor& x, int which) const {
    if (c_.norm == NormKind::layernorm) return (which == 1 ? ln1 : ln2)->forward(x);
    return (which == 1 ? rms1 : rms2)->forward(x);
  }
  TransformerConfig c_;
};

class TransformerLM : public Module {
 public:
  explicit TransformerLM(const TransformerConfig& c, std::uint64_t seed = 1337) : c_(c), dropout_gen_(seed ^ 0xD0D0) {
    c.validate();
    Generator gen(seed);
    tok_emb = register_module("tok_emb", std::make_shared<Embedding>(c.vocab_size, c.dim, gen, c.init_std));
    if (c.position == PositionKind::learned)
      pos_emb = register_module("pos_emb", std::make_shared<Embedding>(c.max_seq_len, c.dim, gen, c.init_std / 2));
    auto list = register_module("blocks", std::make_shared<ModuleList<Block>>());
    for (int64_t i = 0; i < c.n_layers; ++i) blocks.push_back(list->push_back(std::make_shared<Block>(c, gen)));
    if (c.norm == NormKind::layernorm)
      ln_f = register_module("ln_f", std::make_shared<LayerNorm>(c.dim, c.norm_eps, c.norm_bias));
    else
      rms_f = register_module("ln_f", std::make_shared<RMSNorm>(c.dim, c.norm_eps));
    if (!c.tie_embeddings)
      lm_head = register_module("lm_head", std::make_shared<Linear>(c.dim, c.vocab_size, false, gen, c.init_std));
  }

  const TransformerConfig& config() const { return c_; }

  // The final hidden states (B, T, C) for ids (B, T) i32; with a cache, the tokens continue each
  // row's sequence and the cache's lengths advance by T.
  Tensor hidden(const Tensor& ids, KVCache* cache = nullptr) {
    MOA_CHECK(ids.dtype() == DType::i32 && ids.dim() == 2, ValueError,
              "TransformerLM: expected token ids (B, T) of dtype i32, got ", shape_str(ids.shape()), " ",
              dtype_name(ids.dtype()));
    const int64_t B = ids.size(0), T = ids.size(1);
    MOA_CHECK(T >= 1, ShapeError, "TransformerLM: expected at least one token, got ", shape_str(ids.shape()));
    if (cache) {
      MOA_CHECK(cache->batch() == B && static_cast<int64_t>(cache->k.size()) == c_.n_layers, ShapeError,
                "TransformerLM: the KV cache holds ", cache->batch(), " rows, the ids ", B);
      MOA_CHECK(cache->uniform() || T == 1, ValueError,
                "TransformerLM: rows of the KV cache have different lengths; feed one token per row");
    }
    int64_t longest = T;
    if (cache)
      for (int64_t n : cache->lengths) longest = std::max(longest, n + T);
    MOA_CHECK(longest <= c_.max_seq_len, ValueError, "TransformerLM: a sequence of ", longest,
              " tokens is longer than the context of ", c_.max_seq_len);
    Tensor x = tok_emb->forward(ids);  // (B, T, C)
    if (pos_emb) {
      std::vector<int32_t> pos(static_cast<std::size_t>(B * T));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
          pos[static_cast<std::size_t>(b * T + t)] = static_cast<int32_t>((cache ? cache->lengths[b] : 0) + t);
      x = x + pos_emb->forward(Tensor::from_vector(pos, {B, T}));
    }
    Generator* dg = (c_.dropout > 0 && is_training()) ? &dropout_gen_ : nullptr;
    if (dg) x = dropout(x, c_.dropout, *dg, true);
    for (std::size_t l = 0; l < blocks.size(); ++l) {
      if (block_hook) block_hook(static_cast<int64_t>(l), x);
      x = blocks[l]->forward(x, cache, static_cast<int64_t>(l), dg);
    }
    if (cache)
      for (auto& n : cache->lengths) n += T;
    return ln_f ? ln_f->forward(x) : rms_f->forward(x);
  }

  // Logits (B, T, V).
  Tensor forward(const Tensor& ids, KVCache* cache = nullptr) { return logits_of(hidden(ids, cache)); }
  // Logits (B, T, V) from the final hidden states h (B, T, C), what hidden() returns.
  Tensor forward_from_hidden(const Tensor& h) { return logits_of(h); }

  // Logits of the last position only (B, V): what generation needs, without the (T x V) product.
  Tensor forward_last(const Tensor& ids, KVCache* cache = nullptr) {
    Tensor h = hidden(ids, cache);
    const int64_t T = h.size(1);
    return logits_of(h.narrow(1, T - 1, 1)).squeeze(1);
  }

  // Mean cross-entropy of next-token prediction: targets (B, T) i32, ignore_index marks positions
  // without a loss (padding, prompt tokens).
  Tensor loss(const Tensor& ids, const Tensor& targets, int32_t ignore_index = -100) {
    return loss_of_hidden(hidden(ids), targets, ignore_index);
  }
  // The same from the final hidden states h (B, T, C), what hidden() returns. The head and the loss
  // are one op (linear_cross_entropy: the (B, T, V) logits are never formed) unless the head has an
  // adapter or a bias. Under grad mode that op forms h's gradient in the forward: a loss computed
  // only to be read should run under NoGradGuard.
  Tensor loss_of_hidden(const Tensor& h, const Tensor& targets, int32_t ignore_index = -100) {
    if (lm_head && (lm_head->adapter() || lm_head->bias.defined()))
      return cross_entropy(lm_head->forward(h), targets, ignore_index);
    return linear_cross_entropy(h, head_weight(), targets, ignore_index);
  }

  Tensor head_weight() const { return lm_head ? lm_head->weight : tok_emb->weight; }

  KVCache make_cache(int64_t batch, int64_t capacity = 0) const {
    return KVCache::make(c_, batch, capacity > 0 ? std::min(capacity, c_.max_seq_len) : c_.max_seq_len, device());
  }

  Generator& dropout_generator() { return dropout_gen_; }

  // Called with each block's input (B, T, C) before the block runs: where routers look (MoA).
  std::function<void(int64_t layer, const Tensor& x)> block_hook;

  std::shared_ptr<Embedding> tok_emb, pos_emb;
  std::vector<std::shared_ptr<Block>> blocks;
  std::shared_ptr<LayerNorm> ln_f;
  std::shared_ptr<RMSNorm> rms_f;
  std::shared_ptr<Linear> lm_head;

 private:
  Tensor logits_of(const Tensor& h) { return lm_head ? lm_head->forward(h) : linear(h, tok_emb->weight); }

  TransformerConfig c_;
  Generator dropout_gen_;
};

}  // namespace moa::nn
