// vhost-user channel over a real Unix socketpair: payloads, SCM_RIGHTS,
// excess descriptors, EOF handling and bad headers.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "fph/proto/channel.h"

namespace vu = fph::proto::vu;
using fph::UniqueFd;

namespace {

struct SocketPair {
  UniqueFd a, b;
  SocketPair() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    a.reset(sv[0]);
    b.reset(sv[1]);
  }
};

struct Pipe {
  UniqueFd r, w;
  Pipe() {
    int p[2];
    EXPECT_EQ(::pipe2(p, O_CLOEXEC), 0);
    r.reset(p[0]);
    w.reset(p[1]);
  }
};

int open_fd_count() {
  int n = 0;
  for (int fd = 0; fd < 1024; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1) ++n;
  }
  return n;
}

void write_all(int fd, const void* p, size_t n) {
  ASSERT_EQ(::write(fd, p, n), static_cast<ssize_t>(n));
}

}  // namespace

TEST(Channel, RoundTripWithPayloadAndThreeFds) {
  SocketPair sp;
  Pipe p0, p1, p2;
  const int fds[] = {p0.w.get(), p1.w.get(), p2.w.get()};
  std::vector<uint8_t> payload = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  vu::Header h{static_cast<uint32_t>(vu::Request::SetMemTable), vu::kVersion | vu::kFlagNeedReply, 0};
  ASSERT_TRUE(vu::send_message(sp.a.get(), h, payload, fds));

  auto m = vu::recv_message(sp.b.get());
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->header.request, h.request);
  EXPECT_EQ(m->header.flags, h.flags);
  EXPECT_EQ(m->header.size, payload.size());
  EXPECT_EQ(m->payload, payload);
  ASSERT_EQ(m->fds.size(), 3u);

  // The received descriptors are working duplicates, in order, and CLOEXEC.
  const Pipe* pipes[] = {&p0, &p1, &p2};
  for (int i = 0; i < 3; ++i) {
    EXPECT_NE(::fcntl(m->fds[i].get(), F_GETFD) & FD_CLOEXEC, 0);
    const char c = static_cast<char>('a' + i);
    write_all(m->fds[i].get(), &c, 1);
    char got = 0;
    ASSERT_EQ(::read(pipes[i]->r.get(), &got, 1), 1);
    EXPECT_EQ(got, c);
  }
}

TEST(Channel, EmptyPayloadNoFds) {
  SocketPair sp;
  ASSERT_TRUE(vu::send_message(sp.a.get(), {static_cast<uint32_t>(vu::Request::GetFeatures), 1, 0}, {}));
  auto m = vu::recv_message(sp.b.get());
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->header.request, 1u);
  EXPECT_TRUE(m->payload.empty());
  EXPECT_TRUE(m->fds.empty());
}

TEST(Channel, SendFixesVersionAndSize) {
  SocketPair sp;
  std::vector<uint8_t> payload(8, 7);
  ASSERT_TRUE(vu::send_message(sp.a.get(), {2, vu::kFlagNeedReply, 1234}, payload));
  auto m = vu::recv_message(sp.b.get());
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->header.flags, vu::kVersion | vu::kFlagNeedReply);
  EXPECT_EQ(m->header.size, 8u);
}

TEST(Channel, Reply) {
  SocketPair sp;
  auto v = vu::encode_u64(42);
  ASSERT_TRUE(vu::send_reply(sp.a.get(), 1, v));
  auto m = vu::recv_message(sp.b.get());
  ASSERT_TRUE(m);
  EXPECT_TRUE(m->header.is_reply());
  EXPECT_EQ(m->header.flags, vu::kVersion | vu::kFlagReply);
  EXPECT_EQ(*vu::parse_u64(m->payload, "reply"), 42u);
}

TEST(Channel, LargestPayloadAndFdsOnPayloadSegment) {
  SocketPair sp;
  // Header written raw (no fds), then the payload with one fd attached: fds
  // may arrive with any segment of the message.
  std::vector<uint8_t> payload(vu::kMaxPayload, 0x5a);
  auto hdr = vu::encode_header({7, 1, vu::kMaxPayload});
  write_all(sp.a.get(), hdr.data(), hdr.size());
  Pipe p;
  std::thread t([&] {
    int fd = p.w.get();
    iovec iov{payload.data(), payload.size()};
    alignas(cmsghdr) unsigned char cbuf[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf;
    msg.msg_controllen = sizeof(cbuf);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
    size_t sent = 0;
    while (sent < payload.size()) {
      ssize_t n = ::sendmsg(sp.a.get(), &msg, MSG_NOSIGNAL);
      ASSERT_GT(n, 0);
      sent += static_cast<size_t>(n);
      iov = iovec{payload.data() + sent, payload.size() - sent};
      msg.msg_control = nullptr;
      msg.msg_controllen = 0;
    }
  });
  auto m = vu::recv_message(sp.b.get());
  t.join();
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->payload, payload);
  ASSERT_EQ(m->fds.size(), 1u);
}

