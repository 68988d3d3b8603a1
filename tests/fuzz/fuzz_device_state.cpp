// Fuzz target: the live-migration device-state blob (proto/device_state.h).
// Input: the bytes a destination reads from the SET_DEVICE_STATE_FD pipe.
// Checks: decode never crashes; what it accepts re-encodes canonically and
// decodes equal; every error names a field. Since almost every mutation
// breaks the checksum, the input is decoded a second time with a repaired
// header (magic, version, flags, total_length, checksum), so the mutations
// reach the field parser. A third pass builds a DeviceState from the bytes
// and checks decode(encode(x)) == x.
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "fph/proto/device_state.h"

namespace ds = fph::proto::devstate;
using fph::proto::ParseErrc;

namespace {
void check(bool ok) {
  if (!ok) __builtin_trap();
}

void put32(uint8_t* p, uint32_t v) {
  for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>(v >> (8 * b));
}

// Decodes `in` and checks the invariants; returns whether it was accepted.
bool decode_and_check(std::span<const uint8_t> in) {
  auto r = ds::decode(in);
  if (!r) {
    check(!r.error().field.empty());
    check(!r.error().detail.empty());
    return false;
  }
  check(in.size() >= ds::kHeaderBytes && in.size() <= ds::kMaxBlobBytes);
  check(r->epoch <= ds::kMaxEpoch);
  check(r->source.size() <= ds::kMaxSourceBytes);
  // Canonical form: encode of the decoded state decodes equal and is a
  // fixed point of decode -> encode.
  const auto bytes = ds::encode(*r);
  check(bytes.size() <= ds::kMaxBlobBytes);
  auto again = ds::decode(bytes);
  check(again.has_value());
  check(*again == *r);
  check(ds::encode(*again) == bytes);
  return true;
}

uint64_t take64(const uint8_t*& p, const uint8_t* end) {
  uint64_t v = 0;
  for (int b = 0; b < 8 && p < end; ++b) v |= static_cast<uint64_t>(*p++) << (8 * b);
  return v;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> in(data, size);
  const bool accepted = decode_and_check(in);
  if (size < ds::kHeaderBytes) check(!accepted);

  // Same bytes behind a valid header: only field-level errors are possible.
  if (size >= ds::kHeaderBytes) {
    std::vector<uint8_t> fixed(in.begin(), in.end());
    put32(fixed.data(), ds::kMagic);
    fixed[4] = static_cast<uint8_t>(ds::kVersion);
    fixed[5] = static_cast<uint8_t>(ds::kVersion >> 8);
    fixed[6] = fixed[7] = 0;
    put32(fixed.data() + 8, static_cast<uint32_t>(size));
    put32(fixed.data() + 12, 0);
    put32(fixed.data() + 12, ds::crc32c(fixed));
    auto r = ds::decode(fixed);
    if (size > ds::kMaxBlobBytes) {
      check(!r && r.error().code == ParseErrc::OutOfRange);
    } else if (!r) {
      const auto& f = r.error().field;
      check(f != "blob.header" && f != "blob.magic" && f != "blob.version" &&
            f != "blob.header_flags" && f != "blob.total_length" && f != "blob.checksum");
    }
    decode_and_check(fixed);
    // A single flipped bit in the checksum field is always caught.
    if (r) {
      fixed[12 + size % 4] ^= static_cast<uint8_t>(1u << (size % 8));
      auto bad = ds::decode(fixed);
      check(!bad && bad.error().field == "blob.checksum");
    }
  }

  // A state built from the bytes survives encode -> decode.
  const uint8_t* p = data;
  const uint8_t* end = data + size;
  ds::DeviceState x;
  x.features = take64(p, end);
  x.protocol_features = take64(p, end);
  const uint64_t c0 = take64(p, end), c1 = take64(p, end);
  x.config = {static_cast<uint32_t>(c0), static_cast<uint32_t>(c0 >> 32), static_cast<uint32_t>(c1),
              static_cast<uint32_t>(c1 >> 32)};
  const uint64_t misc = take64(p, end);
  x.epoch = take64(p, end) & ds::kMaxEpoch;
  x.paused = misc & 1;
  x.pause_while_logging = misc & 2;
  x.status = static_cast<uint8_t>(misc >> 8);
  if (misc & 4) x.counters = ds::Counters{take64(p, end), take64(p, end), take64(p, end), take64(p, end)};
  // Source: printable ASCII from the rest (always valid UTF-8), cut by encode at 256.
  for (; p < end && x.source.size() < ds::kMaxSourceBytes; ++p)
    x.source.push_back(static_cast<char>(0x20 + *p % 0x5f));
  const auto bytes = ds::encode(x);
  check(bytes.size() <= ds::kMaxBlobBytes);
  auto back = ds::decode(bytes);
  check(back.has_value());
  check(*back == x);
  return 0;
}
