// Tests of moa/io: safetensors read/write against files of the reference Python package, corrupted
// files, atomic writes, training checkpoints, llama2.c models, Hugging Face checkpoint folders.
// Fixtures: tests/fixtures/io (written by gen_io_fixtures.py there).
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/core/half.hpp"
#include "moa/io/checkpoint.hpp"
#include "moa/io/hf_checkpoint.hpp"
#include "moa/io/llama2c.hpp"
#include "moa/io/safetensors.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using namespace moa;
using moa::test::check_throws_with;

namespace {

fs::path fixture_dir() { return fs::path(MOA_TEST_FIXTURES) / "io"; }

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE(in.good());
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
  REQUIRE(out.good());
}
nlohmann::json read_json(const fs::path& p) { return nlohmann::json::parse(read_bytes(p)); }

// A fresh directory under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static int n = 0;
    path = fs::temp_directory_path() / ("moa_test_io_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& s) const { return path / s; }
};

// Installs an io fault hook for one scope: throws when the saver reaches `where`.
struct FaultAt {
  explicit FaultAt(std::string where) {
    io::detail::fault_hook() = [w = std::move(where)](std::string_view at) {
      if (at == w) throw std::runtime_error("simulated crash at " + std::string(at));
    };
  }
  ~FaultAt() { io::detail::fault_hook() = nullptr; }
};

std::vector<std::uint32_t> f32_bits_of(const Tensor& t) {
  std::vector<std::uint32_t> out;
  for (float v : t.to_vector<float>()) out.push_back(std::bit_cast<std::uint32_t>(v));
  return out;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape()) return false;
  const std::size_t n = static_cast<std::size_t>(a.numel()) * dtype_size(a.dtype());
  const Tensor ac = a.is_contiguous() ? a : a.contiguous(), bc = b.is_contiguous() ? b : b.contiguous();
  return n == 0 || std::memcmp(ac.data_ptr(), bc.data_ptr(), n) == 0;
}

std::string shared_dir() {
  const char* env = std::getenv("MOA_SHARED_DIR");
  return env && *env ? std::string(env) : std::string("../shared");
}

}  // namespace

// ---- 16-bit floats ------------------------------------------------------------------------------

TEST_CASE("half: bf16 and f16 conversions round to nearest even and keep specials") {
  CHECK(f32_to_bf16_bits(1.0f) == 0x3f80);
  CHECK(f32_to_bf16_bits(std::bit_cast<float>(0x3f808000u)) == 0x3f80);  // tie -> even
  CHECK(f32_to_bf16_bits(std::bit_cast<float>(0x3f818000u)) == 0x3f82);  // tie -> even (up)
  CHECK(f32_to_bf16_bits(std::bit_cast<float>(0x3f808001u)) == 0x3f81);
  CHECK(std::isnan(bf16_bits_to_f32(f32_to_bf16_bits(std::nanf("")))));
  CHECK(f32_to_bf16_bits(INFINITY) == 0x7f80);
  CHECK(f32_to_bf16_bits(std::bit_cast<float>(0x7f7fffffu)) == 0x7f80);  // max float rounds to inf
  CHECK(f32_to_f16_bits(1.0f) == 0x3c00);
  CHECK(f32_to_f16_bits(65504.0f) == 0x7bff);
  CHECK(f32_to_f16_bits(65519.0f) == 0x7bff);
  CHECK(f32_to_f16_bits(65520.0f) == 0x7c00);
  CHECK(f32_to_f16_bits(-0.0f) == 0x8000);
  CHECK(f32_to_f16_bits(0x1.0p-24f) == 0x0001);
  CHECK(f32_to_f16_bits(0x1.0p-25f) == 0x0000);          // tie -> even (0)
  CHECK(f32_to_f16_bits(0x1.8p-24f) == 0x0002);          // 1.5 units -> 2 (even)
  CHECK(f32_to_f16_bits(0x1.ffcp-15f) == 0x0400);        // rounds up into the smallest normal
  CHECK(f32_to_f16_bits(1.0f + 0x1.0p-11f) == 0x3c00);  // tie -> even
  CHECK(std::isnan(f16_bits_to_f32(f32_to_f16_bits(std::nanf("")))));
  // Every f16 survives f16 -> f32 -> f16.
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_bits_to_f32(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) continue;
    REQUIRE(f32_to_f16_bits(f) == h);
  }
}

// ---- safetensors: reading the reference package's files ---------------------------------------

