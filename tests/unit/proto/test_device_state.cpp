// The live-migration device-state blob: header, CRC-32C, TLV fields.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "fph/proto/device_state.h"

namespace ds = fph::proto::devstate;
using fph::proto::ParseErrc;

namespace {

std::vector<uint8_t> le(uint64_t v, int n) {
  std::vector<uint8_t> out;
  for (int b = 0; b < n; ++b) out.push_back(static_cast<uint8_t>(v >> (8 * b)));
  return out;
}
std::vector<uint8_t> bytes_of(std::string_view s) { return {s.begin(), s.end()}; }

void set32(std::vector<uint8_t>& b, size_t off, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[off + i] = static_cast<uint8_t>(v >> (8 * i));
}

// After editing a blob: total_length = its size, checksum recomputed.
void reseal(std::vector<uint8_t>& b) {
  set32(b, 8, static_cast<uint32_t>(b.size()));
  set32(b, 12, 0);
  set32(b, 12, ds::crc32c(b));
}

struct Field {
  uint16_t type;
  std::vector<uint8_t> value;
};

// A blob written by hand, independently of ds::encode: header, then each
// field with zero padding to 4 bytes, then sealed.
std::vector<uint8_t> build(const std::vector<Field>& fields, uint16_t version = ds::kVersion,
                           uint16_t flags = 0) {
  std::vector<uint8_t> b = le(ds::kMagic, 4);
  for (auto x : {le(version, 2), le(flags, 2), le(0, 4), le(0, 4)}) b.insert(b.end(), x.begin(), x.end());
  for (const auto& f : fields) {
    for (auto x : {le(f.type, 2), le(f.value.size(), 2)}) b.insert(b.end(), x.begin(), x.end());
    b.insert(b.end(), f.value.begin(), f.value.end());
    while (b.size() % 4) b.push_back(0);
  }
  reseal(b);
  return b;
}

ds::DeviceState sample() {
  ds::DeviceState s;
  s.features = (1ull << 32) | (1ull << 29) | (1ull << 5) | (1ull << 1);
  s.protocol_features = 0x1234'5678'9abc'def0ull;
  s.config = {256, 128, 7, 0xaa};
  s.epoch = 42;
  s.paused = true;
  s.pause_while_logging = false;
  s.status = 0x0f;
  return s;
}

// The required fields of sample(), in type order.
std::vector<Field> sample_fields() {
  std::vector<uint8_t> cfg;
  for (uint32_t v : {256u, 128u, 7u, 0xaau}) {
    auto x = le(v, 4);
    cfg.insert(cfg.end(), x.begin(), x.end());
  }
  return {
      {0x0001, le((1ull << 32) | (1ull << 29) | (1ull << 5) | (1ull << 1), 8)},
      {0x0002, le(0x1234'5678'9abc'def0ull, 8)},
      {0x0003, cfg},
      {0x0004, le(42, 8)},
      {0x0005, le(1, 4)},
      {0x0006, le(0x0f, 4)},
  };
}

#define EXPECT_REFUSED(blob, errc, fld)                                  \
  do {                                                                   \
    auto r_ = ds::decode(blob);                                          \
    ASSERT_FALSE(r_.has_value());                                        \
    EXPECT_EQ(r_.error().code, errc) << r_.error().message();            \
    EXPECT_EQ(r_.error().field, fld) << r_.error().message();            \
  } while (0)

}  // namespace

TEST(DeviceState, Crc32cCheckValues) {
  EXPECT_EQ(ds::crc32c(bytes_of("123456789")), 0xe3069283u);
  EXPECT_EQ(ds::crc32c({}), 0u);
  // RFC 3720 (iSCSI) appendix B.4.
  EXPECT_EQ(ds::crc32c(std::vector<uint8_t>(32, 0x00)), 0x8a9136aau);
  EXPECT_EQ(ds::crc32c(std::vector<uint8_t>(32, 0xff)), 0x62a8ab43u);
  std::vector<uint8_t> inc(32);
  for (size_t i = 0; i < inc.size(); ++i) inc[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(ds::crc32c(inc), 0x46dd794eu);
  // The seed is the CRC of what came before.
  auto all = bytes_of("123456789");
  const std::span<const uint8_t> s(all);
  EXPECT_EQ(ds::crc32c(s.subspan(4), ds::crc32c(s.first(4))), 0xe3069283u);
}

TEST(DeviceState, EncodesTheDocumentedLayout) {
  const auto b = ds::encode(sample());
  EXPECT_EQ(b, build(sample_fields()));
  ASSERT_GE(b.size(), ds::kHeaderBytes);
  EXPECT_EQ(std::string(b.begin(), b.begin() + 4), "FPHS");
  EXPECT_EQ(b[4], 1);
  EXPECT_EQ(b[5], 0);
  EXPECT_EQ(b.size() % 4, 0u);
  // Header, then features, protocol_features, config, epoch, flags, status.
  EXPECT_EQ(b.size(), 16u + 12 + 12 + 20 + 12 + 8 + 8);
}

TEST(DeviceState, RoundTripRequiredOnly) {
  const auto s = sample();
  auto r = ds::decode(ds::encode(s));
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(*r, s);
  EXPECT_FALSE(r->counters.has_value());
  EXPECT_TRUE(r->source.empty());
  EXPECT_EQ(r->config.poison_val, 0xaau);
  EXPECT_TRUE(r->paused);
  EXPECT_FALSE(r->pause_while_logging);
}

TEST(DeviceState, RoundTripWithOptionalFieldsAndExtremes) {
  auto s = sample();
  s.counters = ds::Counters{1ull << 40, 123, ~0ull, 77};
  s.source = "web01 on h\xc3\xb4te-\xe2\x82\xac\xf0\x9f\x98\x80";  // UTF-8, 2-4 byte sequences
  s.pause_while_logging = true;
  s.epoch = ds::kMaxEpoch;
  s.status = 0xff;
  s.features = ~0ull;
  auto r = ds::decode(ds::encode(s));
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(*r, s);
  ds::DeviceState zero;
  auto z = ds::decode(ds::encode(zero));
  ASSERT_TRUE(z.has_value()) << z.error().message();
  EXPECT_EQ(*z, zero);
}

TEST(DeviceState, FieldOrderIsFree) {
  auto f = sample_fields();
  std::reverse(f.begin(), f.end());
  auto r = ds::decode(build(f));
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(*r, sample());
}

TEST(DeviceState, ShortInputIsTruncatedHeader) {
  EXPECT_REFUSED(std::vector<uint8_t>{}, ParseErrc::Truncated, "blob.header");
  auto r = ds::decode(std::vector<uint8_t>(15, 0));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().field, "blob.header");
}

TEST(DeviceState, EveryPrefixIsRefused) {
  auto s = sample();
  s.counters = ds::Counters{1, 2, 3, 4};
  s.source = "src";
  const auto b = ds::encode(s);
  for (size_t n = 0; n < b.size(); ++n) {
    std::vector<uint8_t> prefix(b.begin(), b.begin() + static_cast<ptrdiff_t>(n));
    auto r = ds::decode(prefix);
    ASSERT_FALSE(r.has_value()) << n;
    EXPECT_EQ(r.error().code, ParseErrc::Truncated) << n << ": " << r.error().message();
    EXPECT_EQ(r.error().field, n < ds::kHeaderBytes ? "blob.header" : "blob.total_length") << n;
  }
  EXPECT_TRUE(ds::decode(b).has_value());
}

TEST(DeviceState, TrailingBytesAreRefused) {
  auto b = ds::encode(sample());
  b.push_back(0);
  EXPECT_REFUSED(b, ParseErrc::BadSize, "blob.total_length");
}

TEST(DeviceState, EveryFlippedBitIsRefused) {
  auto s = sample();
  s.source = "x";
  const auto b = ds::encode(s);
  for (size_t i = 0; i < b.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      auto c = b;
      c[i] ^= static_cast<uint8_t>(1u << bit);
      auto r = ds::decode(c);
      ASSERT_FALSE(r.has_value()) << "byte " << i << " bit " << bit;
      const std::string want = i < 4    ? "blob.magic"
                               : i < 6  ? "blob.version"
                               : i < 8  ? "blob.header_flags"
                               : i < 12 ? "blob.total_length"
                                        : "blob.checksum";
      EXPECT_EQ(r.error().field, want) << "byte " << i << " bit " << bit;
    }
  }
}

TEST(DeviceState, ChecksumErrorShowsBothValues) {
  auto b = ds::encode(sample());
  const uint32_t good = b[12] | b[13] << 8 | b[14] << 16 | static_cast<uint32_t>(b[15]) << 24;
  set32(b, 12, 0xdeadbeef);
  auto r = ds::decode(b);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ParseErrc::BadValue);
  EXPECT_EQ(r.error().field, "blob.checksum");
  char hex[16];
  std::snprintf(hex, sizeof hex, "0x%08x", good);
  EXPECT_NE(r.error().detail.find("0xdeadbeef"), std::string::npos) << r.error().detail;
  EXPECT_NE(r.error().detail.find(hex), std::string::npos) << r.error().detail;
}

