// Tests of moa/data: SHA-1 known answers, reading instruction data (JSON arrays, JSONL, the domain
// per file, errors naming file and line), loading domain folders, the prompt template, JSONL
// written byte for byte like Python's json.dumps, and `moa data prepare` on the published raw files
// against the converted copy in ../shared/data/four-domain (byte-identical).
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "moa/data/hash.hpp"
#include "moa/data/instruct.hpp"
#include "moa/data/prepare.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using moa::test::check_throws_with;
using namespace moa::data;

namespace {

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE_MESSAGE(in.good(), "cannot open ", p.string());
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
  REQUIRE(out.good());
}

// A fresh directory under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static int n = 0;
    path = fs::temp_directory_path() / ("moa_test_data_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& s) const { return path / s; }
};

fs::path four_domain_dir() { return moa::test::shared_dir() / "data" / "four-domain"; }
fs::path raw_dir() { return moa::test::shared_dir() / "data" / "four-domain-raw"; }

std::string line(const std::string& domain, const std::string& instruction, const std::string& output) {
  return R"({"domain": ")" + domain + R"(", "instruction": ")" + instruction + R"(", "output": ")" + output + "\"}\n";
}

}  // namespace

TEST_CASE("sha1: FIPS 180 and common known answers, any chunking") {
  CHECK(sha1_hex("") == "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  CHECK(sha1_hex("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d");
  CHECK(sha1_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
  CHECK(sha1_hex("The quick brown fox jumps over the lazy dog") == "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12");
  const std::string million(1000000, 'a');
  CHECK(sha1_hex(million) == "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
  // 55, 56, 63, 64, 65 bytes: the padding boundaries.
  CHECK(sha1_hex(std::string(55, 'a')) == "c1c8bbdc22796e28c0e15163d20899b65621d65a");
  CHECK(sha1_hex(std::string(56, 'a')) == "c2db330f6083854c99d4b5bfb6e8f29f201be699");
  CHECK(sha1_hex(std::string(64, 'a')) == "0098ba824b5c16427bd7a1122a5a442a25ec644d");
  Sha1 h;
  for (std::size_t i = 0; i < million.size();) {
    const std::size_t n = std::min<std::size_t>(1 + i % 97, million.size() - i);
    h.update(std::string_view(million).substr(i, n));
    i += n;
  }
  CHECK(to_hex(h.digest()) == "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
}

TEST_CASE("example_id: domain + first 12 hex of SHA-1(domain NUL instruction NUL input)") {
  // Values from Python: d + '-' + hashlib.sha1((d + '\0' + i + '\0' + n).encode()).hexdigest()[:12]
  CHECK(example_id("medicine", "What is X?", "") == "medicine-f4764522ea43");
  CHECK(example_id("finance", "Q", "ctx \xC3\xA9") == "finance-396b4ea7fbb0");
}

TEST_CASE("read_examples: JSONL and JSON arrays, optional fields, the domain per file") {
  TempDir tmp;
  // A BOM, CRLF endings, a blank line, an absent and a null input, an explicit id.
  write_bytes(tmp / "a.jsonl", "\xEF\xBB\xBF" + line("law", "Q1", "A1") + "\r\n   \n" +
                                   R"({"id": "k", "domain": "law", "source": "s", "instruction": "Q2", "input": null, "output": "A2"})"
                                   "\r\n" +
                                   R"({"domain": "law", "instruction": "Q3", "input": "ctx", "output": "A3", "extra": 1})");
  auto ex = read_examples(tmp / "a.jsonl");
  REQUIRE(ex.size() == 3);
  CHECK(ex[0].domain == "law");
  CHECK(ex[0].instruction == "Q1");
  CHECK(ex[0].input.empty());
  CHECK(ex[0].output == "A1");
  CHECK(ex[0].id == example_id("law", "Q1", ""));
  CHECK(ex[1].id == "k");
  CHECK(ex[1].source == "s");
  CHECK(ex[1].input.empty());
  CHECK(ex[2].input == "ctx");

  write_bytes(tmp / "b.json", "\n  [" R"({"instruction": "Q", "output": "A"},)"
                              "\n" R"({"instruction": "R", "input": "i", "output": "B", "domain": "x"}])");
  CHECK_THROWS_AS(read_examples(tmp / "b.json"), moa::ValueError);  // the first record has no domain
  check_throws_with<moa::ValueError>([&] { read_examples(tmp / "b.json"); },
                                     {"b.json: element 0", "no \"domain\""});
  ex = read_examples(tmp / "b.json", "med");  // the file's domain fills and overrides
  REQUIRE(ex.size() == 2);
  CHECK(ex[0].domain == "med");
  CHECK(ex[1].domain == "med");
  CHECK(ex[1].input == "i");

  write_bytes(tmp / "empty.jsonl", " \n\n");
  CHECK(read_examples(tmp / "empty.jsonl").empty());

  // Prompts (moa route): output and domain may be absent; the instruction may not.
  write_bytes(tmp / "p.jsonl", R"({"instruction": "Q"})" "\n" R"({"instruction": "R", "domain": "x", "output": "B"})" "\n");
  ex = read_prompts(tmp / "p.jsonl");
  REQUIRE(ex.size() == 2);
  CHECK(ex[0].domain.empty());
  CHECK(ex[0].output.empty());
  CHECK(ex[0].id.empty());
  CHECK(ex[1].domain == "x");
  CHECK(ex[1].id == example_id("x", "R", ""));
  write_bytes(tmp / "q.jsonl", R"({"input": "no instruction"})" "\n");
  check_throws_with<moa::IOError>([&] { read_prompts(tmp / "q.jsonl"); }, {"q.jsonl:1", "instruction"});
}

TEST_CASE("read_examples: a malformed record names the file, the line and what was wrong") {
  TempDir tmp;
  write_bytes(tmp / "bad.jsonl", line("d", "Q", "A") + "\n" + R"({"domain": "d", "instruction": "Q", "output": )" + "\n");
  check_throws_with<moa::IOError>([&] { read_examples(tmp / "bad.jsonl"); },
                                  {"bad.jsonl:3", "malformed JSON", "expected one JSON object"});
  write_bytes(tmp / "miss.jsonl", line("d", "Q", "A") + R"({"domain": "d", "instruction": "Q"})" + "\n");
  check_throws_with<moa::IOError>([&] { read_examples(tmp / "miss.jsonl"); }, {"miss.jsonl:2", "missing \"output\""});
  write_bytes(tmp / "type.jsonl", R"({"domain": "d", "instruction": 7, "output": "A"})");
  check_throws_with<moa::IOError>([&] { read_examples(tmp / "type.jsonl"); },
                                  {"type.jsonl:1", "expected \"instruction\" to be a string, got number"});
  write_bytes(tmp / "arr.jsonl", "[1, 2]\n");  // a JSON array whose elements are not objects
  check_throws_with<moa::IOError>([&] { read_examples(tmp / "arr.jsonl", "d"); },
                                  {"arr.jsonl: element 0", "expected a JSON object", "got number"});
  write_bytes(tmp / "arr2.json", R"([{"instruction": "Q", "output": "A"}, {"instruction": "Q"}])");
  check_throws_with<moa::IOError>([&] { read_examples(tmp / "arr2.json", "d"); },
                                  {"arr2.json: element 1", "missing \"output\""});
  write_bytes(tmp / "trunc.json", R"([{"instruction": "Q", "output": "A"}, )");
  check_throws_with<moa::IOError>([&] { read_examples(tmp / "trunc.json", "d"); }, {"trunc.json", "not a valid JSON"});
  write_bytes(tmp / "utf8.jsonl", "{\"domain\": \"d\", \"instruction\": \"\xC3\", \"output\": \"A\"}\n");
  check_throws_with<moa::IOError>([&] { read_examples(tmp / "utf8.jsonl"); }, {"utf8.jsonl:1", "malformed JSON"});
  check_throws_with<moa::IOError>([&] { read_examples(tmp / "nope.jsonl"); }, {"nope.jsonl"});
}

TEST_CASE("load_four_domain: splits per folder, and the errors for bad layouts") {
  TempDir tmp;
  write_bytes(tmp / "ok/b/train.jsonl", line("b", "Q1", "A") + line("b", "Q2", "A"));
  write_bytes(tmp / "ok/b/test.jsonl", line("b", "Q3", "A"));
  write_bytes(tmp / "ok/a/train.jsonl", R"({"instruction": "Q", "output": "A"})");  // domain from the folder
  write_bytes(tmp / "ok/a/valid.jsonl", line("a", "V", "A"));
  fs::create_directories(tmp / "ok/.hidden");
  auto s = load_four_domain(tmp / "ok");
  CHECK(s.domains == std::vector<std::string>{"a", "b"});
  CHECK(s.train["a"].size() == 1);
  CHECK(s.train["a"][0].domain == "a");
  CHECK(s.valid["a"].size() == 1);
  CHECK(s.test["a"].empty());
  CHECK(s.train["b"].size() == 2);
  CHECK(s.test["b"].size() == 1);
  s = load_four_domain(tmp / "ok", {"b", "a"});
  CHECK(s.domains == std::vector<std::string>{"b", "a"});

  write_bytes(tmp / "empty/a/train.jsonl", line("a", "Q", "A"));
  write_bytes(tmp / "empty/z/train.jsonl", "\n");
  write_bytes(tmp / "empty/z/test.jsonl", line("z", "Q", "A"));
  check_throws_with<moa::ValueError>([&] { load_four_domain(tmp / "empty"); },
                                     {"domain \"z\"", "empty train split", "train.jsonl"});

  write_bytes(tmp / "testonly/a/train.jsonl", line("a", "Q", "A"));
  write_bytes(tmp / "testonly/law/test.jsonl", line("law", "Q", "A"));
  check_throws_with<moa::ValueError>([&] { load_four_domain(tmp / "testonly"); },
                                     {"domain \"law\"", "test/valid data but not in the training data"});

  write_bytes(tmp / "mismatch/a/train.jsonl", line("a", "Q", "A") + line("a", "Q2", "A"));
  write_bytes(tmp / "mismatch/a/test.jsonl", line("a", "Q", "A") + "\n" + line("b", "Q", "A"));
  check_throws_with<moa::ValueError>([&] { load_four_domain(tmp / "mismatch"); },
                                     {"a/test.jsonl:3", "domain \"b\" disagrees with its folder \"a\""});

  check_throws_with<moa::IOError>([&] { load_four_domain(tmp / "ok", {"a", "c"}); }, {"domain \"c\"", "no folder"});
  check_throws_with<moa::IOError>([&] { load_four_domain(tmp / "absent"); }, {"absent", "not a directory"});
  fs::create_directories(tmp / "none");
  check_throws_with<moa::ValueError>([&] { load_four_domain(tmp / "none"); }, {"no domain folders"});
}

TEST_CASE("load_four_domain: the shared four-domain data has README's counts and round-trips byte for byte") {
  const fs::path dir = four_domain_dir();
  if (!fs::exists(dir)) {
    MESSAGE("skipped: " << dir << " not found (set MOA_SHARED_DIR)");
    return;
  }
  const auto s = load_four_domain(dir);
  CHECK(s.domains == std::vector<std::string>{"finance", "leetcode", "medicine", "stackoverflow"});
  const std::map<std::string, std::size_t> train = {
      {"finance", 7366}, {"medicine", 10433}, {"stackoverflow", 4438}, {"leetcode", 1275}};
  for (const auto& [d, n] : train) {
    CHECK_MESSAGE(s.train.at(d).size() == n, d);
    CHECK_MESSAGE(s.valid.at(d).size() == 300, d);
    CHECK_MESSAGE(s.test.at(d).size() == 500, d);
  }
  // Every record: its id is example_id of its text, and writing it gives its line back exactly.
  for (const auto& [d, n] : train) {
    for (const auto* split : {&s.train, &s.valid, &s.test}) {
      const char* name = split == &s.train ? "train.jsonl" : split == &s.valid ? "valid.jsonl" : "test.jsonl";
      const std::string text = read_bytes(dir / d / name);
      std::string written;
      std::size_t bad_ids = 0;
      for (const Example& e : split->at(d)) {
        written += to_json_line(e) + "\n";
        bad_ids += e.id != example_id(e.domain, e.instruction, e.input);
      }
      CHECK_MESSAGE(bad_ids == 0, d, "/", name);
      CHECK_MESSAGE(written == text, d, "/", name);
    }
  }
}

TEST_CASE("prompt_text: Alpaca's template with and without an input; answer_text is the output") {
  Example e{"id", "d", "s", "Add the numbers.", "", "5"};
  CHECK(prompt_text(e) ==
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n");
  e.input = "2 and 3";
  CHECK(prompt_text(e) ==
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and "
        "3\n\n### Response:\n");
  CHECK(answer_text(e) == "5");
}

TEST_CASE("write_jsonl: Python's json.dumps(ensure_ascii=False) byte for byte, atomic, UTF-8 checked") {
  TempDir tmp;
  // Escapes: quote, backslash, \n \t by name, other controls as \u00xx; DEL, é, an emoji and U+2028
  // copied as UTF-8. The expected line is Python's output.
  const Example e{"x-1", "code", "s\xC3\xA9",
                  "a\"b\\c\n\t\x01\x1f\x7f \xC3\xA9 \xF0\x9F\x98\x80 \xE2\x80\xA8",
                  "", "</tag> \r\b\f"};
  const std::string expected =
      R"({"id": "x-1", "domain": "code", "source": "s)" "\xC3\xA9" R"(", "instruction": "a\"b\\c\n\t\u0001\u001f)"
      "\x7f \xC3\xA9 \xF0\x9F\x98\x80 \xE2\x80\xA8" R"(", "input": "", "output": "</tag> \r\b\f"})";
  CHECK(to_json_line(e) == expected);
  write_jsonl(tmp / "out.jsonl", {e, e});
  CHECK(read_bytes(tmp / "out.jsonl") == expected + "\n" + expected + "\n");
  const auto back = read_examples(tmp / "out.jsonl");
  REQUIRE(back.size() == 2);
  CHECK(back[1].instruction == e.instruction);
  CHECK(back[1].output == e.output);

  Example bad = e;
  bad.output = "ok \xC3";
  check_throws_with<moa::ValueError>([&] { write_jsonl(tmp / "out.jsonl", {e, bad}); },
                                     {"\"x-1\"", "\"output\" is not valid UTF-8"});
  CHECK(read_bytes(tmp / "out.jsonl") == expected + "\n" + expected + "\n");  // untouched
  for (const auto& f : fs::directory_iterator(tmp.path)) CHECK(f.path().filename() == "out.jsonl");
}

TEST_CASE("prepare helpers: Python's strip, splitlines, slicing and str(float)") {
  using namespace moa::data::detail;
  CHECK(py_strip("\xE3\x80\x80 a b\xC2\xA0\n") == "a b");  // U+3000 and NBSP are spaces to Python
  CHECK(py_strip("\xE2\x80\x8B" "a") == "\xE2\x80\x8B" "a");   // U+200B is not
  CHECK(py_strip(" \t ").empty());
  CHECK(py_splitlines("a\r\nb\rc\x0b" "d\xE2\x80\xA8" "e\n") == std::vector<std::string_view>{"a", "b", "c", "d", "e"});
  CHECK(py_splitlines("a\n\nb") == std::vector<std::string_view>{"a", "", "b"});
  CHECK(py_prefix("\xC3\xA9\xC3\xA9x", 2) == "\xC3\xA9\xC3\xA9");
  CHECK(py_float_str(45.48) == "45.48");
  CHECK(py_float_str(2.0) == "2.0");
  CHECK(py_float_str(-0.0) == "-0.0");
  CHECK(py_float_str(0.1 + 0.2) == "0.30000000000000004");
  CHECK(py_float_str(1e15) == "1000000000000000.0");
  CHECK(py_float_str(1e16) == "1e+16");
  CHECK(py_float_str(1.5e16) == "1.5e+16");
  CHECK(py_float_str(0.0001) == "0.0001");
  CHECK(py_float_str(0.00001) == "1e-05");
  CHECK(py_float_str(-1.25e-7) == "-1.25e-07");
  CHECK(py_float_str(1.7976931348623157e308) == "1.7976931348623157e+308");
  CHECK(py_str(nlohmann::json::parse("[-29253, 13.0, true, null]")[0]) == "-29253");
  CHECK(py_str(nlohmann::json::parse("[-29253, 13.0, true, null]")[1]) == "13.0");
  CHECK(py_str(nlohmann::json::parse("[-29253, 13.0, true, null]")[2]) == "True");
  CHECK(py_str(nlohmann::json::parse("[-29253, 13.0, true, null]")[3]) == "None");
}

TEST_CASE("prepare_four_domain: the published raw files give ../shared/data/four-domain byte for byte") {
  const fs::path raw = raw_dir(), ref = four_domain_dir();
  if (!fs::exists(raw) || !fs::exists(ref)) {
    MESSAGE("skipped: " << raw << " or " << ref << " not found (set MOA_SHARED_DIR)");
    return;
  }
  TempDir tmp;
  const auto t0 = std::chrono::steady_clock::now();
  const auto counts = prepare_four_domain(raw, tmp / "out");
  MESSAGE("prepare_four_domain: "
          << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s");
  REQUIRE(counts.size() == 4);
  const char* names[] = {"finance", "medicine", "stackoverflow", "leetcode"};
  const std::size_t train[] = {7366, 10433, 4438, 1275};
  for (int i = 0; i < 4; ++i) {
    CHECK(counts[i].domain == names[i]);
    CHECK(counts[i].train == train[i]);
    CHECK(counts[i].valid == 300);
    CHECK(counts[i].test == 500);
    CHECK(counts[i].read == counts[i].train + 800 + counts[i].dropped_empty + counts[i].duplicates);
    for (const char* split : {"train.jsonl", "valid.jsonl", "test.jsonl"}) {
      const std::string ours = read_bytes(tmp / "out" / names[i] / split);
      const std::string theirs = read_bytes(ref / names[i] / split);
      CHECK_MESSAGE(ours.size() == theirs.size(), names[i], "/", split);
      CHECK_MESSAGE(ours == theirs, names[i], "/", split);
    }
  }
  CHECK(counts[2].dropped_empty == 3);  // gitai answers that are empty

  // Preparing again replaces the earlier output in one step; nothing else is left beside it.
  fs::remove(tmp / "out" / "leetcode" / "test.jsonl");
  prepare_four_domain(raw, tmp / "out");
  CHECK(read_bytes(tmp / "out" / "leetcode" / "test.jsonl") == read_bytes(ref / "leetcode" / "test.jsonl"));
  CHECK(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 1);
}

TEST_CASE("prepare_four_domain: missing raw files, a folder it must not replace, a truncated .gz") {
  TempDir tmp;
  const fs::path raw = raw_dir();
  check_throws_with<moa::IOError>([&] { prepare_four_domain(tmp / "raw", tmp / "out"); },
                                  {"missing raw files", "tatqa_dataset_dev.json", "NExTplusplus/TAT-QA",
                                   "LeetCodeDataset-v0.2.0-test.jsonl.gz", "newfacade/LeetCodeDataset"});
  CHECK(!fs::exists(tmp / "out"));
  if (!fs::exists(raw)) {
    MESSAGE("skipped the rest: " << raw << " not found (set MOA_SHARED_DIR)");
    return;
  }
  // Only some files present: the message lists exactly the missing ones.
  fs::create_directories(tmp / "some");
  for (const RawFile& f : kRawFiles)
    if (std::string(f.domain) != "medicine") fs::copy_file(raw / f.name, tmp / "some" / f.name);
  check_throws_with<moa::IOError>([&] { prepare_four_domain(tmp / "some", tmp / "out"); },
                                  {"chatdoctor5k.json", "medical_meadow_small.json", "Kent0n-Li/ChatDoctor"});
  try {
    prepare_four_domain(tmp / "some", tmp / "out");
  } catch (const moa::IOError& e) {
    CHECK(std::string(e.what()).find("GitHubQA") == std::string::npos);  // present, so not listed
  }

  // A folder holding anything but an earlier output is refused, before any work.
  write_bytes(tmp / "home" / "notes.txt", "mine");
  check_throws_with<moa::IOError>([&] { prepare_four_domain(raw, tmp / "home"); },
                                  {"refusing to replace", "notes.txt"});
  CHECK(read_bytes(tmp / "home" / "notes.txt") == "mine");

  // gzip: a whole file inflates to JSONL, a truncated or corrupted one is an error.
  const fs::path gz_path = raw / "LeetCodeDataset-v0.2.0-test.jsonl.gz";
  const std::string gz = read_bytes(gz_path);
  const std::string text = detail::gunzip(gz, gz_path);
  CHECK(text.substr(0, 2) == "{\"");
  CHECK(std::count(text.begin(), text.end(), '\n') == 200);
  CHECK(detail::gunzip(gz + gz, gz_path) == text + text);  // concatenated members, as gzip -dc reads them
  check_throws_with<moa::IOError>([&] { detail::gunzip(gz.substr(0, gz.size() / 2), gz_path); },
                                  {"LeetCodeDataset-v0.2.0-test.jsonl.gz", "not a complete gzip file"});
  std::string corrupt = gz;
  corrupt[corrupt.size() / 2] = static_cast<char>(corrupt[corrupt.size() / 2] ^ 0x55);
  CHECK_THROWS_AS(detail::gunzip(corrupt, gz_path), moa::IOError);
  check_throws_with<moa::IOError>([&] { detail::gunzip("not gzip at all", gz_path); }, {"not a complete gzip file"});
}

TEST_CASE("prepare_four_domain: malformed raw records are reported with file and line") {
  // Only the PhraseBank reader is exercised here; the JSON readers share member()/str_member().
  TempDir tmp;
  write_bytes(tmp / "pb.txt", "Good news .@positive\r\nNo label here\r\n");
  std::vector<detail::RawRecord> out;
  check_throws_with<moa::IOError>([&] { detail::read_phrasebank(tmp / "pb.txt", out); },
                                  {"pb.txt:2", "sentence@label"});
  write_bytes(tmp / "pb2.txt", "a@b .@mixed\n");
  check_throws_with<moa::IOError>([&] { detail::read_phrasebank(tmp / "pb2.txt", out); }, {"pb2.txt:1", "\"mixed\""});
  // Latin-1 (the original release) reads as the same text as UTF-8.
  out.clear();
  write_bytes(tmp / "pb3.txt", "Caf\xE9 sales rose .@positive\n");
  detail::read_phrasebank(tmp / "pb3.txt", out);
  REQUIRE(out.size() == 1);
  CHECK(out[0].input == "Caf\xC3\xA9 sales rose .");
  CHECK(out[0].output == "positive");

  write_bytes(tmp / "q.jsonl", R"({"query": "Q", "response": "R"})" "\n" R"({"query": "Q"})" "\n");
  std::vector<detail::RawRecord> recs;
  check_throws_with<moa::IOError>(
      [&] {
        detail::for_each_jsonl(read_bytes(tmp / "q.jsonl"), tmp / "q.jsonl",
                               [&](const nlohmann::json& j, const std::string& where) {
                                 recs.push_back({"x", detail::str_member(j, "query", where), "",
                                                 detail::str_member(j, "response", where)});
                               });
      },
      {"q.jsonl:2", "missing \"response\""});
}
