// moa/mixture/moa.hpp: Mixture-of-LoRAs: one frozen base model, one LoRA expert per domain beside
// every targeted linear, and a router before every transformer layer.
//
// Routing is per sequence and top-1. With known domains (training, stage 2) every sequence goes
// through its own domain's expert and each router learns to predict that domain (teacher forcing).
// With unknown domains, route() runs the prompt with each layer using its own router's choice, then
// picks one expert per sequence by the last router or the vote of all routers; that expert then
// serves the whole sequence. Rows of a batch that go to different experts are grouped per expert
// (grouped_lora), so a mixed batch costs about one LoRA's products.
//
// Token-level top-k routing over the same experts (the MoE-LoRA ablation) is the `token_topk` mode.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <numeric>
#include <regex>
#include <string>
#include <vector>

#include "moa/nn/transformer.hpp"
#include "moa/ops/concat.hpp"
#include "moa/ops/grouped_lora.hpp"
#include "moa/ops/loss.hpp"
#include "moa/ops/softmax.hpp"

namespace moa::mixture {

enum class Pooling { mean, last };          // router input: prompt tokens' mean, or the last prompt token
enum class Selection { last_router, vote };  // which router decides at inference
enum class RoutingMode { sequence, token_topk };

struct MoAConfig {
  std::vector<std::string> domains;            // one expert per domain, in label order
  int64_t rank = 8;
  double alpha = 16;
  bool use_rslora = false;                     // scale alpha / sqrt(rank) instead of alpha / rank
  std::string target_modules = "q_proj|v_proj";  // regex on a linear's last name component(s)
  Pooling pooling = Pooling::mean;
  Selection selection = Selection::last_router;
  double eta = 1.0;                            // weight of the routing loss
  RoutingMode mode = RoutingMode::sequence;
  int64_t top_k = 2;                           // token_topk: experts per token
  double balance_weight = 0.01;                // token_topk: load-balancing loss weight
  double scale() const { return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank); }
};

// What every MoA adapter of the model reads during one forward.
struct RoutingState {
  RoutingMode mode = RoutingMode::sequence;
  std::vector<std::vector<int32_t>> seq_expert;     // [layer][b]: the expert of sequence b in that layer
  // token_topk: per layer, the (row, expert, weight) assignments.
  std::vector<std::vector<int32_t>> rows, experts;
  std::vector<Tensor> weights;
  // On a device: the uploaded groupings, shared by every adapted linear whose routing is the same:
  // the linears of one layer, and all the layers when one routing is given (a training batch's
  // domains). The most recent few are kept; a layer's own routing is the most recent while its
  // linears run.
  mutable GroupingCache groupings{4};

  GroupingCache* grouping_cache() const { return &groupings; }
};

// One expert beside one linear: A (R, In), B (Out, R), PEFT's init (A uniform, B zero).
class Expert : public nn::Module {
 public:
  Expert(int64_t in, int64_t out, int64_t rank, Generator& gen) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    lora_A = register_parameter("lora_A.weight", Tensor::rand({rank, in}, gen, DType::f32, -bound, bound));
    lora_B = register_parameter("lora_B.weight", Tensor::zeros({out, rank}));
  }
  Tensor lora_A, lora_B;
};

// The experts of one linear; the output adds the routed expert's part to the frozen base output.
class MoAAdapter : public nn::LinearAdapter {
 public:
  MoAAdapter(int64_t layer, int64_t in, int64_t out, const MoAConfig& c, std::shared_ptr<RoutingState> routing,
             Generator& gen)
      : layer_(layer), in_(in), out_(out), rank_(c.rank), scale_(c.scale()), routing_(std::move(routing)) {
    experts_ = register_module("experts", std::make_shared<nn::ModuleList<Expert>>());
    for (std::size_t e = 0; e < c.domains.size(); ++e) experts_->push_back(std::make_shared<Expert>(in, out, c.rank, gen));
  }