TEST_CASE("safetensors: reads every dtype of a file written by the Python package") {
  const auto expected = read_json(fixture_dir() / "st_mixed.json");
  const io::SafetensorsData d = io::load_safetensors(fixture_dir() / "st_mixed.safetensors");
  CHECK(d.tensors.size() == expected["tensors"].size());
  CHECK(d.metadata == expected["metadata"].get<io::StringMap>());
  for (const auto& [name, e] : expected["tensors"].items()) {
    INFO("tensor " << name);
    REQUIRE(d.tensors.count(name) == 1);
    const Tensor& t = d.tensors.at(name);
    CHECK(t.shape() == e["shape"].get<Shape>());
    const std::string moa_dtype = e["moa"];
    if (moa_dtype == "f32") {
      REQUIRE(t.dtype() == DType::f32);
      CHECK(f32_bits_of(t) == e["bits"].get<std::vector<std::uint32_t>>());
    } else if (moa_dtype == "f64") {
      REQUIRE(t.dtype() == DType::f64);
      const auto v = t.to_vector<double>();
      const auto bits = e["bits"].get<std::vector<std::string>>();
      REQUIRE(v.size() == bits.size());
      for (std::size_t i = 0; i < v.size(); ++i) CHECK(std::bit_cast<std::uint64_t>(v[i]) == std::stoull(bits[i]));
    } else {
      REQUIRE(t.dtype() == DType::i32);
      const auto v = t.to_vector<std::int32_t>();
      const auto ints = e["ints"].get<std::vector<std::int64_t>>();
      CHECK(std::vector<std::int64_t>(v.begin(), v.end()) == ints);
    }
  }
  // A 0-d tensor is a scalar; empty tensors have numel 0.
  CHECK(d.tensors.at("f32.scalar").dim() == 0);
  CHECK(d.tensors.at("f32.scalar").item<float>() == 3.25f);
  CHECK(d.tensors.at("f16.empty").numel() == 0);
}

TEST_CASE("safetensors: the lazy reader lists entries in file order and loads by name") {
  io::SafetensorsReader r(fixture_dir() / "st_mixed.safetensors");
  const auto& entries = r.entries();
  REQUIRE(entries.size() == 12);
  for (std::size_t i = 1; i < entries.size(); ++i) CHECK(entries[i - 1].end == entries[i].begin);
  CHECK(r.contains("bf16.vals"));
  CHECK(r.entry("bf16.vals").dtype == "BF16");
  CHECK(r.entry("bf16.vals").shape == Shape{4, 4});
  CHECK(r.entry("i64.pos").dtype == "I64");
  CHECK(r.metadata().at("format") == "pt");

  // keep_bf16: the raw words, as bf16 storage.
  const Tensor kept = r.load("bf16.vals", {.keep_bf16 = true});
  CHECK(kept.dtype() == DType::bf16);
  const auto words = read_json(fixture_dir() / "st_mixed.json")["tensors"]["bf16.vals"]["bf16_words"]
                         .get<std::vector<std::uint16_t>>();
  REQUIRE(words.size() == 16);
  CHECK(std::memcmp(kept.data_ptr(), words.data(), 32) == 0);

  // Aligned F32 data is a view of the mapping unless a copy is asked for; views are copy-on-write.
  const Tensor view = r.load("f32.matrix");
  const Tensor copy = r.load("f32.matrix", {.copy = true});
  CHECK(view.storage()->nbytes == 48);
  CHECK(bitwise_equal(view, copy));
  Tensor again = r.load("f32.matrix");
  again.fill_(7.0);
  CHECK(view.to_vector<float>()[0] == 7.0f);  // views of one reader share its mapping
  CHECK(!bitwise_equal(copy, view));
  // The mapping is private: the file is unchanged, as another reader shows.
  CHECK(bitwise_equal(io::load_safetensors(fixture_dir() / "st_mixed.safetensors").tensors.at("f32.matrix"), copy));
  check_throws_with<IOError>([&] { (void)r.load("nope"); }, {"no tensor named 'nope'", "st_mixed.safetensors"});
}

TEST_CASE("safetensors: tensors outlive the reader and the mapping") {
  Tensor t;
  {
    io::SafetensorsReader r(fixture_dir() / "st_mixed.safetensors");
    t = r.load("f32.matrix");
  }
  const auto expected = read_json(fixture_dir() / "st_mixed.json")["tensors"]["f32.matrix"]["bits"];
  CHECK(f32_bits_of(t) == expected.get<std::vector<std::uint32_t>>());
}

// ---- safetensors: writing -------------------------------------------------------------------------

namespace {

// The tensors of gen_io_fixtures.py's writer_tensors(), from the same formulas.
io::TensorMap writer_tensors() {
  io::TensorMap t;
  std::vector<float> b(12), a(5);
  for (int i = 0; i < 12; ++i) b[i] = static_cast<float>(i) * 0.5f - 2.0f;
  for (int i = 0; i < 5; ++i) a[i] = static_cast<float>(i) / 3.0f;
  t["b.weight"] = Tensor::from_vector(b, {3, 4});
  t["a.bias"] = Tensor::from_vector(a);
  t["c.f64"] = Tensor::from_vector(std::vector<double>{0.0, 0.1, 0.2});
  std::vector<std::int32_t> ids(6);
  for (int i = 0; i < 6; ++i) ids[i] = i * 7 - 10;
  t["d.ids"] = Tensor::from_vector(ids, {2, 3});
  t["e.scalar"] = Tensor::scalar(-1.5);
  t["f.empty"] = Tensor::empty({0, 4});
  t["layers.10.w"] = Tensor::full({2}, 10.0);
  t["layers.9.w"] = Tensor::full({2}, 9.0);
  t["odd \"name\"/caf\xc3\xa9"] = Tensor::ones({1});
  return t;
}

}  // namespace

