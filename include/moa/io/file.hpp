// moa/io/file.hpp: the file plumbing the loaders and savers share (POSIX): read-only memory maps
// whose lifetime a shared_ptr owns, atomic writes (a temporary file in the same directory, fsync,
// rename over the target), and a fault hook so tests can make a save fail half-way.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>

#include "moa/core/error.hpp"

namespace moa::io {

namespace detail {

// Atomically exchanges two paths (Linux renameat2 with RENAME_EXCHANGE); false where the kernel or
// the filesystem cannot (callers fall back to two renames).
inline bool rename_exchange(const std::filesystem::path& a, const std::filesystem::path& b) {
#if defined(SYS_renameat2)
  constexpr unsigned kRenameExchange = 1u << 1;  // RENAME_EXCHANGE
  return ::syscall(SYS_renameat2, AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), kRenameExchange) == 0;
#else
  (void)a;
  (void)b;
  return false;
#endif
}

using moa::detail::cat;

inline std::string errno_str(int err) { return std::generic_category().message(err); }

// Called by every saver at named points ("safetensors.data", "checkpoint.before_swap", ...).
// Tests install a function that throws to simulate a crash or a full disk there; empty otherwise.
inline std::function<void(std::string_view)>& fault_hook() {
  static std::function<void(std::string_view)> hook;
  return hook;
}
inline void fault_point(std::string_view where) {
  if (auto& h = fault_hook()) h(where);
}

// A whole file mapped copy-on-write (MAP_PRIVATE, read + write): tensors may view it and even be
// written in place without ever changing the file. The mapping lives as long as `data` (and every
// tensor made from it) does. An empty file has no mapping (data null).
struct MappedFile {
  std::shared_ptr<std::byte> data;
  std::size_t size = 0;
  std::filesystem::path path;

  static MappedFile open(const std::filesystem::path& path, const char* op) {
    MappedFile f;
    f.path = path;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    MOA_CHECK(fd >= 0, IOError, op, ": cannot open ", path, ": ", errno_str(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw IOError(cat(op, ": cannot stat ", path, ": ", errno_str(err)));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw IOError(cat(op, ": expected a regular file, got ", path, " (a directory or device)"));
    }
    f.size = static_cast<std::size_t>(st.st_size);
    if (f.size > 0) {
      void* p = ::mmap(nullptr, f.size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
      const int err = errno;
      ::close(fd);
      MOA_CHECK(p != MAP_FAILED, IOError, op, ": cannot map ", path, " (", f.size, " bytes): ", errno_str(err));
      const std::size_t n = f.size;
      f.data = std::shared_ptr<std::byte>(static_cast<std::byte*>(p), [n](std::byte* q) { ::munmap(q, n); });
    } else {
      ::close(fd);
    }
    return f;
  }
  const std::byte* bytes() const { return data.get(); }
};

inline std::uint64_t unique_counter() {
  static std::atomic<std::uint64_t> n{0};
  return n.fetch_add(1);
}

// A name in `target`'s directory for a temporary sibling: ".<name>.tmp.<pid>.<n>".
inline std::filesystem::path temp_sibling(const std::filesystem::path& target) {
  const std::filesystem::path name = target.filename();
  return target.parent_path() /
         ("." + name.string() + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(unique_counter()));
}

// fsync a directory so a rename in it survives a power cut; best effort (some filesystems refuse).
inline void sync_directory(const std::filesystem::path& dir) {
  const std::filesystem::path d = dir.empty() ? std::filesystem::path(".") : dir;
  const int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

// Writes `target` atomically: the bytes go to a temporary sibling, which commit() fsyncs and renames
// over the target. Until commit() the target is untouched; if the writer is destroyed without
// commit() (an exception), the temporary is removed.
class AtomicFile {
 public:
  AtomicFile(std::filesystem::path target, const char* op) : target_(std::move(target)), op_(op) {
    tmp_ = temp_sibling(target_);
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    MOA_CHECK(fd_ >= 0, IOError, op_, ": cannot write ", target_, ": creating the temporary file ", tmp_,
              " failed: ", errno_str(errno));
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }

  void write(const void* data, std::size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ::ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      MOA_CHECK(w > 0, IOError, op_, ": writing ", target_, " failed after ", written_, " bytes: ",
                errno_str(w < 0 ? errno : ENOSPC));
      p += w;
      n -= static_cast<std::size_t>(w);
      written_ += static_cast<std::size_t>(w);
    }
  }
  void write(std::string_view s) { write(s.data(), s.size()); }
  std::size_t written() const { return written_; }

  void commit() {
    MOA_CHECK(::fsync(fd_) == 0, IOError, op_, ": flushing ", target_, " failed: ", errno_str(errno));
    const int rc = ::close(fd_);
    fd_ = -1;
    MOA_CHECK(rc == 0, IOError, op_, ": closing ", target_, " failed: ", errno_str(errno));
    MOA_CHECK(::rename(tmp_.c_str(), target_.c_str()) == 0, IOError, op_, ": renaming ", tmp_, " to ", target_,
              " failed: ", errno_str(errno));
    committed_ = true;
    sync_directory(target_.parent_path());
  }

 private:
  std::filesystem::path target_, tmp_;
  const char* op_;
  int fd_ = -1;
  std::size_t written_ = 0;
  bool committed_ = false;
};

// Writes a whole small file (JSON) atomically.
inline void write_file_atomic(const std::filesystem::path& target, std::string_view contents, const char* op) {
  AtomicFile f(target, op);
  f.write(contents);
  f.commit();
}

// Reads a whole small file (JSON) into a string.
inline std::string read_text_file(const std::filesystem::path& path, const char* op) {
  const MappedFile f = MappedFile::open(path, op);
  return f.size ? std::string(reinterpret_cast<const char*>(f.bytes()), f.size) : std::string();
}

}  // namespace detail
}  // namespace moa::io
