// moa/io/checkpoint.hpp: training checkpoints (model weights, AdamW state, step, RNG state, free
// JSON metadata), saved atomically and resumed with precise name/shape checks.
//
// Layout: a directory
//   <dir>/model.safetensors      the weights, under their own names
//   <dir>/optimizer.safetensors  "exp_avg.<name>" and "exp_avg_sq.<name>" per parameter (absent
//                                when the checkpoint has no optimizer state)
//   <dir>/state.json             {"format": "moa.checkpoint", "version": 1, "step", "rng": {"seed",
//                                "offset"}, "optimizer": null | {"type": "AdamW", "step_count",
//                                "config": {lr, beta1, beta2, eps, weight_decay}, "params": [names
//                                in the optimizer's order]}, "metadata": {...}}
// model.safetensors is a plain safetensors file: other tools can read the weights alone.
//
// Atomicity: a save writes everything into a temporary sibling directory, fsyncs it, then swaps it
// with <dir> in one step (renameat2 RENAME_EXCHANGE) and deletes the old one. Where the filesystem
// cannot exchange, <dir> is first renamed to <dir>.moa-old, then the new one into place; a crash
// between the two renames leaves <dir>.moa-old, which load_checkpoint falls back to. At every
// instant a complete checkpoint (old or new) is on disk. A save refuses to replace a directory
// that is not a moa checkpoint.
#pragma once

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/core/rng.hpp"
#include "moa/core/tensor.hpp"
#include "moa/io/file.hpp"
#include "moa/io/safetensors.hpp"
#include "moa/optim/adamw.hpp"

namespace moa::io {

// AdamW's state keyed by parameter name.
struct AdamWState {
  optim::AdamWConfig config;
  std::int64_t step_count = 0;
  std::vector<std::string> params;  // names in the optimizer's parameter order
  TensorMap exp_avg, exp_avg_sq;    // m and v per name
};

struct RngState {
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  static RngState of(const Generator& g) { return {g.seed(), g.offset()}; }
  void apply(Generator& g) const { g.set_state(seed, offset); }
  friend bool operator==(const RngState&, const RngState&) = default;
};

struct TrainingCheckpoint {
  TensorMap model;
  std::optional<AdamWState> optimizer;
  std::int64_t step = 0;
  RngState rng;
  nlohmann::json metadata = nlohmann::json::object();  // e.g. the model config
};

namespace detail {

inline constexpr const char* kCheckpointFormat = "moa.checkpoint";

inline bool is_checkpoint_dir(const std::filesystem::path& dir) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(dir / "state.json", ec)) return false;
  try {
    const auto j = nlohmann::json::parse(read_text_file(dir / "state.json", "load_checkpoint"));
    return j.is_object() && j.value("format", "") == kCheckpointFormat;
  } catch (const std::exception&) {
    return false;
  }
}

inline std::filesystem::path backup_of(const std::filesystem::path& dir) {
  return dir.parent_path() / (dir.filename().string() + ".moa-old");
}

// Tests set this to take the two-rename path even where the filesystem can exchange.
inline bool& checkpoint_without_exchange() {
  static bool off = false;
  return off;
}

// Atomically exchanges two paths; false where the kernel or filesystem cannot.
inline bool exchange_paths(const std::filesystem::path& a, const std::filesystem::path& b) {
  return !checkpoint_without_exchange() && rename_exchange(a, b);
}

inline void rename_or_throw(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::error_code ec;
  std::filesystem::rename(from, to, ec);
  MOA_CHECK(!ec, IOError, "save_checkpoint: renaming ", from, " to ", to, " failed: ", ec.message());
}

