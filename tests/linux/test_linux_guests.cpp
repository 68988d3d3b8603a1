// Real Linux kernels against fphd: user-mode Linux 6.1 guests whose stock
// virtio_balloon driver reports free pages over virtio_uml (vhost-user).
// Reclaim is measured from the host kernel (st_blocks of each guest's RAM
// file), integrity from the guest's own verifier (fph-linux-workload).
// These tests never skip: a guest that cannot be built or booted is a failure.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client.h"
#include "harness.h"
#include "uml_guest.h"

namespace fph::test {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
constexpr double kMiB = 1024.0 * 1024.0;

// Touching memory in UML is slow (tens of MiB/s, less with three guests on
// two cores): waits for a workload phase are generous, never expectations.
constexpr auto kBoot = 90s;
constexpr auto kPhase = 240s;
constexpr auto kReclaim = 60s;

struct Measured {
  int64_t peak = -1;      // RAM backing while the workload holds everything
  int64_t after = -1;     // when 90% of the freed bytes were back (or at the deadline)
  int64_t freed = 0;      // what the workload freed (its "freed" marker)
  double seconds_to_90 = -1;
};

std::vector<std::string> workload_args(int total, int keep, int realloc, int seed) {
  return {"--total=" + std::to_string(total), "--keep=" + std::to_string(keep),
          "--realloc=" + std::to_string(realloc), "--seed=" + std::to_string(seed), "--wait-stdin"};
}

class LinuxGuests : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = dir_.path + "/root";
    const std::string err = build_guest_root(root_);
    ASSERT_TRUE(err.empty()) << "cannot build the UML guest root: " << err;
  }

  UmlGuest& boot(const std::string& socket, const std::string& label, std::vector<std::string> wargs,
                 bool balloon = true, std::vector<std::string> kargs = {}) {
    UmlGuestOptions o;
    o.socket = socket;
    o.rootdir = root_;
    o.workdir = dir_.path;
    o.label = label;
    o.balloon = balloon;
    o.kernel_args = std::move(kargs);
    o.workload_args = std::move(wargs);
    guests_.push_back(std::make_unique<UmlGuest>(o));
    return *guests_.back();
  }

  // Every guest's /init reports on the balloon driver as expected.
  void expect_booted(bool balloon, const std::string& order = "") {
    for (auto& g : guests_) {
      auto init = g->wait_marker("init", {}, kBoot);
      ASSERT_TRUE(init) << g->label() << " did not reach /init\n" << g->console_tail();
      if (!balloon) {
        ASSERT_EQ((*init)["balloon"], "0") << g->console_tail();
        continue;
      }
      auto b = g->wait_marker("balloon", {}, kBoot);
      ASSERT_TRUE(b) << g->label() << ": no balloon marker\n" << g->console_tail();
      ASSERT_EQ((*b)["bound"], "1") << g->label() << ": virtio_balloon did not bind to the fphd device\n"
                                    << g->console_tail();
      if (!order.empty()) {
        ASSERT_EQ((*b)["page_reporting_order"], order) << g->console_tail();
      }
    }
  }

  // Waits until every guest's workload holds its memory, then the peak backing.
  void hold_and_measure_peak(std::vector<Measured>& m) {
    m.assign(guests_.size(), {});
    for (auto& g : guests_) {
      ASSERT_TRUE(g->wait_marker("waiting", {{"phase", "allocated"}}, kPhase))
          << g->label() << " never finished allocating\n" << g->console_tail();
    }
    for (int i = 0; i < 10; ++i) {
      for (size_t k = 0; k < guests_.size(); ++k) m[k].peak = std::max(m[k].peak, guests_[k]->ram_bytes());
      std::this_thread::sleep_for(100ms);
    }
    for (size_t k = 0; k < guests_.size(); ++k)
      ASSERT_GT(m[k].peak, 0) << guests_[k]->label() << ": RAM file not found under its TMPDIR";
  }

  // Releases the "allocated" wait point of every guest and waits for "freed".
  void free_all(std::vector<Measured>& m, Clock::time_point& freed_at) {
    for (auto& g : guests_) g->send_line();
    for (size_t k = 0; k < guests_.size(); ++k) {
      auto f = guests_[k]->wait_marker("freed", {}, kPhase);
      ASSERT_TRUE(f) << guests_[k]->label() << " did not free\n" << guests_[k]->console_tail();
      m[k].freed = std::stoll((*f)["bytes"]);
    }
    freed_at = Clock::now();
  }

  // Runs every workload to the end: verify, reallocate, verify, halt. The
  // guest's own verifier must find no corrupted page and the console no
  // kernel problem.
  // `at`: the wait point the workloads are at (or about to reach).
  void finish_and_verify(const std::string& at = "freed", bool warnings_allowed = false) {
    for (auto& g : guests_) {
      ASSERT_TRUE(g->wait_marker("waiting", {{"phase", at}}, kPhase)) << g->console_tail();
      g->send_line();
    }
    for (auto& g : guests_) {
      ASSERT_TRUE(g->wait_marker("waiting", {{"phase", "reallocated"}}, kPhase)) << g->console_tail();
      g->send_line();
    }
    for (auto& g : guests_) {
      auto done = g->wait_marker("done", {}, kPhase);
      ASSERT_TRUE(done) << g->label() << ": workload did not finish\n" << g->console_tail();
      ASSERT_TRUE(g->find_marker("verify", {{"phase", "final"}})) << g->console_tail();
      for (const auto& v : g->markers("verify")) {
        EXPECT_EQ(v.at("corrupted_pages"), "0") << g->label() << " phase " << v.at("phase") << "\n"
                                                << g->console_tail();
        EXPECT_GT(std::stoll(v.at("checked_pages")), 0);
      }
      EXPECT_EQ((*done)["status"], "ok") << g->console_tail();
      auto exit = g->wait_marker("workload", {}, 30s);
      ASSERT_TRUE(exit) << g->console_tail();
      EXPECT_EQ((*exit)["exit"], "0") << g->console_tail();
      ASSERT_TRUE(g->wait_marker("dmesg_problems", {}, 30s)) << g->console_tail();
      ASSERT_TRUE(g->wait_marker("halt", {}, 30s)) << g->console_tail();
      EXPECT_EQ(g->wait_exit(30s), 0) << g->label() << " did not halt cleanly\n" << g->console_tail();
      EXPECT_EQ(g->kernel_problems(), "") << g->label() << ": kernel problems on the console\n"
                                          << g->console_tail();
      if (!warnings_allowed) {
        EXPECT_EQ(g->kernel_warnings(), "") << g->label() << ": kernel warnings on the console\n"
                                            << g->console_tail();
      }
    }
  }

  void report(const std::string& test, const std::vector<Measured>& m) {
    for (size_t k = 0; k < m.size(); ++k) {
      std::printf("[linux] %s %s peak_mib=%.1f after_mib=%.1f freed_mib=%.1f reclaimed_mib=%.1f seconds_to_90=%.2f\n",
                  test.c_str(), guests_[k]->label().c_str(), m[k].peak / kMiB, m[k].after / kMiB,
                  m[k].freed / kMiB, (m[k].peak - m[k].after) / kMiB, m[k].seconds_to_90);
      RecordProperty(guests_[k]->label() + "_peak_mib", std::to_string(m[k].peak / kMiB));
      RecordProperty(guests_[k]->label() + "_after_mib", std::to_string(m[k].after / kMiB));
      RecordProperty(guests_[k]->label() + "_seconds_to_90", std::to_string(m[k].seconds_to_90));
    }
    std::fflush(stdout);
  }

  // Polls every guest's backing until it dropped by 90% of what it freed.
  void wait_reclaim(std::vector<Measured>& m, Clock::time_point freed_at) {
    const auto deadline = freed_at + kReclaim;
    size_t pending = m.size();
    while (pending > 0 && Clock::now() < deadline) {
      pending = 0;
      for (size_t k = 0; k < m.size(); ++k) {
        if (m[k].seconds_to_90 >= 0) continue;
        const int64_t now = guests_[k]->ram_bytes();
        m[k].after = now;
        if (now >= 0 && m[k].peak - now >= static_cast<int64_t>(0.9 * static_cast<double>(m[k].freed))) {
          m[k].seconds_to_90 = std::chrono::duration<double>(Clock::now() - freed_at).count();
        } else {
          ++pending;
        }
      }
      std::this_thread::sleep_for(100ms);
    }
  }

  TempDir dir_;
  std::string root_;
  std::vector<std::unique_ptr<UmlGuest>> guests_;
};

