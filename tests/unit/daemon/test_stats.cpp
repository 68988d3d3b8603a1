// The stats queue (VIRTIO_BALLOON_F_STATS_VQ) of a real Session, driven over
// a socketpair by the in-test front end of session_fixture.h plus a stats
// ring driven the way Linux virtio_balloon.c drives it: one device-readable
// buffer of {le16 tag; le64 val} entries, added at init and again each time
// the device returns it.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "fph/daemon/config.h"
#include "fph/daemon/stats_service.h"
#include "fph/proto/balloon_stats.h"
#include "session_fixture.h"

using namespace fph;
using namespace fph::daemon;
using namespace fph::testing_support;
using namespace std::chrono_literals;
using proto::balloon::StatTag;

namespace {

// Stats ring and buffer inside the fixture's guest RAM, after the reporting
// ring (0, 4 KiB, 8 KiB).
constexpr uint64_t kStatsDesc = 16 << 10;
constexpr uint64_t kStatsAvail = 20 << 10;
constexpr uint64_t kStatsUsed = 24 << 10;
constexpr uint64_t kStatsBuf = 28 << 10;
constexpr uint64_t kStatsFeatures = kFeatures | balloon::kFStatsVq;

struct StatsRing {
  FrontEnd& fe;
  uint32_t index = 0;
  UniqueFd kick{eventfd(0, EFD_CLOEXEC)};
  UniqueFd call{eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  vq::DriverRing ring;

  explicit StatsRing(FrontEnd& f) : fe(f) {}

  void setup() {
    index = static_cast<uint32_t>(balloon::queue_layout(kStatsFeatures).stats);
    ASSERT_EQ(index, 2u);  // dense: inflate, deflate, stats, reporting
    const uint16_t num = 8;
    ring = vq::DriverRing(num, fe.mem + kStatsDesc, fe.mem + kStatsAvail, fe.mem + kStatsUsed);
    ASSERT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({index, num})), 0u);
    ASSERT_EQ(fe.acked(vu::Request::SetVringBase, vu::encode_vring_state({index, 0})), 0u);
    vu::VringAddr a{index, 0, kUaddr + kStatsDesc, kUaddr + kStatsUsed, kUaddr + kStatsAvail, 0};
    ASSERT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(a)), 0u);
    ASSERT_EQ(fe.acked(vu::Request::SetVringKick, vu::encode_u64(index), {kick.get()}), 0u);
    ASSERT_EQ(fe.acked(vu::Request::SetVringCall, vu::encode_u64(index), {call.get()}), 0u);
    ASSERT_EQ(fe.acked(vu::Request::SetVringEnable, vu::encode_vring_state({index, 1})), 0u);
  }
  // Writes `bytes` into the stats buffer, adds it and kicks.
  void post_bytes(const std::vector<uint8_t>& bytes, bool writable = false) {
    std::memcpy(fe.mem + kStatsBuf, bytes.data(), bytes.size());
    vq::Buffer b{kStatsBuf, static_cast<uint32_t>(bytes.size()), writable};
    ASSERT_TRUE(ring.add_chain(std::span<const vq::Buffer>(&b, 1)).has_value());
    uint64_t one = 1;
    ASSERT_EQ(write(kick.get(), &one, 8), 8);
  }
  void post(uint64_t free_bytes, uint64_t total = kRam, uint64_t majflt = 3) {
    proto::balloon::Stats s;
    s.set(StatTag::SwapIn, 0);
    s.set(StatTag::SwapOut, 0);
    s.set(StatTag::MajorFaults, majflt);
    s.set(StatTag::MinorFaults, 1000);
    s.set(StatTag::MemFree, free_bytes);
    s.set(StatTag::MemTotal, total);
    s.set(StatTag::Available, free_bytes + (1 << 20));
    s.set(StatTag::Caches, 1 << 20);
    s.set(StatTag::HugetlbAllocs, 0);
    s.set(StatTag::HugetlbFails, 0);
    post_bytes(proto::balloon::encode_stats(s));
  }
  // The device returned the buffer (a stats request), within `limit`.
  std::optional<vq::UsedElem> wait_used(std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    for (;;) {
      if (auto u = ring.pop_used()) return u;
      if (std::chrono::steady_clock::now() >= end) return std::nullopt;
      pollfd p{call.get(), POLLIN, 0};
      poll(&p, 1, 20);
      uint64_t v;
      (void)!read(call.get(), &v, 8);
    }
  }
};

