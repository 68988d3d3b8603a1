// The ring rules (vring.h, docs/protocol.md "Ring states", issue 11 part 2),
// each driven over a real socket by a test front end against a real session:
// the offending sequence, the reply, the counter, that the ring is not served
// (nothing used, nothing discarded: memfd st_blocks) while it is not
// configured, and that setting it up correctly again makes it work.
#include <gtest/gtest.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "fph/daemon/session.h"
#include "session_fixture.h"

using namespace fph;
using namespace fph::daemon;
using namespace fph::testing_support;
namespace vu = proto::vu;
namespace vq = proto::vq;
namespace balloon = proto::balloon;

namespace {

// A chain was posted and kicked: whether fphd served it within `ms`. A
// stopped ring must leave it alone; a message round trip first makes sure
// the session has handled everything sent before.
bool served_within(FrontEnd& fe, int ms) {
  EXPECT_NE(fe.get_u64(vu::Request::GetFeatures), ~0ull);
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (std::chrono::steady_clock::now() < until) {
    if (fe.ring.pop_used()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

void kick(FrontEnd& fe) {
  uint64_t one = 1;
  ASSERT_EQ(write(fe.kick.get(), &one, 8), 8);
}

// Fills 2 MiB at gpa so that a discard there is visible in st_blocks.
void touch(FrontEnd& fe, uint64_t gpa) { std::memset(fe.mem + gpa, 0x3c, 2 * MiB); }

vu::VringAddr ring_addr(uint32_t q, uint64_t base = kUaddr) {
  return {q, 0, base, base + 8192, base + 4096, 0};
}

// Features, protocol features, owner: no memory, no ring yet.
void negotiate(FrontEnd& fe) {
  ASSERT_TRUE(fe.send(vu::Request::SetFeatures, vu::encode_u64(kFeatures)));
  const uint64_t pf = fe.get_u64(vu::Request::GetProtocolFeatures);
  ASSERT_TRUE(fe.send(vu::Request::SetProtocolFeatures, vu::encode_u64(pf)));
  fe.reporting_index = static_cast<uint32_t>(balloon::queue_layout(kFeatures).reporting);
  fe.ring = vq::DriverRing(32, fe.mem, fe.mem + 4096, fe.mem + 8192);
}

}  // namespace

// A SET_VRING_NUM that is refused does not leave the ring running with its
// earlier size: it stops (its in-flight requests returned first) and serves
// nothing until the front end sets it up again.
TEST(RingRules, ARefusedSizeStopsTheRingUntilItIsSetUpAgain) {
  Pair sp;
  Daemon d(std::move(sp.a), "ring-num");
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  const uint32_t q = fe.reporting_index;
  ASSERT_GT(fe.reclaimed_by_report(16 * MiB), 0);

  EXPECT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({q, 3})), 1u);
  EXPECT_EQ(errors(d, "bad_payload"), 1);

  touch(fe, 20 * MiB);
  const int64_t before = blocks_bytes(fe.ram.get());
  ASSERT_TRUE(fe.ring.add_chain(std::vector<vq::Buffer>{{20 * MiB, 2 * MiB, true}}).has_value());
  kick(fe);
  EXPECT_FALSE(served_within(fe, 300));
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before) << "a ring with a refused size discarded";

  // Set up again, correctly: it continues where it stopped and serves the
  // chain posted meanwhile.
  // The ring is stopped: GET_VRING_BASE answers at once.
  ASSERT_TRUE(fe.send(vu::Request::GetVringBase, vu::encode_vring_state({q, 0})));
  auto r = fe.recv();
  ASSERT_TRUE(r);
  auto st = vu::parse_vring_state(r->payload);
  ASSERT_TRUE(st);
  EXPECT_EQ(st->num, 1u) << "one chain was served before the refusal";
  ASSERT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({q, 32})), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringBase, vu::encode_vring_state({q, st->num})), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(ring_addr(q))), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringKick, vu::encode_u64(q), {fe.kick.get()}), 0u);
  fe.wait_used();
  EXPECT_GE(before - blocks_bytes(fe.ram.get()), static_cast<int64_t>(2 * MiB));
}

// A live ring (PROTOCOL_FEATURES, enabled) refuses a new size (`ring_busy`)
// and, refused, stops: it is not served with a size the front end and fphd
// no longer agree on.
TEST(RingRules, ANewSizeForALiveRingIsRefusedAndStopsIt) {
  Pair sp;
  Daemon d(std::move(sp.a), "ring-busy");
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  const uint32_t q = fe.reporting_index;
  EXPECT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({q, 64})), 1u);
  EXPECT_EQ(errors(d, "ring_busy"), 1);
  touch(fe, 20 * MiB);
  const int64_t before = blocks_bytes(fe.ram.get());
  ASSERT_TRUE(fe.ring.add_chain(std::vector<vq::Buffer>{{20 * MiB, 2 * MiB, true}}).has_value());
  kick(fe);
  EXPECT_FALSE(served_within(fe, 300));
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);
  EXPECT_EQ(d.session->info().reporting_live, false);
}

