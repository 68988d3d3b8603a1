// The virtio split virtqueue (virtio 1.2 section 2.7) seen from both sides.
//
// Device side (fphd): walk available chains and push used elements. Every
// descriptor is copied out of guest memory exactly once and validated before
// use: head and next in range, at most `num` steps (no loops), indirect tables
// only when negotiated, never nested, never combined with NEXT, length a
// multiple of 16; total length checked for overflow; readable descriptors
// before writable ones.
//
// Driver side (fph-guest): add chains, publish, read used elements, recycle
// descriptors.
//
// The ring memory is shared with the peer, which may change it at any time:
// all reads of peer-written fields go through atomic (relaxed/acquire) loads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "fph/common/expected.h"

namespace fph::proto::vq {

inline constexpr uint16_t kDescFNext = 1;
inline constexpr uint16_t kDescFWrite = 2;
inline constexpr uint16_t kDescFIndirect = 4;
inline constexpr uint16_t kAvailFNoInterrupt = 1;
inline constexpr uint16_t kUsedFNoNotify = 1;
inline constexpr size_t kDescSize = 16;
inline constexpr uint32_t kMaxQueueSize = 32768;

// Sizes and alignments of the three parts (virtio 1.2 section 2.7).
constexpr size_t desc_table_bytes(uint32_t num) { return kDescSize * num; }
constexpr size_t avail_ring_bytes(uint32_t num) { return 6 + 2 * size_t{num}; }
constexpr size_t used_ring_bytes(uint32_t num) { return 6 + 8 * size_t{num}; }
inline constexpr size_t kDescAlign = 16;
inline constexpr size_t kAvailAlign = 2;
inline constexpr size_t kUsedAlign = 4;

// True if num is a power of two in [1, 32768].
bool valid_queue_size(uint32_t num);

struct Desc {
  uint64_t addr = 0;
  uint32_t len = 0;
  uint16_t flags = 0;
  uint16_t next = 0;
};

// One buffer of a chain after validation: a guest physical range.
struct Buffer {
  uint64_t gpa = 0;
  uint32_t len = 0;
  bool device_writable = false;
};

struct Chain {
  uint16_t head = 0;
  std::vector<Buffer> buffers;
  uint64_t total_len = 0;
  bool indirect = false;
};

enum class ChainErrc : uint8_t {
  HeadOutOfRange,
  NextOutOfRange,
  TooLong,            // more steps than the queue size: a loop, or a chain longer than allowed
  IndirectNotNegotiated,
  IndirectBadLength,  // zero, not a multiple of 16, or more than kMaxQueueSize entries
  IndirectNested,
  IndirectWithNext,
  IndirectUnmapped,   // indirect table not inside guest memory
  ReadableAfterWritable,
  LengthOverflow,     // total chain length over 2^32
  AvailIndexJump,     // avail idx moved more than `num` past our position
  HeadInFlight,       // the avail ring offers a head the device has not returned yet
};

std::string_view to_string(ChainErrc c);
// Errors after which the ring cannot be served any more (the session must
// stop it): the avail index jumped, or a head still in flight was offered
// again (virtio 1.2 2.7.13: the driver makes a buffer available only once,
// until the device has used it; serving it twice would return one head
// twice and the driver would see a used id it no longer owns). Other chain
// errors concern one chain only.
bool ends_ring(ChainErrc c);

struct ChainError {
  ChainErrc code = ChainErrc::TooLong;
  uint16_t head = 0;
  uint32_t desc_index = 0;  // index of the offending descriptor (table-relative)
  std::string message() const;
};

// Maps guest physical ranges to this process's memory. Implemented by the
// daemon's guest memory map and by test fakes.
class GuestMemory {
 public:
  virtual ~GuestMemory() = default;
  // Host pointer to [gpa, gpa+len) if the whole range is inside one mapped
  // region, else nullptr.
  virtual uint8_t* translate(uint64_t gpa, uint64_t len) const = 0;
};

struct UsedElem {
  uint32_t id = 0;
  uint32_t len = 0;
};

// Device side of one split ring. The three pointers are this process's
// mappings of the descriptor table, available ring and used ring.
class DeviceRing {
 public:
  DeviceRing() = default;
  DeviceRing(uint16_t num, uint8_t* desc, uint8_t* avail, uint8_t* used, uint16_t next_avail,
             bool indirect_allowed, bool event_idx);

