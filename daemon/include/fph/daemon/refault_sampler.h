// Refault sampling: how much of what fphd discarded came back.
//
// A bounded ring per VM remembers the most recently discarded shared-memory
// ranges (fphd's own mapping of them, the region kept by weak reference).
// sample() asks the kernel with mincore(2) which of those pages are resident
// again: on a MAP_SHARED file mapping mincore reports the file's page cache,
// so a page the guest touched after the discard (read or write: shmem
// allocates a page on either) shows up even though fphd never touched it.
// Bytes resident again within `window` of the discard are refaulted; each
// range's count only grows (its maximum is what has been counted), and a
// range is forgotten once it is older than the window, evicted by newer
// discards, or discarded again (the newer entry replaces it, so one refault
// is never counted twice).
//
// Cost: one mincore per tracked range per sample, 1 byte per 4 KiB page,
// bounded by max_bytes per VM (1 GiB = 256 Ki pages); nothing on the discard
// path except a short locked push. Sampling is a lower bound: ranges evicted
// from the ring or refaulted after the window are not seen.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>

#include "fph/daemon/guest_memory.h"

namespace fph::daemon {

class RefaultTracker {
 public:
  using Clock = std::chrono::steady_clock;
  struct Options {
    size_t max_ranges = 512;
    uint64_t max_bytes = 1ull << 30;
    std::chrono::seconds window{120};
  };
  RefaultTracker() : RefaultTracker(Options{}) {}
  explicit RefaultTracker(Options o) : opts_(o) {}

  // [addr, addr+len) of `region`'s mapping was discarded (pipeline threads).
  // Page-aligned; anything else is ignored.
  void discarded(const std::shared_ptr<MappedRegion>& region, uint8_t* addr, uint64_t len,
                 Clock::time_point now = Clock::now());
  // Samples every tracked range; returns the bytes newly found resident since
  // the previous sample (the refault counter's increment). One sampler thread.
  uint64_t sample(Clock::time_point now = Clock::now());

  size_t tracked_ranges() const;
  uint64_t tracked_bytes() const;

 private:
  struct Entry {
    uint64_t id;
    std::weak_ptr<MappedRegion> region;
    uint8_t* addr;
    uint64_t len;
    Clock::time_point at;
    uint64_t counted;  // refaulted bytes of this range already counted
  };
  void evict_locked();
  Options opts_;
  mutable std::mutex mu_;
  std::deque<Entry> ring_;  // oldest first, ids ascending
  uint64_t bytes_ = 0;
  uint64_t next_id_ = 0;
};

// Resident bytes of [addr, addr+len) by mincore, or -1 on error (unmapped).
int64_t resident_bytes(const uint8_t* addr, uint64_t len);

}  // namespace fph::daemon
