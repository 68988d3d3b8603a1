// Per-VM policy and refault backoff: the pure parts (rule matching, the
// policy table's layers, the rate schedule, the backoff state machine, the
// configuration), driven with explicit times.
#include <gtest/gtest.h>

#include "fph/daemon/config.h"
#include "fph/daemon/refault_backoff.h"
#include "fph/daemon/vm_policy.h"

using namespace fph::daemon;
using fph::reclaim::PrivateMode;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {
constexpr uint64_t MiB = 1ull << 20;

VmPolicyRule rule(std::string pattern, VmPolicySettings s) { return {std::move(pattern), s}; }
}  // namespace

TEST(VmPolicy, ExactNameBeatsPatternsAndMoreSpecificPatternsBeatLessSpecific) {
  VmPolicySettings any, db, db1;
  any.rate_limit = 100;
  any.min_block = 4096;
  db.rate_limit = 200;
  db.mode = PrivateMode::Lazy;
  db1.rate_limit = 300;
  // File order deliberately not by specificity.
  std::vector<VmPolicyRule> rules = {rule("db-1", db1), rule("db-*", db), rule("*", any)};
  auto s = match_rules(rules, "db-1");
  EXPECT_EQ(s.rate_limit, 300u);           // exact
  EXPECT_EQ(s.mode, PrivateMode::Lazy);    // from db-*
  EXPECT_EQ(s.min_block, 4096u);           // from *
  s = match_rules(rules, "db-2");
  EXPECT_EQ(s.rate_limit, 200u);
  s = match_rules(rules, "web");
  EXPECT_EQ(s.rate_limit, 100u);
  EXPECT_FALSE(s.mode);
  EXPECT_TRUE(match_rules({rule("db-1", db1)}, "db-10").empty());  // an exact name is not a prefix
}

TEST(VmPolicy, TableLayersAdminOverridesUntilTheRulesAreReplaced) {
  VmPolicyTable t;
  VmPolicySettings web;
  web.min_block = 2 * MiB;
  BackoffConfig bo;
  bo.enabled = false;
  t.set_rules({rule("web*", web)}, bo);
  VmPolicy p = t.resolve("web1");
  EXPECT_EQ(p.min_block, 2 * MiB);
  EXPECT_EQ(p.rate_limit, 0u);
  EXPECT_FALSE(p.backoff);  // [policy.backoff] enabled = false is the default for every VM
  EXPECT_FALSE(t.backoff_for(p).enabled);

  VmPolicySettings admin;
  admin.rate_limit = 64 * MiB;
  admin.backoff = true;
  t.set_override("web1", admin);
  p = t.resolve("web1");
  EXPECT_EQ(p.rate_limit, 64 * MiB);
  EXPECT_EQ(p.min_block, 2 * MiB);  // untouched keys still come from the file
  EXPECT_TRUE(p.backoff);
  EXPECT_TRUE(t.backoff_for(p).enabled);
  EXPECT_EQ(t.resolve("web2").rate_limit, 0u);  // only that VM

  t.set_rules({rule("web*", web)}, bo);  // reload: the file is the truth again
  EXPECT_EQ(t.resolve("web1").rate_limit, 0u);
}

TEST(VmPolicy, RateScheduleStartsWithinOneSecondOfBurstThenKeepsTheAverage) {
  VmRateLimiter r;
  const auto t0 = Clock::now();
  const uint64_t rate = 16 * MiB;
  EXPECT_EQ(r.reserve(8 * MiB, rate, t0), t0);   // 0.5 s of budget
  EXPECT_EQ(r.reserve(8 * MiB, rate, t0), t0);   // 1.0 s: still within the burst
  const auto third = r.reserve(8 * MiB, rate, t0);
  EXPECT_NEAR(std::chrono::duration<double>(third - t0).count(), 0.0, 1e-6);  // tat-1s = t0
  const auto fourth = r.reserve(8 * MiB, rate, t0);
  EXPECT_NEAR(std::chrono::duration<double>(fourth - t0).count(), 0.5, 1e-3);
  // 64 requests of 8 MiB at 16 MiB/s (32 s of budget): the last starts at 30.5 s.
  Clock::time_point last{};
  for (int i = 0; i < 60; ++i) last = r.reserve(8 * MiB, rate, t0);
  EXPECT_NEAR(std::chrono::duration<double>(last - t0).count(), 30.5, 1e-3);
  // No limit: always now.
  VmRateLimiter free;
  EXPECT_EQ(free.reserve(1ull << 40, 0, t0), t0);
}

namespace {

BackoffConfig small_config() {
  BackoffConfig c;
  c.threshold = 0.5;
  c.window = 10s;
  c.min_discarded = 64 * MiB;
  c.hold = 5s;
  c.max_hold = 20s;
  return c;
}

}  // namespace

