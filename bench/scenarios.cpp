// One end-to-end run of a scenario: starts fphd and the guests, closes the
// gate (fphd stopped until every guest has freed its workload), opens the
// window (t0), sleeps until every guest has announced that all is reported,
// then reads what the kernel reclaimed, fphd's CPU, the guests' latencies
// and fphd's metrics, and checks every process's exit and integrity.
// See METHODOLOGY in fph_bench.cpp.
#include "scenarios.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <thread>
#include <utility>

#include "fph/probe/scrape.h"
#include "guest_fleet.h"
#include "measure.h"
#include "options.h"
#include "processes.h"

namespace fph::bench {

using fph::probe::http_get;
using fph::probe::metric_sum;

Scenario make_scenario(const std::string& backing, int guests) {
  Scenario s;
  s.backing = backing;
  s.guests = guests;
  s.mem = g_opt.total / static_cast<uint64_t>(guests) / kRegionAlign * kRegionAlign;
  s.alloc = s.mem / 10 * 9 / (4 * kKiB) * (4 * kKiB);
  return s;
}

int default_hold_ms() {
  if (g_opt.hold_ms > 0) return g_opt.hold_ms;
  return 1500 + static_cast<int>(1500.0 * static_cast<double>(g_opt.total) / kGiBd);
}

// One end-to-end measurement. `hold_ms` is how long the guests hold their
// allocation (the gate must close within it).
E2EResult run_e2e(const Scenario& sc, int hold_ms) {
  E2EResult r;
  TempDir dir;
  const std::string sock = dir.path + "/fphd.sock";
  const auto patience = std::chrono::duration_cast<std::chrono::milliseconds>(g_opt.patience);
  Process fphd({g_opt.fphd, "--listen", sock, "--metrics", "127.0.0.1:0", "--threads-per-node",
                std::to_string(g_opt.threads), "--log-level", "warn"},
               dir.path + "/fphd.stderr");
  auto ready = fphd.wait_event("ready", 60s);
  if (!ready) {
    r.error = "fphd did not become ready: " + fphd.stderr_tail();
    return r;
  }
  const std::string metrics_url = ready->j.value("metrics", "");
  r.nodes = std::max(1, ready->j.value("nodes", 1));

  std::vector<std::unique_ptr<Process>> guests;
  for (int i = 0; i < sc.guests; ++i) {
    std::vector<std::string> argv{g_opt.guest,
                                  "--connect", sock,
                                  "--name", "bench-g" + std::to_string(i),
                                  "--memory", size_arg(sc.mem),
                                  "--workload", "alloc-free:" + size_arg(sc.alloc) + ":" + std::to_string(hold_ms),
                                  "--reporting-delay-ms", "0",
                                  "--announce-reported",
                                  "--defer-report-events",
                                  // No periodic GET_CONFIG (METHODOLOGY 2).
                                  "--balloon-poll-ms", "0",
                                  "--epoch-poll-ms", "0",
                                  "--seed", std::to_string(i + 1),
                                  "--log-level", "warn"};
    if (sc.hugetlb()) argv.push_back("--hugetlb");
    guests.push_back(std::make_unique<Process>(argv, dir.path + "/guest" + std::to_string(i) + ".stderr"));
  }
  // Our own fds on every guest's RAM: st_blocks from the kernel, valid after
  // the guest exits. Closed at the end of the run.
  GuestFleet fleet;
  const auto t_ready0 = Clock::now();
  if (std::string err = fleet.open(guests, 120s); !err.empty()) {
    r.error = err;
    return r;
  }
  auto total_bytes = [&] { return fleet.total_bytes(); };
  // Every guest has written its 90%.
  std::vector<Clock::time_point> held_at;
  if (std::string err = fleet.wait_populated(guests, static_cast<int64_t>(sc.alloc), t_ready0, patience, 2ms,
                                             GuestFleet::Order::kAll, &held_at);
      !err.empty()) {
    r.error = err;
    return r;
  }
  r.alloc_s = std::chrono::duration<double>(Clock::now() - t_ready0).count();
  const std::string m0 = http_get(metrics_url);
  // The gate closes kGateLead before the first guest's hold ends, not as soon
  // as all have populated: fphd stopped for the whole hold (seconds) let every
  // periodic task fall due at t0 (each VM's 5 s stats request, the 1 s
  // sampler pass), and the window charged to requests what a running host
  // spreads over seconds. A guest that frees before the gate anyway makes
  // the run repeat with a longer hold (gate_missed).
  constexpr auto kGateLead = 300ms;
  const auto first_hold_end = *std::min_element(held_at.begin(), held_at.end()) + std::chrono::milliseconds(hold_ms);
  if (Clock::now() < first_hold_end - kGateLead) std::this_thread::sleep_until(first_hold_end - kGateLead);

  // The gate.
  fphd.signal(SIGSTOP);
  const auto t_stopped = Clock::now();
  for (auto& g : guests) {
    auto ev = g->wait_event("workload_freed", patience);
    if (!ev) {
      fphd.signal(SIGCONT);
      r.error = "a guest did not free its workload: " + g->stderr_tail();
      return r;
    }
    if (ev->at < t_stopped) r.gate_missed = true;
    r.freed += ev->j.value("bytes", uint64_t{0});
  }
  // Let every driver thread post and kick its first request.
  std::this_thread::sleep_for(20ms);

  SystemCpuReader syscpu;
  const ThreadCpu threads0 = ThreadCpu::read(fphd.pid());
  std::vector<ThreadCpu> guest_threads0;
  for (auto& g : guests) guest_threads0.push_back(ThreadCpu::read(g->pid()));
  const ThreadCpu bench_threads0 = ThreadCpu::read(getpid());
  const int64_t b0 = total_bytes();
  const double sys0 = syscpu.read();
  const auto t0 = Clock::now();
  fphd.signal(SIGCONT);
  // Nothing of ours runs in the window: this thread sleeps until every
  // guest says all its free memory is reported and no request is in flight
  // (the guests stay alive, idle: exiting would take CPU from the other
  // guests' discards), so the measurement takes no CPU from the two being
  // measured. (Sampling st_blocks every 1 ms, as this bench first did, cost
  // 2-3% of the machine and a wakeup per millisecond.)
  bool all_reported = true;
  for (auto& g : guests) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(t0 + patience - Clock::now());
    all_reported = g->wait_event("reported", std::max<std::chrono::milliseconds>(left, 1ms)).has_value() &&
                   all_reported;
  }
  // fphd's CPU: every thread, from t0 until every guest has said so, in
  // nanoseconds (schedstat; /proc/PID/stat counts 10 ms ticks).
  {
    const ThreadCpu threads1 = ThreadCpu::read(fphd.pid());
    const auto [dr, dw] = threads1.since(threads0, "fph-reclaim");
    const auto [orun, owait] = threads1.since(threads0, "fph-reclaim", /*invert=*/true);
    (void)owait;
    r.discard_cpu_s = dr;
    r.discard_runq_s = dw;
    r.other_cpu_s = orun;
    if (threads1.tasks.empty()) {
      r.error = "cannot read /proc/" + std::to_string(fphd.pid()) + "/task/*/schedstat";
      return r;
    }
    r.fphd_cpu_s = dr + orun;
    // Who else ran in the window: the guests (driver and agent threads) and
    // this bench (its stdout readers wake when a guest prints).
    std::map<std::string, double> guest_classes;
    for (size_t i = 0; i < guests.size(); ++i) {
      const ThreadCpu g1 = ThreadCpu::read(guests[i]->pid());
      r.guests_cpu_s += g1.since(guest_threads0[i], "").first;
      for (const auto& [c, s] : g1.by_class(guest_threads0[i])) guest_classes[c] += s;
    }
    r.bench_cpu_s = ThreadCpu::read(getpid()).since(bench_threads0, "").first;
    if (g_opt.thread_cpu) {
      // Where the CPU of the window went, per thread class (microseconds).
      std::string line = "fph-bench: thread CPU (us) " + sc.key() + ": fphd";
      for (const auto& [c, s] : threads1.by_class(threads0))
        if (s > 0) line += " " + c + "=" + std::to_string(static_cast<long>(s * 1e6));
      line += " | guests";
      for (const auto& [c, s] : guest_classes)
        if (s > 0) line += " " + c + "=" + std::to_string(static_cast<long>(s * 1e6));
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  }
  r.system_cpu_s = syscpu.read() - sys0;
  // The kernel's word on what was reclaimed: allocated blocks of the guests'
  // memfds (our own descriptors) before t0 and once every guest is done.
  const int64_t b_final = total_bytes();
  for (auto& g : guests) g->signal(SIGTERM);
  if (!all_reported) {
    r.error = "guests did not finish reporting in time";
    return r;
  }
  r.reclaimed = b0 - b_final;
  // The window ends when the last chain came back to its guest (the guest
  // logs when it was posted and how long it took to be used: CLOCK_MONOTONIC,
  // the clock of t0). A chain is used only after its discards returned.
  const int64_t t0_ns = mono_ns(t0);
  std::vector<std::pair<double, double>> used;  // (ns after t0, bytes)
  for (auto& g : guests) {
    for (const auto& l : g->lines()) {
      if (l.j.value("event", "") != "report_done" || !l.j.contains("posted_ns")) continue;
      const double at = static_cast<double>(l.j["posted_ns"].get<int64_t>()) +
                        l.j.value("latency_us", 0.0) * 1e3 - static_cast<double>(t0_ns);
      if (at > 0) used.emplace_back(at, static_cast<double>(l.j.value("bytes", uint64_t{0})));
    }
  }
  if (used.empty()) {
    r.error = "no request came back after t0";
    return r;
  }
  std::sort(used.begin(), used.end());
  r.window_s = used.back().first * 1e-9;
  {
    double total = 0;
    for (const auto& u : used) total += u.second;
    auto when = [&](double frac) {  // ns after t0 when `frac` of the bytes were back
      double acc = 0;
      for (const auto& u : used)
        if ((acc += u.second) >= frac * total) return u.first;
      return used.back().first;
    };
    const double dt = (when(0.9) - when(0.1)) * 1e-9;
    r.steady_tput = dt > 0 ? 0.8 * total / dt : 0;
    r.start_ms = when(0.01) * 1e-6;
  }
  const std::string m1 = http_get(metrics_url);
  r.issued_bytes = metric_sum(m1, "fphd_discarded_bytes_total") - metric_sum(m0, "fphd_discarded_bytes_total");
  r.issued_syscalls =
      metric_sum(m1, "fphd_discard_syscalls_total") - metric_sum(m0, "fphd_discard_syscalls_total");
  r.discard_s = metric_sum(m1, "fphd_discard_duration_seconds_sum") -
                metric_sum(m0, "fphd_discard_duration_seconds_sum");
  r.fphd_request_s = metric_sum(m1, "fphd_request_duration_seconds_sum") -
                     metric_sum(m0, "fphd_request_duration_seconds_sum");
  r.fphd_requests = metric_sum(m1, "fphd_request_duration_seconds_count") -
                    metric_sum(m0, "fphd_request_duration_seconds_count");

  // Guests: exit status, integrity, requests.
  for (size_t i = 0; i < guests.size(); ++i) {
    auto& g = *guests[i];
    const int code = g.wait(30s);
    g.wait_eof(5s);
    auto summary = g.find_event("summary");
    if (code != 0 || !summary) {
      r.error = "guest " + std::to_string(i) + " exited with " + std::to_string(code) + ": " + g.stderr_tail();
      return r;
    }
    if (summary->j.value("corrupted_bytes", uint64_t{0}) != 0) {
      r.error = "guest " + std::to_string(i) + " reports corrupted memory";
      return r;
    }
    for (const auto& l : g.lines()) {
      if (l.j.value("event", "") != "report_done") continue;
      if (!l.j.contains("posted_ns")) continue;
      const int64_t posted = l.j["posted_ns"].get<int64_t>();
      if (posted < t0_ns) {
        // Waited at the gate: only its part inside the window counts as busy.
        const double used_ns = static_cast<double>(posted) + l.j.value("latency_us", 0.0) * 1e3;
        r.guest_busy_s += std::max(0.0, used_ns - static_cast<double>(t0_ns)) * 1e-9;
        continue;
      }
      r.latencies_us.push_back(l.j.value("latency_us", 0.0));
      r.guest_busy_s += l.j.value("latency_us", 0.0) * 1e-6;
      r.reported_bytes += l.j.value("bytes", uint64_t{0});
      r.reported_blocks += l.j.value("blocks", uint64_t{0});
      r.requests++;
    }
  }
  fphd.signal(SIGTERM);
  const int fcode = fphd.wait(30s);
  if (fcode != 0) {
    r.error = "fphd exited with " + std::to_string(fcode) + ": " + fphd.stderr_tail();
    return r;
  }
  if (r.reclaimed < static_cast<int64_t>(r.freed / 10 * 9)) {
    r.error = "reclaimed " + human_bytes(static_cast<double>(r.reclaimed)) + " of " +
              human_bytes(static_cast<double>(r.freed)) + " freed (< 90%)";
    return r;
  }
  r.ok = true;
  return r;
}

}  // namespace fph::bench
