// The four-domain reproduction program (examples/four_domain.hpp): fitting examples into the
// context, batches with answer-only targets, domain-balanced sampling, and a whole tiny run that is
// interrupted and resumed and gives exactly what an uninterrupted run gives.
#include <doctest/doctest.h>

#include <fstream>

#include "four_domain.hpp"
#include "mock_device.hpp"
#include "test_util.hpp"

using namespace moa;
namespace fd = moa::four_domain;
namespace fs = std::filesystem;

TEST_CASE("four-domain: fit keeps short examples whole; long ones keep the prompt's start and end and the answer's start") {
  std::vector<int32_t> p(10), a(5);
  std::iota(p.begin(), p.end(), 100);
  std::iota(a.begin(), a.end(), 200);
  const fd::Encoded whole = fd::fit(p, a, 32, 2);
  CHECK(whole.tokens.size() == 15);
  CHECK(whole.prompt_len == 10);
  CHECK(whole.domain == 2);
  CHECK_FALSE(whole.truncated);

  // 40 prompt + 40 answer tokens into 32 + 1: the answer keeps half the room (16 tokens), the prompt
  // its first 9 and last 8 tokens.
  std::vector<int32_t> lp(40), la(40);
  std::iota(lp.begin(), lp.end(), 1000);
  std::iota(la.begin(), la.end(), 2000);
  const fd::Encoded cut = fd::fit(lp, la, 32, 0);
  CHECK(cut.truncated);
  CHECK(cut.tokens.size() == 33);
  CHECK(cut.prompt_len == 16);
  CHECK(cut.tokens[0] == 1000);
  CHECK(cut.tokens[7] == 1007);
  CHECK(cut.tokens[8] == 1032);   // the prompt's last 8 tokens (the response header)
  CHECK(cut.tokens[15] == 1039);
  CHECK(cut.tokens[16] == 2000);  // then the answer's first tokens
  CHECK(cut.tokens[32] == 2016);

  // A short prompt with a long answer: the prompt stays whole, the answer fills the rest.
  const fd::Encoded ans = fd::fit(p, la, 32, 0);
  CHECK(ans.prompt_len == 10);
  CHECK(ans.tokens.size() == 33);
  CHECK(ans.tokens.back() == 2022);
}

TEST_CASE("four-domain: batches have targets on answer tokens only and a prompt mask on the prompt") {
  const fd::Encoded a{{1, 2, 3, 4, 5}, 3, 1, false}, b{{7, 8, 9}, 1, 3, false};
  const mixture::MoABatch mb = fd::make_batch({&a, &b}, 0);
  CHECK(mb.ids.shape() == Shape{2, 4});
  CHECK(mb.ids.to_vector<int32_t>() == std::vector<int32_t>{1, 2, 3, 4, 7, 8, 0, 0});
  // Row 0 predicts tokens 4 and 5 (positions 2 and 3); row 1 predicts 8 and 9.
  CHECK(mb.targets.to_vector<int32_t>() == std::vector<int32_t>{-100, -100, 4, 5, 8, 9, -100, -100});
  CHECK(mb.prompt_mask.to_vector<float>() == std::vector<float>{1, 1, 1, 0, 1, 0, 0, 0});
  CHECK(mb.domain == std::vector<int32_t>{1, 3});
}

TEST_CASE("four-domain: the sampler balances domains, covers each domain per epoch, and replays by skip") {
  std::vector<std::vector<fd::Encoded>> data(3);
  for (int d = 0; d < 3; ++d)
    for (int i = 0; i < 4 + d; ++i) data[static_cast<std::size_t>(d)].push_back({{d, i, 0}, 1, d, false});
  fd::Sampler s(data, 5);
  std::map<std::pair<int, int>, int> seen;
  for (int step = 0; step < 4; ++step) {
    const auto rows = s.next({0, 1, 2}, 6);
    REQUIRE(rows.size() == 6);
    int per[3] = {0, 0, 0};
    for (const auto* r : rows) {
      ++per[r->domain];
      ++seen[{r->tokens[0], r->tokens[1]}];
    }
    CHECK(per[0] == 2);
    CHECK(per[1] == 2);
    CHECK(per[2] == 2);
  }
  for (int i = 0; i < 4; ++i) CHECK(seen[{0, i}] == 2);  // 8 draws of domain 0 = two whole epochs
  fd::Sampler a(data, 9), b(data, 9);
  a.skip({0, 1, 2}, 6, 3);
  for (int i = 0; i < 3; ++i) (void)b.next({0, 1, 2}, 6);
  CHECK(a.next({0, 1, 2}, 6) == b.next({0, 1, 2}, 6));
}

