// LoRA: the fused LoRA op (gradcheck), adapters on a TransformerLM (targets, several named adapters,
// switching, merge / unmerge, remove), a frozen base that gets no weight gradient, training only
// A and B, and the PEFT adapter format against Hugging Face PEFT
// (fixtures: tests/fixtures/lora/gen_lora_fixtures.py).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <set>
#include <string>
#include <unordered_set>

#include <unistd.h>

#include "moa/autograd/gradcheck.hpp"
#include "moa/io/safetensors.hpp"
#include "moa/lora/lora.hpp"
#include "moa/lora/peft.hpp"
#include "moa/nn/pretrained.hpp"
#include "moa/nn/transformer.hpp"
#include "moa/optim/adamw.hpp"
#include "test_util.hpp"

using namespace moa;

namespace {

nn::TransformerConfig tiny(bool llama) {
  nn::TransformerConfig c = llama ? nn::TransformerConfig::llama() : nn::TransformerConfig::gpt2();
  c.vocab_size = 23;
  c.max_seq_len = 16;
  c.dim = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.hidden_dim = 24;
  if (llama) c.n_kv_heads = 1;
  return c;
}

Tensor ids_of(const std::vector<int32_t>& v, int64_t B) {
  return Tensor::from_vector(v, {B, static_cast<int64_t>(v.size()) / B});
}

// Random non-zero B for every site of adapter `name` (a fresh adapter has B = 0: no effect).
void randomize_B(nn::Module& model, const std::string& name, std::uint64_t seed, double std = 0.3) {
  NoGradGuard ng;
  Generator gen(seed);
  for (auto& [n, t] : lora::lora_parameters(model, name))
    if (n.back() == 'B') t.detach().copy_(Tensor::randn(t.shape(), gen, t.dtype(), 0.0, std));
}

std::vector<std::string> param_names(const nn::Module& m) {
  std::vector<std::string> out;
  for (auto& [n, t] : m.named_parameters()) out.push_back(n);
  return out;
}

}  // namespace

TEST_CASE("lora_add: y = base + s (x A^T) B^T, gradients by finite differences (f64)") {
  Generator gen(7);
  const int64_t In = 5, Out = 4, R = 3;
  Tensor x = Tensor::randn({2, 3, In}, gen, DType::f64).set_requires_grad();
  Tensor base = Tensor::randn({2, 3, Out}, gen, DType::f64).set_requires_grad();
  Tensor A = Tensor::randn({R, In}, gen, DType::f64).set_requires_grad();
  Tensor B = Tensor::randn({Out, R}, gen, DType::f64).set_requires_grad();
  const double s = 1.7;
  // Against the plain composition of ops.
  Tensor y = lora::lora_add(base, x, A, B, s);
  Tensor ref = base + scale(matmul(matmul(x, A.t()), B.t()), s);
  CHECK(test::max_abs_diff(y, ref) < 1e-12);
  auto f = [s](const std::vector<Tensor>& in) { return lora::lora_add(in[1], in[0], in[2], in[3], s); };
  auto res = autograd::gradcheck(f, {x, base, A, B});
  INFO(res.message);
  CHECK(res.ok);
  // Only some inputs needing a gradient.
  Tensor x2 = Tensor::randn({4, In}, gen, DType::f64);
  Tensor base2 = Tensor::randn({4, Out}, gen, DType::f64);
  auto res2 = autograd::gradcheck([&](const std::vector<Tensor>& in) { return lora::lora_add(base2, x2, in[0], in[1], s); },
                                  {A, B});
  CHECK(res2.ok);
  // base handed over (an rvalue): its memory holds the result when nothing else shares it; given
  // as an lvalue, or shared with a view, it is left as it was.
  const Tensor base_before = base.detach().clone();
  CHECK(test::max_abs_diff(base, base_before) == 0);
  Tensor owned = base.detach().clone();
  const void* owned_ptr = owned.data_ptr();
  Tensor y2 = lora::lora_add(std::move(owned), x, A, B, s);
  CHECK(y2.data_ptr() == owned_ptr);
  CHECK(test::max_abs_diff(y2, ref) < 1e-12);
  Tensor shared = base.detach().clone();
  const Tensor view = shared.view({-1});
  Tensor y3 = lora::lora_add(std::move(shared), x, A, B, s);
  CHECK(y3.data_ptr() != view.data_ptr());
  CHECK(test::max_abs_diff(view.view(base.shape()), base_before) == 0);
  CHECK(test::max_abs_diff(y3, ref) < 1e-12);
  // Gradients through the handed-over path (base a fresh clone, kept by lora_add).
  auto f_owned = [s](const std::vector<Tensor>& in) { return lora::lora_add(in[1].clone(), in[0], in[2], in[3], s); };
  auto res3 = autograd::gradcheck(f_owned, {x, base, A, B});
  INFO(res3.message);
  CHECK(res3.ok);
  test::check_throws_with<ShapeError>([&] { lora::lora_add(base, x, B, A, s); }, {"A (R, In)", "B (Out, R)"});
  test::check_throws_with<ShapeError>([&] { lora::lora_add(base2, x, A, B, s); }, {"base of shape"});
}

