// virtio-balloon config space and queue numbering (virtio 1.2 section 5.5;
// reference sections 1.2 and 1.3).
#include "fph/proto/balloon.h"

#include <cstring>

#include <fmt/format.h>

#include "fph/common/checked.h"

namespace fph::proto::balloon {

namespace {

void put_le32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
  p[2] = static_cast<uint8_t>(v >> 16);
  p[3] = static_cast<uint8_t>(v >> 24);
}

uint32_t get_le32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

}  // namespace

// The config space is little-endian even for legacy devices (5.5.4).
std::array<uint8_t, kConfigSize> encode_config(const Config& c) {
  std::array<uint8_t, kConfigSize> out{};
  put_le32(out.data() + kOffNumPages, c.num_pages);
  put_le32(out.data() + kOffActual, c.actual);
  put_le32(out.data() + kOffFreePageHintCmdId, c.free_page_hint_cmd_id);
  put_le32(out.data() + kOffPoisonVal, c.poison_val);
  return out;
}

Config decode_config(std::span<const uint8_t, kConfigSize> bytes) {
  Config c;
  c.num_pages = get_le32(bytes.data() + kOffNumPages);
  c.actual = get_le32(bytes.data() + kOffActual);
  c.free_page_hint_cmd_id = get_le32(bytes.data() + kOffFreePageHintCmdId);
  c.poison_val = get_le32(bytes.data() + kOffPoisonVal);
  return c;
}

// The driver writes only `actual` (4..8) and `poison_val` (12..16); a write
// must lie entirely inside one of them. Empty writes are not writes.
bool driver_writable(uint32_t offset, uint32_t size) {
  if (size == 0) return false;
  return range_within(offset, size, kOffActual, 4) || range_within(offset, size, kOffPoisonVal, 4);
}

Expected<void, ParseError> check_config_access(uint32_t offset, uint32_t size, uint32_t space,
                                               ConfigAccess access) {
  if (size == 0) return parse_error(ParseErrc::OutOfRange, "config.size", "is 0");
  const auto end = checked_add(offset, size);
  if (!end || *end > space) {
    return parse_error(ParseErrc::OutOfRange, "config.offset",
                       fmt::format("offset {} + size {} is past the end of the {}-byte config space",
                                   offset, size, space));
  }
  if (access == ConfigAccess::Read) return {};
  if (*end > kConfigSize) {
    return parse_error(ParseErrc::OutOfRange, "config.offset",
                       fmt::format("offset {} + size {}: only the first {} bytes are writable "
                                   "(fph's epoch at {} is read only)",
                                   offset, size, kConfigSize, kOffFphEpoch));
  }
  if (access == ConfigAccess::Write && !driver_writable(offset, size)) {
    return parse_error(ParseErrc::BadValue, "config.offset",
                       fmt::format("offset {} size {}: the driver may write only `actual` (4..8) "
                                   "and `poison_val` (12..16)",
                                   offset, size));
  }
  return {};
}

std::string_view to_string(QueueRole r) {
  switch (r) {
    case QueueRole::Inflate: return "inflate";
    case QueueRole::Deflate: return "deflate";
    case QueueRole::Stats: return "stats";
    case QueueRole::FreePage: return "free_page";
    case QueueRole::Reporting: return "reporting";
    case QueueRole::None: return "none";
  }
  return "none";
}

QueueRole QueueLayout::role(uint32_t index) const {
  if (index >= static_cast<uint32_t>(count)) return QueueRole::None;
  const int i = static_cast<int>(index);
  if (i == inflate) return QueueRole::Inflate;
  if (i == deflate) return QueueRole::Deflate;
  if (i == stats) return QueueRole::Stats;
  if (i == free_page) return QueueRole::FreePage;
  if (i == reporting) return QueueRole::Reporting;
  return QueueRole::None;
}

// Dense numbering by negotiated features (reference 1.3): inflate, deflate,
// then each present optional queue in the order stats, free_page, reporting.
QueueLayout queue_layout(uint64_t features) {
  QueueLayout l;
  int next = 2;
  if (features & kFStatsVq) l.stats = next++;
  if (features & kFFreePageHint) l.free_page = next++;
  if (features & kFReporting) l.reporting = next++;
  l.count = next;
  return l;
}

}  // namespace fph::proto::balloon
