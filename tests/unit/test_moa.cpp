// Mixture-of-LoRAs: routing, teacher forcing, the grouped computation against per-sample runs,
// a small real two-domain run (stage 1, stage 2, routing accuracy, against a mixed LoRA), adding
// and removing an expert, bad input.
#include <doctest/doctest.h>

#include "moa/eval/generate.hpp"
#include "moa/lora/lora.hpp"
#include "moa/mixture/moa.hpp"
#include "moa/mixture/moa_io.hpp"
#include "moa/optim/adamw.hpp"
#include "test_util.hpp"

using namespace moa;
using mixture::MoABatch;
using mixture::MoAModel;

namespace {

constexpr int32_t kV = 24;

nn::TransformerConfig tiny() {
  nn::TransformerConfig c = nn::TransformerConfig::llama();
  c.vocab_size = kV;
  c.max_seq_len = 16;
  c.dim = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.hidden_dim = 64;
  return c;
}

// Tokens 0..15 are shared; a sequence starts with its domain's marker (16 + d), then follows the
// domain's rule: d0: next = t + 1, d1: next = 3 t + 2, d2 (the base's pretraining): t + 5 (mod 16).
// The rules conflict on the same tokens, as domains do. 6 prompt tokens, 6 answer tokens.
int32_t rule(int d, int32_t t) { return d == 0 ? (t + 1) % 16 : d == 1 ? (3 * t + 2) % 16 : (t + 5) % 16; }

MoABatch make_batch(const std::vector<int>& domains, Generator& g) {
  const int64_t Bn = static_cast<int64_t>(domains.size()), T = 11;
  std::vector<int32_t> ids, tg;
  std::vector<float> pm;
  MoABatch b;
  for (int d : domains) {
    std::vector<int32_t> seq{16 + d, static_cast<int32_t>(g.next_below(16))};
    while (seq.size() < 12) seq.push_back(rule(d, seq.back()));
    for (int64_t t = 0; t < T; ++t) {
      ids.push_back(seq[t]);
      tg.push_back(t >= 5 ? seq[t + 1] : -100);  // loss on the answer (tokens 6..11)
      pm.push_back(t < 6 ? 1.0f : 0.0f);
    }
    b.domain.push_back(d);
  }
  b.ids = Tensor::from_vector(ids, {Bn, T});
  b.targets = Tensor::from_vector(tg, {Bn, T});
  b.prompt_mask = Tensor::from_vector(pm, {Bn, T});
  return b;
}

mixture::MoAConfig moa_config(std::vector<std::string> domains, int64_t rank = 8) {
  return {.domains = std::move(domains), .rank = rank, .alpha = 2.0 * static_cast<double>(rank), .target_modules = "proj|fc"};
}

double answer_loss(MoAModel& m, const MoABatch& b, const std::vector<int32_t>& experts) {
  NoGradGuard ng;
  return cross_entropy(m.forward(b, experts), b.targets).item<double>();
}

}  // namespace

TEST_CASE("MoA: a mixed batch through grouped experts equals each sample run alone; gradients too") {
  auto base = std::make_shared<nn::TransformerLM>(tiny(), 1);
  MoAModel m(base, moa_config({"a", "b", "c"}), 3);
  // Give B non-zero values so every expert contributes.
  Generator g(5);
  for (auto& ad : m.adapters())
    for (auto& e : *ad->experts()) {
      NoGradGuard ng;
      e->lora_B.detach().copy_(Tensor::randn(e->lora_B.shape(), g, DType::f32, 0.0, 0.1));
    }
  const MoABatch b = make_batch({0, 1, 1, 0}, g);
  const std::vector<int32_t> experts{2, 0, 1, 2};
  const Tensor together = m.forward(b, experts);
  sum(together).backward();
  std::vector<std::vector<float>> grads_together;
  for (auto& p : m.trainable_parameters()) grads_together.push_back(p.grad().defined() ? p.grad().to_vector<float>() : std::vector<float>());
  m.zero_grad();
  for (int64_t i = 0; i < 4; ++i) {
    MoABatch one{b.ids.narrow(0, i, 1).contiguous(), b.targets.narrow(0, i, 1).contiguous(),
                 b.prompt_mask.narrow(0, i, 1).contiguous(), {b.domain[i]}};
    const Tensor alone = m.forward(one, {experts[i]});
    CHECK(test::max_abs_diff(alone, together.narrow(0, i, 1)) < 1e-5);
    sum(alone).backward();  // accumulates over the four runs
  }
  const auto ps = m.trainable_parameters();
  for (std::size_t k = 0; k < ps.size(); ++k) {
    if (grads_together[k].empty()) continue;
    REQUIRE(ps[k].grad().defined());
    CHECK(test::max_abs_diff(std::vector<double>(grads_together[k].begin(), grads_together[k].end()),
                             ps[k].grad().to_vector<double>()) < 1e-4);
  }
}

