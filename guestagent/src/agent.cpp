#include "fph/guest/agent.h"

#include <pthread.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <iterator>
#include <thread>
#include <type_traits>

#include "fph/common/log.h"
#include "fph/guest/balloon_driver.h"
#include "fph/guest/frontend.h"
#include "fph/guest/guest_memory.h"
#include "fph/guest/migration.h"

namespace fph::guest {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

void EventSink::emit(const json& j, bool deferrable) { emit_line(j.dump(), deferrable); }

void EventSink::emit_line(std::string line, bool deferrable) {
  line += '\n';
  std::lock_guard lk(mu_);
  held_ += line;
  if (!(defer_ && deferrable)) write_held_locked();
}

void EventSink::flush() {
  std::lock_guard lk(mu_);
  write_held_locked();
}

void EventSink::write_held_locked() {
  if (held_.empty()) return;
  std::fwrite(held_.data(), 1, held_.size(), out_);
  std::fflush(out_);
  held_.clear();
}

Expected<void, std::string> validate(Config& c) {
  auto bad = [](std::string s) { return Unexpected<std::string>{std::move(s)}; };
  const int transports =
      !c.connect_path.empty() + !c.listen_path.empty() + (c.local_reclaim ? 1 : 0);
  if (transports != 1)
    return bad("exactly one of --connect PATH, --listen PATH or --local-reclaim METHOD is required");
  if (c.require_discard && !c.check_reported)
    return bad("--require-discard needs the reported-page check (no --no-check-reported)");
  if (c.local_reclaim) {
    if (c.hugetlb) return bad("--local-reclaim uses private anonymous memory: no --hugetlb");
    if (c.mmap_offset) return bad("--local-reclaim takes no --mmap-offset");
    if (c.poison)
      return bad("--local-reclaim discards with madvise, after which pages read zero: no --poison");
    if (c.reconnect || c.mem_table)
      return bad("--reconnect and --mem-table need a vhost-user connection");
  }
  if (!c.migrate_to.empty()) {
    if (c.local_reclaim) return bad("--migrate-to needs a vhost-user connection");
    if (c.migrate_to == c.connect_path) return bad("--migrate-to must name another back end");
  } else if (c.migrate_ignore_device_log || c.migrate_after.count() || c.migrate_min_precopy.count()) {
    return bad("--migrate-* options need --migrate-to PATH");
  }
  if (c.name.empty()) c.name = fmt::format("fph-guest-{}", ::getpid());
  if (c.reporting_order < 0 || c.reporting_order > kMaxOrder)
    return bad(fmt::format("--reporting-order must be 0..{}", kMaxOrder));
  if (c.capacity < 1 || c.capacity > 1024) return bad("--capacity must be 1..1024");
  if (c.max_inflight < 1) return bad("--max-inflight must be >= 1");
  if (c.capacity * static_cast<size_t>(c.max_inflight) > 1024)
    return bad("--capacity * --max-inflight must be <= 1024 (reporting ring size)");
  if (c.reporting_delay.count() < 0) return bad("--reporting-delay-ms must be >= 0");
  if (c.epoch_poll.count() < 0) return bad("--epoch-poll-ms must be >= 0");
  if (c.balloon_poll.count() < 0) return bad("--balloon-poll-ms must be >= 0");
  if (c.repeat < 1) return bad("--repeat must be >= 1");
  if (c.regions < 1 || c.regions > 64) return bad("--regions must be 1..64");
  if (c.mem_table && c.regions > 8) return bad("--mem-table carries at most 8 regions");
  if (c.memory < (8ull << 20)) return bad("--memory must be at least 8M");
  if (c.resident >= c.memory) return bad("--resident must be smaller than --memory");
  if (c.duration && c.duration->count() <= 0) return bad("--duration must be > 0");
  if (c.numa_node && *c.numa_node < 0) return bad("--numa-node must be >= 0");
  return {};
}

namespace {

// Bytes of the resident set that differ from their pattern.
uint64_t verify_resident(const MemoryChecker& checker, const std::vector<Held>& resident) {
  uint64_t bad = 0;
  for (const auto& h : resident) bad += checker.verify(h.frame, h.order, h.gen);
  return bad;
}

}  // namespace

namespace {

// What the agent's main loop needs, whichever transport reports the memory.
struct Env {
  const Config& c;
  EventSink& events;
  GuestMemory& mem;
  BuddyAllocator& buddy;
  std::mutex& zone;
  IntegrityCounters& counters;
  MemoryChecker& checker;
  Workload& workload;
  std::vector<Held>& resident;
  int sigfd;
  // Signalled when a request completes (with --announce-reported), so the
  // announcement follows the last chain at once rather than the next 50 ms
  // tick of the main loop.
  int completed_fd = -1;
  // Optional parts of the run (the live migration): started once the
  // driver runs, stopped before it stops, and given the summary.
  std::function<void()> on_running;
  std::function<void()> on_stopping;
  std::function<void(nlohmann::json& summary, int& code)> summarize;
  // --workload-on-signal: SIGUSR1s received (each lets one run start).
  std::atomic<uint64_t>* go = nullptr;
};

// The workload's allocation throughput (workload.h WorkloadTotals), in the
// workload_done and summary events: bytes allocated (pattern fill included),
// wall seconds of its runs, their ratio (0 if it never ran), the part of
// the seconds spent allocating, and for churn its operations.
void add_workload_totals(json& j, const WorkloadSpec& spec, const WorkloadTotals& t) {
  j["workload_runs"] = t.runs;
  j["workload_alloc_bytes"] = t.alloc_bytes;
  j["workload_seconds"] = t.seconds;
  j["workload_alloc_bytes_per_sec"] = t.alloc_bytes_per_sec();
  j["workload_alloc_seconds"] = t.alloc_seconds;
  if (spec.kind == WorkloadSpec::Kind::Churn) j["workload_ops"] = t.ops;
}

// Runs the workload and the main loop with a started-or-startable transport
// `driver` (BalloonDriver or LocalReporter), then stops it and emits the
// summary. `skip_loop`: a signal arrived during setup.
template <class Dev>
int drive(Env& e, Dev& driver, bool skip_loop) {
  const Config& c = e.c;
  std::atomic<bool> stop_workload{false};
  std::atomic<bool> workload_done{false};
  driver.start();
  if (e.on_running) e.on_running();

  std::thread wthread([&] {
    pthread_setname_np(pthread_self(), "fph-workload");
    for (int i = 0; i < c.repeat && !stop_workload.load(); ++i) {
      if (e.go) {
        while (e.go->load() <= static_cast<uint64_t>(i) && !stop_workload.load())
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        if (stop_workload.load()) break;
      }
      e.workload.run(c.workload, stop_workload);
    }
    workload_done.store(true);
    if (c.workload.kind != WorkloadSpec::Kind::None) {
      log::info("agent", "workload done ({} run(s))", c.repeat);
      json done = {{"event", "workload_done"},
                   {"alloc_shortfall_bytes", e.counters.alloc_shortfall_bytes.load()}};
      add_workload_totals(done, c.workload, e.workload.totals());
      e.events.emit(done);
    }
  });

  const auto started = Clock::now();
  std::string reason = "signal";
  bool announced = false;
  while (!skip_loop) {
    pollfd p[3] = {{e.sigfd, POLLIN, 0}, {driver.done_fd(), POLLIN, 0}, {e.completed_fd, POLLIN, 0}};
    const int n = ::poll(p, e.completed_fd >= 0 ? 3 : 2, 50);
    if (n > 0 && e.completed_fd >= 0 && p[2].revents) {
      uint64_t v;
      (void)!::read(e.completed_fd, &v, sizeof v);
    }
    if (n < 0 && errno != EINTR) {
      log::error("agent", "poll: {}", std::strerror(errno));
      reason = "error";
      break;
    }
    if (n > 0 && p[0].revents) {
      signalfd_siginfo si{};
      (void)!::read(e.sigfd, &si, sizeof si);
      if (si.ssi_signo == SIGUSR1) {  // --workload-on-signal
        if (e.go) e.events.emit({{"event", "workload_go"}, {"run", e.go->fetch_add(1) + 1}});
        continue;
      }
      log::info("agent", "{} received, shutting down", strsignal(static_cast<int>(si.ssi_signo)));
      reason = "signal";
      break;
    }
    if (n > 0 && p[1].revents) {
      reason = driver.exit_state() == BalloonDriver::Exit::ConnectionLost ? "connection_lost"
                                                                          : "driver_stopped";
      break;
    }
    if (c.duration && Clock::now() - started >= *c.duration) {
      reason = "duration";
      break;
    }
    if ((c.exit_when_reported || (c.announce_reported && !announced)) && workload_done.load()) {
      bool done = true;
      if (driver.reporting_active()) {
        std::lock_guard lk(e.zone);
        // Isolated frames count as work: between isolating and posting a
        // request there is a moment with nothing in the driver's map.
        done = e.buddy.unreported_candidate_frames(c.reporting_order) == 0 &&
               e.buddy.stats().isolated_frames == 0;
      }
      done = done && driver.inflight_requests() == 0;
      if (done && c.exit_when_reported) {
        reason = "reported";
        break;
      }
      if (done) {  // --announce-reported: say so once, keep running
        announced = true;
        e.events.emit({{"event", "reported"}});
      }
    }
  }

  if (e.on_stopping) e.on_stopping();
  stop_workload.store(true);
  wthread.join();
  driver.request_stop();
  driver.join();

  if (!e.resident.empty()) {
    const uint64_t bad = verify_resident(e.checker, e.resident);
    e.counters.resident_checks++;
    if (bad) {
      e.counters.corrupted_bytes += bad;
      log::error("agent", "CORRUPTION: {} resident bytes changed (final check)", bad);
    }
  }

  const auto rs = driver.reporting()->stats();
  int code = kExitOk;
  if (driver.exit_state() == BalloonDriver::Exit::ConnectionLost) code = kExitConnectionLost;
  else if (driver.exit_state() == BalloonDriver::Exit::Error) code = kExitSetup;
  if (e.counters.corrupted_bytes.load() > 0 ||
      (c.require_discard && e.counters.reported_nonzero_bytes.load() > 0))
    code = kExitCorruption;
  json sum = {{"event", "summary"},
              {"name", c.name},
              {"reason", reason},
              {"exit_code", code},
              {"reported_bytes", rs.bytes_reported},
              {"requests", rs.requests},
              {"requests_failed", rs.requests_failed},
              {"blocks_reported", rs.blocks_reported},
              {"corrupted_bytes", e.counters.corrupted_bytes.load()},
              {"reported_nonzero_bytes", e.counters.reported_nonzero_bytes.load()},
              {"reported_bytes_checked", e.counters.reported_bytes_checked.load()},
              {"resident_checks", e.counters.resident_checks.load()},
              {"verified_bytes", e.counters.verified_bytes.load()},
              {"alloc_shortfall_bytes", e.counters.alloc_shortfall_bytes.load()},
              {"reconnects", driver.reconnects()},
              {"calls", driver.calls()},
              {"spurious_calls", driver.spurious_calls()},
              {"backing_bytes", e.mem.backing_bytes()}};
  add_workload_totals(sum, c.workload, e.workload.totals());
  if constexpr (std::is_same_v<Dev, LocalReporter>) {
    const auto ls = driver.local_stats();
    sum["local_reclaim"] = std::string(to_string(*c.local_reclaim));
    sum["discard_syscalls"] = ls.discard_syscalls;
    sum["discarded_bytes"] = ls.discarded_bytes;
    sum["discard_skipped_bytes"] = ls.skipped_bytes;
    sum["discard_ns"] = ls.discard_ns;
    sum["discard_ns_max"] = ls.discard_ns_max;
    sum["lazy_zero_frames"] = e.checker.lazy_zero_frames();
    sum["lazy_kept_frames"] = e.checker.lazy_kept_frames();
  }
  if constexpr (std::is_same_v<Dev, BalloonDriver>) {
    const auto ep = driver.epoch();
    sum["epoch"] = ep ? json(*ep) : json(nullptr);
    sum["epoch_changes"] = driver.epoch_changes();
    if (const BalloonTarget* b = driver.balloon()) {
      const auto bs = b->stats();
      sum["balloon"] = {{"actual", bs.actual},
                        {"target", bs.target},
                        {"inflated_pages", bs.inflated_pages},
                        {"deflated_pages", bs.deflated_pages},
                        {"oom_deflated_pages", bs.oom_deflated_pages},
                        {"oom_deflates", bs.oom_deflates},
                        {"no_memory_stalls", bs.no_memory_stalls}};
    } else {
      sum["balloon"] = nullptr;
    }
  }
  if (e.summarize) e.summarize(sum, code);
  e.events.emit(sum);
  if (code == kExitConnectionLost)
    log::error("agent", "exiting: {}", driver.exit_message());
  return code;
}

json migration_json(const MigrationReport& r, const char* event) {
  json j = {{"ok", r.ok},
            {"passes", r.passes},
            {"pages_copied", r.pages_copied},
            {"zero_pages_skipped", r.zero_pages_skipped},
            {"zero_pages_written", r.zero_pages_written},
            {"guest_dirty_pages", r.guest_dirty_pages},
            {"device_dirty_pages", r.device_dirty_pages},
            {"final_dirty_pages", r.final_dirty_pages},
            {"mismatched_pages", r.mismatched_pages},
            {"blob_bytes", r.blob_bytes},
            {"precopy_ms", r.precopy_ms},
            {"downtime_ms", r.downtime_ms},
            {"drain_ms", r.drain_ms},
            {"compare_ms", r.compare_ms},
            {"save_ms", r.save_ms},
            {"load_ms", r.load_ms},
            {"source_backing_bytes", r.source_backing_bytes},
            {"destination_backing_bytes", r.destination_backing_bytes}};
  if (!r.ok) {
    j["error"] = r.error;
    j["rolled_back"] = r.rolled_back;
  }
  if (event) j["event"] = event;
  return j;
}

}  // namespace

int run(const Config& c, EventSink& events) {
  // Signals are taken synchronously by the main loop; block them before any
  // thread starts so every thread inherits the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  if (c.workload_on_signal) sigaddset(&sigs, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  UniqueFd sigfd(::signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sigfd) {
    log::error("agent", "signalfd: {}", std::strerror(errno));
    return kExitSetup;
  }

