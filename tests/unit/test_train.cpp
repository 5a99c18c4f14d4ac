// The language-model training loop: loss falls, validation loss, gradient accumulation equals a
// big batch, checkpoints resume bitwise, batches and masks.
#include <doctest/doctest.h>

#include <filesystem>

#include "moa/train/lm_trainer.hpp"
#include "test_util.hpp"

using namespace moa;

namespace {

nn::TransformerConfig tiny() {
  nn::TransformerConfig c = nn::TransformerConfig::llama();
  c.vocab_size = 16;
  c.max_seq_len = 32;
  c.dim = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.hidden_dim = 32;
  return c;
}

std::vector<int32_t> pattern(int n) {  // a deterministic next-token rule: t -> (3 t + 1) mod 16
  std::vector<int32_t> v{1};
  while (static_cast<int>(v.size()) < n) v.push_back((3 * v.back() + 1) % 16);
  return v;
}

}  // namespace

TEST_CASE("train_lm: the loss falls on a learnable stream; validation loss is reported") {
  nn::TransformerLM model(tiny(), 1);
  train::PackedTokens data(pattern(400), 4, 16);
  const auto valid = train::PackedTokens(pattern(200), 4, 16).sequential(2);
  train::LMTrainOptions opt{.steps = 60, .adamw = {.lr = 1e-2, .weight_decay = 0.0}, .min_lr = 1e-3,
                            .warmup_steps = 5, .eval_every = 30, .log_every = 10, .quiet = true};
  const auto res = train::train_lm(model, data, valid, opt);
  REQUIRE(res.history.size() >= 6);
  CHECK(res.history.back().loss < 0.2 * res.history.front().loss);
  REQUIRE(res.final_val_loss.has_value());
  CHECK(*res.final_val_loss < 0.3);
  CHECK(res.history.back().tokens_per_s > 0);
}

TEST_CASE("train_lm: gradient accumulation over 2 micro-batches of 2 equals one batch of 4") {
  // Same stream windows: a source that returns fixed batches.
  struct Fixed : train::BatchSource {
    std::vector<train::Batch> bs;
    std::size_t i = 0;
    train::Batch next(Generator&) override { return bs[i++ % bs.size()]; }
  };
  const auto seq = pattern(200);
  std::vector<int32_t> ids, tg;
  for (int r = 0; r < 4; ++r)
    for (int t = 0; t < 8; ++t) {
      ids.push_back(seq[r * 10 + t]);
      tg.push_back(seq[r * 10 + t + 1]);
    }
  const Tensor all_ids = Tensor::from_vector(ids, {4, 8}), all_tg = Tensor::from_vector(tg, {4, 8});
  Fixed big, small;
  big.bs = {{all_ids, all_tg, 32}};
  small.bs = {{all_ids.narrow(0, 0, 2).contiguous(), all_tg.narrow(0, 0, 2).contiguous(), 16},
              {all_ids.narrow(0, 2, 2).contiguous(), all_tg.narrow(0, 2, 2).contiguous(), 16}};
  nn::TransformerLM a(tiny(), 3), b(tiny(), 3);
  train::LMTrainOptions o1{.steps = 3, .adamw = {.lr = 1e-2}, .warmup_steps = 0, .quiet = true};
  train::LMTrainOptions o2 = o1;
  o2.grad_accum = 2;
  train::train_lm(a, big, {}, o1);
  train::train_lm(b, small, {}, o2);
  const auto pa = a.named_parameters(), pb = b.named_parameters();
  double worst = 0;
  for (std::size_t i = 0; i < pa.size(); ++i) worst = std::max(worst, test::max_abs_diff(pa[i].second, pb[i].second));
  CHECK(worst < 1e-5);
}

TEST_CASE("train_lm: an interrupted run resumes from its checkpoint to the same weights, bitwise") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "moa_test_resume";
  fs::remove_all(dir);
  train::PackedTokens data(pattern(300), 2, 8);
  train::LMTrainOptions opt{.steps = 8, .adamw = {.lr = 5e-3}, .warmup_steps = 2, .checkpoint_every = 4,
                            .checkpoint_dir = dir, .quiet = true};
  nn::TransformerLM straight(tiny(), 9);
  {
    train::LMTrainOptions o = opt;
    o.checkpoint_dir.clear();
    train::train_lm(straight, data, {}, o);
  }
  // First 4 steps, then a fresh process (a fresh model) picks up at step 4.
  nn::TransformerLM first(tiny(), 9);
  train::LMTrainOptions o4 = opt;
  o4.steps = 8;
  o4.checkpoint_every = 4;
  {
    // Stop after 4 steps by running a 4-step schedule-compatible prefix: train to 8 would finish,
    // so emulate the interruption with a log callback that throws at step 4 after the checkpoint.
    train::LMTrainOptions oi = o4;
    oi.log_every = 1;
    int64_t seen = 0;
    oi.on_log = [&](const train::StepLog& s) {
      seen = s.step;
      if (s.step == 5) throw std::runtime_error("interrupted");
    };
    CHECK_THROWS_AS(train::train_lm(first, data, {}, oi), std::runtime_error);
    CHECK(seen == 5);
  }
  nn::TransformerLM resumed(tiny(), 123);  // different init: everything must come from the checkpoint
  const auto res = train::train_lm(resumed, data, {}, o4);
  CHECK(res.start_step == 4);
  const auto pa = straight.named_parameters(), pb = resumed.named_parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO(pa[i].first);
    CHECK(pa[i].second.to_vector<float>() == pb[i].second.to_vector<float>());
  }
  fs::remove_all(dir);
}

TEST_CASE("batches: padded sequences mask padding and unmasked tokens; bad input") {
  train::PaddedSequences ps({{{5, 6, 7, 8}, {0, 0, 1, 1}}, {{9, 10}, {}}}, 2, 8, 0);
  const auto bs = ps.sequential();
  REQUIRE(bs.size() == 1);
  CHECK(bs[0].ids.shape() == Shape{2, 3});
  CHECK(bs[0].ids.to_vector<int32_t>() == std::vector<int32_t>{5, 6, 7, 9, 0, 0});
  CHECK(bs[0].targets.to_vector<int32_t>() == std::vector<int32_t>{-100, 7, 8, 10, -100, -100});
  CHECK(bs[0].tokens == 3);
  test::check_throws_with<ValueError>([] { train::PaddedSequences({{{1}, {}}}, 1, 4); }, {"fewer than 2 tokens"});
  test::check_throws_with<ShapeError>([] { train::PaddedSequences({{{1, 2}, {1}}}, 1, 4); }, {"loss mask"});
  test::check_throws_with<ValueError>([] { train::PackedTokens({1, 2}, 1, 4); }, {"more than seq_len"});
  nn::TransformerLM m(tiny(), 1);
  train::PackedTokens data(pattern(100), 2, 8);
  test::check_throws_with<ValueError>([&] { train::train_lm(m, data, {}, {.steps = 0}); }, {"positive steps"});
  m.freeze();
  test::check_throws_with<ValueError>([&] { train::train_lm(m, data, {}, {.steps = 1}); }, {"no trainable"});
}
