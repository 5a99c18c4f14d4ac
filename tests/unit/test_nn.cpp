// Modules and the transformer: names, state dicts, freezing, RoPE, KV cache consistency, bad input.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>

#include "moa/eval/generate.hpp"
#include "moa/io/safetensors.hpp"
#include "moa/nn/pretrained.hpp"
#include "test_util.hpp"

using namespace moa;

namespace {

nn::TransformerConfig tiny(bool llama) {
  nn::TransformerConfig c = llama ? nn::TransformerConfig::llama() : nn::TransformerConfig::gpt2();
  c.vocab_size = 50;
  c.max_seq_len = 24;
  c.dim = 16;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = llama ? 2 : 0;
  c.hidden_dim = 32;
  return c;
}

}  // namespace

TEST_CASE("rope: rotation against its formula, gradient, inverse") {
  Generator g(1);
  Tensor x = Tensor::randn({1, 2, 5, 8}, g, DType::f64);
  const Tensor y = rope(x, 3, 100.0);
  const auto xv = x.to_vector<double>(), yv = y.to_vector<double>();
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 5; ++t)
      for (int i = 0; i < 4; ++i) {
        const double a = (3 + t) * std::pow(100.0, -2.0 * i / 8.0);
        const int base = (h * 5 + t) * 8;
        CHECK(yv[base + i] == doctest::Approx(xv[base + i] * std::cos(a) - xv[base + i + 4] * std::sin(a)));
        CHECK(yv[base + i + 4] == doctest::Approx(xv[base + i + 4] * std::cos(a) + xv[base + i] * std::sin(a)));
      }
  Tensor l = Tensor::randn({2, 3, 4, 6}, g, DType::f64).set_requires_grad();
  const auto r = autograd::gradcheck([](auto& in) { return rope(in[0].transpose(1, 2), 2); }, {l});
  INFO(r.message);
  CHECK(r.ok);
  test::check_throws_with<ShapeError>([&] { (void)rope(Tensor::zeros({1, 1, 2, 5})); }, {"rope", "D even", "[1, 1, 2, 5]"});
}

TEST_CASE("rope on projection heads: read in place, output token-major, values and gradients as the contiguous run") {
  Generator g(4);
  const int64_t B = 2, T = 5, H = 3, D = 8;
  const Tensor proj = Tensor::randn({B, T, H * D}, g);
  const Tensor w = Tensor::randn({B, H, T, D}, g);  // a loss weight per output element
  auto run = [&](bool contiguous_input) {
    Tensor p = proj.clone().set_requires_grad();
    Tensor heads = p.view({B, T, H, D}).transpose(1, 2);  // (B, H, T, D), rows token-major
    if (contiguous_input) heads = heads.contiguous();
    Tensor y = rope(heads, 3);
    Tensor loss = sum(mul(y, w));
    loss.backward();
    return std::pair<Tensor, Tensor>{y, p.grad()};
  };
  const auto [y_view, g_view] = run(false);
  const auto [y_copy, g_copy] = run(true);
  CHECK(y_view.to_vector<float>() == y_copy.to_vector<float>());
  CHECK(g_view.to_vector<float>() == g_copy.to_vector<float>());
  CHECK(y_view.transpose(1, 2).is_contiguous());  // merging the heads is a view
  CHECK_FALSE(y_copy.transpose(1, 2).is_contiguous());
  CHECK(g_view.is_contiguous());
}

