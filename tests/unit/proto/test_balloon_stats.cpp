// The virtio-balloon stats buffer: {le16 tag; le64 val} entries.
#include <gtest/gtest.h>

#include <vector>

#include "fph/proto/balloon_stats.h"

namespace b = fph::proto::balloon;
using b::StatTag;

namespace {
std::vector<uint8_t> entry(uint16_t tag, uint64_t val) {
  b::StatEntry e{tag, val};
  return b::encode_stats(std::span<const b::StatEntry>(&e, 1));
}
std::vector<uint8_t> cat(std::initializer_list<std::vector<uint8_t>> parts) {
  std::vector<uint8_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
}  // namespace

TEST(BalloonStats, EntryIsTenLittleEndianBytes) {
  auto e = entry(0x0504, 0x1122334455667788ull);
  const std::vector<uint8_t> want = {0x04, 0x05, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11};
  EXPECT_EQ(e, want);
}

TEST(BalloonStats, ParsesWhatLinux61Sends) {
  // virtio_balloon.c update_balloon_stats: tags 0..9, memory in bytes.
  std::vector<b::StatEntry> es;
  for (uint16_t t = 0; t < 10; ++t) es.push_back({t, 1000ull * t + 1});
  auto bytes = b::encode_stats(es);
  ASSERT_EQ(bytes.size(), 100u);
  auto s = b::parse_stats(bytes);
  ASSERT_TRUE(s.has_value()) << s.error().message();
  EXPECT_EQ(s->entries, 10u);
  EXPECT_EQ(s->unknown_tags, 0u);
  EXPECT_EQ(s->get(StatTag::SwapIn), 1u);
  EXPECT_EQ(s->get(StatTag::MemFree), 4001u);
  EXPECT_EQ(s->get(StatTag::MemTotal), 5001u);
  EXPECT_EQ(s->get(StatTag::HugetlbFails), 9001u);
  EXPECT_FALSE(s->get(StatTag::OomKills).has_value());  // not sent: absent, not 0
}

TEST(BalloonStats, NewerKernelTagsAndFullRange) {
  auto bytes = cat({entry(10, 3), entry(15, ~0ull)});
  auto s = b::parse_stats(bytes);
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->get(StatTag::OomKills), 3u);
  EXPECT_EQ(s->get(StatTag::DirectReclaim), ~0ull);
}

TEST(BalloonStats, UnknownTagsAreCountedAndIgnored) {
  auto s = b::parse_stats(cat({entry(4, 77), entry(16, 1), entry(0xffff, 2)}));
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->entries, 3u);
  EXPECT_EQ(s->unknown_tags, 2u);
  EXPECT_EQ(s->get(StatTag::MemFree), 77u);
}

TEST(BalloonStats, DuplicateTagKeepsTheLastValue) {
  auto s = b::parse_stats(cat({entry(4, 1), entry(4, 2)}));
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->duplicates, 1u);
  EXPECT_EQ(s->get(StatTag::MemFree), 2u);
}

TEST(BalloonStats, EmptyBufferSaysNothing) {
  auto s = b::parse_stats({});
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->entries, 0u);
  for (const auto& v : s->values) EXPECT_FALSE(v.has_value());
}

TEST(BalloonStats, LengthNotAMultipleOfTenIsRefusedNamingTheField) {
  auto bytes = cat({entry(4, 1), entry(5, 2)});
  bytes.pop_back();
  auto s = b::parse_stats(bytes);
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().field, "stats.length");
  EXPECT_EQ(s.error().code, fph::proto::ParseErrc::BadSize);
  EXPECT_NE(s.error().message().find("19 bytes is not a multiple"), std::string::npos)
      << s.error().message();
}

TEST(BalloonStats, TooLongIsRefused) {
  std::vector<uint8_t> ok(b::kMaxStatsBytes, 0);
  EXPECT_TRUE(b::parse_stats(ok).has_value());
  std::vector<uint8_t> big(b::kMaxStatsBytes + b::kStatEntryBytes, 0);
  auto s = b::parse_stats(big);
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().field, "stats.length");
  EXPECT_EQ(s.error().code, fph::proto::ParseErrc::OutOfRange);
}

TEST(BalloonStats, EncodeIsBoundedAndRoundTrips) {
  std::vector<b::StatEntry> many(b::kMaxStatsEntries + 5, b::StatEntry{4, 1});
  EXPECT_EQ(b::encode_stats(many).size(), b::kMaxStatsBytes);
  b::Stats s;
  s.set(StatTag::MemFree, 123);
  s.set(StatTag::Available, 456);
  auto again = b::parse_stats(b::encode_stats(s));
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->values, s.values);
}

TEST(BalloonStats, NamesAndKinds) {
  EXPECT_EQ(b::to_string(StatTag::MemFree), "memfree");
  EXPECT_EQ(b::to_string(static_cast<StatTag>(99)), "unknown");
  EXPECT_TRUE(b::is_cumulative(StatTag::MajorFaults));
  EXPECT_TRUE(b::is_cumulative(StatTag::SwapIn));
  EXPECT_FALSE(b::is_cumulative(StatTag::MemFree));
  EXPECT_FALSE(b::is_cumulative(StatTag::Caches));
}