TEST(RefaultBackoff, HoldsWhenMostOfWhatWasDiscardedComesBackThenProbesWithADoublingHold) {
  const auto t0 = Clock::now();
  RefaultBackoff b(small_config(), t0);
  // 128 MiB discarded, 32 MiB back: 25%, below the threshold.
  b.discarded(128 * MiB, t0);
  EXPECT_FALSE(b.refaulted(32 * MiB, t0 + 1s));
  EXPECT_FALSE(b.holding(t0 + 1s));
  // Another 64 MiB back: 96 of 128 = 75%.
  EXPECT_TRUE(b.refaulted(64 * MiB, t0 + 2s));
  EXPECT_TRUE(b.holding(t0 + 2s));
  auto snap = b.snapshot(t0 + 3s);
  EXPECT_EQ(snap.state, RefaultBackoff::State::Holding);
  EXPECT_EQ(snap.holds, 1u);
  EXPECT_NEAR(snap.trigger_share, 0.75, 1e-9);
  EXPECT_NEAR(snap.hold_left_seconds, 4.0, 1e-6);
  // Refaults during the hold are not evidence against the probe.
  EXPECT_FALSE(b.refaulted(512 * MiB, t0 + 4s));
  EXPECT_TRUE(b.holding(t0 + 6s));
  // The hold ends at 7 s: probing, discards again.
  EXPECT_FALSE(b.holding(t0 + 7s));
  EXPECT_EQ(b.snapshot(t0 + 7s).state, RefaultBackoff::State::Probing);
  // The probe finds the same: the hold doubles (10 s).
  b.discarded(100 * MiB, t0 + 8s);
  EXPECT_TRUE(b.refaulted(90 * MiB, t0 + 9s));
  EXPECT_TRUE(b.holding(t0 + 18s));
  EXPECT_FALSE(b.holding(t0 + 19s));
  // Again: 20 s, the maximum; and it stays there.
  b.discarded(100 * MiB, t0 + 20s);
  EXPECT_TRUE(b.refaulted(90 * MiB, t0 + 20s));
  EXPECT_TRUE(b.holding(t0 + 39s));
  EXPECT_FALSE(b.holding(t0 + 40s));
  b.discarded(100 * MiB, t0 + 41s);
  EXPECT_TRUE(b.refaulted(90 * MiB, t0 + 41s));
  EXPECT_TRUE(b.holding(t0 + 60s));
  EXPECT_FALSE(b.holding(t0 + 61s));
  EXPECT_EQ(b.snapshot(t0 + 61s).holds, 4u);
  EXPECT_NEAR(b.snapshot(t0 + 61s).held_seconds, 5 + 10 + 20 + 20, 1e-6);
}

TEST(RefaultBackoff, AProbeThatStaysCleanForAWindowGoesBackToTheFirstHold) {
  const auto t0 = Clock::now();
  RefaultBackoff b(small_config(), t0);
  b.discarded(100 * MiB, t0);
  ASSERT_TRUE(b.refaulted(100 * MiB, t0));
  ASSERT_FALSE(b.holding(t0 + 5s));  // probing
  b.discarded(100 * MiB, t0 + 6s);
  EXPECT_FALSE(b.refaulted(0, t0 + 7s));
  EXPECT_EQ(b.snapshot(t0 + 16s).state, RefaultBackoff::State::Normal);
  b.discarded(100 * MiB, t0 + 20s);
  ASSERT_TRUE(b.refaulted(100 * MiB, t0 + 20s));
  EXPECT_NEAR(b.snapshot(t0 + 20s).hold_left_seconds, 5.0, 1e-6);  // the first hold again
}

TEST(RefaultBackoff, AVmThatDiscardsLittleOrRefaultsNothingIsNeverHeld) {
  const auto t0 = Clock::now();
  RefaultBackoff b(small_config(), t0);
  // Everything comes back, but only 32 MiB were discarded: not enough evidence.
  b.discarded(32 * MiB, t0);
  EXPECT_FALSE(b.refaulted(32 * MiB, t0 + 1s));
  // An idle VM with cold free memory: gigabytes discarded, nothing back.
  for (int s = 0; s < 100; ++s) {
    b.discarded(1024 * MiB, t0 + std::chrono::seconds(s));
    EXPECT_FALSE(b.refaulted(0, t0 + std::chrono::seconds(s)));
  }
  EXPECT_EQ(b.snapshot(t0 + 100s).holds, 0u);
  // Refaults older than the window do not count.
  RefaultBackoff c(small_config(), t0);
  c.discarded(100 * MiB, t0);
  EXPECT_FALSE(c.refaulted(100 * MiB, t0 + 11s));
}