// Lists, in one message, every difference between the names/shapes expected and found.
inline std::string mismatch_report(const std::map<std::string, Shape>& expected,
                                   const std::map<std::string, Shape>& found) {
  std::string missing, unexpected, shapes;
  int nm = 0, nu = 0, ns = 0;
  for (const auto& [name, shape] : expected) {
    auto it = found.find(name);
    if (it == found.end()) {
      missing += (nm++ ? ", " : "") + name;
    } else if (it->second != shape) {
      shapes += cat(ns++ ? "; " : "", name, ": expected ", shape_str(shape), ", got ", shape_str(it->second));
    }
  }
  for (const auto& [name, shape] : found)
    if (!expected.count(name)) unexpected += (nu++ ? ", " : "") + name;
  std::string out;
  if (nm) out += cat(nm, " missing (", missing, ")");
  if (nu) out += cat(out.empty() ? "" : "; ", nu, " unexpected (", unexpected, ")");
  if (ns) out += cat(out.empty() ? "" : "; ", ns, " with another shape (", shapes, ")");
  return out;
}

inline std::map<std::string, Shape> shapes_of(const TensorMap& m) {
  std::map<std::string, Shape> out;
  for (const auto& [k, v] : m) out[k] = v.shape();
  return out;
}

inline nlohmann::json adamw_config_json(const optim::AdamWConfig& c) {
  return {{"lr", c.lr}, {"beta1", c.beta1}, {"beta2", c.beta2}, {"eps", c.eps}, {"weight_decay", c.weight_decay}};
}

}  // namespace detail

// Copies `src`'s values into the tensors of `dst` (live parameters), after checking that both have
// exactly the same names and shapes; otherwise a ShapeError lists everything missing, unexpected
// and mis-shaped. `what` names the collection in the message ("model", "exp_avg").
inline void copy_into(const TensorMap& dst, const TensorMap& src, std::string_view what = "state") {
  const std::string report = detail::mismatch_report(detail::shapes_of(dst), detail::shapes_of(src));
  MOA_CHECK(report.empty(), ShapeError, "copy_into: the loaded ", what, " does not match: ", report);
  for (const auto& [name, t] : dst) {
    Tensor d = t;
    const Tensor& s = src.at(name);
    if (d.dtype() == s.dtype() && d.is_contiguous() && s.is_contiguous() && !on_device(d) && !on_device(s)) {
      if (d.numel()) std::memcpy(d.data_ptr(), s.data_ptr(), static_cast<std::size_t>(d.numel()) * dtype_size(d.dtype()));
      ++d.storage()->version;
    } else {
      d.copy_(s);
    }
  }
}

// AdamW's state, keyed by `names` (one per parameter, in the optimizer's order). The tensors alias
// the optimizer's: save them before the next step, or clone.
inline AdamWState adamw_state(optim::AdamW& opt, const std::vector<std::string>& names) {
  MOA_CHECK(names.size() == opt.params().size(), ValueError, "adamw_state: expected ", opt.params().size(),
            " parameter names, got ", names.size());
  AdamWState s;
  s.config = opt.config();
  s.step_count = opt.step_count();
  s.params = names;
  for (std::size_t i = 0; i < names.size(); ++i) {
    MOA_CHECK(!s.exp_avg.count(names[i]), ValueError, "adamw_state: parameter name '", names[i], "' is repeated");
    s.exp_avg[names[i]] = opt.exp_avg()[i];
    s.exp_avg_sq[names[i]] = opt.exp_avg_sq()[i];
  }
  return s;
}

// Restores `state` into `opt`, whose parameters are named `names` (in its order): m, v, step count
// and config. The saved and live parameter sets must match by name and shape (the order may differ).
inline void restore_adamw(optim::AdamW& opt, const std::vector<std::string>& names, const AdamWState& state) {
  MOA_CHECK(names.size() == opt.params().size(), ValueError, "restore_adamw: expected ", opt.params().size(),
            " parameter names, got ", names.size());
  TensorMap m, v;
  for (std::size_t i = 0; i < names.size(); ++i) {
    m[names[i]] = opt.exp_avg()[i];
    v[names[i]] = opt.exp_avg_sq()[i];
  }
  MOA_CHECK(m.size() == names.size(), ValueError, "restore_adamw: parameter names must be distinct");
  copy_into(m, state.exp_avg, "optimizer exp_avg");
  copy_into(v, state.exp_avg_sq, "optimizer exp_avg_sq");
  opt.config() = state.config;
  opt.set_step_count(state.step_count);
}