// Three 512 MiB guests against one fphd: each frees 256 MiB and the host gets
// at least 90% of it back; nothing the guests kept is touched.
TEST_F(LinuxGuests, ThreeGuestsGiveBackWhatTheyFree) {
  Fphd fphd(dir_);
  for (int i = 0; i < 3; ++i) boot(fphd.socket, "guest" + std::to_string(i + 1), workload_args(288, 32, 32, i + 1));
  ASSERT_NO_FATAL_FAILURE(expect_booted(true));
  std::vector<Measured> m;
  ASSERT_NO_FATAL_FAILURE(hold_and_measure_peak(m));
  Clock::time_point freed_at;
  ASSERT_NO_FATAL_FAILURE(free_all(m, freed_at));
  wait_reclaim(m, freed_at);
  report("three_guests", m);
  const std::string metrics = fphd.scrape();
  for (size_t k = 0; k < m.size(); ++k) {
    auto& g = *guests_[k];
    EXPECT_GE(m[k].freed, 256 * 1024 * 1024);
    EXPECT_GE(m[k].seconds_to_90, 0) << g.label() << ": backing went from " << m[k].peak / kMiB << " MiB to "
                                     << m[k].after / kMiB << " MiB after freeing " << m[k].freed / kMiB
                                     << " MiB (need a drop of 90%)\n"
                                     << g.console_tail() << "--- fphd ---\n" << fphd.proc->stderr_text();
    // fphd's own view agrees (not the measurement, a cross-check).
    EXPECT_GT(metric_sum(metrics, "fphd_reclaimed_bytes_total", {{"vm", g.vm_name()}}), 0) << g.vm_name();
  }
  EXPECT_EQ(metric_sum(metrics, "fphd_protocol_errors_total"), 0) << fphd.proc->stderr_text();
  ASSERT_NO_FATAL_FAILURE(finish_and_verify());
  for (auto& g : guests_) {
    auto dev = g->find_marker("devices");
    ASSERT_TRUE(dev) << g->console_tail();
    EXPECT_EQ((*dev)["balloon_bound"], "1") << g->console_tail();
  }
  EXPECT_TRUE(fphd.proc->running()) << fphd.proc->stderr_text();
}