  // Guest RAM and the allocator model.
  GuestMemoryOptions mo;
  mo.bytes = c.memory;
  mo.regions = c.regions;
  mo.gpa_base = c.gpa_base;
  mo.hugetlb = c.hugetlb;
  mo.numa_node = c.numa_node;
  mo.mmap_offset = c.mmap_offset;
  mo.private_anon = c.local_reclaim.has_value();
  if (!mo.private_anon)  // local mode has no rings
    mo.ring_sizes = {kInflateQueueSize, kDeflateQueueSize,
                     reporting_queue_size(c.capacity, c.max_inflight), kStatsQueueSize};
  auto memr = GuestMemory::create(mo);
  if (!memr) {
    log::error("agent", "guest memory: {}", memr.error());
    return kExitSetup;
  }
  GuestMemory& mem = **memr;
  BuddyAllocator buddy(mem.frames(), mem.reserved_frames());
  std::mutex zone;
  IntegrityCounters counters;
  MemoryChecker checker(mem, c.poison);
  checker.poison_all(mem.reserved_frames());
  if (c.local_reclaim == LocalMethod::Free) checker.set_lazy_free(true);

  std::function<void(int)> notify;  // set once the transport exists
  std::function<uint64_t()> oom;    // the balloon's DEFLATE_ON_OOM, once the driver exists
  WorkloadHooks wh;
  wh.on_oom = [&]() -> uint64_t { return oom ? oom() : 0; };
  wh.notify_free = [&](int order) {
    if (notify) notify(order);
  };
  wh.on_freed = [&](uint64_t bytes) { events.emit({{"event", "workload_freed"}, {"bytes", bytes}}); };
  wh.on_trace_op = [&](const TraceOp& op, uint64_t bytes, uint64_t us, uint64_t minflt) {
    events.emit({{"event", "trace_op"}, {"line", op.line}, {"time_ms", op.time_ms},
                 {"op", op.op == TraceOp::Kind::Alloc ? "alloc" : "free"}, {"tag", op.tag},
                 {"bytes", bytes}, {"us", us}, {"minflt", minflt}});
  };
  Workload workload(buddy, zone, checker, counters, wh, c.seed);
  workload.set_check_reported(c.check_reported);