TEST_CASE("MoA: the frozen base gets no gradient; routers and experts do; the routing loss is checked by gradcheck") {
  auto base = std::make_shared<nn::TransformerLM>(tiny(), 2);
  MoAModel m(base, moa_config({"a", "b"}), 4);
  Generator g(6);
  const MoABatch b = make_batch({0, 1}, g);
  auto losses = m.loss(b);
  losses[0].backward();
  for (auto& [n, t] : base->named_parameters()) {
    if (n.find(".moa.") != std::string::npos) continue;
    INFO(n);
    CHECK_FALSE(t.grad().defined());
  }
  for (auto& r : m.routers()) CHECK(r->weight.grad().defined());
  // The router loss alone, in double: CE(W pooled(x), label) through mean pooling.
  Tensor x = Tensor::randn({3, 4, 5}, g, DType::f64).set_requires_grad();
  Tensor w = Tensor::randn({2, 5}, g, DType::f64).set_requires_grad();
  Tensor mask = Tensor::from_vector(std::vector<double>{1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0}, {3, 4});
  Tensor labels = Tensor::from_vector(std::vector<int32_t>{1, 0, 1});
  const auto r = autograd::gradcheck(
      [&](const std::vector<Tensor>& in) {
        const Tensor mm = mask.unsqueeze(2);
        const Tensor pooled = sum(in[0] * mm, {1}) / sum(mm, {1});
        return cross_entropy(linear(pooled, in[1]), labels);
      },
      {x, w});
  INFO(r.message);
  CHECK(r.ok);
}

TEST_CASE("MoA: router logits are linear(RMS-normalised masked mean of the layer input): values and gradients") {
  // router_logits pools with one batched product and normalises with rms_norm; the definition,
  // written with elementwise ops, gives the same logits and the same gradients of x and the router.
  auto base = std::make_shared<nn::TransformerLM>(tiny(), 2);
  MoAModel m(base, moa_config({"a", "b", "c"}), 4);
  Generator g(8);
  const int64_t C = tiny().dim;
  const Tensor x0 = Tensor::randn({3, 5, C}, g, DType::f32, 0.0, 3.0);
  const Tensor mask = Tensor::from_vector(std::vector<float>{1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0}, {3, 5});
  const Tensor wg = Tensor::randn({3, 3}, g);
  Tensor& w = m.routers()[1]->weight;
  Tensor x = x0.clone().set_requires_grad();
  const Tensor got = m.router_logits(1, x, mask);
  sum(got * wg).backward();
  const Tensor gx = x.grad().clone(), gw = w.grad().clone();
  w.zero_grad();
  Tensor xr = x0.clone().set_requires_grad();
  const Tensor mm = mask.unsqueeze(2);
  Tensor pooled = sum(xr * mm, {1}) / sum(mm, {1});
  pooled = pooled / sqrt(shift(mean(pooled * pooled, {1}, true), 1e-6));
  const Tensor want = linear(pooled, w);
  sum(want * wg).backward();
  CHECK(got.shape() == Shape{3, 3});
  CHECK(test::max_abs_diff(got, want) < 1e-5);
  CHECK(test::max_abs_diff(gx, xr.grad()) < 1e-5);
  CHECK(test::max_abs_diff(gw, w.grad()) < 1e-5);
  // Last-token pooling: the row of each sequence's last prompt token (1, 4, 0 here).
  mixture::MoAConfig last_cfg = moa_config({"a", "b", "c"});
  last_cfg.pooling = mixture::Pooling::last;
  MoAModel ml(std::make_shared<nn::TransformerLM>(tiny(), 2), last_cfg, 4);
  const Tensor got_last = ml.router_logits(0, x0, mask);
  const Tensor rows = concat({x0.narrow(0, 0, 1).narrow(1, 1, 1), x0.narrow(0, 1, 1).narrow(1, 4, 1),
                              x0.narrow(0, 2, 1).narrow(1, 0, 1)},
                             0)
                          .reshape({3, C});
  const Tensor want_last = linear(rows / sqrt(shift(mean(rows * rows, {1}, true), 1e-6)), ml.routers()[0]->weight);
  CHECK(test::max_abs_diff(got_last, want_last) < 1e-5);
}