// A VM with the stats queue negotiated and its ring set up; the daemon asks
// for stats every `interval`.
struct StatsVm {
  Pair sp;
  Daemon d;
  FrontEnd fe;
  StatsRing st{fe};
  StatsVm(std::string name, std::chrono::milliseconds interval)
      : d(std::move(sp.a), std::move(name)), fe(std::move(sp.b)) {
    d.ctx.stats_interval = interval;  // before the handshake: it decides whether STATS_VQ is offered
    fe.handshake(kStatsFeatures);
    st.setup();
  }
};

template <class F>
bool eventually(F f, std::chrono::milliseconds limit = 20s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (f()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return f();
}

// A reply on the front end's socket within `limit` (GET_VRING_BASE must not
// hang on the held stats buffer).
std::optional<vu::Message> recv_within(FrontEnd& fe, std::chrono::milliseconds limit) {
  pollfd p{fe.sock.get(), POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(limit.count())) != 1) return std::nullopt;
  return fe.recv();
}

}  // namespace

TEST(StatsHeadroom, FreeMemoryWhoseBackingIsHeld) {
  // 1 GiB guest, 300 MiB resident: at most 724 MiB of its free memory can be
  // unbacked, so of 900 MiB free, 176 MiB are backed and not returned.
  EXPECT_EQ(unreported_free_bytes(900 * MiB, 1024 * MiB, 300 * MiB), 176 * MiB);
  EXPECT_EQ(unreported_free_bytes(500 * MiB, 1024 * MiB, 300 * MiB), 0u);  // all free memory unbacked
  EXPECT_EQ(unreported_free_bytes(900 * MiB, 1024 * MiB, 1100 * MiB), 900 * MiB);  // resident > memory
  EXPECT_EQ(unreported_free_bytes(0, 0, 0), 0u);
}

TEST(StatsConfig, IntervalKeyAndRange) {
  auto c = parse_config("[daemon]\nstats_interval_seconds = 0\n", "t.toml");
  ASSERT_TRUE(c.has_value()) << c.error();
  EXPECT_EQ(c->stats_interval_seconds, 0);
  auto d = parse_config("", "t.toml");
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->stats_interval_seconds, 5);
  auto bad = parse_config("[daemon]\nstats_interval_seconds = -1\n", "t.toml");
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().find("t.toml:2: daemon.stats_interval_seconds"), std::string::npos) << bad.error();
}

TEST(StatsQueue, OfferedOnlyWithAnInterval) {
  Pair sp;
  Daemon d(std::move(sp.a));
  d.ctx.stats_interval = 0ms;
  FrontEnd fe(std::move(sp.b));
  EXPECT_EQ(fe.get_u64(vu::Request::GetFeatures) & balloon::kFStatsVq, 0u);
  const uint64_t pf = fe.get_u64(vu::Request::GetProtocolFeatures);  // REPLY_ACK, for the refusal
  ASSERT_TRUE(fe.send(vu::Request::SetProtocolFeatures, vu::encode_u64(pf)));
  EXPECT_NE(fe.acked(vu::Request::SetFeatures, vu::encode_u64(kStatsFeatures)), 0u);
  EXPECT_EQ(d.value("fphd_protocol_errors_total", {{"reason", "features_not_offered"}}), 1);
  d.ctx.stats_interval = 5s;
  EXPECT_NE(fe.get_u64(vu::Request::GetFeatures) & balloon::kFStatsVq, 0u);
}

