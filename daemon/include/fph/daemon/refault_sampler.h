// Refault sampling: how much of what fphd discarded came back.
//
// A bounded ring per VM remembers the most recently discarded shmem ranges
// whose discard freed something (the region kept by weak reference).
// sample() asks the kernel how much of each range holds pages again: a page
// the guest touched after the discard (read or write: shmem allocates a page
// on either) is back in the file's page cache, although fphd never touched
// it. Bytes back within `window` of the discard are refaulted; each range's
// count only grows (its maximum is what has been counted), and a range is
// forgotten once it is older than the window, wholly back, evicted by newer
// discards, or discarded again (the newer entry replaces it, so one refault
// is never counted twice).
//
// A range discarded again before any sample saw it come back (a guest that
// frees, reuses and frees a block within a second) is still counted: the
// new discard freed memory there (measured around the syscall, `freed`), so
// the guest had populated it again since the old discard. Its share of what
// the new discard freed, less what the sampler already counted for the old
// entry, is credited as refaulted at the next sample.
//
// How: lseek(SEEK_DATA) on fphd's own file description finds the first page
// at or after the range's start, skipping empty xarray nodes, so a range that
// is still a hole (the common case) costs one syscall; from that page on,
// mincore(2) on fphd's MAP_SHARED mapping reads the page cache page by page,
// bounded by the range. Neither alone will do: mincore over every tracked
// page cost a quarter of the discard threads' own CPU in fph-bench, on the
// same xarray the discards were emptying, and SEEK_HOLE walks to the end of
// the data extent, which can be the whole guest.
//
// hugetlbfs ranges are not tracked: hugetlbfs has no SEEK_DATA (every offset
// is data) and mincore there reads the caller's page tables, never the
// guest's. Nothing on the discard path but a short locked push. Sampling is
// a lower bound: ranges evicted from the ring or refaulted after the window
// are not seen.
#pragma once

#include <array>
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
  // `freed`: bytes the discard freed (its verified outcome); -1 if unknown.
  void discarded(const std::shared_ptr<MappedRegion>& region, uint8_t* addr, uint64_t len,
                 Clock::time_point now = Clock::now(), int64_t freed = -1);
  // Samples every tracked range; returns the bytes newly found resident since
  // the previous sample (the refault counter's increment). One sampler thread.
  // `recent_bytes` (optional) gets the part of them from ranges discarded at
  // most `recent` ago: what the refault backoff judges (refault_backoff.h), so
  // a VM that reuses its memory a minute after freeing it is not taken for
  // one that reuses it within seconds.
  uint64_t sample(Clock::time_point now = Clock::now(), Clock::duration recent = Clock::duration::zero(),
                  uint64_t* recent_bytes = nullptr);

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
  // Refaults found by a re-discard, by the age of the discard they came back
  // after (whole seconds), until the next sample takes them.
  // (Allocated on the first credit: most VMs never get one.)
  std::unique_ptr<std::array<uint64_t, 122>> credit_by_age_;
  Options opts_;
  mutable std::mutex mu_;
  std::deque<Entry> ring_;  // oldest first, ids ascending
  uint64_t bytes_ = 0;
  uint64_t next_id_ = 0;
};

// Resident bytes of [addr, addr+len) by mincore, or -1 on error (unmapped).
int64_t resident_bytes(const uint8_t* addr, uint64_t len);
// Resident bytes of [addr, addr+len) of `region`'s mapping: lseek(SEEK_DATA)
// on region.seek_fd to skip the leading hole, then mincore. -1 on error.
int64_t range_resident_bytes(const MappedRegion& region, const uint8_t* addr, uint64_t len);

}  // namespace fph::daemon
