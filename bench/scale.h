// The scale mode (fph-bench --scale=1,64,256,1024): for each VM count N, one
// fphd and N small fph-guest processes on shmem; after every guest is
// attached, one reclaim round behind the same gate as the end-to-end run
// (fphd stopped until every guest has freed), then fphd's footprint
// (RssAnon, threads, descriptors) and its CPU while idle. See
// docs/bench-scale.md.
#pragma once

#include <cstdint>
#include <string>

namespace fph::bench {

struct ScaleResult {
  int vms = 0;
  bool ok = false;
  std::string error;
  // fphd, before any guest and after the round (VmRSS - RssFile - RssShmem
  // is RssAnon: guest memory fphd maps is RssShmem, not counted).
  uint64_t rss_anon_base = 0, rss_anon = 0, rss_shmem = 0;
  uint64_t rss_anon_idle = 0;  // at the end of the idle window (steady state)
  int threads_base = 0, threads = 0;
  int fds_base = 0, fds = 0;
  double idle_cpu_pct = 0;  // % of one core, over the idle window
  double idle_window_s = 0;
  double idle_session_pct = 0;  // of it, the session threads ("vm:NAME")
  std::string idle_top;         // the busiest thread names while idle
  // The round.
  uint64_t freed = 0;
  uint64_t reported = 0;  // bytes of the guests' reports (report_done)
  int64_t reclaimed = 0;
  double window_s = 0;
  double fphd_cpu_s = 0;
  double p50_us = 0, p99_us = 0;
  double fphd_req_p99_us = 0;  // from fphd's request histogram (bucket bound)
  uint64_t requests = 0;
  int gate_missed = 0;  // guests that freed before fphd was stopped
  double setup_s = 0;   // starting the guests until all were attached and populated
  double tput() const { return window_s > 0 ? static_cast<double>(reclaimed) / window_s : 0; }
};

// Raises this process's soft RLIMIT_NOFILE to the hard limit (the children
// inherit it); returns the new soft limit.
uint64_t raise_nofile_limit();

ScaleResult run_scale(int vms);

// The whole mode: every count of --scale, the table, the JSON. Exit status.
int run_scale_mode();

}  // namespace fph::bench
