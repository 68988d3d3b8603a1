// Live migration between two real fphd processes: a test front end (playing
// the VMM) turns dirty logging on at the source while the guest reports,
// stops the ring, SAVEs the device state through a real pipe, and LOADs it
// into a second fphd; fphctl shows both sides. Failure paths: the
// destination refuses a corrupted blob and the source keeps reclaiming.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "../unit/daemon/front_end.h"
#include "client.h"
#include "fph/proto/device_state.h"
#include "harness.h"

using namespace fph;
using namespace fph::test;
using nlohmann::json;
namespace ts = fph::testing_support;
namespace vu = proto::vu;
namespace devstate = proto::devstate;

namespace {

struct Host {
  TempDir dir;
  std::string admin = dir.path + "/admin.sock";
  Fphd fphd{dir, {"--admin-socket", admin}};
  UniqueFd connect() const {
    UniqueFd s(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, fphd.socket.c_str(), sizeof a.sun_path - 1);
    EXPECT_EQ(::connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    return s;
  }
  json migration() const {
    auto c = ctl::AdminClient::connect(admin);
    if (!c) return {};
    auto r = c->execute("query-migration", json::object());
    return r && r->contains("return") ? (*r)["return"] : json();
  }
};

uint64_t reply_u64(ts::FrontEnd& fe) {
  auto m = fe.recv();
  EXPECT_TRUE(m.has_value());
  auto v = m ? vu::parse_u64(m->payload, "reply") : vu::parse_u64({}, "reply");
  return v ? *v : ~0ull;
}


uint64_t load(ts::FrontEnd& fe, std::span<const uint8_t> blob) {
  ts::Pipe p;
  EXPECT_TRUE(fe.send(vu::Request::SetDeviceStateFd, vu::encode_device_state({1, 0}), {p.r.get()}));
  EXPECT_EQ(reply_u64(fe), 0x100u);
  p.r.reset();
  EXPECT_EQ(write(p.w.get(), blob.data(), blob.size()), static_cast<ssize_t>(blob.size()));
  p.w.reset();
  return fe.get_u64(vu::Request::CheckDeviceState);
}

json find(const json& list) { return list.is_array() && !list.empty() ? list[0] : json(); }

}  // namespace

TEST(Migration, TwoFphdProcessesSaveLogAndLoad) {
  Host src, dst;
  // Source: a VM that reports while the VMM logs.
  ts::FrontEnd fe(src.connect());
  fe.handshake(ts::kFeatures);
  const uint64_t log_bytes = ts::kRam / 4096 / 8;
  UniqueFd log(memfd_create("dirty-log", MFD_CLOEXEC));
  ASSERT_EQ(ftruncate(log.get(), static_cast<off_t>(log_bytes)), 0);
  auto* bits = static_cast<uint8_t*>(mmap(nullptr, log_bytes, PROT_READ, MAP_SHARED, log.get(), 0));
  ASSERT_NE(bits, MAP_FAILED);
  ASSERT_TRUE(fe.send(vu::Request::SetLogBase, vu::encode_log({log_bytes, 0}), {log.get()}));
  ASSERT_EQ(reply_u64(fe), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetFeatures, vu::encode_u64(ts::kFeatures | vu::feature::kLogAll)), 0u);
  vu::VringAddr a{fe.reporting_index, vu::kVringFlagLog, ts::kUaddr, ts::kUaddr + 8192, ts::kUaddr + 4096, 8192};
  ASSERT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(a)), 0u);
  std::memset(fe.mem + 32 * ts::MiB, 0x5a, 8 * ts::MiB);
  const int64_t before = ts::blocks_bytes(fe.ram.get());
  fe.report({{32 * ts::MiB, 8 * ts::MiB, true}});
  EXPECT_GE(before - ts::blocks_bytes(fe.ram.get()), static_cast<int64_t>(8 * ts::MiB)) << "reclaim goes on while logging";
  const uint64_t first = 32 * ts::MiB / 4096, last = 40 * ts::MiB / 4096;
  for (uint64_t pg = first; pg < last; ++pg) ASSERT_TRUE(bits[pg / 8] & (1u << (pg % 8))) << pg;
  json m = find(src.migration());
  EXPECT_EQ(m["state"], "logging") << m.dump();
  EXPECT_GE(m["pages-marked"].get<uint64_t>(), 2048u);

  // Stop, SAVE.
  ASSERT_TRUE(fe.send(vu::Request::GetVringBase, vu::encode_vring_state({fe.reporting_index, 0})));
  auto base = fe.recv();
  ASSERT_TRUE(base);
  EXPECT_EQ(vu::parse_vring_state(base->payload)->num, 1u);
  ts::Pipe p;
  ASSERT_TRUE(fe.send(vu::Request::SetDeviceStateFd, vu::encode_device_state({0, 0}), {p.w.get()}));
  ASSERT_EQ(reply_u64(fe), 0x100u);
  p.w.reset();
  auto blob = ts::read_all(p.r.get());
  ASSERT_EQ(fe.get_u64(vu::Request::CheckDeviceState), 0u);
  ASSERT_TRUE(devstate::decode(blob)) << "the blob is fphd's own format";
  m = find(src.migration());
  EXPECT_EQ(m["state"], "saved");
  EXPECT_EQ(m["state-bytes-sent"].get<uint64_t>(), blob.size());

  // Destination: a corrupted copy is refused with the reason, the good one loads.
  ts::FrontEnd dfe(dst.connect());
  const uint64_t pf = dfe.get_u64(vu::Request::GetProtocolFeatures);
  ASSERT_TRUE(dfe.send(vu::Request::SetProtocolFeatures, vu::encode_u64(pf)));
  auto bad = blob;
  bad[bad.size() / 2] ^= 1;
  EXPECT_EQ(load(dfe, bad), 1u);
  json dm = find(dst.migration());
  EXPECT_EQ(dm["state"], "failed");
  EXPECT_NE(dm["last-error"].get<std::string>().find("checksum"), std::string::npos) << dm.dump();
  EXPECT_EQ(load(dfe, blob), 0u);
  dm = find(dst.migration());
  EXPECT_EQ(dm["state"], "loaded");
  EXPECT_EQ(dm["epoch"], 1);
  const std::string metrics = dst.fphd.scrape();
  EXPECT_EQ(metric_sum(metrics, "fphd_device_state_transfers_total", {{"outcome", "invalid"}}), 1.0);
  EXPECT_EQ(metric_sum(metrics, "fphd_device_state_transfers_total", {{"outcome", "ok"}}), 1.0);
  EXPECT_EQ(metric_sum(metrics, "fphd_vm_migration_state", {{"state", "loaded"}}), 1.0);
  EXPECT_GE(metric_sum(src.fphd.scrape(), "fphd_dirty_log_pages_total"), 2048.0);

  // fphctl shows it.
  Process ctl({FPH_FPHCTL_PATH, "-s", dst.admin, "migration"}, dst.dir.path + "/fphctl.stderr");
  EXPECT_EQ(ctl.wait(60s), 0);
  munmap(bits, log_bytes);
  src.fphd.proc->signal(SIGTERM);
  dst.fphd.proc->signal(SIGTERM);
  EXPECT_EQ(src.fphd.proc->wait(), 0) << src.fphd.proc->stderr_text();
  EXPECT_EQ(dst.fphd.proc->wait(), 0) << dst.fphd.proc->stderr_text();
}

