// The four-domain reproduction of the MoA paper, top to bottom (`moa four-domain`, and
// examples/four_domain.cpp on its own).
//
//   1. Data: <data>/<domain>/{train,valid,test}.jsonl in the Alpaca layout with a domain label
//      (moa data prepare writes them from the published source files).
//   2. Tokenizer: byte-level BPE learned on the training text (or the given model's tokenizer).
//   3. Base model: a small Llama-style LM pretrained here on the training text of all domains, with
//      full weights (or a given Hugging Face checkpoint); frozen from then on.
//   4. Five systems on that base, each seeing the same number of training sequences:
//        single-lora  one LoRA per domain, trained on its domain, evaluated on it (domain known)
//        mixed-lora   one LoRA trained on all domains mixed (domain unknown)
//        moe-lora     the stage-1 experts, token-level top-2 routing, no routing labels
//        moe-naive    the same, experts randomly initialised
//        moa          stage 1 (per-domain experts) + stage 2 (experts and routers jointly,
//                     L = L_LM + eta L_cls, domain-balanced batches); routed at test time
//      Budget: stage 1 is s1 steps per domain, stage 2 is s2 steps, so MoA sees 4 s1 + s2 batches;
//      single-lora trains s1 + s2/4 steps per domain (its first s1 steps are MoA's stage 1),
//      mixed-lora and moe-naive train 4 s1 + s2 steps, moe-lora s2 steps after stage 1.
//   5. Evaluation on every domain's test split: perplexity over the answer tokens, BLEU-4
//      (sacreBLEU's) and ROUGE-L (rouge-score's) of greedy answers, router accuracy and confusion.
//   6. Report: results.md (the paper's layout), results.json, curves.svg, confusion.svg.
//
// Every phase checkpoints; a run that is interrupted continues where it stopped when started again
// with the same --out (finished phases are loaded, not retrained).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <moa/moa.hpp>
#include <moa/data/instruct.hpp>
#include <moa/eval/generate.hpp>
#include <moa/eval/metrics.hpp>
#include <moa/io/checkpoint.hpp>
#include <moa/mixture/moa_io.hpp>
#include <moa/nn/load.hpp>
#include <moa/tokenizer/bpe_trainer.hpp>
#include <moa/tokenizer/hf_json.hpp>
#include <moa/tokenizer/load.hpp>
#include <moa/train/lm_trainer.hpp>

