// Tests of the tokenizers: byte-level BPE against GPT-2 / HF references (fixtures written by
// tests/fixtures/tokenizer/gen_tokenizer_fixtures.py), the pre-tokenisation regexes, the BPE
// trainer, the llama2.c tokenizer, and bad input.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/tokenizer/bpe.hpp"
#include "moa/tokenizer/bpe_trainer.hpp"
#include "moa/tokenizer/gpt2_files.hpp"
#include "moa/tokenizer/hf_json.hpp"
#include "moa/tokenizer/llama2c.hpp"
#include "moa/tokenizer/load.hpp"

#ifndef MOA_TEST_FIXTURES
#define MOA_TEST_FIXTURES "tests/fixtures"
#endif

namespace fs = std::filesystem;

namespace {

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  REQUIRE_MESSAGE(in.good(), "cannot open fixture ", p.string());
  return nlohmann::json::parse(in);
}

fs::path fixtures() { return fs::path(MOA_TEST_FIXTURES) / "tokenizer"; }

// The shared directory: $MOA_SHARED_DIR, else ../shared from here or from the repo root.
std::optional<fs::path> shared_dir() {
  std::vector<fs::path> cands;
  if (const char* e = std::getenv("MOA_SHARED_DIR")) cands.emplace_back(e);
  cands.emplace_back("../shared");
  cands.emplace_back(fs::path(MOA_TEST_FIXTURES) / ".." / ".." / ".." / "shared");
  for (const auto& c : cands)
    if (fs::is_directory(c / "models")) return c;
  return std::nullopt;
}

std::optional<fs::path> gpt2_dir() {
  auto s = shared_dir();
  if (!s || !fs::exists(*s / "models" / "gpt2-tokenizer" / "encoder.json")) {
    MESSAGE("shared GPT-2 tokenizer files not found (set MOA_SHARED_DIR): skipped");
    return std::nullopt;
  }
  return *s / "models" / "gpt2-tokenizer";
}

const moa::BpeTokenizer& gpt2() {
  static const moa::BpeTokenizer tok = moa::load_gpt2_tokenizer(*gpt2_dir());
  return tok;
}

std::vector<std::int32_t> ids_of(const nlohmann::json& j) { return j.get<std::vector<std::int32_t>>(); }

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("moa_tok_" + name + "_" + std::to_string(std::random_device{}()));
  fs::create_directories(d);
  return d;
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary);
  out << s;
}

}  // namespace

TEST_CASE("tokenizer: pre-tokenisation regexes match the regex module") {
  const auto j = read_json(fixtures() / "pretokens.json");
  const auto& texts = j["texts"];
  for (auto [key, pat] : {std::pair{"gpt2", moa::SplitPattern::gpt2}, std::pair{"llama3", moa::SplitPattern::llama3},
                          std::pair{"qwen2", moa::SplitPattern::qwen2}}) {
    for (std::size_t i = 0; i < texts.size(); ++i) {
      const std::string text = texts[i].get<std::string>();
      std::vector<std::string> got;
      moa::split_pretokens(text, pat, [&](std::string_view p) { got.emplace_back(p); });
      const auto want = j["pieces"][key][i].get<std::vector<std::string>>();
      CAPTURE(key);
      CAPTURE(text);
      CHECK(got == want);
    }
  }
}

TEST_CASE("tokenizer: GPT-2 encodes every fixture text as the reference does") {
  if (!gpt2_dir()) return;
  const auto& tok = gpt2();
  CHECK(tok.vocab_size() == 50257);
  CHECK(tok.eos_id() == 50256);
  CHECK(tok.token_to_id("<|endoftext|>") == 50256);
  CHECK(tok.token_to_id("Ġthe") == 262);
  CHECK(tok.id_to_token(262) == "Ġthe");
  const auto j = read_json(fixtures() / "gpt2_cases.json");
  for (const auto& c : j["cases"]) {
    const std::string text = c["text"].get<std::string>();
    CAPTURE(text);
    CHECK(tok.encode(text) == ids_of(c["ids"]));
    CHECK(tok.encode_ordinary(text) == ids_of(c["ordinary_ids"]));
    CHECK(tok.decode(tok.encode(text)) == text);
    CHECK(tok.decode(tok.encode_ordinary(text)) == text);
  }
}

