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

TEST(BalloonConfig, SpaceFollowsTheOffer) {
  EXPECT_EQ(b::config_space_size(b::kFVersion1), 16u);
  EXPECT_EQ(b::config_space_size(b::kFVersion1 | b::kFFphEpoch), 20u);
}

TEST(BalloonConfig, AccessIsCheckedAgainstTheSpace) {
  using A = b::ConfigAccess;
  // Reads anywhere inside, as Linux (0..4/8/16), QEMU (0..8) and fph-guest (16..20) do.
  for (auto [o, s] : {std::pair<uint32_t, uint32_t>{0, 4}, {0, 8}, {0, 16}, {0, 20}, {16, 4}, {19, 1}})
    EXPECT_TRUE(b::check_config_access(o, s, 20, A::Read)) << o << "+" << s;
  auto past = b::check_config_access(16, 8, 20, A::Read);
  ASSERT_FALSE(past);
  EXPECT_EQ(past.error().field, "config.offset");
  EXPECT_NE(past.error().detail.find("20-byte config space"), std::string::npos);
  EXPECT_FALSE(b::check_config_access(16, 4, 16, A::Read));  // no epoch offered: 16 bytes
  auto zero = b::check_config_access(4, 0, 20, A::Read);
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error().field, "config.size");
  EXPECT_FALSE(b::check_config_access(0xfffffffcu, 8, 20, A::Read));  // wraps 32 bits
  EXPECT_FALSE(b::check_config_access(0xffffffffu, 0xffffffffu, 20, A::Read));
  // Writes: actual and poison_val; a migration write any of the 16 standard bytes; the epoch never.
  EXPECT_TRUE(b::check_config_access(b::kOffActual, 4, 20, A::Write));
  EXPECT_TRUE(b::check_config_access(b::kOffPoisonVal, 4, 20, A::Write));
  EXPECT_FALSE(b::check_config_access(b::kOffNumPages, 4, 20, A::Write));
  EXPECT_FALSE(b::check_config_access(b::kOffActual, 8, 20, A::Write));
  EXPECT_TRUE(b::check_config_access(0, 16, 20, A::MigrationWrite));
  EXPECT_FALSE(b::check_config_access(b::kOffFphEpoch, 4, 20, A::MigrationWrite));
  EXPECT_FALSE(b::check_config_access(b::kOffFphEpoch, 4, 20, A::Write));
  EXPECT_FALSE(b::check_config_access(12, 8, 20, A::MigrationWrite));
}
