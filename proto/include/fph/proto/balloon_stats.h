// The virtio-balloon statistics buffer (VIRTIO_BALLOON_F_STATS_VQ; virtio 1.2
// section 5.5.6.3, Linux include/uapi/linux/virtio_balloon.h): a packed
// array of {le16 tag; le64 val} entries, 10 bytes each, that the driver puts
// on the stats queue as one device-readable buffer.
//
// parse_stats is total: any byte string gives either a Stats or an error
// naming the field (`stats.length`, `stats[3].tag`, ...). It is bounded:
// at most kMaxStatsEntries entries (Linux sends 10 in 6.1, 16 in newer
// kernels). Unknown tags are counted and ignored, as the spec asks of a
// device; a tag sent twice keeps its last value (QEMU does the same).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "fph/proto/error.h"

namespace fph::proto::balloon {

enum class StatTag : uint16_t {
  SwapIn = 0,         // bytes swapped in (cumulative)
  SwapOut = 1,        // bytes swapped out (cumulative)
  MajorFaults = 2,    // major page faults (cumulative)
  MinorFaults = 3,    // minor page faults (cumulative)
  MemFree = 4,        // bytes of memory not used at all
  MemTotal = 5,       // bytes of memory the guest can use
  Available = 6,      // bytes available for new work without swapping (MemAvailable)
  Caches = 7,         // bytes of disk caches that can be reclaimed quickly
  HugetlbAllocs = 8,  // hugetlb page allocations (cumulative)
  HugetlbFails = 9,   // hugetlb page allocation failures (cumulative)
  OomKills = 10,      // OOM killer invocations (cumulative; newer Linux)
  AllocStalls = 11,   // allocation stalls (cumulative; newer Linux)
  AsyncScan = 12,     // pages scanned by kswapd (cumulative)
  DirectScan = 13,    // pages scanned by direct reclaim (cumulative)
  AsyncReclaim = 14,  // pages reclaimed by kswapd (cumulative)
  DirectReclaim = 15, // pages reclaimed by direct reclaim (cumulative)
};
inline constexpr size_t kStatTags = 16;
inline constexpr size_t kStatEntryBytes = 10;
inline constexpr size_t kMaxStatsEntries = 64;
inline constexpr size_t kMaxStatsBytes = kMaxStatsEntries * kStatEntryBytes;

// The tag's name as Linux spells it without the prefix, lower case:
// "swap_in", "memfree", ..., or "unknown".
std::string_view to_string(StatTag t);
// Whether the value is a cumulative event count on the guest side (as
// opposed to a current amount of memory).
bool is_cumulative(StatTag t);

struct Stats {
  std::array<std::optional<uint64_t>, kStatTags> values{};  // by tag; empty: not sent
  uint32_t entries = 0;       // entries in the buffer, known or not
  uint32_t unknown_tags = 0;  // entries with a tag >= kStatTags (ignored)
  uint32_t duplicates = 0;    // entries repeating an earlier tag (last one wins)

  std::optional<uint64_t> get(StatTag t) const { return values[static_cast<size_t>(t)]; }
  void set(StatTag t, uint64_t v) { values[static_cast<size_t>(t)] = v; }
};

// Parses one stats buffer. Errors: `stats.length` (not a multiple of 10, or
// more than kMaxStatsBytes; an empty buffer is valid and says nothing).
ParseResult<Stats> parse_stats(std::span<const uint8_t> bytes);

struct StatEntry {
  uint16_t tag = 0;
  uint64_t val = 0;
};
// Encodes entries in order (the driver side; tests). At most
// kMaxStatsEntries are written.
std::vector<uint8_t> encode_stats(std::span<const StatEntry> entries);
// Encodes every tag present in `s`, in tag order.
std::vector<uint8_t> encode_stats(const Stats& s);

}  // namespace fph::proto::balloon
