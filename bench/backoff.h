// The backoff mode (fph-bench --backoff): one fphd and two guests, a churn
// guest (frees and reuses the same memory within a second: what fphd
// discards it faults back in) and a batch guest (allocates a large block,
// frees it, idles, again), run once with fphd's refault backoff off and once
// with it on ([policy.backoff] enabled = false / true). Per workload: the
// guest's own allocation throughput, the memory the host got back (kernel-
// measured, the guests' memfd st_blocks every 100 ms), fphd's reclaimed,
// refaulted and backoff-skipped bytes, and how long fphd held each VM in
// backoff. See docs/bench-backoff.md.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fph::bench {

struct BackoffWorkload {
  std::string vm;           // the guest's --name (fphd's vm label)
  uint64_t memory = 0;      // guest RAM (ready.memory_bytes)
  // fph-guest's summary: workload_alloc_bytes, workload_seconds,
  // workload_alloc_bytes_per_sec, workload_alloc_seconds, runs, churn ops.
  uint64_t alloc_bytes = 0, runs = 0, ops = 0;
  double seconds = 0, alloc_bps = 0, alloc_seconds = 0;
  uint64_t reported_bytes = 0;  // summary.reported_bytes (whole run, boot pass included)
  // Memory returned: guest RAM minus its memfd's st_blocks, sampled every
  // 100 ms over the window: the mean, and the last sample.
  double returned_mean = 0, returned_final = 0;
  // fphd's counters for the VM over the window (refaulted: up to 1.5 s
  // after it, fphd samples refaults every second).
  double reclaimed = 0, discarded = 0, refaulted = 0, skipped_backoff = 0;
  double backoff_s = -1;  // seconds fphd_vm_backoff read 1 (-1: no such gauge)
  double backoff_holds = -1;  // fphd_vm_backoff_holds_total delta (-1: none)
  // When fphd_vm_backoff changed, seconds after t0 (500 ms resolution):
  // (t, 1) a hold seen starting, (t, 0) seen ending.
  std::vector<std::pair<double, int>> backoff_changes;
  // fphd_vm_refault_share (refaulted / discarded over fphd's backoff
  // window), every 500 ms: mean and maximum (-1: no such gauge).
  double share_mean = -1, share_max = -1;
  double alloc_only_bps() const { return alloc_seconds > 0 ? static_cast<double>(alloc_bytes) / alloc_seconds : 0; }
};

struct BackoffRun {
  std::string mode;  // "off" | "on"
  bool ok = false;
  bool skipped = false;
  std::string error;  // or why it was skipped
  std::string config;  // the TOML fphd was given ("" = none)
  double window_s = 0;
  int samples = 0;
  BackoffWorkload churn, batch;
};

// One round: fphd with backoff `on` (`table`: fphd knows [policy.backoff];
// false: no config file at all, which is "off" for an fphd without it).
BackoffRun run_backoff(bool on, bool table);

// The whole mode: off then on, the table, the ratios, the JSON. Exit status.
int run_backoff_mode();

}  // namespace fph::bench