namespace moa::four_domain {

namespace fs = std::filesystem;
using mixture::MoABatch;
using mixture::MoAModel;

// ---------------------------------------------------------------------------------------------
// Presets
// ---------------------------------------------------------------------------------------------

struct Preset {
  std::string name;
  int32_t vocab_size = 4096;
  int64_t bpe_examples_per_domain = 1500;  // training examples the BPE vocabulary is learned on
  nn::TransformerConfig model;             // the base trained from scratch (ignored with --model)
  int64_t base_steps = 400, base_batch = 8, base_lr_x1e4 = 30;
  int64_t seq_len = 192;                   // context of every training and test sequence
  int64_t batch = 8;                       // sequences per LoRA step (a multiple of the domain count)
  int64_t s1_steps = 60;                   // stage 1: steps per domain
  int64_t s2_steps = 120;                  // stage 2 (and MoE-LoRA after stage 1)
  double lora_lr = 2e-3;
  int64_t rank = 16;
  double alpha = 32;
  double eta = 1.0;
  int64_t eval_ppl = 200;                  // test examples per domain for PPL and routing
  int64_t eval_gen = 40;                   // test examples per domain answered for BLEU / ROUGE-L
  int64_t max_new_tokens = 48;
  int64_t ckpt_every = 50;
};

// A Llama-style base (RMSNorm, RoPE, SwiGLU, tied embeddings) of the given size; run() sets its
// vocabulary and context from the tokenizer and the preset.
inline nn::TransformerConfig small_llama(int64_t dim, int64_t layers, int64_t heads, int64_t hidden) {
  nn::TransformerConfig c = nn::TransformerConfig::llama();
  c.dim = dim;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = heads;
  c.hidden_dim = hidden;
  c.tie_embeddings = true;
  return c;
}

inline Preset quick_preset() {
  Preset p;
  p.name = "quick";
  p.model = small_llama(192, 4, 6, 512);
  p.base_steps = 720;     // ~1.1M tokens, about 4 minutes on 2 cores
  p.s1_steps = 50;
  p.s2_steps = 100;       // every system: 4 x 50 + 100 = 300 LoRA steps of 8 sequences
  return p;
}

inline Preset full_preset() {
  Preset p;
  p.name = "full";
  p.vocab_size = 8192;
  p.bpe_examples_per_domain = 5000;
  p.seq_len = 512;
  p.model = small_llama(512, 8, 8, 1408);
  p.base_steps = 6000;
  p.base_batch = 16;
  p.batch = 16;
  p.s1_steps = 600;
  p.s2_steps = 1200;
  p.eval_ppl = 500;
  p.eval_gen = 500;
  p.max_new_tokens = 128;
  p.ckpt_every = 200;
  return p;
}

// Seconds, for tests and for trying the pipeline: nothing it trains is meant to be good.
inline Preset tiny_preset() {
  Preset p;
  p.name = "tiny";
  p.vocab_size = 400;
  p.bpe_examples_per_domain = 40;
  p.seq_len = 48;
  p.model = small_llama(32, 2, 2, 64);
  p.base_steps = 6;
  p.base_batch = 4;
  p.batch = 4;
  p.s1_steps = 4;
  p.s2_steps = 4;
  p.rank = 4;
  p.alpha = 8;
  p.eval_ppl = 6;
  p.eval_gen = 3;
  p.max_new_tokens = 6;
  p.ckpt_every = 2;
  return p;
}

inline Preset preset_by_name(const std::string& name) {
  if (name == "tiny") return tiny_preset();
  if (name == "quick") return quick_preset();
  if (name == "full") return full_preset();
  throw ValueError(::moa::detail::cat("four-domain: unknown preset '", name, "' (expected tiny, quick or full)"));
}

struct Options {
  fs::path data_dir;           // <data>/<domain>/{train,valid,test}.jsonl
  fs::path out_dir = "four-domain-run";
  std::string preset = "quick";
  fs::path model;              // optional: a Hugging Face checkpoint directory as the base
  std::uint64_t seed = 1;
  bool quiet = false;
  std::optional<int64_t> s1_steps, s2_steps, base_steps, eval_ppl, eval_gen;  // preset overrides
  std::string stop_after;      // "<phase>:<step>": checkpoint there and throw Interrupted (tests)
  Device device = Device::cpu();  // where the base, the experts and the routers train and run
};

// Thrown where Options::stop_after asks: the run stops as if killed, its checkpoints in place.
struct Interrupted : Error {
  using Error::Error;
};

// ---------------------------------------------------------------------------------------------
// Tokenised examples and batches
// ---------------------------------------------------------------------------------------------

// One example as tokens: the prompt (template + instruction + input), then the answer and EOS.
struct Encoded {
  std::vector<int32_t> tokens;
  int64_t prompt_len = 0;
  int32_t domain = 0;
  bool truncated = false;
};

// Fits prompt + answer into seq_len + 1 tokens (seq_len inputs, seq_len targets). When too long:
// the answer keeps at least half of the room; the prompt keeps its first tokens and its last 8 (the
// response header), the answer its first tokens (its EOS is then lost and `truncated` is set).
inline Encoded fit(std::vector<int32_t> prompt, std::vector<int32_t> answer, int64_t seq_len, int32_t domain) {
  const auto room = static_cast<std::size_t>(seq_len + 1);
  Encoded e;
  e.domain = domain;
  if (prompt.size() + answer.size() > room) {
    e.truncated = true;
    const std::size_t pb = std::min(prompt.size(), std::max(room / 2, room > answer.size() ? room - answer.size() : 0));
    if (prompt.size() > pb) {
      const std::size_t tail = std::min<std::size_t>(8, pb);
      std::vector<int32_t> p(prompt.begin(), prompt.begin() + static_cast<std::ptrdiff_t>(pb - tail));
      p.insert(p.end(), prompt.end() - static_cast<std::ptrdiff_t>(tail), prompt.end());
      prompt = std::move(p);
    }
    answer.resize(std::min(answer.size(), room - prompt.size()));
  }
  e.prompt_len = static_cast<int64_t>(prompt.size());
  e.tokens = std::move(prompt);
  e.tokens.insert(e.tokens.end(), answer.begin(), answer.end());
  return e;
}

// Rows right-padded to the longest; targets only on answer tokens; prompt_mask on prompt tokens.
inline MoABatch make_batch(const std::vector<const Encoded*>& rows, int32_t pad) {
  int64_t T = 1;
  for (const Encoded* e : rows) T = std::max<int64_t>(T, static_cast<int64_t>(e->tokens.size()) - 1);
  const auto Bn = static_cast<int64_t>(rows.size());
  std::vector<int32_t> ids(static_cast<std::size_t>(Bn * T), pad), tg(ids.size(), train::kIgnore);
  std::vector<float> pm(ids.size(), 0.0f);
  MoABatch b;
  for (int64_t r = 0; r < Bn; ++r) {
    const Encoded& e = *rows[static_cast<std::size_t>(r)];
    const auto n = static_cast<int64_t>(e.tokens.size()) - 1;
    for (int64_t t = 0; t < n; ++t) {
      const auto i = static_cast<std::size_t>(r * T + t);
      ids[i] = e.tokens[static_cast<std::size_t>(t)];
      if (t + 1 >= e.prompt_len) tg[i] = e.tokens[static_cast<std::size_t>(t + 1)];
      if (t < e.prompt_len) pm[i] = 1.0f;
    }
    b.domain.push_back(e.domain);
  }
  b.ids = Tensor::from_vector(ids, {Bn, T});
  b.targets = Tensor::from_vector(tg, {Bn, T});
  b.prompt_mask = Tensor::from_vector(pm, {Bn, T});
  return b;
}

// Shuffled epochs per domain; a batch takes batch / n_domains sequences from each domain given
// (domain-balanced), or all from one domain. Deterministic from the seed: skip(n) replays n batches.
class Sampler {
 public:
  Sampler(const std::vector<std::vector<Encoded>>& by_domain, std::uint64_t seed) : data_(&by_domain), gen_(seed) {
    for (const auto& d : by_domain) {
      order_.emplace_back(d.size());
      std::iota(order_.back().begin(), order_.back().end(), std::size_t{0});
      cursor_.push_back(d.size());
    }
  }
  std::vector<const Encoded*> next(const std::vector<int32_t>& domains, int64_t batch) {
    std::vector<const Encoded*> rows;
    const auto per = batch / static_cast<int64_t>(domains.size());
    for (int64_t i = 0; i < per; ++i)
      for (int32_t d : domains) rows.push_back(&pick(static_cast<std::size_t>(d)));
    return rows;
  }
  void skip(const std::vector<int32_t>& domains, int64_t batch, int64_t n) {
    for (int64_t s = 0; s < n; ++s) (void)next(domains, batch);
  }

 private:
  const Encoded& pick(std::size_t d) {
    auto& o = order_[d];
    if (cursor_[d] == o.size()) {
      for (std::size_t i = o.size(); i > 1; --i) std::swap(o[i - 1], o[gen_.next_below(i)]);
      cursor_[d] = 0;
    }
    return (*data_)[d][o[cursor_[d]++]];
  }
  const std::vector<std::vector<Encoded>>* data_;
  Generator gen_;
  std::vector<std::vector<std::size_t>> order_;
  std::vector<std::size_t> cursor_;
};

// ---------------------------------------------------------------------------------------------
// Progress, checkpoints, one training phase
// ---------------------------------------------------------------------------------------------

struct CurvePoint {
  int64_t step;
  double loss;
};

inline void write_text_atomic(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    f << text;
    MOA_CHECK(f.good(), IOError, "cannot write ", tmp.string());
  }
  fs::rename(tmp, path);
}

// What one phase trains and how its loss is computed from a batch.
struct Phase {
  std::string name;                        // checkpoint and curve name
  int64_t steps = 0;
  std::vector<std::pair<std::string, Tensor>> params;  // trained, by unique name
  std::vector<int32_t> domains;            // which domains a batch mixes
  std::function<std::pair<Tensor, Tensor>(const MoABatch&)> loss;  // {what is minimised, its L_LM part}
  std::function<void(int64_t step)> after_step;  // e.g. the stage-1 snapshot
};

class Runner {
 public:
  Runner(const Options& o, Preset p) : o_(o), p_(std::move(p)) {}

