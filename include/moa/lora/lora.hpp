// moa/lora/lora.hpp: LoRA on a whole model: attach named adapters to the linears a LoRAConfig
// targets, switch the active adapter, merge / unmerge, remove, and list the parameters to train.
// Works on any nn::Module tree (TransformerLM for GPT-2 and Llama, or anything holding nn::Linear).
//
//   auto paths = lora::attach_lora(model, "finance", {.rank = 8, .alpha = 16}, /*seed=*/1);
//   optim::AdamW opt(lora::lora_parameter_tensors(model, "finance"));   // only A and B train
//   lora::set_active_lora(model, "medicine");  // or "" for the bare base model
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "moa/lora/adapter.hpp"
#include "moa/lora/config.hpp"
#include "moa/lora/target.hpp"

namespace moa::lora {

// One Linear that carries LoRA adapters.
struct LoRASite {
  std::string path;                     // dotted module path of the Linear, e.g. blocks.0.attn.q_proj
  std::shared_ptr<nn::Linear> linear;
  std::shared_ptr<LoRALinear> lora;     // its adapter slot
};

// Every Linear of `model` with a LoRA slot, in module order.
inline std::vector<LoRASite> lora_sites(const nn::Module& model) {
  std::vector<LoRASite> out;
  for (auto& [path, lin] : named_linears(model))
    if (auto slot = std::dynamic_pointer_cast<LoRALinear>(lin->adapter())) out.push_back({path, lin, slot});
  return out;
}

// The names of all adapters attached anywhere in `model`, in order of first appearance.
inline std::vector<std::string> lora_names(const nn::Module& model) {
  std::vector<std::string> out;
  for (const auto& s : lora_sites(model))
    for (const auto& n : s.lora->names())
      if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
  return out;
}

// The module paths of the linears that carry adapter `name` (empty when none do).
inline std::vector<std::string> lora_paths(const nn::Module& model, const std::string& name) {
  std::vector<std::string> out;
  for (const auto& s : lora_sites(model))
    if (s.lora->has(name)) out.push_back(s.path);
  return out;
}

namespace detail {

inline std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s.empty() ? std::string("none") : s;
}

inline void require_adapter(const nn::Module& model, const std::string& name, const char* op) {
  const auto names = lora_names(model);
  MOA_CHECK(std::find(names.begin(), names.end(), name) != names.end(), IndexError, op, ": no adapter named '", name,
            "' (attached: ", joined(names), ")");
}

// Freezes every parameter of `model` that is not a LoRA A or B.
inline void freeze_base(nn::Module& model) {
  std::set<const void*> lora_params;
  for (const auto& s : lora_sites(model))
    for (const auto& [n, t] : s.lora->named_parameters()) lora_params.insert(t.impl_ptr().get());
  for (auto& [n, t] : model.named_parameters())
    if (!lora_params.count(t.impl_ptr().get())) t.set_requires_grad(false);
}

}  // namespace detail

// Makes `name` the active adapter on every linear that has it and deactivates the others; "" runs
// the bare base model. IndexError for an adapter that is not attached; ValueError while another
// adapter is merged.
inline void set_active_lora(nn::Module& model, const std::string& name) {
  if (!name.empty()) detail::require_adapter(model, name, "set_active_lora");
  for (const auto& s : lora_sites(model))
    MOA_CHECK(s.lora->merged().empty() || s.lora->merged() == name, ValueError, "set_active_lora: adapter '",
              s.lora->merged(), "' is merged into ", s.path, "; unmerge it before activating '", name, "'");
  for (const auto& s : lora_sites(model)) s.lora->set_active(s.lora->has(name) ? name : std::string());
}

// The active adapter ("" when none is active anywhere).
inline std::string active_lora(const nn::Module& model) {
  for (const auto& s : lora_sites(model))
    if (!s.lora->active().empty()) return s.lora->active();
  return {};
}

// Attaches a new adapter `name` to the given linears of `model` (paths and Linears as named_linears
// gives them) and returns their paths; see attach_lora. The adapters' config keeps
// config.target_modules as given.
inline std::vector<std::string> attach_lora_at(nn::Module& model, const std::string& name, const LoRAConfig& config,
                                               const NamedLinears& targets, std::uint64_t seed = 0,
                                               bool activate = true) {
  check_adapter_name(name);
  config.validate();
  const auto names = lora_names(model);
  MOA_CHECK(std::find(names.begin(), names.end(), name) == names.end(), ValueError, "attach_lora: an adapter named '",
            name, "' is attached already");
  MOA_CHECK(!targets.empty(), ValueError, "attach_lora: no linear to attach adapter '", name, "' to");
  for (const auto& [path, lin] : targets) {
    MOA_CHECK(lin != nullptr, ValueError, "attach_lora: the linear at ", path, " is null");
    MOA_CHECK(!lin->adapter() || std::dynamic_pointer_cast<LoRALinear>(lin->adapter()), ValueError, "attach_lora: ",
              path, " holds an adapter that is not a LoRA slot");
  }
  Generator gen(seed);
  std::vector<std::string> paths;
  std::uint64_t k = 0;
  for (const auto& [path, lin] : targets) {
    auto slot = std::dynamic_pointer_cast<LoRALinear>(lin->adapter());
    if (!slot) {
      slot = std::make_shared<LoRALinear>();
      slot->train(lin->is_training());
      lin->set_adapter(kLoRASlot, slot);
    }
    // Dropout streams differ per linear and per adapter, and depend only on (seed, position).
    const std::uint64_t dropout_seed = seed * 0x9E3779B97F4A7C15ull + 0xD0D0ull + k++;
    auto lora = std::make_shared<LoRA>(lin->in_features(), lin->out_features(), config, gen, dropout_seed,
                                       lin->weight.dtype());
    lora->to(lin->weight.device());  // the adapter lives where its base weight does
    slot->add(name, lora);
    paths.push_back(path);
  }
  detail::freeze_base(model);
  if (activate) set_active_lora(model, name);
  return paths;
}

