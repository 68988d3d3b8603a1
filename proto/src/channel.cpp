// vhost-user messages over a Unix stream socket (reference 4.1): a 12-byte
// header, `size` payload bytes, file descriptors as SCM_RIGHTS.
#include "fph/proto/channel.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace fph::proto::vu {

namespace {

// Room for twice the fds we accept, so a peer sending kMaxFds+1..2*kMaxFds is
// seen as "too many" rather than as truncation; anything beyond that sets
// MSG_CTRUNC, which is treated the same way.
constexpr size_t kCmsgFds = kMaxFds * 2;

ChannelError io_error(int err) { return ChannelError{ChannelErrc::Io, err, {}}; }

// Takes ownership of every SCM_RIGHTS descriptor in `msg` (so none leaks,
// whatever happens next).
void collect_fds(msghdr& msg, std::vector<UniqueFd>& fds) {
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    if (c->cmsg_len < CMSG_LEN(0)) continue;
    const size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* data = CMSG_DATA(c);
    for (size_t i = 0; i < n; ++i) {
      int fd;
      std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
      fds.emplace_back(fd);
    }
  }
}

enum class ReadResult { Ok, Eof, Error };

// Reads exactly buf.size() bytes, collecting descriptors from every segment.
// `got_any` tells the caller whether EOF came at a message boundary.
ReadResult read_full(int sock, std::span<uint8_t> buf, std::vector<UniqueFd>& fds,
                     bool& truncated, size_t& done, int& err) {
  done = 0;
  while (done < buf.size()) {
    iovec iov{buf.data() + done, buf.size() - done};
    alignas(cmsghdr) unsigned char cbuf[CMSG_SPACE(sizeof(int) * kCmsgFds)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf;
    msg.msg_controllen = sizeof(cbuf);
    const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      err = errno;
      return ReadResult::Error;
    }
    collect_fds(msg, fds);
    if (msg.msg_flags & MSG_CTRUNC) truncated = true;
    if (n == 0) return ReadResult::Eof;
    done += static_cast<size_t>(n);
  }
  return ReadResult::Ok;
}

}  // namespace

std::string ChannelError::message() const {
  switch (code) {
    case ChannelErrc::Closed:
      return "peer closed the connection";
    case ChannelErrc::Io:
      return err != 0 ? fmt::format("socket error: {}", std::strerror(err))
                      : std::string("connection closed in the middle of a message");
    case ChannelErrc::Protocol:
      return fmt::format("bad header: {}", parse.message());
    case ChannelErrc::TooManyFds:
      return fmt::format("more than {} file descriptors (or truncated ancillary data)", kMaxFds);
  }
  return "unknown channel error";
}

// Reads one message. Descriptors are accepted with either the header or the
// payload segment. If the peer sent more than kMaxFds descriptors (or the
// ancillary data was truncated), every received descriptor is closed, but the
// payload is still read, because the header was valid and the stream stays
// framed: the caller gets TooManyFds and may keep reading the next message.
Expected<Message, ChannelError> recv_message(int sock) {
  Message m;
  bool truncated = false;
  std::array<uint8_t, kHeaderSize> hdr{};
  size_t done = 0;
  int err = 0;
  switch (read_full(sock, hdr, m.fds, truncated, done, err)) {
    case ReadResult::Ok:
      break;
    case ReadResult::Eof:
      if (done == 0 && m.fds.empty()) return unexpected(ChannelError{ChannelErrc::Closed, 0, {}});
      return unexpected(io_error(0));
    case ReadResult::Error:
      return unexpected(io_error(err));
  }
  auto h = parse_header(hdr);
  if (!h) return unexpected(ChannelError{ChannelErrc::Protocol, 0, h.error()});
  m.header = *h;
  m.payload.resize(m.header.size);
  if (m.header.size > 0) {
    switch (read_full(sock, m.payload, m.fds, truncated, done, err)) {
      case ReadResult::Ok:
        break;
      case ReadResult::Eof:
        return unexpected(io_error(0));
      case ReadResult::Error:
        return unexpected(io_error(err));
    }
  }
  if (truncated || m.fds.size() > kMaxFds) {
    m.fds.clear();  // closes them
    return unexpected(ChannelError{ChannelErrc::TooManyFds, 0, {}, m.header});
  }
  return m;
}

// Sends header + payload; descriptors ride on the first sendmsg only. The
// header's version bits are always written as 1 and its size is the payload's
// size (h.size is ignored) so a caller cannot break the framing.
Expected<void, ChannelError> send_message(int sock, const Header& h,
                                          std::span<const uint8_t> payload,
                                          std::span<const int> fds) {
  if (fds.size() > kMaxFds) return unexpected(ChannelError{ChannelErrc::TooManyFds, 0, {}});
  if (payload.size() > kMaxPayload) {
    return unexpected(ChannelError{
        ChannelErrc::Protocol, 0,
        ParseError{ParseErrc::BadSize, "header.size",
                   fmt::format("{} bytes exceeds the maximum payload {}", payload.size(),
                               kMaxPayload)}});
  }
  Header out = h;
  out.flags = (h.flags & ~kVersionMask) | kVersion;
  out.size = static_cast<uint32_t>(payload.size());
  auto hdr = encode_header(out);

  const size_t total = kHeaderSize + payload.size();
  size_t sent = 0;
  alignas(cmsghdr) unsigned char cbuf[CMSG_SPACE(sizeof(int) * kMaxFds)];
  while (sent < total) {
    iovec iov[2];
    int niov = 0;
    if (sent < kHeaderSize) {
      iov[niov++] = iovec{hdr.data() + sent, kHeaderSize - sent};
      if (!payload.empty()) {
        iov[niov++] = iovec{const_cast<uint8_t*>(payload.data()), payload.size()};
      }
    } else {
      const size_t off = sent - kHeaderSize;
      iov[niov++] = iovec{const_cast<uint8_t*>(payload.data()) + off, payload.size() - off};
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(niov);
    if (sent == 0 && !fds.empty()) {
      std::memset(cbuf, 0, sizeof(cbuf));
      msg.msg_control = cbuf;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    const ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return unexpected(io_error(errno));
    }
    sent += static_cast<size_t>(n);
  }
  return {};
}

Expected<void, ChannelError> send_reply(int sock, uint32_t request,
                                        std::span<const uint8_t> payload) {
  return send_message(sock, Header{request, kVersion | kFlagReply, 0}, payload);
}

}  // namespace fph::proto::vu
