// moa/io/safetensors.hpp: the safetensors format (https://github.com/huggingface/safetensors), read
// memory-mapped and written atomically.
//
// A file is: 8 bytes, the header length N (little-endian u64); N bytes of JSON,
//   {"__metadata__": {"k": "v", ...}, "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]}, ...}
// padded with spaces; then the data section, where each tensor's bytes (row-major, little-endian)
// lie at [b, e) relative to the section's start.
//
// Reading accepts exactly what the reference loader (the Python/Rust `safetensors` package, 0.8)
// accepts: at least 8 bytes; N <= 100,000,000 and 8 + N <= file size; the header valid UTF-8 JSON
// and an object; `__metadata__` null or an object of strings; every tensor entry with a known dtype,
// a shape of non-negative integers and two data_offsets; sorted by offsets, the tensors tile the
// data section exactly (each begins where the previous ended, the first at 0; no gaps, no overlaps)
// and the last one ends at the end of the file (no trailing bytes); e - b equals numel * dtype size
// (without overflow). Unknown fields inside a tensor entry are ignored, as the reference does.
//
// Writing follows the reference writer byte for byte: tensors ordered by dtype alignment, largest
// first (F64, F32, I32, BF16, F16), then by name (bytewise); the header compact JSON (no spaces)
// with `__metadata__` first (only when there is metadata), each entry's keys in the order dtype,
// shape, data_offsets; padded with spaces to a multiple of 8, so every tensor is aligned. Files we
// write are therefore byte-identical to Python's `safetensors.numpy.save` / `save_file` for the same
// tensors when there is at most one metadata key (the reference writes several keys in hash order,
// which varies between runs; we write them sorted).
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/core/half.hpp"
#include "moa/core/tensor.hpp"
#include "moa/io/file.hpp"