TEST(StatsQueue, GuestStatsAreExportedAndRequestedAgainEveryInterval) {
  StatsVm vm("stats-vm", 200ms);
  auto& d = vm.d;
  auto& fe = vm.fe;
  auto& st = vm.st;
  EXPECT_EQ(fe.reporting_index, 3u);

  st.post(10 * MiB);
  ASSERT_TRUE(eventually([&] { return d.value("fphd_guest_free_bytes", {{"vm", "stats-vm"}}) == 10 * MiB; }));
  EXPECT_EQ(d.value("fphd_guest_memtotal_bytes", {{"vm", "stats-vm"}}), kRam);
  EXPECT_EQ(d.value("fphd_guest_available_bytes"), 11 * MiB);
  EXPECT_EQ(d.value("fphd_guest_caches_bytes"), 1 * MiB);
  EXPECT_EQ(d.value("fphd_guest_major_faults"), 3);
  EXPECT_EQ(d.value("fphd_guest_minor_faults"), 1000);
  EXPECT_EQ(d.value("fphd_guest_swap_in_bytes"), 0);
  EXPECT_EQ(d.value("fphd_guest_stats_updates_total"), 1);
  // Linux 6.1 sends no OOM_KILLS tag: no series rather than a made-up 0.
  EXPECT_EQ(d.value("fphd_guest_oom_kills"), 0);
  // The buffer is held (in flight) but is not a reporting request.
  EXPECT_TRUE(d.session->info().stats_held);
  EXPECT_EQ(d.session->info().inflight, 0);
  EXPECT_EQ(d.value("fphd_inflight_requests"), 0);

  // The device asks for fresh stats by returning the buffer.
  auto u = st.wait_used(10s);
  ASSERT_TRUE(u.has_value()) << "the stats buffer was never returned";
  EXPECT_EQ(u->len, 0u);
  st.post(20 * MiB, kRam, 7);
  ASSERT_TRUE(eventually([&] { return d.value("fphd_guest_free_bytes") == 20 * MiB; }));
  EXPECT_EQ(d.value("fphd_guest_major_faults"), 7);
  ASSERT_TRUE(st.wait_used(10s).has_value());

  // Headroom: nothing of the 64 MiB is resident yet except the ring pages,
  // so all 20 MiB free can be unbacked: headroom 0.
  d.sample();
  EXPECT_EQ(d.value("fphd_guest_unreported_free_bytes"), 0);
  // The guest touched 60 MiB and says 20 MiB are free: at most 4 MiB of its
  // free memory is unbacked, so at least 16 MiB of free memory is held.
  std::memset(fe.mem + 4 * MiB, 0x5a, 60 * MiB);
  st.post(20 * MiB);
  ASSERT_TRUE(eventually([&] { return d.value("fphd_guest_stats_updates_total") == 3; }));
  d.sample();
  const double headroom = d.value("fphd_guest_unreported_free_bytes");
  EXPECT_GE(headroom, 16.0 * MiB);
  EXPECT_LE(headroom, 20.0 * MiB);
}

TEST(StatsQueue, UnknownTagsAreCountedAndIgnored) {
  StatsVm vm("tags-vm", 1h);
  auto& d = vm.d;
  auto& st = vm.st;
  std::vector<proto::balloon::StatEntry> e = {{4, 5 * MiB}, {16, 1}, {300, 2}, {10, 4}};
  st.post_bytes(proto::balloon::encode_stats(e));
  ASSERT_TRUE(eventually([&] { return d.value("fphd_guest_stats_updates_total") == 1; }));
  EXPECT_EQ(d.value("fphd_guest_stats_unknown_tags_total", {{"vm", "tags-vm"}}), 2);
  EXPECT_EQ(d.value("fphd_guest_free_bytes"), 5 * MiB);
  EXPECT_EQ(d.value("fphd_guest_oom_kills"), 4);
  EXPECT_EQ(d.value("fphd_protocol_errors_total"), 0);
}

