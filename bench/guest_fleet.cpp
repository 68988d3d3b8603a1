// The guests' RAM memfds, opened by the bench: see guest_fleet.h.
#include "guest_fleet.h"

#include <unistd.h>

#include <thread>

#include "measure.h"

namespace fph::bench {

GuestFleet::~GuestFleet() {
  for (const auto& v : per_guest_)
    for (int fd : v) ::close(fd);
}

std::string GuestFleet::open(const std::vector<std::unique_ptr<Process>>& guests,
                             std::chrono::milliseconds ready_timeout) {
  for (size_t i = 0; i < guests.size(); ++i) {
    auto ev = guests[i]->wait_event("ready", ready_timeout);
    if (!ev) return "guest " + std::to_string(i) + " did not become ready: " + guests[i]->stderr_tail();
    per_guest_.push_back(open_memfds(guests[i]->pid(), "fph-guest-ram"));
    if (per_guest_.back().empty()) return "cannot open guest " + std::to_string(i) + "'s memfd through /proc";
  }
  return "";
}

int64_t GuestFleet::guest_bytes(size_t i) const {
  int64_t s = 0;
  for (int fd : per_guest_[i]) s += fd_allocated(fd);
  return s;
}

int64_t GuestFleet::total_bytes() const {
  int64_t s = 0;
  for (size_t i = 0; i < per_guest_.size(); ++i) s += guest_bytes(i);
  return s;
}

std::string GuestFleet::wait_populated(const std::vector<std::unique_ptr<Process>>& guests, int64_t bytes,
                                       Clock::time_point start, std::chrono::milliseconds patience,
                                       std::chrono::milliseconds poll, Order order,
                                       std::vector<Clock::time_point>* held_at) const {
  if (held_at) held_at->assign(guests.size(), Clock::time_point::max());
  for (size_t next = 0;;) {
    if (order == Order::kAll) {
      bool all = true;
      for (size_t i = 0; i < guests.size(); ++i) {
        const bool held = guest_bytes(i) >= bytes;
        if (held && held_at && (*held_at)[i] == Clock::time_point::max()) (*held_at)[i] = Clock::now();
        all = all && held;
        if (!all && !held_at) break;
      }
      if (all) return "";
      for (size_t i = 0; i < guests.size(); ++i)
        if (!guests[i]->running())
          return "guest " + std::to_string(i) + " exited during its allocation: " + guests[i]->stderr_tail();
    } else {
      while (next < guests.size() && guest_bytes(next) >= bytes) ++next;
      if (next == guests.size()) return "";
      if (!guests[next]->running())
        return "guest " + std::to_string(next) + " exited during its allocation: " + guests[next]->stderr_tail();
    }
    if (Clock::now() - start > patience) return "guests did not populate their memory in time";
    std::this_thread::sleep_for(poll);
  }
}

}  // namespace fph::bench
