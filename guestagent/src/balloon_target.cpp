#include "fph/guest/balloon_target.h"

#include <algorithm>

#include "fph/common/log.h"

namespace fph::guest {

BalloonTarget::BalloonTarget(BuddyAllocator& buddy, std::mutex& zone, uint64_t gpa_base,
                             bool deflate_on_oom)
    : buddy_(buddy), zone_(zone), pfn_base_(gpa_base / kFrameSize),
      pfn_ok_(gpa_base / kFrameSize + buddy.total_frames() <= UINT32_MAX + uint64_t{1}),
      deflate_on_oom_(deflate_on_oom), in_balloon_(buddy.total_frames(), 0) {}

void BalloonTarget::set_target(uint32_t num_pages) {
  if (seen_ && num_pages == target_.load()) return;
  seen_ = true;
  target_.store(num_pages);
  pending_ = towards_target() != 0;
}

int64_t BalloonTarget::towards_target() const {
  return static_cast<int64_t>(target_.load()) - static_cast<int64_t>(frames_.size());
}

bool BalloonTarget::contains(uint64_t frame) const {
  return frame < in_balloon_.size() && in_balloon_[frame];
}

BalloonStats BalloonTarget::stats() const {
  BalloonStats s;
  s.target = target_.load();
  s.actual = actual_.load();
  s.inflated_pages = inflated_.load();
  s.deflated_pages = deflated_.load();
  s.oom_deflated_pages = oom_deflated_.load();
  s.oom_deflates = oom_deflates_.load();
  s.no_memory_stalls = no_memory_.load();
  s.failed_requests = failed_.load();
  return s;
}

BalloonTarget::Step BalloonTarget::step(BalloonTransport& t) {
  if (!pending_) return Step::Idle;
  const int64_t diff = towards_target();
  if (diff == 0) {
    pending_ = false;
    return Step::Idle;
  }
  if (diff > 0) {
    // fill_balloon(): order-0 pages from the allocator, at most one array.
    if (!pfn_ok_) {  // RAM above 16 TiB: PFNs do not fit le32; give up this target
      failed_++;
      pending_ = false;
      log::warn("balloon", "guest RAM ends above 16 TiB: its PFNs do not fit the 32-bit inflate "
                "array; not inflating");
      return Step::Failed;
    }
    const auto n = static_cast<size_t>(std::min<int64_t>(diff, kBalloonArrayPfns));
    std::vector<uint64_t> got;
    got.reserve(n);
    {
      std::lock_guard lk(zone_);
      while (got.size() < n) {
        auto f = buddy_.alloc(0);
        if (!f) break;
        got.push_back(*f);
      }
    }
    if (got.empty()) {
      no_memory_++;
      return Step::NoMemory;
    }
    std::vector<uint32_t> pfns;
    pfns.reserve(got.size());
    for (uint64_t f : got) {
      if (on_inflated) on_inflated(f);
      in_balloon_[f] = 1;
      frames_.push_back(f);
      pfns.push_back(pfn(f));
    }
    // The pages count as ballooned even if the device did not take the
    // buffer: nothing may use them any more (a back end may still discard
    // them), and `actual` is written again on the next connection.
    inflated_ += got.size();
    actual_.store(static_cast<uint32_t>(frames_.size()));
    if (!t.tell(true, pfns) || !t.write_actual(actual_.load())) {
      failed_++;
      return Step::Failed;
    }
    if (got.size() < n) {
      no_memory_++;
      return Step::NoMemory;
    }
  } else {
    bool failed = false;
    (void)deflate(t, static_cast<uint32_t>(std::min<int64_t>(-diff, kBalloonArrayPfns)), &failed);
    if (failed) return Step::Failed;
  }
  if (towards_target() == 0) {
    pending_ = false;
    return Step::Reached;
  }
  return Step::Progress;
}

uint32_t BalloonTarget::deflate(BalloonTransport& t, uint32_t n, bool* failed) {
  // leak_balloon(): tell the host first, then give the pages back.
  n = std::min<uint32_t>(n, static_cast<uint32_t>(frames_.size()));
  if (n == 0) return 0;
  std::vector<uint32_t> pfns;
  pfns.reserve(n);
  for (size_t i = frames_.size() - n; i < frames_.size(); ++i) pfns.push_back(pfn(frames_[i]));
  if (!t.tell(false, pfns)) {
    failed_++;
    *failed = true;
    return 0;  // still in the balloon: retried later
  }
  if (on_deflating)
    for (size_t i = frames_.size() - n; i < frames_.size(); ++i) on_deflating(frames_[i]);
  std::vector<int> orders;
  orders.reserve(n);
  {
    std::lock_guard lk(zone_);
    for (uint32_t i = 0; i < n; ++i) {
      const uint64_t f = frames_.back();
      frames_.pop_back();
      in_balloon_[f] = 0;
      orders.push_back(buddy_.free_merged(f, 0));
    }
  }
  for (int o : orders)
    if (o >= 0 && on_freed) on_freed(o);
  deflated_ += n;
  actual_.store(static_cast<uint32_t>(frames_.size()));
  if (!t.write_actual(actual_.load())) {
    failed_++;
    *failed = true;
  }
  return n;
}

uint32_t BalloonTarget::oom_deflate(BalloonTransport& t, uint32_t pages) {
  if (!deflate_on_oom_ || frames_.empty()) return 0;
  bool failed = false;
  const uint32_t n = deflate(t, pages, &failed);
  if (n > 0) {
    oom_deflated_ += n;
    oom_deflates_++;
    // The target is no longer followed until it changes (see the header).
    pending_ = false;
  }
  return n;
}

}  // namespace fph::guest
