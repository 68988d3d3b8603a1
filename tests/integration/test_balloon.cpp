// Balloon inflate/deflate end to end: real fphd, real fph-guest processes,
// the target set through fphd's admin socket (set-num-pages), the guest's
// memory measured from the kernel (memfd st_blocks through /proc/PID/fd).
//  - inflate: the guest's `actual` reaches the target (its events and fphd's
//    query-sessions agree) and the host backing falls by at least the
//    inflated amount; deflate to 0: actual 0 and the workload can use the
//    whole memory again; no corrupted byte;
//  - DEFLATE_ON_OOM: with a target that leaves the workload short, the guest
//    deflates by itself (only when fphd offers feature bit 2), and without
//    the feature (--no-deflate-on-oom) it does not.
#include <gtest/gtest.h>
#include <signal.h>

#include <string>
#include <vector>

#include "admin_call.h"
#include "harness.h"

using namespace fph;
using namespace fph::test;
using nlohmann::json;

namespace {

constexpr int64_t MiB = 1 << 20;
constexpr uint64_t kDeflateOnOomBit = 1ull << 2;

struct Daemon {
  TempDir dir;
  std::string admin;
  std::unique_ptr<Fphd> fphd;
  Daemon() {
    admin = dir.path + "/admin.sock";
    fphd = std::make_unique<Fphd>(dir, std::vector<std::string>{"--admin-socket", admin});
  }
  json call(const std::string& cmd, const json& args = json::object()) {
    const json r = admin_reply(admin, cmd, args);
    if (r.is_null()) return {};
    EXPECT_TRUE(r.contains("return")) << cmd << " " << args.dump() << " -> " << r.dump();
    return r.value("return", json());
  }
  void set_num_pages(const std::string& vm, uint64_t pages) {
    const json r = call("set-num-pages", {{"vm", vm}, {"pages", pages}});
    EXPECT_EQ(r.value("num-pages", uint64_t{0}), pages) << r.dump();
  }
  // fphd's view of the VM: config num_pages and what the driver wrote in actual.
  json session(const std::string& vm) {
    for (const auto& s : call("query-sessions"))
      if (s["name"] == vm) return s;
    return json::object();
  }
};

std::unique_ptr<Process> start_guest(Daemon& d, const std::string& name,
                                     std::vector<std::string> extra) {
  std::vector<std::string> a{guest_path(), "--connect", d.fphd->socket, "--name", name,
                             "--memory", "128M", "--balloon-poll-ms", "100",
                             "--reporting-delay-ms", "200", "--workload-on-signal"};
  a.insert(a.end(), extra.begin(), extra.end());
  return std::make_unique<Process>(a, d.dir.path + "/" + name + ".stderr");
}

// The next `balloon` event with this reason (and actual, if given).
std::optional<json> wait_balloon(Process& g, const std::string& reason,
                                 std::optional<uint64_t> actual = std::nullopt) {
  while (auto e = g.wait_event("balloon")) {
    if ((*e)["reason"] == reason && (!actual || (*e)["actual"].get<uint64_t>() == *actual))
      return e;
  }
  return std::nullopt;
}

json stop(Process& g) {
  g.signal(SIGTERM);
  auto s = g.wait_event("summary");
  EXPECT_TRUE(s.has_value()) << g.stderr_text();
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
  return s.value_or(json::object());
}

}  // namespace

// Memory written by the workload and freed (reporting off, so only the
// balloon gives it back): inflating 64 MiB drops at least 64 MiB of the
// memfd's backing; deflating to 0 lets the workload allocate and write all
// of it again.
TEST(Balloon, InflateReleasesHostMemoryAndDeflateGivesItBack) {
  Daemon d;
  auto g = start_guest(d, "bal", {"--no-reporting", "--workload", "alloc-free:128M:0",
                                  "--repeat", "2"});
  auto ready = g->wait_event("ready");
  ASSERT_TRUE(ready) << g->stderr_text();
  ASSERT_EQ((*ready)["balloon"], true) << ready->dump();
  // Run 1: write all guest RAM (what it can allocate) and free it.
  g->signal(SIGUSR1);
  auto freed1 = g->wait_event("workload_freed");
  ASSERT_TRUE(freed1) << g->stderr_text();
  const int64_t bytes1 = (*freed1)["bytes"].get<int64_t>();
  EXPECT_GE(bytes1, 120 * MiB);
  const int64_t peak = memfd_allocated_bytes(g->pid());
  ASSERT_GE(peak, bytes1) << "the kernel must hold what the workload wrote";

  // Inflate to 64 MiB.
  constexpr uint64_t kPages = 16384;
  d.set_num_pages("bal", kPages);
  auto reached = wait_balloon(*g, "reached", kPages);
  ASSERT_TRUE(reached) << g->stderr_text();
  EXPECT_EQ((*reached)["target"], kPages);
  EXPECT_EQ((*reached)["inflated_pages"], kPages);
  // fphd saw the driver's SET_CONFIG(actual).
  EXPECT_TRUE(eventually([&] { return d.session("bal").value("actual", uint64_t{0}) == kPages; }))
      << d.session("bal").dump();
  EXPECT_EQ(d.session("bal")["num-pages"], kPages);
  // The host dropped the backing of every inflated page.
  int64_t now = peak;
  EXPECT_TRUE(eventually([&] {
    now = memfd_allocated_bytes(g->pid());
    return now >= 0 && peak - now >= static_cast<int64_t>(kPages * 4096);
  })) << "backing " << now / MiB << " MiB, peak " << peak / MiB << " MiB";

  // Deflate fully.
  d.set_num_pages("bal", 0);
  auto empty = wait_balloon(*g, "reached", 0);
  ASSERT_TRUE(empty) << g->stderr_text();
  EXPECT_EQ((*empty)["deflated_pages"], kPages);
  EXPECT_TRUE(eventually([&] { return d.session("bal").value("actual", uint64_t{1}) == 0; }))
      << d.session("bal").dump();

  // Run 2: the workload gets (and writes) as much memory as before the
  // balloon took any, and the kernel holds it again.
  g->signal(SIGUSR1);
  auto freed2 = g->wait_event("workload_freed");
  ASSERT_TRUE(freed2) << g->stderr_text();
  EXPECT_EQ((*freed2)["bytes"].get<int64_t>(), bytes1);
  EXPECT_GE(memfd_allocated_bytes(g->pid()), bytes1);

  const json sum = stop(*g);
  EXPECT_EQ(sum["corrupted_bytes"], 0);
  EXPECT_EQ(sum["balloon"]["actual"], 0);
  EXPECT_EQ(sum["balloon"]["inflated_pages"], kPages);
  EXPECT_EQ(sum["balloon"]["deflated_pages"], kPages);
  EXPECT_EQ(sum["balloon"]["oom_deflated_pages"], 0);
  EXPECT_GT(sum["verified_bytes"].get<int64_t>(), 0);
}

