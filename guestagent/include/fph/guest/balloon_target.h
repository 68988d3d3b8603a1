// Balloon inflate/deflate of fph-guest: Linux drivers/virtio/virtio_balloon.c
// (fill_balloon, leak_balloon, towards_target, update_balloon_size,
// virtio_balloon_oom_notify) over the buddy model.
//
//  - The device sets the target in config `num_pages` (4 KiB pages). When it
//    changes (a config change: fph-guest polls the config, it has no
//    back-end channel), the driver moves the balloon towards it, one batch
//    of at most 256 pages (VIRTIO_BALLOON_ARRAY_PFNS_MAX) per step:
//  - inflate: order-0 pages are allocated from the buddy model (so neither
//    the workload nor page reporting can use them: blocks isolated for a
//    report are off the free lists, reported marks are dropped), their PFNs
//    (le32, guest-physical >> 12) go to the device on the inflate queue, and
//    once it used the buffer `actual` is written (config offset 4);
//  - deflate: PFNs of balloon pages go on the deflate queue, then the pages
//    are freed back to the buddy model (and page reporting is told, like
//    any free), then `actual` is written;
//  - no free memory for an inflate step ("Out of puff" in Linux): stop, and
//    retry at the next config poll;
//  - DEFLATE_ON_OOM, if negotiated: an allocation of the workload that fails
//    while the balloon holds pages deflates up to 256 pages
//    (VIRTIO_BALLOON_OOM_NR_PAGES) and writes `actual`, then the allocation
//    is retried. Deviation from Linux: it also ends an inflation still in
//    progress, so the balloon does not re-take what the workload needs
//    until the target changes again (Linux's work item would keep refilling).
//
// The page bookkeeping is here; the device side (posting the buffer,
// waiting for it, SET_CONFIG) is a BalloonTransport, BalloonDriver's on the
// driver thread, a fake in unit tests. Not thread safe: the driver thread
// owns it; the counters (stats()) may be read from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <vector>

#include "fph/guest/buddy.h"

namespace fph::guest {

inline constexpr uint32_t kBalloonArrayPfns = 256;  // VIRTIO_BALLOON_ARRAY_PFNS_MAX
inline constexpr uint32_t kBalloonOomPages = 256;   // VIRTIO_BALLOON_OOM_NR_PAGES

class BalloonTransport {
 public:
  virtual ~BalloonTransport() = default;
  // Hands `pfns` to the device on the inflate (or deflate) queue and waits
  // until it used the buffer. false: it did not (no connection, timeout).
  virtual bool tell(bool inflate, std::span<const uint32_t> pfns) = 0;
  // SET_CONFIG(actual). false: failed.
  virtual bool write_actual(uint32_t actual) = 0;
};

struct BalloonStats {
  uint32_t target = 0;               // num_pages last read
  uint32_t actual = 0;               // pages in the balloon
  uint64_t inflated_pages = 0;       // total given to the device
  uint64_t deflated_pages = 0;       // total taken back (including OOM)
  uint64_t oom_deflated_pages = 0;   // taken back under memory pressure
  uint64_t oom_deflates = 0;         // OOM deflations that released pages
  uint64_t no_memory_stalls = 0;     // inflate steps that found no free page
  uint64_t failed_requests = 0;      // tell() or write_actual() failed
};

class BalloonTarget {
 public:
  enum class Step {
    Idle,      // at the target (or no config change pending)
    Progress,  // one batch done, more to do
    Reached,   // this batch reached the target
    NoMemory,  // inflate: no free page; retry later
    Failed,    // the transport failed (pages stay where they were)
  };

  // `gpa_base`: guest-physical address of frame 0 (PFN = gpa >> 12).
  BalloonTarget(BuddyAllocator& buddy, std::mutex& zone, uint64_t gpa_base,
                bool deflate_on_oom = false);

  // Called for each page taken into the balloon, after it left the buddy
  // model (fph-guest: drop its reported mark in the integrity checker).
  std::function<void(uint64_t frame)> on_inflated;
  // Called for each page about to go back to the buddy model, still in the
  // balloon (fph-guest: write the poison value, as Linux poisons a page it
  // frees when PAGE_POISON is in use).
  std::function<void(uint64_t frame)> on_deflating;
  // Called after a page went back to the buddy model with the order of the
  // block it ended up in (page reporting's notify_free); zone lock not held.
  std::function<void(int order)> on_freed;

  // num_pages as read from the device. A value different from the last one
  // seen is a config change: the balloon moves towards it.
  void set_target(uint32_t num_pages);
  // A config change is being followed (towards_target() != 0 after it).
  bool pending() const { return pending_; }
  // Linux towards_target(): target - actual (positive: inflate).
  int64_t towards_target() const;
  // One batch towards the target.
  Step step(BalloonTransport& t);
  // Negotiated DEFLATE_ON_OOM (set at every connection).
  void set_deflate_on_oom(bool on) { deflate_on_oom_ = on; }
  bool deflate_on_oom() const { return deflate_on_oom_; }
  // Memory pressure: deflates up to `pages` (if DEFLATE_ON_OOM) and writes
  // actual. Returns the pages given back to the buddy model.
  uint32_t oom_deflate(BalloonTransport& t, uint32_t pages = kBalloonOomPages);

  uint32_t actual() const { return actual_.load(); }
  uint32_t target() const { return target_.load(); }
  // Frames in the balloon (tests).
  const std::vector<uint64_t>& frames() const { return frames_; }
  bool contains(uint64_t frame) const;
  BalloonStats stats() const;

 private:
  uint32_t deflate(BalloonTransport& t, uint32_t n, bool* failed);
  uint32_t pfn(uint64_t frame) const { return static_cast<uint32_t>(pfn_base_ + frame); }

  BuddyAllocator& buddy_;
  std::mutex& zone_;
  uint64_t pfn_base_;
  bool pfn_ok_;  // every frame's PFN fits in le32
  bool deflate_on_oom_;
  bool pending_ = false;
  bool seen_ = false;
  std::vector<uint64_t> frames_;  // balloon pages, most recent last
  std::vector<uint8_t> in_balloon_;  // per frame
  std::atomic<uint32_t> target_{0};
  std::atomic<uint32_t> actual_{0};
  std::atomic<uint64_t> inflated_{0}, deflated_{0}, oom_deflated_{0}, oom_deflates_{0},
      no_memory_{0}, failed_{0};
};

}  // namespace fph::guest
