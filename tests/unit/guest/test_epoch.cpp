// Migration epoch, model side: BuddyAllocator::forget_reported() and
// PageReporting::reset_reported_marks() (what the balloon driver calls when
// fph's epoch changes). The driver polling the epoch against a test device
// is in test_frontend.cpp (BalloonDriver.Epoch*).
#include <gtest/gtest.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "fph/guest/buddy.h"
#include "fph/guest/frontend.h"
#include "fph/guest/page_reporting.h"
#include "fph/proto/balloon.h"

namespace fph::guest {
namespace {

using namespace std::chrono_literals;
using Clock = PageReporting::Clock;
namespace bal = proto::balloon;

#define EXPECT_INVARIANTS(b)                          \
  do {                                                \
    std::string why_;                                 \
    EXPECT_TRUE((b).check_invariants(&why_)) << why_; \
  } while (0)

std::set<uint64_t> reported_heads(const BuddyAllocator& b) {
  std::set<uint64_t> out;
  b.for_each_free_block([&](const Block& blk, bool rep) {
    if (rep) out.insert(blk.frame);
  });
  return out;
}

// 16 order-10 blocks: 12 reported, 2 of the other 4 isolated (in flight),
// one allocated, one free and never reported.
TEST(BuddyEpoch, ForgetReportedClearsFreeMarksAndLeavesIsolatedBlocks) {
  BuddyAllocator b(16 * 1024, 0);
  auto first = b.isolate(10, 12);
  ASSERT_EQ(first.size(), 12u);
  b.putback(first, true);
  ASSERT_EQ(b.stats().reported_frames, 12u * 1024);
  auto in_flight = b.isolate(10, 2);  // 2 of the 4 never-reported blocks
  ASSERT_EQ(in_flight.size(), 2u);
  auto a = b.alloc(10);  // an unreported block first: 1 unreported left, 12 reported
  ASSERT_TRUE(a);
  EXPECT_FALSE(std::any_of(first.begin(), first.end(),
                           [&](const Block& x) { return x.frame == *a; }));
  const BuddyStats before = b.stats();
  EXPECT_EQ(before.isolated_frames, 2u * 1024);

  EXPECT_EQ(b.forget_reported(), 12u * 1024);
  const BuddyStats after = b.stats();
  EXPECT_EQ(after.reported_frames, 0u);
  EXPECT_TRUE(reported_heads(b).empty());
  // Only marks changed: the free memory, its blocks and the isolated ones are
  // exactly what they were.
  EXPECT_EQ(after.free_frames, before.free_frames);
  EXPECT_EQ(after.isolated_frames, before.isolated_frames);
  EXPECT_EQ(after.allocated_frames, before.allocated_frames);
  EXPECT_EQ(after.free_blocks[10], before.free_blocks[10]);
  for (const Block& x : in_flight) EXPECT_EQ(b.frame_state(x.frame), FrameState::Isolated);
  EXPECT_EQ(b.unreported_candidate_blocks(10), 13u);
  EXPECT_INVARIANTS(b);

  // Nothing left to forget.
  EXPECT_EQ(b.forget_reported(), 0u);
  EXPECT_INVARIANTS(b);

  // The isolated blocks were untouched: a successful report marks them.
  b.putback(in_flight, true);
  EXPECT_EQ(b.stats().reported_frames, 2u * 1024);
  EXPECT_INVARIANTS(b);
}

// The list-order invariant (buddy.h "Free lists"): never-reported blocks
// come before formerly reported ones, so alloc() still prefers memory that
// is backed anyway, and isolate() picks the formerly reported ones up.
TEST(BuddyEpoch, ForgottenBlocksFollowTheNeverReportedOnes) {
  BuddyAllocator b(8 * 1024, 0);
  auto rep = b.isolate(10, 5);  // frames 0..5119
  ASSERT_EQ(rep.size(), 5u);
  b.putback(rep, true);
  std::vector<uint64_t> order_before;
  b.for_each_free_block([&](const Block& x, bool) {
    if (x.order == 10) order_before.push_back(x.frame);
  });
  ASSERT_EQ(b.forget_reported(), 5u * 1024);
  std::vector<uint64_t> order_after;
  b.for_each_free_block([&](const Block& x, bool r) {
    EXPECT_FALSE(r);
    if (x.order == 10) order_after.push_back(x.frame);
  });
  EXPECT_EQ(order_after, order_before);
  // The three never-reported blocks (5120, 6144, 7168) are allocated first.
  EXPECT_EQ(b.alloc(10), 5u * 1024);
  EXPECT_EQ(b.alloc(10), 6u * 1024);
  EXPECT_EQ(b.alloc(10), 7u * 1024);
  EXPECT_EQ(b.alloc(10), 0u);
  EXPECT_INVARIANTS(b);
}

TEST(BuddyEpoch, ForgetReportedOfMixedOrders) {
  BuddyAllocator b(4096, 3);  // reserved prefix: blocks of every order below 10
  b.putback(b.isolate(0, 1024), true);
  const uint64_t reported = b.stats().reported_frames;
  EXPECT_EQ(reported, 4096u - 3);
  auto x = b.alloc(1);  // splits the reported order-2 block at 4: frames 6..7 come back unreported
  ASSERT_TRUE(x);
  EXPECT_EQ(*x, 4u);
  const uint64_t still = b.stats().reported_frames;
  EXPECT_LT(still, reported);
  EXPECT_EQ(b.forget_reported(), still);
  EXPECT_EQ(b.stats().reported_frames, 0u);
  EXPECT_EQ(b.unreported_candidate_frames(0), b.stats().free_frames);
  EXPECT_INVARIANTS(b);
  b.free(*x, 1);
  EXPECT_INVARIANTS(b);
}

// PageReporting: the forgotten blocks are reported again by an ordinary
// pass after the delay, each once; a block in flight at the change is not
// reported twice.
TEST(PageReportingEpoch, ResetReportsEveryForgottenBlockOnceAfterTheDelay) {
  BuddyAllocator buddy(8 * 1024);
  std::mutex zone;
  std::vector<ReportRequest> posted;
  ReportingOptions o;
  o.order = 9;
  o.capacity = 4;
  o.delay = 2000ms;
  PageReporting pr(buddy, zone, o, [&](const ReportRequest& r) {
    posted.push_back(r);
    return true;
  });
  int wakeups = 0;
  pr.set_wakeup([&] { ++wakeups; });
  const Clock::time_point t0 = Clock::time_point{} + 1h;
  // Initial pass: 8 blocks in two requests of 4.
  pr.poll(t0);
  pr.poll(t0 + 2s);
  ASSERT_EQ(posted.size(), 1u);
  pr.complete(posted[0].id, true);
  pr.poll(t0 + 2s);
  ASSERT_EQ(posted.size(), 2u);
  // The epoch changes while the second request is in flight.
  const int w = wakeups;
  EXPECT_EQ(pr.reset_reported_marks(), 4u * 1024);
  EXPECT_EQ(wakeups, w);  // a pass is running: the next one follows it
  pr.complete(posted[1].id, true);
  EXPECT_EQ(buddy.stats().reported_frames, 4u * 1024);  // the in-flight ones, marked
  // The running pass may go on with the forgotten blocks (budget allowing);
  // either way every one of them is reported exactly once more.
  Clock::time_point t = t0 + 2s;
  for (int i = 0; i < 20 && buddy.stats().reported_frames < 8u * 1024; ++i) {
    const auto next = pr.poll(t);
    for (const auto& r : pr.inflight()) pr.complete(r.id, true);
    if (next != Clock::time_point::max()) t = std::max(t, next);
  }
  EXPECT_EQ(buddy.stats().reported_frames, 8u * 1024);
  std::multiset<uint64_t> after_change;
  for (size_t i = 2; i < posted.size(); ++i)
    for (const auto& blk : posted[i].blocks) after_change.insert(blk.frame);
  std::multiset<uint64_t> want;
  for (const auto& blk : posted[0].blocks) want.insert(blk.frame);
  EXPECT_EQ(after_change, want);  // the first request's blocks, once each; not the in-flight ones
  std::string why;
  EXPECT_TRUE(buddy.check_invariants(&why)) << why;
  // Nothing more to do until another change.
  for (const auto& r : pr.inflight()) pr.complete(r.id, true);
  pr.poll(t + 10s);
  const size_t n = posted.size();
  pr.poll(t + 20s);
  EXPECT_EQ(posted.size(), n);
  EXPECT_EQ(pr.state(), ReportingState::Idle);
}

// Negotiation: the epoch bit is acked when offered unless turned off.
TEST(FrontendEpoch, ChoosesTheEpochBitWhenOffered) {
  const uint64_t offered = bal::kFVersion1 | bal::kFReporting | bal::kFFphEpoch;
  FrontendOptions o;
  EXPECT_NE(choose_features(offered, o) & bal::kFFphEpoch, 0u);  // default on
  EXPECT_EQ(choose_features(offered & ~bal::kFFphEpoch, o) & bal::kFFphEpoch, 0u);
  o.epoch = false;
  EXPECT_EQ(choose_features(offered, o) & bal::kFFphEpoch, 0u);
}

}  // namespace
}  // namespace fph::guest
