// Tests of the evaluation metrics: 13a tokens, corpus BLEU and ROUGE-L against sacreBLEU and
// rouge_score (fixtures written by tests/fixtures/metrics/gen_metrics_fixtures.py), perplexity,
// the routing report checked by hand, the line reader, and bad input.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/eval/metrics.hpp"
#include "test_util.hpp"

#ifndef MOA_TEST_FIXTURES
#define MOA_TEST_FIXTURES "tests/fixtures"
#endif

namespace fs = std::filesystem;
using moa::eval::corpus_bleu;

namespace {

const nlohmann::json& cases() {
  static const nlohmann::json doc = [] {
    const fs::path p = fs::path(MOA_TEST_FIXTURES) / "metrics" / "metrics_cases.json";
    std::ifstream in(p);
    REQUIRE_MESSAGE(in.good(), "cannot open fixture ", p.string());
    return nlohmann::json::parse(in);
  }();
  return doc;
}

std::vector<std::string> strings(const char* side) {
  std::vector<std::string> out;
  for (const auto& p : cases()["pairs"]) out.push_back(p[side].get<std::string>());
  return out;
}

std::string join(const std::vector<std::string>& toks) {
  std::string s;
  for (std::size_t i = 0; i < toks.size(); ++i) s += (i ? " " : "") + toks[i];
  return s;
}

// A fresh empty folder under the system temp dir, removed at the end of the scope.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("moa_metrics_" + std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path write(const std::string& name, const std::string& bytes) const {
    std::ofstream(path / name, std::ios::binary) << bytes;
    return path / name;
  }
};

}  // namespace

TEST_CASE("13a tokenisation equals sacreBLEU's on every fixture string") {
  const auto& pairs = cases()["pairs"];
  REQUIRE(pairs.size() >= 200);
  int64_t checked = 0;
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const auto& p = pairs[i];
    for (const std::string side : {"hyp", "ref"}) {
      const auto text = p[side].get<std::string>();
      INFO("pair " << i << " " << side << ": [" << text << "]");
      const auto tok = p[side + "_tok"].get<std::string>();
      CHECK(moa::eval::tokenize_13a(text) == tok);
      // What BLEU counts: the tokenizer on the right-stripped line.
      const auto bleu_tok = p.value(side + "_bleu_tok", tok);
      CHECK(moa::eval::tokenize_13a(moa::eval::detail::py_rstrip(text)) == bleu_tok);
      checked += 2;
    }
  }
  MESSAGE("13a: ", checked, " tokenisations compared");
}

TEST_CASE("13a tokenizer corner cases") {
  using moa::eval::tokenize_13a;
  CHECK(tokenize_13a("") == "");
  CHECK(tokenize_13a("Hello, world!") == "Hello , world !");
  CHECK(tokenize_13a("1,000.5 2-3 a-b") == "1,000.5 2 - 3 a-b");
  CHECK(tokenize_13a("&amp;lt;") == "<");  // sequential passes: &amp; first, then &lt;
  CHECK(tokenize_13a("inter-\nnational") == "international");
  CHECK(tokenize_13a("a\xC2\xA0" "b\xE3\x80\x80" "c\x1F" "d") == "a b c d");  // Python whitespace
  CHECK(tokenize_13a("a\xE2\x80\x8B" "b") == "a\xE2\x80\x8B" "b");             // U+200B is not
}

TEST_CASE("corpus BLEU equals sacreBLEU on the corpus, chunks, single pairs and subsets") {
  const auto hyps = strings("hyp"), refs = strings("ref");
  double max_score = 0, max_prec = 0, max_bp = 0, max_ratio = 0;
  int64_t n_corpora = 0;
  for (const auto& c : cases()["corpora"]) {
    std::vector<std::size_t> idx;
    if (c.contains("range")) {
      for (auto i = c["range"][0].get<std::size_t>(); i < c["range"][1].get<std::size_t>(); ++i) idx.push_back(i);
    } else {
      idx = c["indices"].get<std::vector<std::size_t>>();
    }
    std::vector<std::string> h, r;
    for (const std::size_t i : idx) {
      h.push_back(hyps.at(i));
      r.push_back(refs.at(i));
    }
    INFO("corpus " << c["name"].get<std::string>());
    const moa::eval::BleuResult b = corpus_bleu(h, r);
    CHECK(b.sys_len == c["sys_len"].get<int64_t>());
    CHECK(b.ref_len == c["ref_len"].get<int64_t>());
    CHECK(b.counts == c["counts"].get<std::vector<int64_t>>());
    CHECK(b.totals == c["totals"].get<std::vector<int64_t>>());
    const double ds = std::abs(b.score - c["score"].get<double>());
    const double dp = moa::test::max_abs_diff(b.precisions, c["precisions"].get<std::vector<double>>());
    const double db = std::abs(b.bp - c["bp"].get<double>());
    const double dr = std::abs(b.ratio - c["ratio"].get<double>());
    CHECK(ds <= 1e-6);
    CHECK(dp <= 1e-6);
    CHECK(db <= 1e-6);
    CHECK(dr <= 1e-6);
    max_score = std::max(max_score, ds);
    max_prec = std::max(max_prec, dp);
    max_bp = std::max(max_bp, db);
    max_ratio = std::max(max_ratio, dr);
    ++n_corpora;
  }
  CHECK(n_corpora > 300);
  MESSAGE("BLEU over ", n_corpora, " corpora: max |d score| ", max_score, ", |d precision| ", max_prec, ", |d bp| ",
          max_bp, ", |d ratio| ", max_ratio);
}

