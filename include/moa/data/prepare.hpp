// moa/data/prepare.hpp: `moa data prepare`: converts the published source files of the paper's four
// domains (what a user downloads; ../shared/data/four-domain-raw/ holds copies) into the
// instruction layout of moa/data/instruct.hpp, with fixed splits, and writes
// <out>/<domain>/{train,valid,test}.jsonl. It reproduces ../shared/data/four-domain/ byte for byte.
//
// The conversion, per source (every field then stripped of leading and trailing white space, as
// Python's str.strip() does, Unicode spaces included):
//   finance       TAT-QA (tatqa_dataset_dev.json, tatqa_dataset_test_gold.json), one record per
//                 question: instruction = question; input = the paragraphs in rel_paragraphs, one a
//                 line, then, when answer_from is "table" or "table-text", "Table:\n" + the table's
//                 rows (cells stripped, joined by " | ", rows by "\n", cut to 1,200 code points);
//                 output = the answer (a list joined by ", ", numbers as Python's str() prints
//                 them) + " " + scale when there is one, preceded by "derivation = " when there is
//                 one.
//                 Financial PhraseBank (Sentences_50Agree.txt, "sentence@label" lines, UTF-8 with
//                 or without BOM, or Latin-1): instruction = kPhraseBankInstruction, input = the
//                 sentence, output = the label.
//   medicine      ChatDoctor (chatdoctor5k.json) and medAlpaca (medical_meadow_small.json), Alpaca
//                 arrays: instruction = their "input" (the patient's message or the question),
//                 output = "output"; their fixed "instruction" is dropped.
//   stackoverflow gitai (GitHubQA.jsonl, GitLabQA.jsonl, chat "messages"): instruction = the first
//                 user message (title and body), output = the first assistant message.
//                 CoNaLa (conala-train.json, conala-test.json): instruction = rewritten_intent (the
//                 intent when that is null or empty), output = snippet.
//   leetcode      LeetCodeDataset (LeetCodeDataset-v0.2.0-{train,test}.jsonl.gz): instruction =
//                 query, output = response.
// Then, per domain: records with an empty instruction or output are dropped; the id is
// example_id(domain, instruction, input); of records sharing an id the last one read is kept
// (files in the order above). Splits: records sorted by SHA-1 of their id (as bytes, i.e. by the hex
// string); the first 500 are test, the next 300 valid, the rest train, each file in that order. A
// record's split therefore depends only on its id and on the ids of the others in its domain.
//
// Needs zlib (link -lz) for the .gz files.
#pragma once

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "moa/core/error.hpp"
#include "moa/data/hash.hpp"
#include "moa/data/instruct.hpp"
#include "moa/io/file.hpp"

