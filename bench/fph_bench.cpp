// fph-bench: end-to-end reclaim throughput, request latency and CPU cost of
// fphd against the raw limit of the kernel primitive, on the same ranges and
// the same backing, in one run.
//
// METHODOLOGY
//
// Scenarios: backing (4 KiB shmem memfd, 2 MiB hugetlbfs memfd) x guest count
// (default 1, 4, 16). Every guest count shares the same total guest memory
// (--total, default 4 GiB: 1x4G, 4x1G, 16x256M; --quick: 256 MiB), so the
// same number of bytes is reclaimed in every scenario.
//
// End to end ("e2e/<backing>/guests:N"), the real binaries as separate
// processes on a loopback Unix socket:
//   1. fphd --listen SOCK --metrics 127.0.0.1:0 --threads-per-node T
//   2. N x fph-guest --connect SOCK --memory M [--hugetlb]
//        --workload alloc-free:<90% of M>:HOLD --reporting-delay-ms 0
//        --announce-reported --defer-report-events
//        --balloon-poll-ms 0 --epoch-poll-ms 0
//                               (reporting order 9, capacity 32,
//        max-inflight 1: the Linux defaults)
//      Each guest writes 90% of its RAM, holds it, verifies it and frees it;
//      its page reporting then posts the freed max-order blocks, 32 per
//      request, one request in flight at a time. The guests' periodic
//      GET_CONFIG polls (balloon target every 500 ms, epoch every 1 s; a
//      Linux guest is told by a config interrupt instead) are off: with fphd
//      stopped at the gate for the hold, every guest's poll fell due and its
//      driver waited on it, so each window began with 16 control round trips
//      on both sides and the first requests posted only after them.
//   3. Gate: the bench opens every guest's RAM memfd itself (through
//      /proc/PID/fd) and watches st_blocks. When every guest has populated
//      its 90%, and then 300 ms before the first guest's hold ends (so fphd
//      is stopped for about half a second, not the whole hold: periodic work
//      such as each VM's 5 s stats request and the 1 s sampler pass must not
//      all fall due at t0), fphd is stopped (SIGSTOP); when every guest has emitted
//      workload_freed (its first request is posted and kicked), the bench
//      samples st_blocks and fphd's CPU and continues fphd (SIGCONT): t0.
//      So the window contains reporting and discarding only, never the
//      guests' allocation and verification, and every guest starts at once.
//      HOLD adapts to the observed allocation time; a run whose gate was
//      missed (a guest freed before fphd was stopped) is repeated.
//   4. The bench then sleeps (no sampling: it must not take CPU from what
//      it measures) until every guest has announced that all its free
//      memory is reported and its last chain came back (the guests stay
//      alive until then, as VMs do). The window ends when the last chain was used: each guest logs
//      when it posted a request and its kick-to-used latency, on the clock
//      of t0; a chain is used only after its discards returned.
//      reclaimed = st_blocks(t0) - st_blocks(when all have announced), summed
//      over the guests' memfds (the kernel's word, never a return code)
//      throughput = reclaimed / window;  CPU per GiB = fphd CPU / GiB, where
//      fphd CPU is every fphd thread's on-CPU time (schedstat, ns) from t0
//      until all guests have exited (so session teardown is included),
//      reported split into the discard pipeline's threads and the rest, with
//      the pipeline threads' run-queue wait (runnable, CPU taken by others).
//      latency = kick to used, per request, measured by the guest driver
//      (report_done.latency_us); requests posted before t0 (waiting at the
//      gate) are excluded. p50/p99 pool all requests of all repetitions.
//      The block size the guests report (bytes/blocks of report_done) and the
//      one fphd issues (fphd_discarded_bytes_total / fphd_discard_syscalls_total
//      delta: fphd coalesces adjacent ranges, up to 16 MiB on shmem and
//      256 MiB on hugetlbfs) are both reported.
// Raw limit ("raw/<backing>/guests:N"), in this process: N memfds of the same
// sizes (MFD_HUGETLB for hugetlb), mapped MAP_SHARED and populated the same way
// (every 4 KiB page of the same number of bytes written, the mapping kept like
// the guest's), then a tight loop of fallocate(PUNCH_HOLE|KEEP_SIZE) with the
// block size the guests reported (or --raw-block), blocks interleaved across
// files and taken from one atomic counter by T threads (T = fphd's discard
// threads: --threads-per-node x NUMA nodes). Wall time from release to the
// last thread; CPU = sum of the threads' CLOCK_THREAD_CPUTIME_ID.
// Wakeup floor ("floor/<backing>/guests:N", wakeup_floor.*; --no-floor skips
// it): N forked guest processes with memfds of the same backing and sizes,
// populated the same way, post the same requests (32 descriptors of the raw
// loop's block size, one request in flight per guest) through a shared slot
// and a kick eventfd to one responder process (fph-bench exec'd in a hidden
// mode) that has one thread per guest: it wakes on the kick, punches the
// ranges (fallocate, one call per descriptor) and writes the call eventfd.
// The responder maps every guest's RAM (MAP_SHARED, one page touched), as a
// vhost-user back end must to read the rings: a punch then also walks that
// mapping, as it walks fphd's (+8% of the responder's CPU, 16 hugetlb guests;
// before 2026-12-05 the floor did not map, and was that much lower).
// Wall time from the release of the guests to the last call read;
// reclaimed from st_blocks; CPU of the responder (compared with fphd's) and
// of the guests, from schedstat like fphd's; latency kick -> call per request.
// Ratios e2e/floor: throughput (target >= 0.9 for hugetlb, 4 and 16 guests)
// and back-end CPU per GiB (target <= 1.1).
// Repetitions run as triples (e2e, raw, floor, then the next), so a drifting
// machine moves both sides of a ratio. Ratios: throughput e2e/raw and CPU per
// GiB e2e/raw, the median over the pairs, judged for 4 or more guests on
// shmem (targets >= 0.95 and <= 1.05: there the kernel's punch dominates);
// on hugetlb the raw ratios are shown, and judged against the floor.
//
// Hugetlb: the bench reserves the huge pages itself (/proc/sys/vm/nr_hugepages,
// under the same flock as the unit tests), restores the previous value at the
// end, on failure and on SIGINT/SIGTERM, and skips the hugetlb scenarios with
// a clear message if it cannot reserve them.
//
// Exit status: 1 if any end-to-end run failed or reclaimed less than 90% of
// what the guests freed, or a raw or floor run failed (the ctest smoke test relies on this; it never
// asserts anything about time).
//
// Usage: fph-bench [--total=4G] [--quick] [--guests=1,4,16]
//          [--backing=shmem,hugetlb] [--threads=N] [--repetitions=3]
//          [--raw-block=SIZE] [--hold-ms=MS] [--fphd=PATH] [--guest=PATH]
//          [--keep-logs] [--no-floor] [--thread-cpu] [Google Benchmark flags, e.g. --benchmark_format=json]
//        fph-bench --scale=1,64,256,1024 (scale.h)
//        fph-bench --backoff [--backoff-seconds=60] (backoff.h)
// Environment: FPH_BENCH_FPHD, FPH_BENCH_GUEST override the binaries;
// FPH_BENCH_ARGS is prepended to the command line.
//
// Files (bench/), one concern each, all in namespace fph::bench:
//   fph_bench.cpp   this overview, main and the Google Benchmark runs
//                   (registration, counters, the raw loop's block size)
//   options.*       the command line and the environment
//   processes.*     starting fphd and fph-guest, their JSON events, temp dirs,
//                   killing them on a fatal signal
//   measure.*       what the kernel says was reclaimed (st_blocks), CPU time
//                   of the machine and of every thread (schedstat)
//   hugepages.*     reserving and restoring huge pages for hugetlb
//   scenarios.*     the scenarios and one end-to-end run (steps 1-4 above)
//   raw_limit.*     the raw limit: the fallocate loop in this process
//   wakeup_floor.*  the wakeup floor: guests and a minimal kick/call responder
//   scale.*         --scale: one fphd and 1..1024 small guests (RSS, threads,
//                   fds, idle CPU, throughput, p99), docs/bench-scale.md
//   backoff.*       --backoff: a churn and a batch guest with fphd's refault
//                   backoff off then on (guest allocation throughput, memory
//                   returned, refaults), docs/bench-backoff.md
//   guest_fleet.*   the guests' RAM memfds opened by the bench (st_blocks) and
//                   the wait until every guest has populated its workload
//   report.*        the results by scenario and the summary table
//   percentile.h    percentile and median
//   common.h        units, the clock, formatting helpers
#include <benchmark/benchmark.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "backoff.h"
#include "common.h"
#include "hugepages.h"
#include "options.h"
#include "percentile.h"
#include "processes.h"
#include "raw_limit.h"
#include "report.h"
#include "scale.h"
#include "scenarios.h"
#include "wakeup_floor.h"

