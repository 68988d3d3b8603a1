// The live-migration device-state blob (device_state.h).
#include "fph/proto/device_state.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <string_view>

namespace fph::proto::devstate {

namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffFlags = 6;
constexpr size_t kOffTotalLength = 8;
constexpr size_t kOffChecksum = 12;

uint16_t get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
uint32_t get32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}
uint64_t get64(const uint8_t* p) { return get32(p) | static_cast<uint64_t>(get32(p + 4)) << 32; }

void put16(std::vector<uint8_t>& out, uint16_t v) {
  out.push_back(static_cast<uint8_t>(v));
  out.push_back(static_cast<uint8_t>(v >> 8));
}
void put32(std::vector<uint8_t>& out, uint32_t v) {
  for (int b = 0; b < 4; ++b) out.push_back(static_cast<uint8_t>(v >> (8 * b)));
}
void put64(std::vector<uint8_t>& out, uint64_t v) {
  for (int b = 0; b < 8; ++b) out.push_back(static_cast<uint8_t>(v >> (8 * b)));
}
void set32(std::vector<uint8_t>& out, size_t off, uint32_t v) {
  for (int b = 0; b < 4; ++b) out[off + b] = static_cast<uint8_t>(v >> (8 * b));
}

constexpr size_t align_up(size_t n) { return (n + kFieldAlign - 1) & ~(kFieldAlign - 1); }

// The length of the longest prefix of `s` that is well-formed UTF-8 (RFC 3629:
// no overlong forms, no surrogates, nothing above U+10FFFF). A sequence cut
// off at the end is not part of the prefix.
size_t valid_utf8_prefix(std::span<const uint8_t> s) {
  size_t i = 0;
  while (i < s.size()) {
    const uint8_t c = s[i];
    size_t n = 0;
    uint8_t lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      n = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 2;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
      return i;
    }
    if (s.size() - i - 1 < n) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k <= n; ++k)
      if ((s[i + k] & 0xc0) != 0x80) return i;
    i += n + 1;
  }
  return i;
}

struct Known {
  uint16_t type;
  const char* name;
  size_t length;  // exact value length; for source, the maximum
  bool required;
};
constexpr std::array<Known, 8> kKnown = {{
    {kTypeFeatures, "features", 8, true},
    {kTypeProtocolFeatures, "protocol_features", 8, true},
    {kTypeConfig, "config", balloon::kConfigSize, true},
    {kTypeEpoch, "epoch", 8, true},
    {kTypeFlags, "flags", 4, true},
    {kTypeStatus, "status", 4, true},
    {kTypeCounters, "counters", 32, false},
    {kTypeSource, "source", kMaxSourceBytes, false},
}};

int known_index(uint16_t type) {
  for (size_t k = 0; k < kKnown.size(); ++k)
    if (kKnown[k].type == type) return static_cast<int>(k);
  return -1;
}

void put_field(std::vector<uint8_t>& out, uint16_t type, std::span<const uint8_t> value) {
  put16(out, type);
  put16(out, static_cast<uint16_t>(value.size()));
  out.insert(out.end(), value.begin(), value.end());
  out.resize(align_up(out.size()), 0);
}

}  // namespace

bool DeviceState::operator==(const DeviceState& o) const {
  // balloon::Config has no operator== of its own.
  return features == o.features && protocol_features == o.protocol_features &&
         config.num_pages == o.config.num_pages && config.actual == o.config.actual &&
         config.free_page_hint_cmd_id == o.config.free_page_hint_cmd_id &&
         config.poison_val == o.config.poison_val && epoch == o.epoch && paused == o.paused &&
         pause_while_logging == o.pause_while_logging && status == o.status &&
         counters == o.counters && source == o.source;
}

uint32_t crc32c(std::span<const uint8_t> bytes, uint32_t seed) {
  uint32_t c = ~seed;
  for (uint8_t b : bytes) c = kCrc32cTable[(c ^ b) & 0xff] ^ (c >> 8);
  return ~c;
}

