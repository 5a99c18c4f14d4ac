// moa/eval/generate.hpp: text generation with a KV cache: greedy, temperature, top-k, top-p,
// stop tokens, batched (prompts of different lengths in one batch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/nn/transformer.hpp"

namespace moa::eval {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  double temperature = 0.0;            // 0: greedy (argmax; ties to the lowest id)
  int64_t top_k = 0;                   // 0: no top-k cut
  double top_p = 1.0;                  // nucleus sampling: keep the smallest set with mass >= top_p
  std::vector<int32_t> stop_tokens{};  // generation of a row ends after it emits one of these
  std::uint64_t seed = 0;
};

namespace detail {

// Picks the next token from one row of logits (V).
inline int32_t pick_token(const float* logits, int64_t V, const GenerateOptions& opt, Generator& gen) {
  if (opt.temperature <= 0.0) {
    return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  }
  std::vector<int32_t> order(static_cast<std::size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  // Highest first; ties by id so the draw is reproducible.
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = V;
  if (opt.top_k > 0) keep = std::min<int64_t>(keep, opt.top_k);
  std::vector<double> p(static_cast<std::size_t>(keep));
  const double mx = logits[order[0]];
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) {
    p[i] = std::exp((static_cast<double>(logits[order[i]]) - mx) / opt.temperature);
    total += p[i];
  }
  if (opt.top_p < 1.0) {
    double acc = 0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      acc += p[i] / total;
      if (acc >= opt.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    total = 0;
    for (int64_t i = 0; i < keep; ++i) total += p[i];
  }
  const double u = gen.next_double() * total;
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (u < acc) return order[i];
  }
  return order[keep - 1];
}

}  // namespace detail

// Continues every prompt; returns the new tokens of each (stop token included when hit).
// Stops a row at max_new_tokens, a stop token, or the model's context.
inline std::vector<std::vector<int32_t>> generate(nn::TransformerLM& model, const std::vector<std::vector<int32_t>>& prompts,
                                                  const GenerateOptions& opt = {}) {
  const nn::TransformerConfig& c = model.config();
  MOA_CHECK(!prompts.empty(), ValueError, "generate: expected at least one prompt");
  MOA_CHECK(opt.max_new_tokens >= 0 && opt.top_p > 0 && opt.top_p <= 1 && opt.top_k >= 0, ValueError,
            "generate: expected max_new_tokens >= 0, 0 < top_p <= 1 and top_k >= 0, got ", opt.max_new_tokens, ", ",
            opt.top_p, " and ", opt.top_k);
  int64_t longest = 0;
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    const auto& p = prompts[b];
    MOA_CHECK(!p.empty(), ValueError, "generate: prompt ", b, " is empty (expected at least one token, e.g. BOS)");
    MOA_CHECK(static_cast<int64_t>(p.size()) <= c.max_seq_len, ValueError, "generate: prompt ", b, " has ", p.size(),
              " tokens, longer than the model's context of ", c.max_seq_len);
    for (std::size_t i = 0; i < p.size(); ++i)
      MOA_CHECK(p[i] >= 0 && p[i] < c.vocab_size, IndexError, "generate: token id ", p[i], " at position ", i,
                " of prompt ", b, " is outside the vocabulary [0, ", c.vocab_size, ")");
    longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  }
  NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  const int64_t B = static_cast<int64_t>(prompts.size());
  const int64_t capacity = std::min(c.max_seq_len, longest + opt.max_new_tokens);
  nn::KVCache cache = model.make_cache(B, capacity);
  Generator gen(opt.seed);
  std::vector<std::vector<int32_t>> out(static_cast<std::size_t>(B));
  std::vector<char> done(static_cast<std::size_t>(B), opt.max_new_tokens == 0);
  std::vector<int32_t> next(static_cast<std::size_t>(B));

  auto take = [&](const Tensor& logits_any, int64_t row, int64_t b) {  // logits (rows, V)
    const Tensor logits = on_device(logits_any) ? logits_any.narrow(0, row, 1).to(Device::cpu()) : logits_any;
    if (on_device(logits_any)) row = 0;
    const float* l = logits.data<float>() + row * c.vocab_size;
    const int32_t t = detail::pick_token(l, c.vocab_size, opt, gen);
    next[b] = t;
    out[b].push_back(t);
    if (static_cast<int64_t>(out[b].size()) >= opt.max_new_tokens ||
        std::find(opt.stop_tokens.begin(), opt.stop_tokens.end(), t) != opt.stop_tokens.end())
      done[b] = 1;
  };

  if (opt.max_new_tokens > 0) {
    bool same = true;
    for (const auto& p : prompts) same = same && p.size() == prompts[0].size();
    if (same) {
      std::vector<int32_t> flat;
      for (const auto& p : prompts) flat.insert(flat.end(), p.begin(), p.end());
      const Tensor logits = model.forward_last(Tensor::from_vector(flat, {B, longest}), &cache).contiguous();
      for (int64_t b = 0; b < B; ++b) take(logits, b, b);
    } else {  // prefill row by row into views of the batch cache
      for (int64_t b = 0; b < B; ++b) {
        nn::KVCache row;
        for (std::size_t l = 0; l < cache.k.size(); ++l) {
          row.k.push_back(cache.k[l].narrow(0, b, 1));
          row.v.push_back(cache.v[l].narrow(0, b, 1));
        }
        row.lengths = {0};
        row.capacity = cache.capacity;
        const auto& p = prompts[b];
        nn::RowScope scope({b});
        const Tensor logits =
            model.forward_last(Tensor::from_vector(p, {1, static_cast<int64_t>(p.size())}), &row).contiguous();
        cache.lengths[b] = row.lengths[0];
        take(logits, 0, b);
      }
    }
  }
  while (std::find(done.begin(), done.end(), 0) != done.end()) {
    bool room = true;
    for (int64_t b = 0; b < B; ++b) room = room && cache.lengths[b] < capacity;
    if (!room) break;  // the context is full
    const Tensor logits = model.forward_last(Tensor::from_vector(next, {B, 1}), &cache).contiguous();
    for (int64_t b = 0; b < B; ++b)
      if (!done[b]) take(logits, b, b);
  }
  model.train(was_training);
  return out;
}

}  // namespace moa::eval
