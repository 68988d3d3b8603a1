// The scale mode: one fphd, N small fph-guest processes (shmem, --scale-memory
// each, default 8 MiB: 1024 of them hold 8 GiB of guest RAM at the peak),
// one reclaim round behind the end-to-end gate, then fphd's footprint and
// idle CPU. See docs/bench-scale.md for the method.
#include "scale.h"

#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "fph/probe/scrape.h"
#include "guest_fleet.h"
#include "measure.h"
#include "options.h"
#include "percentile.h"
#include "processes.h"
#include "report.h"

namespace fph::bench {

using fph::probe::http_get;

uint64_t raise_nofile_limit() {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return 0;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
    ::getrlimit(RLIMIT_NOFILE, &rl);
  }
  return rl.rlim_cur;
}

namespace {

struct Footprint {
  uint64_t rss_anon = 0, rss_shmem = 0;
  int threads = 0, fds = 0;
};

Footprint footprint(pid_t pid) {
  Footprint f;
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    std::istringstream ss(line);
    std::string key;
    uint64_t v = 0;
    ss >> key >> v;
    if (key == "RssAnon:") f.rss_anon = v * kKiB;
    else if (key == "RssShmem:") f.rss_shmem = v * kKiB;
    else if (key == "Threads:") f.threads = static_cast<int>(v);
  }
  if (DIR* d = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str())) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') f.fds++;
    closedir(d);
  }
  return f;
}

double cpu_s(pid_t pid) {
  const ThreadCpu t = ThreadCpu::read(pid);
  double s = 0;
  for (const auto& [tid, x] : t.tasks) s += x.run_s;
  return s;
}

// (upper bound, cumulative count) of fphd_request_duration_seconds, summed
// over the nodes.
std::map<double, double> request_buckets(const std::string& text) {
  std::map<double, double> out;
  std::istringstream in(text);
  const std::string name = "fphd_request_duration_seconds_bucket{";
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(name, 0) != 0) continue;
    const auto le = line.find("le=\"");
    const auto close = line.find('}');
    if (le == std::string::npos || close == std::string::npos) continue;
    const std::string bound = line.substr(le + 4, line.find('"', le + 4) - le - 4);
    const double b = bound == "+Inf" ? INFINITY : std::atof(bound.c_str());
    out[b] += std::atof(line.substr(close + 1).c_str());
  }
  return out;
}

double bucket_percentile(const std::map<double, double>& a, const std::map<double, double>& b, double p) {
  double total = 0;
  std::vector<std::pair<double, double>> d;
  for (const auto& [le, c] : b) {
    const double c0 = a.count(le) ? a.at(le) : 0;
    d.emplace_back(le, c - c0);
  }
  if (d.empty()) return std::nan("");
  total = d.back().second;
  for (const auto& [le, c] : d)
    if (c >= p / 100.0 * total) return le;
  return INFINITY;
}

}  // namespace