TEST_CASE("MoA: two synthetic domains - stage 1, stage 2, routing above 95%, lower loss than a mixed LoRA") {
  const int steps1 = 100, steps2 = 300;
  // The base: pretrained (full weights) on a third rule, then frozen; both systems share it.
  auto base_moa = std::make_shared<nn::TransformerLM>(tiny(), 11);
  Generator data(99);
  {
    optim::AdamW opt(base_moa->trainable_parameters(), {.lr = 1e-2, .weight_decay = 0.0});
    for (int s = 0; s < 150; ++s) {
      const MoABatch b = make_batch(std::vector<int>(8, 2), data);
      Tensor l = cross_entropy(base_moa->forward(b.ids), b.targets);
      opt.zero_grad();
      l.backward();
      opt.step();
    }
  }
  auto base_mix = std::make_shared<nn::TransformerLM>(tiny(), 11);
  {
    std::map<std::string, Tensor> sd;
    for (auto& [n, t] : base_moa->state_dict()) sd[n] = t;
    base_mix->load_state_dict(sd);
  }
  MoAModel moa(base_moa, moa_config({"plus1", "times3"}, 2), 21);
  MoAModel mixed(base_mix, moa_config({"mixed"}, 2), 21);
  // Stage 1: each expert on its own domain (teacher forcing, no routing loss).
  for (int d = 0; d < 2; ++d) {
    optim::AdamW opt(moa.expert_parameters(d), {.lr = 1e-2, .weight_decay = 0.0});
    for (int s = 0; s < steps1; ++s) {
      const MoABatch b = make_batch(std::vector<int>(8, d), data);
      Tensor l = cross_entropy(moa.forward(b, std::vector<int32_t>(8, d)), b.targets);
      opt.zero_grad();
      l.backward();
      opt.step();
    }
  }
  // The mixed LoRA gets the same budget: as many examples, domains mixed.
  {
    optim::AdamW opt(mixed.expert_parameters(0), {.lr = 1e-2, .weight_decay = 0.0});
    for (int s = 0; s < 2 * steps1 + steps2; ++s) {
      const MoABatch b = make_batch({0, 1, 0, 1, 0, 1, 0, 1}, data);
      Tensor l = cross_entropy(mixed.forward(b, std::vector<int32_t>(8, 0)), b.targets);
      opt.zero_grad();
      l.backward();
      opt.step();
    }
  }
  // Stage 2: experts and routers jointly on domain-balanced batches, L = L_LM + eta L_cls.
  {
    std::vector<Tensor> experts = moa.expert_parameters(0), e1 = moa.expert_parameters(1);
    experts.insert(experts.end(), e1.begin(), e1.end());
    optim::AdamW opt(experts, {.lr = 1e-2, .weight_decay = 0.0});
    optim::AdamW ropt(moa.router_parameters(), {.lr = 3e-2, .weight_decay = 0.0});
    for (int s = 0; s < steps2; ++s) {
      const MoABatch b = make_batch({0, 1, 0, 1, 0, 1, 0, 1}, data);
      auto ls = moa.loss(b);
      opt.zero_grad();
      ropt.zero_grad();
      ls[0].backward();
      opt.step();
      ropt.step();
    }
  }
  // Held-out: 200 sequences per domain, domains unknown to the model.
  Generator held(12345);
  int correct = 0, total = 0;
  double moa_loss = 0, mixed_loss = 0;
  for (int rep = 0; rep < 25; ++rep) {
    const MoABatch b = make_batch({0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1}, held);
    const auto pick = moa.route(b);
    for (std::size_t i = 0; i < pick.size(); ++i) correct += pick[i] == b.domain[i];
    total += static_cast<int>(pick.size());
    moa_loss += answer_loss(moa, b, pick);
    mixed_loss += answer_loss(mixed, b, std::vector<int32_t>(16, 0));
  }
  const double acc = static_cast<double>(correct) / total;
  MESSAGE("two-domain run: routing accuracy " << acc << ", held-out answer loss MoA " << moa_loss / 25
                                              << " vs mixed LoRA " << mixed_loss / 25);
  CHECK(acc > 0.95);
  CHECK(moa_loss < mixed_loss);
}

