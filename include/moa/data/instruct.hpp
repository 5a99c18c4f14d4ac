// moa/data/instruct.hpp: instruction data in the Alpaca layout plus a domain label: reading JSON
// arrays and JSONL files, loading a folder of per-domain splits, the prompt template, and writing
// JSONL exactly as Python's json.dumps(record, ensure_ascii=False) writes it.
//
// One record:
//   {"id": "...", "domain": "medicine", "source": "...", "instruction": "...", "input": "...", "output": "..."}
// `instruction` and `output` are required strings; `input` may be absent or null (read as "");
// `id` and `source` are optional (a missing id becomes example_id(domain, instruction, input));
// `domain` may come from the record or be given for the whole file. Other fields are ignored.
//
// Errors: a malformed record (not JSON, a missing or mistyped field) throws IOError naming the file
// and the line (JSONL) or the element index (a JSON array) and what was expected and found; a record
// without any domain, a domain folder with no training data, or a record whose domain disagrees
// with its folder throws ValueError.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/core/error.hpp"
#include "moa/data/hash.hpp"
#include "moa/io/file.hpp"

namespace moa::data {

struct Example {
  std::string id, domain, source, instruction, input, output;
};

// The id every moa conversion gives a record: "<domain>-" + the first 12 hex digits of
// SHA-1("<domain>\0<instruction>\0<input>"). Equal prompts in one domain share an id (and the
// conversion keeps one of them); the output does not take part, so fixing an answer keeps the id.
inline std::string example_id(std::string_view domain, std::string_view instruction, std::string_view input) {
  Sha1 h;
  h.update(domain);
  h.update(std::string_view("\0", 1));
  h.update(instruction);
  h.update(std::string_view("\0", 1));
  h.update(input);
  return std::string(domain) + "-" + to_hex(h.digest()).substr(0, 12);
}

namespace detail {

using moa::detail::cat;

// The code point at s[i] and its length in bytes; length 0 when s[i] does not start a valid UTF-8
// sequence (stray continuation byte, truncated or overlong form, surrogate, above U+10FFFF).
struct CodePoint {
  std::uint32_t cp = 0;
  std::size_t len = 0;
};
inline CodePoint utf8_decode(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {b0, 1};
  std::size_t len;
  std::uint32_t cp, min;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, cp = b0 & 0x1Fu, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, cp = b0 & 0x0Fu, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, cp = b0 & 0x07u, min = 0x10000;
  } else {
    return {};
  }
  if (i + len > s.size()) return {};
  for (std::size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return {};
    cp = (cp << 6) | (b & 0x3Fu);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return {};
  return {cp, len};
}

// The byte offset of the first invalid UTF-8 sequence, or npos.
inline std::size_t utf8_invalid_at(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const CodePoint c = utf8_decode(s, i);
    if (c.len == 0) return i;
    i += c.len;
  }
  return std::string_view::npos;
}

// Appends s as a JSON string the way Python's json.dumps(..., ensure_ascii=False) does: only `"`,
// `\` and the C0 controls are escaped (\b \f \n \r \t by name, the rest as \u00xx, lower-case
// hex); everything else, DEL and non-ASCII included, is copied as UTF-8.
inline void append_json_string(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

// Where a record sits, for messages: "file.jsonl:17" or "file.json: element 3".
inline std::string record_location(const std::filesystem::path& file, bool array, std::size_t where) {
  return array ? cat(file.string(), ": element ", where) : cat(file.string(), ":", where);
}

inline bool is_blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; });
}

// A string field: `required` fields must be present; absent or null optional ones read as "".
inline std::string string_field(const nlohmann::json& j, const char* key, bool required, const std::string& loc,
                                const char* op) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    MOA_CHECK(!required, IOError, op, ": ", loc, ": missing \"", key, "\" (expected a string)");
    return {};
  }
  MOA_CHECK(it->is_string(), IOError, op, ": ", loc, ": expected \"", key, "\" to be a string, got ",
            it->type_name(), " ", it->dump().substr(0, 60));
  return it->get<std::string>();
}