// The back-end channel with a real driver: `set-balloon` (bytes) writes the
// balloon target and sends CONFIG_CHANGE_MSG; Linux's virtio_balloon
// inflates (its pages come to fphd on the inflate queue and are discarded)
// and writes `actual`; the host backing falls by what was inflated, measured
// from the kernel; a target of 0 deflates again. A target larger than the
// guest is refused.
//
// So that the balloon's pages are backed, nothing the guest reports is
// discarded: a per-VM policy (every VM, min_block 1 GiB: a real kernel
// reports at most 4 MiB blocks) returns reports as "small", while inflated
// pages (the host asked for them) are discarded. The workload writes 400 MiB
// and frees 384 MiB, all still backed. Every inflated page was either backed
// (its discard lowers the backing) or never touched; at most guest memory
// minus the backing before inflating can be of the second kind, which bounds
// the fall from below.
TEST_F(LinuxGuests, BalloonTargetThroughTheBackendChannel) {
  const std::string admin = dir_.path + "/admin.sock";
  const std::string config = dir_.path + "/fphd.toml";
  {
    std::ofstream f(config);
    f << "[policy.vm.\"*\"]\nmin_block = \"1G\"\n";
  }
  Fphd fphd(dir_, {"--admin-socket", admin, "--config", config});
  UmlGuest& g = boot(fphd.socket, "guest1", workload_args(400, 16, 8, 7));
  ASSERT_NO_FATAL_FAILURE(expect_booted(true));
  ASSERT_TRUE(g.wait_marker("waiting", {{"phase", "allocated"}}, kPhase)) << g.console_tail();
  auto client = ctl::AdminClient::connect(admin);
  ASSERT_TRUE(client) << client.error();
  auto session = [&]() -> nlohmann::json {
    auto r = client->execute("query-sessions");
    if (!r || !r->contains("return")) return {};
    for (const auto& s : (*r)["return"])
      if (s["name"] == g.vm_name()) return s;
    return {};
  };
  ASSERT_TRUE(eventually([&] { return !session().is_null(); }, 30s));
  EXPECT_TRUE(session()["backend-channel"].get<bool>());
  EXPECT_EQ(session()["policy"]["min-block"], 1ull << 30) << session().dump();
  const uint64_t memory = session()["memory"].get<uint64_t>();

  auto too_big = client->execute("set-balloon", {{"vm", g.vm_name()}, {"target", memory + 4096}});
  ASSERT_TRUE(too_big);
  ASSERT_TRUE(too_big->contains("error")) << too_big->dump();
  EXPECT_NE((*too_big)["error"]["desc"].get<std::string>().find("more than VM"), std::string::npos);

  // The workload frees 384 MiB; the kernel reports it, fphd returns it undiscarded.
  g.send_line();
  ASSERT_TRUE(g.wait_marker("waiting", {{"phase", "freed"}}, kPhase)) << g.console_tail();
  EXPECT_TRUE(eventually([&] {
    return metric_sum(fphd.scrape(), "fphd_skipped_bytes_total", {{"vm", g.vm_name()}, {"reason", "small"}}) >=
           256.0 * 1024 * 1024;
  }, kReclaim)) << fphd.scrape();
  EXPECT_EQ(metric_sum(fphd.scrape(), "fphd_discarded_bytes_total", {{"vm", g.vm_name()}}), 0);
  const int64_t before = g.ram_bytes();
  ASSERT_GT(before, 384ll << 20) << "the freed memory must still be backed";

  constexpr uint64_t kTarget = 256ull * 1024 * 1024 / 4096;  // 256 MiB
  auto set = client->execute("set-balloon", {{"vm", g.vm_name()}, {"target", kTarget * 4096}});
  ASSERT_TRUE(set);
  ASSERT_TRUE(set->contains("return")) << set->dump();
  EXPECT_TRUE((*set)["return"]["notified"].get<bool>()) << set->dump();
  EXPECT_TRUE(eventually([&] { return session()["actual"] == kTarget; }, kReclaim))
      << "actual " << session()["actual"] << "\n" << g.console_tail() << fphd.proc->stderr_text();
  // The host backing fell by what was inflated, less what can have been
  // never-touched memory (and 4 MiB for the guest's own activity meanwhile).
  const int64_t untouched = static_cast<int64_t>(memory) - before;
  const int64_t want = static_cast<int64_t>(kTarget * 4096) - std::max<int64_t>(untouched, 0) - (4ll << 20);
  int64_t after = before;
  EXPECT_TRUE(eventually([&] {
    after = g.ram_bytes();
    return before - after >= want;
  }, 30s)) << "backing " << (before >> 20) << " -> " << (after >> 20) << " MiB; want a fall of at least "
           << (want >> 20) << " MiB (guest memory " << (memory >> 20) << " MiB)";
  std::printf("balloon: backing %lld -> %lld MiB after inflating %llu MiB (guest memory %llu MiB)\n",
              static_cast<long long>(before >> 20), static_cast<long long>(after >> 20),
              static_cast<unsigned long long>(kTarget >> 8), static_cast<unsigned long long>(memory >> 20));
  // The inflated pages were discarded, counted apart from free page
  // reporting, and the driver's own word on it.
  EXPECT_GE(metric_sum(fphd.scrape(), "fphd_discarded_bytes_total", {{"vm", g.vm_name()}}),
            static_cast<double>(kTarget * 4096));
  EXPECT_GE(metric_sum(fphd.scrape(), "fphd_balloon_bytes_total", {{"vm", g.vm_name()}, {"direction", "inflate"}}),
            static_cast<double>(kTarget * 4096));
  EXPECT_TRUE(eventually([&] {
    return metric_sum(fphd.scrape(), "fphd_balloon_actual_bytes", {{"vm", g.vm_name()}}) ==
           static_cast<double>(kTarget * 4096);
  }, 10s));

  auto zero = client->execute("set-balloon", {{"vm", g.vm_name()}, {"target", 0}});
  ASSERT_TRUE(zero && zero->contains("return"));
  EXPECT_TRUE(eventually([&] { return session()["actual"] == 0; }, kReclaim)) << g.console_tail();
  EXPECT_GE(metric_sum(fphd.scrape(), "fphd_balloon_bytes_total", {{"vm", g.vm_name()}, {"direction", "deflate"}}),
            static_cast<double>(kTarget * 4096));
  EXPECT_EQ(metric_sum(fphd.scrape(), "fphd_protocol_errors_total"), 0) << fphd.proc->stderr_text();
  ASSERT_NO_FATAL_FAILURE(finish_and_verify("freed"));
}

