// moa/lora/peft.hpp: LoRA adapters in Hugging Face PEFT's format, saved and loaded:
//   <dir>/adapter_model.safetensors  base_model.model.<HF module path>.lora_A.weight  (R, In)
//                                    base_model.model.<HF module path>.lora_B.weight  (Out, R)
//                                    (metadata {"format": "pt"}, as PEFT writes it)
//   <dir>/adapter_config.json        peft_type LORA, r, lora_alpha, lora_dropout, use_rslora,
//                                    target_modules, fan_in_fan_out, bias "none", task_type, ...
//
// Module paths, ours <-> Hugging Face (the model classes PEFT wraps: LlamaForCausalLM, ...):
//   Llama family   blocks.i.attn.{q,k,v,o}_proj    <-> model.layers.i.self_attn.{q,k,v,o}_proj
//                  blocks.i.mlp.{gate,up,down}_proj <-> model.layers.i.mlp.{gate,up,down}_proj
//                  lm_head                          <-> lm_head
//   GPT-2          blocks.i.attn.{q,k,v}_proj       <-> transformer.h.i.attn.c_attn (fused)
//                  blocks.i.attn.o_proj             <-> transformer.h.i.attn.c_proj
//                  blocks.i.mlp.fc / mlp.proj       <-> transformer.h.i.mlp.c_fc / mlp.c_proj
//                  lm_head (untied only)            <-> lm_head
// GPT-2's c_attn is one Conv1D for q, k and v (PEFT: fan_in_fan_out = true; lora_A (R, C) and
// lora_B (3C, R) keep the Linear layout). Loading gives q, k and v each a copy of A and its third
// of B's rows, which is exact: [q; k; v] = W x + s [B_q; B_k; B_v] A x. Saving needs one A for
// the three again: the A's of q, k and v (those that carry the adapter) must be equal, else a
// ValueError; a projection without the adapter contributes zero rows of B. Adapters trained here
// on q/k/v of GPT-2 drift apart in A; target o_proj / fc / proj (c_proj / c_fc) instead, or keep
// them in our own checkpoints, when PEFT interchange matters. One more difference: with
// lora_dropout > 0, PEFT draws one dropout mask for c_attn, we draw one per projection.
//
// Loading accepts what PEFT 0.21 writes for plain LoRA; it refuses, with a ValueError naming the
// field, DoRA, lora biases, bias != "none", rank_pattern / alpha_pattern, modules_to_save and
// tensors other than lora_A / lora_B. Shapes are checked against the model before anything is
// attached: a failed load leaves the model as it was.
#pragma once

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/io/file.hpp"
#include "moa/io/safetensors.hpp"
#include "moa/lora/lora.hpp"
#include "moa/nn/config.hpp"
#include "moa/nn/hf_names.hpp"
#include "moa/nn/transformer.hpp"
#include "moa/ops/concat.hpp"