TEST_CASE("safetensors: the writer produces the reference writer's bytes") {
  // numpy's 0.1 * 2 is 0.2 exactly as written in the double literal above.
  CHECK(io::serialize_safetensors(writer_tensors(), {{"format", "pt"}}) ==
        read_bytes(fixture_dir() / "st_writer_ref.safetensors"));
  CHECK(io::serialize_safetensors(writer_tensors()) == read_bytes(fixture_dir() / "st_writer_ref_nometa.safetensors"));
  CHECK(io::serialize_safetensors({}) == read_bytes(fixture_dir() / "st_empty.safetensors"));
  // Reading a reference file and writing it back gives the same bytes (bf16 kept as bf16).
  const auto ref = io::load_safetensors(fixture_dir() / "st_writer_ref.safetensors", {.keep_bf16 = true});
  CHECK(io::serialize_safetensors(ref.tensors, ref.metadata) == read_bytes(fixture_dir() / "st_writer_ref.safetensors"));
}

TEST_CASE("safetensors: round trips are bitwise, for views, bf16 and several metadata keys") {
  TempDir tmp;
  Generator gen(42);
  io::TensorMap t;
  t["w"] = Tensor::randn({7, 5}, gen);
  t["w_t"] = Tensor::randn({4, 6}, gen).t();  // a transposed view: written in logical order
  t["narrow"] = Tensor::randn({5, 8}, gen).narrow(1, 2, 3);
  t["f64"] = Tensor::randn({3, 2, 2}, gen, DType::f64);
  t["ids"] = Tensor::from_vector(std::vector<std::int32_t>{1, -2, 3});
  t["scalar"] = Tensor::scalar(0.25);
  t["empty"] = Tensor::empty({3, 0, 2});
  Tensor bf = Tensor::empty({9}, DType::bf16);
  std::vector<float> src(9);
  for (int i = 0; i < 9; ++i) src[i] = static_cast<float>(i) * 0.3f - 1.0f;
  f32_to_bf16(src.data(), static_cast<std::uint16_t*>(bf.data_ptr()), 9);
  t["bf"] = bf;
  const io::StringMap meta = {{"format", "pt"}, {"b", "two"}, {"a", "line\nbreak \"quoted\""}};
  const fs::path p = tmp / "rt.safetensors";
  io::save_safetensors(p, t, meta);

  const auto back = io::load_safetensors(p, {.keep_bf16 = true});
  CHECK(back.metadata == meta);
  REQUIRE(back.tensors.size() == t.size());
  for (const auto& [name, v] : t) {
    INFO(name);
    CHECK(bitwise_equal(back.tensors.at(name), v));
  }
  // Without keep_bf16 the bf16 tensor widens exactly.
  const auto widened = io::load_safetensors(p).tensors.at("bf").to_vector<float>();
  for (int i = 0; i < 9; ++i) CHECK(widened[i] == bf16_bits_to_f32(f32_to_bf16_bits(src[i])));
  // No temporary file is left behind.
  int files = 0;
  for (const auto& e : fs::directory_iterator(tmp.path)) files += e.is_regular_file();
  CHECK(files == 1);
}

TEST_CASE("safetensors: a failed save leaves the previous file intact") {
  TempDir tmp;
  const fs::path p = tmp / "model.safetensors";
  io::TensorMap v1 = {{"x", Tensor::full({4}, 1.0)}};
  io::save_safetensors(p, v1);
  const std::string before = read_bytes(p);
  {
    FaultAt fault("safetensors.data");  // after the header, before the data
    CHECK_THROWS_AS(io::save_safetensors(p, {{"x", Tensor::full({400}, 2.0)}}), std::runtime_error);
  }
  CHECK(read_bytes(p) == before);
  int files = 0;
  for (const auto& e : fs::directory_iterator(tmp.path)) files += e.is_regular_file();
  CHECK(files == 1);  // the temporary was removed
  // A directory we cannot write to: IOError naming the target, nothing changed.
  if (::geteuid() != 0) {
    const fs::path ro = tmp / "ro";
    fs::create_directory(ro);
    io::save_safetensors(ro / "m.safetensors", v1);
    fs::permissions(ro, fs::perms::owner_read | fs::perms::owner_exec);
    check_throws_with<IOError>([&] { io::save_safetensors(ro / "m.safetensors", {{"y", Tensor::ones({2})}}); },
                               {"save_safetensors", "m.safetensors"});
    fs::permissions(ro, fs::perms::owner_all);
    CHECK(io::load_safetensors(ro / "m.safetensors").tensors.count("x") == 1);
  }
  // A target whose directory cannot exist (its parent is a file): IOError (works even as root).
  check_throws_with<IOError>([&] { io::save_safetensors(p / "sub.safetensors", v1); },
                             {"save_safetensors", "sub.safetensors", "temporary file"});
  CHECK(read_bytes(p) == before);
  // Bad input is refused before anything is written.
  check_throws_with<ValueError>([&] { io::save_safetensors(p, {{"__metadata__", Tensor::ones({1})}}); },
                                {"__metadata__"});
  check_throws_with<ValueError>([&] { io::save_safetensors(p, {{"u", Tensor()}}); }, {"'u' is undefined"});
  CHECK(read_bytes(p) == before);
}

// ---- safetensors: corrupted files -------------------------------------------------------------------

namespace {

// A file with a hand-written header (padded as given) and `data_bytes` zero bytes of data.
std::string st_file(const std::string& header, std::size_t data_bytes) {
  std::string s(8, '\0');
  const std::uint64_t n = header.size();
  std::memcpy(s.data(), &n, 8);
  return s + header + std::string(data_bytes, '\0');
}

void expect_corrupt(const TempDir& tmp, const std::string& bytes, const std::vector<std::string>& fragments) {
  const fs::path p = tmp / "bad.safetensors";
  write_bytes(p, bytes);
  std::vector<std::string> f = fragments;
  f.push_back("bad.safetensors");
  check_throws_with<IOError>([&] { io::SafetensorsReader r(p); }, f);
}

}  // namespace