TEST(RefaultBackoff, DisabledNeverHoldsAndDisablingEndsAHold) {
  const auto t0 = Clock::now();
  auto cfg = small_config();
  cfg.enabled = false;
  RefaultBackoff off(cfg, t0);
  off.discarded(100 * MiB, t0);
  EXPECT_FALSE(off.refaulted(100 * MiB, t0));
  EXPECT_FALSE(off.holding(t0));

  RefaultBackoff b(small_config(), t0);
  b.discarded(100 * MiB, t0);
  ASSERT_TRUE(b.refaulted(100 * MiB, t0));
  b.configure(cfg, t0 + 1s);
  EXPECT_FALSE(b.holding(t0 + 1s));
}

TEST(VmPolicyConfig, PerVmTablesAndBackoffParse) {
  auto c = parse_config(R"(
[policy.backoff]
threshold = 0.6
window_seconds = 20
min_discarded = "128M"
hold_seconds = 3
max_hold_seconds = 60

[policy.vm."batch-*"]
rate_limit = "256M"
min_block = "4M"
mode = "eager"

[policy.vm."cache1"]
paused = true
backoff = false
)", "t.toml");
  ASSERT_TRUE(c) << c.error();
  EXPECT_DOUBLE_EQ(c->policy.backoff.threshold, 0.6);
  EXPECT_EQ(c->policy.backoff.window, 20s);
  EXPECT_EQ(c->policy.backoff.min_discarded, 128 * MiB);
  EXPECT_EQ(c->policy.backoff.hold, 3s);
  EXPECT_EQ(c->policy.backoff.max_hold, 60s);
  ASSERT_EQ(c->policy.vms.size(), 2u);
  EXPECT_EQ(c->policy.vms[0].pattern, "batch-*");  // file order
  EXPECT_EQ(c->policy.vms[0].settings.rate_limit, 256 * MiB);
  EXPECT_EQ(c->policy.vms[0].settings.min_block, 4 * MiB);
  EXPECT_EQ(c->policy.vms[0].settings.mode, PrivateMode::Eager);
  EXPECT_EQ(c->policy.vms[1].settings.paused, true);
  EXPECT_EQ(c->policy.vms[1].settings.backoff, false);
  // Defaults.
  auto d = parse_config("", "t.toml");
  ASSERT_TRUE(d);
  EXPECT_TRUE(d->policy.backoff.enabled);
  EXPECT_TRUE(d->policy.vms.empty());
}

TEST(VmPolicyConfig, BadSettingsNameTheKeyTheVmAndTheLine) {
  auto err = [](const std::string& text) {
    auto r = parse_config(text, "t.toml");
    EXPECT_FALSE(r) << text;
    return r ? std::string() : r.error();
  };
  auto e = err("[policy.vm.\"db-*\"]\nmin_block = \"3000\"\n");
  EXPECT_NE(e.find("t.toml:2: policy.vm.\"db-*\".min_block: 3000 is not a multiple of 4096"), std::string::npos) << e;
  e = err("[policy.vm.web]\nrate_limit = \"fast\"\n");
  EXPECT_NE(e.find("policy.vm.\"web\".rate_limit"), std::string::npos) << e;
  e = err("[policy.vm.web]\nspeed = 1\n");
  EXPECT_NE(e.find("policy.vm.\"web\".speed: unknown key"), std::string::npos) << e;
  e = err("[policy.vm.web]\nmin_block = \"2G\"\n");
  EXPECT_NE(e.find("out of range"), std::string::npos) << e;
  e = err("[policy.backoff]\nthreshold = 1.5\n");
  EXPECT_NE(e.find("policy.backoff.threshold"), std::string::npos) << e;
  e = err("[policy.backoff]\nhold_seconds = 10\nmax_hold_seconds = 5\n");
  EXPECT_NE(e.find("policy.backoff.max_hold_seconds"), std::string::npos) << e;
  e = err("[policy.backoff]\nwindow_seconds = 500\n");
  EXPECT_NE(e.find("policy.backoff.window_seconds"), std::string::npos) << e;
}

// The sampler thread visits a VM that takes no requests only every
// kIdleSampleInterval; sample_once (tests, explicit passes) visits all.
#include "session_fixture.h"

TEST(Sampler, AVmWithoutRequestsIsVisitedOnlyEveryIdleInterval) {
  fph::testing_support::Pair sp;
  fph::testing_support::Daemon d(std::move(sp.a), "idle-vm");
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::shared_ptr<Session>> all{d.session};
  EXPECT_EQ(d.sampler.sample_due(all, t0), 1u);  // never visited
  EXPECT_EQ(d.sampler.sample_due(all, t0 + 1s), 0u);
  EXPECT_EQ(d.sampler.sample_due(all, t0 + 9s), 0u);
  EXPECT_EQ(d.sampler.sample_due(all, t0 + kIdleSampleInterval + 1s), 1u);
}
