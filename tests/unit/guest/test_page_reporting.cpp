// PageReporting: the Linux page_reporting state machine over the buddy
// model, driven with a fake clock and a fake transport (post function).
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "fph/guest/buddy.h"
#include "fph/guest/page_reporting.h"

namespace fph::guest {
namespace {

using Clock = PageReporting::Clock;
using namespace std::chrono_literals;

const Clock::time_point kT0 = Clock::time_point{} + 1h;
constexpr auto kMax = Clock::time_point::max();

// Records posted requests; checks post() runs without the zone lock.
struct FakeTransport {
  std::mutex* zone = nullptr;
  std::vector<ReportRequest> posted;
  bool accept = true;
  bool zone_was_locked = false;
  PageReporting* inline_complete = nullptr;  // complete synchronously inside post()

  PageReporting::PostFn fn() {
    return [this](const ReportRequest& r) {
      if (zone->try_lock()) {
        zone->unlock();
      } else {
        zone_was_locked = true;
      }
      if (!accept) return false;
      posted.push_back(r);
      if (inline_complete) inline_complete->complete(r.id, true);
      return true;
    };
  }
};

ReportingOptions opts_with(size_t capacity = 32, bool budget = true, int max_inflight = 1) {
  ReportingOptions o;
  o.order = 9;
  o.capacity = capacity;
  o.delay = 2000ms;
  o.max_inflight = max_inflight;
  o.budget = budget;
  return o;
}

struct Fixture {
  explicit Fixture(uint64_t frames, ReportingOptions o = opts_with())
      : buddy(frames), pr(buddy, zone, o, (tr.zone = &zone, tr.fn())) {
    pr.set_wakeup([this] { ++wakeups; });
  }
  BuddyAllocator buddy;
  std::mutex zone;
  FakeTransport tr;
  PageReporting pr;
  int wakeups = 0;

