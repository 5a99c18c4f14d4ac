// moa/train/batches.hpp: batches for language-model training: packed windows of a token stream,
// or padded sequences with loss masks (loss only where the mask is set, e.g. on answers).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "moa/core/tensor.hpp"

namespace moa::train {

inline constexpr int32_t kIgnore = -100;

// ids (B, T) i32 and targets (B, T) i32 (kIgnore where no loss).
struct Batch {
  Tensor ids, targets;
  int64_t tokens = 0;       // positions with a loss
};

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual Batch next(Generator& gen) = 0;
};

// Random windows of T + 1 tokens from one long stream (documents joined with an EOS token).
class PackedTokens : public BatchSource {
 public:
  PackedTokens(std::vector<int32_t> tokens, int64_t batch, int64_t seq_len)
      : tokens_(std::move(tokens)), B_(batch), T_(seq_len) {
    MOA_CHECK(B_ > 0 && T_ > 0, ValueError, "PackedTokens: expected positive batch and seq_len, got ", B_, " and ", T_);
    MOA_CHECK(static_cast<int64_t>(tokens_.size()) > T_, ValueError, "PackedTokens: expected more than seq_len = ",
              T_, " tokens, got ", tokens_.size());
  }
  Batch next(Generator& gen) override {
    std::vector<int32_t> ids(static_cast<std::size_t>(B_ * T_)), tg(ids.size());
    const std::uint64_t starts = tokens_.size() - static_cast<std::size_t>(T_);
    for (int64_t b = 0; b < B_; ++b) {
      const std::size_t s = gen.next_below(starts);
      for (int64_t t = 0; t < T_; ++t) {
        ids[static_cast<std::size_t>(b * T_ + t)] = tokens_[s + static_cast<std::size_t>(t)];
        tg[static_cast<std::size_t>(b * T_ + t)] = tokens_[s + static_cast<std::size_t>(t) + 1];
      }
    }
    return {Tensor::from_vector(ids, {B_, T_}), Tensor::from_vector(tg, {B_, T_}), B_ * T_};
  }
  // Consecutive, non-overlapping windows (for a deterministic validation loss).
  std::vector<Batch> sequential(int64_t max_batches) const {
    std::vector<Batch> out;
    std::size_t pos = 0;
    while (static_cast<int64_t>(out.size()) < max_batches) {
      std::vector<int32_t> ids, tg;
      for (int64_t b = 0; b < B_ && pos + static_cast<std::size_t>(T_) < tokens_.size(); ++b) {
        for (int64_t t = 0; t < T_; ++t) {
          ids.push_back(tokens_[pos + static_cast<std::size_t>(t)]);
          tg.push_back(tokens_[pos + static_cast<std::size_t>(t) + 1]);
        }
        pos += static_cast<std::size_t>(T_);
      }
      if (ids.empty()) break;
      const int64_t rows = static_cast<int64_t>(ids.size()) / T_;
      out.push_back({Tensor::from_vector(ids, {rows, T_}), Tensor::from_vector(tg, {rows, T_}), rows * T_});
    }
    return out;
  }

 private:
  std::vector<int32_t> tokens_;
  int64_t B_, T_;
};

// One training example: its tokens and, per token, whether predicting it counts in the loss.
struct Sequence {
  std::vector<int32_t> tokens;
  std::vector<char> loss_mask;  // empty: every token after the first counts
};

// Shuffled epochs of sequences, right-padded to the longest in the batch (at most T + 1 tokens:
// longer ones are truncated), targets kIgnore on padding and unmasked positions.
class PaddedSequences : public BatchSource {
 public:
  PaddedSequences(std::vector<Sequence> seqs, int64_t batch, int64_t seq_len, int32_t pad_id = 0)
      : seqs_(std::move(seqs)), B_(batch), T_(seq_len), pad_(pad_id) {
    MOA_CHECK(!seqs_.empty(), ValueError, "PaddedSequences: expected at least one sequence");
    MOA_CHECK(B_ > 0 && T_ > 0, ValueError, "PaddedSequences: expected positive batch and seq_len");
    for (std::size_t i = 0; i < seqs_.size(); ++i) {
      MOA_CHECK(seqs_[i].tokens.size() >= 2, ValueError, "PaddedSequences: sequence ", i,
                " has fewer than 2 tokens (nothing to predict)");
      MOA_CHECK(seqs_[i].loss_mask.empty() || seqs_[i].loss_mask.size() == seqs_[i].tokens.size(), ShapeError,
                "PaddedSequences: sequence ", i, " has ", seqs_[i].tokens.size(), " tokens but a loss mask of ",
                seqs_[i].loss_mask.size());
    }
    order_.resize(seqs_.size());
    std::iota(order_.begin(), order_.end(), 0);
    cursor_ = order_.size();
  }

  Batch next(Generator& gen) override {
    std::vector<const Sequence*> rows;
    for (int64_t b = 0; b < B_; ++b) {
      if (cursor_ == order_.size()) {  // a new epoch: Fisher-Yates with the run's generator
        for (std::size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[gen.next_below(i)]);
        cursor_ = 0;
      }
      rows.push_back(&seqs_[order_[cursor_++]]);
    }
    return make(rows);
  }

  // Every sequence once, in order (validation).
  std::vector<Batch> sequential() const {
    std::vector<Batch> out;
    for (std::size_t i = 0; i < seqs_.size(); i += static_cast<std::size_t>(B_)) {
      std::vector<const Sequence*> rows;
      for (std::size_t j = i; j < std::min(seqs_.size(), i + static_cast<std::size_t>(B_)); ++j) rows.push_back(&seqs_[j]);
      out.push_back(make(rows));
    }
    return out;
  }

  Batch make(const std::vector<const Sequence*>& rows) const {
    int64_t T = 1;
    for (const Sequence* s : rows) T = std::max<int64_t>(T, std::min<int64_t>(T_, static_cast<int64_t>(s->tokens.size()) - 1));
    const int64_t Bn = static_cast<int64_t>(rows.size());
    std::vector<int32_t> ids(static_cast<std::size_t>(Bn * T), pad_), tg(ids.size(), kIgnore);
    int64_t counted = 0;
    for (int64_t b = 0; b < Bn; ++b) {
      const Sequence& s = *rows[b];
      const int64_t n = std::min<int64_t>(T, static_cast<int64_t>(s.tokens.size()) - 1);
      for (int64_t t = 0; t < n; ++t) {
        ids[static_cast<std::size_t>(b * T + t)] = s.tokens[t];
        if (s.loss_mask.empty() || s.loss_mask[t + 1]) {
          tg[static_cast<std::size_t>(b * T + t)] = s.tokens[t + 1];
          ++counted;
        }
      }
    }
    return {Tensor::from_vector(ids, {Bn, T}), Tensor::from_vector(tg, {Bn, T}), counted};
  }

 private:
  std::vector<Sequence> seqs_;
  int64_t B_, T_;
  int32_t pad_;
  std::vector<std::size_t> order_;
  std::size_t cursor_ = 0;
};

}  // namespace moa::train