namespace moa::data {

inline constexpr const char* kPhraseBankInstruction =
    "What is the sentiment of this financial news sentence? Answer negative, neutral or positive.";

struct PrepareOptions {
  std::size_t valid = 300;  // records per domain in valid.jsonl
  std::size_t test = 500;   // records per domain in test.jsonl
};

// What prepare_four_domain wrote for one domain, and what it left out.
struct DomainCounts {
  std::string domain;
  std::size_t train = 0, valid = 0, test = 0;
  std::size_t read = 0;           // records converted from the raw files
  std::size_t dropped_empty = 0;  // with an empty instruction or output
  std::size_t duplicates = 0;     // replaced by a later record with the same id
};

// A raw file the conversion reads, and where it is published.
struct RawFile {
  const char* domain;
  const char* name;
  const char* upstream;
};
inline constexpr RawFile kRawFiles[] = {
    {"finance", "tatqa_dataset_dev.json", "github.com/NExTplusplus/TAT-QA, folder dataset_raw/"},
    {"finance", "tatqa_dataset_test_gold.json", "github.com/NExTplusplus/TAT-QA, folder dataset_raw/"},
    {"finance", "Sentences_50Agree.txt", "github.com/pkatwate/finBERT (Financial PhraseBank)"},
    {"medicine", "chatdoctor5k.json", "github.com/Kent0n-Li/ChatDoctor"},
    {"medicine", "medical_meadow_small.json", "github.com/kbressem/medAlpaca"},
    {"stackoverflow", "GitHubQA.jsonl", "github.com/web-slate/gitai, folder DataPreparation/StackOverflow/"},
    {"stackoverflow", "GitLabQA.jsonl", "github.com/web-slate/gitai, folder DataPreparation/StackOverflow/"},
    {"stackoverflow", "conala-train.json", "the CoNaLa corpus, neulab (conala-corpus)"},
    {"stackoverflow", "conala-test.json", "the CoNaLa corpus, neulab (conala-corpus)"},
    {"leetcode", "LeetCodeDataset-v0.2.0-train.jsonl.gz", "github.com/newfacade/LeetCodeDataset, folder data/"},
    {"leetcode", "LeetCodeDataset-v0.2.0-test.jsonl.gz", "github.com/newfacade/LeetCodeDataset, folder data/"},
};

namespace detail {

using moa::detail::cat;
namespace fs = std::filesystem;
using json = nlohmann::json;

// ---- Python's text semantics, which the published conversion was written in -------------------

// str.isspace(): the C0 separators, space, NEL, NBSP and the Unicode space separators.
inline bool py_isspace(std::uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// str.strip() on valid UTF-8.
inline std::string_view py_strip(std::string_view s) {
  std::size_t b = 0;
  while (b < s.size()) {
    const CodePoint c = utf8_decode(s, b);
    if (c.len == 0 || !py_isspace(c.cp)) break;
    b += c.len;
  }
  std::size_t e = s.size();
  while (e > b) {
    std::size_t start = e - 1;  // back up to the lead byte
    while (start > b && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    const CodePoint c = utf8_decode(s, start);
    if (c.len != e - start || !py_isspace(c.cp)) break;
    e = start;
  }
  return s.substr(b, e - b);
}

// str.splitlines(): breaks at \n, \r, \r\n, \v, \f, \x1c-\x1e, NEL, U+2028, U+2029.
inline std::vector<std::string_view> py_splitlines(std::string_view s) {
  std::vector<std::string_view> lines;
  std::size_t start = 0, i = 0;
  while (i < s.size()) {
    const CodePoint c = utf8_decode(s, i);
    const std::size_t len = c.len ? c.len : 1;
    const std::uint32_t cp = c.cp;
    const bool brk = c.len && (cp == '\n' || cp == '\r' || cp == 0x0B || cp == 0x0C || (cp >= 0x1C && cp <= 0x1E) ||
                               cp == 0x85 || cp == 0x2028 || cp == 0x2029);
    if (!brk) {
      i += len;
      continue;
    }
    lines.push_back(s.substr(start, i - start));
    i += len;
    if (cp == '\r' && i < s.size() && s[i] == '\n') ++i;
    start = i;
  }
  if (start < s.size()) lines.push_back(s.substr(start));
  return lines;
}

// s[:n] in code points.
inline std::string_view py_prefix(std::string_view s, std::size_t n) {
  std::size_t i = 0;
  for (std::size_t k = 0; k < n && i < s.size(); ++k) {
    const CodePoint c = utf8_decode(s, i);
    i += c.len ? c.len : 1;
  }
  return s.substr(0, i);
}

// repr(float) / str(float): the shortest digits that round-trip, positional notation for decimal
// exponents in [-4, 16), else d.ddde+XX; integral values end in ".0".
inline std::string py_float_str(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  const std::string_view sci(buf, static_cast<std::size_t>(r.ptr - buf));  // [-]d[.ddd]e(+|-)XX
  std::string out;
  std::size_t p = 0;
  if (sci[0] == '-') out += '-', p = 1;
  const std::size_t epos = sci.find('e');
  std::string digits;
  for (std::size_t i = p; i < epos; ++i)
    if (sci[i] != '.') digits += sci[i];
  int exp = 0;
  std::from_chars(sci.data() + epos + (sci[epos + 1] == '+' ? 2 : 1), sci.data() + sci.size(), exp);
  const int n = static_cast<int>(digits.size());
  if (exp < -4 || exp >= 16) {
    out += digits[0];
    if (n > 1) out += '.', out += digits.substr(1);
    out += exp < 0 ? "e-" : "e+";
    const int a = exp < 0 ? -exp : exp;
    if (a < 10) out += '0';
    out += std::to_string(a);
  } else if (exp < 0) {
    out += "0.";
    out.append(static_cast<std::size_t>(-exp - 1), '0');
    out += digits;
  } else if (n <= exp + 1) {
    out += digits;
    out.append(static_cast<std::size_t>(exp + 1 - n), '0');
    out += ".0";
  } else {
    out += digits.substr(0, static_cast<std::size_t>(exp + 1));
    out += '.';
    out += digits.substr(static_cast<std::size_t>(exp + 1));
  }
  return out;
}

// str(x) of a JSON scalar as Python's json.loads would give it.
inline std::string py_str(const json& j) {
  switch (j.type()) {
    case json::value_t::string: return j.get<std::string>();
    case json::value_t::number_integer: return std::to_string(j.get<std::int64_t>());
    case json::value_t::number_unsigned: return std::to_string(j.get<std::uint64_t>());
    case json::value_t::number_float: return py_float_str(j.get<double>());
    case json::value_t::boolean: return j.get<bool>() ? "True" : "False";
    case json::value_t::null: return "None";
    default: return j.dump();
  }
}

// ---- reading the raw files ---------------------------------------------------------------------

// One converted record before cleaning.
struct RawRecord {
  const char* source;
  std::string instruction, input, output;
};

inline constexpr const char* kOp = "prepare_four_domain";

inline std::string read_raw(const fs::path& path) { return moa::io::detail::read_text_file(path, kOp); }

inline json parse_json(std::string_view text, const std::string& where) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw IOError(cat(kOp, ": ", where, ": malformed JSON: ", e.what()));
  }
}

inline const json& member(const json& obj, const char* key, const std::string& where) {
  MOA_CHECK(obj.is_object(), IOError, kOp, ": ", where, ": expected a JSON object, got ", obj.type_name());
  const auto it = obj.find(key);
  MOA_CHECK(it != obj.end(), IOError, kOp, ": ", where, ": missing \"", key, "\"");
  return *it;
}
inline const json& array_member(const json& obj, const char* key, const std::string& where) {
  const json& v = member(obj, key, where);
  MOA_CHECK(v.is_array(), IOError, kOp, ": ", where, ": expected \"", key, "\" to be an array, got ", v.type_name());
  return v;
}
inline std::string str_member(const json& obj, const char* key, const std::string& where) {
  const json& v = member(obj, key, where);
  MOA_CHECK(v.is_string(), IOError, kOp, ": ", where, ": expected \"", key, "\" to be a string, got ", v.type_name());
  return v.get<std::string>();
}

// A gzip file's contents (several members are concatenated, as gzip -dc does).
inline std::string gunzip(std::string_view data, const fs::path& path) {
  MOA_CHECK(data.size() < (1ull << 32), IOError, kOp, ": ", path, " is too large for this reader (4 GiB or more)");
  std::string out;
  z_stream zs{};
  MOA_CHECK(inflateInit2(&zs, 16 + MAX_WBITS) == Z_OK, IOError, kOp, ": zlib cannot start inflating ", path);
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  zs.avail_in = static_cast<uInt>(data.size());
  std::array<char, 1 << 16> chunk;
  int rc = Z_OK;
  while (true) {
    zs.next_out = reinterpret_cast<Bytef*>(chunk.data());
    zs.avail_out = static_cast<uInt>(chunk.size());
    rc = inflate(&zs, Z_NO_FLUSH);
    out.append(chunk.data(), chunk.size() - zs.avail_out);
    if (rc == Z_STREAM_END) {
      if (zs.avail_in == 0) break;
      inflateReset(&zs);  // another gzip member follows
      continue;
    }
    if (rc != Z_OK) break;
    if (zs.avail_in == 0 && zs.avail_out != 0) {
      rc = Z_BUF_ERROR;  // input ended inside the stream
      break;
    }
  }
  const std::string why = zs.msg ? zs.msg : "the data ends early";
  inflateEnd(&zs);
  MOA_CHECK(rc == Z_STREAM_END, IOError, kOp, ": ", path, " is not a complete gzip file (zlib: ", why, ")");
  return out;
}

// Calls f(json, "file:line") for every non-blank line of a JSONL text.
template <class F>
void for_each_jsonl(std::string_view text, const fs::path& path, F&& f) {
  std::size_t line_no = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (is_blank(line)) continue;
    const std::string where = cat(path.string(), ":", line_no);
    f(parse_json(line, where), where);
  }
}

inline void read_tatqa(const fs::path& path, std::vector<RawRecord>& out) {
  const json docs = parse_json(read_raw(path), path.string());
  MOA_CHECK(docs.is_array(), IOError, kOp, ": ", path, ": expected a JSON array of TAT-QA documents, got ",
            docs.type_name());
  for (std::size_t d = 0; d < docs.size(); ++d) {
    const std::string dwhere = cat(path.string(), ": document ", d);
    const json& doc = docs[d];
    std::vector<std::pair<std::string, std::string>> paragraphs;  // (order, text)
    for (const json& p : array_member(doc, "paragraphs", dwhere))
      paragraphs.emplace_back(py_str(member(p, "order", dwhere)), str_member(p, "text", dwhere));
    std::string table;  // rows of cells, " | " between cells
    const json& rows = array_member(member(doc, "table", dwhere), "table", dwhere);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      MOA_CHECK(rows[i].is_array(), IOError, kOp, ": ", dwhere, ": expected table rows to be arrays, got ",
                rows[i].type_name());
      if (i > 0) table += '\n';
      bool first = true;
      for (const json& cell : rows[i]) {
        MOA_CHECK(cell.is_string(), IOError, kOp, ": ", dwhere, ": expected table cells to be strings, got ",
                  cell.type_name());
        if (!first) table += " | ";
        first = false;
        table += py_strip(cell.get_ref<const std::string&>());
      }
    }
    table = std::string(py_prefix(table, 1200));

    const json& questions = array_member(doc, "questions", dwhere);
    for (std::size_t qi = 0; qi < questions.size(); ++qi) {
      const json& q = questions[qi];
      const std::string where = cat(dwhere, ", question ", qi);
      RawRecord r{"TAT-QA", str_member(q, "question", where), "", ""};
      for (const json& k : array_member(q, "rel_paragraphs", where)) {
        const std::string key = py_str(k);
        auto it = std::find_if(paragraphs.rbegin(), paragraphs.rend(), [&](const auto& p) { return p.first == key; });
        MOA_CHECK(it != paragraphs.rend(), IOError, kOp, ": ", where, ": rel_paragraphs names paragraph ", key,
                  ", which the document does not have");
        if (!r.input.empty()) r.input += '\n';
        r.input += it->second;
      }
      const std::string from = str_member(q, "answer_from", where);
      if (from == "table" || from == "table-text") {
        if (!r.input.empty()) r.input += '\n';
        r.input += "Table:\n";
        r.input += table;
      }
      const json& answer = member(q, "answer", where);
      std::string ans;
      if (answer.is_array()) {
        for (std::size_t i = 0; i < answer.size(); ++i) ans += (i ? ", " : "") + py_str(answer[i]);
      } else {
        ans = py_str(answer);
      }
      const std::string scale = str_member(q, "scale", where);
      if (!scale.empty()) ans += " " + scale;
      const std::string derivation = str_member(q, "derivation", where);
      r.output = derivation.empty() ? ans : derivation + " = " + ans;
      out.push_back(std::move(r));
    }
  }
}

