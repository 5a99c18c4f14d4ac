// moa/nn/attention.hpp: causal self-attention as a module (q/k/v/o projections, RoPE or none,
// multi-head or grouped-query) and the KV cache that generation fills.
#pragma once

#include <cmath>
#include <memory>
#include <vector>

#include "moa/nn/config.hpp"
#include "moa/nn/linear.hpp"
#include "moa/ops/attention.hpp"
#include "moa/ops/concat.hpp"
#include "moa/ops/rope.hpp"

namespace moa::nn {

// Keys and values of every layer for a batch of sequences being generated.
// k[l], v[l]: (B, Hkv, capacity, D); lengths[b]: tokens of row b already in the cache.
struct KVCache {
  std::vector<Tensor> k, v;
  std::vector<int64_t> lengths;
  int64_t capacity = 0;

  static KVCache make(const TransformerConfig& c, int64_t batch, int64_t capacity, Device device = Device::cpu()) {
    MOA_CHECK(batch > 0 && capacity > 0, ValueError, "KVCache: expected positive batch and capacity, got ", batch,
              " and ", capacity);
    KVCache kv;
    for (int64_t l = 0; l < c.n_layers; ++l) {
      kv.k.push_back(Tensor::zeros({batch, c.kv_heads(), capacity, c.head_size()}, DType::f32, device));
      kv.v.push_back(Tensor::zeros({batch, c.kv_heads(), capacity, c.head_size()}, DType::f32, device));
    }
    kv.lengths.assign(static_cast<std::size_t>(batch), 0);
    kv.capacity = capacity;
    return kv;
  }
  int64_t batch() const { return static_cast<int64_t>(lengths.size()); }
  bool uniform() const {
    for (int64_t n : lengths)
      if (n != lengths.front()) return false;
    return true;
  }
};

class CausalSelfAttention : public Module {
 public:
  CausalSelfAttention(const TransformerConfig& c, Generator& gen)
      : c_(c), H_(c.n_heads), Hkv_(c.kv_heads()), D_(c.head_size()) {
    const double out_std = c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers));
    q_proj = register_module("q_proj", std::make_shared<Linear>(c.dim, H_ * D_, c.qkv_bias, gen, c.init_std));
    k_proj = register_module("k_proj", std::make_shared<Linear>(c.dim, Hkv_ * D_, c.qkv_bias, gen, c.init_std));
    v_proj = register_module("v_proj", std::make_shared<Linear>(c.dim, Hkv_ * D_, c.qkv_bias, gen, c.init_std));
    o_proj = register_module("o_proj", std::make_shared<Linear>(H_ * D_, c.dim, c.out_bias, gen, out_std));
  }

  // x: (B, T, C) -> (B, T, C). With a cache: row b's tokens sit at positions lengths[b] ..; the
  // new keys/values are written into the cache (the caller advances lengths after all layers).
  Tensor forward(const Tensor& x, KVCache* cache = nullptr, int64_t layer = 0) {
    const int64_t B = x.size(0), T = x.size(1);
    Tensor q = q_proj->forward(x).view({B, T, H_, D_}).transpose(1, 2);    // (B, H, T, D)
    Tensor k = k_proj->forward(x).view({B, T, Hkv_, D_}).transpose(1, 2);  // (B, Hkv, T, D)
    Tensor v = v_proj->forward(x).view({B, T, Hkv_, D_}).transpose(1, 2);  // (B, Hkv, T, D)
    Tensor y;
    if (!cache) {
      if (c_.position == PositionKind::rope) {
        q = rope(q, 0, c_.rope_theta);
        k = rope(k, 0, c_.rope_theta);
      }
      y = causal_attention(q, k, v);  // (B, H, T, D)
    } else if (cache->uniform()) {
      const int64_t start = cache->lengths.front();
      if (c_.position == PositionKind::rope) {
        q = rope(q, start, c_.rope_theta);
        k = rope(k, start, c_.rope_theta);
      }
      y = causal_attention(q, append(cache->k[layer], k, start), append(cache->v[layer], v, start));
    } else {
      // Rows at different lengths (batched decoding): one attention per row.
      std::vector<Tensor> rows;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t start = cache->lengths[b];
        Tensor qb = q.narrow(0, b, 1), kb = k.narrow(0, b, 1), vb = v.narrow(0, b, 1);
        if (c_.position == PositionKind::rope) {
          qb = rope(qb, start, c_.rope_theta);
          kb = rope(kb, start, c_.rope_theta);
        }
        rows.push_back(causal_attention(qb, append(cache->k[layer].narrow(0, b, 1), kb, start),
                                        append(cache->v[layer].narrow(0, b, 1), vb, start)));
      }
      y = concat(rows, 0);
    }
    return o_proj->forward(y.transpose(1, 2).reshape({B, T, H_ * D_}));
  }

  std::shared_ptr<Linear> q_proj, k_proj, v_proj, o_proj;

 private:
  // Writes new (B, Hkv, T, D) into the cache at [start, start + T) and returns keys 0 .. start + T.
  static Tensor append(const Tensor& cache, const Tensor& fresh, int64_t start) {
    const int64_t T = fresh.size(2);
    MOA_CHECK(start + T <= cache.size(2), ValueError, "KVCache: ", start + T,
              " tokens do not fit the cache's capacity of ", cache.size(2), " (the model's context)");
    {
      NoGradGuard no_grad;
      Tensor dst = cache.narrow(2, start, T).detach();
      dst.copy_(fresh);
    }
    return cache.narrow(2, 0, start + T);
  }

  TransformerConfig c_;
  int64_t H_, Hkv_, D_;
};

}  // namespace moa::nn