// 96 MiB in the balloon of a 128 MiB guest, then a workload that needs
// 96 MiB: with DEFLATE_ON_OOM the guest deflates by itself, the workload
// gets all of it and fphd sees actual drop; reporting runs meanwhile.
TEST(Balloon, DeflatesOnOomWhenTheWorkloadNeedsTheMemory) {
  Daemon d;
  auto g = start_guest(d, "oom", {"--workload", "alloc-free:96M:0"});
  auto ready = g->wait_event("ready");
  ASSERT_TRUE(ready) << g->stderr_text();
  if (!((*ready)["device_features"].get<uint64_t>() & kDeflateOnOomBit)) {
    stop(*g);
    GTEST_SKIP() << "fphd does not offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (feature bit 2) yet: "
                    "device features "
                 << (*ready)["device_features"];
  }
  ASSERT_EQ((*ready)["deflate_on_oom"], true) << ready->dump();
  constexpr uint64_t kPages = 24576;  // 96 MiB
  d.set_num_pages("oom", kPages);
  ASSERT_TRUE(wait_balloon(*g, "reached", kPages)) << g->stderr_text();
  g->signal(SIGUSR1);
  auto oom = wait_balloon(*g, "oom");
  ASSERT_TRUE(oom) << g->stderr_text();
  EXPECT_LT((*oom)["actual"].get<uint64_t>(), kPages);
  auto done = g->wait_event("workload_done");
  ASSERT_TRUE(done) << g->stderr_text();
  EXPECT_EQ((*done)["alloc_shortfall_bytes"], 0) << "the balloon should have given the memory back";
  // The deflations ran inside the workload's allocations: all done by now.
  const json s = d.session("oom");
  ASSERT_TRUE(s.is_object());
  const uint64_t fphd_actual = s.value("actual", uint64_t{0});
  const json sum = stop(*g);
  const uint64_t actual = sum["balloon"]["actual"].get<uint64_t>();
  EXPECT_LT(actual, kPages);
  EXPECT_GT(sum["balloon"]["oom_deflated_pages"].get<uint64_t>(), 0u);
  EXPECT_EQ(sum["balloon"]["oom_deflated_pages"].get<uint64_t>(), kPages - actual);
  EXPECT_EQ(sum["corrupted_bytes"], 0);
  EXPECT_EQ(sum["reported_nonzero_bytes"], 0);
  // fphd has the last actual the driver wrote.
  EXPECT_EQ(fphd_actual, actual) << s.dump();
}

// The negative control: declined (--no-deflate-on-oom), the balloon keeps
// its pages and the workload runs short.
TEST(Balloon, WithoutDeflateOnOomTheBalloonKeepsItsPages) {
  Daemon d;
  auto g = start_guest(d, "keep", {"--workload", "alloc-free:96M:0", "--no-deflate-on-oom"});
  auto ready = g->wait_event("ready");
  ASSERT_TRUE(ready) << g->stderr_text();
  EXPECT_EQ((*ready)["deflate_on_oom"], false);
  EXPECT_EQ((*ready)["features"].get<uint64_t>() & kDeflateOnOomBit, 0u);
  constexpr uint64_t kPages = 24576;
  d.set_num_pages("keep", kPages);
  ASSERT_TRUE(wait_balloon(*g, "reached", kPages)) << g->stderr_text();
  g->signal(SIGUSR1);
  auto done = g->wait_event("workload_done");
  ASSERT_TRUE(done) << g->stderr_text();
  EXPECT_GT((*done)["alloc_shortfall_bytes"].get<int64_t>(), 0);
  const json s = d.session("keep");
  ASSERT_TRUE(s.is_object());
  EXPECT_EQ(s.value("actual", uint64_t{0}), kPages) << s.dump();
  const json sum = stop(*g);
  EXPECT_EQ(sum["balloon"]["actual"], kPages);
  EXPECT_EQ(sum["balloon"]["oom_deflated_pages"], 0);
  EXPECT_EQ(sum["corrupted_bytes"], 0);
}