TEST_CASE("lora_linear: the layer and its adapter in one op, as linear() then lora_add(), one gradient for x") {
  Generator gen(11);
  const int64_t In = 6, Out = 5, R = 2;
  const double s = 1.3;
  // f64: against finite differences, every input needing a gradient, with and without bias.
  Tensor x = Tensor::randn({2, 3, In}, gen, DType::f64).set_requires_grad();
  Tensor W = Tensor::randn({Out, In}, gen, DType::f64).set_requires_grad();
  Tensor b = Tensor::randn({Out}, gen, DType::f64).set_requires_grad();
  Tensor A = Tensor::randn({R, In}, gen, DType::f64).set_requires_grad();
  Tensor B = Tensor::randn({Out, R}, gen, DType::f64).set_requires_grad();
  auto res = autograd::gradcheck(
      [s](const std::vector<Tensor>& in) { return lora::lora_linear(in[0], in[1], in[2], in[3], in[4], s); },
      {x, W, b, A, B});
  INFO(res.message);
  CHECK(res.ok);
  auto res2 = autograd::gradcheck(
      [s](const std::vector<Tensor>& in) { return lora::lora_linear(in[0], in[1], Tensor(), in[2], in[3], s); },
      {x, W, A, B});
  INFO(res2.message);
  CHECK(res2.ok);
  // f32: the same values and gradients as the two ops it replaces (the forward and the weight
  // gradients are the same products; dx sums the same two terms, by the second product).
  auto run = [&](bool fused) {
    Generator g2(12);
    Tensor xf = Tensor::randn({3, 7, In}, g2).set_requires_grad();
    Tensor Wf = Tensor::randn({Out, In}, g2), bf = Tensor::randn({Out}, g2);
    Tensor Af = Tensor::randn({R, In}, g2).set_requires_grad(), Bf = Tensor::randn({Out, R}, g2).set_requires_grad();
    Tensor y = fused ? lora::lora_linear(xf, Wf, bf, Af, Bf, s) : lora::lora_add(linear(xf, Wf, bf), xf, Af, Bf, s);
    sum(y * y).backward();
    return std::vector<Tensor>{y, xf.grad(), Af.grad(), Bf.grad()};
  };
  const auto fused = run(true), plain = run(false);
  CHECK(fused[0].to_vector<float>() == plain[0].to_vector<float>());
  double mag = 0;
  for (double v : plain[1].to_vector<double>()) mag = std::max(mag, std::fabs(v));
  CHECK(test::max_abs_diff(fused[1], plain[1]) <= 1e-6 * mag);
  CHECK(fused[2].to_vector<float>() == plain[2].to_vector<float>());
  CHECK(fused[3].to_vector<float>() == plain[3].to_vector<float>());
  test::check_throws_with<ShapeError>([&] { (void)lora::lora_linear(x, W, b, B, A, s); },
                                      {"lora_linear", "A (R, 6)", "B (5, R)"});
  test::check_throws_with<ShapeError>(
      [&] {
        (void)lora::lora_linear(Tensor::zeros({2, In + 1}, DType::f64), W, b, A, B, s);
      },
      {"linear", "[2, 7]"});
}

TEST_CASE("LoRAConfig: scale, rsLoRA, validation; LoRA init like PEFT") {
  CHECK(lora::LoRAConfig{}.scale() == doctest::Approx(2.0));
  CHECK(lora::LoRAConfig{.rank = 16, .alpha = 32, .use_rslora = true}.scale() == doctest::Approx(8.0));
  test::check_throws_with<ValueError>([] { lora::LoRAConfig{.rank = 0}.validate(); }, {"rank >= 1", "got 0"});
  test::check_throws_with<ValueError>([] { lora::LoRAConfig{.dropout = 1.0}.validate(); }, {"dropout"});
  Generator gen(3);
  lora::LoRA l(64, 10, {.rank = 4}, gen);
  CHECK(l.A.shape() == Shape{4, 64});
  CHECK(l.B.shape() == Shape{10, 4});
  const auto a = l.A.to_vector<double>();
  const double bound = 1.0 / 8.0;
  CHECK(*std::max_element(a.begin(), a.end()) <= bound);
  CHECK(*std::min_element(a.begin(), a.end()) >= -bound);
  CHECK(*std::max_element(a.begin(), a.end()) > 0.8 * bound);  // spread over the whole range
  for (double b : l.B.to_vector<double>()) CHECK(b == 0.0);
}