// Saves `ckpt` to the directory `dir` atomically (see the top of this file).
inline void save_checkpoint(const std::filesystem::path& dir_in, const TrainingCheckpoint& ckpt) {
  namespace fs = std::filesystem;
  const fs::path dir = dir_in.filename().empty() ? dir_in.parent_path() : dir_in;  // "ckpt/" -> "ckpt"
  std::error_code ec;
  const bool exists = fs::exists(dir, ec);
  MOA_CHECK(!exists || detail::is_checkpoint_dir(dir), IOError, "save_checkpoint: ", dir,
            " exists and is not a moa checkpoint (no state.json with format \"", detail::kCheckpointFormat,
            "\"); refusing to replace it");
  if (!dir.parent_path().empty()) {
    fs::create_directories(dir.parent_path(), ec);
    MOA_CHECK(!ec, IOError, "save_checkpoint: cannot create ", dir.parent_path(), ": ", ec.message());
  }

  nlohmann::json state = {{"format", detail::kCheckpointFormat}, {"version", 1},  {"step", ckpt.step},
                          {"rng", {{"seed", ckpt.rng.seed}, {"offset", ckpt.rng.offset}}},
                          {"metadata", ckpt.metadata}, {"optimizer", nullptr}};
  TensorMap opt_tensors;
  if (ckpt.optimizer) {
    const AdamWState& o = *ckpt.optimizer;
    const std::set<std::string> names(o.params.begin(), o.params.end());
    MOA_CHECK(names.size() == o.params.size() && o.exp_avg.size() == names.size() &&
                  o.exp_avg_sq.size() == names.size(),
              ValueError, "save_checkpoint: the optimizer state needs one exp_avg and one exp_avg_sq per named "
              "parameter, got ", o.params.size(), " names, ", o.exp_avg.size(), " exp_avg, ", o.exp_avg_sq.size(),
              " exp_avg_sq");
    for (const auto& n : o.params) {
      MOA_CHECK(o.exp_avg.count(n) && o.exp_avg_sq.count(n), ValueError, "save_checkpoint: no optimizer state for '",
                n, "'");
      opt_tensors["exp_avg." + n] = o.exp_avg.at(n);
      opt_tensors["exp_avg_sq." + n] = o.exp_avg_sq.at(n);
    }
    state["optimizer"] = {{"type", "AdamW"},
                          {"step_count", o.step_count},
                          {"config", detail::adamw_config_json(o.config)},
                          {"params", o.params}};
  }

  std::string state_text;
  try {
    state_text = state.dump(1) + "\n";
  } catch (const nlohmann::json::exception& e) {
    throw ValueError(detail::cat("save_checkpoint: the metadata cannot be written as JSON: ", e.what()));
  }

  const fs::path tmp = detail::temp_sibling(dir);
  fs::create_directory(tmp, ec);
  MOA_CHECK(!ec, IOError, "save_checkpoint: cannot create the temporary directory ", tmp, ": ", ec.message());
  try {
    save_safetensors(tmp / "model.safetensors", ckpt.model, {{"format", "pt"}});
    detail::fault_point("checkpoint.model");
    if (ckpt.optimizer) save_safetensors(tmp / "optimizer.safetensors", opt_tensors, {{"format", "pt"}});
    detail::fault_point("checkpoint.optimizer");
    detail::write_file_atomic(tmp / "state.json", state_text, "save_checkpoint");
    detail::sync_directory(tmp);
    detail::fault_point("checkpoint.before_swap");
    if (!exists) {
      detail::rename_or_throw(tmp, dir);
      fs::remove_all(detail::backup_of(dir), ec);  // left by a crash between two renames: now stale
    } else if (detail::exchange_paths(tmp, dir)) {
      // tmp now holds the old checkpoint.
    } else {
      const fs::path old = detail::backup_of(dir);
      fs::remove_all(old, ec);
      detail::rename_or_throw(dir, old);
      detail::fault_point("checkpoint.between_renames");
      detail::rename_or_throw(tmp, dir);
      fs::remove_all(old, ec);
    }
    detail::sync_directory(dir.parent_path());
  } catch (...) {
    // Whatever tmp holds now (the new checkpoint half-written, or the old one after an exchange
    // followed by a failure) is not the live checkpoint.
    if (fs::exists(dir, ec)) fs::remove_all(tmp, ec);
    throw;
  }
  fs::remove_all(tmp, ec);  // the old checkpoint, after an exchange
}

