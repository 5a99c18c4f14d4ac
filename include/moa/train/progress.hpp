// moa/train/progress.hpp: progress lines for long work: step, loss, tokens/s, time left.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace moa::train {

inline std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e7) return "?";
  const auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(s / 3600), static_cast<long long>(s / 60 % 60));
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(s));
  return buf;
}

// Wall-clock rate and ETA over a run of `total` units of work.
class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }
  // Time left, given `done` of `total` units done since construction.
  double eta(int64_t done, int64_t total) const {
    return done > 0 ? seconds() / static_cast<double>(done) * static_cast<double>(total - done) : -1.0;
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

}  // namespace moa::train