namespace {
// The guest's RAM memfd, opened through /proc (a second file description of
// the same memory, as a VMM or a migration would hold it).
UniqueFd open_guest_ram(pid_t pid) {
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd/";
  for (int fd = 0; fd < 1024; ++fd) {
    char target[256];
    const ssize_t n = readlink((dir + std::to_string(fd)).c_str(), target, sizeof target - 1);
    if (n <= 0) continue;
    target[n] = 0;
    if (std::string(target).find("memfd:fph-guest-ram") != std::string::npos)
      return UniqueFd(open((dir + std::to_string(fd)).c_str(), O_RDWR | O_CLOEXEC));
  }
  return UniqueFd();
}
}  // namespace

// What the epoch is for. After a migration the destination can hold pages
// the guest had long reported (the VMM sent them, often as zero pages); the
// guest never reports a block twice, so they stay. Here the host side
// repopulates the guest's free memory the same way (fallocate allocates
// every hole of the RAM memfd without changing a byte the guest wrote):
// without a new epoch the backing stays up, after `fphctl re-report` the
// guest reports its free memory again and the backing falls back to its
// working set (kernel-measured), with no byte of it corrupted.
TEST(Migration, ANewEpochMakesTheGuestReportWhatTheHostRepopulated) {
  Host h;
  Process g({guest_path(), "--connect", h.fphd.socket, "--name", "epoch-vm", "--memory", "256M", "--resident",
             "16M", "--reporting-delay-ms", "200", "--workload", "alloc-free:128M:500"},
            h.dir.path + "/g.stderr");
  auto ready = g.wait_event("ready");
  ASSERT_TRUE(ready) << g.stderr_text();
  ASSERT_TRUE(g.wait_event("workload_freed")) << g.stderr_text();
  // Reported and discarded: the backing is the working set plus change.
  ASSERT_TRUE(eventually([&] { return memfd_allocated_bytes(g.pid()) <= 48 * static_cast<int64_t>(ts::MiB); }))
      << g.stderr_text();
  UniqueFd ram = open_guest_ram(g.pid());
  ASSERT_TRUE(ram);
  ASSERT_EQ(fallocate(ram.get(), 0, 0, 256 * ts::MiB), 0) << strerror(errno);
  const int64_t repopulated = memfd_allocated_bytes(g.pid());
  EXPECT_GE(repopulated, static_cast<int64_t>(250 * ts::MiB));
  // Without a new epoch nothing brings it back: every free block is marked
  // reported. (Several reporting delays pass; the check is that nothing
  // changes, not how fast anything happens.)
  std::this_thread::sleep_for(std::chrono::seconds(2));
  EXPECT_GE(memfd_allocated_bytes(g.pid()), repopulated - static_cast<int64_t>(4 * ts::MiB));

  Process ctl({FPH_FPHCTL_PATH, "-s", h.admin, "--json", "re-report", "epoch-vm"}, h.dir.path + "/ctl.stderr");
  ASSERT_EQ(ctl.wait(60s), 0) << ctl.stderr_text();
  auto ev = g.wait_event("epoch_changed");
  ASSERT_TRUE(ev) << g.stderr_text();
  EXPECT_EQ((*ev)["to"], 1);
  EXPECT_GE((*ev)["forgotten_bytes"].get<int64_t>(), static_cast<int64_t>(200 * ts::MiB));
  EXPECT_TRUE(eventually([&] { return memfd_allocated_bytes(g.pid()) <= 48 * static_cast<int64_t>(ts::MiB); }))
      << memfd_allocated_bytes(g.pid()) << "\n" << g.stderr_text();
  g.signal(SIGTERM);
  auto sum = g.wait_event("summary");
  ASSERT_TRUE(sum) << g.stderr_text();
  EXPECT_EQ((*sum)["corrupted_bytes"], 0);
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
}

