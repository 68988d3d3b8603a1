// fph-bench's options: the command line (our flags; the rest goes to Google
// Benchmark) and the FPH_BENCH_* environment, parsed into g_opt.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

#ifndef FPH_FPHD_PATH
#define FPH_FPHD_PATH "fphd"
#endif
#ifndef FPH_GUEST_PATH
#define FPH_GUEST_PATH "fph-guest"
#endif

namespace fph::bench {

struct Options {
  uint64_t total = 4 * kGiB;
  bool quick = false;
  std::vector<int> guests{1, 4, 16};
  std::vector<std::string> backings{"shmem", "hugetlb"};
  int threads = 0;  // per node; 0 = online CPUs
  int repetitions = 3;
  uint64_t raw_block = 0;  // 0 = the block size the guests reported
  int hold_ms = 0;         // 0 = adaptive
  std::string fphd = FPH_FPHD_PATH;
  std::string guest = FPH_GUEST_PATH;
  bool keep_logs = false;
  bool table_to_stderr = false;
  std::chrono::seconds patience{300};
};
extern Options g_opt;

uint64_t parse_size(const std::string& s);
std::vector<std::string> split(const std::string& s, char sep);
[[noreturn]] void usage(const std::string& err);

// Takes our own flags out of argv; the rest goes to Google Benchmark.
std::vector<char*> parse_args(int argc, char** argv, std::vector<std::string>& storage);

}  // namespace fph::bench
