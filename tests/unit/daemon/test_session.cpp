// A Session driven over a real socketpair by a minimal in-test front end,
// with the real node pipelines and the real discard syscalls on a memfd.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "fph/daemon/session.h"
#include "fph/proto/channel.h"
#include "session_fixture.h"

using namespace fph;
using namespace fph::daemon;
namespace vu = proto::vu;
namespace vq = proto::vq;
namespace balloon = proto::balloon;

namespace {

using namespace fph::testing_support;

void fill(uint8_t* p, uint64_t len, uint8_t v) { std::memset(p, v, len); }

}  // namespace

TEST(Session, ReportedRangesAreReallyDiscardedAndTheChainReturned) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  EXPECT_EQ(fe.reporting_index, 2u);  // dense numbering: inflate, deflate, reporting
  // Populate 16 MiB at 32 MiB and a resident neighbour at 48 MiB.
  fill(fe.mem + 32 * MiB, 16 * MiB, 0x11);
  fill(fe.mem + 48 * MiB, 2 * MiB, 0x22);
  const int64_t before = blocks_bytes(fe.ram.get());
  fe.post({{32 * MiB, 8 * MiB, true}, {40 * MiB, 8 * MiB, true}});
  auto u = fe.wait_used();
  EXPECT_EQ(u.len, 0u);
  const int64_t after = blocks_bytes(fe.ram.get());
  EXPECT_GE(before - after, static_cast<int64_t>(16 * MiB));
  for (uint64_t i = 0; i < 16 * MiB; i += 4096) ASSERT_EQ(fe.mem[32 * MiB + i], 0) << i;
  for (uint64_t i = 0; i < 2 * MiB; ++i) ASSERT_EQ(fe.mem[48 * MiB + i], 0x22) << i;

  // GET_VRING_BASE stops the ring and reports the next avail index.
  ASSERT_TRUE(fe.send(vu::Request::GetVringBase, vu::encode_vring_state({fe.reporting_index, 0})));
  auto m = fe.recv();
  ASSERT_TRUE(m);
  auto st = vu::parse_vring_state(m->payload);
  ASSERT_TRUE(st);
  EXPECT_EQ(st->num, 1u);
}

TEST(Session, PoisonValueMeansNothingIsDiscardedButTheChainReturns) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures | balloon::kFPagePoison);
  fe.set_poison_aa();
  fill(fe.mem + 32 * MiB, 4 * MiB, 0xaa);
  const int64_t before = blocks_bytes(fe.ram.get());
  fe.post({{32 * MiB, 4 * MiB, true}});
  fe.wait_used();
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);
  for (uint64_t i = 0; i < 4 * MiB; i += 4096) ASSERT_EQ(fe.mem[32 * MiB + i], 0xaa);
  // GET_CONFIG reads the poison value back.
  vu::ConfigPayload q{0, 16, 0, std::vector<uint8_t>(16)};
  ASSERT_TRUE(fe.send(vu::Request::GetConfig, vu::encode_config(q)));
  auto m = fe.recv();
  ASSERT_TRUE(m);
  auto got = vu::parse_config(m->payload);
  ASSERT_TRUE(got);
  ASSERT_EQ(got->size, 16u);
  EXPECT_EQ(got->data[12], 0xaa);
}

TEST(Session, MalformedChainsAreReturnedWithNothingDiscarded) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  fill(fe.mem + 16 * MiB, 48 * MiB, 0x33);
  const int64_t before = blocks_bytes(fe.ram.get());
  // Outside guest memory, and straddling the end of RAM.
  fe.post({{kRam + 4 * MiB, 2 * MiB, true}, {kRam - MiB, 2 * MiB, true}});
  fe.wait_used();
  // A descriptor loop written by hand: desc 5 -> 6 -> 5.
  auto* desc = reinterpret_cast<vq::Desc*>(fe.mem + kRingGpa);
  desc[5] = {16 * MiB, 4096, vq::kDescFWrite | vq::kDescFNext, 6};
  desc[6] = {20 * MiB, 4096, vq::kDescFWrite | vq::kDescFNext, 5};
  auto* avail = fe.mem + kRingGpa + 4096;
  uint16_t idx;
  std::memcpy(&idx, avail + 2, 2);
  const uint16_t head = 5;
  std::memcpy(avail + 4 + 2 * (idx % 32), &head, 2);
  idx++;
  __atomic_store_n(reinterpret_cast<uint16_t*>(avail + 2), idx, __ATOMIC_RELEASE);
  uint64_t one = 1;
  ASSERT_EQ(write(fe.kick.get(), &one, 8), 8);
  // The looped chain comes back on the used ring.
  auto* used = fe.mem + kRingGpa + 8192;
  for (;;) {
    uint16_t uidx = __atomic_load_n(reinterpret_cast<uint16_t*>(used + 2), __ATOMIC_ACQUIRE);
    if (uidx == 2) break;
    pollfd p{fe.call.get(), POLLIN, 0};
    poll(&p, 1, 1000);
  }
  uint32_t id;
  std::memcpy(&id, used + 4 + 8 * 1, 4);
  EXPECT_EQ(id, 5u);
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);  // nothing outside a valid range was touched
  // The session is still alive and answering.
  EXPECT_EQ(fe.get_u64(vu::Request::GetFeatures) & balloon::kFReporting, balloon::kFReporting);
}