TEST_CASE("swiglu: silu(gate) * up in one op, the unfused float arithmetic exactly, gradients, errors") {
  Generator gen(5);
  const Tensor g0 = scale(Tensor::randn({3, 7, 33}, gen), 4.0), u0 = Tensor::randn({3, 7, 33}, gen);
  auto run = [&](bool fused) {
    Tensor g = g0.clone().set_requires_grad(), u = u0.clone().set_requires_grad();
    Tensor y = fused ? swiglu(g, u) : silu(g) * u;
    sum(y * y).backward();
    return std::vector<std::vector<float>>{y.to_vector<float>(), g.grad().to_vector<float>(),
                                           u.grad().to_vector<float>()};
  };
  const auto fused = run(true), plain = run(false);
  for (int i = 0; i < 3; ++i) CHECK(fused[i] == plain[i]);
  Tensor gd = Tensor::randn({2, 5}, gen, DType::f64).set_requires_grad(),
         ud = Tensor::randn({2, 5}, gen, DType::f64).set_requires_grad();
  const auto r = autograd::gradcheck([](auto& in) { return swiglu(in[0], in[1]); }, {gd, ud});
  INFO(r.message);
  CHECK(r.ok);
  test::check_throws_with<ShapeError>(
      [&] {
        (void)swiglu(Tensor::zeros({2, 3}), Tensor::zeros({3, 2}));
      },
      {"swiglu", "[2, 3]", "[3, 2]"});
  test::check_throws_with<ValueError>([&] { (void)swiglu(Tensor::zeros({2}), Tensor::zeros({2}, DType::f64)); },
                                      {"swiglu", "f32", "f64"});
}

TEST_CASE("modules: dotted names, counts, state dict round trip, freezing, train/eval") {
  nn::TransformerLM gpt(tiny(false), 7);
  const auto names = gpt.named_parameters();
  std::vector<std::string> ns;
  for (auto& [n, t] : names) ns.push_back(n);
  CHECK(ns.front() == "tok_emb.weight");
  CHECK(std::find(ns.begin(), ns.end(), "blocks.1.attn.q_proj.weight") != ns.end());
  CHECK(std::find(ns.begin(), ns.end(), "blocks.0.mlp.fc.bias") != ns.end());
  CHECK(std::find(ns.begin(), ns.end(), "lm_head.weight") == ns.end());  // tied
  // 50*16 + 24*16 + 2 * (2*16 [ln1] + 4*(16*16+16) [attn] + 2*16 [ln2] + 16*32+32 + 32*16+16) + 2*16
  CHECK(gpt.num_parameters() == 50 * 16 + 24 * 16 + 2 * (32 + 4 * 272 + 32 + 544 + 528) + 32);
  CHECK(gpt.parameter("blocks.1.attn.q_proj.weight").shape() == Shape{16, 16});
  CHECK(gpt.find_module("blocks.1.attn") != nullptr);

  nn::TransformerLM other(tiny(false), 8);
  Tensor ids = Tensor::from_vector(std::vector<int32_t>{1, 2, 3, 4}, {1, 4});
  CHECK(test::max_abs_diff(gpt.forward(ids), other.forward(ids)) > 1e-3);
  std::map<std::string, Tensor> sd;
  for (auto& [n, t] : gpt.state_dict()) sd[n] = t;
  other.load_state_dict(sd);
  CHECK(test::max_abs_diff(gpt.forward(ids), other.forward(ids)) == 0.0);

  gpt.freeze();
  CHECK(gpt.trainable_parameters().empty());
  CHECK_FALSE(gpt.forward(ids).requires_grad());
  gpt.unfreeze();
  CHECK(gpt.num_parameters(true) == gpt.num_parameters());
  gpt.eval();
  CHECK_FALSE(gpt.blocks[0]->is_training());
  gpt.train();
  CHECK(gpt.blocks[1]->attn->is_training());

  sd.erase("ln_f.bias");
  test::check_throws_with<ValueError>([&] { other.load_state_dict(sd); }, {"missing", "ln_f.bias"});
  sd["ln_f.bias"] = Tensor::zeros({15});
  test::check_throws_with<ShapeError>([&] { other.load_state_dict(sd); }, {"ln_f.bias", "[16]", "[15]"});
  sd["ln_f.bias"] = Tensor::zeros({16});
  sd["nonsense.weight"] = Tensor::zeros({1});
  test::check_throws_with<IndexError>([&] { other.load_state_dict(sd); }, {"unknown", "nonsense.weight"});
}