std::vector<uint8_t> encode(const DeviceState& s) {
  std::vector<uint8_t> out;
  out.reserve(kHeaderBytes + 128);
  put32(out, kMagic);
  put16(out, kVersion);
  put16(out, 0);
  put32(out, 0);  // total_length, filled in below
  put32(out, 0);  // checksum, filled in below

  std::vector<uint8_t> v;
  auto field = [&](uint16_t type) {
    put_field(out, type, v);
    v.clear();
  };
  put64(v, s.features);
  field(kTypeFeatures);
  put64(v, s.protocol_features);
  field(kTypeProtocolFeatures);
  const auto cfg = balloon::encode_config(s.config);
  v.assign(cfg.begin(), cfg.end());
  field(kTypeConfig);
  put64(v, s.epoch);
  field(kTypeEpoch);
  put32(v, (s.paused ? kFlagPaused : 0) | (s.pause_while_logging ? kFlagPauseWhileLogging : 0));
  field(kTypeFlags);
  put32(v, s.status);
  field(kTypeStatus);
  if (s.counters) {
    put64(v, s.counters->reported_bytes);
    put64(v, s.counters->discarded_bytes);
    put64(v, s.counters->skipped_bytes);
    put64(v, s.counters->requests);
    field(kTypeCounters);
  }
  if (!s.source.empty()) {
    const auto* p = reinterpret_cast<const uint8_t*>(s.source.data());
    const std::span<const uint8_t> src(p, std::min(s.source.size(), kMaxSourceBytes));
    const size_t n = valid_utf8_prefix(src);
    if (n > 0) put_field(out, kTypeSource, src.first(n));
  }
  // At most 16 + 7 fields of at most 4 + 256 bytes: far below kMaxBlobBytes.
  set32(out, kOffTotalLength, static_cast<uint32_t>(out.size()));
  set32(out, kOffChecksum, crc32c(out));
  return out;
}

