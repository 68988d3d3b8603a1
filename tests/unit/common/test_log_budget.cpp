// LineBudget: the per-VM budget of log lines (log.h). Time is passed in, so
// the rules are checked exactly, without sleeping.
#include <gtest/gtest.h>

#include "fph/common/log.h"

using fph::log::LineBudget;
using namespace std::chrono_literals;

namespace {

TEST(LineBudget, ABurstPassesThenOneLinePerIntervalAndTheNextLineCountsTheHeldBack) {
  LineBudget b(3, 1s);
  const auto t0 = LineBudget::Clock::time_point{} + 100s;
  for (int i = 0; i < 3; ++i) {
    auto r = b.take(t0);
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(*r, 0u);
  }
  for (int i = 0; i < 1000; ++i) EXPECT_FALSE(b.take(t0 + 500ms).has_value());
  EXPECT_EQ(b.held_back_total(), 1000u);
  // One interval later one line passes and says how many were held back.
  auto r = b.take(t0 + 1s);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(*r, 1000u);
  EXPECT_FALSE(b.take(t0 + 1500ms).has_value());
  r = b.take(t0 + 2s);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(*r, 1u);
}

TEST(LineBudget, AQuietSourceEarnsItsBurstBackButNoMore) {
  LineBudget b(2, 1s);
  const auto t0 = LineBudget::Clock::time_point{} + 100s;
  EXPECT_TRUE(b.take(t0));
  EXPECT_TRUE(b.take(t0));
  EXPECT_FALSE(b.take(t0));
  // An hour of quiet refills the bucket to its burst, not to 3600 lines.
  const auto later = t0 + 1h;
  EXPECT_TRUE(b.take(later));
  EXPECT_TRUE(b.take(later));
  EXPECT_FALSE(b.take(later));
}

TEST(LineBudget, AFullBucketDoesNotSaveTimeForLater) {
  LineBudget b(1, 1s);
  const auto t0 = LineBudget::Clock::time_point{} + 100s;
  EXPECT_TRUE(b.take(t0));
  // Refilled at t0 + 1 s; the 0.9 s it then sat full must not count.
  EXPECT_TRUE(b.take(t0 + 1900ms));
  EXPECT_FALSE(b.take(t0 + 2500ms));
  EXPECT_TRUE(b.take(t0 + 2900ms));
}

}  // namespace