namespace moa::lora {

// Which HF naming a model follows: GELU MLPs are GPT-2's, SwiGLU ones the Llama family's.
inline nn::HfFamily hf_family_of(const nn::TransformerConfig& c) {
  return c.mlp == nn::MlpKind::gelu ? nn::HfFamily::gpt2 : nn::HfFamily::llama;
}

struct PeftSaveOptions {
  std::string base_model_name_or_path;  // written as null when empty
  std::string task_type = "CAUSAL_LM";
};

namespace detail {

struct HfTarget {
  std::string hf_path;  // HF module path
  int part = -1;        // GPT-2 c_attn: 0 q, 1 k, 2 v; -1 for a whole module
};

// Our module path -> the HF module it is (or is a part of); IndexError when it has none.
inline HfTarget hf_target_of(const std::string& ours, nn::HfFamily family) {
  auto fail = [&]() -> HfTarget {
    throw IndexError(::moa::detail::cat("PEFT: the module ", ours, " has no Hugging Face ",
                                        family == nn::HfFamily::gpt2 ? "GPT-2" : "Llama", " counterpart"));
  };
  if (ours == "lm_head") return {"lm_head", -1};
  if (ours.rfind("blocks.", 0) != 0) return fail();
  const auto dot = ours.find('.', 7);
  if (dot == std::string::npos) return fail();
  const std::string layer = ours.substr(7, dot - 7), rest = ours.substr(dot + 1);
  if (layer.empty() || layer.find_first_not_of("0123456789") != std::string::npos) return fail();
  if (family == nn::HfFamily::llama) {
    const std::string p = "model.layers." + layer + ".";
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"})
      if (rest == std::string("attn.") + n) return {p + "self_attn." + n, -1};
    for (const char* n : {"gate_proj", "up_proj", "down_proj"})
      if (rest == std::string("mlp.") + n) return {p + "mlp." + n, -1};
    return fail();
  }
  const std::string p = "transformer.h." + layer + ".";
  if (rest == "attn.q_proj") return {p + "attn.c_attn", 0};
  if (rest == "attn.k_proj") return {p + "attn.c_attn", 1};
  if (rest == "attn.v_proj") return {p + "attn.c_attn", 2};
  if (rest == "attn.o_proj") return {p + "attn.c_proj", -1};
  if (rest == "mlp.fc") return {p + "mlp.c_fc", -1};
  if (rest == "mlp.proj") return {p + "mlp.c_proj", -1};
  return fail();
}

// An HF module path -> our module path(s) (three for GPT-2's c_attn: q, k, v); empty when unknown.
inline std::vector<std::string> ours_of_hf(const std::string& hf, nn::HfFamily family) {
  if (hf == "lm_head") return {"lm_head"};
  const std::string pre = family == nn::HfFamily::llama ? "model.layers." : "transformer.h.";
  if (hf.rfind(pre, 0) != 0) return {};
  const auto dot = hf.find('.', pre.size());
  if (dot == std::string::npos) return {};
  const std::string layer = hf.substr(pre.size(), dot - pre.size()), rest = hf.substr(dot + 1);
  if (layer.empty() || layer.find_first_not_of("0123456789") != std::string::npos) return {};
  const std::string p = "blocks." + layer + ".";
  if (family == nn::HfFamily::llama) {
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"})
      if (rest == std::string("self_attn.") + n) return {p + "attn." + n};
    for (const char* n : {"gate_proj", "up_proj", "down_proj"})
      if (rest == std::string("mlp.") + n) return {p + "mlp." + n};
    return {};
  }
  if (rest == "attn.c_attn") return {p + "attn.q_proj", p + "attn.k_proj", p + "attn.v_proj"};
  if (rest == "attn.c_proj") return {p + "attn.o_proj"};
  if (rest == "mlp.c_fc") return {p + "mlp.fc"};
  if (rest == "mlp.c_proj") return {p + "mlp.proj"};
  return {};
}

inline const std::string& peft_prefix() {
  static const std::string p = "base_model.model.";
  return p;
}

inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const Tensor ac = a.to(Device::cpu()).contiguous(), bc = b.to(Device::cpu()).contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), static_cast<std::size_t>(a.numel()) * dtype_size(a.dtype())) == 0;
}

}  // namespace detail