TEST_CASE("target_modules: full path or any dotted tail, all-linear, no match lists the linears") {
  nn::TransformerLM llama(tiny(true), 1), gpt(tiny(false), 1);
  auto paths = [](const nn::Module& m, const std::string& p) {
    std::vector<std::string> out;
    for (auto& [n, l] : lora::match_linears(m, p)) out.push_back(n);
    return out;
  };
  CHECK(paths(llama, "q_proj|v_proj") ==
        std::vector<std::string>{"blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj",
                                 "blocks.1.attn.v_proj"});
  CHECK(paths(llama, "mlp.*").size() == 6);
  CHECK(paths(llama, "blocks\\.1\\.mlp\\.down_proj") == std::vector<std::string>{"blocks.1.mlp.down_proj"});
  CHECK(paths(llama, ".*").size() == 2 * 7 + 1);  // lm_head too
  CHECK(paths(llama, "all-linear").size() == 2 * 7);
  CHECK(paths(gpt, "proj") == std::vector<std::string>{"blocks.0.mlp.proj", "blocks.1.mlp.proj"});
  CHECK(paths(gpt, "q_proj|k_proj|v_proj|o_proj|fc|proj").size() == 12);
  CHECK(paths(gpt, ".*").size() == 12);  // tied embeddings: no lm_head linear
  test::check_throws_with<ValueError>([&] { paths(llama, "c_attn"); },
                                      {"'c_attn' matches no linear", "blocks.0.attn.q_proj", "lm_head"});
  test::check_throws_with<ValueError>([&] { paths(llama, "q_proj("); }, {"not a valid regular expression"});
}

TEST_CASE("attach_lora: names, frozen base, a fresh adapter changes nothing, bad inputs") {
  nn::TransformerLM model(tiny(true), 2);
  model.eval();
  const Tensor ids = ids_of({1, 5, 7, 2, 9, 11, 3, 4}, 2);
  const Tensor before = model.forward(ids);
  const auto base_names = param_names(model);
  const auto paths = lora::attach_lora(model, "finance", {.rank = 4, .alpha = 8}, 11);
  CHECK(paths.size() == 4);
  CHECK(lora::lora_names(model) == std::vector<std::string>{"finance"});
  CHECK(lora::active_lora(model) == "finance");
  CHECK(lora::lora_paths(model, "finance") == paths);
  const Tensor q_a = model.parameter("blocks.0.attn.q_proj.lora.finance.A");
  CHECK(q_a.shape() == Shape{4, 16});
  CHECK(model.parameter("blocks.1.attn.v_proj.lora.finance.B").shape() == Shape{8, 4});
  for (auto& [n, t] : model.named_parameters())
    CHECK_MESSAGE(t.requires_grad() == (n.find(".lora.") != std::string::npos), n);
  CHECK(model.num_parameters(true) == 2 * (4 * 16 + 16 * 4 + 4 * 16 + 8 * 4));
  CHECK(test::max_abs_diff(model.forward(ids), before) == 0.0);
  // The same seed draws the same A.
  nn::TransformerLM twin(tiny(true), 2);
  lora::attach_lora(twin, "finance", {.rank = 4, .alpha = 8}, 11);
  CHECK(test::max_abs_diff(twin.parameter("blocks.0.attn.q_proj.lora.finance.A"), q_a) == 0.0);

  test::check_throws_with<ValueError>([&] { lora::attach_lora(model, "finance", {}); }, {"'finance' is attached already"});
  test::check_throws_with<ValueError>([&] { lora::attach_lora(model, "x", {.rank = 0}); }, {"rank >= 1"});
  test::check_throws_with<ValueError>([&] { lora::attach_lora(model, "a.b", {}); }, {"'a.b' is not valid"});
  test::check_throws_with<ValueError>([&] { lora::attach_lora(model, "x", {.target_modules = "qproj"}); },
                                      {"matches no linear", "blocks.0.attn.q_proj"});
  test::check_throws_with<IndexError>([&] { lora::set_active_lora(model, "medicine"); },
                                      {"no adapter named 'medicine'", "finance"});
  CHECK(lora::lora_names(model) == std::vector<std::string>{"finance"});  // failed attaches left nothing
  lora::remove_lora(model, "finance");
  CHECK(param_names(model) == base_names);
  CHECK(lora::lora_sites(model).empty());
  test::check_throws_with<IndexError>([&] { lora::remove_lora(model, "finance"); }, {"no adapter named 'finance'"});
}