  // Resident set: allocated before the first reporting pass, never freed.
  std::vector<Held> resident;
  uint64_t resident_bytes = 0;
  if (c.resident) {
    resident = workload.alloc_bytes(c.resident);
    for (const auto& h : resident) resident_bytes += h.bytes();
    log::info("agent", "resident set: {} MiB in {} blocks", resident_bytes >> 20, resident.size());
  }

  DriverHooks hooks;
  hooks.before_complete = [&](const ReportRequest& r) {
    for (const auto& b : r.blocks) checker.mark_reported(b.frame, b.order);
  };
  UniqueFd completed(c.announce_reported ? ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK) : -1);
  hooks.after_complete = [&](const ReportRequest& r) {
    uint64_t bytes = 0;
    for (const auto& b : r.blocks) bytes += b.bytes();
    // One event per request, on the driver thread: formatted directly (only
    // integers and one finite double), not through a json tree.
    std::string ev = fmt::format(R"({{"event":"report_done","id":{},"bytes":{},"blocks":{})", r.id, bytes,
                                 r.blocks.size());
    if (r.posted != Clock::time_point{} && r.used >= r.posted) {
      // Kick to used, as the driver saw it (steady_clock = CLOCK_MONOTONIC:
      // posted_ns can be compared with other processes' clocks, e.g. fph-bench).
      fmt::format_to(std::back_inserter(ev), R"(,"latency_us":{},"posted_ns":{})",
                     std::chrono::duration<double, std::micro>(r.used - r.posted).count(),
                     std::chrono::duration_cast<std::chrono::nanoseconds>(r.posted.time_since_epoch()).count());
    }
    ev += '}';
    events.emit_line(std::move(ev), /*deferrable=*/true);
    if (completed) {
      // Wake the main loop only when this may have been the last request:
      // a wakeup per request would cost the guest CPU the bench is measuring.
      bool maybe_done = false;
      {
        std::lock_guard lk(zone);
        maybe_done = buddy.unreported_candidate_frames(c.reporting_order) == 0 &&
                     buddy.stats().isolated_frames == 0;
      }
      const uint64_t one = 1;
      if (maybe_done) (void)!::write(completed.get(), &one, sizeof one);
    }
    // A discard wave just finished: the resident set must be untouched
    // (DESIGN 3: nothing outside a reported range is ever discarded).
    if (!resident.empty()) {
      const uint64_t bad = verify_resident(checker, resident);
      counters.resident_checks++;
      if (bad) {
        counters.corrupted_bytes += bad;
        log::error("agent", "CORRUPTION: {} resident bytes changed after request {}", bad, r.id);
      }
    }
  };
  hooks.on_connected = [&](const Negotiated& n, bool reconnected) {
    if (reconnected)
      events.emit({{"event", "reconnected"}, {"features", n.features}});
  };
  // Balloon pages: their content is the host's (discarded: zero), never
  // checked; a reported mark from before must not be checked either.
  hooks.balloon_inflated = [&](uint64_t frame) { checker.forget_reported(frame, 0); };
  // Deflated pages are freed like any page: poisoned first with PAGE_POISON
  // (their content is whatever the host left: zero after a discard).
  hooks.balloon_deflating = [&](uint64_t frame) { checker.poison(frame, 0); };
  hooks.on_balloon = [&](const char* reason, const BalloonStats& s) {
    events.emit({{"event", "balloon"}, {"reason", reason}, {"target", s.target},
                 {"actual", s.actual}, {"inflated_pages", s.inflated_pages},
                 {"deflated_pages", s.deflated_pages},
                 {"oom_deflated_pages", s.oom_deflated_pages}});
  };
  hooks.on_epoch_changed = [&](uint32_t from, uint32_t to, uint64_t forgotten_bytes) {
    events.emit({{"event", "epoch_changed"}, {"from", from}, {"to", to},
                 {"forgotten_bytes", forgotten_bytes}});
  };

  Env env{c, events, mem, buddy, zone, counters, checker, workload, resident, sigfd.get(), completed.get()};
  std::atomic<uint64_t> go{0};
  if (c.workload_on_signal) env.go = &go;

  if (c.local_reclaim) {
    LocalOptions lo;
    lo.method = *c.local_reclaim;
    lo.reporting_enabled = !c.no_reporting;
    lo.reporting.order = c.reporting_order;
    lo.reporting.capacity = c.capacity;
    lo.reporting.delay = c.reporting_delay;
    lo.reporting.max_inflight = c.max_inflight;
    LocalReporter local(mem, buddy, zone, lo, hooks);
    notify = [&](int order) { local.notify_free(order); };
    events.emit({{"event", "ready"},
                 {"name", c.name},
                 {"pid", ::getpid()},
                 {"memory_bytes", mem.size()},
                 {"regions", mem.regions().size()},
                 {"transport", "local"},
                 {"local_reclaim", std::string(to_string(*c.local_reclaim))},
                 {"reporting", !c.no_reporting},
                 {"poison", nullptr},
                 {"reporting_order", c.reporting_order},
                 {"resident_bytes", resident_bytes}});
    const int code = drive(env, local, false);
    notify = nullptr;
    return code;
  }

  // Transport: vhost-user.
  std::optional<UnixListener> listener;
  Connector connector;
  if (!c.listen_path.empty()) {
    auto l = UnixListener::listen(c.listen_path);
    if (!l) {
      log::error("agent", "{}", l.error().message);
      return kExitSetup;
    }
    listener.emplace(std::move(*l));
    log::info("agent", "listening on {}; waiting for the back end to attach", c.listen_path);
    // Lets a test or script start `fphd --attach` only once the socket exists.
    events.emit({{"event", "listening"}, {"name", c.name}, {"path", c.listen_path}});
    connector = [&](const std::atomic<bool>* cancel) {
      return listener->accept(c.connect_timeout, cancel);
    };
  } else {
    connector = [&](const std::atomic<bool>* cancel) {
      return connect_unix(c.connect_path, c.connect_timeout, cancel);
    };
  }

  DriverOptions dopt;
  dopt.frontend.reporting = !c.no_reporting;
  dopt.frontend.poison = c.poison;
  dopt.frontend.force_mem_table = c.mem_table;
  dopt.frontend.stats = !c.no_stats;
  dopt.frontend.epoch = !c.no_epoch;
  dopt.epoch_poll = c.epoch_poll;
  dopt.frontend.deflate_on_oom = !c.no_deflate_on_oom;
  dopt.balloon = !c.no_balloon;
  dopt.balloon_poll = c.balloon_poll;
  dopt.reporting.order = c.reporting_order;
  dopt.reporting.capacity = c.capacity;
  dopt.reporting.delay = c.reporting_delay;
  dopt.reporting.max_inflight = c.max_inflight;
  dopt.reconnect = c.reconnect;

  // Live migration (--migrate-to): the workload's writes go through the
  // vCPU gate, and a thread plays the VMM's migration once the driver runs.
  VcpuGate vcpus;
  if (!c.migrate_to.empty()) workload.set_gate(&vcpus);

  BalloonDriver driver(mem, buddy, zone, dopt, connector, hooks);
  notify = [&](int order) { driver.notify_free(order); };
  oom = [&]() -> uint64_t { return driver.oom_deflate(); };
  std::atomic<bool> migration_cancel{false};
  std::thread migration;
  std::optional<MigrationReport> migrated;
  if (!c.migrate_to.empty()) {
    env.on_running = [&] {
      migration = std::thread([&] {
        pthread_setname_np(pthread_self(), "fph-migration");
        const auto at = Clock::now() + c.migrate_after;
        while (!migration_cancel.load() && Clock::now() < at)
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        if (migration_cancel.load()) return;
        MigrationOptions mo;
        mo.destination = c.migrate_to;
        mo.min_precopy = c.migrate_min_precopy;
        mo.destination_reply_timeout = c.migrate_reply_timeout;
        mo.ignore_device_log = c.migrate_ignore_device_log;
        events.emit({{"event", "migration_started"}, {"destination", c.migrate_to}});
        auto rep = migrate(mem, driver, vcpus, dopt.frontend, mo, migration_cancel);
        events.emit(migration_json(rep, rep.ok ? "migrated" : "migration_failed"));
        migrated = std::move(rep);
      });
    };
    env.on_stopping = [&] {
      migration_cancel.store(true);
      if (migration.joinable()) migration.join();
    };
    env.summarize = [&](json& sum, int& code) {
      sum["migration"] = migrated ? migration_json(*migrated, nullptr) : json(nullptr);
      // The guest would read memory it never wrote: as bad as corruption.
      if (migrated && migrated->mismatched_pages > 0) {
        code = kExitCorruption;
        sum["exit_code"] = code;
      }
    };
  }
  // The first connection may wait long (daemon not up yet, nobody attaching
  // to --listen): a signal meanwhile cancels it.
  std::atomic<bool> setup_done{false};
  std::atomic<bool> setup_signalled{false};
  std::thread watcher([&] {
    while (!setup_done.load()) {
      pollfd p{sigfd.get(), POLLIN, 0};
      if (::poll(&p, 1, 50) > 0) {
        signalfd_siginfo si{};
        (void)!::read(sigfd.get(), &si, sizeof si);
        if (si.ssi_signo == SIGUSR1) {  // --workload-on-signal: counts, setup goes on
          events.emit({{"event", "workload_go"}, {"run", go.fetch_add(1) + 1}});
          continue;
        }
        log::info("agent", "{} received during setup, giving up",
                  strsignal(static_cast<int>(si.ssi_signo)));
        setup_signalled.store(true);
        driver.request_stop();
        return;
      }
    }
  });
  auto neg = driver.connect();
  setup_done.store(true);
  watcher.join();
  if (!neg) {
    notify = nullptr;
    oom = nullptr;
    if (setup_signalled.load()) return kExitOk;
    log::error("agent", "vhost-user setup failed ({}): {}", to_string(neg.error().code),
               neg.error().message);
    return neg.error().connection_lost() ? kExitConnectionLost : kExitSetup;
  }
  events.emit({{"event", "ready"},
               {"name", c.name},
               {"pid", ::getpid()},
               {"memory_bytes", mem.size()},
               {"regions", mem.regions().size()},
               {"transport", "vhost-user"},
               {"features", neg->features},
               {"device_features", neg->device_features},
               {"protocol_features", neg->protocol},
               {"reporting", neg->reporting()},
               {"stats", neg->stats()},
               {"epoch", neg->epoch ? json(*neg->epoch) : json(nullptr)},
               {"balloon", driver.balloon() != nullptr &&
                               neg->has_protocol(proto::vu::protocol::kConfig)},
               {"deflate_on_oom", neg->deflate_on_oom()},
               {"poison", neg->poison() ? json(neg->config.poison_val) : json(nullptr)},
               {"reporting_order", c.reporting_order},
               {"resident_bytes", resident_bytes}});
  const int code = drive(env, driver, setup_signalled.load());
  notify = nullptr;
  oom = nullptr;
  return code;
}

}  // namespace fph::guest