TEST_CASE("safetensors: corrupted and truncated files are refused with a clear IOError") {
  TempDir tmp;
  const std::string good = read_bytes(fixture_dir() / "st_writer_ref.safetensors");
  const std::string x2 = R"("x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

  expect_corrupt(tmp, "", {"too short", "at least 8 bytes", "got 0"});
  expect_corrupt(tmp, good.substr(0, 7), {"too short", "got 7"});
  expect_corrupt(tmp, good.substr(0, 20), {"beyond the end of the file"});
  std::string huge = good;
  const std::uint64_t big = 200'000'000;
  std::memcpy(huge.data(), &big, 8);
  expect_corrupt(tmp, huge, {"exceeds the limit"});
  // Truncated data, trailing bytes.
  expect_corrupt(tmp, good.substr(0, good.size() - 1), {"truncated"});
  expect_corrupt(tmp, good + "x", {"trailing bytes"});
  // JSON.
  expect_corrupt(tmp, st_file("{\"x\":{", 0), {"malformed JSON header"});
  expect_corrupt(tmp, st_file("[1,2]", 0), {"must be a JSON object", "array"});
  expect_corrupt(tmp, st_file(std::string("{") + x2 + std::string("}\0\0", 3), 8), {"malformed JSON header", "NUL"});
  expect_corrupt(tmp, st_file("{\"\xff\":1}", 0), {"malformed JSON header"});
  // Entries.
  expect_corrupt(tmp, st_file(R"({"x":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8),
                 {"unknown dtype 'F33'", "'x'"});
  expect_corrupt(tmp, st_file(R"({"x":{"dtype":"F32","data_offsets":[0,8]}})", 8), {"no field 'shape'"});
  expect_corrupt(tmp, st_file(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
                 {"non-negative integers"});
  expect_corrupt(tmp, st_file(R"({"x":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
                 {"non-negative integers"});
  expect_corrupt(tmp, st_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}})", 8),
                 {"data_offsets must be two"});
  expect_corrupt(tmp, st_file(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
                 {"'x' (F32 [3]) needs 12 bytes", "span 8"});
  expect_corrupt(tmp, st_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
                 {"'x' has data_offsets [4, 8], expected it to begin at 0"});
  expect_corrupt(tmp,
                 st_file(std::string("{") + x2 + R"(,"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
                 {"'y' has data_offsets [4, 8], expected it to begin at 8"});
  expect_corrupt(tmp, st_file(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8), {"'x'"});
  expect_corrupt(tmp, st_file(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}})", 8),
                 {"overflows"});
  expect_corrupt(tmp, st_file(R"({"__metadata__":{"a":1}})", 0), {"__metadata__ value for 'a' must be a string"});
  expect_corrupt(tmp, st_file(R"({"__metadata__":[]})", 0), {"__metadata__ must be an object"});
  expect_corrupt(tmp, st_file("{}", 1), {"trailing bytes"});

  // What the reference accepts, we accept: padding before/after, extra fields, null metadata,
  // an odd header length (unaligned data: then F32 is copied, not viewed).
  for (const std::string& h : {std::string(" {") + x2 + "}", std::string("{") + x2 + "}  ",
                               std::string(R"({"__metadata__":null,"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}})")}) {
    const fs::path p = tmp / "ok.safetensors";
    write_bytes(p, st_file(h, 8));
    const auto d = io::load_safetensors(p);
    REQUIRE(d.tensors.count("x") == 1);
    CHECK(d.tensors.at("x").to_vector<float>() == std::vector<float>{0.0f, 0.0f});
  }
  // A dtype the spec knows but moa does not load: listed, and a ValueError on load.
  const fs::path p = tmp / "c64.safetensors";
  write_bytes(p, st_file(R"({"z":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8));
  io::SafetensorsReader r(p);
  CHECK(r.entry("z").dtype == "C64");
  check_throws_with<ValueError>([&] { (void)r.load("z"); }, {"'z' has dtype C64", "cannot load"});
  // A missing file.
  check_throws_with<IOError>([&] { io::SafetensorsReader r2(tmp / "missing.safetensors"); },
                             {"cannot open", "missing.safetensors"});
}

// ---- checkpoints ------------------------------------------------------------------------------------

namespace {

struct TinyRun {
  std::vector<std::string> names = {"layer.weight", "layer.bias", "emb"};
  std::vector<Tensor> params;
  optim::AdamW opt;
  Generator gen;

  static std::vector<Tensor> make_params(std::uint64_t seed) {
    Generator g(seed);
    std::vector<Tensor> p = {Tensor::randn({4, 3}, g), Tensor::randn({4}, g), Tensor::randn({5, 2}, g)};
    for (auto& t : p) t.set_requires_grad();
    return p;
  }
  explicit TinyRun(std::uint64_t seed)
      : params(make_params(seed)), opt(params, {.lr = 0.01, .beta2 = 0.95, .weight_decay = 0.1}), gen(seed + 1) {}

  // One step with random gradients drawn from gen.
  void step() {
    for (auto& p : params) p.set_grad(Tensor::randn(p.shape(), gen));
    opt.step();
  }
  io::TensorMap model() const {
    io::TensorMap m;
    for (std::size_t i = 0; i < names.size(); ++i) m[names[i]] = params[i];
    return m;
  }
  io::TrainingCheckpoint checkpoint(std::int64_t step) {
    return {.model = model(),
            .optimizer = io::adamw_state(opt, names),
            .step = step,
            .rng = io::RngState::of(gen),
            .metadata = {{"model", {{"dim", 4}, {"name", "tiny"}}}}};
  }
};

void check_same_run(TinyRun& a, TinyRun& b) {
  for (std::size_t i = 0; i < a.params.size(); ++i) {
    CHECK(bitwise_equal(a.params[i], b.params[i]));
    CHECK(bitwise_equal(a.opt.exp_avg()[i], b.opt.exp_avg()[i]));
    CHECK(bitwise_equal(a.opt.exp_avg_sq()[i], b.opt.exp_avg_sq()[i]));
  }
  CHECK(a.opt.step_count() == b.opt.step_count());
  CHECK(a.gen.seed() == b.gen.seed());
  CHECK(a.gen.offset() == b.gen.offset());
}

}  // namespace

TEST_CASE("checkpoint: save, resume, and continue bitwise like the uninterrupted run") {
  TempDir tmp;
  const fs::path dir = tmp / "ckpt";
  TinyRun a(11);
  for (int i = 0; i < 3; ++i) a.step();
  io::save_checkpoint(dir, a.checkpoint(3));
  CHECK(fs::exists(dir / "model.safetensors"));
  CHECK(fs::exists(dir / "optimizer.safetensors"));
  CHECK(fs::exists(dir / "state.json"));
  // The weights file is plain safetensors under the parameter names.
  CHECK(io::SafetensorsReader(dir / "model.safetensors").names().size() == 3);

  // A fresh run with other initial values resumes from the checkpoint.
  TinyRun b(99);
  b.opt.config().lr = 123.0;
  const io::TrainingCheckpoint ck = io::load_checkpoint(dir);
  CHECK(ck.step == 3);
  CHECK(ck.metadata["model"]["name"] == "tiny");
  REQUIRE(ck.optimizer.has_value());
  CHECK(ck.optimizer->params == a.names);
  io::copy_into(b.model(), ck.model, "model");
  io::restore_adamw(b.opt, b.names, *ck.optimizer);
  ck.rng.apply(b.gen);
  CHECK(b.opt.config().lr == 0.01);
  CHECK(b.opt.config().beta2 == 0.95);
  check_same_run(a, b);
  for (int i = 0; i < 2; ++i) {
    a.step();
    b.step();
  }
  check_same_run(a, b);

  // Saving again replaces the checkpoint; no temporary directories are left.
  io::save_checkpoint(dir, a.checkpoint(5));
  CHECK(io::load_checkpoint(dir).step == 5);
  CHECK(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 1);
}

TEST_CASE("checkpoint: without optimizer state, and with a trailing slash") {
  TempDir tmp;
  io::TrainingCheckpoint ck;
  ck.model["w"] = Tensor::full({2, 2}, 3.0);
  ck.step = 7;
  ck.rng = {.seed = 0xFFFFFFFFFFFFFFFFull, .offset = 1ull << 60};
  io::save_checkpoint(tmp.path / "c" / "", ck);
  const auto back = io::load_checkpoint(tmp / "c");
  CHECK_FALSE(back.optimizer.has_value());
  CHECK(!fs::exists(tmp / "c" / "optimizer.safetensors"));
  CHECK(back.rng == ck.rng);
  CHECK(back.step == 7);
  CHECK(back.metadata.is_object());
  // Metadata that JSON cannot hold: ValueError, nothing written.
  ck.metadata = {{"bad", std::string("\xff")}};
  check_throws_with<ValueError>([&] { io::save_checkpoint(tmp / "c", ck); }, {"metadata cannot be written"});
  CHECK(io::load_checkpoint(tmp / "c").metadata.empty());
  CHECK(std::distance(fs::directory_iterator(tmp.path), fs::directory_iterator()) == 1);
}

TEST_CASE("checkpoint: a save that fails at any point leaves the previous checkpoint loadable") {
  TempDir tmp;
  const fs::path dir = tmp / "ckpt";
  TinyRun a(5);
  a.step();
  io::save_checkpoint(dir, a.checkpoint(1));
  const std::string model_bytes = read_bytes(dir / "model.safetensors");
  a.step();
  for (bool two_renames : {false, true}) {
    io::detail::checkpoint_without_exchange() = two_renames;
    for (const char* where : {"safetensors.data", "checkpoint.model", "checkpoint.optimizer", "checkpoint.before_swap",
                              "checkpoint.between_renames"}) {
      INFO("failure at " << where << (two_renames ? " (two renames)" : ""));
      {
        FaultAt fault(where);
        if (!two_renames && std::string(where) == "checkpoint.between_renames") {
          io::save_checkpoint(dir, a.checkpoint(2));  // not reached with an exchange: the save succeeds
          io::save_checkpoint(dir, [&] {
            TinyRun old(5);
            old.step();
            return old.checkpoint(1);
          }());
          continue;
        }
        CHECK_THROWS_AS(io::save_checkpoint(dir, a.checkpoint(2)), std::runtime_error);
      }
      const auto ck = io::load_checkpoint(dir);
      CHECK(ck.step == 1);
      CHECK(io::serialize_safetensors(ck.model, {{"format", "pt"}}) == model_bytes);
      // The next save succeeds and cleans up.
      io::save_checkpoint(dir, a.checkpoint(2));
      CHECK(io::load_checkpoint(dir).step == 2);
      CHECK(!fs::exists(io::detail::backup_of(dir)));
      // Back to the old checkpoint for the next round.
      TinyRun old(5);
      old.step();
      io::save_checkpoint(dir, old.checkpoint(1));
    }
  }
  io::detail::checkpoint_without_exchange() = false;
  // An impossible location (below a regular file): IOError.
  CHECK_THROWS_AS(io::save_checkpoint(dir / "model.safetensors" / "x", a.checkpoint(2)), IOError);
  CHECK(io::load_checkpoint(dir).step == 1);
  // A read-only parent: IOError, old checkpoint intact.
  if (::geteuid() != 0) {
    fs::permissions(tmp.path, fs::perms::owner_read | fs::perms::owner_exec);
    CHECK_THROWS_AS(io::save_checkpoint(dir, a.checkpoint(2)), IOError);
    fs::permissions(tmp.path, fs::perms::owner_all);
    CHECK(io::load_checkpoint(dir).step == 1);
  }
}

TEST_CASE("checkpoint: mismatches are reported precisely; foreign directories are not replaced") {
  TempDir tmp;
  TinyRun a(3);
  io::save_checkpoint(tmp / "ckpt", a.checkpoint(0));
  const auto ck = io::load_checkpoint(tmp / "ckpt");
  io::TensorMap live = a.model();
  live.erase("emb");
  live["extra"] = Tensor::zeros({1});
  live["layer.bias"] = Tensor::zeros({5});
  check_throws_with<ShapeError>([&] { io::copy_into(live, ck.model, "model"); },
                                {"loaded model does not match", "1 missing (extra)", "1 unexpected (emb)",
                                 "layer.bias: expected [5], got [4]"});
  std::vector<std::string> wrong = a.names;
  wrong[2] = "embedding";
  check_throws_with<ShapeError>([&] { io::restore_adamw(a.opt, wrong, *ck.optimizer); },
                                {"exp_avg", "missing (embedding)", "unexpected (emb)"});

  // A directory that is not a checkpoint.
  fs::create_directories(tmp / "mine");
  write_bytes(tmp / "mine" / "notes.txt", "precious");
  check_throws_with<IOError>([&] { io::save_checkpoint(tmp / "mine", a.checkpoint(1)); },
                             {"is not a moa checkpoint", "refusing"});
  CHECK(read_bytes(tmp / "mine" / "notes.txt") == "precious");
  // Damaged checkpoints.
  check_throws_with<IOError>([&] { (void)io::load_checkpoint(tmp / "mine"); }, {"state.json"});
  write_bytes(tmp / "ckpt" / "state.json", "{\"format\": \"moa.checkpoint\", \"version\": 1}");
  check_throws_with<IOError>([&] { (void)io::load_checkpoint(tmp / "ckpt"); }, {"missing or invalid field"});
  fs::remove(tmp / "ckpt" / "state.json");
  check_throws_with<IOError>([&] { (void)io::load_checkpoint(tmp / "ckpt"); }, {"cannot open", "state.json"});
}

// ---- llama2.c -----------------------------------------------------------------------------------------

TEST_CASE("llama2c: tiny legacy (separate classifier) and version-1 (shared) files match the HF-layout oracle") {
  const auto oracle = io::load_safetensors(fixture_dir() / "llama2c_tiny_hf.safetensors").tensors;
  for (const std::string version : {"v0", "v1"}) {
    INFO(version);
    const auto m = io::load_llama2c(fixture_dir() / ("llama2c_tiny_" + version + ".bin"));
    CHECK(m.config.dim == 8);
    CHECK(m.config.hidden_dim == 12);
    CHECK(m.config.n_layers == 2);
    CHECK(m.config.n_heads == 4);
    CHECK(m.config.n_kv_heads == 2);
    CHECK(m.config.vocab_size == 10);
    CHECK(m.config.seq_len == 3);
    CHECK(m.config.version == (version == "v0" ? 0 : 1));
    CHECK(m.config.shared_classifier == (version == "v1"));
    CHECK(m.weights.size() == 3 + 9 * 2);
    for (const auto& [name, t] : m.weights) {
      INFO(name);
      REQUIRE(oracle.count(version + "." + name) == 1);
      CHECK(bitwise_equal(t, oracle.at(version + "." + name)));
    }
    CHECK(m.weights.at("lm_head.weight").shares_storage_with(m.weights.at("model.embed_tokens.weight")) ==
          m.config.shared_classifier);
    CHECK(io::read_llama2c_config(fixture_dir() / ("llama2c_tiny_" + version + ".bin")).dim == 8);
  }
  // The file's own (interleaved) layout, and the permutation both ways.
  const auto raw = io::load_llama2c(fixture_dir() / "llama2c_tiny_v0.bin",
                                    {.qk_layout = io::RopeLayout::llama2c_interleaved, .copy = true});
  for (const auto& [name, t] : raw.weights) {
    INFO(name);
    CHECK(bitwise_equal(t, oracle.at("raw." + name)));
  }
  const Tensor q = raw.weights.at("model.layers.1.self_attn.q_proj.weight");
  const Tensor k = raw.weights.at("model.layers.1.self_attn.k_proj.weight");
  CHECK(bitwise_equal(io::permute_for_hf_rope(q, 4), oracle.at("v0.model.layers.1.self_attn.q_proj.weight")));
  CHECK(bitwise_equal(io::permute_for_hf_rope(k, 2), oracle.at("v0.model.layers.1.self_attn.k_proj.weight")));
  CHECK(bitwise_equal(io::unpermute_from_hf_rope(io::permute_for_hf_rope(q, 4), 4), q));
  CHECK(bitwise_equal(io::permute_for_hf_rope(q.t().contiguous().t(), 4), io::permute_for_hf_rope(q, 4)));
  check_throws_with<ShapeError>([&] { (void)io::permute_for_hf_rope(q, 3); }, {"n_heads times an even head_dim"});
  const auto hf = io::llama2c_hf_config(raw.config);
  CHECK(hf["num_key_value_heads"] == 2);
  CHECK(hf["tie_word_embeddings"] == false);
}

TEST_CASE("llama2c: stories260K.bin loads with the documented shapes and values") {
  const fs::path bin = fs::path(shared_dir()) / "models" / "stories260K" / "stories260K.bin";
  if (!fs::exists(bin)) {
    MESSAGE("skipped: " << bin << " not found (set MOA_SHARED_DIR)");
    return;
  }
  const auto expected = read_json(fixture_dir() / "llama2c_stories260K.json");
  CHECK(fs::file_size(bin) == expected["file_size"].get<std::uintmax_t>());
  const auto m = io::load_llama2c(bin);
  const auto raw = io::load_llama2c(bin, {.qk_layout = io::RopeLayout::llama2c_interleaved});
  const auto& c = m.config;
  const auto& ec = expected["config"];
  CHECK(c.dim == 64);
  CHECK(c.hidden_dim == ec["hidden_dim"].get<int64_t>());
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.vocab_size == 512);
  CHECK(c.seq_len == 512);
  CHECK(c.shared_classifier);
  CHECK(c.version == 0);
  CHECK(m.weights.size() == 3 + 9 * 5);
  CHECK(m.weights.at("model.layers.4.self_attn.q_proj.weight").shape() == Shape{64, 64});
  CHECK(m.weights.at("model.layers.4.self_attn.k_proj.weight").shape() == Shape{32, 64});
  CHECK(m.weights.at("model.layers.0.mlp.down_proj.weight").shape() == Shape{64, c.hidden_dim});
  CHECK(m.weights.at("lm_head.weight").shares_storage_with(m.weights.at("model.embed_tokens.weight")));
  int checked = 0;
  for (const auto& [key, e] : expected["tensors"].items()) {
    INFO(key);
    const auto colon = key.find(':');
    const auto& weights = key.substr(0, colon) == "hf" ? m.weights : raw.weights;
    const Tensor& t = weights.at(key.substr(colon + 1));
    CHECK(t.shape() == e["shape"].get<Shape>());
    const auto v = t.to_vector<float>();
    double sum = 0.0;
    for (float x : v) sum += x;
    CHECK(sum == doctest::Approx(e["sum"].get<double>()).epsilon(1e-9));
    const auto idx = e["index"].get<std::vector<std::size_t>>();
    const auto bits = e["bits"].get<std::vector<std::uint32_t>>();
    for (std::size_t i = 0; i < idx.size(); ++i) CHECK(std::bit_cast<std::uint32_t>(v[idx[i]]) == bits[i]);
    ++checked;
  }
  CHECK(checked == 48 + 10);
}