ScaleResult run_scale(int vms) {
  ScaleResult r;
  r.vms = vms;
  TempDir dir;
  const std::string sock = dir.path + "/fphd.sock";
  const auto patience = std::chrono::duration_cast<std::chrono::milliseconds>(g_opt.patience);
  const uint64_t mem = std::max<uint64_t>(g_opt.scale_memory / kRegionAlign * kRegionAlign, kRegionAlign);
  const uint64_t alloc = mem / 10 * 9 / (4 * kKiB) * (4 * kKiB);
  std::vector<std::string> fargv{g_opt.fphd, "--listen", sock, "--metrics", "127.0.0.1:0", "--threads-per-node",
                                 std::to_string(g_opt.threads), "--log-level", "warn"};
  if (g_opt.scale_stats_interval >= 0) {
    fargv.push_back("--stats-interval");
    fargv.push_back(std::to_string(g_opt.scale_stats_interval));
  }
  Process fphd(fargv, dir.path + "/fphd.stderr");
  auto ready = fphd.wait_event("ready", 60s);
  if (!ready) {
    r.error = "fphd did not become ready: " + fphd.stderr_tail();
    return r;
  }
  const std::string metrics_url = ready->j.value("metrics", "");
  std::this_thread::sleep_for(200ms);
  {
    const Footprint f = footprint(fphd.pid());
    r.rss_anon_base = f.rss_anon;
    r.threads_base = f.threads;
    r.fds_base = f.fds;
  }
  // The guests hold their allocation long enough for all of them to be
  // started, attached and populated (the gate must close within it):
  // starting a guest and its vhost-user setup take a few ms each here.
  // fphd is stopped (SIGSTOP) from the last populated guest until the last
  // one has freed, so this hold is also how long fphd cannot answer: a
  // guest's GET_CONFIG times out after 30 s, hence the epoch poll below.
  const int hold_ms = g_opt.hold_ms > 0 ? g_opt.hold_ms : 4000 + 20 * vms;
  const auto t_start = Clock::now();
  std::vector<std::unique_ptr<Process>> guests;
  for (int i = 0; i < vms; ++i) {
    std::vector<std::string> argv{g_opt.guest,
                                  "--connect", sock,
                                  "--name", "scale-g" + std::to_string(i),
                                  "--memory", size_arg(mem),
                                  "--workload", "alloc-free:" + size_arg(alloc) + ":" + std::to_string(hold_ms),
                                  "--reporting-delay-ms", "0",
                                  "--announce-reported",
                                  "--defer-report-events",
                                  // Linux guests read the config space only
                                  // on a config interrupt; fph-guest polls
                                  // the epoch every second and the balloon
                                  // target every 500 ms by default (1024
                                  // guests polling cost fphd 5% of a core).
                                  "--epoch-poll-ms", std::to_string(g_opt.scale_epoch_poll_ms),
                                  "--balloon-poll-ms", "0",
                                  "--seed", std::to_string(i + 1),
                                  "--log-level", "warn"};
    try {
      guests.push_back(std::make_unique<Process>(argv, dir.path + "/guest" + std::to_string(i) + ".stderr"));
    } catch (const std::exception& e) {
      r.error = "starting guest " + std::to_string(i) + ": " + e.what();
      return r;
    }
  }
  GuestFleet fleet;
  if (std::string err = fleet.open(guests, patience); !err.empty()) {
    r.error = err;
    return r;
  }
  auto total_bytes = [&] { return fleet.total_bytes(); };
  // Every guest has written its 90%.
  if (std::string err = fleet.wait_populated(guests, static_cast<int64_t>(alloc), t_start, patience, 10ms,
                                             GuestFleet::Order::kInOrder);
      !err.empty()) {
    r.error = err;
    return r;
  }
  r.setup_s = std::chrono::duration<double>(Clock::now() - t_start).count();
  const int64_t populated_ns = mono_ns(Clock::now());
  const std::string m0 = http_get(metrics_url);

  // The gate, as in the end-to-end run.
  fphd.signal(SIGSTOP);
  const auto t_stopped = Clock::now();
  for (auto& g : guests) {
    auto ev = g->wait_event("workload_freed", patience);
    if (!ev) {
      fphd.signal(SIGCONT);
      r.error = "a guest did not free its workload: " + g->stderr_tail();
      return r;
    }
    if (ev->at < t_stopped) r.gate_missed++;
    r.freed += ev->j.value("bytes", uint64_t{0});
  }
  std::this_thread::sleep_for(20ms + std::chrono::milliseconds(vms / 10));
  const double cpu0 = cpu_s(fphd.pid());
  const int64_t b0 = total_bytes();
  const auto t0 = Clock::now();
  fphd.signal(SIGCONT);
  bool all_reported = true;
  std::string not_reported;
  int n_not_reported = 0;
  for (size_t i = 0; i < guests.size(); ++i) {
    auto& g = guests[i];
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(t0 + patience - Clock::now());
    if (!g->wait_event("reported", std::max<std::chrono::milliseconds>(left, 1ms))) {
      all_reported = false;
      if (n_not_reported++ == 0)
        not_reported = "guest " + std::to_string(i) + (g->running() ? " (running)" : " (exited)") + ": " +
                       g->stderr_tail(600);
    }
  }
  r.fphd_cpu_s = cpu_s(fphd.pid()) - cpu0;
  const int64_t b1 = total_bytes();
  if (!all_reported) {
    r.error = std::to_string(n_not_reported) + " guest(s) did not announce that all is reported; first: " +
              not_reported;
    return r;
  }
  r.reclaimed = b0 - b1;
  const int64_t t0_ns = mono_ns(t0);
  double last = 0;
  std::vector<double> lat;
  for (auto& g : guests) {
    for (const auto& l : g->lines()) {
      if (l.j.value("event", "") != "report_done" || !l.j.contains("posted_ns")) continue;
      const int64_t posted = l.j["posted_ns"].get<int64_t>();
      const double at = static_cast<double>(posted) + l.j.value("latency_us", 0.0) * 1e3 - static_cast<double>(t0_ns);
      last = std::max(last, at);
      if (posted >= populated_ns) r.reported += l.j.value("bytes", uint64_t{0});  // not the boot-time pass
      if (posted >= t0_ns) {
        lat.push_back(l.j.value("latency_us", 0.0));
        r.requests++;
      }
    }
  }
  r.window_s = last * 1e-9;
  r.p50_us = percentile(lat, 50);
  r.p99_us = percentile(lat, 99);
  const std::string m1 = http_get(metrics_url);
  r.fphd_req_p99_us = bucket_percentile(request_buckets(m0), request_buckets(m1), 99) * 1e6;

  // Footprint and idle CPU: every guest attached, its memory reported, idle
  // (as VMs are between reporting passes; fphd still polls their stats).
  std::this_thread::sleep_for(1s);
  {
    const Footprint f = footprint(fphd.pid());
    r.rss_anon = f.rss_anon;
    r.rss_shmem = f.rss_shmem;
    r.threads = f.threads;
    r.fds = f.fds;
  }
  const ThreadCpu it0 = ThreadCpu::read(fphd.pid());
  const auto ti0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::seconds(g_opt.scale_idle_s));
  const ThreadCpu it1 = ThreadCpu::read(fphd.pid());
  // The first reading is 1 s after a scrape of every VM's series, whose
  // transient heap fphd returns within a sampler pass or two (heap_trim.h);
  // this one is the steady state.
  r.rss_anon_idle = footprint(fphd.pid()).rss_anon;
  r.idle_window_s = std::chrono::duration<double>(Clock::now() - ti0).count();
  r.idle_cpu_pct = it1.since(it0, "").first / r.idle_window_s * 100.0;
  // Who: the session threads ("vm:NAME") and the rest, by thread name.
  r.idle_session_pct = it1.since(it0, "vm:").first / r.idle_window_s * 100.0;
  {
    std::vector<std::pair<double, std::string>> v;
    for (const auto& [name, c] : it1.by_class(it0)) v.emplace_back(c, name);
    std::sort(v.rbegin(), v.rend());
    for (size_t k = 0; k < v.size() && k < 4; ++k) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "%s%s %.3f%%", k ? ", " : "", v[k].second.c_str(),
                    v[k].first / r.idle_window_s * 100.0);
      r.idle_top += buf;
    }
  }

  // Teardown, and every guest's verdict.
  for (auto& g : guests) g->signal(SIGTERM);
  for (size_t i = 0; i < guests.size(); ++i) {
    auto& g = *guests[i];
    const int code = g.wait(60s);
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
  }
  fphd.signal(SIGTERM);
  const int fcode = fphd.wait(60s);
  if (fcode != 0) {
    r.error = "fphd exited with " + std::to_string(fcode) + ": " + fphd.stderr_tail();
    return r;
  }
  // Small guests: only whole free max-order blocks are reported (an 8 MiB
  // guest reports 3 of its 4 2 MiB blocks), and the last reported block
  // straddles the end of the 90% the workload wrote (up to 0.8 MiB of it
  // was never populated), so the check is 80% of what the guests reported.
  if (r.reported == 0 || r.reclaimed < static_cast<int64_t>(r.reported / 10 * 8)) {
    r.error = "reclaimed " + human_bytes(static_cast<double>(r.reclaimed)) + " of " +
              human_bytes(static_cast<double>(r.reported)) + " reported (< 80%)";
    return r;
  }
  r.ok = true;
  return r;
}