namespace fph::bench {
namespace {

std::map<std::string, int> g_hold_ms;  // adaptive per scenario

uint64_t raw_block_for(const std::string& key) {
  if (g_opt.raw_block) return g_opt.raw_block;
  uint64_t bytes = 0, blocks = 0;
  for (const auto& e : g_e2e[key]) {
    bytes += e.reported_bytes;
    blocks += e.reported_blocks;
  }
  if (blocks == 0) return 2 * kMiB;  // order 9
  // Round the mean descriptor to a power of two of at least 4 KiB.
  const double mean = static_cast<double>(bytes) / static_cast<double>(blocks);
  uint64_t b = 4 * kKiB;
  while (static_cast<double>(b) * 1.5 < mean) b *= 2;
  return b;
}

bool prepare_backing(const Scenario& sc, benchmark::State& state) {
  if (!sc.hugetlb()) return true;
  uint64_t need = 0;
  for (int g : g_opt.guests)
    need = std::max(need, make_scenario("hugetlb", g).mem * static_cast<uint64_t>(g));
  if (!g_huge.tried) {
    g_huge.reserve(need);
    std::fprintf(stderr, "fph-bench: hugetlb: %s\n", g_huge.message.c_str());
  }
  if (!g_huge.ok) {
    const std::string msg = "hugetlb skipped: " + g_huge.message;
    g_skipped[sc.key()] = msg;
    state.SkipWithError(msg.c_str());
    return false;
  }
  return true;
}

void bm_e2e(benchmark::State& state, Scenario sc) {
  if (!prepare_backing(sc, state)) return;
  for (auto _ : state) {
    int hold = g_hold_ms.count(sc.key()) ? g_hold_ms[sc.key()] : default_hold_ms();
    E2EResult r;
    for (int attempt = 0; attempt < 3; ++attempt) {
      r = run_e2e(sc, hold);
      if (!r.ok || !r.gate_missed) break;
      std::fprintf(stderr, "fph-bench: %s: a guest freed before the gate closed (hold %d ms); again\n",
                   sc.key().c_str(), hold);
      hold *= 2;
    }
    if (!r.ok) {
      g_failed = true;
      std::fprintf(stderr, "fph-bench: %s FAILED: %s\n", sc.key().c_str(), r.error.c_str());
      state.SkipWithError(r.error.c_str());
      break;
    }
    // Next time: hold just long enough for the allocations seen, with margin.
    if (g_opt.hold_ms <= 0)
      g_hold_ms[sc.key()] = std::max(hold / 2, static_cast<int>(r.alloc_s * 1000 * 1.5) + 500);
    state.SetIterationTime(std::max(r.window_s, 1e-9));
    state.SetBytesProcessed(r.reclaimed);
    state.counters["reclaimed_GiB"] = static_cast<double>(r.reclaimed) / kGiBd;
    state.counters["freed_GiB"] = static_cast<double>(r.freed) / kGiBd;
    state.counters["fphd_cpu_s"] = r.fphd_cpu_s;
    state.counters["cpu_s_per_GiB"] = r.cpu_per_gib();
    state.counters["p50_us"] = percentile(r.latencies_us, 50);
    state.counters["p99_us"] = percentile(r.latencies_us, 99);
    state.counters["requests"] = static_cast<double>(r.requests);
    state.counters["reported_block_KiB"] =
        r.reported_blocks ? static_cast<double>(r.reported_bytes) / static_cast<double>(r.reported_blocks) / kKiB : 0;
    state.counters["issued_block_KiB"] = r.issued_syscalls > 0 ? r.issued_bytes / r.issued_syscalls / kKiB : 0;
    // Mean number of fphd threads inside a discard syscall during the window,
    // and the fraction of the window each guest had a request in flight.
    state.counters["discard_threads_busy"] = r.window_s > 0 ? r.discard_s / r.window_s : 0;
    state.counters["guest_inflight_frac"] =
        r.window_s > 0 ? r.guest_busy_s / (r.window_s * sc.guests) : 0;
    state.counters["machine_cpu_s"] = r.system_cpu_s;
    state.counters["steady_GiB_s"] = r.steady_tput / kGiBd;
    state.counters["first_1pct_ms"] = r.start_ms;
    state.counters["discard_cpu_s"] = r.discard_cpu_s;
    state.counters["other_cpu_s"] = r.other_cpu_s;
    state.counters["discard_runq_s"] = r.discard_runq_s;
    state.counters["guests_cpu_s"] = r.guests_cpu_s;
    state.counters["bench_cpu_s"] = r.bench_cpu_s;
    state.counters["fphd_req_ms"] = r.fphd_requests > 0 ? r.fphd_request_s / r.fphd_requests * 1e3 : 0;
    g_e2e[sc.key()].push_back(std::move(r));
  }
}

void bm_raw(benchmark::State& state, Scenario sc) {
  if (!prepare_backing(sc, state)) return;
  int nodes = 1;
  if (!g_e2e[sc.key()].empty()) nodes = g_e2e[sc.key()].front().nodes;
  const int threads = g_opt.threads * nodes;
  const uint64_t block = raw_block_for(sc.key());
  for (auto _ : state) {
    RawResult r = run_raw(sc, block, threads);
    if (!r.ok) {
      g_failed = true;
      std::fprintf(stderr, "fph-bench: raw %s FAILED: %s\n", sc.key().c_str(), r.error.c_str());
      state.SkipWithError(r.error.c_str());
      break;
    }
    state.SetIterationTime(std::max(r.wall_s, 1e-9));
    state.SetBytesProcessed(r.reclaimed);
    state.counters["reclaimed_GiB"] = static_cast<double>(r.reclaimed) / kGiBd;
    state.counters["cpu_s"] = r.cpu_s;
    state.counters["cpu_s_per_GiB"] = r.cpu_per_gib();
    state.counters["block_KiB"] = static_cast<double>(block) / kKiB;
    state.counters["threads"] = threads;
    // This pair's ratios: the end-to-end run just before this one.
    const auto& es = g_e2e[sc.key()];
    if (es.size() == g_raw[sc.key()].size() + 1) {
      state.counters["tput_ratio"] = es.back().tput() / r.tput();
      state.counters["cpu_ratio"] = es.back().cpu_per_gib() / r.cpu_per_gib();
    }
    g_raw[sc.key()].push_back(std::move(r));
  }
}

void bm_floor(benchmark::State& state, Scenario sc) {
  if (!prepare_backing(sc, state)) return;
  const uint64_t block = raw_block_for(sc.key());
  for (auto _ : state) {
    FloorResult r = run_floor(sc, block);
    if (!r.ok) {
      g_failed = true;
      std::fprintf(stderr, "fph-bench: floor %s FAILED: %s\n", sc.key().c_str(), r.error.c_str());
      state.SkipWithError(r.error.c_str());
      break;
    }
    state.SetIterationTime(std::max(r.wall_s, 1e-9));
    state.SetBytesProcessed(r.reclaimed);
    state.counters["reclaimed_GiB"] = static_cast<double>(r.reclaimed) / kGiBd;
    state.counters["responder_cpu_s"] = r.responder_cpu_s;
    state.counters["guests_cpu_s"] = r.guests_cpu_s;
    state.counters["cpu_s_per_GiB"] = r.cpu_per_gib();
    state.counters["total_cpu_s_per_GiB"] = r.total_cpu_per_gib();
    state.counters["p50_us"] = percentile(r.latencies_us, 50);
    state.counters["p99_us"] = percentile(r.latencies_us, 99);
    state.counters["requests"] = static_cast<double>(r.requests);
    state.counters["block_KiB"] = static_cast<double>(block) / kKiB;
    // This triple's ratios: the end-to-end run and the raw loop just before.
    const auto& es = g_e2e[sc.key()];
    const auto& rs = g_raw[sc.key()];
    if (es.size() == g_floor[sc.key()].size() + 1) {
      const auto& e = es.back();
      state.counters["e2e_floor_tput_ratio"] = e.tput() / r.tput();
      state.counters["e2e_floor_cpu_ratio"] = e.cpu_per_gib() / r.cpu_per_gib();
      state.counters["e2e_floor_total_cpu_ratio"] =
          (e.fphd_cpu_s + e.guests_cpu_s) / (static_cast<double>(e.reclaimed) / kGiBd) / r.total_cpu_per_gib();
      if (rs.size() == es.size()) {
        state.counters["e2e_raw_tput_ratio"] = e.tput() / rs.back().tput();
        state.counters["e2e_raw_cpu_ratio"] = e.cpu_per_gib() / rs.back().cpu_per_gib();
        state.counters["floor_raw_tput_ratio"] = r.tput() / rs.back().tput();
      }
    }
    g_floor[sc.key()].push_back(std::move(r));
  }
}

}  // namespace
}  // namespace fph::bench