TEST_CASE("MoA: adding a domain trains the new expert and leaves the others bitwise; removing one") {
  auto base = std::make_shared<nn::TransformerLM>(tiny(), 3);
  MoAModel m(base, moa_config({"a", "b"}), 5);
  Generator g(8);
  std::vector<std::vector<float>> before;
  for (int e = 0; e < 2; ++e)
    for (auto& p : m.expert_parameters(e)) before.push_back(p.to_vector<float>());
  m.add_expert("c");
  CHECK(m.num_experts() == 3);
  CHECK(m.routers()[0]->weight.shape() == Shape{3, 32});
  for (int e = 0; e < 2; ++e)
    for (auto& p : m.expert_parameters(e)) p.set_requires_grad(false);
  std::vector<Tensor> train = m.expert_parameters(2);
  for (auto& r : m.router_parameters()) train.push_back(r);
  optim::AdamW opt(train, {.lr = 1e-2});
  for (int s = 0; s < 5; ++s) {
    MoABatch b = make_batch({0, 1, 1}, g);
    b.domain = {2, 2, 0};
    auto ls = m.loss(b);
    opt.zero_grad();
    ls[0].backward();
    opt.step();
  }
  std::size_t k = 0;
  for (int e = 0; e < 2; ++e)
    for (auto& p : m.expert_parameters(e)) CHECK(p.to_vector<float>() == before[k++]);
  double moved = 0;
  for (auto& p : m.expert_parameters(2)) moved += std::abs(p.to_vector<double>()[0]) + sum(p * p).item<double>();
  CHECK(moved > 0);
  m.remove_expert("a");
  CHECK(m.config().domains == std::vector<std::string>{"b", "c"});
  CHECK(m.routers()[1]->weight.shape() == Shape{2, 32});
  CHECK(m.expert_parameters(0)[0].to_vector<float>() == before[static_cast<std::size_t>(m.expert_parameters(0).size())]);
}

TEST_CASE("MoA: bad input") {
  auto base = std::make_shared<nn::TransformerLM>(tiny(), 3);
  test::check_throws_with<ValueError>([&] { MoAModel(base, moa_config({})); }, {"at least one expert", "zero"});
  MoAModel m(base, moa_config({"a", "b"}), 5);
  Generator g(1);
  const MoABatch b = make_batch({0, 1}, g);
  test::check_throws_with<IndexError>([&] { (void)m.forward(b, {0, 2}); }, {"expert index 2", "[0, 2)"});
  test::check_throws_with<ShapeError>([&] { (void)m.forward(b, {0}); }, {"2 expert indices", "got 1"});
  test::check_throws_with<IndexError>([&] { (void)m.domain_index("law"); }, {"unknown domain 'law'"});
  MoABatch bad = b;
  bad.domain = {0, 5};
  test::check_throws_with<IndexError>([&] { (void)m.loss(bad); }, {"expert index 5"});
  test::check_throws_with<ValueError>([&] { m.add_expert("a"); }, {"exists already"});
  auto base2 = std::make_shared<nn::TransformerLM>(tiny(), 3);
  test::check_throws_with<ValueError>(
      [&] {
        auto c = moa_config({"a"});
        c.target_modules = "nothing_like_this";
        MoAModel(base2, c);
      },
      {"matches no linear"});
}