TEST(DeviceState, WrongMagicVersionAndHeaderFlags) {
  auto b = ds::encode(sample());
  b[3] = 'T';
  reseal(b);
  EXPECT_REFUSED(b, ParseErrc::BadValue, "blob.magic");

  auto v = build(sample_fields(), 2);
  auto r = ds::decode(v);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ParseErrc::BadVersion);
  EXPECT_EQ(r.error().field, "blob.version");
  EXPECT_NE(r.error().detail.find("version 2 is not understood"), std::string::npos)
      << r.error().detail;
  EXPECT_NE(r.error().detail.find("version 1 only"), std::string::npos) << r.error().detail;
  EXPECT_REFUSED(build(sample_fields(), 0), ParseErrc::BadVersion, "blob.version");

  EXPECT_REFUSED(build(sample_fields(), 1, 0x0100), ParseErrc::BadFlags, "blob.header_flags");
}

TEST(DeviceState, OversizedBlobIsRefusedBeforeItsFields) {
  // total_length above the limit: refused from the header alone.
  auto b = ds::encode(sample());
  set32(b, 8, static_cast<uint32_t>(ds::kMaxBlobBytes + 4));
  EXPECT_REFUSED(b, ParseErrc::OutOfRange, "blob.total_length");
  set32(b, 8, 0xffffffffu);
  EXPECT_REFUSED(b, ParseErrc::OutOfRange, "blob.total_length");

  // Exactly the limit is fine (an unknown optional field fills it up).
  auto f = sample_fields();
  const size_t used = build(f).size();
  f.push_back({0xfff0, std::vector<uint8_t>(ds::kMaxBlobBytes - used - 4, 0x5a)});
  auto max = build(f);
  ASSERT_EQ(max.size(), ds::kMaxBlobBytes);
  auto r = ds::decode(max);
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(*r, sample());

  // One field more: over the limit, whatever its content.
  f.push_back({0xfff1, {}});
  auto big = build(f);
  ASSERT_GT(big.size(), ds::kMaxBlobBytes);
  EXPECT_REFUSED(big, ParseErrc::OutOfRange, "blob.total_length");
}

