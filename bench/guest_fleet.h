// The bench's own view of the guests' RAM: every guest's RAM memfd opened by
// the bench itself (through /proc/PID/fd, after the guest's "ready" event),
// so that what a guest holds is the kernel's word (st_blocks), valid even
// after the guest exited; and the wait until every guest has populated its
// workload. Shared by the end-to-end run (scenarios.cpp), the scale mode
// (scale.cpp) and the backoff mode (backoff.cpp).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "processes.h"

namespace fph::bench {

class GuestFleet {
 public:
  GuestFleet() = default;
  ~GuestFleet();  // closes every descriptor
  GuestFleet(const GuestFleet&) = delete;
  GuestFleet& operator=(const GuestFleet&) = delete;

  // For each guest in order: waits (up to `ready_timeout` each) for its
  // "ready" event, then opens its RAM memfd(s). "" or the error.
  std::string open(const std::vector<std::unique_ptr<Process>>& guests, std::chrono::milliseconds ready_timeout);

  size_t size() const { return per_guest_.size(); }
  const std::vector<int>& fds(size_t i) const { return per_guest_[i]; }
  // Bytes the kernel holds for guest i's RAM / for every guest's (st_blocks).
  int64_t guest_bytes(size_t i) const;
  int64_t total_bytes() const;

  // How wait_populated() walks the guests: kAll checks every guest on each
  // poll (all must hold the bytes at the same time; every guest must still
  // run), kInOrder moves on from a guest once it has held them (only the
  // one awaited must still run): for many guests.
  enum class Order { kAll, kInOrder };
  // Polls every `poll` until every guest holds at least `bytes` of RAM;
  // fails if a guest exits first or `patience` after `start`. "" or the error.
  // `held_at` (kAll only), if given: when each guest was first seen holding.
  std::string wait_populated(const std::vector<std::unique_ptr<Process>>& guests, int64_t bytes,
                             Clock::time_point start, std::chrono::milliseconds patience,
                             std::chrono::milliseconds poll, Order order,
                             std::vector<Clock::time_point>* held_at = nullptr) const;

 private:
  std::vector<std::vector<int>> per_guest_;
};

}  // namespace fph::bench
