// A minimal vhost-user front end for tests: a real socket to the back end
// (a Session in-process, or a real fphd), a memfd as guest RAM and one
// reporting ring in it. Only fph::proto is needed.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <vector>

#include "fph/common/unique_fd.h"
#include "fph/proto/balloon.h"
#include "fph/proto/channel.h"
#include "fph/proto/vhost_user.h"
#include "fph/proto/virtqueue.h"

namespace fph::testing_support {

namespace vu = proto::vu;
namespace vq = proto::vq;
namespace balloon = proto::balloon;

inline constexpr uint64_t MiB = 1 << 20;
inline constexpr uint64_t kRam = 64 * MiB;
inline constexpr uint64_t kUaddr = 0x7e0000000000;
inline constexpr uint64_t kRingGpa = 0;  // desc, avail, used at 0, 4 KiB, 8 KiB of guest RAM
inline constexpr uint64_t kFeatures =
    balloon::kFVersion1 | balloon::kFReporting | vu::feature::kProtocolFeatures;

inline int64_t blocks_bytes(int fd) {
  struct stat st {};
  fstat(fd, &st);
  return static_cast<int64_t>(st.st_blocks) * 512;
}

struct FrontEnd {
  UniqueFd sock;
  UniqueFd ram;
  uint8_t* mem = nullptr;
  UniqueFd kick{eventfd(0, EFD_CLOEXEC)};
  UniqueFd call{eventfd(0, EFD_CLOEXEC)};
  vq::DriverRing ring;
  uint32_t reporting_index = 0;

  // memfd_flags: MFD_HUGETLB for a hugetlbfs-backed guest.
  explicit FrontEnd(UniqueFd s, unsigned memfd_flags = 0) : sock(std::move(s)) {
    ram.reset(memfd_create("obs-guest", MFD_CLOEXEC | memfd_flags));
    EXPECT_TRUE(ram) << std::strerror(errno);
    EXPECT_EQ(ftruncate(ram.get(), kRam), 0);
    void* p = mmap(nullptr, kRam, PROT_READ | PROT_WRITE, MAP_SHARED, ram.get(), 0);
    mem = p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
  }
  ~FrontEnd() {
    if (mem) munmap(mem, kRam);
  }

  bool send(vu::Request r, std::span<const uint8_t> payload, std::vector<int> fds = {},
            bool need_reply = false) {
    vu::Header h{static_cast<uint32_t>(r), vu::kVersion | (need_reply ? vu::kFlagNeedReply : 0u),
                 static_cast<uint32_t>(payload.size())};
    return vu::send_message(sock.get(), h, payload, fds).has_value();
  }
  std::optional<vu::Message> recv() {
    auto m = vu::recv_message(sock.get());
    if (!m) return std::nullopt;
    return std::move(*m);
  }
  uint64_t acked(vu::Request r, std::span<const uint8_t> payload, std::vector<int> fds = {}) {
    EXPECT_TRUE(send(r, payload, fds, true));
    auto m = recv();
    EXPECT_TRUE(m.has_value());
    if (!m) return ~0ull;
    auto v = vu::parse_u64(m->payload, "ack");
    return v ? *v : ~0ull;
  }
  uint64_t get_u64(vu::Request r) {
    EXPECT_TRUE(send(r, {}));
    auto m = recv();
    auto v = m ? vu::parse_u64(m->payload, "reply") : vu::parse_u64({}, "reply");
    return v ? *v : ~0ull;
  }

