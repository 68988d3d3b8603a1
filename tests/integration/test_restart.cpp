// Restart without loss, and configuration: a daemon restart in the middle
// of a workload loses no block and discards nothing unsafely; the TOML file
// is validated at start and reloaded on SIGHUP (a bad file changes nothing).
#include <gtest/gtest.h>
#include <signal.h>

#include <fstream>
#include <iostream>

#include "client.h"
#include "harness.h"

using namespace fph;
using namespace fph::test;
using nlohmann::json;

namespace {

constexpr int64_t MiB = 1 << 20;

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

json nodes(const std::string& admin) {
  auto c = ctl::AdminClient::connect(admin);
  if (!c) return {};
  auto r = c->execute("query-nodes");
  return r ? r->value("return", json()) : json();
}

}  // namespace

// fph-guest --reconnect churns (random allocations and frees, reporting all
// along) with --require-discard: every reported block must read back as zero
// when the guest reallocates it, so a block returned undiscarded, or
// discarded after the guest reused it, would be caught. The first fphd is
// rate limited so that requests are queued when it gets SIGTERM; it drains
// (completes and returns every taken request) and exits 0; a new fphd comes
// up on the same socket, the guest reconnects, re-sends what it still holds
// isolated, and reclaim resumes, as measured from the kernel.
TEST(Restart, DaemonRestartMidWorkloadLosesNothing) {
  TempDir dir;
  // --backoff off: every reported block must be discarded (--require-discard).
  auto fphd = std::make_unique<Fphd>(dir, std::vector<std::string>{"--rate-limit", "33554432", "--backoff", "off"});
  Process g({guest_path(), "--connect", fphd->socket, "--name", "rs", "--memory", "256M", "--resident", "16M",
             "--reporting-delay-ms", "100", "--workload", "churn:128M:15", "--require-discard", "--reconnect"},
            dir.path + "/rs.stderr");
  ASSERT_TRUE(g.wait_event("ready")) << g.stderr_text();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(g.wait_event("report_done")) << g.stderr_text();
  fphd->proc->signal(SIGTERM);
  EXPECT_EQ(fphd->proc->wait(), 0) << fphd->proc->stderr_text();
  const std::string old_log = fphd->proc->stderr_text();
  fphd = std::make_unique<Fphd>(dir, std::vector<std::string>{"--backoff", "off"});
  ASSERT_TRUE(g.wait_event("reconnected")) << g.stderr_text();
  const int64_t at_reconnect = memfd_allocated_bytes(g.pid());

  // The churn ends by freeing everything; the new daemon must then drop the
  // backing to about the resident set.
  ASSERT_TRUE(g.wait_event("workload_freed")) << g.stderr_text();
  int64_t now = 0;
  EXPECT_TRUE(eventually([&] {
    now = memfd_allocated_bytes(g.pid());
    return now >= 0 && now <= 48 * MiB;
  })) << "backing " << now / MiB << " MiB (at reconnect " << at_reconnect / MiB << " MiB)\n"
      << g.stderr_text();
  EXPECT_GT(metric_sum(fphd->scrape(), "fphd_discarded_bytes_total", {{"vm", "rs"}}), 0.0);

  g.signal(SIGTERM);
  auto s = g.wait_event("summary");
  ASSERT_TRUE(s) << g.stderr_text();
  EXPECT_EQ((*s)["corrupted_bytes"], 0);
  EXPECT_EQ((*s)["reported_nonzero_bytes"], 0);
  EXPECT_GT((*s)["reported_bytes_checked"].get<int64_t>(), 0);
  EXPECT_GE((*s)["reconnects"].get<int>(), 1);
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
  fphd->proc->signal(SIGTERM);
  EXPECT_EQ(fphd->proc->wait(), 0) << fphd->proc->stderr_text();
  EXPECT_NE(old_log.find("draining"), std::string::npos) << old_log;
  std::cout << "in flight at the restart, per the guest: "
            << (g.stderr_text().find("reconnecting (0 request") == std::string::npos ? "some" : "none") << "\n";
}

TEST(Config, BadFileRefusedAtStartWithKeyAndLine) {
  TempDir dir;
  const std::string cfg = dir.path + "/bad.toml";
  write_file(cfg, "[daemon]\nlisten = [\"" + dir.path + "/x.sock\"]\n[policy]\nmode = \"fastest\"\n");
  Process p({fphd_path(), "--config", cfg, "--metrics", "off"}, dir.path + "/fphd.stderr");
  EXPECT_EQ(p.wait(60s), 2);
  EXPECT_NE(p.stderr_text().find(cfg + ":4: policy.mode: 'fastest' is not one of"), std::string::npos)
      << p.stderr_text();
  EXPECT_NE(access((dir.path + "/x.sock").c_str(), F_OK), 0) << "started anyway";
  write_file(cfg, "[daemon]\nlisten = [\"/x.sock\"]\nlisten_here = 1\n");
  Process q({fphd_path(), "--config", cfg, "--check-config"}, dir.path + "/check.stderr");
  EXPECT_EQ(q.wait(60s), 2);
  EXPECT_NE(q.stderr_text().find(":3: daemon.listen_here: unknown key"), std::string::npos) << q.stderr_text();
}

TEST(Config, FileFlagsAndSighupReload) {
  TempDir dir;
  const std::string cfg = dir.path + "/fphd.toml";
  const std::string admin = dir.path + "/admin.sock";
  write_file(cfg, "[daemon]\nadmin_socket = \"" + admin +
                      "\"\nsynthetic_topology = \"node:2 core:1 pu:1\"\n[policy]\nmode = \"lazy\"\n");
  // --listen and --metrics come from the command line (the harness), the
  // rest from the file.
  Fphd fphd(dir, {"--config", cfg});
  auto n = nodes(admin);
  ASSERT_EQ(n.size(), 2u) << fphd.proc->stderr_text();
  EXPECT_EQ(n[0]["policy"]["mode"], "lazy");
  EXPECT_EQ(n[1]["policy"]["mode"], "lazy");

  write_file(cfg, "[daemon]\nadmin_socket = \"" + admin +
                      "\"\nsynthetic_topology = \"node:2 core:1 pu:1\"\n[policy]\nmode = \"eager\"\n"
                      "[policy.node.1]\nrate_limit = 4194304\n");
  fphd.proc->signal(SIGHUP);
  EXPECT_TRUE(eventually([&] {
    auto v = nodes(admin);
    return v.size() == 2 && v[0]["policy"]["mode"] == "eager" && v[1]["policy"]["rate-limit"] == 4194304;
  }, 60s)) << fphd.proc->stderr_text();

  // A bad file on reload: logged, nothing changes, the daemon keeps running.
  const json before = nodes(admin);
  write_file(cfg, "[policy]\nmode = \"eager\"\nrate_limit = \"lots\"\n");
  fphd.proc->signal(SIGHUP);
  EXPECT_TRUE(eventually([&] { return fphd.proc->stderr_text().find("reload refused") != std::string::npos; }, 60s));
  EXPECT_NE(fphd.proc->stderr_text().find(":3: policy.rate_limit: must be an integer"), std::string::npos)
      << fphd.proc->stderr_text();
  const json after = nodes(admin);
  ASSERT_EQ(after.size(), 2u);
  EXPECT_EQ(after[0]["policy"], before[0]["policy"]);
  EXPECT_EQ(after[1]["policy"], before[1]["policy"]);
  EXPECT_TRUE(fphd.proc->running());
  fphd.proc->signal(SIGTERM);
  EXPECT_EQ(fphd.proc->wait(), 0) << fphd.proc->stderr_text();
}
