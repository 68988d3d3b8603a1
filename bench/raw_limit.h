// The raw limit ("raw/<backing>/guests:N"): the same discards as the
// end-to-end run, from a tight fallocate(PUNCH_HOLE|KEEP_SIZE) loop in this
// process, on memfds of the same sizes populated the same way. See
// METHODOLOGY in fph_bench.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "common.h"
#include "scenarios.h"

namespace fph::bench {

struct RawResult {
  bool ok = false;
  std::string error;
  uint64_t block = 0;
  int threads = 0;
  int64_t reclaimed = 0;
  double wall_s = 0;
  double cpu_s = 0;
  double tput() const { return wall_s > 0 ? static_cast<double>(reclaimed) / wall_s : 0; }
  double cpu_per_gib() const {
    return reclaimed > 0 ? cpu_s / (static_cast<double>(reclaimed) / kGiBd) : std::nan("");
  }
};

// The raw limit: the same discards from a tight loop in this process.
RawResult run_raw(const Scenario& sc, uint64_t block, int threads);

}  // namespace fph::bench
