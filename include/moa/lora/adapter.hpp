// moa/lora/adapter.hpp: LoRA adapters on one nn::Linear: LoRA (one adapter: A, B, scale, dropout)
// and LoRALinear (the adapter slot of a Linear holding several named LoRAs, one of them active,
// with merge into and unmerge from the base weight).
//
// Parameter names: a LoRALinear sits in its Linear under the name "lora", each LoRA under its
// adapter name, so adapter "finance" on blocks.3.attn.q_proj has the parameters
//   blocks.3.attn.q_proj.lora.finance.A  (R, In)
//   blocks.3.attn.q_proj.lora.finance.B  (Out, R)
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moa/autograd/grad_mode.hpp"
#include "moa/lora/config.hpp"
#include "moa/lora/op.hpp"
#include "moa/nn/linear.hpp"
#include "moa/ops/dropout.hpp"

namespace moa::lora {

// The name under which a LoRALinear is attached to its Linear.
inline constexpr const char* kLoRASlot = "lora";

// Adapter names become parameter-name components: non-empty, letters, digits, '_' and '-'.
inline void check_adapter_name(const std::string& name) {
  bool ok = !name.empty();
  for (char c : name)
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-');
  MOA_CHECK(ok, ValueError, "LoRA: adapter name '", name,
            "' is not valid (expected a non-empty name of letters, digits, '_' and '-')");
}

// One LoRA adapter of a linear map In -> Out: forward(x, base) = base + scale * B A dropout(x).
// A (R, In) starts uniform in [-1/sqrt(In), 1/sqrt(In)] (PEFT's kaiming_uniform(a = sqrt(5))),
// B (Out, R) at zero, so a fresh adapter changes nothing.
class LoRA : public nn::LinearAdapter {
 public:
  LoRA(int64_t in_features, int64_t out_features, const LoRAConfig& config, Generator& init_gen,
       std::uint64_t dropout_seed = 0, DType dtype = DType::f32)
      : config_(config), dropout_gen_(dropout_seed) {
    config.validate();
    MOA_CHECK(in_features > 0 && out_features > 0, ShapeError, "LoRA: expected positive sizes, got in ",
              in_features, " and out ", out_features);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
    A = register_parameter("A", Tensor::rand({config.rank, in_features}, init_gen, dtype, -bound, bound));
    B = register_parameter("B", Tensor::zeros({out_features, config.rank}, dtype));
  }

  Tensor forward(const Tensor& x, const Tensor& base_out) override {
    const Tensor xd = config_.dropout > 0 ? dropout(x, config_.dropout, dropout_gen_, is_training()) : x;
    return lora_add(base_out, xd, A, B, scale());
  }
  Tensor forward_owned(const Tensor& x, Tensor base_out) override {
    const Tensor xd = config_.dropout > 0 ? dropout(x, config_.dropout, dropout_gen_, is_training()) : x;
    return lora_add(std::move(base_out), xd, A, B, scale());
  }
  // Without dropout the base and the adapter read the same x: one op (lora_linear), one gradient for x.
  // (It does not go through forward / forward_owned: a subclass changing those overrides this too.)
  Tensor forward_linear(const Tensor& x, const Tensor& weight, const Tensor& bias) override {
    if (config_.dropout > 0 && is_training()) return forward_owned(x, linear(x, weight, bias));
    return lora_linear(x, weight, bias, A, B, scale());
  }

  // scale * B A (Out, In), the change to the base weight, in f64 (for merging).
  Tensor delta_weight() const {
    NoGradGuard no_grad;
    const Tensor a = A.to(Device::cpu()).to(DType::f64).contiguous(), b = B.to(Device::cpu()).to(DType::f64).contiguous();
    Tensor d = Tensor::empty({out_features(), in_features()}, DType::f64);
    kernels::cpu::gemm<double>(false, false, out_features(), in_features(), rank(), scale(), b.data<double>(), rank(),
                               a.data<double>(), in_features(), 0.0, d.data<double>(), in_features());
    return d;
  }

  const LoRAConfig& config() const { return config_; }
  double scale() const { return config_.scale(); }
  int64_t rank() const { return A.size(0); }
  int64_t in_features() const { return A.size(1); }
  int64_t out_features() const { return B.size(0); }
  Generator& dropout_generator() { return dropout_gen_; }

  Tensor A, B;

 private:
  LoRAConfig config_;
  Generator dropout_gen_;
};

// The adapter slot of one Linear: named LoRAs, at most one active (its product is added to the
// base output), at most one merged into the base weight (then the forward adds nothing: the
// merged weight already holds it).
class LoRALinear : public nn::LinearAdapter {
 public:
  Tensor forward(const Tensor& x, const Tensor& base_out) override {
    if (active_.empty() || !merged_.empty()) return base_out;
    return get(active_)->forward(x, base_out);
  }
  Tensor forward_owned(const Tensor& x, Tensor base_out) override {
    if (active_.empty() || !merged_.empty()) return base_out;
    return get(active_)->forward_owned(x, std::move(base_out));
  }
  Tensor forward_linear(const Tensor& x, const Tensor& weight, const Tensor& bias) override {
    if (active_.empty() || !merged_.empty()) return linear(x, weight, bias);
    return get(active_)->forward_linear(x, weight, bias);
  }

