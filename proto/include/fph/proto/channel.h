// Moving vhost-user messages over a Unix stream socket, with file descriptors
// as SCM_RIGHTS ancillary data. Blocking; EINTR is retried. Received fds are
// CLOEXEC and owned by the Message.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"
#include "fph/proto/error.h"
#include "fph/proto/vhost_user.h"

namespace fph::proto::vu {

struct Message {
  Header header;
  std::vector<uint8_t> payload;
  std::vector<UniqueFd> fds;
};

enum class ChannelErrc : uint8_t {
  Closed,      // orderly EOF at a message boundary
  Io,          // a socket error (errno in `err`), or EOF in the middle of a message
  Protocol,    // the header failed parse_header (details in `parse`)
  TooManyFds,  // more than kMaxFds descriptors, or ancillary data truncated
};

struct ChannelError {
  ChannelErrc code = ChannelErrc::Io;
  int err = 0;
  ParseError parse;
  Header header;  // for TooManyFds: the refused message's (valid) header
  std::string message() const;
};

// Reads exactly one message. On a Protocol error the payload is not read; the
// caller should close the session because framing is lost.
Expected<Message, ChannelError> recv_message(int sock);

Expected<void, ChannelError> send_message(int sock, const Header& h,
                                          std::span<const uint8_t> payload,
                                          std::span<const int> fds = {});

// Convenience: send a reply (flags = version | REPLY) for `request`.
Expected<void, ChannelError> send_reply(int sock, uint32_t request,
                                        std::span<const uint8_t> payload);

}  // namespace fph::proto::vu
