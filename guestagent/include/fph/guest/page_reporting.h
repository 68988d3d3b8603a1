// Linux page reporting (mm/page_reporting.c) over the buddy model, minus the
// transport: the caller supplies a function that posts one request (<= 32
// blocks) and later calls complete(). Faithful rules:
//  - state IDLE/REQUESTED/ACTIVE; a free of order >= reporting order while
//    IDLE schedules a pass after `delay`;
//  - a pass isolates up to `capacity` candidate blocks per request, with
//    Linux's budget: per order list holding candidates,
//    DIV_ROUND_UP(nr_free, capacity * 16) + 1 requests per pass;
//  - at most `max_inflight` requests in flight (Linux: 1, it sleeps until the
//    chain returns);
//  - on completion the blocks go back to the tail of the free lists, marked
//    reported on success; on failure unmarked and the pass stops;
//  - if more work arrived (REQUESTED) the next pass runs after `delay`.
//
// The pass, step by step (poll() runs it; nothing happens between polls):
//  1. Due (state REQUESTED and now >= deadline): state := ACTIVE, budget :=
//     DIV_ROUND_UP(candidate blocks, capacity * 16) requests for this pass.
//  2. While fewer than max_inflight requests are in flight: isolate up to
//     `capacity` candidates (orders `order`..kMaxOrder, mixed in one
//     request, a short leftover batch included) under the zone lock, then
//     post them with NO lock held. No candidates left -> the pass is over.
//     Budget used up -> state := REQUESTED if candidates remain, pass over.
//  3. max_inflight requests outstanding: poll() returns max() and the pass
//     is paused. complete() puts the blocks back and makes the pass due at
//     once (next_due() == time_point::min(), the wakeup hook fires); the
//     next poll() continues it at step 2.
//  4. The pass ends only when nothing is in flight any more. Then REQUESTED
//     (a qualifying free arrived during the pass, the budget ran out with
//     candidates left, or a report failed) -> next pass at now + delay;
//     otherwise IDLE.
// Failures (post() returns false, or complete(id, false)): the blocks go
// back unmarked, the pass stops posting, and a retry pass is scheduled after
// `delay` (Linux goes IDLE unless a new free arrived; we retry so that a
// transient transport error does not leave memory unreported forever).
// Like Linux registration, construction requests an initial pass (its
// deadline is set by the first poll(): first poll time + delay).
// Differences from Linux: one budget per pass instead of per free list; no
// zone watermark gate; reports are posted as soon as `capacity` blocks are
// isolated (Linux waits until it sees one more candidate).
//
// Lock order: zone_lock before the internal mutex. post() and the wakeup
// hook are called with no lock held; post() may call complete() itself.
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
  uint64_t post_failures = 0;        // post() returned false (also in requests_failed)
  uint64_t budget_exhausted = 0;     // passes cut short by the budget with candidates left
  uint64_t unknown_completions = 0;  // complete() with an id not in flight (ignored)
};

// One request handed to the transport: the blocks, isolated, in order.
struct ReportRequest {
  uint64_t id = 0;
  std::vector<Block> blocks;
  // Set by the transport (BalloonDriver), steady_clock = CLOCK_MONOTONIC, so
  // comparable across processes: when the chain was made available (just
  // before the kick) and when its used element was seen. Unset (epoch) when
  // the transport does not track them.
  std::chrono::steady_clock::time_point posted{};
  std::chrono::steady_clock::time_point used{};
};

// Thread safe. The buddy allocator is shared with the workload; every access
// to it goes through the mutex passed in (the model's zone->lock).
class PageReporting {
 public:
  using PostFn = std::function<bool(const ReportRequest&)>;  // false = could not post
  using Clock = std::chrono::steady_clock;

  PageReporting(BuddyAllocator& buddy, std::mutex& zone_lock, ReportingOptions opts, PostFn post);

  // Called by the allocator user after a free (with the zone lock NOT held):
  // Linux page_reporting_notify_free(order). `order` should be the order
  // after merging (BuddyAllocator::free_merged()). IDLE -> REQUESTED with
  // deadline Clock::now() + delay (fires the wakeup hook); ACTIVE ->
  // REQUESTED (another pass after this one); REQUESTED -> no change.
  void notify_free(int order);
  // Same with an explicit current time (tests, fake clocks).
  void notify_free(int order, Clock::time_point now);
  // Drives the state machine: if a pass is due (now >= deadline), isolates
  // and posts requests until capacity, budget or max_inflight stops it.
  // Returns the time at which poll() should be called again (max() if idle).
  Clock::time_point poll(Clock::time_point now);
  // The transport returned request `id`. success = the device used the chain.
  void complete(uint64_t id, bool success);
  // Blocks currently isolated (in flight), e.g. to re-post after reconnect.
  std::vector<ReportRequest> inflight() const;
  // Forget the reported marks of every free block (migration epoch change):
  // they will be reported again, by a pass requested like notify_free()
  // does (after `delay`, batched and budgeted as usual; if a pass is running,
  // another one follows it). Blocks in flight keep their marks. Returns the
  // frames un-marked.
  uint64_t reset_reported_marks();

  ReportingState state() const;
  ReportingStats stats() const;
  const ReportingOptions& options() const { return opts_; }

  // When poll() should run next: time_point::min() = now (a completion let
  // the pass continue, or a request waits for its deadline to be set),
  // the pass deadline, or max() (idle, or waiting for completions).
  Clock::time_point next_due() const;
  // True between the start of a pass and its end (including while paused).
  bool pass_in_progress() const;
  // Called (no lock held) whenever next_due() moved earlier: a pass was
  // requested while idle, or a completion lets a paused pass continue.
  // Keep it cheap, e.g. write an eventfd the poll loop waits on.
  void set_wakeup(std::function<void()> fn);

 private:
  int pass_budget() const;  // Linux per-list budget for a new pass; zone lock held
  // IDLE -> REQUESTED (deadline now + delay, or set by the next poll() if
  // `now` is unknown), ACTIVE -> REQUESTED. Returns true if a pass was newly
  // scheduled (wake the poller). mu_ held.
  bool request_locked(const Clock::time_point* now);
  BuddyAllocator& buddy_;
  std::mutex& zone_lock_;
  ReportingOptions opts_;
  PostFn post_;
  mutable std::mutex mu_;
  ReportingState state_ = ReportingState::Idle;
  Clock::time_point deadline_ = Clock::time_point::max();
  uint64_t next_id_ = 1;
  uint64_t budget_left_ = 0;  // requests this pass may still post
  std::vector<ReportRequest> inflight_;
  ReportingStats stats_{};
  std::mutex poll_mu_;          // one poll() at a time; taken before zone_lock_
  bool deadline_unset_ = false;  // REQUESTED; the next poll() sets deadline_
  bool in_pass_ = false;         // a pass started and has not ended
  bool stop_posting_ = false;    // this pass posts no more (done/budget/failure)
  bool resume_ = false;          // a completion made the paused pass due now
  std::function<void()> wakeup_;
};

}  // namespace fph::guest
