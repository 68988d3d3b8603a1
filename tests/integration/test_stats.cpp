// The stats queue end to end: real fphd and fph-guest processes. What the
// guest says about its free memory reaches fphd's metrics and moves with the
// guest's workload; the headroom (free memory whose backing the host still
// holds) is ~0 for a reporting guest once its reports are served, and the
// freed memory for a guest that does not report.
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdio>

#include "client.h"
#include "harness.h"

using namespace fph;
using namespace fph::test;
using nlohmann::json;

namespace {
constexpr double MiB = 1 << 20;
}

TEST(Stats, GuestReportedFreeMemoryFollowsTheWorkload) {
  TempDir dir;
  const std::string admin = dir.path + "/admin.sock";
  Fphd fphd(dir, {"--stats-interval", "1", "--admin-socket", admin});
  // 256 MiB guest: allocates 200 MiB, holds it 8 s, frees it.
  Process g({guest_path(), "--connect", fphd.socket, "--name", "statsvm", "--memory", "256M",
             "--workload", "alloc-free:200M:8000", "--reporting-delay-ms", "100"},
            dir.path + "/g.stderr");
  auto ready = g.wait_event("ready");
  ASSERT_TRUE(ready) << g.stderr_text();
  EXPECT_EQ((*ready)["stats"], true) << ready->dump();
  const std::map<std::string, std::string> vm{{"vm", "statsvm"}};
  std::string m;
  // While the 200 MiB are held, the guest says at most ~56 MiB are free.
  ASSERT_TRUE(eventually([&] {
    m = fphd.scrape();
    const double free = metric_sum(m, "fphd_guest_free_bytes", vm);
    return free > 0 && free < 60 * MiB;
  })) << m << g.stderr_text();
  EXPECT_GE(metric_sum(m, "fphd_guest_memtotal_bytes", vm), 250 * MiB);
  EXPECT_LE(metric_sum(m, "fphd_guest_memtotal_bytes", vm), 256 * MiB);
  EXPECT_GT(metric_sum(m, "fphd_guest_minor_faults", vm), 0);
  const double updates_held = metric_sum(m, "fphd_guest_stats_updates_total", vm);
  // After the free, the guest says it is nearly all free again.
  ASSERT_TRUE(g.wait_event("workload_freed")) << g.stderr_text();
  ASSERT_TRUE(eventually([&] {
    m = fphd.scrape();
    return metric_sum(m, "fphd_guest_free_bytes", vm) > 240 * MiB;
  })) << m << g.stderr_text();
  // fphd asked again and again (every second).
  EXPECT_GT(metric_sum(m, "fphd_guest_stats_updates_total", vm), updates_held);
  // Reporting returns the freed memory: headroom goes to (nearly) nothing.
  // Blocks below the reporting order and the ring pages may stay.
  ASSERT_TRUE(eventually([&] {
    m = fphd.scrape();
    return m.find("fphd_guest_unreported_free_bytes{") != std::string::npos &&
           metric_sum(m, "fphd_guest_unreported_free_bytes", vm) < 16 * MiB &&
           metric_sum(m, "fphd_guest_free_bytes", vm) > 240 * MiB;
  })) << m << g.stderr_text();
  EXPECT_EQ(metric_sum(m, "fphd_protocol_errors_total", vm), 0) << m;

  // The admin socket shows the latest stats and the headroom...
  auto c = ctl::AdminClient::connect(admin);
  ASSERT_TRUE(c) << c.error();
  auto r = c->execute("query-sessions", json::object());
  ASSERT_TRUE(r) << r.error();
  json s;
  for (const auto& e : (*r)["return"])
    if (e["name"] == "statsvm") s = e;
  ASSERT_TRUE(s.is_object()) << r->dump();
  EXPECT_NE(s["feature-names"].dump().find("STATS_VQ"), std::string::npos) << s.dump();
  ASSERT_TRUE(s["guest-stats"].is_object()) << s.dump();
  EXPECT_GT(s["guest-stats"]["values"]["memfree"].get<double>(), 240 * MiB) << s.dump();
  EXPECT_TRUE(s["guest-stats"]["unreported-free"].is_number()) << s.dump();
  EXPECT_GE(s["guest-stats"]["updates"].get<int>(), 2) << s.dump();
  // ...and so does `fphctl sessions`.
  std::string out;
  if (FILE* f = ::popen((std::string(FPH_FPHCTL_PATH) + " -s " + admin + " sessions").c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    EXPECT_EQ(::pclose(f), 0) << out;
  }
  EXPECT_NE(out.find("GUEST-FREE"), std::string::npos) << out;
  EXPECT_NE(out.find("UNREPORTED"), std::string::npos) << out;
  EXPECT_NE(out.find("statsvm"), std::string::npos) << out;

  g.signal(SIGTERM);
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
}

// Without reporting, what the guest freed stays backed: the headroom shows it.
TEST(Stats, HeadroomShowsFreedMemoryThatIsNotReported) {
  TempDir dir;
  Fphd fphd(dir, {"--stats-interval", "1"});
  Process g({guest_path(), "--connect", fphd.socket, "--name", "noreport", "--memory", "256M",
             "--no-reporting", "--workload", "alloc-free:200M:0"},
            dir.path + "/g.stderr");
  ASSERT_TRUE(g.wait_event("ready")) << g.stderr_text();
  ASSERT_TRUE(g.wait_event("workload_freed")) << g.stderr_text();
  const std::map<std::string, std::string> vm{{"vm", "noreport"}};
  std::string m;
  ASSERT_TRUE(eventually([&] {
    m = fphd.scrape();
    return metric_sum(m, "fphd_guest_free_bytes", vm) > 240 * MiB &&
           metric_sum(m, "fphd_guest_unreported_free_bytes", vm) >= 190 * MiB;
  })) << m << g.stderr_text();
  g.signal(SIGTERM);
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
}

// --stats-interval 0: STATS_VQ is not offered, the guest runs without it and
// no guest stats series exist.
TEST(Stats, IntervalZeroDoesNotOfferTheStatsQueue) {
  TempDir dir;
  Fphd fphd(dir, {"--stats-interval", "0"});
  Process g({guest_path(), "--connect", fphd.socket, "--name", "nostats", "--memory", "128M",
             "--workload", "alloc-free:64M:0", "--reporting-delay-ms", "100"},
            dir.path + "/g.stderr");
  auto ready = g.wait_event("ready");
  ASSERT_TRUE(ready) << g.stderr_text();
  EXPECT_EQ((*ready)["stats"], false);
  ASSERT_TRUE(g.wait_event("workload_freed")) << g.stderr_text();
  const std::string m = fphd.scrape();
  EXPECT_EQ(m.find("fphd_guest_free_bytes{"), std::string::npos) << m;
  g.signal(SIGTERM);
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
}