  // Adds a named adapter (inactive). The name must be new here.
  std::shared_ptr<LoRA> add(const std::string& name, std::shared_ptr<LoRA> lora) {
    check_adapter_name(name);
    MOA_CHECK(lora != nullptr, ValueError, "LoRALinear: adapter '", name, "' is null");
    MOA_CHECK(!has(name), ValueError, "LoRALinear: an adapter named '", name, "' is attached already");
    lora->train(is_training());
    loras_.emplace_back(name, lora);
    return register_module(name, std::move(lora));
  }

  // Removes a named adapter (deactivating it). A merged adapter must be unmerged first.
  void remove(const std::string& name) {
    MOA_CHECK(merged_ != name, ValueError, "LoRALinear: adapter '", name,
              "' is merged into the base weight; unmerge it before removing it");
    for (auto it = loras_.begin(); it != loras_.end(); ++it)
      if (it->first == name) {
        loras_.erase(it);
        remove_child(name);
        if (active_ == name) active_.clear();
        return;
      }
    throw IndexError(::moa::detail::cat("LoRALinear: no adapter named '", name, "' (attached: ", names_str(), ")"));
  }

  bool has(const std::string& name) const {
    for (const auto& [n, l] : loras_)
      if (n == name) return true;
    return false;
  }
  // The adapter named `name`; IndexError when there is none.
  const std::shared_ptr<LoRA>& get(const std::string& name) const {
    for (const auto& nl : loras_)
      if (nl.first == name) return nl.second;
    throw IndexError(::moa::detail::cat("LoRALinear: no adapter named '", name, "' (attached: ", names_str(), ")"));
  }
  const std::vector<std::pair<std::string, std::shared_ptr<LoRA>>>& adapters() const { return loras_; }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& nl : loras_) out.push_back(nl.first);
    return out;
  }
  bool empty() const { return loras_.empty(); }

  // Activates `name` ("" deactivates all). Switching away from a merged adapter is refused.
  void set_active(const std::string& name) {
    if (!name.empty()) (void)get(name);
    MOA_CHECK(merged_.empty() || merged_ == name, ValueError, "LoRALinear: adapter '", merged_,
              "' is merged into the base weight; unmerge it before activating '", name, "'");
    active_ = name;
  }
  const std::string& active() const { return active_; }
  const std::string& merged() const { return merged_; }

  // base.weight += scale B A for adapter `name` (computed in f64, rounded once), and activates it.
  void merge(nn::Linear& base, const std::string& name) {
    const std::shared_ptr<LoRA>& l = get(name);
    MOA_CHECK(merged_.empty(), ValueError, "LoRALinear: adapter '", merged_, "' is merged already; unmerge it first");
    check_base(base, *l);
    add_delta(base, *l, +1.0);
    merged_ = name;
    active_ = name;
  }
  // base.weight -= scale B A of the merged adapter: W comes back to within one rounding (|W| 2^-24
  // in f32) of its value before the merge, provided A and B were not changed in between. The
  // adapter stays active (now computed beside the base again). No-op when nothing is merged.
  void unmerge(nn::Linear& base) {
    if (merged_.empty()) return;
    const std::shared_ptr<LoRA>& l = get(merged_);
    check_base(base, *l);
    add_delta(base, *l, -1.0);
    merged_.clear();
  }

 private:
  std::string names_str() const {
    std::string s;
    for (const auto& nl : loras_) s += (s.empty() ? "" : ", ") + nl.first;
    return s.empty() ? "none" : s;
  }
  static void check_base(const nn::Linear& base, const LoRA& l) {
    MOA_CHECK(base.weight.dim() == 2 && base.weight.size(0) == l.out_features() &&
                  base.weight.size(1) == l.in_features(),
              ShapeError, "LoRALinear: the adapter is for weight [", l.out_features(), ", ", l.in_features(),
              "], the base weight is ", shape_str(base.weight.shape()));
    MOA_CHECK(base.weight.is_contiguous(), ValueError, "LoRALinear: expected a contiguous base weight");
  }
  static void add_delta(nn::Linear& base, const LoRA& l, double sign) {
    NoGradGuard no_grad;
    const Tensor d = l.delta_weight();
    const double* pd = d.data<double>();
    // On a device: the same host arithmetic on a downloaded copy, then uploaded (merging is rare).
    Tensor host = on_device(base.weight) ? base.weight.detach().to(Device::cpu()) : base.weight.detach();
    ::moa::detail::dispatch_float(host.dtype(), "LoRA merge", [&]<class T>() {
      T* w = host.data<T>();
      const int64_t n = base.weight.numel();
      for (int64_t i = 0; i < n; ++i) w[i] = static_cast<T>(static_cast<double>(w[i]) + sign * pd[i]);
    });
    if (on_device(base.weight)) base.weight.detach().copy_(host);
    ++base.weight.storage()->version;
  }

  std::vector<std::pair<std::string, std::shared_ptr<LoRA>>> loras_;
  std::string active_, merged_;
};

}  // namespace moa::lora
