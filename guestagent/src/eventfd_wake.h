// The driver threads' wakeups (balloon_driver.cpp, local_reporter.cpp):
// non-blocking eventfds polled next to other fds.
#pragma once

#include <unistd.h>

#include <cstdint>

namespace fph::guest {

// Adds one. EAGAIN only if the counter is at its maximum: a wakeup is pending
// anyway.
inline void signal_eventfd(int fd) {
  const uint64_t one = 1;
  (void)!::write(fd, &one, sizeof one);
}

// One read: a (non-semaphore) eventfd read returns the whole count and resets
// it, so a second read could only fail with EAGAIN, a syscall for nothing. A
// write after this read makes the fd readable again, and the next poll sees it.
inline void drain_eventfd(int fd) {
  uint64_t v = 0;
  (void)!::read(fd, &v, sizeof v);
}

}  // namespace fph::guest