  Tensor forward(const Tensor& x, const Tensor& base_out) override {
    return apply(x, [&](const Grouping& a) {
      return grouped_lora_add(base_out, x.reshape({-1, in_}), a.A, a.B, *a.rows, *a.experts, a.weights, scale_,
                              a.cache);
    });
  }
  // The base output handed over: the experts' product is added onto its memory (no copy, no add).
  Tensor forward_owned(const Tensor& x, Tensor base_out) override {
    return apply(x, [&](const Grouping& a) {
      return grouped_lora_add(std::move(base_out), x.reshape({-1, in_}), a.A, a.B, *a.rows, *a.experts, a.weights,
                              scale_, a.cache);
    });
  }
  // The whole layer as one op (grouped_lora_linear): x gets one gradient.
  Tensor forward_linear(const Tensor& x, const Tensor& weight, const Tensor& bias) override {
    return apply(x, [&](const Grouping& a) {
      return grouped_lora_linear(x, weight, bias, a.A, a.B, *a.rows, *a.experts, a.weights, scale_, a.cache);
    });
  }

  std::shared_ptr<nn::ModuleList<Expert>> experts() const { return experts_; }
  int64_t layer() const { return layer_; }

  void add_expert(Generator& gen) { experts_->push_back(std::make_shared<Expert>(in_, out_, rank_, gen)); }
  void remove_expert(std::size_t e) {
    // Rebuild the list without expert e (the names 0..E-2 stay dense).
    auto fresh = std::make_shared<nn::ModuleList<Expert>>();
    for (std::size_t i = 0; i < experts_->size(); ++i)
      if (i != e) fresh->push_back((*experts_)[i]);
    remove_child("experts");
    experts_ = register_module("experts", fresh);
  }

 private:
  // What one call of the grouped product needs besides x: the experts and this call's assignments.
  struct Grouping {  // a local of apply(), never copied (rows and experts may point into it)
    Grouping() = default;
    Grouping(const Grouping&) = delete;
    Grouping& operator=(const Grouping&) = delete;
    std::vector<Tensor> A, B;
    std::vector<int32_t> own_rows, own_experts;  // sequence routing: built per call
    const std::vector<int32_t>* rows = nullptr;  // token routing: the routing state's own
    const std::vector<int32_t>* experts = nullptr;
    Tensor weights;
    GroupingCache* cache = nullptr;
  };

  // op(grouping): the routed experts' product for x, added onto the base output by op.
  template <class Op>
  Tensor apply(const Tensor& x, Op&& op) {
    const int64_t N = x.numel() / in_;
    Grouping a;
    for (const auto& e : *experts_) {
      a.A.push_back(e->lora_A);
      a.B.push_back(e->lora_B);
    }
    const RoutingState& r = *routing_;
    a.cache = r.grouping_cache();
    if (r.mode == RoutingMode::sequence) {
      std::vector<int32_t> se = r.seq_expert.at(static_cast<std::size_t>(layer_));
      if (const auto* sub = nn::RowScope::rows()) {  // a forward over some rows of the batch
        std::vector<int32_t> picked;
        for (int64_t row : *sub) picked.push_back(se.at(static_cast<std::size_t>(row)));
        se = std::move(picked);
      }
      // x is (B, T, In) with one expert per sequence; T is whatever this call carries (a whole
      // sequence in training, one new token per step when generating with a KV cache).
      const int64_t Bn = static_cast<int64_t>(se.size());
      MOA_CHECK(Bn > 0 && N % Bn == 0 && (x.dim() < 3 || x.size(0) == Bn), ShapeError, "MoA: routing gives ", Bn,
                " sequences, the layer input has shape ", shape_str(x.shape()));
      const int64_t T = N / Bn;
      a.own_rows.resize(static_cast<std::size_t>(N));
      a.own_experts.resize(static_cast<std::size_t>(N));
      for (int64_t n = 0; n < N; ++n) {
        a.own_rows[n] = static_cast<int32_t>(n);
        a.own_experts[n] = se[static_cast<std::size_t>(n / T)];
      }
      a.rows = &a.own_rows;
      a.experts = &a.own_experts;
    } else {
      const auto l = static_cast<std::size_t>(layer_);
      a.rows = &r.rows.at(l);
      a.experts = &r.experts.at(l);
      a.weights = r.weights.at(l);
    }
    return op(a);
  }