TEST_CASE("llama2c: truncated, padded and absurd files are refused, naming the tensor and the offsets") {
  TempDir tmp;
  const std::string v0 = read_bytes(fixture_dir() / "llama2c_tiny_v0.bin");
  const std::string v1 = read_bytes(fixture_dir() / "llama2c_tiny_v1.bin");
  const fs::path p = tmp / "m.bin";
  auto expect = [&](const std::string& bytes, const std::vector<std::string>& fragments) {
    write_bytes(p, bytes);
    std::vector<std::string> f = fragments;
    f.push_back("m.bin");
    check_throws_with<IOError>([&] { (void)io::load_llama2c(p); }, f);
  };
  expect(v0.substr(0, 20), {"too short", "got 20"});
  expect(v0.substr(0, 40), {"truncated", "model.embed_tokens.weight (llama2.c token_embedding_table, [10, 8])",
                            "expected at bytes [28, 348)", "the file has 40 bytes"});
  expect(v0.substr(0, v0.size() - 4), {"truncated", "lm_head.weight (llama2.c wcls", "the file has 4688 bytes"});
  // 28 + 4 * (80 + 16) = 412: inside layer 0's wq.
  expect(v0.substr(0, 420), {"truncated", "model.layers.0.self_attn.q_proj.weight (llama2.c wq, layer 0, [8, 8])"});
  expect(v0 + std::string(8, '\0'), {"8 trailing bytes", "describes a file of 4692 bytes"});
  expect(v1.substr(0, 100), {"too short", "256 bytes"});
  expect(v1.substr(0, 300), {"truncated", "input_layernorm.weight (llama2.c rms_att_weight, layer 1"});
  auto with_header = [](std::string bytes, std::size_t at, std::int32_t value) {
    std::memcpy(bytes.data() + at, &value, 4);
    return bytes;
  };
  expect(with_header(v0, 0, -8), {"expected positive sizes", "dim=-8"});
  expect(with_header(v0, 12, 3), {"divisible", "n_heads=3"});
  expect(with_header(v0, 16, 3), {"divisible", "n_kv_heads=3"});
  expect(with_header(with_header(v0, 0, 1 << 30), 4, 1 << 30), {"truncated"});
  expect(with_header(v1, 4, 2), {"version 2", "not supported"});
  expect(with_header(v1, 4, 7), {"unknown format version 7"});
  expect(with_header(v1, 28, -10), {"negative vocab_size"});

  const fs::path bin = fs::path(shared_dir()) / "models" / "stories260K" / "stories260K.bin";
  if (fs::exists(bin)) {
    expect(read_bytes(bin).substr(0, 500000), {"truncated", "layer", "the file has 500000 bytes"});
  }
}