// Loads a checkpoint saved by save_checkpoint. Tensors view the files' mappings (copy-on-write).
inline TrainingCheckpoint load_checkpoint(const std::filesystem::path& dir_in) {
  namespace fs = std::filesystem;
  fs::path dir = dir_in.filename().empty() ? dir_in.parent_path() : dir_in;
  std::error_code ec;
  if (!fs::exists(dir, ec) && detail::is_checkpoint_dir(detail::backup_of(dir)))
    dir = detail::backup_of(dir);  // a save crashed between its two renames
  MOA_CHECK(fs::is_directory(dir, ec), IOError, "load_checkpoint: ", dir, " is not a directory");
  const fs::path state_path = dir / "state.json";
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(detail::read_text_file(state_path, "load_checkpoint"));
  } catch (const nlohmann::json::exception& e) {
    throw IOError(detail::cat("load_checkpoint: ", state_path, ": malformed JSON: ", e.what()));
  }
  auto bad = [&](const std::string& what) { return IOError(detail::cat("load_checkpoint: ", state_path, ": ", what)); };
  if (!state.is_object() || state.value("format", "") != detail::kCheckpointFormat)
    throw bad(detail::cat("expected \"format\": \"", detail::kCheckpointFormat, "\""));
  if (state.value("version", 0) != 1)
    throw bad(detail::cat("unsupported version ", state.value("version", 0), " (expected 1)"));

  TrainingCheckpoint ck;
  try {
    ck.step = state.at("step").get<std::int64_t>();
    ck.rng.seed = state.at("rng").at("seed").get<std::uint64_t>();
    ck.rng.offset = state.at("rng").at("offset").get<std::uint64_t>();
    ck.metadata = state.value("metadata", nlohmann::json::object());
  } catch (const nlohmann::json::exception& e) {
    throw bad(detail::cat("missing or invalid field: ", e.what()));
  }
  ck.model = load_safetensors(dir / "model.safetensors").tensors;

  const auto& o = state.at("optimizer");
  if (!o.is_null()) {
    AdamWState s;
    try {
      if (o.at("type").get<std::string>() != "AdamW")
        throw bad(detail::cat("unknown optimizer type ", o.at("type").dump()));
      s.step_count = o.at("step_count").get<std::int64_t>();
      const auto& c = o.at("config");
      s.config = {.lr = c.at("lr").get<double>(),
                  .beta1 = c.at("beta1").get<double>(),
                  .beta2 = c.at("beta2").get<double>(),
                  .eps = c.at("eps").get<double>(),
                  .weight_decay = c.at("weight_decay").get<double>()};
      s.params = o.at("params").get<std::vector<std::string>>();
    } catch (const nlohmann::json::exception& e) {
      throw bad(detail::cat("invalid optimizer state: ", e.what()));
    }
    TensorMap t = load_safetensors(dir / "optimizer.safetensors").tensors;
    for (const auto& n : s.params) {
      for (const char* part : {"exp_avg.", "exp_avg_sq."}) {
        auto it = t.find(part + n);
        MOA_CHECK(it != t.end(), IOError, "load_checkpoint: ", dir / "optimizer.safetensors", " has no tensor '",
                  part, n, "' (state.json lists parameter '", n, "')");
        (std::string_view(part) == "exp_avg." ? s.exp_avg : s.exp_avg_sq)[n] = it->second;
      }
    }
    MOA_CHECK(t.size() == 2 * s.params.size(), IOError, "load_checkpoint: ", dir / "optimizer.safetensors", " has ",
              t.size(), " tensors, expected ", 2 * s.params.size(), " (exp_avg and exp_avg_sq for each of the ",
              s.params.size(), " parameters in state.json)");
    ck.optimizer = std::move(s);
  }
  return ck;
}

}  // namespace moa::io