TEST(Channel, TooManyFdsClosesThemAndKeepsFraming) {
  SocketPair sp;
  std::vector<Pipe> pipes(9);
  std::vector<int> fds;
  for (auto& p : pipes) fds.push_back(p.w.get());
  std::vector<uint8_t> payload(16, 1);
  const int before = open_fd_count();

  // send_message itself refuses more than kMaxFds.
  auto refused = vu::send_message(sp.a.get(), {5, 1, 0}, payload, fds);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, vu::ChannelErrc::TooManyFds);

  // A raw peer sends 9 anyway.
  auto hdr = vu::encode_header({5, 1, static_cast<uint32_t>(payload.size())});
  iovec iov[2] = {{hdr.data(), hdr.size()}, {payload.data(), payload.size()}};
  alignas(cmsghdr) unsigned char cbuf[CMSG_SPACE(sizeof(int) * 9)] = {};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof(cbuf);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * 9);
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * 9);
  ASSERT_EQ(::sendmsg(sp.a.get(), &msg, MSG_NOSIGNAL), static_cast<ssize_t>(12 + payload.size()));

  // Followed by a good message.
  ASSERT_TRUE(vu::send_message(sp.a.get(), {1, 1, 0}, {}));

  auto bad = vu::recv_message(sp.b.get());
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, vu::ChannelErrc::TooManyFds);
  EXPECT_EQ(open_fd_count(), before) << "received descriptors must be closed";

  auto next = vu::recv_message(sp.b.get());
  ASSERT_TRUE(next) << next.error().message();
  EXPECT_EQ(next->header.request, 1u);
}

TEST(Channel, CmsgTruncationIsTooManyFds) {
  SocketPair sp;
  // More descriptors than the receive buffer has room for (2 * kMaxFds).
  constexpr int kN = 20;
  Pipe p;
  std::vector<int> fds(kN, p.w.get());
  auto hdr = vu::encode_header({1, 1, 0});
  iovec iov{hdr.data(), hdr.size()};
  alignas(cmsghdr) unsigned char cbuf[CMSG_SPACE(sizeof(int) * kN)] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof(cbuf);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * kN);
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * kN);
  const int before = open_fd_count();
  ASSERT_EQ(::sendmsg(sp.a.get(), &msg, MSG_NOSIGNAL), 12);
  auto m = vu::recv_message(sp.b.get());
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, vu::ChannelErrc::TooManyFds);
  EXPECT_EQ(open_fd_count(), before);
}

TEST(Channel, EofAtBoundaryIsClosed) {
  SocketPair sp;
  sp.a.reset();
  auto m = vu::recv_message(sp.b.get());
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, vu::ChannelErrc::Closed);
}

TEST(Channel, EofInHeaderIsIo) {
  SocketPair sp;
  auto hdr = vu::encode_header({1, 1, 0});
  write_all(sp.a.get(), hdr.data(), 5);
  sp.a.reset();
  auto m = vu::recv_message(sp.b.get());
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, vu::ChannelErrc::Io);
  EXPECT_FALSE(m.error().message().empty());
}

TEST(Channel, EofInPayloadIsIo) {
  SocketPair sp;
  auto hdr = vu::encode_header({1, 1, 8});
  write_all(sp.a.get(), hdr.data(), hdr.size());
  write_all(sp.a.get(), "abc", 3);
  sp.a.reset();
  auto m = vu::recv_message(sp.b.get());
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, vu::ChannelErrc::Io);
}

TEST(Channel, BadHeaderIsProtocol) {
  SocketPair sp;
  auto hdr = vu::encode_header({1, 0x2 /* version 2 */, 0});
  write_all(sp.a.get(), hdr.data(), hdr.size());
  auto m = vu::recv_message(sp.b.get());
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, vu::ChannelErrc::Protocol);
  EXPECT_EQ(m.error().parse.code, fph::proto::ParseErrc::BadVersion);
  EXPECT_NE(m.error().message().find("header.flags"), std::string::npos) << m.error().message();

  auto big = vu::encode_header({1, 1, vu::kMaxPayload + 1});
  write_all(sp.a.get(), big.data(), big.size());
  auto m2 = vu::recv_message(sp.b.get());
  ASSERT_FALSE(m2);
  EXPECT_EQ(m2.error().code, vu::ChannelErrc::Protocol);
  EXPECT_EQ(m2.error().parse.field, "header.size");
}

TEST(Channel, SendToClosedPeerIsIoNotSignal) {
  SocketPair sp;
  sp.b.reset();
  auto r = vu::send_message(sp.a.get(), {1, 1, 0}, {});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, vu::ChannelErrc::Io);
  EXPECT_EQ(r.error().err, EPIPE);
}

TEST(Channel, OversizedPayloadRefused) {
  SocketPair sp;
  std::vector<uint8_t> payload(vu::kMaxPayload + 1);
  auto r = vu::send_message(sp.a.get(), {1, 1, 0}, payload);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, vu::ChannelErrc::Protocol);
}

TEST(Channel, ManyMessagesBackToBack) {
  SocketPair sp;
  std::thread writer([&] {
    for (uint32_t i = 0; i < 200; ++i) {
      std::vector<uint8_t> payload(i % 64, static_cast<uint8_t>(i));
      ASSERT_TRUE(vu::send_message(sp.a.get(), {i % 43 + 1, 1, 0}, payload));
    }
  });
  for (uint32_t i = 0; i < 200; ++i) {
    auto m = vu::recv_message(sp.b.get());
    ASSERT_TRUE(m) << i << ": " << m.error().message();
    EXPECT_EQ(m->header.request, i % 43 + 1);
    EXPECT_EQ(m->payload, std::vector<uint8_t>(i % 64, static_cast<uint8_t>(i)));
  }
  writer.join();
}
