// moa/io/llama2c.hpp: karpathy/llama2.c model files (.bin), read into Hugging Face Llama names.
//
// Formats (all little-endian):
//  - version 0 ("legacy", what run.c reads): 7 int32 (dim, hidden_dim, n_layers, n_heads,
//    n_kv_heads, vocab_size, seq_len; a negative vocab_size means the classifier is not shared with
//    the embedding), then float32 weights: token_embedding (V, C); per kind, all layers in a row:
//    rms_att (L, C), wq (L, H*D, C), wk (L, KV*D, C), wv (L, KV*D, C), wo (L, C, H*D), rms_ffn (L, C),
//    w1 (L, F, C), w2 (L, C, F), w3 (L, F, C); rms_final (C); freq_cis_real and freq_cis_imag
//    (seq_len, D/2 each; skipped); wcls (V, C) when not shared.
//  - version 1 (export.py --version 1): uint32 magic 0x616b3432 ("ak42"), int32 version = 1, the
//    same 7 int32 (vocab_size positive), uint8 shared_classifier, zero padding to 256 bytes; then
//    rms_att, rms_ffn, rms_final, token_embedding, wq, wk, wv, wo, w1, w2, w3, [wcls]; no freq_cis.
//  - version 2 (int8 Q8_0) is refused.
// C = dim, F = hidden_dim, L = layers, H/KV = query/key-value heads, D = dim / H, V = vocab.
//
// Names returned (HF Llama): model.embed_tokens.weight (V, C); model.layers.{i}.input_layernorm.weight
// (rms_att), .self_attn.{q,k,v,o}_proj.weight (wq (H*D, C), wk (KV*D, C), wv, wo (C, H*D)),
// .post_attention_layernorm.weight (rms_ffn), .mlp.gate_proj.weight (w1), .mlp.up_proj.weight (w3),
// .mlp.down_proj.weight (w2); model.norm.weight; lm_head.weight (V, C): the very same tensor as
// model.embed_tokens.weight when the classifier is shared.
//
// RoPE layout of q_proj / k_proj. llama2.c (like Meta's original Llama) rotates interleaved pairs
// (x[2i], x[2i+1]) of each head; Hugging Face's Llama rotates halves (x[i], x[i + D/2]) and its
// conversion script permutes the rows of wq and wk to match. By default (RopeLayout::hf_rotate_half)
// the weights returned ARE PERMUTED that way, so the map is a true HF Llama state dict: a model
// using HF's rotate-half RoPE reproduces run.c's outputs. RopeLayout::llama2c_interleaved returns
// the rows as in the file, for a model that rotates interleaved pairs. permute_for_hf_rope /
// unpermute_from_hf_rope convert one matrix either way. (tests/fixtures/io/gen_io_fixtures.py
// checks, with transformers' LlamaForCausalLM, that the permuted stories260K weights give run.c's
// logits.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/core/tensor.hpp"
#include "moa/io/file.hpp"
#include "moa/io/safetensors.hpp"