// A hostile stats buffer is rejected with a log line naming the field and a
// protocol error, the session keeps serving its stats queue, and another VM
// of the same daemon keeps reclaiming meanwhile.
TEST(StatsQueue, MalformedBuffersAreRejectedCountedAndTheOtherVmKeepsReclaiming) {
  StatsVm vm("bad-stats", 100ms);
  auto& d = vm.d;
  auto& st = vm.st;

  // The second VM: same daemon context (pipelines, metrics).
  Pair sp2;
  auto good = std::make_shared<Session>(d.ctx, std::move(sp2.a), "good-vm");
  std::thread good_thread([&] { good->run(); });
  FrontEnd fe2(std::move(sp2.b));
  fe2.handshake(kFeatures);

  struct Case {
    std::vector<uint8_t> bytes;
    bool writable;
    const char* reason;
    const char* field;
  };
  auto valid = proto::balloon::encode_stats(std::vector<proto::balloon::StatEntry>{{4, 9 * MiB}, {5, kRam}});
  auto odd = valid;
  odd.pop_back();  // 19 bytes
  std::vector<uint8_t> too_long(proto::balloon::kMaxStatsBytes + 10, 0);
  const Case cases[] = {
      {odd, false, "stats_buffer_length", "stats.length: 19 bytes is not a multiple"},
      {too_long, false, "stats_buffer_too_long", "stats.length: 650 bytes is more than 64 entries"},
      {valid, true, "stats_buffer_writable", "buffers[0].flags"},
  };
  int n = 0;
  for (const auto& c : cases) {
    ++n;
    ::testing::internal::CaptureStderr();
    st.post_bytes(c.bytes, c.writable);
    const bool counted = eventually(
        [&] { return d.value("fphd_protocol_errors_total", {{"vm", "bad-stats"}, {"reason", c.reason}}) == 1; });
    // The chain is still returned (at the next request), so the driver can
    // try again; the session keeps serving.
    auto u = st.wait_used(10s);
    const std::string log = ::testing::internal::GetCapturedStderr();
    EXPECT_TRUE(counted) << c.reason;
    ASSERT_TRUE(u.has_value()) << c.reason << ": chain not returned";
    EXPECT_NE(log.find("vm=bad-stats"), std::string::npos) << log;
    EXPECT_NE(log.find("stats buffer rejected"), std::string::npos) << log;
    EXPECT_NE(log.find(c.field), std::string::npos) << log;
    EXPECT_EQ(d.value("fphd_guest_stats_updates_total", {{"vm", "bad-stats"}}), 0);

    // Meanwhile the other VM reports 8 MiB it wrote, and gets it back.
    std::memset(fe2.mem + 16 * MiB + (n - 1) * 8 * MiB, 0x33, 8 * MiB);
    const int64_t before = blocks_bytes(fe2.ram.get());
    fe2.report({{16 * MiB + (n - 1) * 8 * MiB, 8 * MiB, true}});
    EXPECT_GE(before - blocks_bytes(fe2.ram.get()), static_cast<int64_t>(8 * MiB));
  }
  EXPECT_GE(d.value("fphd_reclaimed_bytes_total", {{"vm", "good-vm"}}), 24.0 * MiB);
  EXPECT_EQ(d.value("fphd_protocol_errors_total", {{"vm", "good-vm"}}), 0);
  EXPECT_EQ(d.session->info().state, SessionState::Active);  // not closed

  // And a valid buffer after all that is taken.
  st.post_bytes(valid);
  EXPECT_TRUE(eventually([&] { return d.value("fphd_guest_free_bytes", {{"vm", "bad-stats"}}) == 9 * MiB; }));
  auto latest = d.session->stats().latest();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->rejected, 3u);

  good->request_stop();
  good_thread.join();
}