namespace moa::io {

static_assert(std::endian::native == std::endian::little, "moa/io assumes a little-endian host");

// Tensors by name, in name order.
using TensorMap = std::map<std::string, Tensor>;
// The `__metadata__` strings of a file.
using StringMap = std::map<std::string, std::string>;

struct SafetensorsOptions {
  // BF16 tensors stay bf16 (storage only) instead of being widened to f32. F16 is always widened.
  bool keep_bf16 = false;
  // Copy every tensor into its own memory instead of viewing the file's mapping where possible
  // (F32, F64, I32 and kept BF16 data that is aligned). Views are copy-on-write: writing to them
  // never changes the file, and they stay valid if the file is replaced (renamed over) or deleted,
  // but not if it is truncated in place by someone else.
  bool copy = false;
};

// One tensor entry of a header. `dtype` is the file's spelling ("F32", "BF16", "I64", ...).
struct SafetensorsEntry {
  std::string name;
  std::string dtype;
  Shape shape;
  std::uint64_t begin = 0, end = 0;  // byte offsets in the data section, as in the header
};

struct SafetensorsData {
  TensorMap tensors;
  StringMap metadata;
};

namespace detail {

struct StDtype {
  const char* name;
  int bits;  // sub-byte types (F4, F6) exist in the spec
};

// Every dtype the reference package knows, largest alignment last (its enum order).
inline const std::vector<StDtype>& st_dtypes() {
  static const std::vector<StDtype> all = {
      {"BOOL", 8},    {"F4", 4},     {"F6_E2M3", 6},     {"F6_E3M2", 6},     {"U8", 8},   {"I8", 8},
      {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8},    {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8},
      {"I16", 16},    {"U16", 16},   {"F16", 16},        {"BF16", 16},       {"I32", 32}, {"U32", 32},
      {"F32", 32},    {"C64", 64},   {"F64", 64},        {"I64", 64},        {"U64", 64}};
  return all;
}
inline const StDtype* find_st_dtype(std::string_view name) {
  for (const auto& d : st_dtypes())
    if (name == d.name) return &d;
  return nullptr;
}

inline const char* st_dtype_of(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::i32: return "I32";
    case DType::bf16: return "BF16";
  }
  return "?";
}
// The reference writer's order: larger alignment first (its enum order, descending).
inline int st_write_rank(DType t) {
  switch (t) {
    case DType::f64: return 0;
    case DType::f32: return 1;
    case DType::i32: return 2;
    case DType::bf16: return 3;
  }
  return 4;
}

// A tensor whose storage is `nbytes` of someone else's memory at `ptr`, kept alive by `owner`.
inline Tensor tensor_viewing(const std::shared_ptr<std::byte>& owner, const std::byte* ptr, std::size_t nbytes,
                             const Shape& shape, DType dtype) {
  auto impl = std::make_shared<moa::detail::TensorImpl>();
  impl->storage = Storage::wrap(std::shared_ptr<std::byte>(owner, const_cast<std::byte*>(ptr)), nbytes,
                                Device::cpu());
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

// Copies a tensor's elements in row-major order into `out` (any strides, any dtype).
inline void gather_bytes(const Tensor& t, std::byte* out) {
  const std::size_t es = dtype_size(t.dtype());
  const std::byte* base = static_cast<const std::byte*>(t.data_ptr());
  if (t.is_contiguous()) {
    std::memcpy(out, base, static_cast<std::size_t>(t.numel()) * es);
    return;
  }
  const Strides dst = contiguous_strides(t.shape());
  const Strides src = t.strides();
  moa::detail::for_each_row<2>(t.shape(), {&dst, &src},
                               [&](const std::array<int64_t, 2>& off, int64_t len, const std::array<int64_t, 2>& in) {
                                 for (int64_t i = 0; i < len; ++i)
                                   std::memcpy(out + static_cast<std::size_t>(off[0] + i) * es,
                                               base + static_cast<std::size_t>(off[1] + i * in[1]) * es, es);
                               });
}

}  // namespace detail

// A safetensors file opened once: the header parsed and validated, the data mapped; tensors are
// materialised on request. Cheap to keep around; tensors it returns may outlive it.
class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::filesystem::path& path)
      : file_(detail::MappedFile::open(path, "safetensors")) {
    parse();
  }

  const std::filesystem::path& path() const { return file_.path; }
  // Entries in file (data offset) order.
  //
  // Tensors loaded as views of one reader share its mapping: loading a name twice gives two
  // tensors over the same memory (writing one shows in the other, never in the file). Pass
  // {.copy = true}, or use another reader (load_safetensors opens a new one), for independent ones.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : entries_) out.push_back(e.name);
    return out;
  }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const {
    auto it = index_.find(name);
    MOA_CHECK(it != index_.end(), IOError, "safetensors: no tensor named '", name, "' in ", path(), " (it has ",
              entries_.size(), " tensors)");
    return entries_[it->second];
  }
  const StringMap& metadata() const { return metadata_; }

  Tensor load(const std::string& name, const SafetensorsOptions& options = {}) const {
    return materialise(entry(name), options);
  }
  TensorMap load_all(const SafetensorsOptions& options = {}) const {
    TensorMap out;
    for (const auto& e : entries_) out.emplace(e.name, materialise(e, options));
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw IOError(detail::cat("safetensors: ", path(), ": ", what));
  }

  void parse() {
    constexpr std::uint64_t kMaxHeader = 100'000'000;  // the reference loader's limit
    if (file_.size < 8) fail(detail::cat("file too short: expected at least 8 bytes (the header length), got ", file_.size));
    std::uint64_t n = 0;
    std::memcpy(&n, file_.bytes(), 8);
    if (n > kMaxHeader) fail(detail::cat("header length ", n, " exceeds the limit of ", kMaxHeader, " bytes"));
    if (8 + n > file_.size)
      fail(detail::cat("header length ", n, " goes beyond the end of the file (", file_.size, " bytes)"));
    header_len_ = n;
    const char* h = reinterpret_cast<const char*>(file_.bytes() + 8);
    // JSON has no place for a raw NUL, and nlohmann's parser would take one for the end of input.
    if (const void* nul = std::memchr(h, 0, n))
      fail(detail::cat("malformed JSON header: a NUL byte at header offset ", static_cast<const char*>(nul) - h));
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(h, h + n);
    } catch (const nlohmann::json::exception& e) {
      fail(detail::cat("malformed JSON header: ", e.what()));
    }
    if (!j.is_object()) fail(detail::cat("the header must be a JSON object, got ", j.type_name()));

    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& key = it.key();
      const nlohmann::json& v = it.value();
      if (key == "__metadata__") {
        if (v.is_null()) continue;
        if (!v.is_object()) fail(detail::cat("__metadata__ must be an object of strings, got ", v.type_name()));
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string())
            fail(detail::cat("__metadata__ value for '", m.key(), "' must be a string, got ", m.value().type_name()));
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      entries_.push_back(parse_entry(key, v));
    }

    // Sorted by offsets, the tensors must tile [0, data size) exactly.
    std::stable_sort(entries_.begin(), entries_.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t at = 0;
    for (const auto& e : entries_) {
      if (e.begin != at || e.end < e.begin)
        fail(detail::cat("tensor '", e.name, "' has data_offsets [", e.begin, ", ", e.end, "], expected it to begin at ",
                         at, " (sorted by offset, tensors must follow each other without gaps or overlaps)"));
      const int dbits = detail::find_st_dtype(e.dtype)->bits;
      std::uint64_t numel = 1, bits = 0;
      bool overflow = false;
      for (int64_t s : e.shape) overflow |= __builtin_mul_overflow(numel, static_cast<std::uint64_t>(s), &numel);
      overflow |= __builtin_mul_overflow(numel, static_cast<std::uint64_t>(dbits), &bits);
      if (overflow) fail(detail::cat("tensor '", e.name, "': shape ", shape_str(e.shape), " of ", e.dtype, " overflows"));
      if (bits % 8 != 0 || bits / 8 != e.end - e.begin)
        fail(detail::cat("tensor '", e.name, "' (", e.dtype, " ", shape_str(e.shape), ") needs ",
                         bits % 8 ? std::string("a fractional number of") : std::to_string(bits / 8),
                         " bytes, but its data_offsets [", e.begin, ", ", e.end, "] span ", e.end - e.begin));
      at = e.end;
    }
    const std::uint64_t data_size = file_.size - 8 - n;
    if (at != data_size)
      fail(detail::cat("the tensors cover ", at, " bytes of data but the file has ", data_size,
                       " after the header (", at < data_size ? "trailing bytes" : "truncated", "; file size ",
                       file_.size, ", expected ", 8 + n + at, ")"));
    for (std::size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].name] = i;
  }

  SafetensorsEntry parse_entry(const std::string& name, const nlohmann::json& v) const {
    if (!v.is_object()) fail(detail::cat("entry '", name, "' must be an object, got ", v.type_name()));
    SafetensorsEntry e;
    e.name = name;
    auto field = [&](const char* f) -> const nlohmann::json& {
      auto it = v.find(f);
      if (it == v.end()) fail(detail::cat("entry '", name, "' has no field '", f, "'"));
      return *it;
    };
    const auto& dt = field("dtype");
    if (!dt.is_string()) fail(detail::cat("entry '", name, "': dtype must be a string, got ", dt.type_name()));
    e.dtype = dt.get<std::string>();
    if (!detail::find_st_dtype(e.dtype)) fail(detail::cat("entry '", name, "': unknown dtype '", e.dtype, "'"));
    const auto& sh = field("shape");
    if (!sh.is_array()) fail(detail::cat("entry '", name, "': shape must be an array, got ", sh.type_name()));
    for (const auto& d : sh) {
      if (!d.is_number_unsigned() || d.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))
        fail(detail::cat("entry '", name, "': shape must hold non-negative integers, got ", sh.dump()));
      e.shape.push_back(static_cast<int64_t>(d.get<std::uint64_t>()));
    }
    const auto& off = field("data_offsets");
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail(detail::cat("entry '", name, "': data_offsets must be two non-negative integers, got ", off.dump()));
    e.begin = off[0].get<std::uint64_t>();
    e.end = off[1].get<std::uint64_t>();
    return e;
  }

  Tensor materialise(const SafetensorsEntry& e, const SafetensorsOptions& opt) const {
    const std::byte* src = file_.bytes() + 8 + header_len_ + e.begin;
    const std::size_t nbytes = static_cast<std::size_t>(e.end - e.begin);
    const std::size_t n = static_cast<std::size_t>(numel_of(e.shape));
    auto native = [&](DType t) {
      if (!opt.copy && n > 0 && reinterpret_cast<std::uintptr_t>(src) % dtype_size(t) == 0)
        return detail::tensor_viewing(file_.data, src, nbytes, e.shape, t);
      Tensor out = Tensor::empty(e.shape, t);
      if (nbytes) std::memcpy(out.data_ptr(), src, nbytes);
      return out;
    };
    // Half-precision words, read unaligned-safe.
    auto halves = [&](auto convert) {
      Tensor out = Tensor::empty(e.shape, DType::f32);
      float* d = out.data<float>();
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t w;
        std::memcpy(&w, src + 2 * i, 2);
        d[i] = convert(w);
      }
      return out;
    };
    // Integers narrowed to i32, checked.
    auto ints = [&]<class T>() {
      Tensor out = Tensor::empty(e.shape, DType::i32);
      std::int32_t* d = out.data<std::int32_t>();
      for (std::size_t i = 0; i < n; ++i) {
        T w;
        std::memcpy(&w, src + sizeof(T) * i, sizeof(T));
        if constexpr (sizeof(T) >= 4) {
          const bool fits = std::is_signed_v<T> ? (static_cast<std::int64_t>(w) >= INT32_MIN &&
                                                   static_cast<std::int64_t>(w) <= INT32_MAX)
                                                : static_cast<std::uint64_t>(w) <= INT32_MAX;
          if (!fits)
            throw ValueError(detail::cat("safetensors: ", path(), ": tensor '", e.name, "' (", e.dtype,
                                         ") holds a value that does not fit in i32 at element ", i));
        }
        d[i] = static_cast<std::int32_t>(w);
      }
      return out;
    };
    const std::string& t = e.dtype;
    if (t == "F32") return native(DType::f32);
    if (t == "F64") return native(DType::f64);
    if (t == "I32") return native(DType::i32);
    if (t == "BF16") return opt.keep_bf16 ? native(DType::bf16) : halves(bf16_bits_to_f32);
    if (t == "F16") return halves(f16_bits_to_f32);
    if (t == "I64") return ints.template operator()<std::int64_t>();
    if (t == "U64") return ints.template operator()<std::uint64_t>();
    if (t == "U32") return ints.template operator()<std::uint32_t>();
    if (t == "I16") return ints.template operator()<std::int16_t>();
    if (t == "U16") return ints.template operator()<std::uint16_t>();
    if (t == "I8") return ints.template operator()<std::int8_t>();
    if (t == "U8" || t == "BOOL") return ints.template operator()<std::uint8_t>();
    throw ValueError(detail::cat("safetensors: ", path(), ": tensor '", e.name, "' has dtype ", t,
                                 ", which moa cannot load (supported: F32, F64, I32, BF16, F16; integer types "
                                 "are narrowed to I32)"));
  }

  detail::MappedFile file_;
  std::uint64_t header_len_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::size_t> index_;
  StringMap metadata_;
};