  int64_t layer_, in_, out_, rank_;
  double scale_;
  std::shared_ptr<RoutingState> routing_;
  std::shared_ptr<nn::ModuleList<Expert>> experts_;
};

// A linear map from the pooled layer input (C) to E logits, no bias.
class Router : public nn::Module {
 public:
  Router(int64_t dim, int64_t E, Generator& gen) {
    weight = register_parameter("weight", Tensor::randn({E, dim}, gen, DType::f32, 0.0, 0.02));
  }
  Tensor weight;
};

// Batch inputs for MoA: ids (B, T), targets (B, T) with -100 where no loss, prompt_mask (B, T)
// f32 with 1 on the prompt's non-padding tokens (what routers pool), domain (B) labels (or empty).
struct MoABatch {
  Tensor ids, targets, prompt_mask;
  std::vector<int32_t> domain;
};

class MoAModel : public nn::Module {
 public:
  MoAModel(std::shared_ptr<nn::TransformerLM> base, MoAConfig config, std::uint64_t seed = 7)
      : base_(std::move(base)), c_(std::move(config)), gen_(seed) {
    MOA_CHECK(!c_.domains.empty(), ValueError, "MoAModel: expected at least one expert (domain), got zero");
    MOA_CHECK(c_.rank > 0, ValueError, "MoAModel: expected rank > 0, got ", c_.rank);
    base_->freeze();
    register_module("base", base_);
    routing_ = std::make_shared<RoutingState>();
    const std::regex target(c_.target_modules);
    int64_t attached = 0;
    for (int64_t l = 0; l < base_->config().n_layers; ++l) {
      auto block = base_->blocks[static_cast<std::size_t>(l)];
      for (auto& [path, lin] : linears_of(*block)) {
        if (!std::regex_search(path, target)) continue;
        auto ad = std::make_shared<MoAAdapter>(l, lin->in_features(), lin->out_features(), c_, routing_, gen_);
        lin->set_adapter("moa", ad);
        adapters_.push_back(ad);
        linears_.push_back(lin);
        adapter_paths_.push_back("blocks." + std::to_string(l) + "." + path);
        ++attached;
      }
    }
    MOA_CHECK(attached > 0, ValueError, "MoAModel: target_modules '", c_.target_modules, "' matches no linear");
    auto list = register_module("routers", std::make_shared<nn::ModuleList<Router>>());
    for (int64_t l = 0; l < base_->config().n_layers; ++l)
      routers_.push_back(list->push_back(std::make_shared<Router>(base_->config().dim, num_experts(), gen_)));
    to(base_->device());  // experts and routers live where the base does
  }
  // Detaches the experts: the base (which others may share) is left as it was before, plain.
  ~MoAModel() override {
    base_->block_hook = nullptr;
    for (std::size_t i = 0; i < linears_.size(); ++i)
      if (linears_[i]->adapter() == adapters_[i]) linears_[i]->set_adapter("moa", nullptr);
  }
  MoAModel(const MoAModel&) = delete;
  MoAModel& operator=(const MoAModel&) = delete;

  const MoAConfig& config() const { return c_; }
  nn::TransformerLM& base() { return *base_; }
  // What the adapters read in a forward (the routing, and on a device each layer's uploaded grouping).
  const RoutingState& routing() const { return *routing_; }
  int64_t num_experts() const { return static_cast<int64_t>(c_.domains.size()); }
  const std::vector<std::shared_ptr<MoAAdapter>>& adapters() const { return adapters_; }
  const std::vector<std::shared_ptr<Router>>& routers() const { return routers_; }
  // The module path of each adapter's linear (blocks.3.attn.q_proj), in adapters() order.
  const std::vector<std::string>& adapter_paths() const { return adapter_paths_; }

