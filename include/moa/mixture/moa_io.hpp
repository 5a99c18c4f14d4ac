// moa/mixture/moa_io.hpp: save and load a whole MoA: the configuration (with a reference to the
// base model), the routers, and every expert as a Hugging Face PEFT adapter, so one domain's expert
// can be used (or trained) on its own in the Python ecosystem.
//
// Layout of the directory (replaced atomically: written beside it, then renamed over it):
//   moa_config.json                  {"format": "moa.mixture", "version": 1, "base": "...", domains, rank, ...}
//   routers.safetensors              routers.<layer>.weight (E, C)
//   experts/<domain>/adapter_model.safetensors + adapter_config.json   (PEFT's layout)
// Experts map to whole HF modules (Llama family: every linear; GPT-2: o_proj, fc, proj — a q/k/v
// expert would be part of the fused c_attn, which PEFT cannot hold per part: a clear error).
#pragma once

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "moa/io/safetensors.hpp"
#include "moa/lora/peft.hpp"
#include "moa/mixture/moa.hpp"

namespace moa::mixture {

inline nlohmann::json moa_config_json(const MoAConfig& c, const std::string& base_ref) {
  return {{"format", "moa.mixture"},
          {"version", 1},
          {"base", base_ref},
          {"domains", c.domains},
          {"rank", c.rank},
          {"alpha", c.alpha},
          {"use_rslora", c.use_rslora},
          {"target_modules", c.target_modules},
          {"pooling", c.pooling == Pooling::mean ? "mean" : "last"},
          {"selection", c.selection == Selection::last_router ? "last_router" : "vote"},
          {"eta", c.eta},
          {"top_k", c.top_k},
          {"balance_weight", c.balance_weight}};
}

inline MoAConfig moa_config_from_json(const nlohmann::json& j, const std::string& where) {
  try {
    MOA_CHECK(j.value("format", "") == "moa.mixture", IOError, where, ": expected format moa.mixture, got ",
              j.value("format", "none"));
    MoAConfig c;
    c.domains = j.at("domains").get<std::vector<std::string>>();
    c.rank = j.at("rank");
    c.alpha = j.at("alpha");
    c.use_rslora = j.value("use_rslora", false);
    c.target_modules = j.at("target_modules");
    c.pooling = j.value("pooling", "mean") == "mean" ? Pooling::mean : Pooling::last;
    c.selection = j.value("selection", "last_router") == "last_router" ? Selection::last_router : Selection::vote;
    c.eta = j.value("eta", 1.0);
    c.top_k = j.value("top_k", int64_t{2});
    c.balance_weight = j.value("balance_weight", 0.01);
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw IOError(::moa::detail::cat(where, ": bad MoA config: ", e.what()));
  }
}

namespace detail {

inline nlohmann::json read_json(const std::filesystem::path& path, const char* op) {
  std::ifstream in(path);
  MOA_CHECK(in.good(), IOError, op, ": cannot open ", path.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw IOError(::moa::detail::cat(path.string(), ": malformed JSON: ", e.what()));
  }
}

// Copies expert e's A and B of every adapted linear from a PEFT adapter_model.safetensors.
inline void copy_expert(MoAModel& m, std::size_t e, const std::filesystem::path& file, const char* op) {
  const nn::HfFamily family = lora::hf_family_of(m.base().config());
  NoGradGuard no_grad;
  const io::TensorMap t = io::load_safetensors(file).tensors;
  MOA_CHECK(t.size() == 2 * m.adapters().size(), IOError, op, ": ", file.string(), " holds ", t.size(),
            " tensors, expected ", 2 * m.adapters().size(), " (A and B of each of the MoA's ", m.adapters().size(),
            " adapted linears)");
  for (std::size_t i = 0; i < m.adapters().size(); ++i) {
    const auto hf = lora::detail::hf_target_of(m.adapter_paths()[i], family).hf_path;
    const auto& ex = (*m.adapters()[i]->experts())[e];
    for (auto [suffix, dst] : {std::pair{".lora_A.weight", ex->lora_A}, std::pair{".lora_B.weight", ex->lora_B}}) {
      const std::string key = lora::detail::peft_prefix() + hf + suffix;
      MOA_CHECK(t.count(key), IOError, op, ": ", file.string(), " has no ", key);
      MOA_CHECK(t.at(key).shape() == dst.shape(), ShapeError, op, ": ", key, " expected shape ", shape_str(dst.shape()),
                ", got ", shape_str(t.at(key).shape()));
      dst.detach().copy_(t.at(key));
    }
  }
}

}  // namespace detail

// Saves `m` into `dir`; `base_ref` says where the base model lives (a path or a hub name).
inline void save_moa(const MoAModel& m, const std::filesystem::path& dir, const std::string& base_ref) {
  namespace fs = std::filesystem;
  const nn::HfFamily family = lora::hf_family_of(const_cast<MoAModel&>(m).base().config());
  std::vector<std::string> hf_paths, hf_all;
  for (const auto& p : m.adapter_paths()) {
    const auto t = lora::detail::hf_target_of(p, family);
    MOA_CHECK(t.part < 0, ValueError, "save_moa: the expert at ", p, " is part of the fused HF module ", t.hf_path,
              ", which PEFT cannot store per part (target o_proj|fc|proj on GPT-2)");
    hf_paths.push_back(t.hf_path);
  }
  for (const auto& [path, lin] : lora::named_linears(const_cast<MoAModel&>(m).base())) {
    try {
      hf_all.push_back(lora::detail::hf_target_of(path, family).hf_path);
    } catch (const IndexError&) {
    }
  }
  const fs::path tmp = dir.string() + ".moa-tmp", old = dir.string() + ".moa-old";
  fs::remove_all(tmp);
  fs::create_directories(tmp / "experts");
  {
    std::ofstream f(tmp / "moa_config.json");
    f << moa_config_json(m.config(), base_ref).dump(2) << "\n";
    MOA_CHECK(f.good(), IOError, "save_moa: cannot write ", (tmp / "moa_config.json").string());
  }
  io::TensorMap routers;
  for (std::size_t l = 0; l < m.routers().size(); ++l) routers["routers." + std::to_string(l) + ".weight"] = m.routers()[l]->weight;
  io::save_safetensors(tmp / "routers.safetensors", routers);
  const lora::LoRAConfig lc{.rank = m.config().rank, .alpha = m.config().alpha, .use_rslora = m.config().use_rslora,
                            .target_modules = m.config().target_modules};
  for (std::size_t e = 0; e < m.config().domains.size(); ++e) {
    const fs::path ed = tmp / "experts" / m.config().domains[e];
    fs::create_directories(ed);
    io::TensorMap t;
    for (std::size_t i = 0; i < m.adapters().size(); ++i) {
      const auto& ex = (*m.adapters()[i]->experts())[e];
      t[lora::detail::peft_prefix() + hf_paths[i] + ".lora_A.weight"] = ex->lora_A;
      t[lora::detail::peft_prefix() + hf_paths[i] + ".lora_B.weight"] = ex->lora_B;
    }
    io::save_safetensors(ed / "adapter_model.safetensors", t);
    std::ofstream f(ed / "adapter_config.json");
    f << lora::peft_config_json(lc, hf_all, hf_paths, family, {.base_model_name_or_path = base_ref}).dump(2) << "\n";
    MOA_CHECK(f.good(), IOError, "save_moa: cannot write ", (ed / "adapter_config.json").string());
  }
  fs::remove_all(old);
  if (fs::exists(dir)) {
    MOA_CHECK(fs::exists(dir / "moa_config.json"), IOError, "save_moa: ", dir.string(),
              " exists and is not a saved MoA; refusing to replace it");
    fs::rename(dir, old);
  }
  fs::rename(tmp, dir);
  fs::remove_all(old);
}

// Loads a saved MoA onto `base` (the model its moa_config.json's "base" names).
inline std::shared_ptr<MoAModel> load_moa(std::shared_ptr<nn::TransformerLM> base, const std::filesystem::path& dir) {
  const auto cfg_path = dir / "moa_config.json";
  const nlohmann::json j = detail::read_json(cfg_path, "load_moa");
  auto m = std::make_shared<MoAModel>(base, moa_config_from_json(j, cfg_path.string()));
  NoGradGuard no_grad;
  const io::TensorMap routers = io::load_safetensors(dir / "routers.safetensors").tensors;
  for (std::size_t l = 0; l < m->routers().size(); ++l) {
    const std::string key = "routers." + std::to_string(l) + ".weight";
    MOA_CHECK(routers.count(key), IOError, "load_moa: routers.safetensors has no ", key);
    MOA_CHECK(routers.at(key).shape() == m->routers()[l]->weight.shape(), ShapeError, "load_moa: ", key, " expected shape ",
              shape_str(m->routers()[l]->weight.shape()), ", got ", shape_str(routers.at(key).shape()));
    m->routers()[l]->weight.detach().copy_(routers.at(key));
  }
  for (std::size_t e = 0; e < m->config().domains.size(); ++e)
    detail::copy_expert(*m, e, dir / "experts" / m->config().domains[e] / "adapter_model.safetensors", "load_moa");
  return m;
}

// Stage 1 trained apart: sets the expert of `domain` from a PEFT adapter directory
// (adapter_config.json + adapter_model.safetensors, written by lora::save_peft_adapter or by PEFT).
// Its rank and scaling must equal the MoA's, and it must adapt exactly the MoA's linears.
inline void load_expert_peft(MoAModel& m, const std::string& domain, const std::filesystem::path& dir) {
  const int32_t e = m.domain_index(domain);
  const auto cfg_path = dir / "adapter_config.json";
  const nlohmann::json j = detail::read_json(cfg_path, "load_expert_peft");
  const lora::LoRAConfig lc = lora::lora_config_from_peft(j, cfg_path.string());
  MOA_CHECK(lc.rank == m.config().rank, ShapeError, "load_expert_peft: ", dir.string(), " has rank ", lc.rank,
            ", the MoA's experts have rank ", m.config().rank);
  MOA_CHECK(std::abs(lc.scale() - m.config().scale()) <= 1e-12 * std::abs(m.config().scale()), ValueError,
            "load_expert_peft: ", dir.string(), " scales by ", lc.scale(), " (alpha ", lc.alpha,
            "), the MoA's experts by ", m.config().scale());
  detail::copy_expert(m, static_cast<std::size_t>(e), dir / "adapter_model.safetensors", "load_expert_peft");
}

// An MoA whose experts start from stage-1 PEFT adapters, one directory per domain (in
// config.domains order); the routers start fresh.
inline std::shared_ptr<MoAModel> moa_from_peft_experts(std::shared_ptr<nn::TransformerLM> base, MoAConfig config,
                                                       const std::vector<std::filesystem::path>& dirs,
                                                       std::uint64_t seed = 7) {
  MOA_CHECK(dirs.size() == config.domains.size(), ValueError, "moa_from_peft_experts: expected one adapter directory per domain (",
            config.domains.size(), "), got ", dirs.size());
  auto m = std::make_shared<MoAModel>(std::move(base), std::move(config), seed);
  for (std::size_t e = 0; e < dirs.size(); ++e) load_expert_peft(*m, m->config().domains[e], dirs[e]);
  return m;
}

}  // namespace moa::mixture