inline std::string latin1_to_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size() + s.size() / 8);
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x80) {
      out += ch;
    } else {
      out += static_cast<char>(0xC0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  return out;
}

inline void read_phrasebank(const fs::path& path, std::vector<RawRecord>& out) {
  std::string text = read_raw(path);
  if (std::string_view(text).substr(0, 3) == "\xEF\xBB\xBF") text.erase(0, 3);
  // finBERT's copy is UTF-8; the original release is Latin-1.
  if (utf8_invalid_at(text) != std::string_view::npos) text = latin1_to_utf8(text);
  const std::vector<std::string_view> lines = py_splitlines(text);
  for (std::size_t i = 0; i < lines.size(); ++i) {
    if (py_strip(lines[i]).empty()) continue;
    const std::size_t at = lines[i].rfind('@');
    MOA_CHECK(at != std::string_view::npos, IOError, kOp, ": ", path.string(), ":", i + 1,
              ": expected \"sentence@label\", got \"", std::string(lines[i].substr(0, 80)), "\"");
    const std::string_view label = py_strip(lines[i].substr(at + 1));
    MOA_CHECK(label == "negative" || label == "neutral" || label == "positive", IOError, kOp, ": ", path.string(), ":",
              i + 1, ": expected the label negative, neutral or positive after the last '@', got \"",
              std::string(label), "\"");
    out.push_back({"Financial PhraseBank", kPhraseBankInstruction, std::string(lines[i].substr(0, at)),
                   std::string(label)});
  }
}

// An Alpaca array whose "input" is the question and "output" the answer.
inline void read_alpaca_qa(const fs::path& path, const char* source, std::vector<RawRecord>& out) {
  const json arr = parse_json(read_raw(path), path.string());
  MOA_CHECK(arr.is_array(), IOError, kOp, ": ", path, ": expected a JSON array, got ", arr.type_name());
  for (std::size_t i = 0; i < arr.size(); ++i) {
    const std::string where = cat(path.string(), ": element ", i);
    out.push_back({source, str_member(arr[i], "input", where), "", str_member(arr[i], "output", where)});
  }
}

inline void read_gitai(const fs::path& path, std::vector<RawRecord>& out) {
  for_each_jsonl(read_raw(path), path, [&](const json& j, const std::string& where) {
    const json& messages = array_member(j, "messages", where);
    const json* user = nullptr;
    const json* assistant = nullptr;
    for (const json& m : messages) {
      const std::string role = str_member(m, "role", where);
      if (role == "user" && !user) user = &m;
      if (role == "assistant" && !assistant) assistant = &m;
    }
    MOA_CHECK(user && assistant, IOError, kOp, ": ", where, ": expected a \"user\" and an \"assistant\" message");
    out.push_back({"Stack Overflow (git/github/gitlab tags)", str_member(*user, "content", where), "",
                   str_member(*assistant, "content", where)});
  });
}

inline void read_conala(const fs::path& path, std::vector<RawRecord>& out) {
  const json arr = parse_json(read_raw(path), path.string());
  MOA_CHECK(arr.is_array(), IOError, kOp, ": ", path, ": expected a JSON array, got ", arr.type_name());
  for (std::size_t i = 0; i < arr.size(); ++i) {
    const std::string where = cat(path.string(), ": element ", i);
    const json& rewritten = member(arr[i], "rewritten_intent", where);
    std::string intent = rewritten.is_string() ? rewritten.get<std::string>() : std::string();
    if (intent.empty()) intent = str_member(arr[i], "intent", where);
    out.push_back({"CoNaLa (Stack Overflow)", std::move(intent), "", str_member(arr[i], "snippet", where)});
  }
}

inline void read_leetcode(const fs::path& path, std::vector<RawRecord>& out) {
  const std::string text = gunzip(read_raw(path), path);
  for_each_jsonl(text, path, [&](const json& j, const std::string& where) {
    out.push_back({"LeetCodeDataset", str_member(j, "query", where), "", str_member(j, "response", where)});
  });
}

// ---- cleaning, ids, splits ---------------------------------------------------------------------

struct PreparedDomain {
  DomainCounts counts;
  std::vector<Example> train, valid, test;
};

inline PreparedDomain make_domain(const std::string& domain, std::vector<RawRecord> raw, const PrepareOptions& opt) {
  PreparedDomain p;
  p.counts.domain = domain;
  p.counts.read = raw.size();
  std::vector<Example> records;
  std::unordered_map<std::string, std::size_t> index;  // id -> position in records
  for (RawRecord& r : raw) {
    Example e{"", domain, r.source, std::string(py_strip(r.instruction)), std::string(py_strip(r.input)),
              std::string(py_strip(r.output))};
    if (e.instruction.empty() || e.output.empty()) {
      ++p.counts.dropped_empty;
      continue;
    }
    e.id = example_id(domain, e.instruction, e.input);
    const auto [it, fresh] = index.emplace(e.id, records.size());
    if (fresh) {
      records.push_back(std::move(e));
    } else {
      records[it->second] = std::move(e);  // the last one read wins
      ++p.counts.duplicates;
    }
  }
  MOA_CHECK(records.size() > opt.valid + opt.test, ValueError, kOp, ": domain \"", domain, "\" has ", records.size(),
            " records, not enough for ", opt.test, " test and ", opt.valid, " valid records and a train split");

  std::vector<std::pair<Sha1::Digest, std::size_t>> order;  // (SHA-1 of the id, record)
  order.reserve(records.size());
  for (std::size_t i = 0; i < records.size(); ++i) order.emplace_back(sha1(records[i].id), i);
  std::sort(order.begin(), order.end());
  for (std::size_t k = 0; k < order.size(); ++k) {
    auto& split = k < opt.test ? p.test : k < opt.test + opt.valid ? p.valid : p.train;
    split.push_back(std::move(records[order[k].second]));
  }
  p.counts.train = p.train.size();
  p.counts.valid = p.valid.size();
  p.counts.test = p.test.size();
  return p;
}

// ---- the output directory, replaced in one step ------------------------------------------------

// Only an empty directory or an earlier output (domain folders of .jsonl files) may be replaced:
// a wrong --out must never delete someone's files.
inline void check_replaceable(const fs::path& out_dir) {
  std::error_code ec;
  MOA_CHECK(fs::is_directory(out_dir, ec), IOError, kOp, ": ", out_dir, " exists and is not a directory");
  for (const auto& entry : fs::directory_iterator(out_dir)) {
    bool ok = entry.is_directory();
    if (ok)
      for (const auto& f : fs::directory_iterator(entry.path()))
        ok = ok && f.is_regular_file() && f.path().extension() == ".jsonl";
    MOA_CHECK(ok, IOError, kOp, ": refusing to replace ", out_dir, ": it holds ", entry.path(),
              ", which is not a domain folder of .jsonl files written by an earlier prepare");
  }
}

inline void rename_or_throw(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::rename(from, to, ec);
  MOA_CHECK(!ec, IOError, kOp, ": renaming ", from, " to ", to, " failed: ", ec.message());
}

}  // namespace detail