// Adapter `name` of `model` as PEFT's tensors: "base_model.model.<HF path>.lora_{A,B}.weight".
inline io::TensorMap peft_tensors(const nn::Module& model, const std::string& name, nn::HfFamily family) {
  io::TensorMap out;
  struct Fused {
    Tensor A[3], B[3];
    std::string path[3];
  };
  std::map<std::string, Fused> fused;  // GPT-2 c_attn, by HF path
  for (const auto& s : lora_sites(model)) {
    if (!s.lora->has(name)) continue;
    const auto& l = s.lora->get(name);
    const detail::HfTarget t = detail::hf_target_of(s.path, family);
    if (t.part < 0) {
      out[detail::peft_prefix() + t.hf_path + ".lora_A.weight"] = l->A.detach();
      out[detail::peft_prefix() + t.hf_path + ".lora_B.weight"] = l->B.detach();
    } else {
      Fused& f = fused[t.hf_path];
      f.A[t.part] = l->A.detach();
      f.B[t.part] = l->B.detach();
      f.path[t.part] = s.path;
    }
  }
  for (auto& [hf, f] : fused) {
    int first = -1;
    for (int i = 0; i < 3; ++i)
      if (f.A[i].defined()) {
        if (first < 0) first = i;
        MOA_CHECK(detail::bitwise_equal(f.A[i], f.A[first]), ValueError, "save_peft_adapter: adapter '", name,
                  "' has different A on ", f.path[first], " and ", f.path[i],
                  "; GPT-2's fused c_attn holds one A for q, k and v (target o_proj, fc or proj instead, or keep "
                  "the adapter in a moa checkpoint)");
      }
    const Tensor& A = f.A[first];
    std::vector<Tensor> rows;
    for (int i = 0; i < 3; ++i) {
      const int64_t C = f.B[first].size(0);  // GPT-2: q, k and v all have C outputs
      rows.push_back(f.B[i].defined() ? f.B[i] : Tensor::zeros({C, A.size(0)}, A.dtype()));
    }
    out[detail::peft_prefix() + hf + ".lora_A.weight"] = A;
    out[detail::peft_prefix() + hf + ".lora_B.weight"] = concat(rows, 0);
  }
  return out;
}

// The adapter_config.json PEFT 0.21 writes for a plain LoRA with `config`, targeting the HF
// modules `hf_paths` among `hf_all` (target_modules: their names, or a full-path regex when the
// names would select more).
inline nlohmann::json peft_config_json(const LoRAConfig& config, const std::vector<std::string>& hf_all,
                                       const std::vector<std::string>& hf_paths, nn::HfFamily family,
                                       const PeftSaveOptions& opt = {}) {
  nlohmann::json targets;
  const std::string pat = pattern_for_paths(hf_all, hf_paths);
  if (pat.find('\\') == std::string::npos) {
    targets = nlohmann::json::array();
    std::string rest = pat;
    for (std::size_t bar; (bar = rest.find('|')) != std::string::npos; rest = rest.substr(bar + 1))
      targets.push_back(rest.substr(0, bar));
    targets.push_back(rest);
  } else {
    targets = pat;  // PEFT matches a string target_modules with re.fullmatch against the module path
  }
  nlohmann::json j = {
      {"alpha_pattern", nlohmann::json::object()},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", opt.base_model_name_or_path.empty() ? nlohmann::json(nullptr)
                                                                      : nlohmann::json(opt.base_model_name_or_path)},
      {"bias", "none"},
      {"exclude_modules", nullptr},
      {"fan_in_fan_out", family == nn::HfFamily::gpt2},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layer_replication", nullptr},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"lora_alpha", config.alpha},
      {"lora_bias", false},
      {"lora_dropout", config.dropout},
      {"modules_to_save", nullptr},
      {"peft_type", "LORA"},
      {"r", config.rank},
      {"rank_pattern", nlohmann::json::object()},
      {"revision", nullptr},
      {"target_modules", targets},
      {"task_type", opt.task_type},
      {"use_dora", false},
      {"use_rslora", config.use_rslora},
  };
  // PEFT writes an integral alpha as an int; keep that spelling.
  if (config.alpha == static_cast<double>(static_cast<int64_t>(config.alpha)))
    j["lora_alpha"] = static_cast<int64_t>(config.alpha);
  return j;
}