TEST_CASE("a frozen base gets no weight gradient: only A and B do, and no (Out x In) product is recorded") {
  nn::TransformerLM model(tiny(true), 3);
  lora::attach_lora(model, "a", {.rank = 2, .target_modules = "all-linear"}, 5);
  randomize_B(model, "a", 9);
  const Tensor ids = ids_of({1, 5, 7, 2, 9, 11, 3, 4}, 2);
  const Tensor targets = ids_of({5, 7, 2, 9, 11, 3, 4, 1}, 2);
  Tensor loss = model.loss(ids, targets);
  // Walk the graph: every "linear" node must not want a gradient for its weight (input 1), so its
  // backward never computes dW (moa/ops/matmul.hpp computes r[1] only when needs[1]).
  int linear_nodes = 0, lora_nodes = 0, no_input_grad = 0, head_nodes = 0;
  std::vector<autograd::Node*> stack{loss.grad_fn().get()};
  std::unordered_set<autograd::Node*> seen;
  while (!stack.empty()) {
    autograd::Node* n = stack.back();
    stack.pop_back();
    if (!n || !seen.insert(n).second) continue;
    if (std::string(n->name) == "linear") {
      ++linear_nodes;
      CHECK(n->needs[1] == 0);
      CHECK(n->needs[2] == 0);
    }
    if (std::string(n->name) == "linear_cross_entropy") {  // lm_head and the loss: inputs x, weight
      ++head_nodes;
      CHECK(n->needs[0] == 1);
      CHECK(n->needs[1] == 0);
    }
    if (std::string(n->name) == "lora_linear") {  // inputs x, weight, bias, A, B
      ++lora_nodes;
      CHECK(n->needs[1] == 0);
      CHECK(n->needs[2] == 0);
      CHECK(n->needs[3] == 1);
      CHECK(n->needs[4] == 1);
      no_input_grad += n->needs[0] == 0;
    }
    for (auto& e : n->edges) stack.push_back(e.node.get());
  }
  // 15 linears: the 14 adapted ones are one lora_linear node each (the first layer's q/k/v see no
  // grad-requiring input: no dx there), lm_head one op with the loss (no dW either).
  CHECK(lora_nodes == 14);
  CHECK(no_input_grad == 3);
  CHECK(linear_nodes == 0);
  CHECK(head_nodes == 1);
  loss.backward();
  for (auto& [n, t] : model.named_parameters()) {
    INFO(n);
    CHECK(t.grad().defined() == (n.find(".lora.") != std::string::npos));
  }
}

TEST_CASE("a LoRA on lm_head: the model's loss keeps the head as a linear (the fused head has no adapter)") {
  nn::TransformerLM model(tiny(true), 4);
  lora::attach_lora_at(model, "a", {.rank = 2}, {{"lm_head", model.lm_head}}, 5);
  randomize_B(model, "a", 9);
  const Tensor ids = ids_of({1, 5, 7, 2, 9, 11, 3, 4}, 2);
  const Tensor targets = ids_of({5, 7, 2, 9, 11, 3, 4, 1}, 2);
  Tensor loss = model.loss(ids, targets);
  CHECK(std::string(loss.grad_fn()->name) == "cross_entropy");
  const Tensor want = cross_entropy(model.forward(ids), targets);
  CHECK(loss.item<float>() == want.item<float>());
  // and without the adapter the same model's loss (the fused op) has the unadapted value
  const double adapted = loss.item<double>();
  model.lm_head->set_adapter("lora", nullptr);
  model.lm_head->weight.set_requires_grad();  // a graph again, through the head alone
  Tensor plain = model.loss(ids, targets);
  CHECK(std::string(plain.grad_fn()->name) == "linear_cross_entropy");
  CHECK(plain.item<double>() ==
        doctest::Approx(cross_entropy(model.forward(ids), targets).item<double>()).epsilon(1e-6));
  CHECK(plain.item<double>() != adapted);
}

