// moa/tokenizer/file_util.hpp: whole-file reading with IOError messages, and atomic writing
// (a temporary file in the same directory, then std::filesystem::rename) for the tokenizer files.
#pragma once

#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <string_view>
#include <system_error>

#include "moa/core/error.hpp"

namespace moa::detail {

inline std::string read_file_bytes(const std::filesystem::path& path, const char* op) {
  std::error_code ec;
  MOA_CHECK(std::filesystem::is_regular_file(path, ec), IOError, op, ": expected a file at ", path.string(),
            ", got ", (std::filesystem::exists(path, ec) ? "something that is not a regular file" : "nothing"));
  std::ifstream in(path, std::ios::binary);
  MOA_CHECK(in.good(), IOError, op, ": expected to open ", path.string(), " for reading, got an error");
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MOA_CHECK(!in.bad(), IOError, op, ": expected to read ", path.string(), ", got a read error");
  return data;
}

// Writes `data` to `path` so that readers see either the old file or the whole new one.
inline void write_file_atomic(const std::filesystem::path& path, std::string_view data, const char* op) {
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  std::random_device rd;
  const std::filesystem::path tmp = dir / ("." + path.filename().string() + ".tmp" + std::to_string(rd()));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    MOA_CHECK(out.good(), IOError, op, ": expected to create ", tmp.string(), ", got an error (does ", dir.string(),
              " exist and is it writable?)");
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    out.flush();
    if (!out.good()) {
      out.close();
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw IOError(cat(op, ": expected to write ", data.size(), " bytes to ", tmp.string(), ", got a write error"));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ec2;
    std::filesystem::remove(tmp, ec2);
    throw IOError(cat(op, ": expected to rename ", tmp.string(), " to ", path.string(), ", got ", ec.message()));
  }
}

}  // namespace moa::detail