TEST_CASE("transformer: cached decoding equals the full forward, for both families") {
  for (bool llama : {false, true}) {
    nn::TransformerLM m(tiny(llama), 3);
    m.eval();
    NoGradGuard ng;
    const std::vector<int32_t> seq{5, 9, 1, 33, 2, 8, 40};
    const Tensor full = m.forward(Tensor::from_vector(seq, {1, 7}));  // (1, 7, V)
    nn::KVCache cache = m.make_cache(1);
    // 3 tokens, then one at a time.
    Tensor l3 = m.forward(Tensor::from_vector(std::vector<int32_t>(seq.begin(), seq.begin() + 3), {1, 3}), &cache);
    CHECK(test::max_abs_diff(l3, full.narrow(1, 0, 3)) < 1e-5);
    for (int t = 3; t < 7; ++t) {
      Tensor lt = m.forward(Tensor::from_vector(std::vector<int32_t>{seq[t]}, {1, 1}), &cache);
      CHECK(test::max_abs_diff(lt, full.narrow(1, t, 1)) < 1e-5);
    }
    CHECK(cache.lengths[0] == 7);
  }
}

TEST_CASE("transformer: loss() runs the head and the loss as one op, as cross_entropy(forward())") {
  for (bool llama : {false, true}) {  // the head tied to the embedding (GPT-2), and its own lm_head
    CAPTURE(llama);
    nn::TransformerLM m(tiny(llama), 6);
    const std::vector<int32_t> x{5, 9, 1, 33, 2, 8, 40, 7, 3, 3, 19, 0}, y{9, 1, 33, 2, 8, 40, -100, 3, 3, 19, 0, 4};
    const Tensor ids = Tensor::from_vector(x, {2, 6}), tg = Tensor::from_vector(y, {2, 6});
    auto grads = [&](bool fused) {
      m.zero_grad();
      Tensor loss = fused ? m.loss(ids, tg) : cross_entropy(m.forward(ids), tg);
      CHECK(std::string(loss.grad_fn()->name) == (fused ? "linear_cross_entropy" : "cross_entropy"));
      loss.backward();
      std::vector<std::vector<float>> g{{loss.item<float>()}};
      for (auto& [n, p] : m.named_parameters()) g.push_back(p.grad().to_vector<float>());
      return g;
    };
    const auto fused = grads(true), plain = grads(false);
    REQUIRE(fused.size() == plain.size());
    CHECK(fused[0][0] == doctest::Approx(plain[0][0]).epsilon(1e-6));
    for (std::size_t i = 1; i < fused.size(); ++i) {
      double mag = 1e-3;
      for (float v : plain[i]) mag = std::max(mag, static_cast<double>(std::fabs(v)));
      CHECK(test::max_abs_diff(std::vector<double>(fused[i].begin(), fused[i].end()),
                               std::vector<double>(plain[i].begin(), plain[i].end())) <= 1e-5 * mag);
    }
  }
}

TEST_CASE("transformer: training reduces the loss on a repeated pattern") {
  nn::TransformerLM m(tiny(true), 5);
  optim::AdamW opt(m.trainable_parameters(), {.lr = 1e-2, .weight_decay = 0.0});
  std::vector<int32_t> x, y;
  for (int i = 0; i < 20; ++i) {
    x.push_back(i % 5);
    y.push_back((i + 1) % 5);
  }
  const Tensor ids = Tensor::from_vector(x, {1, 20}), tg = Tensor::from_vector(y, {1, 20});
  double first = 0, last = 0;
  for (int s = 0; s < 40; ++s) {
    Tensor loss = m.loss(ids, tg);
    opt.zero_grad();
    loss.backward();
    opt.step();
    (s == 0 ? first : last) = loss.item<double>();
  }
  CHECK(last < 0.1 * first);
  // And the trained model continues the pattern greedily.
  const auto out = eval::generate(m, {{0, 1, 2}}, {.max_new_tokens = 5});
  CHECK(out[0] == std::vector<int32_t>{3, 4, 0, 1, 2});
}