namespace {

// Four small synthetic domains in the instruction layout, each with its own words.
void write_domains(const fs::path& dir) {
  const char* names[] = {"finance", "leetcode", "medicine", "stackoverflow"};
  const char* words[][4] = {{"revenue", "profit", "share", "dividend"},
                            {"array", "integer", "return", "index"},
                            {"pain", "fever", "doctor", "dose"},
                            {"git", "branch", "commit", "merge"}};
  for (int d = 0; d < 4; ++d) {
    fs::create_directories(dir / names[d]);
    for (const char* split : {"train", "valid", "test"}) {
      std::ofstream f(dir / names[d] / (std::string(split) + ".jsonl"));
      const int n = std::string(split) == "train" ? 24 : 8;
      for (int i = 0; i < n; ++i) {
        const std::string w = words[d][i % 4], v = words[d][(i + 1) % 4];
        f << nlohmann::json{{"id", std::string(names[d]) + "-" + split + std::to_string(i)},
                            {"domain", names[d]},
                            {"instruction", "Tell me about the " + w + " " + std::to_string(i) + "."},
                            {"input", i % 3 ? "" : "The " + v + " matters."},
                            {"output", "The " + w + " goes with the " + v + " " + std::to_string(i % 5) + " times."}}
                 .dump()
          << "\n";
      }
    }
  }
}

}  // namespace

TEST_CASE("four-domain: a tiny run writes the report; interrupted and resumed, it gives the same numbers") {
  const fs::path root = fs::temp_directory_path() / "moa_test_four_domain";
  fs::remove_all(root);
  write_domains(root / "data");
  fd::Options o;
  o.data_dir = root / "data";
  o.out_dir = root / "straight";
  o.preset = "tiny";
  o.quiet = true;
  const nlohmann::json straight = fd::run(o);
  for (const char* f : {"results.md", "results.json", "curves.svg", "confusion.svg", "tokenizer.json"})
    CHECK(fs::exists(root / "straight" / f));
  for (const char* s : {"base", "single-lora", "moa", "mixed-lora", "moe-lora", "moe-naive"}) {
    INFO(s);
    if (std::string(s) != "base") CHECK(fs::exists(root / "straight" / "systems" / s / "moa_config.json"));
    const auto& avg = straight["systems"][s]["average"];
    CHECK(std::isfinite(avg["ppl"].get<double>()));
    CHECK(avg["ppl"].get<double>() > 1.0);
  }
  CHECK(straight["budget_steps"].get<int64_t>() == 4 * 4 + 4);
  const auto confusion = straight["routing"]["confusion"].get<std::vector<std::vector<int64_t>>>();
  int64_t routed = 0;
  for (const auto& row : confusion)
    for (int64_t v : row) routed += v;
  CHECK(routed == 4 * 6);  // eval_ppl test prompts per domain
  const std::string md = [&] {
    std::ifstream in(root / "straight" / "results.md");
    return std::string(std::istreambuf_iterator<char>(in), {});
  }();
  CHECK(md.find("| **average** |") != std::string::npos);
  CHECK(md.find("MoA router accuracy") != std::string::npos);
  {  // every phase drew a line: 4 single-LoRA phases, MoA stage 2, mixed, MoE-LoRA, MoE naive
    std::ifstream in(root / "straight" / "curves.svg");
    const std::string svg(std::istreambuf_iterator<char>(in), {});
    std::size_t lines = 0, pos = 0;
    while ((pos = svg.find("<polyline", pos)) != std::string::npos) {
      ++lines;
      const auto pts = svg.find("points=\"", pos);
      REQUIRE(pts != std::string::npos);
      CHECK(svg[pts + 8] != '"');  // not empty
      ++pos;
    }
    CHECK(lines == 8);
  }

  // Stopped in the middle of MoA's stage 2 (after step 3; the checkpoint is at step 2), then run
  // again: finished phases are loaded, the stopped one resumes, and every number is the same.
  o.out_dir = root / "resumed";
  o.stop_after = "moa-stage2:3";
  test::check_throws_with<fd::Interrupted>([&] { (void)fd::run(o); }, {"stopped after step 3 of moa-stage2"});
  CHECK(fs::exists(root / "resumed" / "systems" / "single-lora" / "moa_config.json"));
  CHECK_FALSE(fs::exists(root / "resumed" / "systems" / "moa"));
  o.stop_after.clear();
  const nlohmann::json resumed = fd::run(o);
  CHECK(resumed["systems"] == straight["systems"]);
  CHECK(resumed["routing"] == straight["routing"]);

  // Without data: a clear error naming what is missing.
  o.data_dir = root / "nothing";
  test::check_throws_with<Error>([&] { (void)fd::run(o); }, {"nothing"});
  fs::remove_all(root);
}

TEST_CASE("four-domain: the tiny run with --device on a (mock) device gives the cpu's numbers") {
  const fs::path root = fs::temp_directory_path() / "moa_test_four_domain_device";
  fs::remove_all(root);
  write_domains(root / "data");
  fd::Options o;
  o.data_dir = root / "data";
  o.preset = "tiny";
  o.quiet = true;
  o.out_dir = root / "cpu";
  const nlohmann::json cpu = fd::run(o);
  moa::testing::MockDeviceScope mock;
  o.out_dir = root / "device";
  o.device = Device::cuda();
  const nlohmann::json dev = fd::run(o);
  CHECK(mock.device.kernel_calls > 1000);
  for (const char* s : {"base", "single-lora", "moa", "mixed-lora", "moe-lora", "moe-naive"}) {
    INFO(s);
    const double a = dev["systems"][s]["average"]["ppl"].get<double>(), b = cpu["systems"][s]["average"]["ppl"].get<double>();
    CHECK(std::abs(a - b) <= 1e-3 * b);  // float rounding differs in a few reductions; 20 training steps
  }
  CHECK(dev["routing"]["confusion"] == cpu["routing"]["confusion"]);
  fs::remove_all(root);
}
