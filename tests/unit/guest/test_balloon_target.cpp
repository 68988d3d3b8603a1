// Balloon inflate/deflate over the buddy model (balloon_target.h), with a
// fake device: inflating takes pages out of the free lists (never a page
// isolated for reporting or allocated), deflating gives them back (and page
// reporting sees them as freed), DEFLATE_ON_OOM, transport failures, and the
// workload's OOM hook. The real device path is tests/integration/test_balloon.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "fph/guest/balloon_target.h"
#include "fph/guest/buddy.h"
#include "fph/guest/guest_memory.h"
#include "fph/guest/workload.h"

namespace fph::guest {
namespace {

struct FakeDevice : BalloonTransport {
  std::vector<std::vector<uint32_t>> inflates, deflates;
  std::vector<uint32_t> actual_writes;
  bool fail_tell = false;
  bool fail_write = false;
  bool tell(bool inflate, std::span<const uint32_t> pfns) override {
    if (fail_tell) return false;
    EXPECT_LE(pfns.size(), kBalloonArrayPfns);
    (inflate ? inflates : deflates).emplace_back(pfns.begin(), pfns.end());
    return true;
  }
  bool write_actual(uint32_t a) override {
    if (fail_write) return false;
    actual_writes.push_back(a);
    return true;
  }
};

// Runs steps until the balloon is idle, stalled or failed; returns the last.
BalloonTarget::Step settle(BalloonTarget& b, BalloonTransport& t, int max_steps = 10000) {
  BalloonTarget::Step s = BalloonTarget::Step::Idle;
  for (int i = 0; i < max_steps; ++i) {
    s = b.step(t);
    if (s != BalloonTarget::Step::Progress) return s;
  }
  ADD_FAILURE() << "balloon did not settle";
  return s;
}

std::vector<std::pair<uint64_t, int>> free_layout(const BuddyAllocator& b) {
  std::vector<std::pair<uint64_t, int>> out;
  b.for_each_free_block([&](const Block& blk, bool) { out.emplace_back(blk.frame, blk.order); });
  std::sort(out.begin(), out.end());
  return out;
}

constexpr uint64_t kGpaBase = 4ull << 20;  // PFN of frame f = 1024 + f

TEST(BalloonTarget, InflateTakesPagesOffTheFreeListsInBatchesOf256) {
  BuddyAllocator buddy(2048, 2);
  std::mutex zone;
  BalloonTarget b(buddy, zone, kGpaBase);
  FakeDevice dev;
  std::vector<uint64_t> inflated;
  b.on_inflated = [&](uint64_t f) { inflated.push_back(f); };
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Idle);  // no target yet
  b.set_target(300);
  EXPECT_TRUE(b.pending());
  EXPECT_EQ(b.towards_target(), 300);
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Progress);
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Reached);
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Idle);
  ASSERT_EQ(dev.inflates.size(), 2u);
  EXPECT_EQ(dev.inflates[0].size(), 256u);
  EXPECT_EQ(dev.inflates[1].size(), 44u);
  EXPECT_EQ(dev.actual_writes, (std::vector<uint32_t>{256, 300}));
  EXPECT_EQ(b.actual(), 300u);
  EXPECT_EQ(inflated.size(), 300u);
  // Every balloon page is an allocated order-0 block of the model, its PFN
  // is guest-physical >> 12, and no page is given twice.
  std::set<uint64_t> seen;
  size_t k = 0;
  for (const auto& arr : dev.inflates) {
    for (uint32_t pfn : arr) {
      const uint64_t f = pfn - (kGpaBase >> 12);
      EXPECT_EQ(f, b.frames()[k++]);
      Block blk;
      EXPECT_EQ(buddy.frame_state(f, &blk), FrameState::Allocated);
      EXPECT_EQ(blk.order, 0);
      EXPECT_TRUE(b.contains(f));
      EXPECT_TRUE(seen.insert(f).second);
    }
  }
  const auto st = buddy.stats();
  EXPECT_EQ(st.free_frames, 2048u - 2 - 300);
  EXPECT_EQ(st.allocated_frames, 300u);
  std::string why;
  EXPECT_TRUE(buddy.check_invariants(&why)) << why;
  const auto bs = b.stats();
  EXPECT_EQ(bs.inflated_pages, 300u);
  EXPECT_EQ(bs.target, 300u);
}