// One record. `domain` non-empty: it is the record's domain (the record's own field is ignored,
// unless `must_match`, when a different one is an error: a record filed under the wrong folder).
inline Example example_from_json(const nlohmann::json& j, const std::string& domain, bool must_match,
                                 const std::string& loc, const char* op, bool prompts_only = false) {
  MOA_CHECK(j.is_object(), IOError, op, ": ", loc, ": expected a JSON object with \"instruction\" and \"output\", got ",
            j.type_name());
  Example e;
  e.instruction = string_field(j, "instruction", true, loc, op);
  e.input = string_field(j, "input", false, loc, op);
  e.output = string_field(j, "output", !prompts_only, loc, op);
  e.source = string_field(j, "source", false, loc, op);
  e.id = string_field(j, "id", false, loc, op);
  const std::string own = string_field(j, "domain", false, loc, op);
  if (!domain.empty()) {
    MOA_CHECK(!must_match || own.empty() || own == domain, ValueError, op, ": ", loc, ": the record's domain \"", own,
              "\" disagrees with its folder \"", domain, "\"");
    e.domain = domain;
  } else {
    MOA_CHECK(!own.empty() || prompts_only, ValueError, op, ": ", loc,
              ": the record has no \"domain\" and none was given for the file");
    e.domain = own;
  }
  if (e.id.empty() && !e.domain.empty()) e.id = example_id(e.domain, e.instruction, e.input);
  return e;
}

// read_examples with the folder check (load_four_domain) switchable.
inline std::vector<Example> read_examples_impl(const std::filesystem::path& file, const std::string& domain,
                                               bool must_match, const char* op, bool prompts_only = false) {
  const std::string text = moa::io::detail::read_text_file(file, op);
  std::string_view body(text);
  if (body.substr(0, 3) == "\xEF\xBB\xBF") body.remove_prefix(3);  // a UTF-8 byte-order mark
  const std::size_t first = body.find_first_not_of(" \t\r\n");
  std::vector<Example> out;
  if (first == std::string_view::npos) return out;

  if (body[first] == '[') {  // one JSON array
    nlohmann::json arr;
    try {
      arr = nlohmann::json::parse(body);
    } catch (const nlohmann::json::exception& e) {
      throw IOError(cat(op, ": ", file.string(), ": not a valid JSON array: ", e.what()));
    }
    out.reserve(arr.size());
    for (std::size_t i = 0; i < arr.size(); ++i)
      out.push_back(example_from_json(arr[i], domain, must_match, record_location(file, true, i), op, prompts_only));
    return out;
  }

  // JSONL: one object a line; blank lines are skipped, CRLF endings accepted.
  std::size_t line_no = 0;
  for (std::size_t pos = 0; pos < body.size();) {
    std::size_t end = body.find('\n', pos);
    if (end == std::string_view::npos) end = body.size();
    std::string_view line = body.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (is_blank(line)) continue;
    const std::string loc = record_location(file, false, line_no);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw IOError(cat(op, ": ", loc, ": expected one JSON object on the line, got malformed JSON (", e.what(),
                        "): ", std::string(line.substr(0, 80))));
    }
    out.push_back(example_from_json(j, domain, must_match, loc, op, prompts_only));
  }
  return out;
}

}  // namespace detail

// Reads a JSON array or a JSONL file (told apart by the first non-space character) of records in
// the Alpaca layout. `domain`, when given, is the domain of every record (it overrides the
// records' own field); otherwise each record must carry one.
inline std::vector<Example> read_examples(const std::filesystem::path& file, const std::string& domain = "") {
  return detail::read_examples_impl(file, domain, false, "read_examples");
}

// Prompts to route or answer: as read_examples, but `output` and `domain` may be absent (then
// empty; an id is made only when the domain is known).
inline std::vector<Example> read_prompts(const std::filesystem::path& file) {
  return detail::read_examples_impl(file, "", false, "read_prompts", true);
}

// Train / valid / test records per domain.
struct DomainSplits {
  std::vector<std::string> domains;
  std::map<std::string, std::vector<Example>> train, valid, test;
};

