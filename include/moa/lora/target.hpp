// moa/lora/target.hpp: which nn::Linear maps of a model an adapter targets: every linear of a
// module tree with its dotted path, and the target_modules pattern of LoRAConfig (see config.hpp).
#pragma once

#include <algorithm>
#include <memory>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "moa/nn/linear.hpp"
#include "moa/nn/module.hpp"

namespace moa::lora {

using NamedLinears = std::vector<std::pair<std::string, std::shared_ptr<nn::Linear>>>;

namespace detail {

inline void collect_linears(const nn::Module& m, const std::string& prefix, NamedLinears& out) {
  for (const auto& [name, child] : m.children()) {
    const std::string path = prefix.empty() ? name : prefix + "." + name;
    if (auto lin = std::dynamic_pointer_cast<nn::Linear>(child)) {
      out.emplace_back(path, lin);
      continue;  // a Linear's children are its adapters, never further linears
    }
    collect_linears(*child, path, out);
  }
}

}  // namespace detail

// Every nn::Linear under `root` with its dotted module path, in registration order.
inline NamedLinears named_linears(const nn::Module& root) {
  NamedLinears out;
  detail::collect_linears(root, "", out);
  return out;
}

// A compiled target_modules pattern (the rules are in moa/lora/config.hpp).
class TargetPattern {
 public:
  explicit TargetPattern(std::string pattern) : pattern_(std::move(pattern)) {
    MOA_CHECK(!pattern_.empty(), ValueError, "LoRA target_modules: the pattern is empty");
    if (pattern_ == "all-linear") {
      all_linear_ = true;
      return;
    }
    try {
      re_ = std::regex(pattern_, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw ValueError(::moa::detail::cat("LoRA target_modules: '", pattern_, "' is not a valid regular expression: ",
                                          e.what()));
    }
  }

  // Whether the module at dotted `path` is targeted.
  bool matches(const std::string& path) const {
    if (all_linear_) return path.rfind("blocks.", 0) == 0;
    if (std::regex_match(path, re_)) return true;
    for (std::size_t dot = path.find('.'); dot != std::string::npos; dot = path.find('.', dot + 1))
      if (std::regex_match(path.begin() + static_cast<std::ptrdiff_t>(dot + 1), path.end(), re_)) return true;
    return false;
  }

  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  std::regex re_;
  bool all_linear_ = false;
};

// The linears of `root` that `pattern` targets; a pattern that matches none is a ValueError that
// lists the linear paths there are.
inline NamedLinears match_linears(const nn::Module& root, const std::string& pattern) {
  const TargetPattern tp(pattern);
  const NamedLinears all = named_linears(root);
  NamedLinears out;
  for (const auto& nl : all)
    if (tp.matches(nl.first)) out.push_back(nl);
  if (out.empty()) {
    std::string avail;
    for (std::size_t i = 0; i < all.size(); ++i) avail += (i ? ", " : "") + all[i].first;
    throw ValueError(::moa::detail::cat("LoRA target_modules '", pattern, "' matches no linear map; the model has: ",
                                        all.empty() ? std::string("(none)") : avail));
  }
  return out;
}

// A target_modules pattern that selects exactly `chosen` among `all` paths: the alternation of
// their last components ("q_proj|v_proj") when that selects no other path, else the alternation
// of the full paths with dots escaped ("blocks\\.0\\.attn\\.q_proj|...").
inline std::string pattern_for_paths(const std::vector<std::string>& all, const std::vector<std::string>& chosen) {
  auto last = [](const std::string& p) {
    const auto dot = p.rfind('.');
    return dot == std::string::npos ? p : p.substr(dot + 1);
  };
  std::vector<std::string> names;
  for (const auto& p : chosen)
    if (std::find(names.begin(), names.end(), last(p)) == names.end()) names.push_back(last(p));
  bool exact = true;
  for (const auto& p : all) {
    const bool named = std::find(names.begin(), names.end(), last(p)) != names.end();
    const bool wanted = std::find(chosen.begin(), chosen.end(), p) != chosen.end();
    exact = exact && named == wanted;
  }
  std::string out;
  if (exact) {
    for (const auto& n : names) out += (out.empty() ? "" : "|") + n;
    return out;
  }
  for (const auto& p : chosen) {
    out += out.empty() ? "" : "|";
    for (char c : p) out += c == '.' ? std::string("\\.") : std::string(1, c);
  }
  return out;
}

}  // namespace moa::lora