// The same run without the balloon driver: nobody reports, the backing stays.
TEST_F(LinuxGuests, WithoutTheBalloonDriverTheBackingStays) {
  Fphd fphd(dir_);
  for (int i = 0; i < 3; ++i)
    boot(fphd.socket, "guest" + std::to_string(i + 1), workload_args(288, 32, 32, i + 1), /*balloon=*/false);
  ASSERT_NO_FATAL_FAILURE(expect_booted(false));
  std::vector<Measured> m;
  ASSERT_NO_FATAL_FAILURE(hold_and_measure_peak(m));
  Clock::time_point freed_at;
  ASSERT_NO_FATAL_FAILURE(free_all(m, freed_at));
  // Reporting has a 2 s delay and the run above gets 90% back in a few seconds: wait well past that.
  std::this_thread::sleep_for(10s);
  for (size_t k = 0; k < m.size(); ++k) m[k].after = guests_[k]->ram_bytes();
  report("no_balloon", m);
  const std::string metrics = fphd.scrape();
  for (size_t k = 0; k < m.size(); ++k) {
    EXPECT_GE(m[k].freed, 256 * 1024 * 1024);
    EXPECT_LT(m[k].peak - m[k].after, static_cast<int64_t>(0.1 * static_cast<double>(m[k].freed)))
        << guests_[k]->label() << ": backing dropped from " << m[k].peak / kMiB << " to " << m[k].after / kMiB
        << " MiB without a balloon driver";
    EXPECT_EQ(metric_sum(metrics, "fphd_reported_bytes_total", {{"vm", guests_[k]->vm_name()}}), 0);
  }
  EXPECT_EQ(metric_sum(metrics, "fphd_discarded_bytes_total"), 0);
  ASSERT_NO_FATAL_FAILURE(finish_and_verify());
}