int run_scale_mode() {
  const uint64_t nofile = raise_nofile_limit();
  std::fprintf(stderr, "fph-bench --scale: fphd %s, guest %s, %s per guest (shmem), %d thread(s)/node, "
               "RLIMIT_NOFILE %llu, idle window %d s, guests' epoch poll %d ms\n",
               g_opt.fphd.c_str(), g_opt.guest.c_str(), human_bytes(static_cast<double>(g_opt.scale_memory)).c_str(),
               g_opt.threads, static_cast<unsigned long long>(nofile), g_opt.scale_idle_s, g_opt.scale_epoch_poll_ms);
  std::vector<ScaleResult> rs;
  bool failed = false;
  for (int n : g_opt.scale) {
    std::fprintf(stderr, "fph-bench --scale: %d VM(s)...\n", n);
    ScaleResult r = run_scale(n);
    if (!r.ok) {
      failed = true;
      std::fprintf(stderr, "fph-bench --scale: %d VMs FAILED: %s\n", n, r.error.c_str());
    }
    rs.push_back(std::move(r));
  }
  const ScaleResult* ref = nullptr;  // the 16-VM round, if measured
  for (const auto& r : rs)
    if (r.ok && r.vms == 16) ref = &r;
  std::printf("\nfph-bench --scale: one fphd, N guests of %s (shmem), one reclaim round each; fphd's "
              "RssAnon (base = before any guest; idle = at the end of the idle window, judged), threads, fds "
              "after the round; idle CPU over %d s after it\n",
              human_bytes(static_cast<double>(g_opt.scale_memory)).c_str(), g_opt.scale_idle_s);
  std::printf("%6s | %9s %9s %9s %7s %6s | %8s | %8s %9s %8s %8s %8s %9s | %7s | %s\n", "VMs", "RssAnon", "idle", "base",
              "threads", "fds", "idle %", "GiB", "GiB/s", "vs 16", "p50 us", "p99 us", "fphd p99", "setup s",
              "targets (1024: RssAnon<64MiB, idle<0.5%, tput>=0.8x16)");
  nlohmann::json js = nlohmann::json::array();
  for (const auto& r : rs) {
    if (!r.ok) {
      std::printf("%6d | FAILED: %s\n", r.vms, r.error.c_str());
      js.push_back({{"vms", r.vms}, {"ok", false}, {"error", r.error}});
      continue;
    }
    const double vs16 = ref ? r.tput() / ref->tput() : std::nan("");
    std::string verdict;
    if (r.vms >= 1024) {
      verdict = std::string(r.rss_anon_idle < 64 * kMiB ? "rss MET" : "rss MISSED") + ", " +
                (r.idle_cpu_pct < 0.5 ? "idle MET" : "idle MISSED") + ", " +
                (ref ? (vs16 >= 0.8 ? "tput MET" : "tput MISSED") : "tput: no 16-VM run");
    }
    if (r.gate_missed) verdict += " (" + std::to_string(r.gate_missed) + " guest(s) missed the gate)";
    std::printf("%6d | %9s %9s %9s %7d %6d | %8.3f | %8.2f %9.2f %8.2f %8.0f %8.0f %9.0f | %7.1f | %s\n", r.vms,
                human_bytes(static_cast<double>(r.rss_anon)).c_str(),
                human_bytes(static_cast<double>(r.rss_anon_idle)).c_str(),
                human_bytes(static_cast<double>(r.rss_anon_base)).c_str(), r.threads, r.fds, r.idle_cpu_pct,
                static_cast<double>(r.reclaimed) / kGiBd, r.tput() / kGiBd, vs16, r.p50_us, r.p99_us,
                r.fphd_req_p99_us, r.setup_s, verdict.c_str());
    js.push_back({{"vms", r.vms},
                  {"ok", true},
                  {"rss_anon_bytes", r.rss_anon},
                  {"rss_anon_base_bytes", r.rss_anon_base},
                  {"rss_anon_idle_bytes", r.rss_anon_idle},
                  {"rss_shmem_bytes", r.rss_shmem},
                  {"threads", r.threads},
                  {"threads_base", r.threads_base},
                  {"fds", r.fds},
                  {"fds_base", r.fds_base},
                  {"idle_cpu_pct_of_one_core", r.idle_cpu_pct},
                  {"idle_window_s", r.idle_window_s},
                  {"idle_session_threads_pct", r.idle_session_pct},
                  {"idle_top_threads", r.idle_top},
                  {"freed_bytes", r.freed},
                  {"reported_bytes", r.reported},
                  {"reclaimed_bytes", r.reclaimed},
                  {"window_s", r.window_s},
                  {"throughput_GiB_s", r.tput() / kGiBd},
                  {"throughput_vs_16", ref ? nlohmann::json(vs16) : nlohmann::json(nullptr)},
                  {"fphd_cpu_s", r.fphd_cpu_s},
                  {"requests", r.requests},
                  {"p50_us", r.p50_us},
                  {"p99_us", r.p99_us},
                  {"fphd_request_p99_us_bucket", std::isfinite(r.fphd_req_p99_us) ? nlohmann::json(r.fphd_req_p99_us)
                                                                                  : nlohmann::json(nullptr)},
                  {"gate_missed", r.gate_missed},
                  {"setup_s", r.setup_s}});
  }
  std::printf("idle CPU by fphd thread (%% of one core; vm:* = all session threads together):\n");
  for (const auto& r : rs)
    if (r.ok) std::printf("%6d | %s\n", r.vms, r.idle_top.c_str());
  nlohmann::json doc = {{"scale", js},
                        {"guest_memory_bytes", g_opt.scale_memory},
                        {"threads_per_node", g_opt.threads},
                        {"idle_window_s", g_opt.scale_idle_s},
                        {"guest_epoch_poll_ms", g_opt.scale_epoch_poll_ms},
                        {"fphd_stats_interval_s", g_opt.scale_stats_interval >= 0 ? nlohmann::json(g_opt.scale_stats_interval)
                                                                                   : nlohmann::json("default")}};
  emit_json(doc, g_opt.scale_json);
  return failed ? 1 : 0;
}

}  // namespace fph::bench