TEST_CASE("tokenizer: GPT-2 round-trips invalid UTF-8 and random bytes") {
  if (!gpt2_dir()) return;
  const auto& tok = gpt2();
  const std::string bad[] = {std::string("\xff\xfe abc"), std::string("a\x80 b"), std::string("\xe6\x97 x"),
                             std::string("\xed\xa0\x80 surrogate"), std::string("\xc0\xaf overlong"),
                             std::string("\xf4\x90\x80\x80 too big"), std::string("end\xe6")};
  for (const auto& s : bad) CHECK(tok.decode(tok.encode(s)) == s);
  std::mt19937 rng(7);
  for (int t = 0; t < 50; ++t) {
    std::string s(static_cast<std::size_t>(rng() % 200), '\0');
    for (auto& ch : s) ch = static_cast<char>(rng() & 0xFF);
    CHECK(tok.decode(tok.encode(s)) == s);
  }
  CHECK(tok.encode(std::string_view("\x00", 1)) == std::vector<std::int32_t>{tok.token_to_id("Ā").value()});
}

TEST_CASE("tokenizer: BOS / EOS options") {
  if (!gpt2_dir()) return;
  const auto& tok = gpt2();
  const auto ids = tok.encode("Hello", {.add_bos = true, .add_eos = true});
  CHECK(ids == std::vector<std::int32_t>{50256, 15496, 50256});
}

TEST_CASE("tokenizer: HF tokenizer.json files encode as HF tokenizers does") {
  for (const char* name : {"hf_gpt2", "hf_llama3", "hf_smollm", "hf_prefix"}) {
    CAPTURE(name);
    const auto tok = moa::load_hf_tokenizer(fixtures() / name / "tokenizer.json");
    const auto j = read_json(fixtures() / name / "cases.json");
    for (const auto& c : j["cases"]) {
      const std::string text = c["text"].get<std::string>();
      CAPTURE(text);
      CHECK(tok.encode(text) == ids_of(c["ids"]));
      if (std::string(name) != "hf_prefix") CHECK(tok.decode(tok.encode(text)) == text);
    }
  }
}

TEST_CASE("tokenizer: GPT-2 tokenizer saved as tokenizer.json and as GPT-2 files reloads identically") {
  if (!gpt2_dir()) return;
  const auto& tok = gpt2();
  const fs::path d = temp_dir("save");
  moa::save_hf_tokenizer(tok, d / "tokenizer.json");
  moa::save_gpt2_tokenizer(tok, d);
  const auto a = moa::load_hf_tokenizer(d / "tokenizer.json");
  const auto b = moa::load_gpt2_tokenizer(d);
  const auto j = read_json(fixtures() / "gpt2_cases.json");
  for (const auto& c : j["cases"]) {
    const std::string text = c["text"].get<std::string>();
    CHECK(a.encode(text) == ids_of(c["ids"]));
    CHECK(b.encode(text) == ids_of(c["ids"]));
  }
  fs::remove_all(d);
}

