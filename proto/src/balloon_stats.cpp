// The virtio-balloon statistics buffer (balloon_stats.h).
#include "fph/proto/balloon_stats.h"

#include <fmt/format.h>

namespace fph::proto::balloon {

std::string_view to_string(StatTag t) {
  switch (t) {
    case StatTag::SwapIn: return "swap_in";
    case StatTag::SwapOut: return "swap_out";
    case StatTag::MajorFaults: return "majflt";
    case StatTag::MinorFaults: return "minflt";
    case StatTag::MemFree: return "memfree";
    case StatTag::MemTotal: return "memtot";
    case StatTag::Available: return "avail";
    case StatTag::Caches: return "caches";
    case StatTag::HugetlbAllocs: return "htlb_pgalloc";
    case StatTag::HugetlbFails: return "htlb_pgfail";
    case StatTag::OomKills: return "oom_kills";
    case StatTag::AllocStalls: return "alloc_stall";
    case StatTag::AsyncScan: return "async_scan";
    case StatTag::DirectScan: return "direct_scan";
    case StatTag::AsyncReclaim: return "async_reclaim";
    case StatTag::DirectReclaim: return "direct_reclaim";
  }
  return "unknown";
}

bool is_cumulative(StatTag t) {
  switch (t) {
    case StatTag::MemFree:
    case StatTag::MemTotal:
    case StatTag::Available:
    case StatTag::Caches:
      return false;
    default:
      return true;
  }
}

ParseResult<Stats> parse_stats(std::span<const uint8_t> bytes) {
  if (bytes.size() > kMaxStatsBytes)
    return parse_error(ParseErrc::OutOfRange, "stats.length",
                       fmt::format("{} bytes is more than {} entries of {} bytes", bytes.size(),
                                   kMaxStatsEntries, kStatEntryBytes));
  if (bytes.size() % kStatEntryBytes != 0)
    return parse_error(ParseErrc::BadSize, "stats.length",
                       fmt::format("{} bytes is not a multiple of the {}-byte entry {{le16 tag; le64 val}}",
                                   bytes.size(), kStatEntryBytes));
  Stats s;
  std::array<bool, kStatTags> seen{};
  for (size_t off = 0; off < bytes.size(); off += kStatEntryBytes) {
    const uint8_t* p = bytes.data() + off;
    const uint16_t tag = static_cast<uint16_t>(p[0] | p[1] << 8);
    uint64_t val = 0;
    for (int i = 7; i >= 0; --i) val = val << 8 | p[2 + i];
    s.entries++;
    if (tag >= kStatTags) {
      s.unknown_tags++;
      continue;
    }
    if (seen[tag]) s.duplicates++;
    seen[tag] = true;
    s.values[tag] = val;
  }
  return s;
}

std::vector<uint8_t> encode_stats(std::span<const StatEntry> entries) {
  std::vector<uint8_t> out;
  const size_t n = std::min(entries.size(), kMaxStatsEntries);
  out.reserve(n * kStatEntryBytes);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(static_cast<uint8_t>(entries[i].tag));
    out.push_back(static_cast<uint8_t>(entries[i].tag >> 8));
    for (int b = 0; b < 8; ++b) out.push_back(static_cast<uint8_t>(entries[i].val >> (8 * b)));
  }
  return out;
}

std::vector<uint8_t> encode_stats(const Stats& s) {
  std::vector<StatEntry> e;
  for (size_t t = 0; t < kStatTags; ++t)
    if (s.values[t]) e.push_back({static_cast<uint16_t>(t), *s.values[t]});
  return encode_stats(e);
}

}  // namespace fph::proto::balloon