// Writes adapter `name` of `model` to `dir` in PEFT's layout (the directory is created if needed;
// each file is written atomically, the tensors first). The HF names follow `family` (see above).
inline void save_peft_adapter(const nn::Module& model, const std::string& name, const std::filesystem::path& dir,
                              nn::HfFamily family, const PeftSaveOptions& opt = {}) {
  const auto sites = lora_sites(model);
  std::shared_ptr<LoRA> first;
  std::string first_path;
  std::vector<std::string> hf_paths;
  for (const auto& s : sites) {
    if (!s.lora->has(name)) continue;
    const auto& l = s.lora->get(name);
    if (!first) {
      first = l;
      first_path = s.path;
    }
    const LoRAConfig &a = first->config(), &b = l->config();
    MOA_CHECK(a.rank == b.rank && a.alpha == b.alpha && a.use_rslora == b.use_rslora && a.dropout == b.dropout,
              ValueError, "save_peft_adapter: adapter '", name, "' has different settings on ", first_path, " and ",
              s.path, " (rank ", a.rank, " vs ", b.rank, ", alpha ", a.alpha, " vs ", b.alpha,
              "); PEFT's format holds one");
    const std::string hf = detail::hf_target_of(s.path, family).hf_path;
    if (std::find(hf_paths.begin(), hf_paths.end(), hf) == hf_paths.end()) hf_paths.push_back(hf);
  }
  MOA_CHECK(first != nullptr, IndexError, "save_peft_adapter: no adapter named '", name, "' (attached: ",
            detail::joined(lora_names(model)), ")");
  const io::TensorMap tensors = peft_tensors(model, name, family);
  std::vector<std::string> hf_all;
  for (const auto& [path, lin] : named_linears(model)) {
    const std::string hf = detail::hf_target_of(path, family).hf_path;
    if (std::find(hf_all.begin(), hf_all.end(), hf) == hf_all.end()) hf_all.push_back(hf);
  }
  const nlohmann::json cfg = peft_config_json(first->config(), hf_all, hf_paths, family, opt);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  MOA_CHECK(std::filesystem::is_directory(dir), IOError, "save_peft_adapter: cannot create the directory ",
            dir.string(), ec ? ": " + ec.message() : std::string());
  io::save_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  io::detail::write_file_atomic(dir / "adapter_config.json", cfg.dump(2) + "\n", "save_peft_adapter");
}
inline void save_peft_adapter(const nn::TransformerLM& model, const std::string& name, const std::filesystem::path& dir,
                              const PeftSaveOptions& opt = {}) {
  save_peft_adapter(model, name, dir, hf_family_of(model.config()), opt);
}

// The LoRAConfig of a PEFT adapter_config.json (target_modules left empty: the tensors say where
// the adapter goes). ValueError for what this library cannot represent.
inline LoRAConfig lora_config_from_peft(const nlohmann::json& j, const std::string& where = "adapter_config.json") {
  MOA_CHECK(j.is_object(), ValueError, where, ": expected a JSON object");
  auto field = [&](const char* k) -> const nlohmann::json* { return j.contains(k) && !j[k].is_null() ? &j[k] : nullptr; };
  const auto* pt = field("peft_type");
  MOA_CHECK(pt && pt->is_string() && pt->get<std::string>() == "LORA", ValueError, where,
            ": expected peft_type \"LORA\", got ", pt ? pt->dump() : std::string("none"));
  LoRAConfig c;
  c.target_modules.clear();
  try {
    MOA_CHECK(field("r"), ValueError, where, ": missing field 'r'");
    c.rank = j["r"].get<int64_t>();
    c.alpha = field("lora_alpha") ? j["lora_alpha"].get<double>() : 8.0;  // PEFT's default
    c.dropout = field("lora_dropout") ? j["lora_dropout"].get<double>() : 0.0;
    c.use_rslora = field("use_rslora") ? j["use_rslora"].get<bool>() : false;
    const auto* bias = field("bias");
    MOA_CHECK(!bias || bias->get<std::string>() == "none", ValueError, where, ": bias ", bias->dump(),
              " is not supported (only \"none\")");
    for (const char* k : {"use_dora", "lora_bias", "use_qalora"})
      MOA_CHECK(!field(k) || !j[k].get<bool>(), ValueError, where, ": ", k, " = true is not supported");
    for (const char* k : {"rank_pattern", "alpha_pattern"})
      MOA_CHECK(!field(k) || j[k].empty(), ValueError, where, ": a non-empty ", k,
                " (per-module rank or alpha) is not supported");
    MOA_CHECK(!field("modules_to_save") || j["modules_to_save"].empty(), ValueError, where,
              ": modules_to_save is not supported (the adapter carries full weights besides LoRA)");
  } catch (const nlohmann::json::exception& e) {
    throw ValueError(::moa::detail::cat(where, ": a field has the wrong type: ", e.what()));
  }
  try {
    LoRAConfig v = c;
    v.target_modules = "x";
    v.validate();
  } catch (const ValueError& e) {
    throw ValueError(where + ": " + e.what());
  }
  return c;
}