namespace {
// fph-guest migrating from `src` to `dst` while its workload runs: 32 MiB
// working set, 128 MiB allocated, held 3 s and freed (reported and
// discarded by the source) during an 8 s precopy that started while it was
// allocated, so the destination receives those pages first with data and
// then, from the source's dirty log, as zero pages.
Process migrating_guest(const Host& src, const Host& dst, const std::string& name,
                        std::vector<std::string> extra) {
  std::vector<std::string> argv{guest_path(), "--connect", src.fphd.socket, "--name", name,
                                "--memory", "256M", "--resident", "32M",
                                "--workload", "alloc-free:128M:3000", "--reporting-delay-ms", "100",
                                "--epoch-poll-ms", "200", "--require-discard",
                                "--migrate-to", dst.fphd.socket, "--migrate-after-ms", "500",
                                "--migrate-min-precopy-ms", "8000"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return Process(argv, src.dir.path + "/" + name + ".stderr");
}

// The guest freed (and its source reported and discarded) before the
// switch: otherwise this run cannot show what the epoch is for.
void expect_freed_during_precopy(Process& g, const json& migrated) {
  bool freed_first = false;
  for (const auto& e : g.events()) {
    if (e.value("event", "") == "workload_freed") freed_first = true;
    if (e.value("event", "") == "migrated") break;
  }
  EXPECT_TRUE(freed_first) << "the workload freed after the switch; precopy too short on this "
                              "machine?\n" << g.stderr_text();
  EXPECT_GE(migrated["zero_pages_written"].get<uint64_t>() * 4096, 120 * ts::MiB) << migrated.dump();
}
}  // namespace

// The whole migration with real processes: fph-guest (playing guest and
// VMM) moves from one fphd to another while its workload allocates, frees
// and reports. Three VMs at once on the same pair of daemons:
//  - "epoch": zero mismatched pages between the destination and the source
//    at the switch (every page, compared byte for byte), and after the
//    epoch bump its destination backing falls to the working set;
//  - "no-epoch" (--no-epoch, like any driver that does not know the bit):
//    the destination keeps holding what the source had discarded;
//  - "no-log" (--migrate-ignore-device-log): the VMM ignores what fphd
//    logged; the comparison finds the discarded pages, proof that the
//    check can fail and that the discards are in the log.
TEST(Migration, AGuestMigratesBetweenTwoFphdWhileItWorksAndTheEpochGivesBackWhatTheDestinationHolds) {
  Host src, dst;
  Process with_epoch = migrating_guest(src, dst, "epoch", {});
  Process no_epoch = migrating_guest(src, dst, "no-epoch", {"--no-epoch"});
  Process no_log = migrating_guest(src, dst, "no-log", {"--migrate-ignore-device-log"});

  // The driver reads the bumped epoch during the switch, before the
  // migration thread reports: epoch_changed comes first.
  auto ev = with_epoch.wait_event("epoch_changed", 120s);
  ASSERT_TRUE(ev) << with_epoch.stderr_text();
  EXPECT_EQ((*ev)["to"], 1);
  auto m = with_epoch.wait_event("migrated");
  ASSERT_TRUE(m) << with_epoch.stderr_text();
  EXPECT_EQ((*m)["mismatched_pages"], 0) << m->dump();
  EXPECT_GE((*m)["device_dirty_pages"].get<uint64_t>() * 4096, 120 * ts::MiB)
      << "the source logged what it discarded during precopy: " << m->dump();
  EXPECT_GE((*m)["blob_bytes"].get<uint64_t>(), 32u);
  expect_freed_during_precopy(with_epoch, *m);
  auto m2 = no_epoch.wait_event("migrated", 120s);
  ASSERT_TRUE(m2) << no_epoch.stderr_text();
  EXPECT_EQ((*m2)["mismatched_pages"], 0) << m2->dump();
  expect_freed_during_precopy(no_epoch, *m2);
  auto m3 = no_log.wait_event("migrated", 120s);
  ASSERT_TRUE(m3) << no_log.stderr_text();
  EXPECT_GE((*m3)["mismatched_pages"].get<uint64_t>() * 4096, 120 * ts::MiB) << m3->dump();

  // Epoch: the destination's LOAD bumped it, the guest reports all its free
  // memory again, and the destination's fphd discards it: the backing (the
  // destination's memfd now, kernel-measured) falls to the working set.
  EXPECT_TRUE(eventually([&] { return memfd_allocated_bytes(with_epoch.pid()) <= 48 * static_cast<int64_t>(ts::MiB); }))
      << memfd_allocated_bytes(with_epoch.pid()) << "\n" << with_epoch.stderr_text();
  EXPECT_GT(metric_sum(dst.fphd.scrape(), "fphd_reclaimed_bytes_total", {{"vm", "epoch"}}),
            100.0 * ts::MiB) << "reclaim continues on the destination";
  // No epoch: the same pages stay backed on the destination (several polls
  // and reporting delays later; the check is that nothing changes).
  std::this_thread::sleep_for(std::chrono::seconds(2));
  EXPECT_GE(memfd_allocated_bytes(no_epoch.pid()), 128 * static_cast<int64_t>(ts::MiB))
      << no_epoch.stderr_text();

  const json on_dst = dst.migration();
  ASSERT_TRUE(on_dst.is_array()) << on_dst.dump();
  EXPECT_EQ(on_dst.size(), 3u) << on_dst.dump();
  for (const auto& vm : on_dst) EXPECT_EQ(vm.value("state", ""), "loaded") << on_dst.dump();

  for (Process* g : {&with_epoch, &no_epoch, &no_log}) g->signal(SIGTERM);
  auto sum = with_epoch.wait_event("summary");
  ASSERT_TRUE(sum) << with_epoch.stderr_text();
  EXPECT_EQ((*sum)["corrupted_bytes"], 0);
  EXPECT_EQ((*sum)["reported_nonzero_bytes"], 0);
  EXPECT_EQ(with_epoch.wait(), 0) << with_epoch.stderr_text();
  EXPECT_EQ(no_epoch.wait(), 0) << no_epoch.stderr_text();
  EXPECT_EQ(no_log.wait(), 3) << "mismatched pages make fph-guest exit 3\n" << no_log.stderr_text();
}

// The destination fphd dies in the middle of the migration (after the
// source logged and precopy copied): the guest stays on the source, which
// keeps serving it: logging off, rings restarted, reports discarded.
TEST(Migration, TheDestinationDyingDuringPrecopyLeavesTheGuestReclaimingOnTheSource) {
  Host src, dst;
  Process g({guest_path(), "--connect", src.fphd.socket, "--name", "stays", "--memory", "256M",
             "--resident", "16M", "--workload", "alloc-free:128M:4000", "--reporting-delay-ms",
             "100", "--require-discard", "--migrate-to", dst.fphd.socket, "--migrate-after-ms",
             "200", "--migrate-min-precopy-ms", "60000"},
            src.dir.path + "/g.stderr");
  ASSERT_TRUE(g.wait_event("migration_started")) << g.stderr_text();
  ASSERT_TRUE(eventually([&] { return find(src.migration()).value("state", "") == "logging"; }))
      << find(src.migration()).dump();
  dst.fphd.proc->signal(SIGKILL);
  (void)dst.fphd.proc->wait();
  auto failed = g.wait_event("migration_failed", 120s);
  ASSERT_TRUE(failed) << g.stderr_text();
  EXPECT_NE((*failed)["error"].get<std::string>().find("destination"), std::string::npos) << failed->dump();
  ASSERT_TRUE(g.wait_event("workload_freed")) << g.stderr_text();
  EXPECT_TRUE(eventually([&] { return memfd_allocated_bytes(g.pid()) <= 40 * static_cast<int64_t>(ts::MiB); }))
      << "the source keeps reclaiming\n" << g.stderr_text();
  EXPECT_EQ(find(src.migration()).value("state", ""), "none");
  g.signal(SIGTERM);
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
}

// The destination hangs at the worst moment: the source has stopped its
// rings and SAVEd, the vCPUs are paused, and the LOAD gets no answer. After
// the reply timeout the guest resumes on the source (rings restarted at the
// indices they stopped at, logging off), which keeps reclaiming for it.
TEST(Migration, TheDestinationHangingAtLoadLeavesTheGuestReclaimingOnTheSource) {
  Host src, dst;
  Process g({guest_path(), "--connect", src.fphd.socket, "--name", "stays", "--memory", "256M",
             "--resident", "16M", "--workload", "alloc-free:128M:15000", "--reporting-delay-ms",
             "100", "--require-discard", "--migrate-to", dst.fphd.socket, "--migrate-after-ms",
             "200", "--migrate-min-precopy-ms", "5000", "--migrate-reply-timeout-ms", "3000"},
            src.dir.path + "/g.stderr");
  ASSERT_TRUE(g.wait_event("migration_started")) << g.stderr_text();
  ASSERT_TRUE(eventually([&] { return find(src.migration()).value("state", "") == "logging"; }))
      << find(src.migration()).dump();
  dst.fphd.proc->signal(SIGSTOP);
  auto failed = g.wait_event("migration_failed", 120s);
  dst.fphd.proc->signal(SIGKILL);
  (void)dst.fphd.proc->wait();
  ASSERT_TRUE(failed) << g.stderr_text();
  EXPECT_NE((*failed)["error"].get<std::string>().find("LOAD"), std::string::npos) << failed->dump();
  EXPECT_TRUE((*failed)["rolled_back"].get<bool>()) << failed->dump();
  EXPECT_GT((*failed)["blob_bytes"].get<uint64_t>(), 0u) << "the source had SAVEd: " << failed->dump();
  EXPECT_NE(find(src.migration()).value("state", ""), "logging");
  ASSERT_TRUE(g.wait_event("workload_freed", 120s)) << g.stderr_text();
  EXPECT_TRUE(eventually([&] { return memfd_allocated_bytes(g.pid()) <= 40 * static_cast<int64_t>(ts::MiB); }))
      << "the source keeps reclaiming\n" << g.stderr_text();
  g.signal(SIGTERM);
  auto sum = g.wait_event("summary");
  ASSERT_TRUE(sum) << g.stderr_text();
  EXPECT_EQ((*sum)["corrupted_bytes"], 0);
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
}