// Loads <dir>/<domain>/{train,valid,test}.jsonl for every domain: the given ones in their order, or
// else every sub-folder of `dir` (sorted by name; names starting with '.' are skipped). A domain
// must have a non-empty train.jsonl; valid.jsonl and test.jsonl may be absent (empty splits). A
// record's own "domain" must be its folder's (absent means the folder's).
inline DomainSplits load_four_domain(const std::filesystem::path& dir, const std::vector<std::string>& domains = {}) {
  namespace fs = std::filesystem;
  constexpr const char* op = "load_four_domain";
  std::error_code ec;
  MOA_CHECK(fs::is_directory(dir, ec), IOError, op, ": ", dir, " is not a directory (expected one folder per domain",
            " holding train.jsonl, valid.jsonl, test.jsonl)");
  DomainSplits s;
  s.domains = domains;
  if (s.domains.empty()) {
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      if (entry.is_directory() && !name.empty() && name[0] != '.') s.domains.push_back(name);
    }
    std::sort(s.domains.begin(), s.domains.end());
    MOA_CHECK(!s.domains.empty(), ValueError, op, ": ", dir, " has no domain folders");
  }
  for (const std::string& d : s.domains) {
    MOA_CHECK(!d.empty() && d.find('/') == std::string::npos, ValueError, op, ": bad domain name \"", d, "\"");
    const fs::path folder = dir / d;
    MOA_CHECK(fs::is_directory(folder, ec), IOError, op, ": domain \"", d, "\": no folder ", folder);
    if (!fs::exists(folder / "train.jsonl", ec)) {
      const bool has_eval = fs::exists(folder / "test.jsonl", ec) || fs::exists(folder / "valid.jsonl", ec);
      MOA_CHECK(!has_eval, ValueError, op, ": domain \"", d, "\" is in the test/valid data but not in the training ",
                "data: ", (folder / "train.jsonl").string(), " is missing");
      throw IOError(detail::cat(op, ": domain \"", d, "\": missing ", (folder / "train.jsonl").string()));
    }
    s.train[d] = detail::read_examples_impl(folder / "train.jsonl", d, true, op);
    MOA_CHECK(!s.train[d].empty(), ValueError, op, ": domain \"", d, "\" has an empty train split (",
              (folder / "train.jsonl").string(), " holds no records)");
    for (auto* split : {&s.valid, &s.test}) {
      const fs::path f = folder / (split == &s.valid ? "valid.jsonl" : "test.jsonl");
      (*split)[d] = fs::exists(f, ec) ? detail::read_examples_impl(f, d, true, op) : std::vector<Example>{};
    }
  }
  return s;
}

// The prompt the model sees, Alpaca's template (Taori et al., 2023). With an input:
//
//   Below is an instruction that describes a task, paired with an input that provides further
//   context. Write a response that appropriately completes the request.\n\n### Instruction:\n
//   {instruction}\n\n### Input:\n{input}\n\n### Response:\n
//
// (the first two lines are one line), and without one (input empty):
//
//   Below is an instruction that describes a task. Write a response that appropriately completes
//   the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n
//
// The answer (answer_text) follows the final newline directly; the loss covers only its tokens.
inline std::string prompt_text(const Example& e) {
  std::string p;
  p.reserve(200 + e.instruction.size() + e.input.size());
  if (e.input.empty()) {
    p += "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
  } else {
    p += "Below is an instruction that describes a task, paired with an input that provides further context. "
         "Write a response that appropriately completes the request.";
  }
  p += "\n\n### Instruction:\n";
  p += e.instruction;
  if (!e.input.empty()) {
    p += "\n\n### Input:\n";
    p += e.input;
  }
  p += "\n\n### Response:\n";
  return p;
}

// The text the model learns to produce: the output alone (the caller appends EOS).
inline std::string answer_text(const Example& e) { return e.output; }

// One record as a JSON line (no newline), byte for byte what Python's
// json.dumps({"id": .., "domain": .., "source": .., "instruction": .., "input": .., "output": ..},
// ensure_ascii=False) gives. Throws ValueError when a field is not valid UTF-8.
inline std::string to_json_line(const Example& e) {
  std::string line;
  line.reserve(80 + e.id.size() + e.domain.size() + e.source.size() + e.instruction.size() + e.input.size() +
               e.output.size());
  const std::pair<const char*, const std::string*> fields[] = {{"id", &e.id},
                                                               {"domain", &e.domain},
                                                               {"source", &e.source},
                                                               {"instruction", &e.instruction},
                                                               {"input", &e.input},
                                                               {"output", &e.output}};
  line += '{';
  for (const auto& [key, value] : fields) {
    const std::size_t bad = detail::utf8_invalid_at(*value);
    MOA_CHECK(bad == std::string_view::npos, ValueError, "write_jsonl: record \"", e.id, "\": \"", key,
              "\" is not valid UTF-8 (byte ", bad, ")");
    if (line.size() > 1) line += ", ";
    detail::append_json_string(line, key);
    line += ": ";
    detail::append_json_string(line, *value);
  }
  line += '}';
  return line;
}

// Writes the records as JSONL, one to_json_line per line, each ending in '\n'; atomically (a
// temporary sibling renamed over `file`), so a crash leaves the old file or the new one.
inline void write_jsonl(const std::filesystem::path& file, const std::vector<Example>& examples) {
  moa::io::detail::AtomicFile out(file, "write_jsonl");
  std::string buf;
  for (const Example& e : examples) {
    buf += to_json_line(e);
    buf += '\n';
    if (buf.size() >= (1u << 20)) {
      out.write(buf);
      buf.clear();
    }
  }
  out.write(buf);
  out.commit();
}

}  // namespace moa::data
