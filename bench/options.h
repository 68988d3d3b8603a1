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
  bool thread_cpu = false;       // --thread-cpu: per-thread-class CPU of fphd and the guests per e2e run
  bool floor = true;             // the wakeup floor next to the raw loop (--no-floor)
  std::vector<int> scale;        // --scale=1,64,256,1024: the scale mode instead of the benchmark
  uint64_t scale_memory = 8 * kMiB;  // per guest in the scale mode
  int scale_epoch_poll_ms = 0;  // fph-guest --epoch-poll-ms in the scale mode (0: at connect only)
  int scale_stats_interval = -1;  // fphd --stats-interval in the scale mode (-1: fphd's default)
  int scale_idle_s = 10;         // idle CPU window of the scale mode
  std::string scale_json;        // --scale-json=PATH: also write the scale results there
  bool backoff = false;           // --backoff: the refault backoff mode instead of the benchmark
  int backoff_seconds = 60;        // --backoff-seconds: each mode's run (the churn guest's SECONDS)
  int backoff_period_s = 15;       // --backoff-period-s: the batch guest runs once per period
  int backoff_reporting_delay_ms = 100;  // --backoff-reporting-delay-ms: both guests' --reporting-delay-ms
  std::string backoff_json;        // --backoff-json=PATH: also write the backoff results there
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
