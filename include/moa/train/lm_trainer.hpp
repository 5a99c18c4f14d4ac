// moa/train/lm_trainer.hpp: the language-model training loop (full weights or whatever is left
// trainable): gradient accumulation, AdamW, global-norm clipping, warmup + cosine schedule,
// periodic validation loss, progress lines, a JSONL log, and checkpoints that resume bitwise.
#pragma once

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/io/checkpoint.hpp"
#include "moa/nn/transformer.hpp"
#include "moa/optim/adamw.hpp"
#include "moa/optim/clip.hpp"
#include "moa/optim/schedule.hpp"
#include "moa/train/batches.hpp"
#include "moa/train/progress.hpp"

namespace moa::train {

struct StepLog {
  int64_t step = 0;            // 1-based: steps done
  int64_t total = 0;
  double loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0, eta_s = 0, elapsed_s = 0;
  std::optional<double> val_loss;
};

struct LMTrainOptions {
  int64_t steps = 1000;
  int64_t grad_accum = 1;                 // micro-batches per optimizer step
  optim::AdamWConfig adamw{.lr = 3e-4, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
  double min_lr = 3e-5;
  int64_t warmup_steps = 100;
  double grad_clip = 1.0;                 // <= 0: no clipping
  int64_t eval_every = 100;               // 0: only at the end
  int64_t log_every = 10;
  int64_t checkpoint_every = 0;           // 0: only at the end (when checkpoint_dir is set)
  std::filesystem::path checkpoint_dir{}; // empty: no checkpoints
  bool resume = true;                     // continue from checkpoint_dir when it holds one
  std::filesystem::path log_path{};       // JSONL, one object per logged step
  std::uint64_t seed = 1;
  bool quiet = false;                     // no progress lines on stderr
  std::function<void(const StepLog&)> on_log{};
};

struct TrainResult {
  std::vector<StepLog> history;
  int64_t start_step = 0;                 // > 0 when resumed
  std::optional<double> final_val_loss;
};

// Token-weighted mean loss over `batches`, in eval mode without a graph.
inline double evaluate_loss(nn::TransformerLM& model, const std::vector<Batch>& batches) {
  NoGradGuard no_grad;
  const bool was = model.is_training();
  model.eval();
  double sum = 0;
  int64_t n = 0;
  for (const Batch& b : batches) {
    if (b.tokens == 0) continue;
    sum += model.loss(b.ids, b.targets).item<double>() * static_cast<double>(b.tokens);
    n += b.tokens;
  }
  model.train(was);
  return n > 0 ? sum / static_cast<double>(n) : std::nan("");
}

inline std::vector<std::string> trainable_names(const nn::Module& m) {
  std::vector<std::string> out;
  for (auto& [n, t] : m.named_parameters())
    if (t.requires_grad()) out.push_back(n);
  return out;
}

inline TrainResult train_lm(nn::TransformerLM& model, BatchSource& train, const std::vector<Batch>& valid,
                            const LMTrainOptions& opt, const nlohmann::json& metadata = nlohmann::json::object()) {
  MOA_CHECK(opt.steps > 0 && opt.grad_accum > 0 && opt.log_every > 0, ValueError,
            "train_lm: expected positive steps, grad_accum and log_every, got ", opt.steps, ", ", opt.grad_accum,
            " and ", opt.log_every);
  const std::vector<Tensor> params = model.trainable_parameters();
  MOA_CHECK(!params.empty(), ValueError, "train_lm: the model has no trainable parameters");
  const std::vector<std::string> names = trainable_names(model);
  optim::AdamW adamw(params, opt.adamw);
  const optim::WarmupCosine sched{.base_lr = opt.adamw.lr, .min_lr = opt.min_lr,
                                  .warmup_steps = std::min(opt.warmup_steps, opt.steps), .total_steps = opt.steps};
  Generator batch_gen(opt.seed);
  TrainResult result;
  int64_t step = 0;

  if (!opt.checkpoint_dir.empty() && opt.resume && std::filesystem::exists(opt.checkpoint_dir / "state.json")) {
    const io::TrainingCheckpoint ck = io::load_checkpoint(opt.checkpoint_dir);
    model.load_state_dict(std::map<std::string, Tensor>(ck.model.begin(), ck.model.end()), false);
    if (ck.optimizer) io::restore_adamw(adamw, names, *ck.optimizer);
    ck.rng.apply(batch_gen);
    if (ck.metadata.contains("dropout_rng"))
      model.dropout_generator().set_state(ck.metadata["dropout_rng"]["seed"], ck.metadata["dropout_rng"]["offset"]);
    step = ck.step;
    result.start_step = step;
    if (!opt.quiet) std::fprintf(stderr, "resumed from %s at step %lld\n", opt.checkpoint_dir.c_str(), static_cast<long long>(step));
  }

  auto save = [&] {
    if (opt.checkpoint_dir.empty()) return;
    io::TrainingCheckpoint ck;
    for (auto& [n, t] : model.state_dict()) ck.model[n] = t;
    ck.optimizer = io::adamw_state(adamw, names);
    ck.step = step;
    ck.rng = io::RngState::of(batch_gen);
    ck.metadata = metadata;
    ck.metadata["model_config"] = model.config().to_json();
    ck.metadata["dropout_rng"] = {{"seed", model.dropout_generator().seed()}, {"offset", model.dropout_generator().offset()}};
    io::save_checkpoint(opt.checkpoint_dir, ck);
  };

  std::ofstream log;
  if (!opt.log_path.empty()) log.open(opt.log_path, std::ios::app);
  model.train();
  Stopwatch clock;
  const int64_t first = step;
  int64_t tokens_since = 0;
  Stopwatch window;
  while (step < opt.steps) {
    adamw.set_lr(sched.lr(step));
    adamw.zero_grad();
    double loss_sum = 0;
    for (int64_t micro = 0; micro < opt.grad_accum; ++micro) {
      const Batch b = train.next(batch_gen);
      Tensor loss = model.loss(b.ids, b.targets);
      const double lv = loss.item<double>();
      MOA_CHECK(std::isfinite(lv), ValueError, "train_lm: the loss is ", lv, " at step ", step + 1,
                " (diverged: lower the learning rate or check the data)");
      loss_sum += lv;
      (opt.grad_accum > 1 ? scale(loss, 1.0 / static_cast<double>(opt.grad_accum)) : loss).backward();
      tokens_since += b.ids.numel();
    }
    const double norm = opt.grad_clip > 0 ? optim::clip_grad_norm(params, opt.grad_clip) : 0.0;
    adamw.step();
    ++step;
    const bool last = step == opt.steps;
    const bool do_eval = !valid.empty() && (last || (opt.eval_every > 0 && step % opt.eval_every == 0));
    if (step % opt.log_every == 0 || last || do_eval) {
      StepLog s;
      s.step = step;
      s.total = opt.steps;
      s.loss = loss_sum / static_cast<double>(opt.grad_accum);
      s.lr = sched.lr(step - 1);
      s.grad_norm = norm;
      s.tokens_per_s = static_cast<double>(tokens_since) / std::max(window.seconds(), 1e-9);
      s.elapsed_s = clock.seconds();
      s.eta_s = clock.eta(step - first, opt.steps - first);
      if (do_eval) s.val_loss = evaluate_loss(model, valid);
      tokens_since = 0;
      window = Stopwatch();
      if (!opt.quiet)
        std::fprintf(stderr, "step %lld/%lld | loss %.4f%s | lr %.2e | grad-norm %.3f | %.0f tok/s | ETA %s\n",
                     static_cast<long long>(step), static_cast<long long>(opt.steps), s.loss,
                     s.val_loss ? (" | val " + std::to_string(*s.val_loss).substr(0, 6)).c_str() : "", s.lr, norm,
                     s.tokens_per_s, format_duration(s.eta_s).c_str());
      if (log.is_open()) {
        nlohmann::json j = {{"step", s.step}, {"loss", s.loss}, {"lr", s.lr}, {"grad_norm", s.grad_norm},
                            {"tokens_per_s", s.tokens_per_s}, {"elapsed_s", s.elapsed_s}};
        if (s.val_loss) j["val_loss"] = *s.val_loss;
        log << j.dump() << "\n" << std::flush;
      }
      if (opt.on_log) opt.on_log(s);
      if (s.val_loss) result.final_val_loss = s.val_loss;
      result.history.push_back(s);
    }
    if (opt.checkpoint_every > 0 && step % opt.checkpoint_every == 0 && !last) save();
  }
  save();
  return result;
}

}  // namespace moa::train