TEST_CASE("generation: sampling options, stop tokens, bad input") {
  nn::TransformerLM m(tiny(false), 11);
  const auto a = eval::generate(m, {{1, 2}}, {.max_new_tokens = 12, .temperature = 1.0, .top_k = 5, .seed = 3});
  const auto b = eval::generate(m, {{1, 2}}, {.max_new_tokens = 12, .temperature = 1.0, .top_k = 5, .seed = 3});
  CHECK(a == b);
  CHECK(a[0].size() == 12);
  const auto greedy = eval::generate(m, {{1, 2}}, {.max_new_tokens = 6});
  // top_p tiny keeps only the most likely token: the same as greedy.
  CHECK(eval::generate(m, {{1, 2}}, {.max_new_tokens = 6, .temperature = 0.7, .top_p = 1e-9, .seed = 9}) == greedy);
  const auto stopped = eval::generate(m, {{1, 2}}, {.max_new_tokens = 6, .stop_tokens = {greedy[0][2]}});
  const auto first_stop = std::find(greedy[0].begin(), greedy[0].end(), greedy[0][2]) + 1;
  CHECK(stopped[0] == std::vector<int32_t>(greedy[0].begin(), first_stop));
  // The context (24) bounds the generation: positions 20..23 are fed, so 5 new tokens come out.
  CHECK(eval::generate(m, {std::vector<int32_t>(20, 1)}, {.max_new_tokens = 50})[0].size() == 5);
  test::check_throws_with<ValueError>([&] { (void)eval::generate(m, {std::vector<int32_t>(25, 1)}); },
                                      {"generate", "25 tokens", "context of 24"});
  test::check_throws_with<IndexError>([&] { (void)eval::generate(m, {{1, 50}}); }, {"token id 50", "[0, 50)"});
  test::check_throws_with<ValueError>([&] { (void)eval::generate(m, {{}}); }, {"empty"});
  test::check_throws_with<ValueError>([&] { (void)m.forward(Tensor::zeros({1, 30}, DType::i32)); },
                                      {"30 tokens", "context of 24"});
  test::check_throws_with<IndexError>([&] { (void)m.forward(Tensor::full({1, 2}, 77, DType::i32)); }, {"77"});
}

TEST_CASE("HF loading: a config that disagrees with the weights, unknown names, unsupported configs") {
  namespace fs = std::filesystem;
  const fs::path src = fs::path(MOA_TEST_FIXTURES) / "lm" / "llama";
  const fs::path dir = fs::temp_directory_path() / "moa_test_bad_hf";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(src / "model.safetensors", dir / "model.safetensors");
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(src / "config.json"));
  auto write_cfg = [&](const nlohmann::json& j) { std::ofstream(dir / "config.json") << j.dump(); };
  cfg["intermediate_size"] = 48;
  write_cfg(cfg);
  test::check_throws_with<ShapeError>([&] { (void)nn::load_hf_pretrained(dir); }, {"do not fit config.json", "[48, 32]"});
  cfg["intermediate_size"] = 64;
  cfg["num_hidden_layers"] = 1;
  write_cfg(cfg);
  test::check_throws_with<IndexError>([&] { (void)nn::load_hf_pretrained(dir); }, {"unknown parameter name", "blocks.1"});
  cfg["num_hidden_layers"] = 2;
  cfg["hidden_act"] = "relu";
  write_cfg(cfg);
  test::check_throws_with<ValueError>([&] { (void)nn::load_hf_pretrained(dir); }, {"hidden_act", "relu"});
  cfg["hidden_act"] = "silu";
  cfg["model_type"] = "bert";
  write_cfg(cfg);
  test::check_throws_with<ValueError>([&] { (void)nn::load_hf_pretrained(dir); }, {"model_type", "bert"});
  // An unknown tensor name in the weights.
  cfg["model_type"] = "llama";
  write_cfg(cfg);
  auto tensors = io::load_safetensors(dir / "model.safetensors").tensors;
  tensors["model.layers.0.self_attn.extra.weight"] = Tensor::zeros({2});
  io::save_safetensors(dir / "model.safetensors", tensors);
  test::check_throws_with<IndexError>([&] { (void)nn::load_hf_pretrained(dir); }, {"unknown", "extra"});
  std::ofstream(dir / "config.json") << "{ not json";
  test::check_throws_with<IOError>([&] { (void)nn::load_hf_pretrained(dir); }, {"config.json", "malformed"});
  fs::remove_all(dir);
  test::check_throws_with<IOError>([&] { (void)nn::load_hf_pretrained(dir); }, {"not a directory"});
}
