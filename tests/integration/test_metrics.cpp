// The observability metrics with real fphd and fph-guest processes: verified
// reclaim agrees with the kernel's own count, and a poisoned or non-reporting
// guest shows up as disabled with its reason, its reports skipped.
#include <gtest/gtest.h>
#include <signal.h>

#include "harness.h"

using namespace fph::test;

namespace {
constexpr int64_t MiB = 1 << 20;
}

// One guest frees 200 MiB: fphd_reclaimed_bytes_total (measured by fphd
// around each discard) covers at least 95% of what the kernel shows going
// away, and never more than what was discarded; the sampled resident gauge
// follows the memfd's blocks; the VM is active with its feature bits.
TEST(Metrics, VerifiedReclaimMatchesTheKernelAndStateIsActive) {
  TempDir dir;
  Fphd fphd(dir);
  Process g({guest_path(), "--connect", fphd.socket, "--name", "verified", "--memory", "256M",
             "--workload", "alloc-free:200M:1000", "--reporting-delay-ms", "100"},
            dir.path + "/g.stderr");
  ASSERT_TRUE(g.wait_event("ready")) << g.stderr_text();
  int64_t peak = 0;
  ASSERT_TRUE(wait_event_sampling_peak(g, "workload_freed", &peak)) << g.stderr_text();
  EXPECT_GE(peak, 200 * MiB);
  int64_t now = peak;
  ASSERT_TRUE(eventually([&] {
    now = memfd_allocated_bytes(g.pid());
    return peak - now >= 190 * MiB;
  })) << g.stderr_text();
  const std::map<std::string, std::string> vm{{"vm", "verified"}};
  std::string m = fphd.scrape();
  EXPECT_GE(metric_sum(m, "fphd_reclaimed_bytes_total", vm), 190.0 * MiB) << m;
  EXPECT_LE(metric_sum(m, "fphd_reclaimed_bytes_total", vm),
            metric_sum(m, "fphd_discarded_bytes_total", vm));
  EXPECT_GE(metric_sum(m, "fphd_node_reclaimed_bytes_total"), 190.0 * MiB);
  // Sampled gauges catch up within a sampling period or two.
  ASSERT_TRUE(eventually([&] {
    m = fphd.scrape();
    const double resident = metric_sum(m, "fphd_guest_resident_bytes", vm);
    const auto kernel = static_cast<double>(memfd_allocated_bytes(g.pid()));
    return metric_sum(m, "fphd_vm_reclaim_state", {{"vm", "verified"}, {"state", "active"}}) == 1 &&
           resident > 0 && resident == kernel;
  })) << m;
  EXPECT_EQ(metric_sum(m, "fphd_vm_reclaim_state", vm), 1);
  EXPECT_GT(metric_sum(m, "fphd_vm_features", vm), 0);
  EXPECT_EQ(metric_sum(m, "fphd_vm_reclaim_disabled", vm), 0);
  EXPECT_GT(metric_sum(m, "fphd_node_memory_total_bytes"), 0);
  g.signal(SIGTERM);
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
}

// fph-guest --poison aaaaaaaa: every report is skipped as poisoned, nothing
// is reclaimed, the VM is disabled for reason poison. A guest without
// reporting is disabled for reason no_reporting.
TEST(Metrics, PoisonedAndNonReportingGuestsAreDisabledWithTheirReason) {
  TempDir dir;
  Fphd fphd(dir);
  Process p({guest_path(), "--connect", fphd.socket, "--name", "poisoned", "--memory", "128M",
             "--poison", "aaaaaaaa", "--workload", "alloc-free:64M:0", "--reporting-delay-ms", "100"},
            dir.path + "/p.stderr");
  Process n({guest_path(), "--connect", fphd.socket, "--name", "noreport", "--memory", "128M",
             "--no-reporting", "--workload", "alloc-free:64M:0"},
            dir.path + "/n.stderr");
  ASSERT_TRUE(p.wait_event("ready")) << p.stderr_text();
  ASSERT_TRUE(n.wait_event("ready")) << n.stderr_text();
  std::string m;
  ASSERT_TRUE(eventually([&] {
    m = fphd.scrape();
    return metric_sum(m, "fphd_skipped_bytes_total", {{"vm", "poisoned"}, {"reason", "poisoned"}}) >=
               60.0 * MiB &&
           metric_sum(m, "fphd_vm_reclaim_disabled", {{"vm", "poisoned"}, {"reason", "poison"}}) == 1 &&
           metric_sum(m, "fphd_vm_reclaim_disabled", {{"vm", "noreport"}, {"reason", "no_reporting"}}) == 1;
  })) << m << p.stderr_text();
  EXPECT_EQ(metric_sum(m, "fphd_vm_reclaim_state", {{"vm", "poisoned"}, {"state", "disabled"}}), 1);
  EXPECT_EQ(metric_sum(m, "fphd_vm_reclaim_state", {{"vm", "noreport"}, {"state", "disabled"}}), 1);
  EXPECT_EQ(metric_sum(m, "fphd_reclaimed_bytes_total", {{"vm", "poisoned"}}), 0);
  EXPECT_EQ(metric_sum(m, "fphd_discarded_bytes_total", {{"vm", "poisoned"}}), 0);
  EXPECT_EQ(metric_sum(m, "fphd_reported_bytes_total", {{"vm", "noreport"}}), 0);
  p.signal(SIGTERM);
  n.signal(SIGTERM);
  EXPECT_EQ(p.wait(), 0) << p.stderr_text();
  EXPECT_EQ(n.wait(), 0) << n.stderr_text();
}