TEST(BalloonTarget, NeverTakesIsolatedOrAllocatedPagesAndStallsWithoutFreeMemory) {
  BuddyAllocator buddy(4096, 1);  // 16 MiB
  std::mutex zone;
  BalloonTarget b(buddy, zone, 0);
  FakeDevice dev;
  // The workload holds 4 MiB; page reporting has isolated two 2 MiB blocks.
  auto a = buddy.alloc(10);
  ASSERT_TRUE(a);
  auto iso = buddy.isolate(9, 2);
  ASSERT_EQ(iso.size(), 2u);
  uint64_t iso_frames = 0;
  for (const auto& blk : iso) iso_frames += uint64_t{1} << blk.order;
  const uint64_t free_before = buddy.stats().free_frames;
  // Ask for more than is free: inflate takes every free page, then stalls.
  b.set_target(4096);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::NoMemory);
  EXPECT_TRUE(b.pending());
  EXPECT_EQ(b.actual(), free_before);
  EXPECT_EQ(buddy.stats().free_frames, 0u);
  EXPECT_GE(b.stats().no_memory_stalls, 1u);
  for (uint64_t f : b.frames()) {
    EXPECT_FALSE(f >= *a && f < *a + 1024) << "frame " << f << " is allocated to the workload";
    for (const auto& blk : iso)
      EXPECT_FALSE(f >= blk.frame && f < blk.frame + (1u << blk.order))
          << "frame " << f << " is isolated for reporting";
  }
  // Reporting finds nothing to isolate: balloon pages are not free.
  EXPECT_TRUE(buddy.isolate(0, 32).empty());
  EXPECT_EQ(buddy.unreported_candidate_frames(0), 0u);
  // The report completes: its blocks are free again, and the next attempt
  // (the driver retries at its next config poll) takes them.
  buddy.putback(iso, true);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::NoMemory);  // still short of 4096
  EXPECT_EQ(b.actual(), free_before + iso_frames);
  std::string why;
  EXPECT_TRUE(buddy.check_invariants(&why)) << why;
  // The workload frees its 4 MiB: the target (4095 usable frames) is unreachable
  // by one page, the reserved frame.
  buddy.free(*a, 10);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::NoMemory);
  EXPECT_EQ(b.actual(), 4095u);
  EXPECT_EQ(buddy.stats().free_frames, 0u);
}

TEST(BalloonTarget, ReportedBlocksLoseTheirMarkWhenInflated) {
  BuddyAllocator buddy(1024, 0);
  std::mutex zone;
  BalloonTarget b(buddy, zone, 0);
  FakeDevice dev;
  auto iso = buddy.isolate(9, 32);
  ASSERT_FALSE(iso.empty());
  buddy.putback(iso, true);
  EXPECT_EQ(buddy.stats().reported_frames, 1024u);
  b.set_target(1024);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  EXPECT_EQ(buddy.stats().reported_frames, 0u);
  // Deflated pages come back unreported: page reporting reports them again.
  b.set_target(0);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  EXPECT_EQ(buddy.unreported_candidate_frames(9), 1024u);
}

