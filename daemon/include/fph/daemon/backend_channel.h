// The back-end channel of one VM: a socket the front end hands over with
// SET_BACKEND_REQ_FD, on which the back end sends requests to the front end
// (vhost-user "back-end communication"). fphd uses it to tell the driver that
// the device config changed (CONFIG_CHANGE_MSG), e.g. after the balloon
// target (num_pages) was set.
//
// Sending never waits on the guest: the message is written with a bounded
// wait for socket space and without NEED_REPLY, so a front end that does not
// read its channel can delay nothing but its own notifications. Linux's
// virtio_uml handles these requests in an interrupt handler and needs no
// reply; QEMU answers NEED_REPLY only when asked.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"

namespace fph::daemon {

class BackendChannel {
 public:
  // SET_BACKEND_REQ_FD: replaces the channel (the old socket is closed).
  void attach(UniqueFd fd);
  void detach();
  bool attached() const;

  // Sends CONFIG_CHANGE_MSG. An error says why (no channel, peer gone, no
  // socket space within `patience`); the caller logs and counts it.
  Expected<void, std::string> config_changed(
      std::chrono::milliseconds patience = std::chrono::milliseconds(1000));

 private:
  Expected<void, std::string> send(uint32_t request, std::chrono::milliseconds patience);
  mutable std::mutex mu_;  // one sender at a time: messages never interleave
  UniqueFd fd_;
};

}  // namespace fph::daemon
