// The backoff mode: one fphd, a churn guest and a batch guest, with fphd's
// refault backoff off and then on. See backoff.h and docs/bench-backoff.md.
#include "backoff.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>
#include <utility>
#include <vector>

#include "common.h"
#include "fph/probe/scrape.h"
#include "guest_fleet.h"
#include "options.h"
#include "processes.h"
#include "report.h"

namespace fph::bench {

using fph::probe::http_get;
using fph::probe::metric_sum;

namespace {

// The scenario: two 512 MiB shmem guests. The churn guest keeps up to half
// of its RAM allocated and frees and reallocates it at random all the time;
// the batch guest allocates 3/4 of its RAM, holds it 2 s and frees it, once
// per period (SIGUSR1 from the bench: --workload-on-signal).
constexpr uint64_t kGuestMemory = 512 * kMiB;
constexpr uint64_t kChurnBytes = 256 * kMiB;
constexpr uint64_t kBatchBytes = 384 * kMiB;
constexpr int kBatchHoldMs = 2000;
constexpr auto kSampleEvery = 100ms;  // st_blocks of the guests' memfds
constexpr int kScrapeEvery = 5;       // fphd's metrics: every 5th sample (500 ms)
const char* const kChurnVm = "backoff-churn";
const char* const kBatchVm = "backoff-batch";

// Whether this fphd accepts a [policy.backoff] table (an fphd without
// refault backoff refuses it as an unknown key).
bool fphd_knows_backoff(std::string* why) {
  TempDir dir;
  const std::string path = dir.path + "/check.toml";
  std::ofstream(path) << "[policy.backoff]\nenabled = false\n";
  Process p({g_opt.fphd, "--config", path, "--check-config"}, dir.path + "/check.stderr");
  const int code = p.wait(30s);
  if (code != 0) {
    *why = p.stderr_tail(400);
    while (!why->empty() && std::isspace(static_cast<unsigned char>(why->back()))) why->pop_back();
  }
  return code == 0;
}

bool has_metric(const std::string& text, const std::string& name) {
  return text.find("\n" + name + "{") != std::string::npos || text.rfind(name + "{", 0) == 0;
}

std::string config_text(bool on) {
  return std::string("# fph-bench --backoff\n[policy.backoff]\nenabled = ") + (on ? "true" : "false") + "\n";
}

}  // namespace

BackoffRun run_backoff(bool on, bool table) {
  BackoffRun r;
  r.mode = on ? "on" : "off";
  r.churn.vm = kChurnVm;
  r.batch.vm = kBatchVm;
  TempDir dir;
  const std::string sock = dir.path + "/fphd.sock";
  const auto patience = std::chrono::duration_cast<std::chrono::milliseconds>(g_opt.patience);
  const int secs = g_opt.backoff_seconds;
  const int period = std::max(1, g_opt.backoff_period_s);
  const int batch_runs = std::max(1, secs / period);

  std::vector<std::string> fargv{g_opt.fphd, "--listen", sock, "--metrics", "127.0.0.1:0", "--threads-per-node",
                                 std::to_string(g_opt.threads), "--log-level", "warn"};
  if (table) {
    r.config = config_text(on);
    const std::string path = dir.path + "/fphd.toml";
    std::ofstream(path) << r.config;
    fargv.push_back("--config");
    fargv.push_back(path);
  }
  Process fphd(fargv, dir.path + "/fphd.stderr");
  auto ready = fphd.wait_event("ready", 60s);
  if (!ready) {
    r.error = "fphd did not become ready: " + fphd.stderr_tail();
    return r;
  }
  const std::string metrics_url = ready->j.value("metrics", "");

  const std::string delay = std::to_string(g_opt.backoff_reporting_delay_ms);
  auto guest_argv = [&](const char* name, const std::string& workload, int repeat, int seed) {
    return std::vector<std::string>{g_opt.guest,
                                    "--connect", sock,
                                    "--name", name,
                                    "--memory", size_arg(kGuestMemory),
                                    "--workload", workload,
                                    "--repeat", std::to_string(repeat),
                                    "--workload-on-signal",
                                    "--reporting-delay-ms", delay,
                                    // Timing run: reallocated reported pages
                                    // are not read first (the pattern is
                                    // still verified before every free).
                                    "--no-check-reported",
                                    "--seed", std::to_string(seed),
                                    "--log-level", "warn"};
  };
  std::vector<std::unique_ptr<Process>> guests;
  guests.push_back(std::make_unique<Process>(
      guest_argv(kChurnVm, "churn:" + size_arg(kChurnBytes) + ":" + std::to_string(secs), 1, 1),
      dir.path + "/churn.stderr"));
  guests.push_back(std::make_unique<Process>(
      guest_argv(kBatchVm, "alloc-free:" + size_arg(kBatchBytes) + ":" + std::to_string(kBatchHoldMs), batch_runs, 2),
      dir.path + "/batch.stderr"));
  Process& churn = *guests[0];
  Process& batch = *guests[1];
  GuestFleet fleet;
  if (std::string err = fleet.open(guests, 60s); !err.empty()) {
    r.error = err;
    return r;
  }
  r.churn.memory = churn.find_event("ready")->j.value("memory_bytes", kGuestMemory);
  r.batch.memory = batch.find_event("ready")->j.value("memory_bytes", kGuestMemory);
  // Let the boot-time reporting pass (never-touched RAM: frees nothing) go.
  std::this_thread::sleep_for(std::chrono::milliseconds(g_opt.backoff_reporting_delay_ms) + 500ms);

  const std::string m0 = http_get(metrics_url);
  const bool gauge = has_metric(m0, "fphd_vm_backoff");
  // The sampler: st_blocks of both memfds every 100 ms, fphd's backoff gauge
  // every 500 ms, from t0 until the churn workload is done.
  std::atomic<bool> stop_sampling{false};
  double sum_churn = 0, sum_batch = 0;
  double backoff_churn_s = 0, backoff_batch_s = 0;
  int samples = 0;
  const bool share_gauge = has_metric(m0, "fphd_vm_refault_share");
  double share_sum[2] = {0, 0}, share_max[2] = {0, 0};
  int share_samples = 0;
  int last_state[2] = {0, 0};
  const auto t0 = Clock::now();
  churn.signal(SIGUSR1);
  batch.signal(SIGUSR1);
  std::thread sampler([&] {
    auto next = t0;
    auto last_scrape = t0;
    for (int k = 0; !stop_sampling.load(); ++k) {
      r.churn.returned_final = static_cast<double>(r.churn.memory) - static_cast<double>(fleet.guest_bytes(0));
      r.batch.returned_final = static_cast<double>(r.batch.memory) - static_cast<double>(fleet.guest_bytes(1));
      sum_churn += r.churn.returned_final;
      sum_batch += r.batch.returned_final;
      ++samples;
      if (gauge && k % kScrapeEvery == 0) {
        const auto now = Clock::now();
        const double dt = k == 0 ? 0.0 : std::chrono::duration<double>(now - last_scrape).count();
        last_scrape = now;
        const std::string m = http_get(metrics_url);
        // The state seen now stands for the interval since the last scrape.
        const double at = std::chrono::duration<double>(now - t0).count();
        BackoffWorkload* ws[2] = {&r.churn, &r.batch};
        double* held[2] = {&backoff_churn_s, &backoff_batch_s};
        for (int v = 0; v < 2; ++v) {
          const int state = metric_sum(m, "fphd_vm_backoff", {{"vm", ws[v]->vm}}) > 0.5 ? 1 : 0;
          if (state) *held[v] += dt;
          if (state != last_state[v]) ws[v]->backoff_changes.emplace_back(at, state);
          last_state[v] = state;
          if (share_gauge) {
            const double sh = metric_sum(m, "fphd_vm_refault_share", {{"vm", ws[v]->vm}});
            share_sum[v] += sh;
            share_max[v] = std::max(share_max[v], sh);
          }
        }
        ++share_samples;
      }
      next += kSampleEvery;
      std::this_thread::sleep_until(next);
    }
  });
  struct JoinSampler {
    std::atomic<bool>& stop;
    std::thread& t;
    ~JoinSampler() {
      stop = true;
      if (t.joinable()) t.join();
    }
  } join_sampler{stop_sampling, sampler};

  // The batch guest's next runs, one per period.
  for (int k = 1; k < batch_runs; ++k) {
    std::this_thread::sleep_until(t0 + std::chrono::seconds(k * period));
    if (!batch.running() || !churn.running()) break;
    batch.signal(SIGUSR1);
  }
  auto churn_done = churn.wait_event("workload_done", std::chrono::seconds(secs) + 60s);
  const auto t_end = Clock::now();
  stop_sampling = true;
  sampler.join();
  r.window_s = std::chrono::duration<double>(t_end - t0).count();
  r.samples = samples;
  if (!churn_done) {
    r.error = "the churn guest did not finish its workload: " + churn.stderr_tail();
    return r;
  }
  const std::string m1 = http_get(metrics_url);
  auto batch_done = batch.wait_event("workload_done", patience);
  if (!batch_done) {
    r.error = "the batch guest did not finish its workload: " + batch.stderr_tail();
    return r;
  }
  // fphd samples refaults every second: give it time to see the last ones.
  std::this_thread::sleep_for(1500ms);
  const std::string m2 = http_get(metrics_url);
  if (m1.empty() || m2.empty()) {
    r.error = "cannot read fphd's metrics at " + metrics_url;
    return r;
  }
  if (samples > 0) {
    r.churn.returned_mean = sum_churn / samples;
    r.batch.returned_mean = sum_batch / samples;
  }
  const bool holds = has_metric(m2, "fphd_vm_backoff_holds_total");
  for (BackoffWorkload* w : {&r.churn, &r.batch}) {
    const std::map<std::string, std::string> vm{{"vm", w->vm}};
    auto delta = [&](const std::string& a, const std::string& b, const std::string& name,
                     const std::map<std::string, std::string>& labels) {
      return metric_sum(b, name, labels) - metric_sum(a, name, labels);
    };
    w->reclaimed = delta(m0, m1, "fphd_reclaimed_bytes_total", vm);
    w->discarded = delta(m0, m1, "fphd_discarded_bytes_total", vm);
    w->skipped_backoff = delta(m0, m1, "fphd_skipped_bytes_total", {{"vm", w->vm}, {"reason", "backoff"}});
    w->refaulted = delta(m0, m2, "fphd_refaulted_bytes_total", vm);
    if (holds) w->backoff_holds = delta(m0, m1, "fphd_vm_backoff_holds_total", vm);
  }
  if (gauge) {
    r.churn.backoff_s = backoff_churn_s;
    r.batch.backoff_s = backoff_batch_s;
    if (share_gauge && share_samples > 0) {
      r.churn.share_mean = share_sum[0] / share_samples;
      r.churn.share_max = share_max[0];
      r.batch.share_mean = share_sum[1] / share_samples;
      r.batch.share_max = share_max[1];
    }
  }

  // Teardown and each guest's verdict and summary.
  for (auto& g : guests) g->signal(SIGTERM);
  for (size_t i = 0; i < guests.size(); ++i) {
    auto& g = *guests[i];
    BackoffWorkload& w = i == 0 ? r.churn : r.batch;
    const int code = g.wait(60s);
    g.wait_eof(5s);
    auto summary = g.find_event("summary");
    if (code != 0 || !summary) {
      r.error = w.vm + " exited with " + std::to_string(code) + ": " + g.stderr_tail();
      return r;
    }
    const auto& j = summary->j;
    if (j.value("corrupted_bytes", uint64_t{0}) != 0) {
      r.error = w.vm + " reports corrupted memory";
      return r;
    }
    if (!j.contains("workload_alloc_bytes_per_sec")) {
      r.error = w.vm + ": this fph-guest reports no workload_alloc_bytes_per_sec";
      return r;
    }
    w.alloc_bytes = j.value("workload_alloc_bytes", uint64_t{0});
    w.seconds = j.value("workload_seconds", 0.0);
    w.alloc_bps = j.value("workload_alloc_bytes_per_sec", 0.0);
    w.alloc_seconds = j.value("workload_alloc_seconds", 0.0);
    w.runs = j.value("workload_runs", uint64_t{0});
    w.ops = j.value("workload_ops", uint64_t{0});
    w.reported_bytes = j.value("reported_bytes", uint64_t{0});
  }
  fphd.signal(SIGTERM);
  const int fcode = fphd.wait(60s);
  if (fcode != 0) {
    r.error = "fphd exited with " + std::to_string(fcode) + ": " + fphd.stderr_tail();
    return r;
  }
  if (r.batch.runs != static_cast<uint64_t>(batch_runs)) {
    r.error = "the batch guest ran " + std::to_string(r.batch.runs) + " of " + std::to_string(batch_runs) + " runs";
    return r;
  }
  r.ok = true;
  return r;
}

namespace {

nlohmann::json workload_json(const BackoffWorkload& w) {
  auto opt = [](double v) { return v < 0 ? nlohmann::json(nullptr) : nlohmann::json(v); };
  return {{"vm", w.vm},
          {"memory_bytes", w.memory},
          {"workload_alloc_bytes", w.alloc_bytes},
          {"workload_seconds", w.seconds},
          {"workload_alloc_bytes_per_sec", w.alloc_bps},
          {"workload_alloc_seconds", w.alloc_seconds},
          {"alloc_only_bytes_per_sec", w.alloc_only_bps()},
          {"workload_runs", w.runs},
          {"workload_ops", w.ops},
          {"guest_reported_bytes", w.reported_bytes},
          {"returned_mean_bytes", w.returned_mean},
          {"returned_final_bytes", w.returned_final},
          {"reclaimed_bytes", w.reclaimed},
          {"discarded_bytes", w.discarded},
          {"refaulted_bytes", w.refaulted},
          {"skipped_backoff_bytes", w.skipped_backoff},
          {"backoff_seconds", opt(w.backoff_s)},
          {"backoff_holds", opt(w.backoff_holds)},
          {"backoff_changes", w.backoff_changes},
          {"refault_share_mean", opt(w.share_mean)},
          {"refault_share_max", opt(w.share_max)}};
}

double ratio(double on, double off) { return off != 0 ? on / off : std::nan(""); }

}  // namespace

int run_backoff_mode() {
  std::string why;
  const bool table = fphd_knows_backoff(&why);
  const int period = std::max(1, g_opt.backoff_period_s);
  const int batch_runs = std::max(1, g_opt.backoff_seconds / period);
  std::fprintf(stderr,
               "fph-bench --backoff: fphd %s, guest %s, %d thread(s)/node; 2 guests of %s (shmem): churn:%s:%d, "
               "alloc-free:%s:%d every %d s (%d runs); reporting delay %d ms\n",
               g_opt.fphd.c_str(), g_opt.guest.c_str(), g_opt.threads,
               human_bytes(static_cast<double>(kGuestMemory)).c_str(), size_arg(kChurnBytes).c_str(),
               g_opt.backoff_seconds, size_arg(kBatchBytes).c_str(), kBatchHoldMs, period, batch_runs,
               g_opt.backoff_reporting_delay_ms);
  if (!table)
    std::fprintf(stderr,
                 "fph-bench --backoff: this fphd refuses [policy.backoff] (%s): measuring backoff off only, "
                 "with no config file\n",
                 why.c_str());
  std::vector<BackoffRun> runs;
  bool failed = false;
  for (bool on : {false, true}) {
    if (on && !table) {
      BackoffRun r;
      r.mode = "on";
      r.skipped = true;
      r.error = "fphd has no [policy.backoff]";
      runs.push_back(std::move(r));
      continue;
    }
    std::fprintf(stderr, "fph-bench --backoff: backoff %s, %d s...\n", on ? "on" : "off", g_opt.backoff_seconds);
    BackoffRun r = run_backoff(on, table);
    if (!r.ok) {
      failed = true;
      std::fprintf(stderr, "fph-bench --backoff: backoff %s FAILED: %s\n", r.mode.c_str(), r.error.c_str());
    }
    runs.push_back(std::move(r));
  }

  auto mib = [](double b) { return b / static_cast<double>(kMiB); };
  std::printf("\nfph-bench --backoff: one fphd, a churn guest and a batch guest (512 MiB each, shmem), %d s per mode; "
              "returned = guest RAM - memfd st_blocks (every 100 ms: mean, last); fphd counters over the window\n",
              g_opt.backoff_seconds);
  std::printf("%-7s %-6s | %10s %10s %8s | %9s %9s | %10s %10s %10s %10s | %9s %6s %11s\n", "backoff", "guest",
              "alloc MiB/s", "in-alloc", "runs/ops", "ret mean", "ret last", "reclaimed", "discarded", "refaulted",
              "skip:bkoff", "backoff s", "holds", "share mn/mx");
  for (const auto& r : runs) {
    if (!r.ok) {
      std::printf("%-7s %s: %s\n", r.mode.c_str(), r.skipped ? "SKIPPED" : "FAILED", r.error.c_str());
      continue;
    }
    for (const BackoffWorkload* w : {&r.churn, &r.batch}) {
      char bs[32] = "n/a", hs[32] = "n/a", ss[32] = "n/a";
      if (w->backoff_s >= 0) std::snprintf(bs, sizeof bs, "%.1f", w->backoff_s);
      if (w->backoff_holds >= 0) std::snprintf(hs, sizeof hs, "%.0f", w->backoff_holds);
      if (w->share_mean >= 0) std::snprintf(ss, sizeof ss, "%.2f/%.2f", w->share_mean, w->share_max);
      std::printf("%-7s %-6s | %11.0f %10.0f %8llu | %9.1f %9.1f | %10.1f %10.1f %10.1f %10.1f | %9s %6s %11s\n",
                  r.mode.c_str(), w == &r.churn ? "churn" : "batch", mib(w->alloc_bps), mib(w->alloc_only_bps()),
                  static_cast<unsigned long long>(w == &r.churn ? w->ops : w->runs), mib(w->returned_mean),
                  mib(w->returned_final), mib(w->reclaimed), mib(w->discarded), mib(w->refaulted),
                  mib(w->skipped_backoff), bs, hs, ss);
    }
  }
  std::printf("(MiB; alloc MiB/s = workload_alloc_bytes / workload_seconds from fph-guest's summary, in-alloc = "
              "the same bytes over the time spent inside allocations; share = fphd_vm_refault_share every 500 ms)\n");
  for (const auto& r : runs) {
    if (!r.ok) continue;
    for (const BackoffWorkload* w : {&r.churn, &r.batch}) {
      if (w->backoff_changes.empty()) continue;
      std::string t;
      for (const auto& [at, st] : w->backoff_changes) {
        char buf[48];
        std::snprintf(buf, sizeof buf, "%s%s %.1f", t.empty() ? "" : ", ", st ? "hold" : "end", at);
        t += buf;
      }
      std::printf("backoff %s, %s: fphd_vm_backoff changes (s after t0): %s\n", r.mode.c_str(), w->vm.c_str(),
                  t.c_str());
    }
  }
  nlohmann::json ratios = nullptr;
  if (runs.size() == 2 && runs[0].ok && runs[1].ok) {
    const auto &off = runs[0], &on = runs[1];
    const double churn_tput = ratio(on.churn.alloc_bps, off.churn.alloc_bps);
    const double churn_ret = ratio(on.churn.returned_mean, off.churn.returned_mean);
    const double batch_ret = ratio(on.batch.returned_mean, off.batch.returned_mean);
    const double batch_tput = ratio(on.batch.alloc_only_bps(), off.batch.alloc_only_bps());
    std::printf("on/off: churn alloc throughput %.2f, churn memory returned (mean) %.2f, batch memory returned "
                "(mean) %.2f, batch in-alloc throughput %.2f\n",
                churn_tput, churn_ret, batch_ret, batch_tput);
    auto num = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
    ratios = {{"churn_alloc_throughput", num(churn_tput)},
              {"churn_memory_returned", num(churn_ret)},
              {"batch_memory_returned", num(batch_ret)},
              {"batch_in_alloc_throughput", num(batch_tput)}};
  } else {
    std::printf("on/off: not available (%s)\n", runs.size() == 2 && runs[1].skipped ? runs[1].error.c_str()
                                                                                     : "a run failed");
  }
  nlohmann::json js = nlohmann::json::array();
  for (const auto& r : runs) {
    nlohmann::json j = {{"backoff", r.mode}, {"ok", r.ok}};
    if (!r.ok) {
      j[r.skipped ? "skipped" : "error"] = r.error;
    } else {
      j["config"] = r.config;
      j["window_s"] = r.window_s;
      j["samples"] = r.samples;
      j["churn"] = workload_json(r.churn);
      j["batch"] = workload_json(r.batch);
    }
    js.push_back(std::move(j));
  }
  nlohmann::json doc = {{"backoff", js},
                        {"ratios_on_off", ratios},
                        {"seconds", g_opt.backoff_seconds},
                        {"batch_period_s", period},
                        {"reporting_delay_ms", g_opt.backoff_reporting_delay_ms},
                        {"threads_per_node", g_opt.threads}};
  emit_json(doc, g_opt.backoff_json);
  return failed ? 1 : 0;
}

}  // namespace fph::bench
