#include "fph/daemon/systemd.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "fph/common/log.h"

namespace fph::daemon {

bool notify(const std::string& state) { return sd_notify(0, state.c_str()) > 0; }

Watchdog::Watchdog(std::function<bool()> healthy) : healthy_(std::move(healthy)) {
  uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0) return;
  interval_ = std::chrono::microseconds(usec / 2);
  log::info("systemd", "watchdog enabled: ping every {} ms", interval_.count() / 1000);
  notify("WATCHDOG=1");
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "fph-watchdog");  // top -H, fph-bench --thread-cpu
    std::unique_lock lk(mu_);
    while (!cv_.wait_for(lk, interval_, [&] { return stop_; })) {
      if (!healthy_ || healthy_()) notify("WATCHDOG=1");
      else log::warn("systemd", "unhealthy: not pinging the watchdog");
    }
  });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::vector<InheritedSocket> inherited_sockets(std::vector<std::string>* errors) {
  std::vector<InheritedSocket> out;
  char** names = nullptr;
  const int n = sd_listen_fds_with_names(1, &names);
  if (n < 0) {
    if (errors) errors->push_back(std::string("sd_listen_fds: ") + std::strerror(-n));
    return out;
  }
  for (int i = 0; i < n; ++i) {
    const int fd = SD_LISTEN_FDS_START + i;
    std::string name = names && names[i] ? names[i] : "unknown";
    if (sd_is_socket_unix(fd, SOCK_STREAM, 1, nullptr, 0) <= 0) {
      if (errors) errors->push_back("inherited fd " + std::to_string(fd) + " (" + name +
                                    ") is not a listening Unix stream socket; closed");
      ::close(fd);
      continue;
    }
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    sockaddr_un a{};
    socklen_t len = sizeof a;
    std::string path;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0 && len > sizeof(sa_family_t) &&
        a.sun_path[0] != '\0')
      path = a.sun_path;
    out.push_back({fd, name, path});
  }
  if (names) {
    for (int i = 0; i < n; ++i) std::free(names[i]);
    std::free(names);
  }
  return out;
}

}  // namespace fph::daemon