TEST_CASE("corpus BLEU by hand") {
  // Identical text scores 100; nothing in common scores 0.
  const auto same = corpus_bleu({"the cat sat on the mat"}, {"the cat sat on the mat"});
  CHECK(same.score == doctest::Approx(100.0));
  CHECK(same.bp == 1.0);
  CHECK(corpus_bleu({"a b c d e"}, {"v w x y z"}).score == 0.0);
  // Three tokens: no 4-grams, so the 4-gram precision is 0 and so is the score (effective_order off).
  const auto short3 = corpus_bleu({"a b c"}, {"a b c"});
  CHECK(short3.score == 0.0);
  CHECK(short3.totals == std::vector<int64_t>{3, 2, 1, 0});
  // Empty hypotheses: brevity penalty 0.
  const auto empty = corpus_bleu({"", ""}, {"x", "y"});
  CHECK(empty.bp == 0.0);
  CHECK(empty.sys_len == 0);
  CHECK(empty.ref_len == 2);
  // 'exp' smoothing: 5 tokens, 1-grams all match, no 2-gram matches: p2 = 100 / (2 * 4),
  // p3 = 100 / (4 * 3), p4 = 100 / (8 * 2).
  const auto sm = corpus_bleu({"a c e g i"}, {"a b c d e f g h i"});
  CHECK(sm.precisions[0] == doctest::Approx(100.0));
  CHECK(sm.precisions[1] == doctest::Approx(12.5));
  CHECK(sm.precisions[2] == doctest::Approx(100.0 / 12));
  CHECK(sm.precisions[3] == doctest::Approx(6.25));
  CHECK(sm.bp == doctest::Approx(std::exp(1.0 - 9.0 / 5.0)));
  CHECK(sm.ratio == doctest::Approx(5.0 / 9.0));
}

TEST_CASE("ROUGE-L equals rouge_score on every fixture pair") {
  const auto& pairs = cases()["pairs"];
  double max_d = 0;
  std::vector<std::string> hyps, refs;
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const auto& p = pairs[i];
    const auto hyp = p["hyp"].get<std::string>(), ref = p["ref"].get<std::string>();
    INFO("pair " << i << ": hyp [" << hyp << "] ref [" << ref << "]");
    CHECK(join(moa::eval::rouge_tokenize(hyp)) == p["hyp_rouge_tok"].get<std::string>());
    CHECK(join(moa::eval::rouge_tokenize(ref)) == p["ref_rouge_tok"].get<std::string>());
    const moa::eval::RougeScore s = moa::eval::rouge_l(hyp, ref);
    const auto want = p["rouge_l"].get<std::vector<double>>();
    const double d = moa::test::max_abs_diff({s.precision, s.recall, s.fmeasure}, want);
    CHECK(d <= 1e-6);
    CHECK(moa::eval::rouge_l_f(hyp, ref) == s.fmeasure);
    max_d = std::max(max_d, d);
    hyps.push_back(hyp);
    refs.push_back(ref);
  }
  const double dm = std::abs(moa::eval::corpus_rouge_l_f(hyps, refs) - cases()["rouge_l_mean_f"].get<double>());
  CHECK(dm <= 1e-6);
  MESSAGE("ROUGE-L over ", pairs.size(), " pairs: max |d P/R/F| ", max_d, ", |d mean F| ", dm);
}

TEST_CASE("ROUGE-L by hand") {
  using moa::eval::rouge_l;
  // LCS of "the cat sat on mat" and "the cat is on the mat" is "the cat on mat" (4).
  const auto s = rouge_l("The cat sat on mat", "the cat is on the mat");
  CHECK(s.precision == doctest::Approx(4.0 / 5));
  CHECK(s.recall == doctest::Approx(4.0 / 6));
  CHECK(s.fmeasure == doctest::Approx(2 * 0.8 * (4.0 / 6) / (0.8 + 4.0 / 6)));
  CHECK(rouge_l("", "a").fmeasure == 0.0);
  CHECK(rouge_l("a", "b").fmeasure == 0.0);
  CHECK(rouge_l("北京", "北京").fmeasure == 0.0);  // no ASCII letters or digits: no tokens
  CHECK(moa::eval::rouge_tokenize("Caf\xC3\xA9 \xC4\xB0stanbul \xE2\x84\xAA" "elvin") ==
        std::vector<std::string>{"caf", "i", "stanbul", "kelvin"});
}