// Every tensor and the metadata of a file.
inline SafetensorsData load_safetensors(const std::filesystem::path& path, const SafetensorsOptions& options = {}) {
  SafetensorsReader reader(path);
  return {reader.load_all(options), reader.metadata()};
}

namespace detail {

struct StPlanned {
  const std::string* name;
  const Tensor* tensor;
  std::uint64_t nbytes;
};

// Validates the tensors, orders them as the reference writer does and builds the padded header.
inline std::string safetensors_header(const TensorMap& tensors, const StringMap& metadata,
                                      std::vector<StPlanned>& plan) {
  plan.clear();
  for (const auto& [name, t] : tensors) {
    MOA_CHECK(name != "__metadata__", ValueError, "save_safetensors: '__metadata__' cannot name a tensor");
    MOA_CHECK(t.defined(), ValueError, "save_safetensors: tensor '", name, "' is undefined");
    plan.push_back({&name, &t, static_cast<std::uint64_t>(t.numel()) * dtype_size(t.dtype())});
  }
  std::stable_sort(plan.begin(), plan.end(), [](const StPlanned& a, const StPlanned& b) {
    const int ra = st_write_rank(a.tensor->dtype()), rb = st_write_rank(b.tensor->dtype());
    return ra != rb ? ra < rb : *a.name < *b.name;
  });
  auto quote = [](const std::string& s) {
    try {
      return nlohmann::json(s).dump();
    } catch (const nlohmann::json::exception&) {
      throw ValueError(cat("save_safetensors: names and metadata must be valid UTF-8, got '", s, "'"));
    }
  };
  std::string h = "{";
  bool first = true;
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    bool f = true;
    for (const auto& [k, v] : metadata) {
      h += (f ? "" : ",") + quote(k) + ":" + quote(v);
      f = false;
    }
    h += "}";
    first = false;
  }
  std::uint64_t offset = 0;
  for (const auto& p : plan) {
    h += (first ? "" : ",") + quote(*p.name) + ":{\"dtype\":\"" + st_dtype_of(p.tensor->dtype()) + "\",\"shape\":[";
    for (std::size_t i = 0; i < p.tensor->shape().size(); ++i)
      h += (i ? "," : "") + std::to_string(p.tensor->shape()[i]);
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + p.nbytes) + "]}";
    offset += p.nbytes;
    first = false;
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');
  return h;
}