TEST(Session, BadMessagesAreRefusedAndTheSessionSurvives) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  // Kick without its fd.
  EXPECT_NE(fe.acked(vu::Request::SetVringKick, vu::encode_u64(2)), 0u);
  // Unknown request id.
  {
    vu::Header h{99, vu::kVersion | vu::kFlagNeedReply, 0};
    ASSERT_TRUE(vu::send_message(fe.sock.get(), h, {}).has_value());
    auto m = fe.recv();
    ASSERT_TRUE(m);
    EXPECT_NE(*vu::parse_u64(m->payload, "ack"), 0u);
  }
  // A region whose gpa + size overflows.
  vu::MemoryRegion bad{~0ull - 4095, 8192, 0x1000, 0};
  EXPECT_NE(fe.acked(vu::Request::AddMemReg, vu::encode_single_region(bad), {fe.ram.get()}), 0u);
  // A region overlapping the existing one.
  vu::MemoryRegion dup{4096, 4096, 0x900000000, 0};
  EXPECT_NE(fe.acked(vu::Request::AddMemReg, vu::encode_single_region(dup), {fe.ram.get()}), 0u);
  // Too-short payload for SET_VRING_NUM.
  EXPECT_NE(fe.acked(vu::Request::SetVringNum, std::vector<uint8_t>(3)), 0u);
  // Ring size not a power of two.
  EXPECT_NE(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({0, 100})), 0u);
  // Acking features that were not offered.
  EXPECT_NE(fe.acked(vu::Request::SetFeatures, vu::encode_u64(kFeatures | (1ull << 40))), 0u);
  // Still serving: a report still works.
  fill(fe.mem + 32 * MiB, 2 * MiB, 1);
  const int64_t before = blocks_bytes(fe.ram.get());
  fe.post({{32 * MiB, 2 * MiB, true}});
  fe.wait_used();
  EXPECT_LT(blocks_bytes(fe.ram.get()), before);
}

TEST(Session, BrokenFramingClosesOnlyThatSession) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  // Version 2 header: framing cannot be trusted any more.
  const uint8_t hdr[12] = {1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0};
  ASSERT_EQ(write(fe.sock.get(), hdr, sizeof hdr), 12);
  d.thread.join();  // run() returns by itself
  char c;
  EXPECT_EQ(read(fe.sock.get(), &c, 1), 0);  // and the daemon closed its end... once destroyed
}

// GET_VRING_BASE stops the ring only after every taken request is returned:
// the reply must not arrive before the chain is on the used ring.
TEST(Session, GetVringBaseReturnsOnlyAfterInflightRequestsComplete) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  // A large request (32 x 1 MiB, populated) so its discard takes a while.
  fill(fe.mem + 16 * MiB, 32 * MiB, 0x44);
  std::vector<vq::Buffer> bufs;
  for (int i = 0; i < 32; ++i) bufs.push_back({16 * MiB + i * MiB, static_cast<uint32_t>(MiB), true});
  ASSERT_TRUE(fe.ring.add_chain(bufs).has_value());
  uint64_t one = 1;
  ASSERT_EQ(write(fe.kick.get(), &one, 8), 8);  // the kick is readable before the message is sent
  ASSERT_TRUE(fe.send(vu::Request::GetVringBase, vu::encode_vring_state({fe.reporting_index, 0})));
  auto m = fe.recv();
  ASSERT_TRUE(m);
  // At the moment the reply is read, the chain is already back.
  const uint16_t used_idx =
      __atomic_load_n(reinterpret_cast<uint16_t*>(fe.mem + kRingGpa + 8192 + 2), __ATOMIC_ACQUIRE);
  EXPECT_EQ(used_idx, 1);
  auto st = vu::parse_vring_state(m->payload);
  ASSERT_TRUE(st);
  EXPECT_EQ(st->num, 1u);
  for (uint64_t i = 0; i < 32 * MiB; i += 4096) ASSERT_EQ(fe.mem[16 * MiB + i], 0);
}

