// moa/nn/module.hpp: the Module base: registered parameters and submodules, dotted names
// (`blocks.3.attn.q_proj.weight`), state dicts, train/eval mode, freezing.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/core/tensor.hpp"

namespace moa::nn {

// Name -> tensor, in a stable order (the order parameters were registered).
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Every parameter of this module and its submodules, with dotted names.
  NamedTensors named_parameters() const {
    NamedTensors out;
    collect("", out);
    return out;
  }
  std::vector<Tensor> parameters() const {
    std::vector<Tensor> out;
    for (auto& [n, t] : named_parameters()) out.push_back(t);
    return out;
  }
  // Only the parameters that require a gradient (what an optimizer should update).
  std::vector<Tensor> trainable_parameters() const {
    std::vector<Tensor> out;
    for (auto& [n, t] : named_parameters())
      if (t.requires_grad()) out.push_back(t);
    return out;
  }
  int64_t num_parameters(bool trainable_only = false) const {
    int64_t n = 0;
    for (auto& [name, t] : named_parameters())
      if (!trainable_only || t.requires_grad()) n += t.numel();
    return n;
  }
  // The tensor named `name` (dotted); throws IndexError listing a few known names.
  Tensor parameter(const std::string& name) const {
    for (auto& [n, t] : named_parameters())
      if (n == name) return t;
    throw IndexError(::moa::detail::cat("module: no parameter named '", name, "'"));
  }

  // All parameters (detached views sharing storage: saving them copies nothing).
  NamedTensors state_dict() const {
    NamedTensors out;
    for (auto& [n, t] : named_parameters()) out.emplace_back(n, t.detach());
    return out;
  }

  // Copies values into the parameters by name (shapes must match). strict: every parameter must be
  // given and no unknown name may appear. Returns the names of parameters left untouched.
  std::vector<std::string> load_state_dict(const std::map<std::string, Tensor>& state, bool strict = true) {
    NoGradGuard no_grad;
    std::vector<std::string> missing;
    std::map<std::string, bool> used;
    for (auto& [n, t] : named_parameters()) {
      auto it = state.find(n);
      if (it == state.end()) {
        missing.push_back(n);
        continue;
      }
      MOA_CHECK(it->second.shape() == t.shape(), ShapeError, "load_state_dict: parameter '", n,
                "' expected shape ", shape_str(t.shape()), ", got ", shape_str(it->second.shape()));
      Tensor dst = t.detach();
      dst.copy_(it->second);
      used[n] = true;
    }
    if (strict) {
      MOA_CHECK(missing.empty(), ValueError, "load_state_dict: ", missing.size(), " parameter(s) missing, e.g. '",
                missing.empty() ? "" : missing.front(), "'");
      for (auto& [n, t] : state)
        MOA_CHECK(used.count(n), IndexError, "load_state_dict: unknown parameter name '", n, "'");
    }
    return missing;
  }

  // train(true) / eval(): dropout and similar behave by mode; recursive.
  void train(bool on = true) {
    training_ = on;
    for (auto& [n, m] : children_) m->train(on);
  }
  void eval() { train(false); }
  bool is_training() const { return training_; }

  // Freezing sets requires_grad on every parameter (recursive).
  void freeze() {
    for (auto& [n, t] : named_parameters()) t.set_requires_grad(false);
  }
  void unfreeze() {
    for (auto& [n, t] : named_parameters()) t.set_requires_grad(true);
  }
  void zero_grad() {
    for (auto& [n, t] : named_parameters()) t.zero_grad();
  }

  // Moves every parameter (and gradient) to `device` in place, so the tensors held elsewhere
  // (optimisers, adapters, tied weights) follow. Build optimisers after moving, or let AdamW move
  // its moments on the next step (it does).
  Module& to(Device device) {
    for (auto& [n, t] : named_parameters()) ::moa::detail::move_to(t, device);
    return *this;
  }
  // The device of the first parameter (cpu for a module without parameters).
  Device device() const {
    const NamedTensors ps = named_parameters();
    return ps.empty() ? Device::cpu() : ps.front().second.device();
  }

  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& children() const { return children_; }
  const NamedTensors& own_parameters() const { return params_; }

  // The submodule at a dotted path ("blocks.3.attn"), or nullptr.
  std::shared_ptr<Module> find_module(const std::string& path) const {
    const auto dot = path.find('.');
    const std::string head = path.substr(0, dot);
    for (auto& [n, m] : children_)
      if (n == head) return dot == std::string::npos ? m : m->find_module(path.substr(dot + 1));
    return nullptr;
  }

 protected:
  Tensor register_parameter(const std::string& name, Tensor t, bool requires_grad = true) {
    MOA_CHECK(t.defined(), ValueError, "register_parameter: '", name, "' is undefined");
    t.set_requires_grad(requires_grad);
    params_.emplace_back(name, t);
    return t;
  }
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> m) {
    for (auto& [n, c] : children_)
      MOA_CHECK(n != name, ValueError, "register_module: a submodule named '", name, "' exists already");
    children_.emplace_back(name, m);
    return m;
  }
  void remove_child(const std::string& name) {
    for (auto it = children_.begin(); it != children_.end(); ++it)
      if (it->first == name) {
        children_.erase(it);
        return;
      }
  }

 private:
  void collect(const std::string& prefix, NamedTensors& out) const {
    for (auto& [n, t] : params_) out.emplace_back(prefix + n, t);
    for (auto& [n, m] : children_) m->collect(prefix + n + ".", out);
  }

  NamedTensors params_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

// A list of submodules named 0, 1, 2, ... (so `blocks.3.attn` resolves through it).
template <class M>
class ModuleList : public Module {
 public:
  std::shared_ptr<M> push_back(std::shared_ptr<M> m) {
    items_.push_back(m);
    return register_module(std::to_string(items_.size() - 1), std::move(m));
  }
  std::size_t size() const { return items_.size(); }
  const std::shared_ptr<M>& operator[](std::size_t i) const { return items_[i]; }
  auto begin() const { return items_.begin(); }
  auto end() const { return items_.end(); }

 private:
  std::vector<std::shared_ptr<M>> items_;
};

}  // namespace moa::nn