  int32_t domain_index(const std::string& name) const {
    for (std::size_t e = 0; e < c_.domains.size(); ++e)
      if (c_.domains[e] == name) return static_cast<int32_t>(e);
    throw IndexError(::moa::detail::cat("MoAModel: unknown domain '", name, "' (known: ", c_.domains, ")"));
  }

  // Router logits (B, E) of layer l from that layer's input x (B, T, C).
  Tensor router_logits(int64_t l, const Tensor& x, const Tensor& prompt_mask) const {
    return router_logits(l, x, prompt_mask,
                         c_.pooling == Pooling::mean ? pooling_weights(prompt_mask, x.dtype(), x.device()) : Tensor());
  }

  // Teacher-forced forward: sequence b through expert experts[b] in every layer. Returns the logits
  // (B, T, V) and fills router_logits (one (B, E) per layer).
  Tensor forward(const MoABatch& b, const std::vector<int32_t>& experts, std::vector<Tensor>* router_logits = nullptr) {
    return base_->forward_from_hidden(teacher_forced(b, experts, router_logits));
  }

  // The language-model loss of the teacher-forced forward: mean cross-entropy over b.targets, with
  // the head and the loss in one op (no (B, T, V) logits; see TransformerLM::loss_of_hidden).
  Tensor lm_loss(const MoABatch& b, const std::vector<int32_t>& experts, std::vector<Tensor>* router_logits = nullptr) {
    return base_->loss_of_hidden(teacher_forced(b, experts, router_logits), b.targets);
  }

  // Stage-2 loss: L_LM + eta * mean over layers of CE(router_l, domain). Returns {total, lm, cls}.
  std::vector<Tensor> loss(const MoABatch& b) {
    MOA_CHECK(b.domain.size() == static_cast<std::size_t>(b.ids.size(0)), ValueError,
              "MoAModel::loss: expected a domain label per sequence");
    std::vector<Tensor> rl;
    const Tensor lm = lm_loss(b, b.domain, c_.eta > 0 ? &rl : nullptr);
    if (c_.eta <= 0) return {lm, lm, Tensor()};
    // The mean over layers of each layer's mean over the batch is one mean over the layers' rows:
    // one cross-entropy over the layers' logits joined (L * B, E), against the labels repeated L
    // times. Host labels: cross_entropy checks them on the host (device ones would be read back).
    std::vector<int32_t> labels;
    for (std::size_t l = 0; l < rl.size(); ++l) labels.insert(labels.end(), b.domain.begin(), b.domain.end());
    const Tensor cls = cross_entropy(concat(rl, 0), Tensor::from_vector(labels, {static_cast<int64_t>(labels.size())}));
    return {lm + scale(cls, c_.eta), lm, cls};
  }

  // MoE-LoRA (the paper's ablation): token-level top-k routing over the same experts, no domain
  // labels. Each layer's router scores every token (RMS-normalised hidden state -> E logits,
  // softmax); the token goes through its top_k experts with the renormalised probabilities as
  // weights. *balance gets the Switch-Transformer load-balancing loss averaged over layers:
  // E * sum_e f_e P_e, f_e the fraction of tokens whose first choice is e, P_e the mean probability.
  Tensor forward_token_topk(const Tensor& ids, Tensor* balance = nullptr) {
    const int64_t L = base_->config().n_layers;
    auto aux = std::make_shared<Tensor>();
    base_->block_hook = token_hook(balance ? aux : nullptr);
    Tensor logits;
    try {
      logits = base_->forward(ids);
    } catch (...) {
      base_->block_hook = nullptr;
      throw;
    }
    base_->block_hook = nullptr;
    if (balance) *balance = scale(*aux, 1.0 / static_cast<double>(L));
    return logits;
  }