TEST_CASE("MoA: routing forced to one expert gives exactly that single LoRA's output and gradients") {
  auto base = std::make_shared<nn::TransformerLM>(tiny(), 4);
  auto twin = std::make_shared<nn::TransformerLM>(tiny(), 4);  // same seed: the same base weights
  MoAModel m(base, moa_config({"a", "b"}, 4), 6);
  Generator g(7);
  for (auto& ad : m.adapters())
    for (auto& e : *ad->experts()) {
      NoGradGuard ng;
      e->lora_B.detach().copy_(Tensor::randn(e->lora_B.shape(), g, DType::f32, 0.0, 0.1));
    }
  // The single LoRA "b" on the twin, at the same sites, with expert 1's weights.
  lora::attach_lora(*twin, "b", {.rank = 4, .alpha = 8, .target_modules = "attn.q_proj|attn.k_proj|attn.v_proj|attn.o_proj|mlp.gate_proj|mlp.up_proj|mlp.down_proj"});
  const auto sites = lora::lora_sites(*twin);
  REQUIRE(sites.size() == m.adapters().size());
  for (std::size_t i = 0; i < sites.size(); ++i) {
    NoGradGuard ng;
    auto one = sites[i].lora->get("b");
    one->A.detach().copy_((*m.adapters()[i]->experts())[1]->lora_A);
    one->B.detach().copy_((*m.adapters()[i]->experts())[1]->lora_B);
  }
  const MoABatch b = make_batch({0, 1, 1}, g);
  const Tensor y1 = m.forward(b, {1, 1, 1});
  const Tensor y2 = twin->forward(b.ids);
  CHECK(test::max_abs_diff(y1, y2) < 1e-5);
  cross_entropy(y1, b.targets).backward();
  cross_entropy(y2, b.targets).backward();
  for (std::size_t i = 0; i < sites.size(); ++i) {
    auto one = sites[i].lora->get("b");
    const auto& ex = (*m.adapters()[i]->experts());
    CHECK(test::max_abs_diff(ex[1]->lora_A.grad(), one->A.grad()) < 1e-5);
    CHECK(test::max_abs_diff(ex[1]->lora_B.grad(), one->B.grad()) < 1e-5);
    CHECK_FALSE(ex[0]->lora_A.grad().defined());  // the other expert saw no rows
  }
}

TEST_CASE("MoA: generation with the KV cache, a batch whose sequences use different experts") {
  auto base = std::make_shared<nn::TransformerLM>(tiny(), 4);
  MoAModel m(base, moa_config({"a", "b"}, 4), 6);
  Generator g(9);
  for (auto& ad : m.adapters())
    for (auto& e : *ad->experts()) {
      NoGradGuard ng;
      e->lora_B.detach().copy_(Tensor::randn(e->lora_B.shape(), g, DType::f32, 0.0, 0.5));
    }
  const std::vector<std::vector<int32_t>> prompts{{16, 3, 4, 5}, {17, 2, 8}};
  m.use_experts({0, 1});
  const auto both = eval::generate(m.base(), prompts, {.max_new_tokens = 6});
  for (int i = 0; i < 2; ++i) {
    m.use_experts({i});
    CHECK(eval::generate(m.base(), {prompts[i]}, {.max_new_tokens = 6})[0] == both[i]);
  }
  // Each expert changes what is generated (the experts are different).
  m.use_experts({1});
  const auto other = eval::generate(m.base(), {prompts[0]}, {.max_new_tokens = 6});
  CHECK(other[0] != both[0]);
  test::check_throws_with<IndexError>([&] { m.use_experts({3}); }, {"expert index 3"});
}

