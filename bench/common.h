// Units, the clock and small formatting helpers shared by the fph-bench
// files (header-only).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace fph::bench {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr uint64_t kKiB = 1024, kMiB = kKiB * 1024, kGiB = kMiB * 1024;
constexpr double kGiBd = 1024.0 * 1024.0 * 1024.0;
constexpr uint64_t kRegionAlign = 4 * kMiB;  // fph-guest rounds RAM up to 4 MiB

inline int64_t mono_ns(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

inline std::string human_bytes(double b) {
  char buf[64];
  if (b >= kGiBd) std::snprintf(buf, sizeof buf, "%.2f GiB", b / kGiBd);
  else if (b >= kMiB) std::snprintf(buf, sizeof buf, "%.1f MiB", b / kMiB);
  else std::snprintf(buf, sizeof buf, "%.0f KiB", b / kKiB);
  return buf;
}

inline std::string size_arg(uint64_t bytes) {  // for fph-guest: exact, in KiB
  return std::to_string(bytes / kKiB) + "K";
}

}  // namespace fph::bench