// page_reporting.page_reporting_order=9 on the kernel command line: the
// guest also reports 2 MiB blocks. Shown with memory freed around one pinned
// page in every 4 MiB: that leaves free 2 MiB blocks but no free 4 MiB one,
// so a guest at the default order (10, 4 MiB) gives back next to nothing and
// the order-9 guest about half. Then the pinned pages go too, the blocks
// merge, and both get at least 90% back.
TEST_F(LinuxGuests, ReportingOrder9Reports2MiBBlocks) {
  Fphd fphd(dir_);
  auto args = workload_args(176, 16, 16, 7);
  args.push_back("--pin-every=4");
  auto& o9 = boot(fphd.socket, "order9", args, true, {"page_reporting.page_reporting_order=9"});
  auto& o10 = boot(fphd.socket, "order10", args, true);
  ASSERT_NO_FATAL_FAILURE(expect_booted(true));
  ASSERT_EQ((*o9.find_marker("balloon"))["page_reporting_order"], "9") << o9.console_tail();
  ASSERT_EQ((*o10.find_marker("balloon"))["page_reporting_order"], "10") << o10.console_tail();
  std::vector<Measured> m;
  ASSERT_NO_FATAL_FAILURE(hold_and_measure_peak(m));
  Clock::time_point freed_at;
  ASSERT_NO_FATAL_FAILURE(free_all(m, freed_at));
  const auto quarter = static_cast<int64_t>(0.25 * static_cast<double>(m[0].freed));
  const bool o9_gave_back = eventually([&] { return m[0].peak - o9.ram_bytes() >= quarter; }, kReclaim);
  std::this_thread::sleep_for(5s);  // both had the same time, well past the 2 s reporting delay
  const int64_t drop9 = m[0].peak - o9.ram_bytes(), drop10 = m[1].peak - o10.ram_bytes();
  std::printf("[linux] order9 pinned: order9 dropped %.1f MiB, order10 dropped %.1f MiB of %.1f MiB freed\n",
              drop9 / kMiB, drop10 / kMiB, m[0].freed / kMiB);
  EXPECT_TRUE(o9_gave_back) << "order 9: backing dropped by " << drop9 / kMiB << " MiB of " << m[0].freed / kMiB
                            << " MiB freed in 2 MiB blocks\n" << o9.console_tail() << fphd.proc->stderr_text();
  EXPECT_LT(drop10, quarter / 2) << "order 10 gave back " << drop10 / kMiB
                                 << " MiB: the pinned layout left free 4 MiB blocks, the comparison means nothing";
  EXPECT_GT(drop9, 4 * std::max<int64_t>(drop10, 4 << 20));
  const std::string metrics = fphd.scrape();
  EXPECT_GT(metric_sum(metrics, "fphd_reported_bytes_total", {{"vm", o9.vm_name()}}), 0);

  // The pinned pages go: everything merges, reclaim holds for both.
  for (auto& g : guests_) {
    ASSERT_TRUE(g->wait_marker("waiting", {{"phase", "freed"}}, kPhase)) << g->console_tail();
    g->send_line();
  }
  for (size_t k = 0; k < guests_.size(); ++k) {
    auto u = guests_[k]->wait_marker("unpinned", {}, kPhase);
    ASSERT_TRUE(u) << guests_[k]->console_tail();
    m[k].freed += std::stoll((*u)["bytes"]);
  }
  wait_reclaim(m, Clock::now());
  report("order9", m);
  for (size_t k = 0; k < m.size(); ++k) {
    EXPECT_GE(m[k].seconds_to_90, 0) << guests_[k]->label() << ": backing went from " << m[k].peak / kMiB
                                     << " MiB to " << m[k].after / kMiB << " MiB after freeing "
                                     << m[k].freed / kMiB << " MiB\n" << guests_[k]->console_tail();
  }
  ASSERT_NO_FATAL_FAILURE(finish_and_verify("unpinned"));
}

