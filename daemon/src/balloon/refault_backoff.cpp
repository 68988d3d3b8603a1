#include "fph/daemon/refault_backoff.h"

#include <algorithm>

namespace fph::daemon {

std::string_view check(const BackoffConfig& c) {
  if (!(c.threshold > 0 && c.threshold <= 1)) return "threshold must be in (0, 1]";
  if (c.window.count() < 1 || static_cast<size_t>(c.window.count()) > RefaultBackoff::kMaxWindow)
    return "window_seconds must be in [1, 120]";
  if (c.hold.count() < 1) return "hold_seconds must be at least 1";
  if (c.max_hold < c.hold) return "max_hold_seconds must be at least hold_seconds";
  return "";
}

std::string_view to_string(RefaultBackoff::State s) {
  switch (s) {
    case RefaultBackoff::State::Normal: return "normal";
    case RefaultBackoff::State::Holding: return "holding";
    case RefaultBackoff::State::Probing: return "probing";
  }
  return "?";
}

RefaultBackoff::RefaultBackoff(BackoffConfig c, Clock::time_point now)
    : cfg_(c), next_hold_(c.hold), probe_since_(now),
      buckets_(static_cast<size_t>(std::clamp<int64_t>(c.window.count(), 1, kMaxWindow)) + 1) {}

void RefaultBackoff::configure(const BackoffConfig& c, Clock::time_point now) {
  std::lock_guard lk(mu_);
  advance_locked(now);
  if (c.window != cfg_.window)
    buckets_.assign(static_cast<size_t>(std::clamp<int64_t>(c.window.count(), 1, kMaxWindow)) + 1, Bucket{});
  cfg_ = c;
  next_hold_ = std::clamp(next_hold_, c.hold, c.max_hold);
  if (!c.enabled && state_ == State::Holding) {
    held_ += now - hold_started_;
    state_ = State::Normal;
    next_hold_ = c.hold;
  }
}

RefaultBackoff::Bucket& RefaultBackoff::bucket_locked(Clock::time_point now) {
  const int64_t sec = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
  Bucket& b = buckets_[static_cast<size_t>(sec) % buckets_.size()];
  if (b.second != sec) b = Bucket{sec, 0, 0};
  return b;
}

void RefaultBackoff::sums_locked(Clock::time_point now, uint64_t* discarded, uint64_t* refaulted) const {
  const int64_t sec = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
  *discarded = *refaulted = 0;
  for (const auto& b : buckets_) {
    if (b.second < 0 || b.second > sec || sec - b.second >= cfg_.window.count()) continue;
    *discarded += b.discarded;
    *refaulted += b.refaulted;
  }
}

void RefaultBackoff::clear_window_locked() { std::fill(buckets_.begin(), buckets_.end(), Bucket{}); }

void RefaultBackoff::advance_locked(Clock::time_point now) {
  if (state_ == State::Holding && now >= hold_until_) {
    held_ += hold_until_ - hold_started_;
    state_ = State::Probing;
    probe_since_ = now;
  }
  if (state_ == State::Probing && now - probe_since_ >= cfg_.window) {
    // A whole window of discards and the share stayed below the threshold:
    // the VM's pattern changed, start over from the first hold.
    state_ = State::Normal;
    next_hold_ = cfg_.hold;
  }
}

bool RefaultBackoff::judge_locked(Clock::time_point now) {
  if (!cfg_.enabled || state_ == State::Holding) return false;
  uint64_t d = 0, r = 0;
  sums_locked(now, &d, &r);
  if (d < cfg_.min_discarded || d == 0) return false;
  if (static_cast<double>(r) < cfg_.threshold * static_cast<double>(d)) return false;
  // A probe that finds the same doubles the hold; from normal the first hold.
  const auto hold = state_ == State::Probing ? next_hold_ : cfg_.hold;
  state_ = State::Holding;
  hold_started_ = now;
  hold_until_ = now + hold;
  next_hold_ = std::min(hold * 2, cfg_.max_hold);
  ++holds_;
  trigger_share_ = static_cast<double>(r) / static_cast<double>(d);
  clear_window_locked();
  return true;
}

void RefaultBackoff::discarded(uint64_t bytes, Clock::time_point now) {
  if (bytes == 0) return;
  std::lock_guard lk(mu_);
  advance_locked(now);
  bucket_locked(now).discarded += bytes;
}

bool RefaultBackoff::refaulted(uint64_t bytes, Clock::time_point now) {
  std::lock_guard lk(mu_);
  advance_locked(now);
  // What comes back during a hold was discarded before it.
  if (state_ != State::Holding && bytes) bucket_locked(now).refaulted += bytes;
  return judge_locked(now);
}

bool RefaultBackoff::normal() {
  std::lock_guard lk(mu_);
  advance_locked(Clock::now());
  return state_ == State::Normal;
}

std::chrono::seconds RefaultBackoff::window() const {
  std::lock_guard lk(mu_);
  return cfg_.window;
}

bool RefaultBackoff::holding(Clock::time_point now) {
  std::lock_guard lk(mu_);
  advance_locked(now);
  return state_ == State::Holding;
}

RefaultBackoff::Snapshot RefaultBackoff::snapshot(Clock::time_point now) {
  std::lock_guard lk(mu_);
  advance_locked(now);
  Snapshot s;
  s.state = state_;
  s.enabled = cfg_.enabled;
  sums_locked(now, &s.window_discarded, &s.window_refaulted);
  s.share = s.window_discarded ? static_cast<double>(s.window_refaulted) / static_cast<double>(s.window_discarded) : 0;
  s.next_hold = state_ == State::Normal ? cfg_.hold : next_hold_;
  s.holds = holds_;
  s.trigger_share = trigger_share_;
  auto held = held_;
  if (state_ == State::Holding) {
    s.hold_left_seconds = std::chrono::duration<double>(hold_until_ - now).count();
    held += now - hold_started_;
  }
  s.held_seconds = std::chrono::duration<double>(held).count();
  return s;
}

}  // namespace fph::daemon
