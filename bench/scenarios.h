// The scenarios and one end-to-end run of one: the real fphd and N real
// fph-guest processes, the gate that starts the window, and what is read
// when it ends (steps 1-4 of METHODOLOGY in fph_bench.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace fph::bench {

struct Scenario {
  std::string backing;  // shmem | hugetlb
  int guests = 1;
  uint64_t mem = 0;    // per guest
  uint64_t alloc = 0;  // per guest: 90%
  bool hugetlb() const { return backing == "hugetlb"; }
  std::string key() const { return backing + "/guests:" + std::to_string(guests); }
};

// The scenario of `guests` guests sharing --total on `backing`.
Scenario make_scenario(const std::string& backing, int guests);

struct E2EResult {
  bool ok = false;
  std::string error;
  uint64_t freed = 0;
  int64_t reclaimed = 0;
  double window_s = 0;
  double fphd_cpu_s = 0;
  std::vector<double> latencies_us;
  uint64_t reported_bytes = 0, reported_blocks = 0, requests = 0;
  double issued_bytes = 0, issued_syscalls = 0;
  // Diagnostics: seconds fphd spent inside discard syscalls and handling
  // requests (taken off the ring -> returned), from its histograms' _sum;
  // per-guest sum of kick-to-used time inside the window.
  double discard_s = 0, fphd_request_s = 0, fphd_requests = 0;
  double guest_busy_s = 0;
  double system_cpu_s = 0;  // whole machine, busy, in the window
  // fphd's threads (schedstat, ns): the discard pipeline's ("fph-reclaim-N"
  // and the TBB workers it started, which inherit the name) and the rest
  // (session threads, sampler, metrics server); run-queue wait of the
  // pipeline threads: time they were runnable but another task had the CPU.
  double discard_cpu_s = 0, other_cpu_s = 0, discard_runq_s = 0;
  double guests_cpu_s = 0, bench_cpu_s = 0;  // the guest processes and this bench, same span
  double steady_tput = 0;   // between 10% and 90% of the bytes back: without ramp-up and tail
  double start_ms = 0;      // t0 until 1% of the bytes were back
  int nodes = 1;
  double alloc_s = 0;
  bool gate_missed = false;
  double tput() const { return window_s > 0 ? static_cast<double>(reclaimed) / window_s : 0; }
  double cpu_per_gib() const {
    return reclaimed > 0 ? fphd_cpu_s / (static_cast<double>(reclaimed) / kGiBd) : std::nan("");
  }
};

// How long the guests hold their allocation by default: --hold-ms, or
// adaptive to --total.
int default_hold_ms();

// One end-to-end measurement. `hold_ms` is how long the guests hold their
// allocation (the gate must close within it).
E2EResult run_e2e(const Scenario& sc, int hold_ms);

}  // namespace fph::bench