// ---- Hugging Face checkpoint directories --------------------------------------------------------------

TEST_CASE("hf_checkpoint: a sharded bf16 checkpoint from save_pretrained loads as f32 with its config") {
  const auto expected = io::load_safetensors(fixture_dir() / "hf_tiny_expected.safetensors").tensors;
  const io::HfCheckpoint c = io::load_hf_checkpoint(fixture_dir() / "hf_tiny_sharded");
  CHECK(c.config["model_type"] == "llama");
  CHECK(c.config["hidden_size"] == 8);
  CHECK(c.files.size() == 3);
  REQUIRE(c.tensors.size() == expected.size());
  for (const auto& [name, t] : expected) {
    INFO(name);
    REQUIRE(c.tensors.count(name) == 1);
    CHECK(c.tensors.at(name).dtype() == DType::f32);
    CHECK(bitwise_equal(c.tensors.at(name), t));
  }
}

TEST_CASE("hf_checkpoint: single files, f64, and the errors a user meets") {
  TempDir tmp;
  const fs::path d = tmp / "ck";
  fs::create_directories(d);
  write_bytes(d / "config.json", R"({"model_type": "gpt2", "n_embd": 4})");
  io::save_safetensors(d / "model.safetensors", {{"wte.weight", Tensor::ones({3, 4}, DType::f64)},
                                                 {"ids", Tensor::from_vector(std::vector<std::int32_t>{1, 2})}});
  auto c = io::load_hf_checkpoint(d);
  CHECK(c.config["n_embd"] == 4);
  CHECK(c.tensors.at("wte.weight").dtype() == DType::f32);
  CHECK(c.tensors.at("ids").dtype() == DType::i32);
  CHECK(io::load_hf_weights(d, {.f32 = false}).at("wte.weight").dtype() == DType::f64);

  // A sharded index with problems.
  const fs::path s = tmp / "sharded";
  fs::create_directories(s);
  write_bytes(s / "config.json", "{}");
  io::save_safetensors(s / "a.safetensors", {{"x", Tensor::ones({2})}});
  write_bytes(s / "model.safetensors.index.json", R"({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}})");
  check_throws_with<IOError>([&] { (void)io::load_hf_checkpoint(s); }, {"puts 'y' in", "a.safetensors", "no such tensor"});
  write_bytes(s / "model.safetensors.index.json", R"({"weight_map": {"x": "b.safetensors"}})");
  check_throws_with<IOError>([&] { (void)io::load_hf_checkpoint(s); }, {"names the shard", "b.safetensors", "does not exist"});
  write_bytes(s / "model.safetensors.index.json", R"({"weight_map": {"x": "../a.safetensors"}})");
  check_throws_with<IOError>([&] { (void)io::load_hf_checkpoint(s); }, {"inside the checkpoint directory"});
  write_bytes(s / "model.safetensors.index.json", R"({"weights": {}})");
  check_throws_with<IOError>([&] { (void)io::load_hf_checkpoint(s); }, {"weight_map"});
  write_bytes(s / "model.safetensors.index.json", R"({"weight_map": {"x": "a.safetensors"}})");
  CHECK(io::load_hf_checkpoint(s).tensors.size() == 1);

  // PyTorch pickles, no weights, no config, bad config, not a directory.
  const fs::path pt = tmp / "pt";
  fs::create_directories(pt);
  write_bytes(pt / "config.json", "{}");
  write_bytes(pt / "pytorch_model.bin", "PK");
  check_throws_with<IOError>([&] { (void)io::load_hf_checkpoint(pt); },
                             {"only safetensors checkpoints are supported", "save_pretrained", "safe_serialization=True"});
  fs::remove(pt / "pytorch_model.bin");
  check_throws_with<IOError>([&] { (void)io::load_hf_checkpoint(pt); }, {"neither model.safetensors"});
  fs::remove(pt / "config.json");
  check_throws_with<IOError>([&] { (void)io::load_hf_checkpoint(pt); }, {"has no config.json"});
  write_bytes(pt / "config.json", "{\"a\": ");
  check_throws_with<IOError>([&] { (void)io::load_hf_checkpoint(pt); }, {"config.json", "malformed JSON"});
  check_throws_with<IOError>([&] { (void)io::load_hf_checkpoint(tmp / "nowhere"); }, {"is not a directory"});
}