  void handshake(uint64_t features) {
    ASSERT_NE(mem, nullptr);
    ASSERT_EQ(get_u64(vu::Request::GetFeatures) & features, features);
    ASSERT_TRUE(send(vu::Request::SetFeatures, vu::encode_u64(features)));
    const uint64_t pf = get_u64(vu::Request::GetProtocolFeatures);
    ASSERT_TRUE(send(vu::Request::SetProtocolFeatures, vu::encode_u64(pf)));
    ASSERT_EQ(acked(vu::Request::SetOwner, {}), 0u);
    vu::MemoryRegion r{0, kRam, kUaddr, 0};
    ASSERT_EQ(acked(vu::Request::AddMemReg, vu::encode_single_region(r), {ram.get()}), 0u);
    reporting_index = static_cast<uint32_t>(balloon::queue_layout(features).reporting);
    const uint16_t num = 32;
    ring = vq::DriverRing(num, mem, mem + 4096, mem + 8192);
    ASSERT_EQ(acked(vu::Request::SetVringNum, vu::encode_vring_state({reporting_index, num})), 0u);
    ASSERT_EQ(acked(vu::Request::SetVringBase, vu::encode_vring_state({reporting_index, 0})), 0u);
    vu::VringAddr a{reporting_index, 0, kUaddr, kUaddr + 8192, kUaddr + 4096, 0};
    ASSERT_EQ(acked(vu::Request::SetVringAddr, vu::encode_vring_addr(a)), 0u);
    ASSERT_EQ(acked(vu::Request::SetVringKick, vu::encode_u64(reporting_index), {kick.get()}), 0u);
    ASSERT_EQ(acked(vu::Request::SetVringCall, vu::encode_u64(reporting_index), {call.get()}), 0u);
    ASSERT_EQ(acked(vu::Request::SetVringEnable, vu::encode_vring_state({reporting_index, 1})), 0u);
    ASSERT_EQ(acked(vu::Request::SetStatus, vu::encode_u64(15)), 0u);
  }

  // Negotiated PAGE_POISON: the driver writes poison_val 0xaaaaaaaa (what
  // Linux page poisoning uses) before DRIVER_OK.
  void set_poison_aa() {
    vu::ConfigPayload c{balloon::kOffPoisonVal, 4, 0, {0xaa, 0xaa, 0xaa, 0xaa}};
    ASSERT_EQ(acked(vu::Request::SetConfig, vu::encode_config(c)), 0u);
  }

  // Posts one reporting chain and kicks.
  void post(std::vector<vq::Buffer> bufs) {
    ASSERT_TRUE(ring.add_chain(bufs).has_value());
    uint64_t one = 1;
    ASSERT_EQ(write(kick.get(), &one, 8), 8);
  }
  // Waits for the next used element (no time bound: the test binary's
  // timeout turns a hang into a failure).
  vq::UsedElem wait_used() {
    for (;;) {
      if (auto u = ring.pop_used()) return *u;
      pollfd p{call.get(), POLLIN, 0};
      poll(&p, 1, 1000);
      uint64_t v;
      if (p.revents & POLLIN) (void)!read(call.get(), &v, 8);
    }
  }
  // Posts one reporting chain and waits for it to come back.
  void report(std::vector<vq::Buffer> bufs) {
    post(std::move(bufs));
    wait_used();
  }
  // Writes 2 MiB at `gpa`, reports it and returns how much the memfd's
  // backing fell (kernel-measured): "the session still reclaims".
  int64_t reclaimed_by_report(uint64_t gpa) {
    std::memset(mem + gpa, 0x5c, 2 * MiB);
    const int64_t before = blocks_bytes(ram.get());
    report({{gpa, 2 * MiB, true}});
    return before - blocks_bytes(ram.get());
  }
};

struct Pipe {
  UniqueFd r, w;
  Pipe() {
    int p[2];
    EXPECT_EQ(pipe2(p, O_CLOEXEC), 0);
    r.reset(p[0]);
    w.reset(p[1]);
  }
};

// Reads `fd` to EOF.
inline std::vector<uint8_t> read_all(int fd) {
  std::vector<uint8_t> out;
  uint8_t buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + n);
  return out;
}

struct Pair {
  UniqueFd a, b;
  Pair() {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    a.reset(sv[0]);
    b.reset(sv[1]);
  }
};

}  // namespace fph::testing_support
