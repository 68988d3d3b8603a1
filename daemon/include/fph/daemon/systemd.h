// The service manager side (DESIGN section 6): sd_notify readiness, status
// and watchdog pings, and listening sockets passed by socket activation
// (sd_listen_fds_with_names). Everything is a no-op outside systemd: without
// NOTIFY_SOCKET nothing is sent, without LISTEN_FDS no socket is inherited.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace fph::daemon {

// sd_notify(0, state); false if not under a notifying manager or on error.
bool notify(const std::string& state);

// Pings WATCHDOG=1 at half the manager's WATCHDOG_USEC, from its own thread,
// as long as `healthy()` says so (a wedged daemon stops pinging and gets
// restarted). Does nothing if the watchdog is not enabled for this process.
class Watchdog {
 public:
  explicit Watchdog(std::function<bool()> healthy = {});
  ~Watchdog();
  bool enabled() const { return interval_.count() > 0; }
  std::chrono::microseconds interval() const { return interval_; }

 private:
  std::function<bool()> healthy_;
  std::chrono::microseconds interval_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

// A listening socket passed by the service manager.
struct InheritedSocket {
  int fd = -1;
  std::string name;  // FileDescriptorName= (LISTEN_FDNAMES), "unknown" if unnamed
  std::string path;  // the Unix socket path it is bound to ("" if none)
};
// Takes the sockets passed by the manager (sd_listen_fds_with_names, which
// unsets LISTEN_* so children do not inherit them). Only Unix stream
// listening sockets are accepted; others are reported in `errors` and closed.
std::vector<InheritedSocket> inherited_sockets(std::vector<std::string>* errors);

}  // namespace fph::daemon
