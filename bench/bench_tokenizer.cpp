// Benchmarks of the tokenizers on real text: GPT-2 byte-level BPE encode / decode of 10 MB, the
// pre-tokenizer alone, BPE training (3 MB to an 8k vocabulary), the llama2.c tokenizer.
//
// The text is the first 10,000,000 bytes (cut back to a UTF-8 boundary) of the four-domain
// train.jsonl records (finance, medicine, stackoverflow, leetcode, in that order), each written as
// instruction "\n" input "\n" output "\n\n": prose, tables, dialogues, code. bench/tokenizer_compare.py
// builds the same text for HF tokenizers. Data come from $MOA_SHARED_DIR (default ../shared).
// With MOA_BENCH_COMPARE_IDS=<file of int32 ids> (written by tokenizer_compare.py --save-ids) the
// GPT-2 benchmark also checks that our ids equal HF's.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/tokenizer/bpe.hpp"
#include "moa/tokenizer/bpe_trainer.hpp"
#include "moa/tokenizer/gpt2_files.hpp"
#include "moa/tokenizer/llama2c.hpp"

namespace fs = std::filesystem;

namespace {

fs::path shared_dir() {
  if (const char* e = std::getenv("MOA_SHARED_DIR")) return e;
  return "../shared";
}

const std::string& bench_text() {
  static const std::string text = [] {
    std::string t;
    for (const char* d : {"finance", "medicine", "stackoverflow", "leetcode"}) {
      std::ifstream in(shared_dir() / "data" / "four-domain" / d / "train.jsonl");
      std::string line;
      while (std::getline(in, line)) {
        const auto r = nlohmann::json::parse(line);
        t += r["instruction"].get<std::string>() + "\n" + r["input"].get<std::string>() + "\n" +
             r["output"].get<std::string>() + "\n\n";
      }
    }
    std::size_t n = std::min<std::size_t>(t.size(), 10'000'000);
    while (n > 0 && n < t.size() && (static_cast<unsigned char>(t[n]) & 0xC0) == 0x80) --n;
    t.resize(n);
    return t;
  }();
  return text;
}

const moa::BpeTokenizer* gpt2() {
  static const moa::BpeTokenizer* tok = [] () -> const moa::BpeTokenizer* {
    const fs::path d = shared_dir() / "models" / "gpt2-tokenizer";
    if (!fs::exists(d / "encoder.json")) return nullptr;
    return new moa::BpeTokenizer(moa::load_gpt2_tokenizer(d));
  }();
  return tok;
}

bool have_data(benchmark::State& state) {
  if (!gpt2() || bench_text().size() < 1'000'000) {
    state.SkipWithError("shared data not found: set MOA_SHARED_DIR");
    return false;
  }
  return true;
}

void BM_gpt2_encode(benchmark::State& state) {
  if (!have_data(state)) return;
  const std::string_view text(bench_text().data(), std::min<std::size_t>(bench_text().size(), state.range(0)));
  std::vector<std::int32_t> ids;
  for (auto _ : state) {
    ids = gpt2()->encode(text);
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * text.size()));
  state.counters["tokens"] = static_cast<double>(ids.size());
  if (const char* path = std::getenv("MOA_BENCH_COMPARE_IDS"); path && text.size() == bench_text().size()) {
    std::ifstream in(path, std::ios::binary);
    std::vector<std::int32_t> ref;
    std::int32_t v;
    while (in.read(reinterpret_cast<char*>(&v), 4)) ref.push_back(v);
    std::size_t mismatch = ref.size() == ids.size() ? 0 : 1;
    for (std::size_t i = 0; i < std::min(ref.size(), ids.size()); ++i) mismatch += ref[i] != ids[i];
    state.counters["ids_differing_from_hf"] = static_cast<double>(mismatch);
  }
}
BENCHMARK(BM_gpt2_encode)->Arg(1'000'000)->Arg(10'000'000)->Unit(benchmark::kMillisecond)->Iterations(3);

void BM_gpt2_pretokenize(benchmark::State& state) {
  if (!have_data(state)) return;
  const std::string& text = bench_text();
  for (auto _ : state) {
    std::size_t pieces = 0;
    moa::split_pretokens(text, moa::SplitPattern::gpt2, [&](std::string_view) { ++pieces; });
    benchmark::DoNotOptimize(pieces);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * text.size()));
}
BENCHMARK(BM_gpt2_pretokenize)->Unit(benchmark::kMillisecond)->Iterations(3);

void BM_gpt2_decode(benchmark::State& state) {
  if (!have_data(state)) return;
  const auto ids = gpt2()->encode(bench_text());
  for (auto _ : state) {
    const std::string s = gpt2()->decode(ids);
    benchmark::DoNotOptimize(s.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bench_text().size()));
}
BENCHMARK(BM_gpt2_decode)->Unit(benchmark::kMillisecond)->Iterations(3);

// Training: the first `range(0)` bytes, as one document per record, to an 8k vocabulary.
void BM_train_bpe(benchmark::State& state) {
  if (!have_data(state)) return;
  std::vector<std::string_view> docs;
  const std::string_view all(bench_text().data(), std::min<std::size_t>(bench_text().size(), state.range(0)));
  for (std::size_t i = 0; i < all.size();) {
    std::size_t e = all.find("\n\n", i);
    e = e == std::string_view::npos ? all.size() : e + 2;
    docs.push_back(all.substr(i, e - i));
    i = e;
  }
  for (auto _ : state) {
    const auto tok = moa::train_bpe(docs, {.vocab_size = 8000});
    benchmark::DoNotOptimize(tok.vocab_size());
    state.counters["vocab"] = tok.vocab_size();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * all.size()));
}
BENCHMARK(BM_train_bpe)->Arg(3'000'000)->Unit(benchmark::kMillisecond)->Iterations(1);

void BM_llama2c_encode(benchmark::State& state) {
  const fs::path p = shared_dir() / "models" / "stories260K" / "tok512.bin";
  if (!fs::exists(p) || bench_text().empty()) {
    state.SkipWithError("shared data not found: set MOA_SHARED_DIR");
    return;
  }
  const auto tok = moa::load_llama2c_tokenizer(p, 512);
  const std::string_view text(bench_text().data(), std::min<std::size_t>(bench_text().size(), state.range(0)));
  for (auto _ : state) {
    const auto ids = tok.encode(text);
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * text.size()));
}
BENCHMARK(BM_llama2c_encode)->Arg(1'000'000)->Unit(benchmark::kMillisecond)->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
