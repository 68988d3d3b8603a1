// Linux page reporting (mm/page_reporting.c) over the buddy model, minus the
// transport: the caller supplies a function that posts one request (<= 32
// blocks) and later calls complete(). Faithful rules:
//  - state IDLE/REQUESTED/ACTIVE; a free of order >= reporting order while
//    IDLE schedules a pass after `delay`;
//  - a pass isolates up to `capacity` candidate blocks per request, with a
//    budget of DIV_ROUND_UP(candidates, capacity * 16) requests per pass;
//  - at most `max_inflight` requests in flight (Linux: 1, it sleeps until the
//    chain returns);
//  - on completion the blocks go back to the tail of the free lists, marked
//    reported on success; on failure unmarked and the pass stops;
//  - if more work arrived (REQUESTED) the next pass runs after `delay`.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

#include "fph/guest/buddy.h"

namespace fph::guest {

struct ReportingOptions {
  int order = 9;                                   // page_reporting_order (9 = 2 MiB)
  size_t capacity = 32;                            // PAGE_REPORTING_CAPACITY
  std::chrono::milliseconds delay{2000};           // PAGE_REPORTING_DELAY
  int max_inflight = 1;                            // requests outstanding at once
  bool budget = true;                              // Linux's per-pass budget
};

enum class ReportingState { Idle, Requested, Active };

struct ReportingStats {
  uint64_t requests = 0;
  uint64_t blocks_reported = 0;
  uint64_t bytes_reported = 0;
  uint64_t requests_failed = 0;
  uint64_t passes = 0;
};

// One request handed to the transport: the blocks, isolated, in order.
struct ReportRequest {
  uint64_t id = 0;
  std::vector<Block> blocks;
};

// Thread safe. The buddy allocator is shared with the workload; every access
// to it goes through the mutex passed in (the model's zone->lock).
class PageReporting {
 public:
  using PostFn = std::function<bool(const ReportRequest&)>;  // false = could not post
  using Clock = std::chrono::steady_clock;

  PageReporting(BuddyAllocator& buddy, std::mutex& zone_lock, ReportingOptions opts, PostFn post);

  // Called by the allocator user after a free (with the zone lock NOT held):
  // Linux page_reporting_notify_free(order).
  void notify_free(int order);
  // Drives the state machine: if a pass is due (now >= deadline), isolates
  // and posts requests until capacity, budget or max_inflight stops it.
  // Returns the time at which poll() should be called again (max() if idle).
  Clock::time_point poll(Clock::time_point now);
  // The transport returned request `id`. success = the device used the chain.
  void complete(uint64_t id, bool success);
  // Blocks currently isolated (in flight), e.g. to re-post after reconnect.
  std::vector<ReportRequest> inflight() const;
  // Forget the reported marks of every free block (migration epoch change):
  // they will be reported again.
  void reset_reported_marks();

  ReportingState state() const;
  ReportingStats stats() const;
  const ReportingOptions& options() const { return opts_; }

 private:
  BuddyAllocator& buddy_;
  std::mutex& zone_lock_;
  ReportingOptions opts_;
  PostFn post_;
  mutable std::mutex mu_;
  ReportingState state_ = ReportingState::Idle;
  Clock::time_point deadline_ = Clock::time_point::max();
  uint64_t next_id_ = 1;
  int budget_left_ = 0;
  std::vector<ReportRequest> inflight_;
  ReportingStats stats_{};
};

}  // namespace fph::guest