TEST_CASE("tokenizer: bad GPT-2 / tokenizer.json files") {
  const fs::path d = temp_dir("bad");
  CHECK_THROWS_AS(moa::load_gpt2_tokenizer(d), moa::IOError);  // missing files
  write_text(d / "encoder.json", "{\"a\": 0, \"b\": 1, \"ab\": 2");
  write_text(d / "vocab.bpe", "#version: 0.2\na b\n");
  CHECK_THROWS_AS(moa::load_gpt2_tokenizer(d), moa::IOError);  // truncated JSON
  write_text(d / "encoder.json", "{\"a\": 0, \"b\": 1, \"ab\": 2}");
  CHECK_NOTHROW(moa::load_gpt2_tokenizer(d));
  write_text(d / "vocab.bpe", "#version: 0.2\na b\na zz\n");
  try {
    (void)moa::load_gpt2_tokenizer(d);
    FAIL("expected an IOError");
  } catch (const moa::IOError& e) {
    CHECK(std::string(e.what()).find("unknown token 'zz'") != std::string::npos);
    CHECK(std::string(e.what()).find("vocab.bpe merge 1") != std::string::npos);
  }
  write_text(d / "vocab.bpe", "#version: 0.2\nab\n");
  CHECK_THROWS_AS(moa::load_gpt2_tokenizer(d), moa::IOError);
  write_text(d / "encoder.json", "[1, 2]");
  CHECK_THROWS_AS(moa::load_gpt2_tokenizer(d), moa::IOError);

  write_text(d / "tokenizer.json", "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}");
  CHECK_THROWS_AS(moa::load_hf_tokenizer(d / "tokenizer.json"), moa::ValueError);
  write_text(d / "tokenizer.json", "{\"model\": ");
  CHECK_THROWS_AS(moa::load_hf_tokenizer(d / "tokenizer.json"), moa::IOError);
  write_text(d / "tokenizer.json",
             R"({"normalizer": null, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated"},
                 "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})");
  try {
    (void)moa::load_hf_tokenizer(d / "tokenizer.json");
    FAIL("expected a ValueError");
  } catch (const moa::ValueError& e) {
    CHECK(std::string(e.what()).find("unsupported regex \\w+") != std::string::npos);
  }
  write_text(d / "tokenizer.json",
             R"({"normalizer": {"type": "NFC"}, "pre_tokenizer": {"type": "ByteLevel"},
                 "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})");
  CHECK_THROWS_AS(moa::load_hf_tokenizer(d / "tokenizer.json"), moa::ValueError);
  CHECK(moa::load_hf_tokenizer(d / "tokenizer.json", {.assume_nfc = true}).vocab_size() == 1);
  write_text(d / "tokenizer.json",
             R"({"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a c"]}})");
  CHECK_THROWS_AS(moa::load_hf_tokenizer(d / "tokenizer.json"), moa::IOError);
  fs::remove_all(d);
}

TEST_CASE("tokenizer: decode of an unknown id names the id and the vocab size") {
  if (!gpt2_dir()) return;
  const std::vector<std::int32_t> ids{15496, 50257};
  try {
    (void)gpt2().decode(ids);
    FAIL("expected an IndexError");
  } catch (const moa::IndexError& e) {
    const std::string w = e.what();
    CHECK(w.find("50257") != std::string::npos);
    CHECK(w.find("vocab size 50257") != std::string::npos);
  }
  CHECK_THROWS_AS(gpt2().decode(std::vector<std::int32_t>{-1}), moa::IndexError);
  CHECK_THROWS_AS(gpt2().id_to_token(60000), moa::IndexError);
}

TEST_CASE("tokenizer: GPT-2 encodes 1 MB of varied text quickly") {
  if (!gpt2_dir()) return;
  const auto j = read_json(fixtures() / "gpt2_cases.json");
  std::string text;
  std::mt19937 rng(1);
  std::vector<std::string> texts;
  for (const auto& c : j["cases"]) texts.push_back(c["text"].get<std::string>());
  while (text.size() < (1u << 20)) {
    text += texts[rng() % texts.size()];
    text += std::to_string(rng()) + " ";
  }
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = gpt2().encode(text);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MESSAGE("GPT-2 encode: ", text.size() / 1e6 / s, " MB/s (", ids.size(), " tokens)");
  CHECK(s < 10.0);  // loose: seconds per MB would mean something went quadratic
  CHECK(gpt2().decode(ids) == text);
}

namespace {
std::optional<fs::path> tok512() {
  auto s = shared_dir();
  if (!s || !fs::exists(*s / "models" / "stories260K" / "tok512.bin")) {
    MESSAGE("shared tok512.bin not found (set MOA_SHARED_DIR): skipped");
    return std::nullopt;
  }
  return *s / "models" / "stories260K" / "tok512.bin";
}
}  // namespace