  // MoE-LoRA inference: from now on every forward of the base (e.g. eval::generate with its KV
  // cache, one new token per step) routes each token to its top_k experts by the layer's router,
  // until the next forward / route / use_experts call.
  void use_token_routing() { base_->block_hook = token_hook(nullptr); }

  // Unknown domains: each layer uses its own router's choice while the prompt runs; then the last
  // router (or the vote of all) picks one expert per sequence. Also returns every layer's choice.
  std::vector<int32_t> route(const MoABatch& b, std::vector<std::vector<int32_t>>* per_layer = nullptr) {
    NoGradGuard no_grad;
    const int64_t L = base_->config().n_layers, Bn = b.ids.size(0);
    routing_->mode = RoutingMode::sequence;
    routing_->seq_expert.assign(static_cast<std::size_t>(L), std::vector<int32_t>(static_cast<std::size_t>(Bn), 0));
    std::vector<std::vector<int32_t>> choice(static_cast<std::size_t>(L));
    const Tensor mask = prompt_mask_of(b), weights = router_weights_of(mask);
    base_->block_hook = [&](int64_t l, const Tensor& x) {
      const Tensor lg = router_logits(l, x, mask, weights).to(Device::cpu()).contiguous();
      const float* p = lg.data<float>();
      auto& ch = choice[static_cast<std::size_t>(l)];
      for (int64_t i = 0; i < Bn; ++i)
        ch.push_back(static_cast<int32_t>(std::max_element(p + i * num_experts(), p + (i + 1) * num_experts()) - (p + i * num_experts())));
      routing_->seq_expert[static_cast<std::size_t>(l)] = ch;
    };
    {
      struct Restore {  // the hook refers to this call's locals: removed, and the mode restored, however it ends
        nn::TransformerLM& m;
        bool was = m.is_training();
        ~Restore() {
          m.block_hook = nullptr;
          m.train(was);
        }
      } restore{*base_};
      base_->eval();
      (void)base_->hidden(b.ids);
    }
    std::vector<int32_t> pick(static_cast<std::size_t>(Bn));
    for (int64_t i = 0; i < Bn; ++i) {
      if (c_.selection == Selection::last_router) {
        pick[i] = choice.back()[i];
      } else {
        std::vector<int64_t> votes(static_cast<std::size_t>(num_experts()), 0);
        for (const auto& ch : choice) ++votes[ch[i]];  // ties: the lower index
        pick[i] = static_cast<int32_t>(std::max_element(votes.begin(), votes.end()) - votes.begin());
      }
    }
    if (per_layer) *per_layer = choice;
    return pick;
  }

  // Sets every adapter to use expert[b] for sequence b in every layer (for generation and
  // evaluation after route(), e.g. eval::generate(model.base(), prompts) with a KV cache). The
  // state holds until the next forward/route call.
  void use_experts(const std::vector<int32_t>& experts) {
    for (int32_t e : experts)
      MOA_CHECK(e >= 0 && e < num_experts(), IndexError, "MoAModel: expert index ", e, " is outside [0, ",
                num_experts(), ")");
    base_->block_hook = nullptr;
    routing_->mode = RoutingMode::sequence;
    routing_->seq_expert.assign(static_cast<std::size_t>(base_->config().n_layers), experts);
  }

  // A new domain's expert (fresh LoRA init) and a new router row per layer; other experts untouched.
  void add_expert(const std::string& domain) {
    for (const auto& d : c_.domains)
      MOA_CHECK(d != domain, ValueError, "MoAModel::add_expert: domain '", domain, "' exists already");
    c_.domains.push_back(domain);
    for (auto& ad : adapters_) {
      ad->add_expert(gen_);
      ad->to(base_->device());
    }
    for (auto& r : routers_) {
      NoGradGuard ng;
      Tensor fresh = Tensor::randn({1, base_->config().dim}, gen_, DType::f32, 0.0, 0.02).to(r->weight.device());
      rebind(r->weight, concat({r->weight.detach(), fresh}, 0));
    }
  }

