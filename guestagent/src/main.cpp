// fph-guest: parse the command line into a Config and run (STYLE 10: thin main).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <iostream>

#include "fph/common/log.h"
#include "fph/guest/agent.h"
#include "fph/guest/workload.h"

int main(int argc, char** argv) {
  using namespace fph::guest;
  CLI::App app{"fph-guest: a user-space guest (vhost-user front end + virtio-balloon driver + "
               "buddy model) that reports free memory to fphd"};
  Config c;
  std::string memory = "256M", resident = "0", workload = "none", poison, log_level = "info";
  std::string gpa_base = "0", mmap_offset = "0";
  double duration = 0, connect_timeout = 30;
  int delay_ms = 2000;
  int numa_node = -1;

  auto* conn = app.add_option("--connect", c.connect_path, "connect to fphd's vhost-user socket");
  auto* lis = app.add_option("--listen", c.listen_path,
                             "create this socket and wait for fphd to attach");
  conn->excludes(lis);
  std::string local_reclaim;
  app.add_option("--local-reclaim", local_reclaim,
                 "no vhost-user: private anonymous RAM, reported blocks discarded in-process "
                 "with madvise: dontneed | free")
      ->check(CLI::IsMember({"dontneed", "free"}))
      ->excludes(conn)
      ->excludes(lis);
  app.add_option("--name", c.name, "VM name (logs, events)");
  app.add_option("--connect-timeout", connect_timeout,
                 "seconds to wait for the socket / the back end to attach")
      ->capture_default_str();
  app.add_option("--memory", memory, "guest RAM size (e.g. 512M, 1G)")->capture_default_str();
  app.add_option("--regions", c.regions, "number of memfd regions")->capture_default_str();
  app.add_option("--gpa-base", gpa_base, "guest physical address of RAM (multiple of 4M)")
      ->capture_default_str();
  app.add_option("--mmap-offset", mmap_offset, "offset of each region inside its memfd")
      ->capture_default_str();
  app.add_flag("--hugetlb", c.hugetlb, "back RAM with MFD_HUGETLB (pages must be reserved)");
  app.add_option("--numa-node", numa_node, "bind RAM to this host NUMA node (mbind)");
  app.add_option("--reporting-order", c.reporting_order, "page_reporting_order (0..10)")
      ->capture_default_str();
  app.add_option("--reporting-delay-ms", delay_ms, "delay before a reporting pass")
      ->capture_default_str();
  app.add_option("--capacity", c.capacity, "blocks per reporting request")->capture_default_str();
  app.add_option("--max-inflight", c.max_inflight, "reporting requests in flight at once")
      ->capture_default_str();
  app.add_flag("--no-reporting", c.no_reporting, "do not negotiate free page reporting");
  app.add_flag("--no-stats", c.no_stats, "do not negotiate the stats queue (STATS_VQ)");
  app.add_flag("--no-epoch", c.no_epoch,
               "do not negotiate fph's migration epoch (no re-report after a migration)");
  int epoch_poll_ms = 1000;
  app.add_option("--epoch-poll-ms", epoch_poll_ms,
                 "read the migration epoch every N ms (0 = only at connect)")
      ->capture_default_str();
  app.add_flag("--no-balloon", c.no_balloon,
               "ignore the balloon target (config num_pages): never inflate or deflate");
  app.add_flag("--no-deflate-on-oom", c.no_deflate_on_oom,
               "do not negotiate DEFLATE_ON_OOM (the balloon then never deflates by itself)");
  int balloon_poll_ms = 500;
  app.add_option("--balloon-poll-ms", balloon_poll_ms,
                 "read the balloon target every N ms (0 = only at connect)")
      ->capture_default_str();
  app.add_flag("--workload-on-signal", c.workload_on_signal,
               "each run of the workload waits for a SIGUSR1");
  app.add_option("--poison", poison, "negotiate PAGE_POISON with this poison_val (hex)");
  app.add_option("--workload", workload,
                 "none | alloc-free:SIZE[:HOLD_MS] | churn:SIZE:SECONDS | trace:FILE "
                 "(CSV time_ms,op,size[,tag]: docs/experiments.md)")
      ->capture_default_str();
  app.add_option("--resident", resident, "memory allocated at start, never freed, verified")
      ->capture_default_str();
  app.add_option("--repeat", c.repeat, "run the workload N times")->capture_default_str();
  app.add_option("--duration", duration, "exit after SECONDS (default: run until SIGTERM)");
  app.add_flag("--exit-when-reported", c.exit_when_reported,
               "exit when the workload is done and all free memory is reported");
  app.add_flag("--defer-report-events", c.defer_report_events,
               "print report_done events with the next other event, not one write per request");
  app.add_flag("--announce-reported", c.announce_reported,
               "print a \"reported\" event when the workload is done and all free memory is "
               "reported, and keep running");
  app.add_flag("--reconnect", c.reconnect, "reconnect and redo setup if fphd goes away");
  int64_t migrate_after_ms = 0, migrate_min_precopy_ms = 0, migrate_reply_timeout_ms = 10000;
  app.add_option("--migrate-to", c.migrate_to,
                 "live-migrate the VM to the back end at this vhost-user socket (a second fphd): "
                 "precopy with dirty logging, SAVE/LOAD of the device state, switch "
                 "(docs/migration.md)");
  app.add_option("--migrate-after-ms", migrate_after_ms, "start the migration N ms after setup")
      ->capture_default_str();
  app.add_option("--migrate-min-precopy-ms", migrate_min_precopy_ms,
                 "keep copying dirty pages for at least N ms before the switch")
      ->capture_default_str();
  app.add_option("--migrate-reply-timeout-ms", migrate_reply_timeout_ms,
                 "give up (and stay on the source) if the destination does not answer within N ms")
      ->capture_default_str();
  app.add_flag("--migrate-ignore-device-log", c.migrate_ignore_device_log,
               "test control: do not resend the pages the source back end logged (the switch "
               "then finds mismatches)");
  app.add_flag("--mem-table", c.mem_table, "use SET_MEM_TABLE even if ADD_MEM_REG is offered");
  app.add_flag("--require-discard", c.require_discard,
               "exit 3 if reported pages do not read back as zero/poison");
  bool no_check_reported = false;
  app.add_flag("--no-check-reported", no_check_reported,
               "do not read reported pages back on reallocation (timing runs: the reads would "
               "add faults and time to the refault cost being measured)");
  app.add_option("--seed", c.seed, "workload random seed")->capture_default_str();
  app.add_option("--log-level", log_level, "debug | info | warn | error")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : kExitSetup;
  }

  auto fail = [](const std::string& msg) {
    std::fprintf(stderr, "fph-guest: %s\n", msg.c_str());
    return kExitSetup;
  };
  fph::log::Level lvl{};
  if (!fph::log::parse_level(log_level, &lvl)) return fail("bad --log-level " + log_level);
  fph::log::set_level(lvl);
  auto size_opt = [&](const std::string& flag, const std::string& v, uint64_t* out) {
    auto s = parse_size(v);
    if (!s) return fail(flag + ": " + s.error());
    *out = *s;
    return 0;
  };
  if (int r = size_opt("--memory", memory, &c.memory)) return r;
  if (int r = size_opt("--resident", resident, &c.resident)) return r;
  if (int r = size_opt("--gpa-base", gpa_base, &c.gpa_base)) return r;
  if (int r = size_opt("--mmap-offset", mmap_offset, &c.mmap_offset)) return r;
  auto w = parse_workload(workload);
  if (!w) return fail("--workload: " + w.error());
  c.workload = *w;
  if (!poison.empty()) {
    try {
      size_t pos = 0;
      const unsigned long v = std::stoul(poison, &pos, 16);
      if (pos != poison.size() || v > 0xffffffffu) return fail("--poison: not a 32-bit hex value");
      c.poison = static_cast<uint32_t>(v);
    } catch (const std::exception&) {
      return fail("--poison: not a hex value");
    }
  }
  if (numa_node >= 0) c.numa_node = numa_node;
  c.check_reported = !no_check_reported;
  if (local_reclaim == "dontneed") c.local_reclaim = LocalMethod::Dontneed;
  else if (local_reclaim == "free") c.local_reclaim = LocalMethod::Free;
  c.reporting_delay = std::chrono::milliseconds(delay_ms);
  c.epoch_poll = std::chrono::milliseconds(epoch_poll_ms);
  c.balloon_poll = std::chrono::milliseconds(balloon_poll_ms);
  c.migrate_after = std::chrono::milliseconds(std::max<int64_t>(0, migrate_after_ms));
  c.migrate_min_precopy = std::chrono::milliseconds(std::max<int64_t>(0, migrate_min_precopy_ms));
  c.migrate_reply_timeout = std::chrono::milliseconds(std::max<int64_t>(1, migrate_reply_timeout_ms));
  c.connect_timeout = std::chrono::milliseconds(static_cast<int64_t>(connect_timeout * 1000));
  if (duration > 0) c.duration = std::chrono::milliseconds(static_cast<int64_t>(duration * 1000));
  if (auto v = validate(c); !v) return fail(v.error());

  EventSink events(stdout);
  events.set_deferring(c.defer_report_events);
  return run(c, events);
}