// Loads the PEFT adapter in `dir` into `model` as adapter `name` and returns the paths of the
// linears it went to (see the mapping above). The base is frozen and the new A and B require
// grad, as with attach_lora; with `activate` it becomes the active adapter. Errors: IOError for
// missing or unreadable files; ValueError for unsupported settings, an A without its B, or a
// name in use; IndexError for a tensor name that is not a lora_A / lora_B of a module the model
// has; ShapeError naming the tensor, the expected and the actual shape.
inline std::vector<std::string> load_peft_adapter(nn::Module& model, const std::string& name,
                                                  const std::filesystem::path& dir, nn::HfFamily family,
                                                  bool activate = true) {
  check_adapter_name(name);
  const std::filesystem::path cfg_path = dir / "adapter_config.json", st_path = dir / "adapter_model.safetensors";
  MOA_CHECK(std::filesystem::is_regular_file(cfg_path), IOError, "load_peft_adapter: ", cfg_path.string(),
            " does not exist");
  MOA_CHECK(std::filesystem::is_regular_file(st_path), IOError, "load_peft_adapter: ", st_path.string(),
            " does not exist",
            std::filesystem::exists(dir / "adapter_model.bin") ? " (adapter_model.bin, a pickle, is not supported)" : "");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(io::detail::read_text_file(cfg_path, "load_peft_adapter"));
  } catch (const nlohmann::json::exception& e) {
    throw ValueError(::moa::detail::cat("load_peft_adapter: ", cfg_path.string(), " is not valid JSON: ", e.what()));
  }
  LoRAConfig config = lora_config_from_peft(j, cfg_path.string());
  const io::TensorMap tensors = io::load_safetensors(st_path, {.copy = true}).tensors;

  // Group the tensors by HF module.
  struct Pair {
    Tensor A, B;
    std::string key_a, key_b;
  };
  std::map<std::string, Pair> modules;
  const std::string& pre = detail::peft_prefix();
  for (const auto& [key, t] : tensors) {
    auto ends = [&](const std::string& suf) {
      return key.size() > pre.size() + suf.size() && key.compare(key.size() - suf.size(), suf.size(), suf) == 0;
    };
    const bool is_a = ends(".lora_A.weight"), is_b = ends(".lora_B.weight");
    MOA_CHECK(key.rfind(pre, 0) == 0 && (is_a || is_b), IndexError, "load_peft_adapter: ", st_path.string(),
              ": unsupported tensor '", key, "' (expected base_model.model.<module>.lora_A.weight / lora_B.weight)");
    const std::string hf = key.substr(pre.size(), key.size() - pre.size() - 14);
    Pair& p = modules[hf];
    (is_a ? p.A : p.B) = t;
    (is_a ? p.key_a : p.key_b) = key;
  }
  MOA_CHECK(!modules.empty(), ValueError, "load_peft_adapter: ", st_path.string(), " holds no LoRA tensors");

  // Check everything against the model before attaching anything.
  const int64_t R = config.rank;
  NamedLinears targets;
  std::vector<std::pair<Tensor, Tensor>> weights;  // (A, B) per target, in targets' order
  for (const auto& [hf, p] : modules) {
    MOA_CHECK(p.A.defined() && p.B.defined(), ValueError, "load_peft_adapter: ", st_path.string(), ": ",
              p.A.defined() ? p.key_a : p.key_b, " has no matching ",
              p.A.defined() ? "lora_B" : "lora_A", " tensor");
    const std::vector<std::string> ours = detail::ours_of_hf(hf, family);
    std::vector<std::shared_ptr<nn::Linear>> lins;
    for (const auto& o : ours) {
      auto lin = std::dynamic_pointer_cast<nn::Linear>(model.find_module(o));
      if (lin) lins.push_back(lin);
    }
    MOA_CHECK(!ours.empty() && lins.size() == ours.size(), IndexError, "load_peft_adapter: ", st_path.string(), ": '",
              p.key_a, "' names the module ", hf, ", which the ", family == nn::HfFamily::gpt2 ? "GPT-2" : "Llama",
              " model does not have");
    int64_t out = 0;
    for (const auto& l : lins) out += l->out_features();
    const int64_t in = lins[0]->in_features();
    MOA_CHECK(p.A.dim() == 2 && p.A.size(0) == R && p.A.size(1) == in, ShapeError, "load_peft_adapter: ", p.key_a,
              " expected shape [", R, ", ", in, "] (r, in_features), got ", shape_str(p.A.shape()));
    MOA_CHECK(p.B.dim() == 2 && p.B.size(0) == out && p.B.size(1) == R, ShapeError, "load_peft_adapter: ", p.key_b,
              " expected shape [", out, ", ", R, "] (out_features, r), got ", shape_str(p.B.shape()));
    MOA_CHECK(is_floating(p.A.dtype()) && is_floating(p.B.dtype()), ValueError, "load_peft_adapter: ", p.key_a,
              " and ", p.key_b, " must be floating, got ", dtype_name(p.A.dtype()), " and ", dtype_name(p.B.dtype()));
    int64_t row = 0;
    for (std::size_t i = 0; i < lins.size(); ++i) {
      targets.emplace_back(ours[i], lins[i]);
      weights.emplace_back(p.A, p.B.narrow(0, row, lins[i]->out_features()));
      row += lins[i]->out_features();
    }
  }
  // In the model's module order, so parameters and dropout streams do not depend on file order.
  std::vector<std::size_t> order(targets.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::vector<std::string> all_paths;
  for (const auto& [path, lin] : named_linears(model)) all_paths.push_back(path);
  auto pos = [&](const std::string& p) { return std::find(all_paths.begin(), all_paths.end(), p) - all_paths.begin(); };
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return pos(targets[a].first) < pos(targets[b].first); });
  NamedLinears sorted;
  std::vector<std::string> chosen;
  for (std::size_t i : order) {
    sorted.push_back(targets[i]);
    chosen.push_back(targets[i].first);
  }
  config.target_modules = pattern_for_paths(all_paths, chosen);
  const std::vector<std::string> paths = attach_lora_at(model, name, config, sorted, 0, activate);
  NoGradGuard no_grad;
  for (std::size_t k = 0; k < order.size(); ++k) {
    const auto& [A, B] = weights[order[k]];
    const auto& l = std::dynamic_pointer_cast<LoRALinear>(sorted[k].second->adapter())->get(name);
    l->A.detach().copy_(A);
    l->B.detach().copy_(B);
  }
  return paths;
}
inline std::vector<std::string> load_peft_adapter(nn::TransformerLM& model, const std::string& name,
                                                  const std::filesystem::path& dir, bool activate = true) {
  return load_peft_adapter(model, name, dir, hf_family_of(model.config()), activate);
}

}  // namespace moa::lora