TEST_CASE("perplexity") {
  CHECK(moa::eval::perplexity(10 * std::log(2.0), 10) == doctest::Approx(2.0));
  CHECK(moa::eval::perplexity(0.0, 3) == 1.0);
  moa::test::check_throws_with<moa::ValueError>([] { moa::eval::perplexity(1.0, 0); },
                                                {"perplexity", "n_tokens > 0", "got 0"});
  moa::test::check_throws_with<moa::ValueError>([] { moa::eval::perplexity(std::nan(""), 4); }, {"NaN"});
}

TEST_CASE("routing_report by hand") {
  // 3 classes, 8 samples.
  //   truth: 0 0 0 1 1 2 2 2
  //   pred:  0 1 0 1 1 2 0 1
  // confusion [truth][pred]: row 0 = {2, 1, 0}, row 1 = {0, 2, 0}, row 2 = {1, 1, 1}
  // per class: 2/3, 2/2, 1/3; overall 5/8.
  const auto rep = moa::eval::routing_report({0, 1, 0, 1, 1, 2, 0, 1}, {0, 0, 0, 1, 1, 2, 2, 2}, 3);
  CHECK(rep.confusion == std::vector<std::vector<int64_t>>{{2, 1, 0}, {0, 2, 0}, {1, 1, 1}});
  CHECK(rep.support == std::vector<int64_t>{3, 2, 3});
  CHECK(rep.per_class_accuracy[0] == doctest::Approx(2.0 / 3));
  CHECK(rep.per_class_accuracy[1] == 1.0);
  CHECK(rep.per_class_accuracy[2] == doctest::Approx(1.0 / 3));
  CHECK(rep.n_samples == 8);
  CHECK(rep.n_correct == 5);
  CHECK(rep.accuracy == 5.0 / 8);
  // A class that never occurs as truth has per-class accuracy 0 and support 0.
  const auto rep4 = moa::eval::routing_report({3, 0}, {0, 0}, 4);
  CHECK(rep4.support == std::vector<int64_t>{2, 0, 0, 0});
  CHECK(rep4.per_class_accuracy == std::vector<double>{0.5, 0, 0, 0});
  CHECK(rep4.confusion[0][3] == 1);
}

TEST_CASE("metrics reject bad input") {
  using moa::test::check_throws_with;
  check_throws_with<moa::ValueError>([] { corpus_bleu({"a", "b", "c"}, {"a", "b"}); },
                                     {"corpus_bleu", "expected", "(3 references)", "found 2"});
  check_throws_with<moa::ValueError>([] { corpus_bleu({}, {}); }, {"corpus_bleu", "empty corpus"});
  check_throws_with<moa::ValueError>([] { moa::eval::corpus_rouge_l_f({"a"}, {"a", "b"}); },
                                     {"corpus_rouge_l_f", "expected", "found 2"});
  check_throws_with<moa::ShapeError>([] { moa::eval::routing_report({0, 1}, {0}, 2); },
                                     {"routing_report", "got 2 predicted and 1 true"});
  check_throws_with<moa::IndexError>([] { moa::eval::routing_report({0, 2}, {0, 1}, 2); },
                                     {"routing_report", "predicted label 2 at position 1", "[0, 2)"});
  check_throws_with<moa::IndexError>([] { moa::eval::routing_report({0, 1}, {-1, 1}, 2); },
                                     {"true label -1 at position 0"});
  check_throws_with<moa::ValueError>([] { moa::eval::routing_report({0}, {0}, 0); }, {"n_classes > 0", "got 0"});
  check_throws_with<moa::ValueError>([] { moa::eval::routing_report({}, {}, 2); }, {"at least one sample"});
  check_throws_with<moa::IOError>([] { moa::eval::read_lines("/nonexistent/moa/hyp.txt"); },
                                  {"read_lines", "/nonexistent/moa/hyp.txt", "found nothing"});
}

TEST_CASE("read_lines") {
  TempDir dir;
  using moa::eval::read_lines;
  CHECK(read_lines(dir.write("a.txt", "one\ntwo\r\nthree")) == std::vector<std::string>{"one", "two", "three"});
  CHECK(read_lines(dir.write("b.txt", "one\ntwo\n")) == std::vector<std::string>{"one", "two"});
  CHECK(read_lines(dir.write("c.txt", "")).empty());
  CHECK(read_lines(dir.write("d.txt", "\n\nx\r\r\n")) == std::vector<std::string>{"", "", "x\r"});
  CHECK(read_lines(dir.write("e.txt", "caf\xC3\xA9 \xF0\x9F\x8E\x89\n")) ==
        std::vector<std::string>{"caf\xC3\xA9 \xF0\x9F\x8E\x89"});
  moa::test::check_throws_with<moa::IOError>([&] { read_lines(dir.path); }, {"not a regular file"});
  // A hypothesis file and a reference file scored end to end.
  const auto h = read_lines(dir.write("h.txt", "the cat sat on the mat\nhello world\n"));
  const auto r = read_lines(dir.write("r.txt", "the cat sat on the mat\r\nhello there world\r\n"));
  const auto b = corpus_bleu(h, r);
  CHECK(b.sys_len == 8);
  CHECK(b.ref_len == 9);
}
