// Fuzz target: the virtio-balloon stats buffer parser (proto/balloon_stats.h).
// Input: the bytes of one stats buffer as a driver would put them on the
// stats queue. Checks: parse_stats never crashes, errors only on a bad
// length, counts add up, and what it accepts survives encode -> parse.
#include <cstdint>
#include <span>

#include "fph/proto/balloon_stats.h"

namespace b = fph::proto::balloon;

namespace {
void check(bool ok) {
  if (!ok) __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = b::parse_stats(std::span<const uint8_t>(data, size));
  const bool length_ok = size % b::kStatEntryBytes == 0 && size <= b::kMaxStatsBytes;
  check(r.has_value() == length_ok);
  if (!r) {
    check(r.error().field == "stats.length");
    return 0;
  }
  check(r->entries == size / b::kStatEntryBytes);
  check(r->unknown_tags + r->duplicates <= r->entries);
  size_t known = 0;
  for (const auto& v : r->values) known += v.has_value();
  check(known + r->unknown_tags + r->duplicates == r->entries);
  // Round trip of the known tags.
  auto bytes = b::encode_stats(*r);
  auto again = b::parse_stats(bytes);
  check(again.has_value());
  check(again->values == r->values);
  check(again->unknown_tags == 0 && again->duplicates == 0);
  return 0;
}
