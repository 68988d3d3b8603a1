// virtio-balloon config space encoding and dense queue numbering.
#include <gtest/gtest.h>

#include "fph/proto/balloon.h"

namespace b = fph::proto::balloon;

TEST(BalloonConfig, LittleEndianLayout) {
  b::Config c{0x01020304, 0x05060708, 0x80000002, 0xaaaaaaaa};
  auto bytes = b::encode_config(c);
  const std::array<uint8_t, 16> want = {0x04, 0x03, 0x02, 0x01, 0x08, 0x07, 0x06, 0x05,
                                        0x02, 0x00, 0x00, 0x80, 0xaa, 0xaa, 0xaa, 0xaa};
  EXPECT_EQ(bytes, want);
  auto d = b::decode_config(bytes);
  EXPECT_EQ(d.num_pages, c.num_pages);
  EXPECT_EQ(d.actual, c.actual);
  EXPECT_EQ(d.free_page_hint_cmd_id, c.free_page_hint_cmd_id);
  EXPECT_EQ(d.poison_val, c.poison_val);
}

TEST(BalloonConfig, DriverWritable) {
  EXPECT_TRUE(b::driver_writable(b::kOffActual, 4));
  EXPECT_TRUE(b::driver_writable(b::kOffPoisonVal, 4));
  EXPECT_TRUE(b::driver_writable(5, 2));
  EXPECT_TRUE(b::driver_writable(15, 1));
  EXPECT_FALSE(b::driver_writable(b::kOffNumPages, 4));
  EXPECT_FALSE(b::driver_writable(b::kOffFreePageHintCmdId, 4));
  EXPECT_FALSE(b::driver_writable(4, 8));   // actual + cmd id
  EXPECT_FALSE(b::driver_writable(4, 12));  // actual .. poison_val
  EXPECT_FALSE(b::driver_writable(3, 2));
  EXPECT_FALSE(b::driver_writable(14, 4));  // past the end
  EXPECT_FALSE(b::driver_writable(4, 0));
  EXPECT_FALSE(b::driver_writable(16, 4));
  // Overflow of offset + size must not wrap into a writable field.
  EXPECT_FALSE(b::driver_writable(0xfffffffcu, 8));
  EXPECT_FALSE(b::driver_writable(4, 0xffffffffu));
}

TEST(BalloonQueues, LayoutForEveryFeatureCombination) {
  for (uint64_t mask = 0; mask < 8; ++mask) {
    uint64_t f = 0;
    if (mask & 1) f |= b::kFStatsVq;
    if (mask & 2) f |= b::kFFreePageHint;
    if (mask & 4) f |= b::kFReporting;
    auto l = b::queue_layout(f | b::kFVersion1 | b::kFPagePoison | b::kFDeflateOnOom);
    int next = 2;
    EXPECT_EQ(l.inflate, 0);
    EXPECT_EQ(l.deflate, 1);
    EXPECT_EQ(l.stats, (mask & 1) ? next++ : -1) << mask;
    EXPECT_EQ(l.free_page, (mask & 2) ? next++ : -1) << mask;
    EXPECT_EQ(l.reporting, (mask & 4) ? next++ : -1) << mask;
    EXPECT_EQ(l.count, next) << mask;
    EXPECT_EQ(l.role(0), b::QueueRole::Inflate);
    EXPECT_EQ(l.role(1), b::QueueRole::Deflate);
    EXPECT_EQ(l.role(static_cast<uint32_t>(next)), b::QueueRole::None);
    EXPECT_EQ(l.role(1000), b::QueueRole::None);
  }
}

TEST(BalloonQueues, NamedCases) {
  auto r = b::queue_layout(b::kFReporting);
  EXPECT_EQ(r.reporting, 2);
  EXPECT_EQ(r.count, 3);
  EXPECT_EQ(r.role(2), b::QueueRole::Reporting);

  auto sr = b::queue_layout(b::kFStatsVq | b::kFReporting);
  EXPECT_EQ(sr.reporting, 3);
  EXPECT_EQ(sr.role(2), b::QueueRole::Stats);

  auto all = b::queue_layout(b::kFStatsVq | b::kFFreePageHint | b::kFReporting);
  EXPECT_EQ(all.stats, 2);
  EXPECT_EQ(all.free_page, 3);
  EXPECT_EQ(all.reporting, 4);
  EXPECT_EQ(all.count, 5);
  EXPECT_EQ(all.role(3), b::QueueRole::FreePage);
  EXPECT_EQ(all.role(4), b::QueueRole::Reporting);

  auto none = b::queue_layout(0);
  EXPECT_EQ(none.count, 2);
  EXPECT_EQ(none.role(2), b::QueueRole::None);
}

TEST(BalloonQueues, RoleNames) {
  EXPECT_EQ(b::to_string(b::QueueRole::Inflate), "inflate");
  EXPECT_EQ(b::to_string(b::QueueRole::Deflate), "deflate");
  EXPECT_EQ(b::to_string(b::QueueRole::Stats), "stats");
  EXPECT_EQ(b::to_string(b::QueueRole::FreePage), "free_page");
  EXPECT_EQ(b::to_string(b::QueueRole::Reporting), "reporting");
  EXPECT_EQ(b::to_string(b::QueueRole::None), "none");
}