// fphd restarts while a guest runs. virtio_uml does not reconnect: when the
// connection drops it unregisters the device, the balloon driver goes away
// and reporting stops for good. The guest keeps running cleanly, and the new
// fphd has no session and no table for it, so it discards nothing.
TEST_F(LinuxGuests, FphdRestartWhileAGuestRuns) {
  auto fphd = std::make_unique<Fphd>(dir_);
  auto& g = boot(fphd->socket, "guest1", workload_args(176, 16, 16, 11));
  ASSERT_NO_FATAL_FAILURE(expect_booted(true));
  std::vector<Measured> m;
  ASSERT_NO_FATAL_FAILURE(hold_and_measure_peak(m));
  // Boot-time free memory was reported by now (2-4 s after the driver loaded).
  ASSERT_TRUE(eventually([&] { return metric_sum(fphd->scrape(), "fphd_requests_total", {{"vm", g.vm_name()}}) > 0; },
                         30s))
      << fphd->proc->stderr_text();

  fphd->proc->signal(SIGTERM);
  EXPECT_EQ(fphd->proc->wait(30s), 0) << fphd->proc->stderr_text();
  fphd.reset();
  fphd = std::make_unique<Fphd>(dir_);
  // What the guest kernel does about it (see docs/linux-guests.md).
  std::this_thread::sleep_for(3s);
  ASSERT_TRUE(g.running()) << g.console_tail();

  Clock::time_point freed_at;
  ASSERT_NO_FATAL_FAILURE(free_all(m, freed_at));
  std::this_thread::sleep_for(8s);
  m[0].after = g.ram_bytes();
  report("fphd_restart", m);
  EXPECT_LT(m[0].peak - m[0].after, static_cast<int64_t>(0.1 * static_cast<double>(m[0].freed)))
      << "the guest's backing dropped after fphd restarted: from " << m[0].peak / kMiB << " to "
      << m[0].after / kMiB << " MiB";
  const std::string metrics = fphd->scrape();
  EXPECT_EQ(metric_sum(metrics, "fphd_sessions"), 0) << "the guest reconnected?\n" << fphd->proc->stderr_text();
  EXPECT_EQ(metric_sum(metrics, "fphd_sessions_opened_total"), 0) << fphd->proc->stderr_text();
  EXPECT_EQ(metric_sum(metrics, "fphd_reported_bytes_total"), 0);
  EXPECT_EQ(metric_sum(metrics, "fphd_discarded_bytes_total"), 0);
  // Linux 6.1's virtio_uml WARNs when the back end's socket closes ("read
  // returned 0" in vu_interrupt, then vu_del_vqs while unregistering): the
  // only warnings allowed here, and no Oops, BUG or panic.
  ASSERT_NO_FATAL_FAILURE(finish_and_verify("freed", /*warnings_allowed=*/true));
  std::istringstream warnings(g.kernel_warnings());
  for (std::string w; std::getline(warnings, w);) {
    if (w.find("FPH dmesg_problem") == std::string::npos) {
      EXPECT_NE(w.find("arch/um/drivers/virtio_uml.c"), std::string::npos) << w << "\n" << g.console_tail();
    }
  }
  // The device is gone for good: no virtio device, no balloon driver bound.
  auto dev = g.find_marker("devices");
  ASSERT_TRUE(dev) << g.console_tail();
  EXPECT_EQ((*dev)["virtio"], "0") << g.console_tail();
  EXPECT_EQ((*dev)["balloon_bound"], "0") << g.console_tail();
  EXPECT_TRUE(fphd->proc->running());
}

}  // namespace
}  // namespace fph::test
