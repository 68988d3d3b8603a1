#include "fph/daemon/backend_channel.h"

#include <fmt/format.h>
#include <poll.h>

#include <cerrno>
#include <cstring>

#include "fph/proto/channel.h"

namespace fph::daemon {

namespace vu = proto::vu;

void BackendChannel::attach(UniqueFd fd) {
  std::lock_guard lk(mu_);
  fd_ = std::move(fd);
}

void BackendChannel::detach() {
  std::lock_guard lk(mu_);
  fd_.reset();
}

bool BackendChannel::attached() const {
  std::lock_guard lk(mu_);
  return static_cast<bool>(fd_);
}

Expected<void, std::string> BackendChannel::config_changed(std::chrono::milliseconds patience) {
  return send(static_cast<uint32_t>(vu::BackendRequest::ConfigChangeMsg), patience);
}

Expected<void, std::string> BackendChannel::send(uint32_t request,
                                                 std::chrono::milliseconds patience) {
  std::lock_guard lk(mu_);
  if (!fd_) return unexpected(std::string("no back-end channel (BACKEND_REQ not negotiated)"));
  // A 12-byte message: once the socket is writable, sendmsg does not block.
  pollfd p{fd_.get(), POLLOUT, 0};
  const int n = ::poll(&p, 1, static_cast<int>(patience.count()));
  if (n < 0) return unexpected(fmt::format("poll: {}", std::strerror(errno)));
  if (n == 0) {
    return unexpected(fmt::format("front end has not read its channel for {} ms",
                                  patience.count()));
  }
  if (p.revents & (POLLHUP | POLLERR)) {
    fd_.reset();
    return unexpected(std::string("front end closed the back-end channel"));
  }
  auto r = vu::send_message(fd_.get(), vu::Header{request, vu::kVersion, 0}, {});
  if (!r) {
    fd_.reset();
    return unexpected(r.error().message());
  }
  return {};
}

}  // namespace fph::daemon