TEST_CASE("MoE-LoRA (token-level top-k): the balance loss follows its formula, training lowers the loss") {
  nn::TransformerConfig c1 = tiny();
  c1.n_layers = 1;  // one router: the balance loss of the model is that router's
  auto base = std::make_shared<nn::TransformerLM>(c1, 5);
  auto cfg = moa_config({"e0", "e1", "e2"}, 4);
  cfg.top_k = 2;
  MoAModel m(base, cfg, 8);
  Generator g(10);
  const MoABatch b = make_batch({0, 1, 0, 1}, g);
  Tensor bal;
  const Tensor logits = m.forward_token_topk(b.ids, &bal);
  CHECK(logits.shape() == Shape{4, 11, kV});
  {  // E * sum_e f_e P_e from the router's probabilities, recomputed here.
    NoGradGuard ng;
    const Tensor x = base->tok_emb->forward(b.ids).reshape({44, 32});
    const Tensor probs = softmax(linear(x / sqrt(shift(mean(x * x, {1}, true), 1e-6)), m.routers()[0]->weight), -1);
    const auto pv = probs.to_vector<double>();
    std::vector<double> f(3, 0), P(3, 0);
    for (int n = 0; n < 44; ++n) {
      int best = 0;
      for (int e = 0; e < 3; ++e) {
        P[e] += pv[n * 3 + e] / 44;
        if (pv[n * 3 + e] > pv[n * 3 + best]) best = e;
      }
      f[best] += 1.0 / 44;
    }
    double expected = 0;
    for (int e = 0; e < 3; ++e) expected += 3 * f[e] * P[e];
    CHECK(bal.item<double>() == doctest::Approx(expected).epsilon(1e-5));
  }
  // Training the experts and routers (no domain labels) lowers the LM loss; the gates get gradients.
  optim::AdamW opt(m.trainable_parameters(), {.lr = 1e-2, .weight_decay = 0.0});
  double first = 0, last = 0;
  for (int s = 0; s < 60; ++s) {
    const MoABatch tb = make_batch({0, 1, 0, 1, 0, 1}, g);
    Tensor aux;
    Tensor loss = cross_entropy(m.forward_token_topk(tb.ids, &aux), tb.targets);
    Tensor total = loss + scale(aux, cfg.balance_weight);
    opt.zero_grad();
    total.backward();
    opt.step();
    (s == 0 ? first : last) = loss.item<double>();
  }
  CHECK(last < 0.9 * first);
  CHECK(m.routers()[0]->weight.grad().defined());

  // Generation under token routing with the KV cache equals greedy decoding by full forwards.
  const std::vector<int32_t> prompt{16, 3, 4, 5};
  m.use_token_routing();
  const auto out = eval::generate(m.base(), {prompt}, {.max_new_tokens = 5})[0];
  REQUIRE(out.size() == 5);
  std::vector<int32_t> seq = prompt;
  for (int32_t next : out) {
    NoGradGuard ng;
    const Tensor lg = m.forward_token_topk(Tensor::from_vector(seq, {1, static_cast<int64_t>(seq.size())})).contiguous();
    const float* last_row = lg.data<float>() + (static_cast<int64_t>(seq.size()) - 1) * kV;
    CHECK(static_cast<int32_t>(std::max_element(last_row, last_row + kV) - last_row) == next);
    seq.push_back(next);
  }
}

TEST_CASE("MoA save and load: config, routers and each expert as a PEFT adapter; reload gives the same model") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "moa_test_saved_moa";
  fs::remove_all(dir);
  auto base = std::make_shared<nn::TransformerLM>(tiny(), 4);
  MoAModel m(base, moa_config({"a", "b"}, 4), 6);
  Generator g(12);
  for (auto& ad : m.adapters())
    for (auto& e : *ad->experts()) {
      NoGradGuard ng;
      e->lora_B.detach().copy_(Tensor::randn(e->lora_B.shape(), g, DType::f32, 0.0, 0.3));
    }
  {
    NoGradGuard ng;
    for (auto& r : m.routers()) r->weight.detach().copy_(Tensor::randn(r->weight.shape(), g));
  }
  mixture::save_moa(m, dir, "tiny-llama");
  CHECK(fs::exists(dir / "experts" / "b" / "adapter_config.json"));
  const MoABatch b = make_batch({0, 1, 1}, g);
  std::vector<int32_t> picks_before = m.route(b);
  const Tensor before = m.forward(b, {1, 0, 1});

  auto base2 = std::make_shared<nn::TransformerLM>(tiny(), 4);
  auto loaded = mixture::load_moa(base2, dir);
  CHECK(loaded->config().domains == std::vector<std::string>{"a", "b"});
  CHECK(test::max_abs_diff(loaded->forward(b, {1, 0, 1}), before) == 0.0);
  CHECK(loaded->route(b) == picks_before);

  // Expert "b" alone, as a PEFT adapter on a plain copy of the base, equals MoA forced to "b".
  auto plain = std::make_shared<nn::TransformerLM>(tiny(), 4);
  lora::load_peft_adapter(*plain, "b", dir / "experts" / "b");
  CHECK(test::max_abs_diff(plain->forward(b.ids), m.forward(b, {1, 1, 1})) < 1e-5);

  // Saving over something that is not a saved MoA is refused; a missing directory is an IOError.
  const fs::path other = fs::temp_directory_path() / "moa_test_not_moa";
  fs::create_directories(other);
  test::check_throws_with<IOError>([&] { mixture::save_moa(m, other, "x"); }, {"not a saved MoA"});
  fs::remove_all(other);
  fs::remove_all(dir);
  test::check_throws_with<IOError>([&] { (void)mixture::load_moa(base2, dir); }, {"cannot open", "moa_config.json"});
}