TEST_CASE("several adapters: switching, none, merge / unmerge, remove") {
  nn::TransformerLM model(tiny(true), 4);
  model.eval();
  const Tensor ids = ids_of({1, 5, 7, 2, 9, 11, 3, 4, 0, 22}, 2);
  const Tensor base_out = model.forward(ids);
  lora::attach_lora(model, "finance", {.rank = 4, .alpha = 8, .target_modules = "q_proj|v_proj|down_proj"}, 1);
  randomize_B(model, "finance", 2);
  const Tensor fin = model.forward(ids);
  lora::attach_lora(model, "medicine", {.rank = 2, .alpha = 4, .use_rslora = true, .target_modules = "mlp.*"}, 3);
  randomize_B(model, "medicine", 4);
  CHECK(lora::active_lora(model) == "medicine");
  const Tensor med = model.forward(ids);
  CHECK(test::max_abs_diff(fin, base_out) > 1e-3);
  CHECK(test::max_abs_diff(med, base_out) > 1e-3);
  CHECK(test::max_abs_diff(med, fin) > 1e-3);
  lora::set_active_lora(model, "finance");
  CHECK(test::max_abs_diff(model.forward(ids), fin) == 0.0);
  lora::set_active_lora(model, "");
  CHECK(lora::active_lora(model).empty());
  CHECK(test::max_abs_diff(model.forward(ids), base_out) == 0.0);

  // Merge: the same output from the merged weights; unmerge restores W.
  const Tensor w_before = model.parameter("blocks.1.mlp.down_proj.weight").clone();
  lora::merge_lora(model, "finance");
  CHECK(lora::merged_lora(model) == "finance");
  CHECK(test::max_abs_diff(model.parameter("blocks.1.mlp.down_proj.weight"), w_before) > 1e-3);
  CHECK(test::max_abs_diff(model.forward(ids), fin) < 1e-5);
  test::check_throws_with<ValueError>([&] { lora::set_active_lora(model, "medicine"); },
                                      {"'finance' is merged", "unmerge"});
  test::check_throws_with<ValueError>([&] { lora::merge_lora(model, "medicine"); }, {"merged", "already"});
  test::check_throws_with<ValueError>([&] { lora::remove_lora(model, "finance"); }, {"merged", "unmerge"});
  lora::unmerge_lora(model);
  CHECK(lora::merged_lora(model).empty());
  CHECK(lora::active_lora(model) == "finance");
  CHECK(test::max_abs_diff(model.parameter("blocks.1.mlp.down_proj.weight"), w_before) < 1e-6);
  CHECK(test::max_abs_diff(model.forward(ids), fin) < 1e-6);

  // Remove one adapter: the other still works; the slot of q_proj (finance only) is gone.
  lora::remove_lora(model, "finance");
  CHECK(lora::lora_names(model) == std::vector<std::string>{"medicine"});
  CHECK(lora::active_lora(model).empty());
  CHECK(model.find_module("blocks.0.attn.q_proj.lora") == nullptr);
  lora::set_active_lora(model, "medicine");
  CHECK(test::max_abs_diff(model.forward(ids), med) < 1e-5);  // down_proj went through merge + unmerge
}

TEST_CASE("LoRA dropout: only in training, repeatable from the seed") {
  nn::TransformerLM model(tiny(true), 5);
  lora::attach_lora(model, "d", {.rank = 4, .dropout = 0.5}, 1);
  randomize_B(model, "d", 2);
  const Tensor ids = ids_of({1, 5, 7, 2, 9, 11}, 1);
  model.eval();
  const Tensor e1 = model.forward(ids), e2 = model.forward(ids);
  CHECK(test::max_abs_diff(e1, e2) == 0.0);
  model.train();
  const Tensor t1 = model.forward(ids);
  CHECK(test::max_abs_diff(t1, e1) > 1e-4);
  nn::TransformerLM twin(tiny(true), 5);
  lora::attach_lora(twin, "d", {.rank = 4, .dropout = 0.5}, 1);
  randomize_B(twin, "d", 2);
  CHECK(test::max_abs_diff(twin.forward(ids), t1) == 0.0);
}