TEST(DeviceState, UnknownRequiredTypeIsRefused) {
  auto f = sample_fields();
  f.push_back({0x0007, le(1, 4)});
  auto r = ds::decode(build(f));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ParseErrc::BadValue);
  EXPECT_EQ(r.error().field, "field[6] (type 0x0007).type");
  EXPECT_NE(r.error().detail.find("0x0007"), std::string::npos) << r.error().detail;
  f.back().type = 0x7fff;
  EXPECT_REFUSED(build(f), ParseErrc::BadValue, "field[6] (type 0x7fff).type");
}

TEST(DeviceState, UnknownOptionalTypesAreSkipped) {
  auto f = sample_fields();
  f.insert(f.begin() + 2, Field{0x8123, bytes_of("hello")});  // 5 bytes + 3 padding
  f.insert(f.begin(), Field{0xffff, {}});
  f.push_back({0x8003, le(~0ull, 8)});
  auto b = build(f);
  auto r = ds::decode(b);
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(*r, sample());
  // Also when edited into an encoded blob by hand (the same bytes as build).
  auto e = ds::encode(sample());
  for (auto x : {le(0x8123, 2), le(3, 2), bytes_of("abc"), std::vector<uint8_t>{0}})
    e.insert(e.end(), x.begin(), x.end());
  reseal(e);
  auto r2 = ds::decode(e);
  ASSERT_TRUE(r2.has_value()) << r2.error().message();
  EXPECT_EQ(*r2, sample());
}

