// The workload's own allocation throughput (Workload::totals(), the
// workload_alloc_* fields of fph-guest's workload_done and summary events):
// bytes allocated, wall seconds of the runs and their ratio stay consistent.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>

#include "fph/guest/balloon_driver.h"
#include "fph/guest/buddy.h"
#include "fph/guest/guest_memory.h"
#include "fph/guest/workload.h"

using namespace fph::guest;

TEST(WorkloadTotals, ChurnCountsBytesSecondsAndOperations) {
  GuestMemoryOptions o;
  o.bytes = 32ull << 20;
  o.ring_sizes = {kInflateQueueSize, kDeflateQueueSize, reporting_queue_size(32, 1)};
  auto m = GuestMemory::create(o);
  ASSERT_TRUE(m) << m.error();
  GuestMemory& mem = **m;
  BuddyAllocator buddy(mem.frames(), mem.reserved_frames());
  std::mutex zone;
  MemoryChecker ck(mem, std::nullopt);
  IntegrityCounters cnt;
  Workload w(buddy, zone, ck, cnt, WorkloadHooks{}, 7);

  // Nothing ran: all zero, and no division by zero.
  WorkloadTotals t0 = w.totals();
  EXPECT_EQ(t0.runs, 0u);
  EXPECT_EQ(t0.alloc_bytes, 0u);
  EXPECT_EQ(t0.seconds, 0.0);
  EXPECT_EQ(t0.alloc_bytes_per_sec(), 0.0);

  std::atomic<bool> stop{false};
  w.run(*parse_workload("none"), stop);  // not a run
  EXPECT_EQ(w.totals().runs, 0u);

  w.run(*parse_workload("churn:16M:0.2"), stop);
  const WorkloadTotals t = w.totals();
  EXPECT_EQ(t.runs, 1u);
  EXPECT_GT(t.alloc_bytes, 0u);
  EXPECT_EQ(t.alloc_bytes % kFrameSize, 0u);  // whole blocks
  EXPECT_GT(t.ops, 0u);
  EXPECT_GE(t.seconds, 0.2);
  EXPECT_LT(t.seconds, 30.0);
  EXPECT_GT(t.alloc_seconds, 0.0);
  EXPECT_LE(t.alloc_seconds, t.seconds);
  EXPECT_GT(t.alloc_bytes_per_sec(), 0.0);
  EXPECT_NEAR(t.alloc_bytes_per_sec(), static_cast<double>(t.alloc_bytes) / t.seconds,
              1e-9 * t.alloc_bytes_per_sec());
  EXPECT_EQ(cnt.corrupted_bytes.load(), 0u);
  EXPECT_EQ(buddy.stats().allocated_frames, 0u);

  // An alloc-free run adds exactly what it allocated, and its time.
  w.run(*parse_workload("alloc-free:4M:1"), stop);
  const WorkloadTotals t2 = w.totals();
  EXPECT_EQ(t2.runs, 2u);
  EXPECT_EQ(t2.alloc_bytes, t.alloc_bytes + (4ull << 20));
  EXPECT_EQ(t2.ops, t.ops);  // only churn counts operations
  EXPECT_GT(t2.seconds, t.seconds);
  EXPECT_NEAR(t2.alloc_bytes_per_sec(), static_cast<double>(t2.alloc_bytes) / t2.seconds,
              1e-9 * t2.alloc_bytes_per_sec());

  // A failed allocation counts nothing.
  std::vector<Held> all = w.alloc_bytes(64ull << 20);  // more than the guest has
  uint64_t got = 0;
  for (const auto& h : all) got += h.bytes();
  EXPECT_EQ(w.totals().alloc_bytes, t2.alloc_bytes + got);
  EXPECT_FALSE(w.alloc_block(kMaxOrder).has_value());
  EXPECT_EQ(w.totals().alloc_bytes, t2.alloc_bytes + got);
  w.free_all(all);
}
