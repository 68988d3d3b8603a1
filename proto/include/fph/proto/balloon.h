// virtio-balloon constants, config layout and queue numbering
// (virtio 1.2 section 5.5; reference section 1).
#pragma once

#include <array>
#include <cstdint>
#include <span>

#include "fph/proto/error.h"

namespace fph::proto::balloon {

inline constexpr uint32_t kDeviceId = 5;
inline constexpr uint32_t kPfnShift = 12;  // VIRTIO_BALLOON_PFN_SHIFT: 4 KiB units

// Device feature bits.
inline constexpr uint64_t kFMustTellHost = 1ull << 0;
inline constexpr uint64_t kFStatsVq = 1ull << 1;
inline constexpr uint64_t kFDeflateOnOom = 1ull << 2;
inline constexpr uint64_t kFFreePageHint = 1ull << 3;
inline constexpr uint64_t kFPagePoison = 1ull << 4;
inline constexpr uint64_t kFReporting = 1ull << 5;
// fph's extension (docs/migration.md "The epoch"): the VM's migration epoch,
// a u32 at config offset 16, right after the standard 16 bytes. fphd bumps
// it when a VM's device state is loaded on a migration destination (and on
// `fphctl re-report`), and a driver that negotiated the bit reports all its
// free memory again when it changes. Bit 52 lies in the device-specific
// range 50..127 of virtio 1.2 (2.2), far from where the balloon spec
// allocates its bits (0..6 so far), so a future standard bit is unlikely to
// collide, and below 2^53, so the fphd_vm_features gauge (a double) stays
// exact. A driver that does not know it (Linux) never acks it and never
// reads past offset 16.
inline constexpr uint64_t kFFphEpoch = 1ull << 52;
inline constexpr uint32_t kOffFphEpoch = 16;
inline constexpr uint32_t kExtConfigSize = 20;  // standard config + the epoch
// Generic virtio feature bits.
inline constexpr uint64_t kFIndirectDesc = 1ull << 28;
inline constexpr uint64_t kFEventIdx = 1ull << 29;
inline constexpr uint64_t kFVersion1 = 1ull << 32;

// Virtio device status bits.
inline constexpr uint8_t kStatusAcknowledge = 1;
inline constexpr uint8_t kStatusDriver = 2;
inline constexpr uint8_t kStatusDriverOk = 4;
inline constexpr uint8_t kStatusFeaturesOk = 8;
inline constexpr uint8_t kStatusNeedsReset = 64;
inline constexpr uint8_t kStatusFailed = 128;

// Config space, always little-endian.
struct Config {
  uint32_t num_pages = 0;              // offset 0, device writes
  uint32_t actual = 0;                 // offset 4, driver writes
  uint32_t free_page_hint_cmd_id = 0;  // offset 8, valid with FREE_PAGE_HINT
  uint32_t poison_val = 0;             // offset 12, valid with PAGE_POISON
};
inline constexpr uint32_t kConfigSize = 16;
inline constexpr uint32_t kOffNumPages = 0;
inline constexpr uint32_t kOffActual = 4;
inline constexpr uint32_t kOffFreePageHintCmdId = 8;
inline constexpr uint32_t kOffPoisonVal = 12;

std::array<uint8_t, kConfigSize> encode_config(const Config& c);
Config decode_config(std::span<const uint8_t, kConfigSize> bytes);
// Whether the driver may write [offset, offset+size) of config space
// (only `actual` and `poison_val`), unless it is a migration write.
bool driver_writable(uint32_t offset, uint32_t size);

// The config space a device exposes, in bytes: the standard 16, plus fph's
// epoch (offset 16, 4 bytes) when kFFphEpoch is *offered*. virtio 1.2 2.5.1:
// fields of features the device offers are readable before FEATURES_OK, so
// the size depends on the offer, not on what the driver acked.
constexpr uint32_t config_space_size(uint64_t offered_features) {
  return (offered_features & kFFphEpoch) ? kExtConfigSize : kConfigSize;
}

// The one check of a GET_CONFIG / SET_CONFIG access against the config
// space (docs/protocol.md "Message rules"): size > 0 and
// [offset, offset + size) inside `space` bytes (no overflow); a write
// additionally lies inside the standard 16 bytes (the epoch is read only,
// even for a migration write: it travels in the device state) and, unless
// it is a migration write, inside one driver-writable field. The error
// names the field (`config.size`, `config.offset`) and the bound.
enum class ConfigAccess : uint8_t { Read, Write, MigrationWrite };
Expected<void, ParseError> check_config_access(uint32_t offset, uint32_t size, uint32_t space,
                                               ConfigAccess access);

// Queue roles, numbered densely by negotiated features the way Linux
// (vp_find_vqs skips absent queues) and QEMU do it: inflate, deflate,
// [stats], [free_page], [reporting]. The spec text's fixed indices (4 for
// reporting) are not what real drivers use.
enum class QueueRole : uint8_t { Inflate, Deflate, Stats, FreePage, Reporting, None };
std::string_view to_string(QueueRole r);

struct QueueLayout {
  int inflate = 0;
  int deflate = 1;
  int stats = -1;
  int free_page = -1;
  int reporting = -1;
  int count = 2;
  QueueRole role(uint32_t index) const;
};
QueueLayout queue_layout(uint64_t features);

// Linux page reporting constants (mm/page_reporting.h).
inline constexpr uint32_t kReportingCapacity = 32;
inline constexpr uint32_t kReportingQueueSize = 32;  // QEMU's reporting_vq size; Linux needs >= 32
inline constexpr uint8_t kLinuxPagePoison = 0xaa;

}  // namespace fph::proto::balloon