TEST(DeviceState, DuplicateFieldIsRefused) {
  auto f = sample_fields();
  f.push_back(f[0]);
  auto r = ds::decode(build(f));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ParseErrc::BadValue);
  EXPECT_EQ(r.error().field, "field[6] (type 0x0001).type");
  EXPECT_NE(r.error().detail.find("field[0]"), std::string::npos) << r.error().detail;
  // Optional known fields too.
  f = sample_fields();
  f.push_back({0x8002, bytes_of("a")});
  f.push_back({0x8002, bytes_of("b")});
  EXPECT_REFUSED(build(f), ParseErrc::BadValue, "field[7] (type 0x8002).type");
}

TEST(DeviceState, WrongLengthIsRefusedNamingTheExpectedLength) {
  auto f = sample_fields();
  f[3].value = le(42, 4);  // epoch as u32
  auto r = ds::decode(build(f));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ParseErrc::BadSize);
  EXPECT_EQ(r.error().field, "field[3] (type 0x0004).length");
  EXPECT_NE(r.error().detail.find("epoch is 8 bytes, got 4"), std::string::npos) << r.error().detail;

  f = sample_fields();
  f[2].value.resize(12);
  EXPECT_REFUSED(build(f), ParseErrc::BadSize, "field[2] (type 0x0003).length");
  f = sample_fields();
  f[5].value = {0x0f};  // status as a bare u8
  EXPECT_REFUSED(build(f), ParseErrc::BadSize, "field[5] (type 0x0006).length");
  f = sample_fields();
  f.push_back({0x8001, std::vector<uint8_t>(24, 0)});
  r = ds::decode(build(f));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().field, "field[6] (type 0x8001).length");
  EXPECT_NE(r.error().detail.find("counters is 32 bytes, got 24"), std::string::npos);
}

TEST(DeviceState, MissingRequiredFieldIsRefusedByName) {
  const char* names[] = {"features", "protocol_features", "config", "epoch", "flags", "status"};
  for (size_t i = 0; i < 6; ++i) {
    auto f = sample_fields();
    f.erase(f.begin() + static_cast<ptrdiff_t>(i));
    auto r = ds::decode(build(f));
    ASSERT_FALSE(r.has_value()) << i;
    EXPECT_EQ(r.error().code, ParseErrc::BadValue);
    EXPECT_EQ(r.error().field, std::string("blob.") + names[i]);
    EXPECT_NE(r.error().detail.find("required field missing"), std::string::npos);
  }
  EXPECT_REFUSED(build({}), ParseErrc::BadValue, "blob.features");
}

TEST(DeviceState, ReservedFlagBitsAreRefused) {
  for (uint32_t flags : {4u, 0x80000000u, 0xffffffffu}) {
    auto f = sample_fields();
    f[4].value = le(flags, 4);
    EXPECT_REFUSED(build(f), ParseErrc::BadValue, "field[4] (type 0x0005).value");
  }
  auto f = sample_fields();
  f[4].value = le(3, 4);
  auto r = ds::decode(build(f));
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->paused && r->pause_while_logging);
}

TEST(DeviceState, StatusMustFitInEightBits) {
  auto f = sample_fields();
  f[5].value = le(0x100, 4);
  EXPECT_REFUSED(build(f), ParseErrc::BadValue, "field[5] (type 0x0006).value");
}

