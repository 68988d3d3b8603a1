// The device-state blob fphd exchanges with the front end when a VM migrates
// (vhost-user SET_DEVICE_STATE_FD, direction SAVE on the source, LOAD on the
// destination, phase STOPPED; the end of the blob is EOF on the pipe and the
// front end asks CHECK_DEVICE_STATE afterwards).
//
// Layout, all integers little-endian:
//
//   offset 0   u32 magic         0x53485046: the bytes 'F' 'P' 'H' 'S'
//          4   u16 version       1
//          6   u16 flags         0 (no flags are defined; any bit set is refused)
//          8   u32 total_length  the whole blob, header included; must equal
//                                the number of bytes received
//         12   u32 checksum      CRC-32C of the whole blob, this field taken as 0
//         16   fields, each:
//                u16 type        bit 0x8000: optional (see below)
//                u16 length      bytes of value, not counting padding
//                value           `length` bytes
//                padding         zero bytes up to the next multiple of 4, so
//                                every field header starts 4-byte aligned
//
//   type    name               value                               required
//   0x0001  features           u64 negotiated virtio feature bits  yes
//   0x0002  protocol_features  u64 vhost-user protocol features    yes
//   0x0003  config             16 bytes: balloon config space      yes
//   0x0004  epoch              u64, below 2^63                     yes
//   0x0005  flags              u32: bit 0 paused, bit 1            yes
//                              pause_while_logging, others 0
//   0x0006  status             u32 holding the u8 device status    yes
//   0x8001  counters           4 x u64: reported, discarded,       no
//                              skipped bytes; requests
//   0x8002  source             UTF-8 text, at most 256 bytes       no
//
// Why this shape:
//  - The blob is small (a few hundred bytes) and sent once, after the device
//    has stopped, so there is no iterative phase and no need to be clever:
//    the destination reads it whole, checks it, and only then applies it.
//  - Nothing in it depends on the source host: no addresses, no fds, no
//    memory-table offsets or ring positions. The destination gets a fresh
//    memory table and vring state from the front end; what it needs from us
//    is only what the guest has negotiated and what the operator decided.
//  - Type-length-value fields with an "optional" bit, as in the Xen and QEMU
//    migration streams: a newer source that only adds optional fields can
//    still migrate to an older destination, which skips what it does not
//    know. A new field the destination must understand gets a type without
//    the bit, and an older destination refuses the blob instead of silently
//    running with half the state.
//  - The decoder is strict and bounded: the input is untrusted (it comes
//    through the front end from another host). Every length is checked
//    against the blob before it is used, the blob is at most kMaxBlobBytes,
//    known fields have exact sizes, duplicates, reserved bits and nonzero
//    padding are refused, and the checksum catches a truncated or damaged
//    stream that happens to parse.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "fph/proto/balloon.h"
#include "fph/proto/error.h"

namespace fph::proto::devstate {

inline constexpr uint32_t kMagic = 0x53485046;  // "FPHS" in memory order
inline constexpr uint16_t kVersion = 1;
inline constexpr size_t kHeaderBytes = 16;
inline constexpr size_t kMaxBlobBytes = 64 * 1024;
inline constexpr size_t kFieldHeaderBytes = 4;
inline constexpr size_t kFieldAlign = 4;
inline constexpr size_t kMaxSourceBytes = 256;
inline constexpr uint64_t kMaxEpoch = (1ull << 63) - 1;

// Field types. kOptionalBit set: a decoder that does not know the type skips it.
inline constexpr uint16_t kOptionalBit = 0x8000;
inline constexpr uint16_t kTypeFeatures = 0x0001;
inline constexpr uint16_t kTypeProtocolFeatures = 0x0002;
inline constexpr uint16_t kTypeConfig = 0x0003;
inline constexpr uint16_t kTypeEpoch = 0x0004;
inline constexpr uint16_t kTypeFlags = 0x0005;
inline constexpr uint16_t kTypeStatus = 0x0006;
inline constexpr uint16_t kTypeCounters = 0x8001;
inline constexpr uint16_t kTypeSource = 0x8002;

// Bits of the flags field (0x0005).
inline constexpr uint32_t kFlagPaused = 1u << 0;
inline constexpr uint32_t kFlagPauseWhileLogging = 1u << 1;
inline constexpr uint32_t kFlagsKnown = kFlagPaused | kFlagPauseWhileLogging;

struct Counters {
  uint64_t reported_bytes = 0;
  uint64_t discarded_bytes = 0;
  uint64_t skipped_bytes = 0;
  uint64_t requests = 0;
  bool operator==(const Counters&) const = default;
};

struct DeviceState {
  uint64_t features = 0;           // negotiated virtio feature bits
  uint64_t protocol_features = 0;  // negotiated vhost-user protocol features
  balloon::Config config{};
  uint64_t epoch = 0;                // migration epoch, <= kMaxEpoch
  bool paused = false;               // reclaim paused by the operator
  bool pause_while_logging = false;  // policy: pause while dirty logging is on
  uint8_t status = 0;                // virtio device status byte
  std::optional<Counters> counters;  // informational; absent if not sent
  std::string source;                // informational; empty if not sent

  bool operator==(const DeviceState& o) const;
};

// CRC-32C (Castagnoli, reflected polynomial 0x82f63b78). `seed` is the CRC
// of the bytes before `bytes` (0 for none), so a CRC can be computed in
// pieces: crc32c(b, crc32c(a)) == crc32c(a followed by b). With the default
// seed this is the standard CRC-32C (init and final xor 0xffffffff):
// crc32c("123456789") == 0xe3069283.
uint32_t crc32c(std::span<const uint8_t> bytes, uint32_t seed = 0);

// Encodes `s` in type order; counters only if present, source only if not
// empty. The source is cut to its longest valid UTF-8 prefix of at most
// kMaxSourceBytes bytes (it is informational; a bad name must not stop a
// migration). The epoch is written as given: one above kMaxEpoch makes a blob
// the destination refuses, which fails the migration loudly rather than
// starting the destination with a different epoch. The result is never
// longer than kMaxBlobBytes.
std::vector<uint8_t> encode(const DeviceState& s);

// Decodes and checks one blob; it must be exactly the bytes received. Errors
// name the part that is wrong: `blob.header`, `blob.magic`, `blob.version`,
// `blob.header_flags`, `blob.total_length`, `blob.checksum`, `blob.<name>` for a
// missing required field, and `field[i] (type 0xNNNN).type|length|value|padding`
// for the i-th field (from 0). Allocates nothing beyond the result (source
// at most kMaxSourceBytes).
ParseResult<DeviceState> decode(std::span<const uint8_t> blob);

}  // namespace fph::proto::devstate