// Attaches a new adapter `name` to every Linear of `model` that config.target_modules selects and
// returns their paths. A is drawn from Generator(seed), B is zero. Afterwards the base is frozen
// (every parameter that is not a LoRA A or B gets requires_grad = false, so its weight gradient is
// never computed) and the new A and B require grad. With `activate`, the new adapter becomes the
// active one (set_active_lora). Errors: ValueError for a bad config, a pattern that matches no
// linear (the message lists the linears), a name in use, a linear that holds a non-LoRA adapter.
inline std::vector<std::string> attach_lora(nn::Module& model, const std::string& name, const LoRAConfig& config,
                                            std::uint64_t seed = 0, bool activate = true) {
  check_adapter_name(name);
  config.validate();
  return attach_lora_at(model, name, config, match_linears(model, config.target_modules), seed, activate);
}

// The parameters of adapter `name` with their full dotted names (A and B of every site).
inline nn::NamedTensors lora_parameters(const nn::Module& model, const std::string& name) {
  detail::require_adapter(model, name, "lora_parameters");
  nn::NamedTensors out;
  for (const auto& s : lora_sites(model))
    if (s.lora->has(name)) {
      const std::string p = s.path + "." + kLoRASlot + "." + name + ".";
      const auto& l = s.lora->get(name);
      out.emplace_back(p + "A", l->A);
      out.emplace_back(p + "B", l->B);
    }
  return out;
}
// The same tensors without names (what an optimizer takes).
inline std::vector<Tensor> lora_parameter_tensors(const nn::Module& model, const std::string& name) {
  std::vector<Tensor> out;
  for (auto& [n, t] : lora_parameters(model, name)) out.push_back(t);
  return out;
}

// Sets requires_grad on adapter `name`'s A and B (e.g. to freeze stage-1 experts).
inline void set_lora_trainable(nn::Module& model, const std::string& name, bool trainable) {
  for (auto& [n, t] : lora_parameters(model, name)) t.set_requires_grad(trainable);
}

// Folds adapter `name` into the base weights (W += scale B A on every linear that has it) and makes
// it the active adapter; the forward then costs what the bare model costs. ValueError when an
// adapter is merged already.
inline void merge_lora(nn::Module& model, const std::string& name) {
  detail::require_adapter(model, name, "merge_lora");
  const auto sites = lora_sites(model);
  for (const auto& s : sites)
    MOA_CHECK(s.lora->merged().empty(), ValueError, "merge_lora: adapter '", s.lora->merged(), "' is merged into ",
              s.path, " already; unmerge it first");
  set_active_lora(model, name);
  for (const auto& s : sites)
    if (s.lora->has(name)) s.lora->merge(*s.linear, name);
}

// Undoes merge_lora (the adapter stays active, computed beside the base again). No-op when
// nothing is merged.
inline void unmerge_lora(nn::Module& model) {
  for (const auto& s : lora_sites(model)) s.lora->unmerge(*s.linear);
}

// The adapter merged into the base ("" when none).
inline std::string merged_lora(const nn::Module& model) {
  for (const auto& s : lora_sites(model))
    if (!s.lora->merged().empty()) return s.lora->merged();
  return {};
}

// Removes adapter `name` everywhere; a Linear left without adapters gets its slot removed, so the
// model's parameter names are as before the attach. IndexError for an unknown name, ValueError for
// a merged one (unmerge first).
inline void remove_lora(nn::Module& model, const std::string& name) {
  detail::require_adapter(model, name, "remove_lora");
  const auto sites = lora_sites(model);
  for (const auto& s : sites)
    MOA_CHECK(s.lora->merged() != name, ValueError, "remove_lora: adapter '", name, "' is merged into ", s.path,
              "; unmerge it before removing it");
  for (const auto& s : sites) {
    if (!s.lora->has(name)) continue;
    s.lora->remove(name);
    if (s.lora->empty()) s.linear->set_adapter(kLoRASlot, nullptr);
  }
}

}  // namespace moa::lora