ParseResult<DeviceState> decode(std::span<const uint8_t> blob) {
  const size_t size = blob.size();
  if (size < kHeaderBytes)
    return parse_error(ParseErrc::Truncated, "blob.header",
                       fmt::format("{} bytes, the header alone is {}", size, kHeaderBytes));
  const uint8_t* p = blob.data();
  const uint32_t magic = get32(p + kOffMagic);
  if (magic != kMagic)
    return parse_error(ParseErrc::BadValue, "blob.magic",
                       fmt::format("{:#010x} is not {:#010x} (\"FPHS\"): not an fph device state",
                                   magic, kMagic));
  const uint16_t version = get16(p + kOffVersion);
  if (version != kVersion)
    return parse_error(ParseErrc::BadVersion, "blob.version",
                       fmt::format("version {} is not understood; this build reads version {} only",
                                   version, kVersion));
  const uint16_t flags = get16(p + kOffFlags);
  if (flags != 0)
    return parse_error(ParseErrc::BadFlags, "blob.header_flags",
                       fmt::format("{:#06x}: no header flags are defined in version {}", flags,
                                   kVersion));
  const uint32_t total = get32(p + kOffTotalLength);
  if (total > kMaxBlobBytes || size > kMaxBlobBytes)
    return parse_error(ParseErrc::OutOfRange, "blob.total_length",
                       fmt::format("{} bytes (received {}) is more than the limit of {}", total,
                                   size, kMaxBlobBytes));
  if (total > size)
    return parse_error(ParseErrc::Truncated, "blob.total_length",
                       fmt::format("header says {} bytes, only {} received", total, size));
  if (total < size)
    return parse_error(ParseErrc::BadSize, "blob.total_length",
                       fmt::format("header says {} bytes, {} received", total, size));

  const uint32_t want = get32(p + kOffChecksum);
  static constexpr std::array<uint8_t, 4> kZero{};
  uint32_t got = crc32c(blob.first(kOffChecksum));
  got = crc32c(kZero, got);
  got = crc32c(blob.subspan(kOffChecksum + 4), got);
  if (got != want)
    return parse_error(ParseErrc::BadValue, "blob.checksum",
                       fmt::format("header says {:#010x}, the blob's CRC-32C is {:#010x}", want, got));

  DeviceState s;
  std::array<int, kKnown.size()> seen_at;
  seen_at.fill(-1);
  size_t off = kHeaderBytes;
  for (int i = 0; off < size; ++i) {
    if (size - off < kFieldHeaderBytes)
      return parse_error(ParseErrc::Truncated, fmt::format("field[{}]", i),
                         fmt::format("{} bytes left at offset {}, a field header is {}", size - off,
                                     off, kFieldHeaderBytes));
    const uint16_t type = get16(p + off);
    const uint16_t len = get16(p + off + 2);
    const std::string name = fmt::format("field[{}] (type {:#06x})", i, type);
    const size_t voff = off + kFieldHeaderBytes;
    if (len > size - voff)
      return parse_error(ParseErrc::Truncated, name + ".length",
                         fmt::format("{} bytes of value at offset {} run past total_length {}", len,
                                     voff, size));
    const size_t end = voff + align_up(len);
    if (end > size)
      return parse_error(ParseErrc::Truncated, name + ".padding",
                         fmt::format("value ends at {}, its padding to {} runs past total_length {}",
                                     voff + len, end, size));
    for (size_t k = voff + len; k < end; ++k)
      if (p[k] != 0)
        return parse_error(ParseErrc::BadValue, name + ".padding",
                           fmt::format("byte at offset {} is {:#04x}, padding must be zero", k, p[k]));
    const uint8_t* v = p + voff;
    off = end;

    const int k = known_index(type);
    if (k < 0) {
      if (type & kOptionalBit) continue;  // a newer source's optional field
      return parse_error(ParseErrc::BadValue, name + ".type",
                         fmt::format("unknown required field type {:#06x} (a newer source; "
                                     "unknown types are skipped only with bit {:#06x})",
                                     type, kOptionalBit));
    }
    const Known& kn = kKnown[static_cast<size_t>(k)];
    if (seen_at[static_cast<size_t>(k)] >= 0)
      return parse_error(ParseErrc::BadValue, name + ".type",
                         fmt::format("{} given twice (first as field[{}])", kn.name,
                                     seen_at[static_cast<size_t>(k)]));
    seen_at[static_cast<size_t>(k)] = i;
    if (type == kTypeSource) {
      if (len > kMaxSourceBytes)
        return parse_error(ParseErrc::BadSize, name + ".length",
                           fmt::format("source is at most {} bytes, got {}", kMaxSourceBytes, len));
    } else if (len != kn.length) {
      return parse_error(ParseErrc::BadSize, name + ".length",
                         fmt::format("{} is {} bytes, got {}", kn.name, kn.length, len));
    }

    switch (type) {
      case kTypeFeatures:
        s.features = get64(v);
        break;
      case kTypeProtocolFeatures:
        s.protocol_features = get64(v);
        break;
      case kTypeConfig:
        s.config = balloon::decode_config(std::span<const uint8_t, balloon::kConfigSize>(
            v, balloon::kConfigSize));
        break;
      case kTypeEpoch:
        s.epoch = get64(v);
        if (s.epoch > kMaxEpoch)
          return parse_error(ParseErrc::BadValue, name + ".value",
                             fmt::format("epoch {:#x} is not below 2^63", s.epoch));
        break;
      case kTypeFlags: {
        const uint32_t f = get32(v);
        if (f & ~kFlagsKnown)
          return parse_error(ParseErrc::BadValue, name + ".value",
                             fmt::format("flags {:#010x} has reserved bits {:#010x} set", f,
                                         f & ~kFlagsKnown));
        s.paused = f & kFlagPaused;
        s.pause_while_logging = f & kFlagPauseWhileLogging;
        break;
      }
      case kTypeStatus: {
        const uint32_t st = get32(v);
        if (st > 0xff)
          return parse_error(ParseErrc::BadValue, name + ".value",
                             fmt::format("status {:#x} does not fit in 8 bits", st));
        s.status = static_cast<uint8_t>(st);
        break;
      }
      case kTypeCounters:
        s.counters = Counters{get64(v), get64(v + 8), get64(v + 16), get64(v + 24)};
        break;
      case kTypeSource: {
        const std::span<const uint8_t> text(v, len);
        const size_t ok = valid_utf8_prefix(text);
        if (ok != len)
          return parse_error(ParseErrc::BadValue, name + ".value",
                             fmt::format("source is not UTF-8: bad byte {:#04x} at value offset {}",
                                         text[ok], ok));
        s.source.assign(reinterpret_cast<const char*>(v), len);
        break;
      }
      default:
        break;
    }
  }
  for (size_t k = 0; k < kKnown.size(); ++k)
    if (kKnown[k].required && seen_at[k] < 0)
      return parse_error(ParseErrc::BadValue, fmt::format("blob.{}", kKnown[k].name),
                         fmt::format("required field missing (type {:#06x})", kKnown[k].type));
  return s;
}

}  // namespace fph::proto::devstate