TEST_CASE("tokenizer: llama2.c tok512.bin encodes as run.c") {
  const auto path = tok512();
  if (!path) return;
  const auto tok = moa::load_llama2c_tokenizer(*path, 512);
  CHECK(tok.vocab_size() == 512);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  CHECK(tok.max_token_length() == 7);
  CHECK(tok.id_to_token(3) == "<0x00>");
  const auto j = read_json(fixtures() / "llama2c_cases.json");
  for (const auto& c : j["cases"]) {
    const std::string text = c["text"].get<std::string>();
    CAPTURE(text);
    const auto ids = tok.encode(text, {.add_bos = true});
    CHECK(ids == ids_of(c["ids"]));
    // run.c's decode drops the dummy-prefix space after BOS: the text comes back exactly.
    CHECK(tok.decode(ids) == text);
  }
  const auto with_eos = tok.encode("Hi", {.add_bos = true, .add_eos = true});
  CHECK(with_eos.back() == 2);
  std::string streamed;
  for (std::size_t i = 0; i < with_eos.size(); ++i) streamed += tok.decode_token(with_eos[i], i ? with_eos[i - 1] : -1);
  CHECK(streamed == "Hi");
  CHECK(moa::load_llama2c_tokenizer(*path).vocab_size() == 512);
  CHECK_THROWS_AS(tok.decode(std::vector<std::int32_t>{512}), moa::IndexError);
}

TEST_CASE("tokenizer: truncated or corrupted llama2.c files") {
  const auto path = tok512();
  if (!path) return;
  std::ifstream in(*path, std::ios::binary);
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const fs::path d = temp_dir("l2c");
  auto expect_io = [&](const std::string& bytes, std::int32_t vocab, const std::string& needle) {
    write_text(d / "tok.bin", bytes);
    try {
      (void)moa::load_llama2c_tokenizer(d / "tok.bin", vocab);
      FAIL("expected an IOError for ", needle);
    } catch (const moa::IOError& e) {
      CAPTURE(e.what());
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
    }
  };
  expect_io(data.substr(0, 2), 512, "tok.bin: expected 4 bytes of max_token_length at offset 0, file ends at 2");
  // token 0: score at 4, length at 8, "<unk>" at 12..17; token 1's score at 17.
  expect_io(data.substr(0, 19), 512, "tok.bin: expected 4 bytes of token 1's score at offset 17, file ends at 19");
  expect_io(data.substr(0, 14), 512, "expected 5 bytes of token 0 at offset 12, file ends at 14");
  expect_io(data.substr(0, data.size() - 3), 512, "token 511");
  expect_io(data, 500, "wrong vocab_size");
  std::string bad = data;
  bad[8] = '\x7f';  // token 0's length
  expect_io(bad, 512, "token 0's length");
  CHECK_THROWS_AS(moa::load_llama2c_tokenizer(d / "missing.bin"), moa::IOError);
  fs::remove_all(d);
}