  void remove_expert(const std::string& domain) {
    const int32_t e = domain_index(domain);
    MOA_CHECK(num_experts() > 1, ValueError, "MoAModel::remove_expert: cannot remove the last expert");
    c_.domains.erase(c_.domains.begin() + e);
    for (auto& ad : adapters_) ad->remove_expert(static_cast<std::size_t>(e));
    for (auto& r : routers_) {
      NoGradGuard ng;
      std::vector<Tensor> keep;
      if (e > 0) keep.push_back(r->weight.detach().narrow(0, 0, e));
      if (e + 1 < r->weight.size(0)) keep.push_back(r->weight.detach().narrow(0, e + 1, r->weight.size(0) - e - 1));
      rebind(r->weight, concat(keep, 0));
    }
  }

  // The parameters of expert e across all adapted linears (to train or freeze one expert).
  std::vector<Tensor> expert_parameters(int64_t e) const {
    std::vector<Tensor> out;
    for (const auto& ad : adapters_) {
      out.push_back((*ad->experts())[static_cast<std::size_t>(e)]->lora_A);
      out.push_back((*ad->experts())[static_cast<std::size_t>(e)]->lora_B);
    }
    return out;
  }
  std::vector<Tensor> router_parameters() const {
    std::vector<Tensor> out;
    for (const auto& r : routers_) out.push_back(r->weight);
    return out;
  }

 private:
  // The final hidden states (B, T, C) of the teacher-forced forward (see forward()).
  Tensor teacher_forced(const MoABatch& b, const std::vector<int32_t>& experts, std::vector<Tensor>* router_logits) {
    check_batch(b, experts);
    const int64_t L = base_->config().n_layers;
    routing_->mode = RoutingMode::sequence;
    routing_->seq_expert.assign(static_cast<std::size_t>(L), experts);
    base_->block_hook = nullptr;
    if (router_logits) {
      router_logits->clear();
      // The mask and its pooling weights once for all the layers' routers.
      const Tensor mask = prompt_mask_of(b), weights = router_weights_of(mask);
      base_->block_hook = [&, mask, weights](int64_t l, const Tensor& x) {
        router_logits->push_back(this->router_logits(l, x, mask, weights));
      };
    }
    struct Unhook {  // the hook refers to this call's locals: removed however the forward ends
      nn::TransformerLM& m;
      ~Unhook() { m.block_hook = nullptr; }
    } unhook{*base_};
    return base_->hidden(b.ids);
  }