// The held buffer counts as in flight, and GET_VRING_BASE waits for in-flight
// requests: it must return the held buffer first, not wait for it.
TEST(StatsQueue, GetVringBaseReturnsTheHeldBufferPromptly) {
  StatsVm vm("obs-vm", 1h);  // never returned by the timer in this test
  auto& d = vm.d;
  auto& fe = vm.fe;
  auto& st = vm.st;
  st.post(1 * MiB);
  ASSERT_TRUE(eventually([&] { return d.session->info().stats_held; }));
  EXPECT_FALSE(st.ring.pop_used().has_value());

  ASSERT_TRUE(fe.send(vu::Request::GetVringBase, vu::encode_vring_state({st.index, 0})));
  auto m = recv_within(fe, 10s);
  ASSERT_TRUE(m.has_value()) << "GET_VRING_BASE on the stats ring did not answer";
  auto base = vu::parse_vring_state(m->payload);
  ASSERT_TRUE(base.has_value());
  EXPECT_EQ(base->index, st.index);
  EXPECT_EQ(base->num, 1u);
  auto u = st.ring.pop_used();
  ASSERT_TRUE(u.has_value()) << "the held stats buffer was not returned before the ring stopped";
  EXPECT_EQ(u->len, 0u);
  EXPECT_FALSE(d.session->info().stats_held);
}

TEST(StatsQueue, ResetAndRingSetUpAgainReturnTheHeldBuffer) {
  StatsVm vm("obs-vm", 1h);
  auto& d = vm.d;
  auto& fe = vm.fe;
  auto& st = vm.st;
  st.post(1 * MiB);
  ASSERT_TRUE(eventually([&] { return d.session->info().stats_held; }));

  // A ring set up again while started and disabled (what virtio_uml does
  // after a driver reload): stopped first, the held buffer released at once
  // rather than waited for.
  ASSERT_EQ(fe.acked(vu::Request::SetVringEnable, vu::encode_vring_state({st.index, 0})), 0u);
  ASSERT_TRUE(fe.send(vu::Request::SetVringNum, vu::encode_vring_state({st.index, 8}), {}, true));
  auto ack = recv_within(fe, 10s);
  ASSERT_TRUE(ack.has_value()) << "SET_VRING_NUM on the stats ring waited for the held buffer";
  EXPECT_FALSE(d.session->info().stats_held);
  EXPECT_EQ(d.session->info().inflight, 0);
  // ... and it is dropped, not written: the driver reset the ring and may
  // have freed its memory (returning it there panicked a UML guest).
  EXPECT_FALSE(st.ring.pop_used().has_value()) << "the old used ring of a reset ring was written";

  // Set up again and held again; a device reset (SET_STATUS 0) returns it.
  st.setup();
  st.post(2 * MiB);
  ASSERT_TRUE(eventually([&] { return d.session->info().stats_held; }));
  ASSERT_TRUE(fe.send(vu::Request::SetStatus, vu::encode_u64(0), {}, true));
  auto m = recv_within(fe, 10s);
  ASSERT_TRUE(m.has_value()) << "SET_STATUS 0 did not answer";
  ASSERT_TRUE(st.ring.pop_used().has_value());
  EXPECT_FALSE(d.session->info().stats_held);
}

TEST(StatsQueue, PausingReclaimDoesNotStopStats) {
  StatsVm vm("paused-vm", 100ms);
  auto& d = vm.d;
  auto& st = vm.st;
  d.session->set_paused(true);
  st.post(3 * MiB);
  ASSERT_TRUE(eventually([&] { return d.value("fphd_guest_free_bytes") == 3 * MiB; }));
  ASSERT_TRUE(st.wait_used(10s).has_value());
  st.post(4 * MiB);
  EXPECT_TRUE(eventually([&] { return d.value("fphd_guest_free_bytes") == 4 * MiB; }));
}

// Teardown with the buffer held (peer gone, yank): run() returns, nothing
// waits for the held buffer.
TEST(StatsQueue, DisconnectAndYankWithTheBufferHeldDoNotHang) {
  for (bool yank : {false, true}) {
    StatsVm vm("obs-vm", 1h);
    auto& d = vm.d;
    vm.st.post(1 * MiB);
    ASSERT_TRUE(eventually([&] { return d.session->info().stats_held; }));
    if (yank) d.session->yank();
    else vm.fe.sock.reset();  // the front end goes away
    ASSERT_TRUE(d.thread.joinable());
    d.thread.join();  // hangs (test timeout) if teardown waited for the held buffer
    EXPECT_EQ(d.session->info().inflight, 0);
    EXPECT_FALSE(d.session->info().stats_held);
  }
}
