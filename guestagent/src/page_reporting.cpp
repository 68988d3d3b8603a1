// Linux mm/page_reporting.c over the buddy model. See page_reporting.h for
// the pass semantics.
#include "fph/guest/page_reporting.h"

#include <algorithm>
#include <utility>

namespace fph::guest {

PageReporting::PageReporting(BuddyAllocator& buddy, std::mutex& zone_lock, ReportingOptions opts,
                             PostFn post)
    : buddy_(buddy), zone_lock_(zone_lock), opts_(opts), post_(std::move(post)) {
  opts_.order = std::clamp(opts_.order, 0, kMaxOrder);
  if (opts_.capacity == 0) opts_.capacity = 32;  // like Linux's "0 = PAGE_REPORTING_CAPACITY"
  if (opts_.max_inflight < 1) opts_.max_inflight = 1;
  if (opts_.delay.count() < 0) opts_.delay = std::chrono::milliseconds{0};
  // page_reporting_register() requests an initial pass.
  request_locked(nullptr);
}

bool PageReporting::request_locked(const Clock::time_point* now) {
  switch (state_) {
    case ReportingState::Requested:
      return false;
    case ReportingState::Active:  // seen at the end of the pass: another pass after delay
      state_ = ReportingState::Requested;
      return false;
    case ReportingState::Idle:
      break;
  }
  state_ = ReportingState::Requested;
  if (now) {
    deadline_ = *now + opts_.delay;
    deadline_unset_ = false;
  } else {
    deadline_ = Clock::time_point::max();
    deadline_unset_ = true;
  }
  return true;
}

void PageReporting::notify_free(int order) { notify_free(order, Clock::now()); }

void PageReporting::notify_free(int order, Clock::time_point now) {
  if (order < opts_.order) return;
  std::function<void()> wake;
  {
    std::lock_guard lk(mu_);
    if (request_locked(&now)) wake = wakeup_;
  }
  if (wake) wake();
}

// Linux page_reporting_cycle() gives each free list a budget of
// DIV_ROUND_UP(nr_free, CAPACITY * 16) report calls and keeps reporting while
// the budget is >= 0, i.e. budget + 1 calls per list per pass ("enough to
// process a sixteenth of the list plus one call for pages left over from the
// previous list"). nr_free counts every free block on the list, reported or
// not. With one zone and one migratetype modelled, a pass gets the sum over
// the order lists that hold candidates. Called with the zone lock held.
int PageReporting::pass_budget() const {
  const uint64_t per = static_cast<uint64_t>(opts_.capacity) * 16;
  const BuddyStats st = buddy_.stats();
  uint64_t budget = 0;
  for (int o = opts_.order; o <= kMaxOrder; ++o) {
    const uint64_t here = buddy_.unreported_candidate_blocks(o) -
                          (o < kMaxOrder ? buddy_.unreported_candidate_blocks(o + 1) : 0);
    if (here == 0) continue;
    budget += (st.free_blocks[o] + per - 1) / per + 1;
  }
  return static_cast<int>(std::min<uint64_t>(budget, 1u << 30));
}

PageReporting::Clock::time_point PageReporting::poll(Clock::time_point now) {
  std::lock_guard serialize(poll_mu_);
  for (;;) {
    std::unique_lock zl(zone_lock_);
    std::unique_lock lk(mu_);
    if (!in_pass_) {
      if (state_ == ReportingState::Idle) return Clock::time_point::max();
      if (deadline_unset_) {
        deadline_ = now + opts_.delay;
        deadline_unset_ = false;
      }
      if (now < deadline_) return deadline_;
      // Start a pass (page_reporting_process): ACTIVE, so that a request
      // during the pass is visible at its end.
      state_ = ReportingState::Active;
      in_pass_ = true;
      stop_posting_ = false;
      deadline_ = Clock::time_point::max();
      ++stats_.passes;
      budget_left_ = pass_budget();
    }
    resume_ = false;

    std::vector<Block> blocks;
    if (!stop_posting_) {
      if (inflight_.size() >= static_cast<size_t>(opts_.max_inflight)) {
        return Clock::time_point::max();  // paused until complete()
      }
      if (opts_.budget && budget_left_ == 0) {
        if (buddy_.unreported_candidate_blocks(opts_.order) > 0) {
          state_ = ReportingState::Requested;  // continue in a later pass
          ++stats_.budget_exhausted;
        }
        stop_posting_ = true;
      } else {
        blocks = buddy_.isolate(opts_.order, opts_.capacity);
        if (blocks.empty()) stop_posting_ = true;  // leftover batch was already posted
      }
    }
    if (stop_posting_) {
      if (!inflight_.empty()) return Clock::time_point::max();  // the last completions end the pass
      in_pass_ = false;
      if (state_ == ReportingState::Requested) {
        deadline_ = now + opts_.delay;
        return deadline_;
      }
      state_ = ReportingState::Idle;
      return Clock::time_point::max();
    }

    ReportRequest req{next_id_++, std::move(blocks)};
    inflight_.push_back(req);
    ++stats_.requests;
    if (budget_left_ > 0) --budget_left_;
    lk.unlock();
    zl.unlock();

    const bool posted = post_ ? post_(req) : false;  // no lock held: may block, may complete()

    if (!posted) {
      std::lock_guard zl2(zone_lock_);
      std::lock_guard lk2(mu_);
      ++stats_.post_failures;
      ++stats_.requests_failed;
      auto it = std::find_if(inflight_.begin(), inflight_.end(),
                             [&](const ReportRequest& r) { return r.id == req.id; });
      if (it != inflight_.end()) {
        buddy_.putback(it->blocks, false);
        inflight_.erase(it);
      }
      stop_posting_ = true;
      state_ = ReportingState::Requested;  // retry after delay
    }
    // Loop: post more (max_inflight > 1), pause, or end the pass.
  }
}

void PageReporting::complete(uint64_t id, bool success) {
  std::function<void()> wake;
  {
    std::lock_guard zl(zone_lock_);
    std::lock_guard lk(mu_);
    auto it = std::find_if(inflight_.begin(), inflight_.end(),
                           [&](const ReportRequest& r) { return r.id == id; });
    if (it == inflight_.end()) {
      ++stats_.unknown_completions;
      return;
    }
    // page_reporting_drain(): back to the tail of the free lists, marked
    // reported on success unless merged.
    buddy_.putback(it->blocks, success);
    if (success) {
      stats_.blocks_reported += it->blocks.size();
      for (const Block& b : it->blocks) stats_.bytes_reported += b.bytes();
    } else {
      ++stats_.requests_failed;
    }
    inflight_.erase(it);
    if (in_pass_) {
      if (!success) {
        stop_posting_ = true;
        state_ = ReportingState::Requested;  // retry after delay
      }
      resume_ = true;  // the next poll() continues (or ends) the pass at once
      wake = wakeup_;
    } else if (!success && request_locked(nullptr)) {
      wake = wakeup_;  // not reachable today: a pass ends only when nothing is in flight
    }
  }
  if (wake) wake();
}

std::vector<ReportRequest> PageReporting::inflight() const {
  std::lock_guard lk(mu_);
  return inflight_;
}

uint64_t PageReporting::reset_reported_marks() {
  std::function<void()> wake;
  uint64_t forgotten = 0;
  {
    std::lock_guard zl(zone_lock_);
    std::lock_guard lk(mu_);
    forgotten = buddy_.forget_reported();
    if (buddy_.unreported_candidate_blocks(opts_.order) > 0 && request_locked(nullptr)) wake = wakeup_;
  }
  if (wake) wake();
  return forgotten;
}

ReportingState PageReporting::state() const {
  std::lock_guard lk(mu_);
  return state_;
}

ReportingStats PageReporting::stats() const {
  std::lock_guard lk(mu_);
  return stats_;
}

PageReporting::Clock::time_point PageReporting::next_due() const {
  std::lock_guard lk(mu_);
  if (in_pass_) return resume_ ? Clock::time_point::min() : Clock::time_point::max();
  if (state_ == ReportingState::Idle) return Clock::time_point::max();
  if (deadline_unset_) return Clock::time_point::min();
  return deadline_;
}

bool PageReporting::pass_in_progress() const {
  std::lock_guard lk(mu_);
  return in_pass_;
}

void PageReporting::set_wakeup(std::function<void()> fn) {
  std::lock_guard lk(mu_);
  wakeup_ = std::move(fn);
}

}  // namespace fph::guest