// Converts the raw files in `raw_dir` (names as in kRawFiles) and writes
// <out_dir>/<domain>/{train,valid,test}.jsonl for finance, medicine, stackoverflow and leetcode, in
// that order. Everything is built in a temporary sibling of out_dir and then swapped in, so out_dir
// is either the old output or the complete new one; an existing out_dir must be empty or an earlier
// output. Missing raw files throw IOError naming each and where it is published.
inline std::vector<DomainCounts> prepare_four_domain(const std::filesystem::path& raw_dir,
                                                     const std::filesystem::path& out_dir_in,
                                                     const PrepareOptions& opt = {}) {
  namespace fs = std::filesystem;
  using detail::kOp;
  std::error_code ec;
  const fs::path out_dir = out_dir_in.filename().empty() ? out_dir_in.parent_path() : out_dir_in;
  MOA_CHECK(!out_dir.empty(), ValueError, kOp, ": no output directory given");

  std::string missing;
  for (const RawFile& f : kRawFiles)
    if (!fs::is_regular_file(raw_dir / f.name, ec))
      missing += detail::cat("\n  ", (raw_dir / f.name).string(), "  (", f.domain, "; from ", f.upstream, ")");
  MOA_CHECK(missing.empty(), IOError, kOp, ": missing raw files:", missing,
            "\ndownload these public files, unchanged, from the places named");
  if (fs::exists(out_dir, ec)) detail::check_replaceable(out_dir);

  std::vector<detail::PreparedDomain> domains;
  {
    std::vector<detail::RawRecord> raw;
    detail::read_tatqa(raw_dir / "tatqa_dataset_dev.json", raw);
    detail::read_tatqa(raw_dir / "tatqa_dataset_test_gold.json", raw);
    detail::read_phrasebank(raw_dir / "Sentences_50Agree.txt", raw);
    domains.push_back(detail::make_domain("finance", std::move(raw), opt));
  }
  {
    std::vector<detail::RawRecord> raw;
    detail::read_alpaca_qa(raw_dir / "chatdoctor5k.json", "ChatDoctor GenMedGPT-5k", raw);
    detail::read_alpaca_qa(raw_dir / "medical_meadow_small.json", "medAlpaca Wikidoc patient information", raw);
    domains.push_back(detail::make_domain("medicine", std::move(raw), opt));
  }
  {
    std::vector<detail::RawRecord> raw;
    detail::read_gitai(raw_dir / "GitHubQA.jsonl", raw);
    detail::read_gitai(raw_dir / "GitLabQA.jsonl", raw);
    detail::read_conala(raw_dir / "conala-train.json", raw);
    detail::read_conala(raw_dir / "conala-test.json", raw);
    domains.push_back(detail::make_domain("stackoverflow", std::move(raw), opt));
  }
  {
    std::vector<detail::RawRecord> raw;
    detail::read_leetcode(raw_dir / "LeetCodeDataset-v0.2.0-train.jsonl.gz", raw);
    detail::read_leetcode(raw_dir / "LeetCodeDataset-v0.2.0-test.jsonl.gz", raw);
    domains.push_back(detail::make_domain("leetcode", std::move(raw), opt));
  }

  if (!out_dir.parent_path().empty()) fs::create_directories(out_dir.parent_path(), ec);
  const fs::path tmp = moa::io::detail::temp_sibling(out_dir);
  fs::create_directory(tmp, ec);
  MOA_CHECK(!ec, IOError, kOp, ": cannot create the temporary directory ", tmp, ": ", ec.message());
  try {
    for (const auto& d : domains) {
      fs::create_directory(tmp / d.counts.domain, ec);
      MOA_CHECK(!ec, IOError, kOp, ": cannot create ", tmp / d.counts.domain, ": ", ec.message());
      write_jsonl(tmp / d.counts.domain / "train.jsonl", d.train);
      write_jsonl(tmp / d.counts.domain / "valid.jsonl", d.valid);
      write_jsonl(tmp / d.counts.domain / "test.jsonl", d.test);
      moa::io::detail::sync_directory(tmp / d.counts.domain);
    }
    moa::io::detail::sync_directory(tmp);
    moa::io::detail::fault_point("prepare.before_swap");
    if (!fs::exists(out_dir, ec)) {
      detail::rename_or_throw(tmp, out_dir);
    } else if (moa::io::detail::rename_exchange(tmp, out_dir)) {
      fs::remove_all(tmp, ec);  // the old output
    } else {
      const fs::path old = moa::io::detail::temp_sibling(out_dir);
      detail::rename_or_throw(out_dir, old);
      try {
        detail::rename_or_throw(tmp, out_dir);
      } catch (...) {
        fs::rename(old, out_dir, ec);  // put the old output back
        throw;
      }
      fs::remove_all(old, ec);
    }
    moa::io::detail::sync_directory(out_dir.parent_path());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }

  std::vector<DomainCounts> counts;
  for (const auto& d : domains) counts.push_back(d.counts);
  return counts;
}

}  // namespace moa::data