// Inflate (the classic balloon) is served: the PFNs the guest gives up are
// discarded; deflate chains are simply returned.
TEST(Session, InflateAndDeflateQueuesAreServed) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  // Set up ring 0 (inflate) at 16 KiB.. of guest RAM.
  const uint16_t num = 8;
  vq::DriverRing inflate(num, fe.mem + 16384, fe.mem + 20480, fe.mem + 24576);
  UniqueFd kick(eventfd(0, EFD_CLOEXEC)), call(eventfd(0, EFD_CLOEXEC));
  ASSERT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({0, num})), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringBase, vu::encode_vring_state({0, 0})), 0u);
  vu::VringAddr a{0, 0, kUaddr + 16384, kUaddr + 24576, kUaddr + 20480, 0};
  ASSERT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(a)), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringKick, vu::encode_u64(0), {kick.get()}), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringCall, vu::encode_u64(0), {call.get()}), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringEnable, vu::encode_vring_state({0, 1})), 0u);
  // PFNs 8192..8703 (32 MiB .. 34 MiB) in an array at 64 KiB.
  fill(fe.mem + 32 * MiB, 4 * MiB, 0x77);
  std::vector<uint32_t> pfns;
  for (uint32_t p = 8192; p < 8192 + 512; ++p) pfns.push_back(p);
  std::memcpy(fe.mem + 65536, pfns.data(), pfns.size() * 4);
  const int64_t before = blocks_bytes(fe.ram.get());
  vq::Buffer b{65536, static_cast<uint32_t>(pfns.size() * 4), false};
  ASSERT_TRUE(inflate.add_chain({&b, 1}).has_value());
  uint64_t one = 1;
  ASSERT_EQ(write(kick.get(), &one, 8), 8);
  std::optional<vq::UsedElem> u;
  while (!(u = inflate.pop_used())) {
    pollfd p{call.get(), POLLIN, 0};
    poll(&p, 1, 1000);
  }
  EXPECT_LE(blocks_bytes(fe.ram.get()), before - static_cast<int64_t>(2 * MiB));
  EXPECT_EQ(fe.mem[32 * MiB], 0);
  EXPECT_EQ(fe.mem[34 * MiB], 0x77);  // the page after the last pfn is untouched
}

// A second SET_VRING_KICK on a running ring (QEMU may change the kick fd)
// must not rewind the ring: chains already returned are never taken again.
TEST(Session, NewKickFdOnARunningRingDoesNotReplayChains) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  fill(fe.mem + 32 * MiB, 2 * MiB, 1);
  fe.post({{32 * MiB, 2 * MiB, true}});
  fe.wait_used();
  // The guest reuses the block: its new contents must survive. The
  // descriptor slot still describes it (a driver reuses slots; only the
  // avail index says what is new), which is what a rewound ring would read.
  fill(fe.mem + 32 * MiB, 2 * MiB, 0x99);
  auto* desc = reinterpret_cast<vq::Desc*>(fe.mem + kRingGpa);
  desc[0] = {32 * MiB, static_cast<uint32_t>(2 * MiB), vq::kDescFWrite, 0};
  UniqueFd kick2(eventfd(0, EFD_CLOEXEC));
  ASSERT_EQ(fe.acked(vu::Request::SetVringKick, vu::encode_u64(fe.reporting_index), {kick2.get()}), 0u);
  fe.kick = std::move(kick2);
  fill(fe.mem + 40 * MiB, 2 * MiB, 2);
  fe.post({{40 * MiB, 2 * MiB, true}});
  fe.wait_used();
  for (uint64_t i = 0; i < 2 * MiB; i += 4096) ASSERT_EQ(fe.mem[32 * MiB + i], 0x99) << i;
  EXPECT_EQ(fe.mem[40 * MiB], 0);
}