  // Completes every in-flight request, then polls at `now`.
  Clock::time_point complete_all_and_poll(Clock::time_point now, bool ok = true) {
    for (const auto& r : pr.inflight()) pr.complete(r.id, ok);
    return pr.poll(now);
  }
  bool invariants() {
    std::string why;
    const bool ok = buddy.check_invariants(&why);
    if (!ok) ADD_FAILURE() << why;
    return ok;
  }
};

TEST(PageReporting, InitialPassWaitsForTheDelay) {
  Fixture f(4 * 1024);
  EXPECT_EQ(f.pr.state(), ReportingState::Requested);  // registration requests a pass
  EXPECT_EQ(f.pr.next_due(), Clock::time_point::min());
  EXPECT_EQ(f.pr.poll(kT0), kT0 + 2s);  // first poll fixes the deadline
  EXPECT_EQ(f.pr.next_due(), kT0 + 2s);
  EXPECT_EQ(f.pr.poll(kT0 + 1999ms), kT0 + 2s);
  EXPECT_TRUE(f.tr.posted.empty());
  EXPECT_EQ(f.pr.stats().passes, 0u);

  EXPECT_EQ(f.pr.poll(kT0 + 2s), kMax);  // paused: one request in flight
  ASSERT_EQ(f.tr.posted.size(), 1u);
  EXPECT_EQ(f.tr.posted[0].blocks.size(), 4u);  // the leftover partial batch is reported
  EXPECT_EQ(f.pr.state(), ReportingState::Active);
  EXPECT_TRUE(f.pr.pass_in_progress());
  EXPECT_EQ(f.buddy.stats().isolated_frames, 4u * 1024);
  EXPECT_FALSE(f.tr.zone_was_locked);

  f.pr.complete(f.tr.posted[0].id, true);
  EXPECT_EQ(f.pr.next_due(), Clock::time_point::min());
  EXPECT_EQ(f.pr.poll(kT0 + 2s), kMax);  // nothing left: idle
  EXPECT_EQ(f.pr.state(), ReportingState::Idle);
  EXPECT_FALSE(f.pr.pass_in_progress());
  EXPECT_EQ(f.tr.posted.size(), 1u);
  EXPECT_EQ(f.buddy.stats().reported_frames, 4u * 1024);
  const ReportingStats s = f.pr.stats();
  EXPECT_EQ(s.requests, 1u);
  EXPECT_EQ(s.passes, 1u);
  EXPECT_EQ(s.blocks_reported, 4u);
  EXPECT_EQ(s.bytes_reported, 4u * 4 * 1024 * 1024);
  EXPECT_TRUE(f.invariants());
}

TEST(PageReporting, NotifyFreeFromIdleSchedulesAfterDelay) {
  Fixture f(2048);
  std::vector<uint64_t> held;
  {
    std::lock_guard g(f.zone);
    while (auto a = f.buddy.alloc(9)) held.push_back(*a);
  }
  ASSERT_EQ(held.size(), 4u);
  f.pr.poll(kT0);
  EXPECT_EQ(f.pr.poll(kT0 + 2s), kMax);  // initial pass: nothing to report
  EXPECT_EQ(f.pr.state(), ReportingState::Idle);
  EXPECT_EQ(f.pr.stats().passes, 1u);

  const Clock::time_point t1 = kT0 + 10s;
  f.pr.notify_free(8, t1);  // below the reporting order: ignored
  EXPECT_EQ(f.pr.state(), ReportingState::Idle);
  EXPECT_EQ(f.wakeups, 0);

  int merged;
  {
    std::lock_guard g(f.zone);
    merged = f.buddy.free_merged(held[0], 9);
  }
  EXPECT_EQ(merged, 9);
  f.pr.notify_free(merged, t1);
  EXPECT_EQ(f.pr.state(), ReportingState::Requested);
  EXPECT_EQ(f.wakeups, 1);
  EXPECT_EQ(f.pr.next_due(), t1 + 2s);
  f.pr.notify_free(9, t1 + 1s);  // already requested: deadline unchanged
  EXPECT_EQ(f.wakeups, 1);
  EXPECT_EQ(f.pr.poll(t1 + 1s), t1 + 2s);
  EXPECT_EQ(f.pr.poll(t1 + 1999ms), t1 + 2s);
  EXPECT_TRUE(f.tr.posted.empty());
  EXPECT_EQ(f.pr.poll(t1 + 2s), kMax);
  ASSERT_EQ(f.tr.posted.size(), 1u);
  ASSERT_EQ(f.tr.posted[0].blocks.size(), 1u);
  EXPECT_EQ(f.tr.posted[0].blocks[0].frame, held[0]);
  EXPECT_EQ(f.tr.posted[0].blocks[0].order, 9);
  EXPECT_EQ(f.complete_all_and_poll(t1 + 2s), kMax);
  EXPECT_TRUE(f.buddy.is_reported(held[0]));
  EXPECT_EQ(f.pr.state(), ReportingState::Idle);
}

TEST(PageReporting, CapacityPerRequestAndOneInFlight) {
  // 100 max-order blocks + one order-9 block; budget off to see one pass.
  Fixture f(100 * 1024 + 512, opts_with(32, /*budget=*/false));
  f.pr.poll(kT0);
  Clock::time_point now = kT0 + 2s;
  EXPECT_EQ(f.pr.poll(now), kMax);
  ASSERT_EQ(f.tr.posted.size(), 1u);
  // Mixed orders in one request: the order-9 block first, then order 10.
  EXPECT_EQ(f.tr.posted[0].blocks.size(), 32u);
  EXPECT_EQ(f.tr.posted[0].blocks[0].order, 9);
  EXPECT_EQ(f.tr.posted[0].blocks[1].order, 10);
  EXPECT_EQ(f.pr.inflight().size(), 1u);
  EXPECT_EQ(f.pr.inflight()[0].id, f.tr.posted[0].id);

  // max_inflight = 1: polling again posts nothing until complete().
  EXPECT_EQ(f.pr.poll(now + 5s), kMax);
  EXPECT_EQ(f.pr.poll(now + 50s), kMax);
  EXPECT_EQ(f.tr.posted.size(), 1u);
  EXPECT_EQ(f.pr.next_due(), kMax);

  std::vector<size_t> sizes{32};
  for (int i = 0; i < 10 && f.pr.pass_in_progress(); ++i) {
    const int w = f.wakeups;
    f.pr.complete(f.pr.inflight().at(0).id, true);
    EXPECT_EQ(f.wakeups, w + 1);
    EXPECT_EQ(f.pr.next_due(), Clock::time_point::min());
    const size_t before = f.tr.posted.size();
    f.pr.poll(now);
    if (f.tr.posted.size() > before) {
      EXPECT_EQ(f.tr.posted.size(), before + 1);  // exactly one more
      sizes.push_back(f.tr.posted.back().blocks.size());
    }
  }
  EXPECT_EQ(sizes, (std::vector<size_t>{32, 32, 32, 5}));  // leftover partial batch too
  EXPECT_EQ(f.pr.state(), ReportingState::Idle);
  EXPECT_EQ(f.pr.stats().passes, 1u);
  EXPECT_EQ(f.pr.stats().blocks_reported, 101u);
  EXPECT_EQ(f.buddy.stats().reported_frames, 100u * 1024 + 512);
  EXPECT_EQ(f.buddy.unreported_candidate_blocks(9), 0u);
  EXPECT_TRUE(f.invariants());
  // Unknown ids are ignored.
  f.pr.complete(12345, true);
  EXPECT_EQ(f.pr.stats().unknown_completions, 1u);
}

TEST(PageReporting, SeveralInFlight) {
  Fixture f(100 * 1024, opts_with(32, /*budget=*/false, /*max_inflight=*/3));
  f.pr.poll(kT0);
  EXPECT_EQ(f.pr.poll(kT0 + 2s), kMax);
  ASSERT_EQ(f.tr.posted.size(), 3u);  // one poll fills the window
  // Completing one request lets exactly one more go.
  f.pr.complete(f.tr.posted[1].id, true);  // out of order is fine
  f.pr.poll(kT0 + 2s);
  ASSERT_EQ(f.tr.posted.size(), 4u);
  EXPECT_EQ(f.tr.posted[3].blocks.size(), 4u);
  EXPECT_TRUE(f.pr.pass_in_progress());
  // Nothing left to isolate, but the pass ends only when all are back.
  f.pr.complete(f.tr.posted[0].id, true);
  EXPECT_EQ(f.pr.poll(kT0 + 2s), kMax);
  EXPECT_TRUE(f.pr.pass_in_progress());
  f.pr.complete(f.tr.posted[2].id, true);
  f.pr.complete(f.tr.posted[3].id, true);
  EXPECT_EQ(f.pr.poll(kT0 + 2s), kMax);
  EXPECT_FALSE(f.pr.pass_in_progress());
  EXPECT_EQ(f.pr.state(), ReportingState::Idle);
  EXPECT_EQ(f.buddy.stats().reported_frames, 100u * 1024);
}

TEST(PageReporting, TransportCompletingInsidePostRunsThePassInOnePoll) {
  Fixture f(100 * 1024, opts_with(32, /*budget=*/false));
  f.tr.inline_complete = &f.pr;
  f.pr.poll(kT0);
  EXPECT_EQ(f.pr.poll(kT0 + 2s), kMax);
  EXPECT_EQ(f.tr.posted.size(), 4u);
  EXPECT_EQ(f.pr.state(), ReportingState::Idle);
  EXPECT_EQ(f.buddy.stats().reported_frames, 100u * 1024);
  EXPECT_FALSE(f.tr.zone_was_locked);
}

TEST(PageReporting, BudgetLimitsRequestsPerPass) {
  // Linux page_reporting_cycle: per order list, DIV_ROUND_UP(nr_free,
  // capacity * 16) + 1 report calls per pass. 64 max-order blocks, capacity
  // 2: DIV_ROUND_UP(64, 32) + 1 = 3 requests per pass. nr_free counts the
  // reported blocks too, so the budget stays 3 in later passes.
  Fixture f(64 * 1024, opts_with(/*capacity=*/2, /*budget=*/true));
  f.pr.poll(kT0);
  Clock::time_point now = kT0 + 2s;
  f.pr.poll(now);
  ASSERT_EQ(f.tr.posted.size(), 1u);
  EXPECT_EQ(f.complete_all_and_poll(now), kMax);
  ASSERT_EQ(f.tr.posted.size(), 2u);
  EXPECT_EQ(f.complete_all_and_poll(now), kMax);
  ASSERT_EQ(f.tr.posted.size(), 3u);
  // Budget spent with 58 candidates left: REQUESTED, next pass after delay.
  EXPECT_EQ(f.complete_all_and_poll(now), now + 2s);
  EXPECT_EQ(f.tr.posted.size(), 3u);
  EXPECT_EQ(f.pr.state(), ReportingState::Requested);
  EXPECT_FALSE(f.pr.pass_in_progress());
  EXPECT_EQ(f.pr.stats().budget_exhausted, 1u);
  EXPECT_EQ(f.buddy.stats().reported_frames, 6u * 1024);
  EXPECT_EQ(f.pr.poll(now + 1s), now + 2s);
  EXPECT_EQ(f.tr.posted.size(), 3u);

  // Drive passes to the end: each posts min(3, requests still needed).
  int passes = 1;
  std::vector<size_t> per_pass;
  while (f.pr.state() != ReportingState::Idle && passes < 100) {
    now += 2s;
    const size_t before = f.tr.posted.size();
    Clock::time_point next = f.pr.poll(now);
    while (next == kMax && f.pr.pass_in_progress()) next = f.complete_all_and_poll(now);
    per_pass.push_back(f.tr.posted.size() - before);
    ++passes;
    if (f.pr.state() != ReportingState::Idle) {
      EXPECT_EQ(next, now + 2s);
    }
  }
  ASSERT_FALSE(per_pass.empty());
  EXPECT_EQ(per_pass[0], 3u);
  EXPECT_EQ(f.buddy.unreported_candidate_blocks(9), 0u);
  EXPECT_EQ(f.buddy.stats().reported_frames, 64u * 1024);
  EXPECT_EQ(f.pr.stats().passes, static_cast<uint64_t>(passes));
  uint64_t left = 58;
  for (size_t i = 0; i < per_pass.size(); ++i) {
    // The last pass may end early (no candidates) rather than on budget.
    EXPECT_EQ(per_pass[i], std::min<uint64_t>(3, (left + 1) / 2)) << "pass " << i;
    left -= std::min<uint64_t>(left, per_pass[i] * 2);
  }
  EXPECT_EQ(left, 0u);

  // Budget off: one pass does everything.
  Fixture g(64 * 1024, opts_with(2, /*budget=*/false));
  g.pr.poll(kT0);
  Clock::time_point next = g.pr.poll(kT0 + 2s);
  while (next == kMax && g.pr.pass_in_progress()) next = g.complete_all_and_poll(kT0 + 2s);
  EXPECT_EQ(g.tr.posted.size(), 32u);
  EXPECT_EQ(g.pr.stats().passes, 1u);
  EXPECT_EQ(g.pr.state(), ReportingState::Idle);
}

TEST(PageReporting, FailedCompletionReturnsBlocksUnmarkedAndStopsThePass) {
  Fixture f(100 * 1024, opts_with(32, /*budget=*/false));
  f.pr.poll(kT0);
  const Clock::time_point now = kT0 + 2s;
  f.pr.poll(now);
  ASSERT_EQ(f.tr.posted.size(), 1u);
  const std::vector<Block> blocks = f.tr.posted[0].blocks;
  f.pr.complete(f.tr.posted[0].id, false);
  for (const Block& b : blocks) EXPECT_FALSE(f.buddy.is_reported(b.frame));
  EXPECT_EQ(f.buddy.stats().isolated_frames, 0u);
  EXPECT_EQ(f.buddy.stats().reported_frames, 0u);
  EXPECT_EQ(f.buddy.unreported_candidate_blocks(9), 100u);
  // The pass stops: no further request, a retry pass after the delay.
  EXPECT_EQ(f.pr.poll(now), now + 2s);
  EXPECT_EQ(f.tr.posted.size(), 1u);
  EXPECT_EQ(f.pr.state(), ReportingState::Requested);
  EXPECT_FALSE(f.pr.pass_in_progress());
  EXPECT_EQ(f.pr.stats().requests_failed, 1u);
  EXPECT_EQ(f.pr.stats().blocks_reported, 0u);
  EXPECT_TRUE(f.invariants());
  // The retry reports the same blocks again (they went to the list tails).
  EXPECT_EQ(f.pr.poll(now + 1s), now + 2s);
  f.pr.poll(now + 2s);
  ASSERT_EQ(f.tr.posted.size(), 2u);
  EXPECT_EQ(f.pr.stats().passes, 2u);
}

TEST(PageReporting, PostFailurePutsBackAndReschedules) {
  Fixture f(8 * 1024);
  f.tr.accept = false;
  f.pr.poll(kT0);
  EXPECT_EQ(f.pr.poll(kT0 + 2s), kT0 + 4s);
  EXPECT_TRUE(f.pr.inflight().empty());
  EXPECT_EQ(f.buddy.stats().isolated_frames, 0u);
  EXPECT_EQ(f.buddy.stats().reported_frames, 0u);
  EXPECT_EQ(f.buddy.unreported_candidate_blocks(9), 8u);
  EXPECT_EQ(f.pr.stats().post_failures, 1u);
  EXPECT_EQ(f.pr.stats().requests_failed, 1u);
  EXPECT_EQ(f.pr.state(), ReportingState::Requested);
  EXPECT_TRUE(f.invariants());
  f.tr.accept = true;
  f.pr.poll(kT0 + 4s);
  ASSERT_EQ(f.tr.posted.size(), 1u);
  EXPECT_EQ(f.tr.posted[0].blocks.size(), 8u);
  f.complete_all_and_poll(kT0 + 4s);
  EXPECT_EQ(f.buddy.stats().reported_frames, 8u * 1024);
}

TEST(PageReporting, RequestDuringActivePassCausesAnotherPassAfterDelay) {
  Fixture f(8 * 1024, opts_with(2, /*budget=*/false));
  uint64_t held;
  {
    std::lock_guard g(f.zone);
    held = *f.buddy.alloc(10);
  }
  f.pr.poll(kT0);
  const Clock::time_point now = kT0 + 2s;
  f.pr.poll(now);
  ASSERT_EQ(f.tr.posted.size(), 1u);
  EXPECT_EQ(f.pr.state(), ReportingState::Active);

  const int w = f.wakeups;
  f.pr.notify_free(10, now + 100ms);  // during the pass: no new deadline, no wakeup
  EXPECT_EQ(f.pr.state(), ReportingState::Requested);
  EXPECT_EQ(f.wakeups, w);
  EXPECT_TRUE(f.pr.pass_in_progress());

  // The pass continues and finishes its work...
  Clock::time_point next = kMax;
  while (f.pr.pass_in_progress()) next = f.complete_all_and_poll(now + 200ms);
  EXPECT_EQ(f.tr.posted.size(), 4u);  // 7 free blocks, capacity 2
  // ...then, REQUESTED seen at its end, another pass follows after the delay.
  EXPECT_EQ(next, now + 200ms + 2s);
  EXPECT_EQ(f.pr.state(), ReportingState::Requested);

  // The block freed in between is reported by that next pass.
  {
    std::lock_guard g(f.zone);
    EXPECT_EQ(f.buddy.free_merged(held, 10), 10);
  }
  f.pr.notify_free(10, now + 300ms);  // already REQUESTED: no change
  EXPECT_EQ(f.pr.poll(now + 2s), now + 200ms + 2s);
  EXPECT_EQ(f.tr.posted.size(), 4u);
  f.pr.poll(now + 200ms + 2s);
  ASSERT_EQ(f.tr.posted.size(), 5u);
  ASSERT_EQ(f.tr.posted[4].blocks.size(), 1u);
  EXPECT_EQ(f.tr.posted[4].blocks[0].frame, held);
  EXPECT_EQ(f.complete_all_and_poll(now + 200ms + 2s), kMax);
  EXPECT_EQ(f.pr.state(), ReportingState::Idle);
  EXPECT_EQ(f.pr.stats().passes, 2u);
  EXPECT_EQ(f.buddy.stats().reported_frames, 8u * 1024);
}

TEST(PageReporting, ReportedBlocksAreNotReportedAgainUntilReallocated) {
  Fixture f(4 * 1024);
  f.pr.poll(kT0);
  f.pr.poll(kT0 + 2s);
  f.complete_all_and_poll(kT0 + 2s);
  ASSERT_EQ(f.tr.posted.size(), 1u);
  // A notify with nothing new: the pass finds no candidates.
  f.pr.notify_free(10, kT0 + 10s);
  f.pr.poll(kT0 + 12s);
  EXPECT_EQ(f.tr.posted.size(), 1u);
  EXPECT_EQ(f.pr.state(), ReportingState::Idle);
  // Allocate one block and free it: only that one is reported again.
  uint64_t a;
  {
    std::lock_guard g(f.zone);
    a = *f.buddy.alloc(10);
    f.buddy.free(a, 10);
  }
  f.pr.notify_free(10, kT0 + 20s);
  f.pr.poll(kT0 + 22s);
  ASSERT_EQ(f.tr.posted.size(), 2u);
  ASSERT_EQ(f.tr.posted[1].blocks.size(), 1u);
  EXPECT_EQ(f.tr.posted[1].blocks[0].frame, a);
}

TEST(PageReporting, ResetReportedMarksMakesEverythingACandidateAgain) {
  Fixture f(8 * 1024);
  f.pr.poll(kT0);
  f.pr.poll(kT0 + 2s);
  f.complete_all_and_poll(kT0 + 2s);
  ASSERT_EQ(f.pr.state(), ReportingState::Idle);
  ASSERT_EQ(f.buddy.stats().reported_frames, 8u * 1024);

  const int w = f.wakeups;
  f.pr.reset_reported_marks();
  EXPECT_EQ(f.buddy.stats().reported_frames, 0u);
  EXPECT_EQ(f.buddy.unreported_candidate_blocks(9), 8u);
  EXPECT_EQ(f.pr.state(), ReportingState::Requested);
  EXPECT_EQ(f.wakeups, w + 1);
  EXPECT_EQ(f.pr.next_due(), Clock::time_point::min());  // poll now to start the delay
  const Clock::time_point t = kT0 + 60s;
  EXPECT_EQ(f.pr.poll(t), t + 2s);
  f.pr.poll(t + 2s);
  ASSERT_EQ(f.tr.posted.size(), 2u);
  EXPECT_EQ(f.tr.posted[1].blocks.size(), 8u);
  f.complete_all_and_poll(t + 2s);
  EXPECT_EQ(f.buddy.stats().reported_frames, 8u * 1024);
  EXPECT_TRUE(f.invariants());
}

TEST(PageReporting, LowerReportingOrder) {
  ReportingOptions o = opts_with(32, false);
  o.order = 0;
  Fixture f(1024, o);
  { std::lock_guard g(f.zone); ASSERT_EQ(f.buddy.alloc(0), 0u); }
  f.pr.poll(kT0);
  f.pr.poll(kT0 + 2s);
  ASSERT_EQ(f.tr.posted.size(), 1u);
  EXPECT_EQ(f.tr.posted[0].blocks.size(), 10u);  // orders 0..9, one each
  for (int i = 0; i < 10; ++i) EXPECT_EQ(f.tr.posted[0].blocks[i].order, i);
}

// Threads: a workload allocating and freeing, a transport completing from
// its own thread, and the poller. Checks the locking (ASan/TSan-friendly)
// and that everything ends consistent. No timing assertions.
TEST(PageReporting, ConcurrentWorkloadTransportAndPoller) {
  BuddyAllocator buddy(16 * 1024);
  std::mutex zone;
  std::mutex qmu;
  std::condition_variable qcv;
  std::deque<uint64_t> queue;
  bool stop_transport = false;
  ReportingOptions o = opts_with(4, /*budget=*/true, /*max_inflight=*/2);
  o.delay = 0ms;
  PageReporting pr(buddy, zone, o, [&](const ReportRequest& r) {
    std::lock_guard g(qmu);
    queue.push_back(r.id);
    qcv.notify_one();
    return true;
  });
  std::atomic<uint64_t> completed{0};
  std::thread transport([&] {
    uint64_t n = 0;
    for (;;) {
      std::unique_lock g(qmu);
      qcv.wait(g, [&] { return stop_transport || !queue.empty(); });
      if (queue.empty()) return;
      const uint64_t id = queue.front();
      queue.pop_front();
      g.unlock();
      pr.complete(id, (++n % 7) != 0);  // some failures
      completed.fetch_add(1);
    }
  });
  std::atomic<bool> workload_done{false};
  std::thread workload([&] {
    std::mt19937_64 rng(7);
    std::vector<std::pair<uint64_t, int>> held;
    // Keep going until the reporter has really run alongside (bounded).
    for (int i = 0; i < 20000 || (completed.load() < 200 && i < 20000000); ++i) {
      if (i % 64 == 0) std::this_thread::yield();
      if (held.empty() || rng() % 2 == 0) {
        const int order = static_cast<int>(rng() % 11);
        std::lock_guard g(zone);
        if (auto a = buddy.alloc(order)) held.emplace_back(*a, order);
      } else {
        const size_t k = rng() % held.size();
        int merged;
        {
          std::lock_guard g(zone);
          merged = buddy.free_merged(held[k].first, held[k].second);
        }
        held[k] = held.back();
        held.pop_back();
        if (merged >= 0) pr.notify_free(merged);
      }
    }
    for (auto [f, ord] : held) {
      int merged;
      {
        std::lock_guard g(zone);
        merged = buddy.free_merged(f, ord);
      }
      pr.notify_free(merged);
    }
    workload_done = true;
  });
  // Poll until the workload is done and reporting has gone idle.
  for (int i = 0; i < 10000000; ++i) {
    pr.poll(Clock::now());
    if (workload_done && pr.state() == ReportingState::Idle && pr.inflight().empty()) break;
    std::this_thread::yield();
  }
  workload.join();
  {
    std::lock_guard g(qmu);
    stop_transport = true;
    qcv.notify_one();
  }
  transport.join();
  EXPECT_EQ(pr.state(), ReportingState::Idle);
  std::lock_guard g(zone);
  std::string why;
  EXPECT_TRUE(buddy.check_invariants(&why)) << why;
  EXPECT_EQ(buddy.stats().isolated_frames, 0u);
  EXPECT_EQ(buddy.stats().free_frames, 16u * 1024);
  EXPECT_EQ(buddy.stats().bad_frees, 0u);
  EXPECT_EQ(buddy.stats().bad_putbacks, 0u);
  EXPECT_EQ(buddy.unreported_candidate_blocks(9), 0u);  // everything ended reported
  EXPECT_EQ(completed.load(), pr.stats().requests);
  EXPECT_GE(pr.stats().requests, 200u);
  EXPECT_GT(pr.stats().requests_failed, 0u);
}

}  // namespace
}  // namespace fph::guest