  bool ready() const { return num_ != 0; }
  uint16_t num() const { return num_; }
  uint16_t next_avail() const { return next_avail_; }
  uint16_t used_idx() const { return used_idx_; }

  // Guest's avail->idx (acquire).
  uint16_t avail_idx() const;
  // The next available head, or nullopt if none. Errors if the guest moved
  // avail->idx more than num entries ahead (AvailIndexJump), the head is out
  // of range (the slot is consumed either way, so one bad entry does not wedge
  // the ring), or the head is still in flight (HeadInFlight: taken by an
  // earlier pop_avail and not yet given to push_used; the slot is consumed
  // and the head stays in flight once). A head returned is in flight until
  // push_used(head).
  Expected<std::optional<uint16_t>, ChainError> pop_avail();
  // Whether `head` was taken by pop_avail and not returned yet.
  bool in_flight(uint16_t head) const;
  // A ring rebuilt over new addresses while running (a new kick fd, new
  // addresses from SET_VRING_ADDR): takes over the heads `old` still has in
  // flight, so they are still known when they come back. Same size only.
  void inherit_in_flight(const DeviceRing& old);
  // Walks and validates the chain starting at head.
  Expected<Chain, ChainError> walk(uint16_t head, const GuestMemory& mem) const;
  // Writes used[used_idx % num] = {head, len}, then publishes used->idx
  // (release); `head` is no longer in flight. Returns the byte offset of the
  // element within the used ring (for dirty logging).
  size_t push_used(uint16_t head, uint32_t len);
  // Whether the driver wants a notification after pushing (flags or
  // EVENT_IDX used_event rule).
  bool should_notify(uint16_t old_used_idx) const;
  // Re-reads used->idx from memory (on start after SET_VRING_ADDR).
  void sync_used_idx();

 private:
  uint16_t num_ = 0;
  uint8_t* desc_ = nullptr;
  uint8_t* avail_ = nullptr;
  uint8_t* used_ = nullptr;
  uint16_t next_avail_ = 0;
  uint16_t used_idx_ = 0;
  bool indirect_allowed_ = false;
  bool event_idx_ = false;
  std::vector<uint8_t> in_flight_;  // [head]: 1 from pop_avail until push_used
};

// Driver side of one split ring over memory the driver owns.
class DriverRing {
 public:
  DriverRing() = default;
  // Zeroes the three areas and builds the descriptor free list.
  DriverRing(uint16_t num, uint8_t* desc, uint8_t* avail, uint8_t* used);

  uint16_t num() const { return num_; }
  uint16_t free_count() const { return free_count_; }

  // Adds one chain of direct descriptors and makes it available (release
  // store of avail->idx). Returns the head, or nullopt if there are fewer
  // free descriptors than buffers or buffers is empty.
  std::optional<uint16_t> add_chain(std::span<const Buffer> buffers);
  // Next used element, with its chain's descriptors returned to the free list.
  std::optional<UsedElem> pop_used();
  // Whether the device asked not to be kicked (used->flags NO_NOTIFY).
  bool kick_suppressed() const;
  uint16_t avail_idx() const { return avail_idx_; }
  uint16_t last_used() const { return last_used_; }

 private:
  uint16_t num_ = 0;
  uint8_t* desc_ = nullptr;
  uint8_t* avail_ = nullptr;
  uint8_t* used_ = nullptr;
  uint16_t free_head_ = 0;
  uint16_t free_count_ = 0;
  uint16_t avail_idx_ = 0;
  uint16_t last_used_ = 0;
  std::vector<uint16_t> chain_len_;  // per head: descriptors in the chain
};

}  // namespace fph::proto::vq