  // Runs a phase to its end, resuming from its checkpoint; returns the loss curve.
  std::vector<CurvePoint> train(const Phase& ph, Sampler& sampler, int32_t pad) {
    const fs::path ck = o_.out_dir / "checkpoints" / ph.name;
    std::vector<Tensor> params;
    std::vector<std::string> names;
    for (const auto& [n, t] : ph.params) {
      names.push_back(n);
      params.push_back(t);
    }
    optim::AdamW opt(params, {.lr = p_.lora_lr, .weight_decay = 0.0});
    const optim::WarmupCosine sched{.base_lr = p_.lora_lr, .min_lr = p_.lora_lr / 10,
                                    .warmup_steps = std::min<int64_t>(20, ph.steps), .total_steps = ph.steps};
    std::vector<CurvePoint> curve;
    int64_t step = 0;
    if (fs::exists(ck / "state.json")) {
      const io::TrainingCheckpoint c = io::load_checkpoint(ck);
      io::copy_into(named(ph.params), c.model, "phase checkpoint");
      if (c.optimizer) io::restore_adamw(opt, names, *c.optimizer);
      step = c.step;
      for (const auto& pt : c.metadata.at("curve")) curve.push_back({pt.at(0).get<int64_t>(), pt.at(1).get<double>()});
      sampler.skip(ph.domains, p_.batch, step);
      log("  " + ph.name + ": resumed at step " + std::to_string(step));
    }
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t first = step;
    double ema = curve.empty() ? 0 : curve.back().loss;
    while (step < ph.steps) {
      const MoABatch b = make_batch(sampler.next(ph.domains, p_.batch), pad);
      auto [loss, lm_part] = ph.loss(b);
      opt.zero_grad();
      loss.backward();
      (void)optim::clip_grad_norm(params, 1.0);
      opt.set_lr(sched.lr(step));
      opt.step();
      ++step;
      const double l = lm_part.item<double>();  // the curves show L_LM (answer tokens) for every system
      ema = step == 1 ? l : 0.9 * ema + 0.1 * l;
      if (step % 5 == 0 || step == ph.steps) curve.push_back({step, ema});
      if (ph.after_step) ph.after_step(step);
      if (step % 10 == 0 || step == ph.steps) {
        const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double per = el / static_cast<double>(step - first);
        char line[256];
        std::snprintf(line, sizeof line, "  %-22s step %5lld/%lld  loss %.4f  %.2f s/step  ETA %.0f s", ph.name.c_str(),
                      static_cast<long long>(step), static_cast<long long>(ph.steps), ema, per,
                      per * static_cast<double>(ph.steps - step));
        log(line);
      }
      if (step % p_.ckpt_every == 0 && step < ph.steps) save(ck, ph, opt, names, step, curve);
      if (o_.stop_after == ph.name + ":" + std::to_string(step))
        throw Interrupted(::moa::detail::cat("four-domain: stopped after step ", step, " of ", ph.name, " (stop_after)"));
    }
    save(ck, ph, opt, names, step, curve);
    return curve;
  }

  void log(const std::string& s) const {
    if (!o_.quiet) std::cerr << s << std::endl;
  }

 private:
  static io::TensorMap named(const std::vector<std::pair<std::string, Tensor>>& ps) {
    io::TensorMap m;
    for (const auto& [n, t] : ps) m[n] = t;
    return m;
  }
  void save(const fs::path& ck, const Phase& ph, optim::AdamW& opt, const std::vector<std::string>& names, int64_t step,
            const std::vector<CurvePoint>& curve) {
    nlohmann::json c = nlohmann::json::array();
    for (const auto& pt : curve) c.push_back({pt.step, pt.loss});
    io::save_checkpoint(ck, {.model = named(ph.params), .optimizer = io::adamw_state(opt, names), .step = step,
                             .rng = {}, .metadata = {{"phase", ph.name}, {"curve", c}}});
  }
  const Options& o_;
  Preset p_;
};

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

struct DomainScore {
  double ppl = 0, bleu = 0, rouge_l = 0;
  int64_t n_ppl = 0, n_gen = 0;
};

// How a system picks experts for a batch of test prompts with their true domains.
enum class Chooser { domain, zero, routed, token };

// Perplexity over the answer tokens of `rows`, experts chosen by `how`.
inline double answer_nll(MoAModel& m, const std::vector<const Encoded*>& rows, int32_t pad, Chooser how,
                         int64_t* n_tokens, std::vector<int32_t>* routed = nullptr) {
  NoGradGuard ng;
  const MoABatch b = make_batch(rows, pad);
  Tensor loss;
  if (how == Chooser::token) {
    loss = cross_entropy(m.forward_token_topk(b.ids), b.targets);
  } else {
    std::vector<int32_t> ex(b.domain.size(), 0);
    if (how == Chooser::domain) ex = b.domain;
    if (how == Chooser::routed) {
      ex = m.route(b);
      if (routed) routed->insert(routed->end(), ex.begin(), ex.end());
    }
    loss = m.lm_loss(b, ex);
  }
  const auto tg = b.targets.to_vector<int32_t>();
  const int64_t n = std::count_if(tg.begin(), tg.end(), [](int32_t t) { return t != train::kIgnore; });
  *n_tokens += n;
  return loss.item<double>() * static_cast<double>(n);
}

// Greedy answers (until EOS or max_new tokens) to the prompts of `rows`.
inline std::vector<std::vector<int32_t>> answers(MoAModel& m, const std::vector<const Encoded*>& rows, Chooser how,
                                                 int32_t eos, int64_t max_new) {
  NoGradGuard ng;
  std::vector<std::vector<int32_t>> prompts;
  for (const Encoded* e : rows)
    prompts.emplace_back(e->tokens.begin(), e->tokens.begin() + e->prompt_len);
  std::vector<int32_t> ex(rows.size(), 0);
  if (how == Chooser::domain)
    for (std::size_t i = 0; i < rows.size(); ++i) ex[i] = rows[i]->domain;
  if (how == Chooser::routed) {
    // The prompts alone (plus one placeholder token, so that every prompt token is an input): the
    // routers pool over exactly what they pooled over in the perplexity pass.
    std::vector<Encoded> only;
    for (const Encoded* e : rows) {
      Encoded p{std::vector<int32_t>(e->tokens.begin(), e->tokens.begin() + e->prompt_len), e->prompt_len, e->domain, false};
      p.tokens.push_back(0);
      only.push_back(std::move(p));
    }
    std::vector<const Encoded*> op;
    for (const auto& e : only) op.push_back(&e);
    ex = m.route(make_batch(op, 0));
  }
  if (how == Chooser::token) {
    m.use_token_routing();
  } else {
    m.use_experts(ex);
  }
  const int64_t room = m.base().config().max_seq_len;
  int64_t longest = 0;
  for (const auto& p : prompts) longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  auto out = eval::generate(m.base(), prompts,
                            {.max_new_tokens = std::max<int64_t>(1, std::min(max_new, room - longest)), .stop_tokens = {eos}});
  m.use_experts(std::vector<int32_t>(rows.size(), 0));
  for (auto& o : out)
    if (!o.empty() && o.back() == eos) o.pop_back();
  return out;
}