TEST_CASE("GPT-2: rank 16 on every linear; AdamW on A and B alone lowers the loss, the base stays put") {
  nn::TransformerConfig c = tiny(false);
  c.init_std = 0.3;  // a base with weights of a trained model's size: logits can move far from uniform
  nn::TransformerLM model(c, 6);
  const auto paths = lora::attach_lora(model, "all", {.rank = 16, .alpha = 32, .target_modules = ".*"}, 7);
  CHECK(paths.size() == 12);
  CHECK(lora::attach_lora(model, "named", {.rank = 16, .target_modules = "q_proj|k_proj|v_proj|o_proj|fc|proj"}, 8,
                          false)
            .size() == 12);
  lora::remove_lora(model, "named");
  std::vector<std::pair<std::string, Tensor>> base;
  for (auto& [n, t] : model.named_parameters())
    if (n.find(".lora.") == std::string::npos) base.emplace_back(n, t.clone());
  optim::AdamW opt(model.trainable_parameters(), {.lr = 1e-2, .weight_decay = 0.0});
  CHECK(model.trainable_parameters().size() == 24);
  const Tensor ids = ids_of({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, 2);
  const Tensor targets = ids_of({2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17}, 2);
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    Tensor loss = model.loss(ids, targets);
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  MESSAGE("loss " << first << " -> " << last);
  CHECK(last < 0.5 * first);
  for (auto& [n, t] : base) {
    INFO(n);
    CHECK(test::max_abs_diff(model.parameter(n), t) == 0.0);
    CHECK(!model.parameter(n).grad().defined());
  }
}

// ---- PEFT format -----------------------------------------------------------------------------

namespace {

const std::string kLoraFixtures = std::string(MOA_TEST_FIXTURES) + "/lora/";

std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

nlohmann::json read_json(const std::filesystem::path& p) { return nlohmann::json::parse(read_bytes(p)); }

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static int n = 0;
    path = std::filesystem::temp_directory_path() /
           ("moa_test_lora_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

// The gradients of adapter `name` under PEFT's keys: GPT-2's fused c_attn gets the sum of the q, k
// and v gradients of A (they share it in PEFT) and their B gradients stacked.
io::TensorMap peft_grads(const nn::Module& model, const std::string& name, nn::HfFamily family) {
  io::TensorMap out;
  std::map<std::string, std::vector<Tensor>> fused_b;
  for (const auto& s : lora::lora_sites(model)) {
    if (!s.lora->has(name)) continue;
    const auto& l = s.lora->get(name);
    REQUIRE(l->A.grad().defined());
    const auto t = lora::detail::hf_target_of(s.path, family);
    const std::string k = "base_model.model." + t.hf_path;
    if (t.part < 0) {
      out[k + ".lora_A.weight"] = l->A.grad();
      out[k + ".lora_B.weight"] = l->B.grad();
    } else {
      auto it = out.find(k + ".lora_A.weight");
      out[k + ".lora_A.weight"] = it == out.end() ? l->A.grad() : it->second + l->A.grad();
      fused_b[k].push_back(l->B.grad());
    }
  }
  for (auto& [k, bs] : fused_b) out[k + ".lora_B.weight"] = concat(bs, 0);
  return out;
}

void check_peft_parity(const std::string& adapter, const std::string& base_name, int expected_sites) {
  INFO(adapter);
  nn::Pretrained p = nn::load_hf_pretrained(std::string(MOA_TEST_FIXTURES) + "/lm/" + base_name);
  nn::TransformerLM& model = *p.model;
  model.eval();
  const std::string dir = kLoraFixtures + adapter;
  const auto ref = io::load_safetensors(dir + "/reference.safetensors").tensors;
  const auto paths = lora::load_peft_adapter(model, "x", dir);
  CHECK(static_cast<int>(paths.size()) == expected_sites);
  CHECK(lora::active_lora(model) == "x");
  const Tensor logits = model.forward(ref.at("ids"));
  CHECK(test::rel_err(logits, ref.at("logits")) < 1e-4);
  const Tensor loss = cross_entropy(logits, ref.at("targets"));
  CHECK(std::abs(loss.item<double>() - ref.at("loss").item<double>()) < 1e-4 * ref.at("loss").item<double>());
  loss.backward();
  const auto grads = peft_grads(model, "x", p.info.family);
  int checked = 0;
  for (const auto& [k, t] : ref) {
    if (k.rfind("grad.", 0) != 0) continue;
    INFO(k);
    REQUIRE(grads.count(k.substr(5)));
    CHECK(test::rel_err(grads.at(k.substr(5)), t) < 1e-4);
    ++checked;
  }
  CHECK(checked == static_cast<int>(grads.size()));
  for (auto& [n, t] : model.named_parameters())
    if (n.find(".lora.") == std::string::npos) CHECK(!t.grad().defined());

  // Saved back by us: the tensors byte for byte as PEFT wrote them, and the config's fields.
  TempDir tmp;
  lora::save_peft_adapter(model, "x", tmp.path, {.base_model_name_or_path = "../lm/" + base_name});
  CHECK(read_bytes(tmp.path / "adapter_model.safetensors") == read_bytes(dir + "/adapter_model.safetensors"));
  const auto ours = read_json(tmp.path / "adapter_config.json"), theirs = read_json(dir + "/adapter_config.json");
  for (const char* k : {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "task_type",
                        "fan_in_fan_out", "base_model_name_or_path", "use_dora", "lora_bias", "rank_pattern",
                        "alpha_pattern", "modules_to_save", "init_lora_weights", "layers_to_transform"}) {
    INFO(k);
    CHECK(ours.at(k) == theirs.at(k));
  }
  auto as_set = [](const nlohmann::json& j) { return j.get<std::set<std::string>>(); };
  CHECK(as_set(ours.at("target_modules")) == as_set(theirs.at("target_modules")));
  // Loaded again: the same model output.
  lora::load_peft_adapter(model, "y", tmp.path);
  CHECK(test::max_abs_diff(model.forward(ref.at("ids")), logits) == 0.0);

  if (adapter == "llama_qv_mlp" && std::getenv("MOA_LORA_WRITE_FIXTURES")) {
    // For gen_lora_fixtures.py: PEFT must load what our saver writes.
    lora::save_peft_adapter(model, "x", kLoraFixtures + "llama_ours", {.base_model_name_or_path = "../lm/llama"});
  }
}

}  // namespace

TEST_CASE("PEFT adapters (Llama q/v/MLP, Llama rsLoRA, GPT-2 fused c_attn): logits, loss, LoRA gradients, "
          "saved back byte for byte") {
  check_peft_parity("llama_qv_mlp", "llama", 2 * 5);
  check_peft_parity("llama_rslora", "llama", 2 * 3);
  check_peft_parity("gpt2_all", "gpt2", 2 * 6);  // c_attn -> q, k, v; c_proj (attn and mlp); c_fc
}

TEST_CASE("PEFT: an adapter written by our saver is what PEFT loads (checked by gen_lora_fixtures.py)") {
  const std::string ours = kLoraFixtures + "llama_ours";
  REQUIRE(std::filesystem::exists(ours + "/peft_check.json"));
  const auto check = read_json(ours + "/peft_check.json");
  CHECK(check.at("logits_rel_err_vs_llama_qv_mlp").get<double>() < 1e-6);
  // And our own forward with it gives PEFT's logits for the adapter it came from.
  nn::Pretrained p = nn::load_hf_pretrained(std::string(MOA_TEST_FIXTURES) + "/lm/llama");
  p.model->eval();
  lora::load_peft_adapter(*p.model, "ours", ours);
  const auto ref = io::load_safetensors(kLoraFixtures + "llama_qv_mlp/reference.safetensors").tensors;
  CHECK(test::rel_err(p.model->forward(ref.at("ids")), ref.at("logits")) < 1e-4);
}

TEST_CASE("PEFT: GPT-2 q/k/v share c_attn's A: subsets save with zero rows, different A's are refused") {
  nn::TransformerLM model(tiny(false), 8);
  model.eval();
  lora::attach_lora(model, "qv", {.rank = 2, .alpha = 4, .target_modules = "q_proj|v_proj|fc"}, 1);
  randomize_B(model, "qv", 2);
  TempDir tmp;
  test::check_throws_with<ValueError>([&] { lora::save_peft_adapter(model, "qv", tmp.path); },
                                      {"different A on blocks.0.attn.q_proj and blocks.0.attn.v_proj", "c_attn"});
  CHECK(!std::filesystem::exists(tmp.path / "adapter_model.safetensors"));
  {
    NoGradGuard ng;
    for (int l = 0; l < 2; ++l) {
      const std::string b = "blocks." + std::to_string(l) + ".attn.";
      model.parameter(b + "v_proj.lora.qv.A").detach().copy_(model.parameter(b + "q_proj.lora.qv.A"));
    }
  }
  const Tensor ids = ids_of({1, 2, 3, 4, 5, 6}, 1);
  const Tensor expected = model.forward(ids);
  lora::save_peft_adapter(model, "qv", tmp.path);
  const auto st = io::load_safetensors(tmp.path / "adapter_model.safetensors").tensors;
  const Tensor b0 = st.at("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight");
  CHECK(b0.shape() == Shape{48, 2});
  CHECK(test::max_abs_diff(b0.narrow(0, 16, 16), Tensor::zeros({16, 2})) == 0.0);  // k: no adapter
  CHECK(st.count("base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"));
  const auto cfg = read_json(tmp.path / "adapter_config.json");
  CHECK(cfg.at("fan_in_fan_out") == true);
  CHECK(cfg.at("target_modules").get<std::set<std::string>>() == std::set<std::string>{"c_attn", "c_fc"});
  CHECK(cfg.at("base_model_name_or_path").is_null());
  lora::set_active_lora(model, "");
  const auto paths = lora::load_peft_adapter(model, "back", tmp.path);
  CHECK(paths.size() == 8);  // q, k, v, fc per block
  CHECK(test::max_abs_diff(model.forward(ids), expected) < 1e-6);
}

TEST_CASE("PEFT: bad adapters are clear errors and leave the model unchanged") {
  nn::Pretrained p = nn::load_hf_pretrained(std::string(MOA_TEST_FIXTURES) + "/lm/llama");
  nn::TransformerLM& model = *p.model;
  const std::string good = kLoraFixtures + "llama_qv_mlp";
  auto names = [&] { return lora::lora_names(model); };
  TempDir tmp;
  auto write = [&](const io::TensorMap& t, const nlohmann::json& cfg) {
    io::save_safetensors(tmp.path / "adapter_model.safetensors", t);
    std::ofstream(tmp.path / "adapter_config.json") << cfg.dump();
  };
  const auto tensors = io::load_safetensors(good + "/adapter_model.safetensors").tensors;
  const auto cfg = read_json(good + "/adapter_config.json");
  const std::string qa = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

  {  // a wrong shape
    auto t = tensors;
    t[qa] = Tensor::zeros({4, 31});
    write(t, cfg);
    test::check_throws_with<ShapeError>([&] { lora::load_peft_adapter(model, "bad", tmp.path); },
                                        {qa, "expected shape [4, 32]", "got [4, 31]"});
  }
  {  // a rank that disagrees with r
    auto c = cfg;
    c["r"] = 8;
    write(tensors, c);
    test::check_throws_with<ShapeError>([&] { lora::load_peft_adapter(model, "bad", tmp.path); },
                                        {"expected shape [8, ", "got [4, "});
  }
  {  // a module the model does not have
    auto t = tensors;
    t["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"] = Tensor::zeros({4, 32});
    t["base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight"] = Tensor::zeros({32, 4});
    write(t, cfg);
    test::check_throws_with<IndexError>([&] { lora::load_peft_adapter(model, "bad", tmp.path); },
                                        {"model.layers.5.self_attn.q_proj", "does not have"});
  }
  {  // an unsupported tensor, and an A without its B
    auto t = tensors;
    t["base_model.model.lm_head.base_layer.weight"] = Tensor::zeros({97, 32});
    write(t, cfg);
    test::check_throws_with<IndexError>([&] { lora::load_peft_adapter(model, "bad", tmp.path); },
                                        {"unsupported tensor 'base_model.model.lm_head.base_layer.weight'"});
    t = tensors;
    t.erase("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
    write(t, cfg);
    test::check_throws_with<ValueError>([&] { lora::load_peft_adapter(model, "bad", tmp.path); },
                                        {qa, "no matching lora_B"});
  }
  {  // settings we cannot represent
    for (const auto& [k, v] : std::vector<std::pair<std::string, nlohmann::json>>{
             {"use_dora", true}, {"bias", "all"}, {"rank_pattern", {{"q_proj", 8}}}, {"peft_type", "IA3"},
             {"r", 0}, {"modules_to_save", {"lm_head"}}}) {
      auto c = cfg;
      c[k] = v;
      write(tensors, c);
      INFO(k);
      test::check_throws_with<ValueError>([&] { lora::load_peft_adapter(model, "bad", tmp.path); }, {k});
    }
  }
  test::check_throws_with<IOError>([&] { lora::load_peft_adapter(model, "bad", tmp.path / "nowhere"); },
                                   {"adapter_config.json", "does not exist"});
  // A Llama adapter on GPT-2.
  nn::Pretrained g = nn::load_hf_pretrained(std::string(MOA_TEST_FIXTURES) + "/lm/gpt2");
  test::check_throws_with<IndexError>([&] { lora::load_peft_adapter(*g.model, "bad", good); },
                                      {"model.layers.0", "GPT-2 model does not have"});
  CHECK(names().empty());
  CHECK(lora::lora_names(*g.model).empty());
  CHECK(model.num_parameters(true) == model.num_parameters());  // nothing frozen either
  // The good one loads; its name cannot be taken twice.
  lora::load_peft_adapter(model, "good", good);
  test::check_throws_with<ValueError>([&] { lora::load_peft_adapter(model, "good", good); }, {"attached already"});
}
