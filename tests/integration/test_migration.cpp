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