// The expert the MoA picks for each example's prompt (its answer unused), in batches of 16.
inline std::vector<int32_t> route_examples(MoAModel& m, const Tokenizer& tok, const std::vector<data::Example>& exs) {
  const int64_t room = m.base().config().max_seq_len;
  std::vector<int32_t> out;
  for (std::size_t i = 0; i < exs.size(); i += 16) {
    std::vector<Encoded> enc;
    for (std::size_t j = i; j < std::min(exs.size(), i + 16); ++j) {
      Encoded e = fit(tok.encode(data::prompt_text(exs[j])), {}, room - 1, 0);
      e.tokens.push_back(0);  // a placeholder: every prompt token is an input
      enc.push_back(std::move(e));
    }
    std::vector<const Encoded*> rows;
    for (const auto& e : enc) rows.push_back(&e);
    const auto picks = m.route(make_batch(rows, 0));
    out.insert(out.end(), picks.begin(), picks.end());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Report: Markdown, JSON, SVG
// ---------------------------------------------------------------------------------------------

struct SystemResult {
  std::string name;
  std::vector<DomainScore> per_domain;
  std::vector<int32_t> routed, truth;  // MoA: the expert each test prompt went to, and its domain
};

inline std::string fmt(double v, int prec) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", prec, v);
  return b;
}

inline std::string svg_escape(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return o;
}

// Training curves: loss (moving average) against LoRA steps, every phase one line; stage-2 phases
// start after stage 1 (4 s1 steps).
inline std::string curves_svg(const std::vector<std::tuple<std::string, int64_t, std::vector<CurvePoint>>>& curves) {
  const double W = 760, H = 440, L = 60, R = 190, T = 30, B = 50;
  double xmax = 1, ymin = 1e30, ymax = -1e30;
  for (const auto& [n, off, c] : curves)
    for (const auto& pt : c) {
      xmax = std::max(xmax, static_cast<double>(off + pt.step));
      ymin = std::min(ymin, pt.loss);
      ymax = std::max(ymax, pt.loss);
    }
  if (ymin > ymax) ymin = 0, ymax = 1;
  const double pad = 0.05 * (ymax - ymin + 1e-9);
  ymin -= pad;
  ymax += pad;
  auto X = [&](double x) { return L + (W - L - R) * x / xmax; };
  auto Y = [&](double y) { return T + (H - T - B) * (1 - (y - ymin) / (ymax - ymin)); };
  static const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  std::string o = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + fmt(W, 0) + "\" height=\"" + fmt(H, 0) +
                  "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o += "<text x=\"" + fmt(L, 0) + "\" y=\"18\" font-size=\"14\">Training L_LM (answer tokens, moving average) per phase</text>\n";
  for (int i = 0; i <= 5; ++i) {
    const double y = ymin + (ymax - ymin) * i / 5, x = xmax * i / 5;
    o += "<line x1=\"" + fmt(L, 1) + "\" x2=\"" + fmt(W - R, 1) + "\" y1=\"" + fmt(Y(y), 1) + "\" y2=\"" + fmt(Y(y), 1) +
         "\" stroke=\"#ddd\"/><text x=\"" + fmt(L - 6, 1) + "\" y=\"" + fmt(Y(y) + 4, 1) + "\" text-anchor=\"end\">" + fmt(y, 2) + "</text>\n";
    o += "<text x=\"" + fmt(X(x), 1) + "\" y=\"" + fmt(H - B + 16, 1) + "\" text-anchor=\"middle\">" + fmt(x, 0) + "</text>\n";
  }
  o += "<text x=\"" + fmt((L + W - R) / 2, 1) + "\" y=\"" + fmt(H - 10, 1) + "\" text-anchor=\"middle\">LoRA training steps (batches)</text>\n";
  o += "<rect x=\"" + fmt(L, 1) + "\" y=\"" + fmt(T, 1) + "\" width=\"" + fmt(W - L - R, 1) + "\" height=\"" + fmt(H - T - B, 1) + "\" fill=\"none\" stroke=\"#333\"/>\n";
  std::size_t i = 0;
  for (const auto& [n, off, c] : curves) {
    const char* col = colors[i % 10];
    std::string pts;
    for (const auto& pt : c) pts += fmt(X(static_cast<double>(off + pt.step)), 1) + "," + fmt(Y(pt.loss), 1) + " ";
    o += "<polyline fill=\"none\" stroke=\"" + std::string(col) + "\" stroke-width=\"1.5\" points=\"" + pts + "\"/>\n";
    const double ly = T + 8 + 18.0 * static_cast<double>(i);
    o += "<line x1=\"" + fmt(W - R + 10, 1) + "\" x2=\"" + fmt(W - R + 30, 1) + "\" y1=\"" + fmt(ly, 1) + "\" y2=\"" + fmt(ly, 1) +
         "\" stroke=\"" + col + "\" stroke-width=\"2\"/><text x=\"" + fmt(W - R + 35, 1) + "\" y=\"" + fmt(ly + 4, 1) + "\">" +
         svg_escape(n) + "</text>\n";
    ++i;
  }
  return o + "</svg>\n";
}

// The routing confusion matrix: rows the true domain, columns the chosen expert.
inline std::string confusion_svg(const std::vector<std::string>& names, const std::vector<std::vector<int64_t>>& m) {
  const double cell = 112, L = 130, T = 60;
  const double W = L + cell * static_cast<double>(names.size()) + 20, H = T + cell * static_cast<double>(names.size()) + 40;
  std::string o = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + fmt(W, 0) + "\" height=\"" + fmt(H, 0) +
                  "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o += "<text x=\"10\" y=\"18\" font-size=\"14\">MoA routing on the test prompts: true domain (rows) vs chosen expert</text>\n";
  for (std::size_t r = 0; r < names.size(); ++r) {
    int64_t row = 0;
    for (int64_t v : m[r]) row += v;
    o += "<text x=\"" + fmt(L - 8, 1) + "\" y=\"" + fmt(T + cell * (static_cast<double>(r) + 0.5) + 4, 1) + "\" text-anchor=\"end\">" + svg_escape(names[r]) + "</text>\n";
    o += "<text x=\"" + fmt(L + cell * (static_cast<double>(r) + 0.5), 1) + "\" y=\"" + fmt(T - 8, 1) + "\" text-anchor=\"middle\">" + svg_escape(names[r]) + "</text>\n";
    for (std::size_t c = 0; c < names.size(); ++c) {
      const double f = row ? static_cast<double>(m[r][c]) / static_cast<double>(row) : 0.0;
      const int shade = static_cast<int>(255 - 200 * f);
      o += "<rect x=\"" + fmt(L + cell * static_cast<double>(c), 1) + "\" y=\"" + fmt(T + cell * static_cast<double>(r), 1) + "\" width=\"" + fmt(cell, 0) + "\" height=\"" + fmt(cell, 0) +
           "\" fill=\"rgb(" + std::to_string(shade) + "," + std::to_string(shade) + ",255)\" stroke=\"#333\"/>\n";
      o += "<text x=\"" + fmt(L + cell * (static_cast<double>(c) + 0.5), 1) + "\" y=\"" + fmt(T + cell * (static_cast<double>(r) + 0.5) + 4, 1) +
           "\" text-anchor=\"middle\" fill=\"" + (f > 0.5 ? "white" : "black") + "\">" + std::to_string(m[r][c]) + " (" +
           fmt(100 * f, 1) + "%)</text>\n";
    }
  }
  return o + "</svg>\n";
}

// ---------------------------------------------------------------------------------------------
// The whole run
// ---------------------------------------------------------------------------------------------

inline nlohmann::json run(const Options& o) {
  const auto wall0 = std::chrono::steady_clock::now();
  Preset p = preset_by_name(o.preset);
  if (o.s1_steps) p.s1_steps = *o.s1_steps;
  if (o.s2_steps) p.s2_steps = *o.s2_steps;
  if (o.base_steps) p.base_steps = *o.base_steps;
  if (o.eval_ppl) p.eval_ppl = *o.eval_ppl;
  if (o.eval_gen) p.eval_gen = *o.eval_gen;
  MOA_CHECK(p.s1_steps > 0 && p.s2_steps >= 0 && p.eval_ppl > 0 && p.eval_gen >= 0, ValueError,
            "four-domain: expected s1_steps > 0, s2_steps >= 0, eval_ppl > 0 and eval_gen >= 0");
  fs::create_directories(o.out_dir);
  Runner runner(o, p);
  auto phase_time = [&, t = std::chrono::steady_clock::now()]() mutable {
    const auto now = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(now - t).count();
    t = now;
    return s;
  };
  nlohmann::json timing = nlohmann::json::object();

  // 1. Data.
  runner.log("four-domain: reading " + o.data_dir.string());
  const data::DomainSplits ds = data::load_four_domain(o.data_dir);
  const std::vector<std::string>& D = ds.domains;
  const auto nd = static_cast<int32_t>(D.size());
  MOA_CHECK(nd >= 1 && p.batch % nd == 0, ValueError, "four-domain: the batch (", p.batch,
            ") must be a multiple of the number of domains (", nd, ")");

  // 2. Tokenizer and 3. base model.
  std::unique_ptr<Tokenizer> tok;
  std::shared_ptr<nn::TransformerLM> base;
  std::string base_ref;
  int64_t seq_len = p.seq_len;
  if (!o.model.empty()) {
    nn::LoadedModel lm = nn::load_model(o.model);
    base = lm.model;
    base->to(o.device);
    tok = load_tokenizer(lm.tokenizer_hint);
    seq_len = std::min(seq_len, base->config().max_seq_len - 1);
    base_ref = o.model.string();
  } else {
    const fs::path tp = o.out_dir / "tokenizer.json";
    if (!fs::exists(tp)) {
      runner.log("four-domain: learning a " + std::to_string(p.vocab_size) + "-token BPE vocabulary");
      std::vector<std::string> corpus;
      for (const auto& d : D) {
        const auto& tr = ds.train.at(d);
        for (std::size_t i = 0; i < tr.size() && static_cast<int64_t>(i) < p.bpe_examples_per_domain; ++i)
          corpus.push_back(data::prompt_text(tr[i]) + data::answer_text(tr[i]));
      }
      save_hf_tokenizer(train_bpe(corpus, {.vocab_size = p.vocab_size}), tp);
    }
    tok = load_tokenizer(tp);
    base_ref = (o.out_dir / "base").string();
  }
  std::optional<int32_t> eos = tok->eos_id();
  if (!eos) eos = tok->token_to_id("<|endoftext|>");
  MOA_CHECK(eos.has_value(), ValueError, "four-domain: the tokenizer has no end-of-text token");
  timing["tokenizer_s"] = phase_time();

  std::vector<std::vector<Encoded>> train_enc(static_cast<std::size_t>(nd)), test_enc(train_enc.size());
  int64_t truncated_train = 0, truncated_test = 0;
  std::vector<std::vector<const data::Example*>> test_ex(train_enc.size());
  for (int32_t d = 0; d < nd; ++d) {
    auto enc = [&](const data::Example& ex) {
      std::vector<int32_t> answer = tok->encode(data::answer_text(ex));
      answer.push_back(*eos);
      return fit(tok->encode(data::prompt_text(ex)), std::move(answer), seq_len, d);
    };
    for (const auto& ex : ds.train.at(D[static_cast<std::size_t>(d)])) {
      train_enc[static_cast<std::size_t>(d)].push_back(enc(ex));
      truncated_train += train_enc[static_cast<std::size_t>(d)].back().truncated;
    }
    const auto& te = ds.test.at(D[static_cast<std::size_t>(d)]);
    for (std::size_t i = 0; i < te.size() && static_cast<int64_t>(i) < p.eval_ppl; ++i) {
      test_enc[static_cast<std::size_t>(d)].push_back(enc(te[i]));
      test_ex[static_cast<std::size_t>(d)].push_back(&te[i]);
      truncated_test += test_enc[static_cast<std::size_t>(d)].back().truncated;
    }
  }
  timing["encode_s"] = phase_time();

  if (!base) {
    nn::TransformerConfig c = p.model;
    c.vocab_size = tok->vocab_size();
    c.max_seq_len = seq_len + 1;
    base = std::make_shared<nn::TransformerLM>(c, o.seed);
    base->to(o.device);
    std::vector<int32_t> stream;
    for (const auto& dv : train_enc)
      for (const auto& e : dv) stream.insert(stream.end(), e.tokens.begin(), e.tokens.end());
    train::PackedTokens packed(std::move(stream), p.base_batch, seq_len);
    std::vector<int32_t> vstream;
    for (const auto& d : D)
      for (const auto& ex : ds.valid.at(d)) {
        auto v = tok->encode(data::prompt_text(ex) + data::answer_text(ex));
        vstream.insert(vstream.end(), v.begin(), v.end());
        vstream.push_back(*eos);
        if (static_cast<int64_t>(vstream.size()) > 16 * seq_len) break;
      }
    const auto valid = train::PackedTokens(vstream, p.base_batch, seq_len).sequential(8);
    runner.log("four-domain: pretraining the base (" + std::to_string(p.base_steps) + " steps)");
    train::train_lm(*base, packed, valid,
                    {.steps = p.base_steps,
                     .adamw = {.lr = static_cast<double>(p.base_lr_x1e4) * 1e-4, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1},
                     .min_lr = static_cast<double>(p.base_lr_x1e4) * 1e-5,
                     .warmup_steps = std::min<int64_t>(50, p.base_steps),
                     .eval_every = 0,
                     .checkpoint_every = p.ckpt_every,
                     .checkpoint_dir = o.out_dir / "base",
                     .log_path = o.out_dir / "base_log.jsonl",
                     .seed = o.seed,
                     .quiet = o.quiet},
                    {{"model_config", c.to_json()}, {"tokenizer", fs::absolute(o.out_dir / "tokenizer.json").string()}});
  }
  timing["base_s"] = phase_time();

  // 4. The systems.
  mixture::MoAConfig mc{.domains = D, .rank = p.rank, .alpha = p.alpha, .eta = p.eta};
  mc.target_modules = lora::hf_family_of(base->config()) == nn::HfFamily::gpt2 ? "o_proj|mlp\\.fc|mlp\\.proj" : "proj";
  const int64_t budget = static_cast<int64_t>(nd) * p.s1_steps + p.s2_steps;
  std::vector<int32_t> all(static_cast<std::size_t>(nd));
  std::iota(all.begin(), all.end(), 0);
  auto named = [](const std::vector<Tensor>& ts, const std::string& prefix) {
    std::vector<std::pair<std::string, Tensor>> out;
    for (std::size_t i = 0; i < ts.size(); ++i) out.emplace_back(prefix + std::to_string(i), ts[i]);
    return out;
  };
  auto seed_of = [&](const std::string& phase) { return o.seed * 1000003u + std::hash<std::string>{}(phase) % 1000003u; };
  std::vector<std::tuple<std::string, int64_t, std::vector<CurvePoint>>> curves;
  std::vector<SystemResult> results;
  const fs::path stage1 = o.out_dir / "stage1";
  fs::create_directories(stage1);

  auto evaluate = [&](MoAModel& m, const std::string& name, Chooser how) {
    const fs::path cache = o.out_dir / "eval" / (name + ".json");
    SystemResult r{name, {}, {}, {}};
    if (fs::exists(cache)) {
      std::ifstream in(cache);
      const auto j = nlohmann::json::parse(in);
      for (const auto& d : j.at("per_domain"))
        r.per_domain.push_back({d.at("ppl"), d.at("bleu"), d.at("rouge_l"), d.at("n_ppl"), d.at("n_gen")});
      r.routed = j.at("routed").get<std::vector<int32_t>>();
      r.truth = j.at("truth").get<std::vector<int32_t>>();
      return r;
    }
    m.eval();
    for (int32_t d = 0; d < nd; ++d) {
      const auto& rows = test_enc[static_cast<std::size_t>(d)];
      double nll = 0;
      int64_t ntok = 0;
      for (std::size_t i = 0; i < rows.size(); i += 16) {
        std::vector<const Encoded*> chunk;
        for (std::size_t j = i; j < std::min(rows.size(), i + 16); ++j) chunk.push_back(&rows[j]);
        std::vector<int32_t> picked;
        nll += answer_nll(m, chunk, *eos, how, &ntok, &picked);
        if (how == Chooser::routed) {
          r.routed.insert(r.routed.end(), picked.begin(), picked.end());
          r.truth.insert(r.truth.end(), chunk.size(), d);
        }
      }
      std::vector<std::string> hyps, refs;
      const std::size_t ng = std::min(rows.size(), static_cast<std::size_t>(p.eval_gen));
      for (std::size_t i = 0; i < ng; i += 8) {
        std::vector<const Encoded*> chunk;
        for (std::size_t j = i; j < std::min(ng, i + 8); ++j) chunk.push_back(&rows[j]);
        for (const auto& a : answers(m, chunk, how, *eos, p.max_new_tokens)) hyps.push_back(tok->decode(a));
        for (std::size_t j = i; j < std::min(ng, i + 8); ++j) refs.push_back(test_ex[static_cast<std::size_t>(d)][j]->output);
      }
      DomainScore s;
      s.n_ppl = static_cast<int64_t>(rows.size());
      s.n_gen = static_cast<int64_t>(ng);
      s.ppl = std::exp(nll / static_cast<double>(std::max<int64_t>(ntok, 1)));
      if (ng > 0) {
        s.bleu = eval::corpus_bleu(hyps, refs).score;
        s.rouge_l = 100.0 * eval::corpus_rouge_l_f(hyps, refs);
      }
      r.per_domain.push_back(s);
      runner.log("  eval " + name + " / " + D[static_cast<std::size_t>(d)] + ": PPL " + fmt(s.ppl, 3) + "  BLEU " +
                 fmt(s.bleu, 2) + "  ROUGE-L " + fmt(s.rouge_l, 2));
      if (!hyps.empty()) {  // a few answers beside the references, for reading
        nlohmann::json samples = nlohmann::json::array();
        for (std::size_t j = 0; j < std::min<std::size_t>(5, hyps.size()); ++j)
          samples.push_back({{"prompt", data::prompt_text(*test_ex[static_cast<std::size_t>(d)][j])}, {"answer", hyps[j]}, {"reference", refs[j]}});
        fs::create_directories(o.out_dir / "samples");
        write_text_atomic(o.out_dir / "samples" / (name + "-" + D[static_cast<std::size_t>(d)] + ".json"), samples.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
      }
    }
    nlohmann::json j{{"per_domain", nlohmann::json::array()}, {"routed", r.routed}, {"truth", r.truth}};
    for (const auto& s : r.per_domain)
      j["per_domain"].push_back({{"ppl", s.ppl}, {"bleu", s.bleu}, {"rouge_l", s.rouge_l}, {"n_ppl", s.n_ppl}, {"n_gen", s.n_gen}});
    fs::create_directories(cache.parent_path());
    write_text_atomic(cache, j.dump(1) + "\n");
    return r;
  };
  auto system_dir = [&](const std::string& n) { return o.out_dir / "systems" / n; };
  auto load_or_new = [&](const std::string& n, const mixture::MoAConfig& cfg, bool* done) {
    *done = fs::exists(system_dir(n) / "moa_config.json");
    return *done ? mixture::load_moa(base, system_dir(n)) : std::make_shared<MoAModel>(base, cfg, seed_of(n));
  };
  auto curve_of = [&](const std::string& phase) {
    std::vector<CurvePoint> c;
    const fs::path ck = o.out_dir / "checkpoints" / phase;
    if (!fs::exists(ck / "state.json")) return c;
    const io::TrainingCheckpoint saved = io::load_checkpoint(ck);
    for (const auto& pt : saved.metadata.at("curve")) c.push_back({pt.at(0).get<int64_t>(), pt.at(1).get<double>()});
    return c;
  };
  auto stage1_file = [&](int32_t d) { return stage1 / (D[static_cast<std::size_t>(d)] + ".safetensors"); };
  auto copy_stage1 = [&](MoAModel& m, int32_t from_d, int32_t to_e) {
    const io::TensorMap t = io::load_safetensors(stage1_file(from_d)).tensors;
    NoGradGuard ng;
    const auto ps = m.expert_parameters(to_e);
    for (std::size_t i = 0; i < ps.size(); ++i) ps[i].detach().copy_(t.at("p" + std::to_string(i)));
  };

  // The base alone, for reference: a one-expert MoA whose B is still zero adds nothing to it.
  {
    mixture::MoAConfig c0 = mc;
    c0.domains = {"base"};
    c0.eta = 0;
    MoAModel m(base, c0, seed_of("base"));
    results.push_back(evaluate(m, "base", Chooser::zero));
    timing["base_eval_s"] = phase_time();
  }
  // Single-LoRA: expert d on domain d; its state after s1 steps is stage 1 of MoA and MoE-LoRA.
  {
    bool done = false;
    auto m = load_or_new("single-lora", mc, &done);
    const int64_t steps = p.s1_steps + p.s2_steps / nd;
    for (int32_t d = 0; d < nd; ++d) {
      const std::string ph = "single-lora-" + D[static_cast<std::size_t>(d)];
      if (!done) {
        Sampler sampler(train_enc, seed_of(ph));
        MoAModel* mp = m.get();
        runner.train({.name = ph, .steps = steps, .params = named(m->expert_parameters(d), "p"), .domains = {d},
                      .loss = [mp](const MoABatch& b) {
                        Tensor lm = mp->lm_loss(b, b.domain);
                        return std::pair{lm, lm};
                      },
                      .after_step = [&, mp, d](int64_t step) {
                        if (step != p.s1_steps) return;
                        io::TensorMap t;
                        const auto ps = mp->expert_parameters(d);
                        for (std::size_t i = 0; i < ps.size(); ++i) t["p" + std::to_string(i)] = ps[i];
                        io::save_safetensors(stage1_file(d), t);
                      }},
                     sampler, *eos);
      }
      curves.emplace_back(ph, 0, curve_of(ph));
    }
    if (!done) mixture::save_moa(*m, system_dir("single-lora"), base_ref);
    timing["single-lora_train_s"] = phase_time();
    results.push_back(evaluate(*m, "single-lora", Chooser::domain));
    timing["single-lora_eval_s"] = phase_time();
  }
  // MoA: stage-1 experts, then experts and routers jointly (stage 2).
  {
    bool done = false;
    auto m = load_or_new("moa", mc, &done);
    if (!done) {
      for (int32_t d = 0; d < nd; ++d) copy_stage1(*m, d, d);
      std::vector<std::pair<std::string, Tensor>> ps;
      for (int32_t d = 0; d < nd; ++d)
        for (auto& x : named(m->expert_parameters(d), "e" + std::to_string(d) + ".")) ps.push_back(x);
      for (auto& x : named(m->router_parameters(), "router.")) ps.push_back(x);
      Sampler sampler(train_enc, seed_of("moa-stage2"));
      MoAModel* mp = m.get();
      if (p.s2_steps > 0)
        runner.train({.name = "moa-stage2", .steps = p.s2_steps, .params = ps, .domains = all,
                      .loss = [mp](const MoABatch& b) {
                        auto ls = mp->loss(b);
                        return std::pair{ls[0], ls[1]};
                      }, .after_step = {}},
                     sampler, *eos);
      mixture::save_moa(*m, system_dir("moa"), base_ref);
    }
    curves.emplace_back("moa-stage2", static_cast<int64_t>(nd) * p.s1_steps, curve_of("moa-stage2"));
    timing["moa_train_s"] = phase_time();
    results.push_back(evaluate(*m, "moa", Chooser::routed));
    timing["moa_eval_s"] = phase_time();
  }
  // Single-LoRA (mixed): one LoRA on all domains, the whole budget.
  {
    mixture::MoAConfig c1 = mc;
    c1.domains = {"mixed"};
    c1.eta = 0;
    bool done = false;
    auto m = load_or_new("mixed-lora", c1, &done);
    if (!done) {
      Sampler sampler(train_enc, seed_of("mixed-lora"));
      MoAModel* mp = m.get();
      runner.train({.name = "mixed-lora", .steps = budget, .params = named(m->expert_parameters(0), "p"), .domains = all,
                    .loss = [mp](const MoABatch& b) {
                      Tensor lm = mp->lm_loss(b, std::vector<int32_t>(b.domain.size(), 0));
                      return std::pair{lm, lm};
                    }, .after_step = {}},
                   sampler, *eos);
      mixture::save_moa(*m, system_dir("mixed-lora"), base_ref);
    }
    curves.emplace_back("mixed-lora", 0, curve_of("mixed-lora"));
    timing["mixed-lora_train_s"] = phase_time();
    results.push_back(evaluate(*m, "mixed-lora", Chooser::zero));
    timing["mixed-lora_eval_s"] = phase_time();
  }
  // MoE-LoRA (stage-1 experts, s2 more steps) and MoE-LoRA naive (fresh experts, the whole budget):
  // token-level top-2 routing, no domain labels, the load-balancing loss.
  for (const bool naive : {false, true}) {
    const std::string n = naive ? "moe-naive" : "moe-lora";
    mixture::MoAConfig ct = mc;
    ct.mode = mixture::RoutingMode::token_topk;
    ct.top_k = 2;
    bool done = false;
    auto m = load_or_new(n, ct, &done);
    const int64_t steps = naive ? budget : p.s2_steps;
    if (!done) {
      if (!naive)
        for (int32_t d = 0; d < nd; ++d) copy_stage1(*m, d, d);
      std::vector<std::pair<std::string, Tensor>> ps;
      for (int32_t d = 0; d < nd; ++d)
        for (auto& x : named(m->expert_parameters(d), "e" + std::to_string(d) + ".")) ps.push_back(x);
      for (auto& x : named(m->router_parameters(), "router.")) ps.push_back(x);
      Sampler sampler(train_enc, seed_of(n));
      MoAModel* mp = m.get();
      const double bw = ct.balance_weight;
      if (steps > 0)
        runner.train({.name = n, .steps = steps, .params = ps, .domains = all,
                      .loss = [mp, bw](const MoABatch& b) {
                        Tensor bal;
                        const Tensor lm = cross_entropy(mp->forward_token_topk(b.ids, &bal), b.targets);
                        return std::pair{lm + scale(bal, bw), lm};
                      }, .after_step = {}},
                     sampler, *eos);
      mixture::save_moa(*m, system_dir(n), base_ref);
    }
    curves.emplace_back(n, naive ? 0 : static_cast<int64_t>(nd) * p.s1_steps, curve_of(n));
    timing[n + "_train_s"] = phase_time();
    results.push_back(evaluate(*m, n, Chooser::token));
    timing[n + "_eval_s"] = phase_time();
  }

  // 5. Routing report and 6. the report files.
  const SystemResult& moa_r = *std::find_if(results.begin(), results.end(), [](const SystemResult& r) { return r.name == "moa"; });
  const eval::RoutingReport rr = eval::routing_report(moa_r.routed, moa_r.truth, nd);
  const double this_run = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  double wall = this_run;
  {
    const fs::path ef = o.out_dir / "elapsed.json";
    std::vector<double> runs;
    if (fs::exists(ef)) {
      std::ifstream in(ef);
      runs = nlohmann::json::parse(in).at("invocations_s").get<std::vector<double>>();
    }
    runs.push_back(this_run);
    wall = std::accumulate(runs.begin(), runs.end(), 0.0);
    write_text_atomic(ef, nlohmann::json{{"invocations_s", runs}}.dump() + "\n");
  }
  nlohmann::json out{{"preset", p.name}, {"domains", D}, {"wall_s", wall}, {"this_invocation_s", this_run}, {"timing_s", timing},
                     {"budget_steps", budget}, {"batch", p.batch}, {"seq_len", seq_len},
                     {"s1_steps", p.s1_steps}, {"s2_steps", p.s2_steps}, {"rank", p.rank}, {"alpha", p.alpha},
                     {"base", base_ref}, {"base_config", base->config().to_json()},
                     {"truncated_train", truncated_train}, {"truncated_test", truncated_test},
                     {"routing", {{"accuracy", rr.accuracy}, {"per_domain", rr.per_class_accuracy}, {"confusion", rr.confusion}}},
                     {"systems", nlohmann::json::object()}};
  for (const auto& r : results) {
    nlohmann::json sj = nlohmann::json::object();
    double a[3] = {0, 0, 0};
    for (int32_t d = 0; d < nd; ++d) {
      const auto& s = r.per_domain[static_cast<std::size_t>(d)];
      sj[D[static_cast<std::size_t>(d)]] = {{"ppl", s.ppl}, {"bleu", s.bleu}, {"rouge_l", s.rouge_l}, {"n_ppl", s.n_ppl}, {"n_gen", s.n_gen}};
      a[0] += s.ppl / nd;
      a[1] += s.bleu / nd;
      a[2] += s.rouge_l / nd;
    }
    sj["average"] = {{"ppl", a[0]}, {"bleu", a[1]}, {"rouge_l", a[2]}};
    out["systems"][r.name] = sj;
  }
  // results.md in the paper's layout: PPL / BLEU / ROUGE-L per domain and system, then averages.
  std::string md = "# Four-domain MoA reproduction (" + p.name + " preset)\n\n";
  md += "Test split, first " + std::to_string(p.eval_ppl) + " examples per domain for perplexity and routing, first " +
        std::to_string(p.eval_gen) + " answered greedily (at most " + std::to_string(p.max_new_tokens) +
        " tokens) for BLEU-4 (sacreBLEU) and ROUGE-L F (rouge-score), x100. Every system: " +
        std::to_string(budget) + " LoRA steps of " + std::to_string(p.batch) + " sequences. Wall time " + fmt(wall / 60, 1) + " min (all invocations of this run folder).\n\n";
  md += "| domain |";
  for (const auto& r : results) md += " " + r.name + " PPL / BLEU / R-L |";
  md += "\n|---|";
  for (std::size_t i = 0; i < results.size(); ++i) md += "---|";
  md += "\n";
  for (int32_t d = 0; d <= nd; ++d) {
    md += d < nd ? "| " + D[static_cast<std::size_t>(d)] + " |" : std::string("| **average** |");
    for (const auto& r : results) {
      const auto& j = out["systems"][r.name][d < nd ? D[static_cast<std::size_t>(d)] : "average"];
      md += " " + fmt(j["ppl"].get<double>(), 3) + " / " + fmt(j["bleu"].get<double>(), 2) + " / " + fmt(j["rouge_l"].get<double>(), 2) + " |";
    }
    md += "\n";
  }
  md += "\nMoA router accuracy (last router): " + fmt(100 * rr.accuracy, 2) + "% overall;";
  for (int32_t d = 0; d < nd; ++d)
    md += " " + D[static_cast<std::size_t>(d)] + " " + fmt(100 * rr.per_class_accuracy[static_cast<std::size_t>(d)], 2) + "%" + (d + 1 < nd ? "," : ".");
  md += "\n\nConfusion (rows: true domain, columns: chosen expert):\n\n| |";
  for (const auto& d : D) md += " " + d + " |";
  md += "\n|---|";
  for (int32_t d = 0; d < nd; ++d) md += "---|";
  md += "\n";
  for (int32_t d = 0; d < nd; ++d) {
    md += "| " + D[static_cast<std::size_t>(d)] + " |";
    for (int64_t v : rr.confusion[static_cast<std::size_t>(d)]) md += " " + std::to_string(v) + " |";
    md += "\n";
  }
  md += "\nTruncated to the context (" + std::to_string(seq_len) + " tokens): " + std::to_string(truncated_train) +
        " training and " + std::to_string(truncated_test) + " test examples.\n";
  write_text_atomic(o.out_dir / "results.md", md);
  write_text_atomic(o.out_dir / "results.json", out.dump(2) + "\n");
  write_text_atomic(o.out_dir / "curves.svg", curves_svg(curves));
  write_text_atomic(o.out_dir / "confusion.svg", confusion_svg(D, rr.confusion));
  runner.log("four-domain: done in " + fmt(wall / 60, 1) + " min; " + (o.out_dir / "results.md").string());
  return out;
}

}  // namespace moa::four_domain
