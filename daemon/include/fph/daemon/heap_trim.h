// Returning freed heap to the kernel after bursts.
//
// glibc keeps memory that fphd freed in its malloc arenas, where it still
// counts in RssAnon. Two things free a lot at once: a metrics scrape (at
// 1024 VMs one scrape builds ~15 MiB of metric objects and 2.9 MB of text,
// then frees them) and sessions closing. The scale bench measured fphd at
// 55 MiB RssAnon with 1024 idle VMs after a scrape, and 38 MiB after
// malloc_trim(0), which hands free pages in every arena back (madvise), so
// the RssAnon an operator sees tracks what fphd holds, not its last peak.
//
// The sampler thread asks once per pass: a trim is due when the burst count
// (Metrics::heap_bursts) moved and the last burst began kSettle ago (the
// scrape's text is written, the teardown over), or when it moved
// kMaxBurstsUntrimmed times without settling (a scraper faster than the
// sampler). Nothing else calls it: a trim walks every arena under its lock,
// which the data path should not wait on more often than that.
#pragma once

#include <chrono>
#include <cstdint>

namespace fph::daemon {

class HeapTrim {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr uint64_t kMaxBurstsUntrimmed = 10;
  // A scrape of 1024 VMs is collected and written in a few milliseconds.
  static constexpr std::chrono::milliseconds kSettle{200};
  // `bursts`: a count that grows with each burst, the last of which began at
  // `last`. True: trim now.
  bool due(uint64_t bursts, Clock::time_point last, Clock::time_point now);
  // Below this much free heap (mallinfo2 fordblks) a due trim is skipped: a
  // scrape of 16 VMs leaves ~100 KiB, not worth a walk of every arena with
  // its madvise calls (fph-bench --thread-cpu saw the sampler at 0.2-0.35 ms
  // instead of ~0.15 ms in a window that followed a scrape).
  static constexpr uint64_t kMinFreeBytes = 4ull << 20;
  // due(), then malloc_trim(0) if due and worth it. Returns whether it trimmed.
  bool run(uint64_t bursts, Clock::time_point last, Clock::time_point now);

 private:
  uint64_t trimmed_ = 0;  // the count at the last trim
};

}  // namespace fph::daemon