// SET_VRING_ADDR outside every region is refused where it arrives
// (`ring_unmapped`, nack), and the ring does not start on the next kick fd;
// correct addresses then start it.
TEST(RingRules, RingAddressesOutsideGuestMemoryAreRefusedWhereTheyArrive) {
  Pair sp;
  Daemon d(std::move(sp.a), "ring-addr");
  FrontEnd fe(std::move(sp.b));
  negotiate(fe);
  const uint32_t q = fe.reporting_index;
  vu::MemoryRegion reg{0, kRam, kUaddr, 0};
  ASSERT_EQ(fe.acked(vu::Request::AddMemReg, vu::encode_single_region(reg), {fe.ram.get()}), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({q, 32})), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringBase, vu::encode_vring_state({q, 0})), 0u);
  // The used ring straddles the end of the only region.
  vu::VringAddr bad{q, 0, kUaddr, kUaddr + kRam - 8, kUaddr + 4096, 0};
  EXPECT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(bad)), 1u);
  EXPECT_EQ(errors(d, "ring_unmapped"), 1);
  ASSERT_EQ(fe.acked(vu::Request::SetVringKick, vu::encode_u64(q), {fe.kick.get()}), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringCall, vu::encode_u64(q), {fe.call.get()}), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringEnable, vu::encode_vring_state({q, 1})), 0u);

  touch(fe, 20 * MiB);
  const int64_t before = blocks_bytes(fe.ram.get());
  ASSERT_TRUE(fe.ring.add_chain(std::vector<vq::Buffer>{{20 * MiB, 2 * MiB, true}}).has_value());
  kick(fe);
  EXPECT_FALSE(served_within(fe, 300));
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);

  ASSERT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(ring_addr(q))), 0u);
  kick(fe);
  fe.wait_used();
  EXPECT_GE(before - blocks_bytes(fe.ram.get()), static_cast<int64_t>(2 * MiB));
}

// Ring addresses before any memory table cannot be checked, so they are
// refused too (QEMU and virtio_uml both send the table first).
TEST(RingRules, RingAddressesBeforeAnyMemoryTableAreRefused) {
  Pair sp;
  Daemon d(std::move(sp.a), "ring-early");
  FrontEnd fe(std::move(sp.b));
  negotiate(fe);
  const uint32_t q = fe.reporting_index;
  ASSERT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({q, 32})), 0u);
  EXPECT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(ring_addr(q))), 1u);
  EXPECT_EQ(errors(d, "ring_unmapped"), 1);
  // Still a working session: the table, then the addresses again.
  vu::MemoryRegion reg{0, kRam, kUaddr, 0};
  ASSERT_EQ(fe.acked(vu::Request::AddMemReg, vu::encode_single_region(reg), {fe.ram.get()}), 0u);
  EXPECT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(ring_addr(q))), 0u);
}

// REM_MEM_REG of the region holding a running ring: the ring stops at once
// and is never written again (its pages are the front end's now), nothing
// is discarded for it, and it is `ring_unmapped`. Adding the memory back and
// setting the ring up again continues where it stopped.
TEST(RingRules, ARingWhoseMemoryIsRemovedStopsAndIsNotWrittenAgain) {
  Pair sp;
  Daemon d(std::move(sp.a), "ring-rem");
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  const uint32_t q = fe.reporting_index;
  ASSERT_GT(fe.reclaimed_by_report(16 * MiB), 0);
  auto* used_idx = reinterpret_cast<volatile uint16_t*>(fe.mem + 8192 + 2);
  const uint16_t used_before = *used_idx;

  vu::MemoryRegion reg{0, kRam, kUaddr, 0};
  ASSERT_EQ(fe.acked(vu::Request::RemMemReg, vu::encode_single_region(reg)), 0u);
  EXPECT_EQ(errors(d, "ring_unmapped"), 1);
  EXPECT_FALSE(d.session->info().reporting_live);

  touch(fe, 20 * MiB);
  const int64_t before = blocks_bytes(fe.ram.get());
  ASSERT_TRUE(fe.ring.add_chain(std::vector<vq::Buffer>{{20 * MiB, 2 * MiB, true}}).has_value());
  kick(fe);
  EXPECT_FALSE(served_within(fe, 300));
  EXPECT_EQ(*used_idx, used_before) << "the used ring in removed memory was written";
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);

  ASSERT_EQ(fe.acked(vu::Request::AddMemReg, vu::encode_single_region(reg), {fe.ram.get()}), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(ring_addr(q))), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringKick, vu::encode_u64(q), {fe.kick.get()}), 0u);
  fe.wait_used();
  EXPECT_GE(before - blocks_bytes(fe.ram.get()), static_cast<int64_t>(2 * MiB));
}

// A new memory table is checked against every running ring: the same memory
// mapped again keeps the ring running (on the new mapping); a table that
// moves the memory away from the ring's addresses stops it.
TEST(RingRules, ANewMemoryTableIsCheckedAgainstRunningRings) {
  Pair sp;
  Daemon d(std::move(sp.a), "ring-table");
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  vu::MemoryRegion same{0, kRam, kUaddr, 0};
  ASSERT_EQ(fe.acked(vu::Request::SetMemTable, vu::encode_mem_table(std::vector<vu::MemoryRegion>{same}), {fe.ram.get()}), 0u);
  EXPECT_EQ(errors(d, "ring_unmapped"), 0);
  EXPECT_GT(fe.reclaimed_by_report(16 * MiB), 0);

  vu::MemoryRegion moved{0, kRam, kUaddr + (1ull << 32), 0};
  ASSERT_EQ(fe.acked(vu::Request::SetMemTable, vu::encode_mem_table(std::vector<vu::MemoryRegion>{moved}), {fe.ram.get()}), 0u);
  EXPECT_EQ(errors(d, "ring_unmapped"), 1);
  touch(fe, 20 * MiB);
  const int64_t before = blocks_bytes(fe.ram.get());
  ASSERT_TRUE(fe.ring.add_chain(std::vector<vq::Buffer>{{20 * MiB, 2 * MiB, true}}).has_value());
  kick(fe);
  EXPECT_FALSE(served_within(fe, 300));
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);
}