  // The block hook of token-level top-k routing; adds each layer's balance term to *aux when given.
  std::function<void(int64_t, const Tensor&)> token_hook(std::shared_ptr<Tensor> aux) {
    const int64_t L = base_->config().n_layers, E = num_experts();
    const int64_t k = std::min<int64_t>(c_.top_k, E);
    MOA_CHECK(k >= 1, ValueError, "MoAModel: expected top_k >= 1, got ", c_.top_k);
    routing_->mode = RoutingMode::token_topk;
    routing_->rows.assign(static_cast<std::size_t>(L), {});
    routing_->experts.assign(static_cast<std::size_t>(L), {});
    routing_->weights.assign(static_cast<std::size_t>(L), Tensor());
    return [this, aux, E, k](int64_t l, const Tensor& x) {
      const int64_t N = x.numel() / x.size(-1);
      const Tensor h = x.reshape({N, x.size(-1)});
      const Tensor hn = h / sqrt(shift(mean(h * h, {1}, true), 1e-6));
      const Tensor probs = softmax(linear(hn, routers_[static_cast<std::size_t>(l)]->weight), -1);  // (N, E)
      const Tensor pc = probs.to(Device::cpu()).contiguous();
      const float* p = pc.data<float>();
      std::vector<int32_t> idx(static_cast<std::size_t>(N * k)), rows(idx.size());
      std::vector<float> first(static_cast<std::size_t>(E), 0.0f);
      std::vector<int32_t> order(static_cast<std::size_t>(E));
      for (int64_t n = 0; n < N; ++n) {
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
          return p[n * E + a] > p[n * E + b] || (p[n * E + a] == p[n * E + b] && a < b);
        });
        for (int64_t j = 0; j < k; ++j) {
          idx[static_cast<std::size_t>(n * k + j)] = order[static_cast<std::size_t>(j)];
          rows[static_cast<std::size_t>(n * k + j)] = static_cast<int32_t>(n);
        }
        first[static_cast<std::size_t>(order[0])] += 1.0f / static_cast<float>(N);
      }
      Tensor w = gather(probs, 1, Tensor::from_vector(idx, {N, k}));  // (N, k)
      w = w / sum(w, {1}, true);
      routing_->mode = RoutingMode::token_topk;
      routing_->rows[static_cast<std::size_t>(l)] = rows;
      routing_->experts[static_cast<std::size_t>(l)] = idx;
      routing_->weights[static_cast<std::size_t>(l)] = w.reshape({N * k});
      if (aux) {
        const Tensor term = scale(sum(mean(probs, {0}) * Tensor::from_vector(first).to(probs.device())), static_cast<double>(E));
        *aux = aux->defined() ? *aux + term : term;
      }
    };
  }

  // The batch's prompt mask (B, T) on the host (all ones when it has none).
  static Tensor prompt_mask_of(const MoABatch& b) {
    return b.prompt_mask.defined() ? b.prompt_mask.to(Device::cpu()) : Tensor::ones({b.ids.size(0), b.ids.size(1)});
  }
  // The mean-pooling weights of the routers (or none with last-token pooling), in the routers'
  // dtype on their device.
  Tensor router_weights_of(const Tensor& mask) const {
    if (c_.pooling != Pooling::mean) return Tensor();
    const Tensor& w = routers_.front()->weight;
    return pooling_weights(mask, w.dtype(), w.device());
  }

  // Mean-pooling weights (B, 1, T) of dtype t on device d: each row of the mask over its sum (a row
  // without prompt tokens gives 0 / 0, NaN, as the mean over no tokens does).
  static Tensor pooling_weights(const Tensor& prompt_mask, DType t, Device d) {
    const Tensor m = prompt_mask.to(Device::cpu()).contiguous();
    const int64_t B = m.size(0), T = m.size(1);
    std::vector<double> w = m.to_vector<double>();  // in double; the product's dtype rounds it once
    for (int64_t b = 0; b < B; ++b) {
      double count = 0.0;
      for (int64_t t = 0; t < T; ++t) count += w[static_cast<std::size_t>(b * T + t)];
      for (int64_t t = 0; t < T; ++t) w[static_cast<std::size_t>(b * T + t)] /= count;
    }
    return Tensor::from_vector(w, {B, 1, T}).to(t).to(d);
  }

  // Router logits from the host mask and, with mean pooling, its weights (pooling_weights). Mean
  // pooling is one batched product (B, 1, T) x (B, T, C) and the RMS normalisation one rms_norm: a
  // few launches per layer on a GPU instead of a dozen elementwise ones.
  Tensor router_logits(int64_t l, const Tensor& x, const Tensor& prompt_mask, const Tensor& weights) const {
    const Tensor& w = routers_[static_cast<std::size_t>(l)]->weight;
    Tensor pooled;
    if (c_.pooling == Pooling::mean) {
      pooled = matmul(weights.to(x.device()).to(x.dtype()), x).squeeze(1);  // (B, C); no copy when already so
    } else {
      // the last prompt token of each row
      const auto mv = prompt_mask.to(Device::cpu()).to(DType::f32).to_vector<float>();
      const int64_t Bn = x.size(0), T = x.size(1);
      std::vector<int32_t> last(static_cast<std::size_t>(Bn), 0);
      for (int64_t b = 0; b < Bn; ++b)
        for (int64_t t = 0; t < T; ++t)
          if (mv[static_cast<std::size_t>(b * T + t)] > 0) last[b] = static_cast<int32_t>(t);
      std::vector<int32_t> idx;
      for (int64_t b = 0; b < Bn; ++b)
        for (int64_t c = 0; c < x.size(2); ++c) idx.push_back(last[b]);
      pooled = gather(x, 1, Tensor::from_vector(idx, {Bn, 1, x.size(2)})).squeeze(1);
    }
    // (choice) RMS-normalise the pooled vector: layer inputs differ in scale by orders of magnitude
    // (the first layer sees raw embeddings), and the router should not depend on it.
    pooled = rms_norm(pooled, Tensor::ones({x.size(2)}, x.dtype(), x.device()), 1e-6);
    return linear(pooled, w);  // (B, E)
  }

  void check_batch(const MoABatch& b, const std::vector<int32_t>& experts) const {
    MOA_CHECK(b.ids.defined() && b.ids.dim() == 2, ShapeError, "MoAModel: expected ids (B, T)");
    MOA_CHECK(static_cast<int64_t>(experts.size()) == b.ids.size(0), ShapeError, "MoAModel: expected ", b.ids.size(0),
              " expert indices (one per sequence), got ", experts.size());
    for (std::size_t i = 0; i < experts.size(); ++i)
      MOA_CHECK(experts[i] >= 0 && experts[i] < num_experts(), IndexError, "MoAModel: expert index ", experts[i],
                " of sequence ", i, " is outside [0, ", num_experts(), ")");
    if (b.prompt_mask.defined())
      MOA_CHECK(b.prompt_mask.shape() == b.ids.shape() && b.prompt_mask.dtype() == DType::f32, ShapeError,
                "MoAModel: expected a f32 prompt_mask of shape ", shape_str(b.ids.shape()), ", got ",
                shape_str(b.prompt_mask.shape()));
  }

  // (path within the block, linear) for every linear of a block.
  static std::vector<std::pair<std::string, std::shared_ptr<nn::Linear>>> linears_of(nn::Block& blk) {
    std::vector<std::pair<std::string, std::shared_ptr<nn::Linear>>> out;
    auto add = [&](const std::string& p, const std::shared_ptr<nn::Linear>& l) {
      if (l) out.emplace_back(p, l);
    };
    add("attn.q_proj", blk.attn->q_proj);
    add("attn.k_proj", blk.attn->k_proj);
    add("attn.v_proj", blk.attn->v_proj);
    add("attn.o_proj", blk.attn->o_proj);
    add("mlp.fc", blk.mlp->fc);
    add("mlp.proj", blk.mlp->proj);
    add("mlp.gate_proj", blk.mlp->gate_proj);
    add("mlp.up_proj", blk.mlp->up_proj);
    add("mlp.down_proj", blk.mlp->down_proj);
    return out;
  }

  // Points the parameter handle at new (row-grown or row-cut) values in place, so that the module
  // keeps its handle; an optimizer built earlier holds state of the old shape: build a new one.
  static void rebind(Tensor& param, const Tensor& values) {
    ::moa::detail::TensorImpl& impl = param.impl();
    impl.shape = values.shape();
    impl.strides = values.strides();
    impl.storage = values.storage();
    impl.offset = values.offset();
    param.zero_grad();
  }

  std::shared_ptr<nn::TransformerLM> base_;
  MoAConfig c_;
  Generator gen_;
  std::shared_ptr<RoutingState> routing_;
  std::vector<std::shared_ptr<MoAAdapter>> adapters_;
  std::vector<std::shared_ptr<nn::Linear>> linears_;  // where adapters_[i] sits
  std::vector<std::string> adapter_paths_;
  std::vector<std::shared_ptr<Router>> routers_;
};

}  // namespace moa::mixture