TEST(DeviceState, EpochMustBeBelowTwoToThe63) {
  auto f = sample_fields();
  f[3].value = le(1ull << 63, 8);
  EXPECT_REFUSED(build(f), ParseErrc::BadValue, "field[3] (type 0x0004).value");
  // The encoder writes what it is given; the destination refuses it.
  auto s = sample();
  s.epoch = ~0ull;
  EXPECT_REFUSED(ds::encode(s), ParseErrc::BadValue, "field[3] (type 0x0004).value");
  f[3].value = le(ds::kMaxEpoch, 8);
  EXPECT_TRUE(ds::decode(build(f)).has_value());
}

TEST(DeviceState, NonzeroPaddingIsRefused) {
  auto s = sample();
  s.source = "abcde";  // 5 bytes: 3 bytes of padding, the blob's last
  auto b = ds::encode(s);
  ASSERT_TRUE(ds::decode(b).has_value());
  for (size_t k = 1; k <= 3; ++k) {
    auto c = b;
    c[c.size() - k] = 0x01;
    reseal(c);
    EXPECT_REFUSED(c, ParseErrc::BadValue, "field[6] (type 0x8002).padding");
  }
  // Unknown optional fields are checked the same way.
  auto f = sample_fields();
  f.insert(f.begin(), Field{0x8100, {1}});
  auto c = build(f);
  c[16 + 4 + 1] = 0xff;
  reseal(c);
  EXPECT_REFUSED(c, ParseErrc::BadValue, "field[0] (type 0x8100).padding");
}

TEST(DeviceState, FieldsMustNotRunPastTheEnd) {
  // Value longer than what is left.
  auto b = ds::encode(sample());
  for (auto x : {le(0x8100, 2), le(100, 2), le(0, 4)}) b.insert(b.end(), x.begin(), x.end());
  reseal(b);
  EXPECT_REFUSED(b, ParseErrc::Truncated, "field[6] (type 0x8100).length");
  // Value fits but its padding does not.
  b = ds::encode(sample());
  for (auto x : {le(0x8100, 2), le(2, 2), le(0, 2)}) b.insert(b.end(), x.begin(), x.end());
  reseal(b);
  EXPECT_REFUSED(b, ParseErrc::Truncated, "field[6] (type 0x8100).padding");
  // Fewer bytes left than a field header.
  b = ds::encode(sample());
  b.push_back(0);
  b.push_back(0x80);
  reseal(b);
  EXPECT_REFUSED(b, ParseErrc::Truncated, "field[6]");
}

TEST(DeviceState, SourceIsBoundedUtf8) {
  auto f = sample_fields();
  f.push_back({0x8002, std::vector<uint8_t>(ds::kMaxSourceBytes, 'a')});
  auto r = ds::decode(build(f));
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(r->source, std::string(ds::kMaxSourceBytes, 'a'));

  f.back().value.push_back('a');
  r = ds::decode(build(f));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code, ParseErrc::BadSize);
  EXPECT_EQ(r.error().field, "field[6] (type 0x8002).length");
  EXPECT_NE(r.error().detail.find("at most 256 bytes, got 257"), std::string::npos);

  for (std::string bad : {"\xff", "ab\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\x80"}) {
    f.back().value = bytes_of(bad);
    EXPECT_REFUSED(build(f), ParseErrc::BadValue, "field[6] (type 0x8002).value");
  }
  // Present but empty is the same as absent.
  f.back().value.clear();
  r = ds::decode(build(f));
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(*r, sample());
}

TEST(DeviceState, EncodeCutsTheSourceAtACharacterBoundary) {
  auto s = sample();
  s.source = std::string(255, 'a') + "\xc3\xa9" + "tail";  // the 2-byte char straddles 256
  auto r = ds::decode(ds::encode(s));
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(r->source, std::string(255, 'a'));
  s.source = "ok\xffnot";  // invalid UTF-8: the valid prefix only
  r = ds::decode(ds::encode(s));
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_EQ(r->source, "ok");
  s.source = std::string(10000, 'x');
  EXPECT_LE(ds::encode(s).size(), ds::kMaxBlobBytes);
}