namespace moa::io {

enum class RopeLayout { hf_rotate_half, llama2c_interleaved };

struct Llama2cOptions {
  RopeLayout qk_layout = RopeLayout::hf_rotate_half;
  // Copy the other weights instead of viewing the file's (copy-on-write) mapping.
  bool copy = false;
};

struct Llama2cConfig {
  int64_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
  bool shared_classifier = true;
  int version = 0;  // 0 legacy, 1
  int64_t head_dim() const { return dim / n_heads; }
};

struct Llama2cModel {
  Llama2cConfig config;
  TensorMap weights;
};

// The HF LlamaConfig fields for a llama2.c model (llama2.c's fixed choices: RMSNorm eps 1e-5,
// RoPE theta 10000, SwiGLU, no biases).
inline nlohmann::json llama2c_hf_config(const Llama2cConfig& c) {
  return {{"model_type", "llama"},
          {"architectures", {"LlamaForCausalLM"}},
          {"hidden_size", c.dim},
          {"intermediate_size", c.hidden_dim},
          {"num_hidden_layers", c.n_layers},
          {"num_attention_heads", c.n_heads},
          {"num_key_value_heads", c.n_kv_heads},
          {"vocab_size", c.vocab_size},
          {"max_position_embeddings", c.seq_len},
          {"rms_norm_eps", 1e-5},
          {"rope_theta", 10000.0},
          {"hidden_act", "silu"},
          {"tie_word_embeddings", c.shared_classifier}};
}

namespace detail {

// Row r of the output takes row src_row(r) of the input; rows are D-blocks per head.
template <class SrcRow>
Tensor permute_rows(const Tensor& w_in, int64_t n_heads, const char* op, SrcRow src_row) {
  MOA_CHECK(w_in.dim() == 2, ShapeError, op, ": expected a matrix (heads * head_dim, dim), got shape ",
            shape_str(w_in.shape()));
  MOA_CHECK(n_heads > 0 && w_in.size(0) % n_heads == 0 && (w_in.size(0) / n_heads) % 2 == 0, ShapeError, op,
            ": expected the row count to be n_heads times an even head_dim, got ", w_in.size(0), " rows and ",
            n_heads, " heads");
  const Tensor w = w_in.is_contiguous() ? w_in : w_in.contiguous();
  const int64_t hd = w.size(0) / n_heads;
  const std::size_t row = static_cast<std::size_t>(w.size(1)) * dtype_size(w.dtype());
  Tensor out = Tensor::empty(w.shape(), w.dtype());
  const auto* s = static_cast<const std::byte*>(w.data_ptr());
  auto* d = static_cast<std::byte*>(out.data_ptr());
  for (int64_t h = 0; h < n_heads; ++h)
    for (int64_t r = 0; r < hd; ++r)
      std::memcpy(d + static_cast<std::size_t>(h * hd + r) * row, s + static_cast<std::size_t>(h * hd + src_row(r, hd)) * row,
                  row);
  return out;
}

}  // namespace detail

// Interleaved pairs -> rotate-half, per head, as transformers' convert_llama_weights_to_hf.py:
// w.view(n_heads, D/2, 2, dim).transpose(1, 2).reshape(n_heads * D, dim). Within each head, output
// row j * D/2 + i is input row 2i + j. Returns a new tensor.
inline Tensor permute_for_hf_rope(const Tensor& w, int64_t n_heads) {
  return detail::permute_rows(w, n_heads, "permute_for_hf_rope",
                              [](int64_t r, int64_t hd) { return (r % (hd / 2)) * 2 + r / (hd / 2); });
}
// The inverse: rotate-half -> interleaved pairs.
inline Tensor unpermute_from_hf_rope(const Tensor& w, int64_t n_heads) {
  return detail::permute_rows(w, n_heads, "unpermute_from_hf_rope",
                              [](int64_t r, int64_t hd) { return (r % 2) * (hd / 2) + r / 2; });
}

namespace detail {

struct Llama2cHeader {
  Llama2cConfig config;
  std::uint64_t weights_at = 0;
};

inline Llama2cHeader parse_llama2c_header(const MappedFile& f) {
  auto fail = [&](const std::string& what) { return IOError(cat("llama2c: ", f.path, ": ", what)); };
  auto i32_at = [&](std::size_t off) {
    std::int32_t v;
    std::memcpy(&v, f.bytes() + off, 4);
    return v;
  };
  MOA_CHECK(f.size >= 28, IOError, "llama2c: ", f.path, ": file too short: expected at least 28 bytes (the header), got ",
            f.size);
  Llama2cHeader h;
  Llama2cConfig& c = h.config;
  std::uint32_t magic;
  std::memcpy(&magic, f.bytes(), 4);
  std::size_t cfg_at = 0;
  if (magic == 0x616b3432u) {
    if (f.size < 256) throw fail(cat("file too short: a version-1+ header is 256 bytes, got ", f.size));
    c.version = i32_at(4);
    if (c.version == 2) throw fail("version 2 (int8 Q8_0 quantized) files are not supported; export with --version 1 or 0");
    if (c.version != 1) throw fail(cat("unknown format version ", c.version, " (supported: 0 and 1)"));
    cfg_at = 8;
    h.weights_at = 256;
  } else {
    h.weights_at = 28;
  }
  const std::int32_t dim = i32_at(cfg_at), hidden = i32_at(cfg_at + 4), layers = i32_at(cfg_at + 8),
                     heads = i32_at(cfg_at + 12), kv = i32_at(cfg_at + 16), vocab = i32_at(cfg_at + 20),
                     seq = i32_at(cfg_at + 24);
  const std::string got = cat("dim=", dim, " hidden_dim=", hidden, " n_layers=", layers, " n_heads=", heads,
                              " n_kv_heads=", kv, " vocab_size=", vocab, " seq_len=", seq);
  if (dim <= 0 || hidden <= 0 || layers <= 0 || heads <= 0 || kv <= 0 || vocab == 0 || seq <= 0)
    throw fail(cat("invalid header: expected positive sizes, got ", got));
  if (dim % heads != 0 || heads % kv != 0 || (dim / heads) % 2 != 0)
    throw fail(cat("invalid header: expected dim divisible by n_heads, n_heads divisible by n_kv_heads and an "
                   "even head_dim, got ", got));
  if (c.version == 1 && vocab < 0) throw fail(cat("invalid header: negative vocab_size in a version-1 file: ", got));
  c.dim = dim;
  c.hidden_dim = hidden;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = kv;
  c.vocab_size = vocab < 0 ? -static_cast<int64_t>(vocab) : vocab;
  c.seq_len = seq;
  c.shared_classifier = c.version == 1 ? std::to_integer<int>(f.bytes()[36]) != 0 : vocab > 0;
  return h;
}

}  // namespace detail

// The config of a llama2.c file (reads only the header).
inline Llama2cConfig read_llama2c_config(const std::filesystem::path& path) {
  return detail::parse_llama2c_header(detail::MappedFile::open(path, "llama2c")).config;
}

// Loads a llama2.c model: the config and the weights (f32) in HF names; see the top of this file.
inline Llama2cModel load_llama2c(const std::filesystem::path& path, const Llama2cOptions& options = {}) {
  const detail::MappedFile f = detail::MappedFile::open(path, "llama2c");
  const detail::Llama2cHeader h = detail::parse_llama2c_header(f);
  const Llama2cConfig& c = h.config;
  const int64_t C = c.dim, F = c.hidden_dim, L = c.n_layers, H = c.n_heads, KV = c.n_kv_heads, V = c.vocab_size,
                D = c.head_dim();

  // One block: a llama2.c array, for all layers or one; `hf` holds "{i}" for the layer index.
  struct Block {
    const char* llama2c;
    std::string hf;  // empty: skipped (freq_cis)
    Shape shape;     // of one layer's tensor
    bool per_layer;
  };
  const std::string layer = "model.layers.{i}.";
  const Block emb{"token_embedding_table", "model.embed_tokens.weight", {V, C}, false};
  const Block rms_att{"rms_att_weight", layer + "input_layernorm.weight", {C}, true};
  const Block rms_ffn{"rms_ffn_weight", layer + "post_attention_layernorm.weight", {C}, true};
  const Block wq{"wq", layer + "self_attn.q_proj.weight", {H * D, C}, true};
  const Block wk{"wk", layer + "self_attn.k_proj.weight", {KV * D, C}, true};
  const Block wv{"wv", layer + "self_attn.v_proj.weight", {KV * D, C}, true};
  const Block wo{"wo", layer + "self_attn.o_proj.weight", {C, H * D}, true};
  const Block w1{"w1", layer + "mlp.gate_proj.weight", {F, C}, true};
  const Block w2{"w2", layer + "mlp.down_proj.weight", {C, F}, true};
  const Block w3{"w3", layer + "mlp.up_proj.weight", {F, C}, true};
  const Block norm{"rms_final_weight", "model.norm.weight", {C}, false};
  const Block freq_re{"freq_cis_real", "", {c.seq_len, D / 2}, false};
  const Block freq_im{"freq_cis_imag", "", {c.seq_len, D / 2}, false};
  const Block wcls{"wcls", "lm_head.weight", {V, C}, false};
  std::vector<Block> blocks =
      c.version == 0 ? std::vector<Block>{emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, norm, freq_re, freq_im}
                     : std::vector<Block>{rms_att, rms_ffn, norm, emb, wq, wk, wv, wo, w1, w2, w3};
  if (!c.shared_classifier) blocks.push_back(wcls);

  // Byte offsets first (with overflow checks), so that a short file is reported before any copy.
  struct Placed {
    std::string name;
    std::string what;
    const Block* block;
    std::uint64_t at;
  };
  std::vector<Placed> placed;
  std::uint64_t at = h.weights_at;
  const std::string sizes = detail::cat("dim=", C, " hidden_dim=", F, " n_layers=", L, " n_heads=", H,
                                        " n_kv_heads=", KV, " vocab_size=", V, " seq_len=", c.seq_len);
  for (const Block& b : blocks) {
    for (int64_t i = 0; i < (b.per_layer ? L : 1); ++i) {
      std::uint64_t bytes = 4;
      bool overflow = false;
      for (int64_t s : b.shape) overflow |= __builtin_mul_overflow(bytes, static_cast<std::uint64_t>(s), &bytes);
      std::string name = b.hf;
      if (auto p = name.find("{i}"); p != std::string::npos) name.replace(p, 3, std::to_string(i));
      const std::string what =
          detail::cat(name.empty() ? b.llama2c : name.c_str(), " (llama2.c ", b.llama2c,
                      b.per_layer ? detail::cat(", layer ", i) : std::string(), ", ", shape_str(b.shape), ")");
      std::uint64_t end = 0;
      overflow |= __builtin_add_overflow(at, bytes, &end);
      MOA_CHECK(!overflow && end <= f.size, IOError, "llama2c: ", f.path, ": truncated: tensor ", what,
                " expected at bytes [", at, ", ", overflow ? std::string("overflow") : std::to_string(end),
                ") but the file has ", f.size, " bytes (header: ", sizes, ")");
      if (!b.hf.empty()) placed.push_back({name, what, &b, at});
      at = end;
    }
  }
  MOA_CHECK(at == f.size, IOError, "llama2c: ", f.path, ": ", f.size - at, " trailing bytes: the header (", sizes,
            ", version ", c.version, ", ", c.shared_classifier ? "shared" : "separate",
            " classifier) describes a file of ", at, " bytes");

  Llama2cModel m;
  m.config = c;
  for (const Placed& p : placed) {
    const std::byte* src = f.bytes() + p.at;
    const std::size_t nbytes = static_cast<std::size_t>(numel_of(p.block->shape)) * 4;
    Tensor t;
    if (!options.copy && reinterpret_cast<std::uintptr_t>(src) % 4 == 0) {
      t = detail::tensor_viewing(f.data, src, nbytes, p.block->shape, DType::f32);
    } else {
      t = Tensor::empty(p.block->shape, DType::f32);
      std::memcpy(t.data_ptr(), src, nbytes);
    }
    if (options.qk_layout == RopeLayout::hf_rotate_half) {
      const std::string_view kind = p.block->llama2c;
      if (kind == "wq") t = permute_for_hf_rope(t, H);
      if (kind == "wk") t = permute_for_hf_rope(t, KV);
    }
    m.weights.emplace(p.name, t);
  }
  if (c.shared_classifier) m.weights.emplace("lm_head.weight", m.weights.at("model.embed_tokens.weight"));
  return m;
}

}  // namespace moa::io