namespace {
// The training corpus of the trainer tests: the GPT-2 fixture texts, three times.
std::vector<std::string> trainer_corpus() {
  const auto j = read_json(fixtures() / "gpt2_cases.json");
  std::vector<std::string> corpus;
  for (int r = 0; r < 3; ++r)
    for (const auto& c : j["cases"]) corpus.push_back(c["text"].get<std::string>());
  return corpus;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
}  // namespace

TEST_CASE("tokenizer: BPE trainer is deterministic, reserves special tokens, round-trips, reloads") {
  const auto corpus = trainer_corpus();
  const moa::BpeTrainerOptions opts{.vocab_size = 400, .special_tokens = {"<|endoftext|>", "<|pad|>"}};
  const auto a = moa::train_bpe(corpus, opts);
  const auto b = moa::train_bpe(corpus, opts);
  CHECK(a.vocab_size() == 400);
  CHECK(a.merges() == b.merges());
  CHECK(a.token_to_id("<|endoftext|>") == 0);
  CHECK(a.token_to_id("<|pad|>") == 1);
  CHECK(a.eos_id() == 0);
  CHECK(a.encode("x<|pad|>y") == std::vector<std::int32_t>{2 + 'x', 1, 2 + 'y'});
  CHECK(a.id_to_token(2 + ' ') == "Ġ");
  // The first merge is the most frequent pair of the corpus.
  CHECK(a.merges().size() == 400 - 258);
  const fs::path d = temp_dir("train");
  moa::save_gpt2_tokenizer(a, d);
  moa::save_hf_tokenizer(a, d / "tokenizer.json");
  const auto g = moa::load_gpt2_tokenizer(d);
  const auto h = moa::load_hf_tokenizer(d / "tokenizer.json");
  for (const auto& text : corpus) {
    CAPTURE(text);
    const auto ids = a.encode(text);
    CHECK(a.decode(ids) == text);
    CHECK(g.encode(text) == ids);
    CHECK(h.encode(text) == ids);
  }
  CHECK(g.token_to_id("<|pad|>") == 1);
  // Files are complete and no temporaries are left behind.
  std::size_t files = 0;
  for (const auto& e : fs::directory_iterator(d)) files += e.path().filename().string()[0] == '.' ? 100 : 1;
  CHECK(files == 3);
  fs::remove_all(d);
  CHECK_THROWS_AS(moa::train_bpe(corpus, {.vocab_size = 100}), moa::ValueError);
  CHECK_THROWS_AS(moa::train_bpe(corpus, {.vocab_size = 300, .special_tokens = {"<a>", "<a>"}}), moa::ValueError);
}

// tests/fixtures/tokenizer/trained/ holds what train_bpe(trainer_corpus(), vocab 400) saved, and
// cases.json what HF's GPT2Tokenizer and `tokenizers` encode with those files. To regenerate after
// a deliberate trainer change: MOA_REGEN_TOKENIZER_FIXTURES=1 ./moa_tests -tc='*HF reads*', then
// python3 tests/fixtures/tokenizer/gen_tokenizer_fixtures.py.
TEST_CASE("tokenizer: a vocabulary our trainer made: HF reads it and encodes as we do") {
  const auto corpus = trainer_corpus();
  const auto tok = moa::train_bpe(corpus, {.vocab_size = 400, .special_tokens = {"<|endoftext|>", "<|pad|>"}});
  const fs::path dir = fixtures() / "trained";
  if (std::getenv("MOA_REGEN_TOKENIZER_FIXTURES")) {
    fs::create_directories(dir);
    moa::save_gpt2_tokenizer(tok, dir);
    moa::save_hf_tokenizer(tok, dir / "tokenizer.json");
    MESSAGE("wrote ", dir.string(), "; now run gen_tokenizer_fixtures.py");
    return;
  }
  const fs::path d = temp_dir("trained");
  moa::save_gpt2_tokenizer(tok, d);
  moa::save_hf_tokenizer(tok, d / "tokenizer.json");
  for (const char* f : {"encoder.json", "vocab.bpe", "tokenizer.json"}) {
    CAPTURE(f);
    CHECK(slurp(d / f) == slurp(dir / f));
  }
  fs::remove_all(d);
  const auto j = read_json(dir / "cases.json");
  for (const auto& c : j["cases"]) {
    const std::string text = c["text"].get<std::string>();
    CAPTURE(text);
    CHECK(tok.encode(text) == ids_of(c["ids"]));
  }
}

TEST_CASE("tokenizer: load_tokenizer picks the loader by what the path holds") {
  const auto hf = moa::load_tokenizer(fixtures() / "hf_gpt2");
  CHECK(dynamic_cast<const moa::BpeTokenizer*>(hf.get()) != nullptr);
  CHECK(moa::load_tokenizer(fixtures() / "hf_gpt2" / "tokenizer.json")->vocab_size() == hf->vocab_size());
  const fs::path d = temp_dir("load");
  CHECK_THROWS_AS(moa::load_tokenizer(d), moa::IOError);
  CHECK_THROWS_AS(moa::load_tokenizer(d / "nothing"), moa::IOError);
  fs::remove_all(d);
  if (auto g = gpt2_dir()) CHECK(moa::load_tokenizer(*g)->vocab_size() == 50257);
  if (auto t = tok512()) {
    const auto l = moa::load_tokenizer(*t);
    CHECK(l->encode("Once upon a time", {.add_bos = true}) == l->encode("Once upon a time", {.add_bos = true}));
    CHECK(dynamic_cast<const moa::Llama2cTokenizer*>(l.get()) != nullptr);
  }
}