TEST_CASE("MoA from stage-1 PEFT adapters trained apart; destroying an MoA leaves the base plain") {
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / "moa_test_stage1_peft";
  fs::remove_all(root);
  const std::string all = "attn.q_proj|attn.k_proj|attn.v_proj|attn.o_proj|mlp.gate_proj|mlp.up_proj|mlp.down_proj";
  Generator g(21);
  // Two single LoRAs "a" and "b" on a plain base with non-zero B, saved in PEFT's layout.
  auto lone = std::make_shared<nn::TransformerLM>(tiny(), 4);
  for (const char* name : {"a", "b"}) {
    lora::attach_lora(*lone, name, {.rank = 4, .alpha = 8, .target_modules = all}, 30);
    for (const auto& s : lora::lora_sites(*lone)) {
      NoGradGuard ng;
      auto one = s.lora->get(name);
      one->B.detach().copy_(Tensor::randn(one->B.shape(), g, DType::f32, 0.0, 0.3));
    }
    lora::save_peft_adapter(*lone, name, root / name);
  }
  const MoABatch b = make_batch({0, 1, 1}, g);
  lora::set_active_lora(*lone, "b");
  const Tensor want_b = lone->forward(b.ids);
  lora::set_active_lora(*lone, "a");
  const Tensor want_a = lone->forward(b.ids);

  auto base = std::make_shared<nn::TransformerLM>(tiny(), 4);
  const Tensor plain = base->forward(b.ids);
  {
    auto m = mixture::moa_from_peft_experts(base, moa_config({"a", "b"}, 4), {root / "a", root / "b"});
    CHECK(test::max_abs_diff(m->forward(b, {1, 1, 1}), want_b) < 1e-5);
    CHECK(test::max_abs_diff(m->forward(b, {0, 0, 0}), want_a) < 1e-5);
    // Wrong rank, wrong scaling, a missing directory, the wrong number of directories.
    test::check_throws_with<ValueError>(
        [&] { (void)mixture::moa_from_peft_experts(std::make_shared<nn::TransformerLM>(tiny(), 4), moa_config({"a"}, 4), {}); },
        {"one adapter directory per domain", "got 0"});
    auto wrong_rank = std::make_shared<MoAModel>(std::make_shared<nn::TransformerLM>(tiny(), 4), moa_config({"a"}, 2));
    test::check_throws_with<ShapeError>([&] { mixture::load_expert_peft(*wrong_rank, "a", root / "a"); },
                                        {"rank 4", "rank 2"});
    mixture::MoAConfig c8 = moa_config({"a"}, 4);
    c8.alpha = 16;
    auto wrong_scale = std::make_shared<MoAModel>(std::make_shared<nn::TransformerLM>(tiny(), 4), c8);
    test::check_throws_with<ValueError>([&] { mixture::load_expert_peft(*wrong_scale, "a", root / "a"); }, {"scales by 2"});
    test::check_throws_with<IOError>([&] { mixture::load_expert_peft(*m, "a", root / "none"); }, {"cannot open"});
    test::check_throws_with<IndexError>([&] { mixture::load_expert_peft(*m, "c", root / "a"); }, {"unknown domain 'c'"});
  }
  // The MoA is gone: the shared base computes what it did before, with no adapter left on it.
  CHECK(test::max_abs_diff(base->forward(b.ids), plain) == 0.0);
  for (const auto& [n, t] : base->named_parameters()) CHECK(n.find("moa") == std::string::npos);
  fs::remove_all(root);
}