int main(int argc, char** argv) {
  using namespace fph::bench;
  // The hidden mode: the wakeup floor's responder (wakeup_floor.cpp).
  if (argc >= 2 && std::string(argv[1]) == "--floor-responder") return floor_responder_main(argc, argv);
  std::vector<std::string> storage;
  auto bargv = parse_args(argc, argv, storage);
  int bargc = static_cast<int>(bargv.size()) - 1;
  for (int s : {SIGINT, SIGTERM, SIGHUP}) ::signal(s, on_fatal_signal);
  ::signal(SIGPIPE, SIG_IGN);
  for (const auto* p : {&g_opt.fphd, &g_opt.guest}) {
    if (::access(p->c_str(), X_OK) != 0) {
      std::fprintf(stderr, "fph-bench: %s is not executable (use --fphd/--guest or FPH_BENCH_FPHD/FPH_BENCH_GUEST)\n",
                   p->c_str());
      return 2;
    }
  }
  raise_nofile_limit();  // the guests and fphd inherit it (scale.h)
  if (!g_opt.scale.empty()) return run_scale_mode();
  if (g_opt.backoff) return run_backoff_mode();
  benchmark::Initialize(&bargc, bargv.data());
  if (benchmark::ReportUnrecognizedArguments(bargc, bargv.data())) return 2;
  std::fprintf(stderr, "fph-bench: fphd %s, guest %s, total %s, %d thread(s)/node, %d repetition(s)\n",
               g_opt.fphd.c_str(), g_opt.guest.c_str(), human_bytes(static_cast<double>(g_opt.total)).c_str(),
               g_opt.threads, g_opt.repetitions);
  // Each repetition is a pair, the end-to-end run and then the raw loop, so
  // both see the same machine (page allocator state, other tenants of a
  // shared host): the ratios are taken per pair, then their median.
  for (const auto& b : g_opt.backings) {
    for (int g : g_opt.guests) {
      const Scenario sc = make_scenario(b, g);
      for (int rep = 0; rep < g_opt.repetitions; ++rep) {
        benchmark::RegisterBenchmark(("e2e/" + sc.key()).c_str(), bm_e2e, sc)
            ->Iterations(1)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("raw/" + sc.key()).c_str(), bm_raw, sc)
            ->Iterations(1)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
        if (g_opt.floor)
          benchmark::RegisterBenchmark(("floor/" + sc.key()).c_str(), bm_floor, sc)
              ->Iterations(1)
              ->UseManualTime()
              ->Unit(benchmark::kMillisecond);
      }
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_huge.restore();
  print_table(g_opt.table_to_stderr ? stderr : stdout);
  if (g_failed) {
    std::fprintf(stderr, "fph-bench: FAILED (see the errors above)\n");
    return 1;
  }
  return 0;
}
