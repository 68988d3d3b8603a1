// fph-guest's side of the stats queue: which ring slot each queue uses, and
// what its stats buffer says (the device side is tests/unit/daemon/test_stats.cpp,
// both together tests/integration/test_stats.cpp).
#include <gtest/gtest.h>

#include "fph/guest/balloon_driver.h"
#include "fph/guest/frontend.h"
#include "fph/proto/balloon_stats.h"

using namespace fph::guest;
namespace bal = fph::proto::balloon;

TEST(GuestStats, RingSlotsByRoleWhateverTheQueueIndex) {
  // With STATS_VQ the reporting queue is index 3, without it 2: both use
  // slot 2, and the stats queue (index 2) uses slot 3.
  const auto with = bal::queue_layout(bal::kFStatsVq | bal::kFReporting);
  const auto without = bal::queue_layout(bal::kFReporting);
  EXPECT_EQ(ring_slot(with.role(3), 3), 2u);
  EXPECT_EQ(ring_slot(with.role(2), 2), 3u);
  EXPECT_EQ(ring_slot(without.role(2), 2), 2u);
  EXPECT_EQ(ring_slot(with.role(0), 0), 0u);
  EXPECT_EQ(ring_slot(with.role(1), 1), 1u);
}

TEST(GuestStats, AskedForOnlyWhenWanted) {
  const uint64_t offered = bal::kFVersion1 | bal::kFReporting | bal::kFStatsVq;
  FrontendOptions o;
  EXPECT_EQ(choose_features(offered, o) & bal::kFStatsVq, 0u);  // default: off (no ring slot)
  o.stats = true;
  EXPECT_NE(choose_features(offered, o) & bal::kFStatsVq, 0u);
  EXPECT_EQ(choose_features(offered & ~bal::kFStatsVq, o) & bal::kFStatsVq, 0u);
}

TEST(GuestStats, BufferSaysWhatTheBuddyModelHasFree) {
  BuddyAllocator buddy(4096, 3);  // 16 MiB, 3 reserved frames
  auto a = buddy.alloc(9);        // 2 MiB
  ASSERT_TRUE(a);
  const auto bytes = guest_stats_buffer(buddy.stats());
  EXPECT_EQ(bytes.size(), 10 * bal::kStatEntryBytes);  // tags 0..9 like Linux 6.1
  auto s = bal::parse_stats(bytes);
  ASSERT_TRUE(s.has_value()) << s.error().message();
  const uint64_t free = (4096 - 3 - 512) * kFrameSize;
  EXPECT_EQ(s->get(bal::StatTag::MemFree), free);
  EXPECT_EQ(s->get(bal::StatTag::Available), free);
  EXPECT_EQ(s->get(bal::StatTag::MemTotal), (4096 - 3) * kFrameSize);
  EXPECT_EQ(s->get(bal::StatTag::Caches), 0u);
  EXPECT_EQ(s->get(bal::StatTag::SwapIn), 0u);
  EXPECT_GT(*s->get(bal::StatTag::MinorFaults), 0u);  // this process's own
  EXPECT_FALSE(s->get(bal::StatTag::OomKills).has_value());
  buddy.free(*a, 9);
  auto again = bal::parse_stats(guest_stats_buffer(buddy.stats()));
  EXPECT_EQ(again->get(bal::StatTag::MemFree), free + (2 << 20));
}