// Streams the file to `sink(const void*, size_t)`.
template <class Sink>
void write_safetensors(const TensorMap& tensors, const StringMap& metadata, Sink&& sink) {
  std::vector<StPlanned> plan;
  const std::string header = safetensors_header(tensors, metadata, plan);
  const std::uint64_t n = header.size();
  sink(&n, 8);
  sink(header.data(), header.size());
  fault_point("safetensors.data");
  std::vector<std::byte> buf;
  for (const auto& p : plan) {
    const Tensor& t0 = *p.tensor;
    if (p.nbytes == 0) continue;
    const Tensor t = on_device(t0) ? t0.detach().to(Device::cpu()) : t0;  // device tensors: through the host
    if (t.is_contiguous()) {
      sink(t.data_ptr(), p.nbytes);
    } else {
      buf.resize(p.nbytes);
      gather_bytes(t, buf.data());
      sink(buf.data(), p.nbytes);
    }
  }
}

}  // namespace detail

// The bytes of a safetensors file holding `tensors` (any strides; f32, f64, i32, bf16) and `metadata`.
inline std::string serialize_safetensors(const TensorMap& tensors, const StringMap& metadata = {}) {
  std::string out;
  detail::write_safetensors(tensors, metadata,
                            [&](const void* p, std::size_t n) { out.append(static_cast<const char*>(p), n); });
  return out;
}

// Writes `tensors` and `metadata` to `path` atomically: a temporary file in the same directory,
// fsynced, then renamed over `path`. On any failure `path` is left as it was.
inline void save_safetensors(const std::filesystem::path& path, const TensorMap& tensors,
                             const StringMap& metadata = {}) {
  detail::AtomicFile f(path, "save_safetensors");
  detail::write_safetensors(tensors, metadata, [&](const void* p, std::size_t n) { f.write(p, n); });
  f.commit();
}

}  // namespace moa::io