TEST(BalloonTarget, DeflateGivesPagesBackAndTheBuddyMergesThemAgain) {
  BuddyAllocator buddy(2048, 0);
  std::mutex zone;
  const auto initial = free_layout(buddy);
  BalloonTarget b(buddy, zone, kGpaBase);
  FakeDevice dev;
  std::vector<int> freed_orders;
  b.on_freed = [&](int o) { freed_orders.push_back(o); };
  b.set_target(600);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  const std::vector<uint64_t> in_balloon = b.frames();
  b.set_target(100);
  EXPECT_EQ(b.towards_target(), -500);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  ASSERT_EQ(dev.deflates.size(), 2u);
  EXPECT_EQ(dev.deflates[0].size(), 256u);
  EXPECT_EQ(dev.deflates[1].size(), 244u);
  // The most recently inflated pages go first (LIFO), by PFN.
  for (size_t i = 0; i < 256; ++i)
    EXPECT_EQ(dev.deflates[0][i], (kGpaBase >> 12) + in_balloon[600 - 256 + i]);
  for (const auto& arr : dev.deflates)
    for (uint32_t pfn : arr) {
      const uint64_t f = pfn - (kGpaBase >> 12);
      EXPECT_EQ(buddy.frame_state(f), FrameState::Free);
      EXPECT_FALSE(b.contains(f));
    }
  EXPECT_EQ(b.actual(), 100u);
  EXPECT_EQ(dev.actual_writes.back(), 100u);
  EXPECT_EQ(buddy.stats().free_frames, 2048u - 100);
  EXPECT_EQ(freed_orders.size(), 500u);  // page reporting is told of every free
  b.set_target(0);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  EXPECT_EQ(b.actual(), 0u);
  EXPECT_EQ(free_layout(buddy), initial);  // everything merged back to 4 MiB blocks
  EXPECT_EQ(*std::max_element(freed_orders.begin(), freed_orders.end()), kMaxOrder);
  const auto bs = b.stats();
  EXPECT_EQ(bs.inflated_pages, 600u);
  EXPECT_EQ(bs.deflated_pages, 600u);
  std::string why;
  EXPECT_TRUE(buddy.check_invariants(&why)) << why;
}

TEST(BalloonTarget, OnlyAChangedTargetIsFollowed) {
  BuddyAllocator buddy(1024, 0);
  std::mutex zone;
  BalloonTarget b(buddy, zone, 0);
  FakeDevice dev;
  b.set_target(0);  // the first read, already there
  EXPECT_FALSE(b.pending());
  b.set_target(10);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  b.set_target(10);  // polled again, unchanged
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Idle);
  EXPECT_EQ(dev.inflates.size(), 1u);
}

TEST(BalloonTarget, DeflateOnOomOnlyWhenNegotiated) {
  BuddyAllocator buddy(2048, 0);
  std::mutex zone;
  BalloonTarget b(buddy, zone, 0, /*deflate_on_oom=*/false);
  FakeDevice dev;
  b.set_target(1000);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  EXPECT_EQ(b.oom_deflate(dev), 0u);
  EXPECT_EQ(b.actual(), 1000u);
  EXPECT_TRUE(dev.deflates.empty());
  b.set_deflate_on_oom(true);
  EXPECT_EQ(b.oom_deflate(dev), kBalloonOomPages);  // 256 per notifier call, like Linux
  EXPECT_EQ(b.actual(), 1000u - 256);
  ASSERT_EQ(dev.deflates.size(), 1u);
  EXPECT_EQ(dev.actual_writes.back(), 1000u - 256);
  EXPECT_EQ(buddy.stats().free_frames, 2048u - 1000 + 256);
  const auto bs = b.stats();
  EXPECT_EQ(bs.oom_deflated_pages, 256u);
  EXPECT_EQ(bs.oom_deflates, 1u);
  EXPECT_EQ(bs.deflated_pages, 256u);
  // The target is unchanged, but the balloon does not take the pages back
  // until it changes (no fight with the allocation that needed them).
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Idle);
  EXPECT_EQ(b.actual(), 744u);
  b.set_target(1000);  // same value: not a change
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Idle);
  b.set_target(900);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  EXPECT_EQ(b.actual(), 900u);
  // Fewer pages than asked: what there is.
  BuddyAllocator small(1024, 0);
  BalloonTarget s(small, zone, 0, true);
  s.set_target(100);
  EXPECT_EQ(settle(s, dev), BalloonTarget::Step::Reached);
  EXPECT_EQ(s.oom_deflate(dev), 100u);
  EXPECT_EQ(s.oom_deflate(dev), 0u);  // empty balloon: nothing to gain
}

TEST(BalloonTarget, TransportFailuresNeverHandPagesToTwoOwners) {
  BuddyAllocator buddy(1024, 0);
  std::mutex zone;
  BalloonTarget b(buddy, zone, 0, true);
  FakeDevice dev;
  dev.fail_tell = true;
  b.set_target(100);
  // The device may or may not have the buffer: the pages stay in the balloon.
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Failed);
  EXPECT_EQ(b.actual(), 100u);
  EXPECT_EQ(buddy.stats().allocated_frames, 100u);
  EXPECT_EQ(b.stats().failed_requests, 1u);
  // Deflate cannot tell the host: the pages stay in the balloon too.
  b.set_target(0);
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Failed);
  EXPECT_EQ(b.oom_deflate(dev), 0u);
  EXPECT_EQ(b.actual(), 100u);
  EXPECT_EQ(buddy.stats().allocated_frames, 100u);
  // The connection is back: the deflate goes through.
  dev.fail_tell = false;
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  EXPECT_EQ(b.actual(), 0u);
  EXPECT_EQ(buddy.stats().allocated_frames, 0u);
  std::string why;
  EXPECT_TRUE(buddy.check_invariants(&why)) << why;
}

TEST(BalloonTarget, PfnsThatDoNotFitLe32AreRefused) {
  BuddyAllocator buddy(1024, 0);
  std::mutex zone;
  BalloonTarget b(buddy, zone, (uint64_t{1} << 44) - 4096 * 512);  // frames past 2^32 PFNs
  FakeDevice dev;
  b.set_target(10);
  EXPECT_EQ(b.step(dev), BalloonTarget::Step::Failed);
  EXPECT_EQ(b.actual(), 0u);
  EXPECT_TRUE(dev.inflates.empty());
}

// The workload's side: an allocation that finds no free memory calls the OOM
// hook (the balloon's DEFLATE_ON_OOM), which deflates 256 pages at a time,
// and then succeeds without shortfall; balloon pages are never written by it.
TEST(BalloonTarget, WorkloadAllocationDeflatesTheBalloonUnderPressure) {
  GuestMemoryOptions o;
  o.bytes = 16ull << 20;
  o.ring_sizes = {128, 128, 32};
  auto m = GuestMemory::create(o);
  ASSERT_TRUE(m) << m.error();
  GuestMemory& mem = **m;
  BuddyAllocator buddy(mem.frames(), mem.reserved_frames());
  std::mutex zone;
  MemoryChecker checker(mem, std::nullopt);
  IntegrityCounters counters;
  BalloonTarget b(buddy, zone, mem.gpa_base(), true);
  FakeDevice dev;
  const uint64_t usable = mem.frames() - mem.reserved_frames();
  b.set_target(static_cast<uint32_t>(usable - 256));  // 1 MiB left free
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  int oom_calls = 0;
  WorkloadHooks wh;
  wh.on_oom = [&]() -> uint64_t {
    ++oom_calls;
    return b.oom_deflate(dev);
  };
  Workload w(buddy, zone, checker, counters, wh);
  // 8 MiB: needs 7 MiB out of the balloon, 256 pages (1 MiB) per call.
  auto held = w.alloc_bytes(8ull << 20);
  uint64_t got = 0;
  for (const auto& h : held) {
    got += h.bytes();
    for (uint64_t f = h.frame; f < h.frame + (1u << h.order); ++f) EXPECT_FALSE(b.contains(f));
  }
  EXPECT_EQ(got, 8ull << 20);
  EXPECT_EQ(counters.alloc_shortfall_bytes.load(), 0u);
  EXPECT_GE(oom_calls, 7);
  EXPECT_EQ(b.stats().oom_deflated_pages, uint64_t{256} * b.stats().oom_deflates);
  EXPECT_EQ(b.actual(), usable - 256 - b.stats().oom_deflated_pages);
  EXPECT_GE(b.stats().oom_deflated_pages, 7u * 256);
  EXPECT_EQ(w.verify_all(held), 0u);
  w.free_all(held);
  EXPECT_EQ(counters.corrupted_bytes.load(), 0u);
  // Balloon empty and memory exhausted: the hook has nothing left, the
  // allocation fails short as before.
  b.set_target(0);
  EXPECT_EQ(settle(b, dev), BalloonTarget::Step::Reached);
  auto all = w.alloc_bytes(usable * kFrameSize + (1 << 20));
  EXPECT_EQ(counters.alloc_shortfall_bytes.load(), 1u << 20);
  w.free_all(all);
  std::string why;
  EXPECT_TRUE(buddy.check_invariants(&why)) << why;
}

}  // namespace
}  // namespace fph::guest
