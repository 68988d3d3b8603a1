// fph-hostile: a hostile vhost-user front end, for the soak (scripts/soak.sh,
// docs/soak.md). It connects to fphd, misbehaves with one case of a
// catalogue per connection, disconnects and repeats, and prints at the end
// how many connections each case made and what fphd did about them.
//
//   fph-hostile --socket PATH [--seconds N | --rounds N] [--seed S] [--case NAME] [--name NAME]
//
// It never needs fphd to do anything in particular: whatever fphd replies,
// refuses or closes, it goes on. It never blocks forever: the socket has
// send/receive timeouts and every wait is a bounded poll. Guest RAM is a
// real memfd (16 MiB) with a real reporting ring in it (desc at gpa 0,
// avail at 4 KiB, used at 8 KiB, 32 entries), like tests/unit/daemon/front_end.h.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "fph/common/unique_fd.h"
#include "fph/proto/balloon.h"
#include "fph/proto/channel.h"
#include "fph/proto/vhost_user.h"
#include "fph/proto/virtqueue.h"

using namespace fph;
namespace vu = proto::vu;
namespace vq = proto::vq;
namespace balloon = proto::balloon;
using Req = vu::Request;

namespace {

constexpr uint64_t MiB = 1ull << 20;
constexpr uint64_t kRam = 16 * MiB;
constexpr uint64_t kUaddr = 0x7e0000000000;
constexpr uint64_t kAvail = 4096, kUsed = 8192;
constexpr uint16_t kNum = 32;
constexpr uint64_t kData = 1 * MiB;  // first byte of the data area (rings below)
constexpr uint64_t kFeatures = balloon::kFVersion1 | balloon::kFReporting |
                               balloon::kFIndirectDesc | vu::feature::kProtocolFeatures;
constexpr int kReplyMs = 2000;  // every reply is awaited at most this long

volatile sig_atomic_t g_stop = 0;
void on_signal(int) { g_stop = 1; }

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// What happened on one connection; summed per case.
struct Outcome {
  bool connected = false;
  bool setup_ok = false;   // the honest part before the misbehaviour went through
  bool nacked = false;     // fphd answered a refusal (REPLY_ACK 1, size-0 config, ...)
  bool closed = false;     // fphd closed the connection
  bool served = false;     // a valid report was used (discarded) after the misbehaviour
};
struct Tally {
  uint64_t runs = 0, connect_failed = 0, setup_failed = 0, nacked = 0, closed = 0, served = 0;
};

struct Conn {
  UniqueFd sock;
  UniqueFd ram;
  uint8_t* mem = nullptr;
  bool ram_truncated = false;  // never touch mem again
  UniqueFd kick{eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  UniqueFd call{eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  uint32_t rq = 2;        // reporting queue index (no STATS_VQ acked)
  uint16_t aidx = 0;      // our avail idx
  uint16_t next_head = 0;
  Outcome out;

  ~Conn() {
    if (mem) munmap(mem, kRam);
  }

  bool open(const std::string& path) {
    sock.reset(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!sock) return false;
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    // Bounded blocking: connect (a full backlog), recv_message and
    // send_message never wait longer than this.
    timeval tv{2, 0};
    setsockopt(sock.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(sock.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(sock.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return false;
    ram.reset(memfd_create("fph-hostile-ram", MFD_CLOEXEC));
    if (!ram || ftruncate(ram.get(), kRam) != 0) return false;
    void* p = mmap(nullptr, kRam, PROT_READ | PROT_WRITE, MAP_SHARED, ram.get(), 0);
    if (p == MAP_FAILED) return false;
    mem = static_cast<uint8_t*>(p);
    out.connected = true;
    return true;
  }

  bool raw(const void* b, size_t n) {
    return ::send(sock.get(), b, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
  }
  bool send(Req r, std::span<const uint8_t> payload, std::vector<int> fds = {},
            bool need_reply = false, uint32_t extra_flags = 0) {
    vu::Header h{static_cast<uint32_t>(r),
                 vu::kVersion | (need_reply ? vu::kFlagNeedReply : 0u) | extra_flags,
                 static_cast<uint32_t>(payload.size())};
    return vu::send_message(sock.get(), h, payload, fds).has_value();
  }
  // The next message, if one comes within `ms`; a close is remembered.
  std::optional<vu::Message> recv(int ms = kReplyMs) {
    pollfd p{sock.get(), POLLIN, 0};
    if (poll(&p, 1, ms) <= 0) return std::nullopt;
    auto m = vu::recv_message(sock.get());
    if (!m) {
      if (m.error().code == vu::ChannelErrc::Closed || m.error().code == vu::ChannelErrc::Io)
        out.closed = true;
      return std::nullopt;
    }
    return std::move(*m);
  }
  // REPLY_ACK status (0 ok), nullopt without a reply. A non-zero is a nack.
  std::optional<uint64_t> ack(Req r, std::span<const uint8_t> payload, std::vector<int> fds = {}) {
    if (!send(r, payload, std::move(fds), true)) return std::nullopt;
    auto m = recv();
    if (!m) return std::nullopt;
    auto v = vu::parse_u64(m->payload, "ack");
    if (!v) return std::nullopt;
    if (*v != 0) out.nacked = true;
    return *v;
  }
  std::optional<uint64_t> get(Req r) {
    if (!send(r, {})) return std::nullopt;
    auto m = recv();
    if (!m) return std::nullopt;
    auto v = vu::parse_u64(m->payload, "reply");
    return v ? std::optional<uint64_t>(*v) : std::nullopt;
  }
  bool ok(Req r, std::span<const uint8_t> payload, std::vector<int> fds = {}) {
    auto v = ack(r, payload, std::move(fds));
    return v && *v == 0;
  }

  // The honest start: features, protocol features, owner, memory.
  bool negotiate(uint64_t features = kFeatures) {
    auto f = get(Req::GetFeatures);
    if (!f) return false;
    if (!send(Req::SetFeatures, vu::encode_u64(features & (*f | balloon::kFVersion1))))
      return false;
    auto pf = get(Req::GetProtocolFeatures);
    if (!pf) return false;
    const uint64_t want = vu::protocol::bit(vu::protocol::kReplyAck) |
                          vu::protocol::bit(vu::protocol::kConfig) |
                          vu::protocol::bit(vu::protocol::kConfigureMemSlots) |
                          vu::protocol::bit(vu::protocol::kStatus);
    if (!send(Req::SetProtocolFeatures, vu::encode_u64(*pf & want))) return false;
    rq = static_cast<uint32_t>(balloon::queue_layout(features).reporting);
    return ok(Req::SetOwner, {});
  }
  bool add_memory() {
    return ok(Req::AddMemReg, vu::encode_single_region({0, kRam, kUaddr, 0}), {ram.get()});
  }
  bool ring_setup(uint32_t num = kNum, uint64_t desc = kUaddr, uint64_t avail = kUaddr + kAvail,
                  uint64_t used = kUaddr + kUsed) {
    std::memset(mem, 0, kData);
    aidx = 0;
    next_head = 0;
    bool good = ok(Req::SetVringNum, vu::encode_vring_state({rq, num}));
    good &= ok(Req::SetVringBase, vu::encode_vring_state({rq, 0}));
    good &= ok(Req::SetVringAddr, vu::encode_vring_addr({rq, 0, desc, used, avail, 0}));
    good &= ok(Req::SetVringKick, vu::encode_u64(rq), {kick.get()});
    good &= ok(Req::SetVringCall, vu::encode_u64(rq), {call.get()});
    good &= ok(Req::SetVringEnable, vu::encode_vring_state({rq, 1}));
    good &= ok(Req::SetStatus, vu::encode_u64(15));
    return good;
  }
  bool setup() {
    const bool good = negotiate() && add_memory() && ring_setup();
    out.setup_ok = good;
    return good;
  }

  // Ring access (our own driver, not vq::DriverRing: the cases write
  // whatever they like).
  void desc(uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    vq::Desc d{addr, len, flags, next};
    std::memcpy(mem + 16 * static_cast<size_t>(i % kNum), &d, 16);
  }
  void publish(uint16_t head) {
    std::memcpy(mem + kAvail + 4 + 2 * (aidx % kNum), &head, 2);
    ++aidx;
    __atomic_store_n(reinterpret_cast<uint16_t*>(mem + kAvail + 2), aidx, __ATOMIC_RELEASE);
  }
  void set_avail_idx(uint16_t v) {
    aidx = v;
    __atomic_store_n(reinterpret_cast<uint16_t*>(mem + kAvail + 2), aidx, __ATOMIC_RELEASE);
  }
  uint16_t used_idx() const {
    return __atomic_load_n(reinterpret_cast<uint16_t*>(mem + kUsed + 2), __ATOMIC_ACQUIRE);
  }
  void do_kick() {
    uint64_t one = 1;
    (void)!write(kick.get(), &one, 8);
  }
  // Waits until used idx reaches `target` (or the deadline / a close).
  bool wait_used(uint16_t target, int ms = kReplyMs) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (std::chrono::steady_clock::now() < until) {
      if (static_cast<int16_t>(used_idx() - target) >= 0) return true;
      pollfd p[2] = {{call.get(), POLLIN, 0}, {sock.get(), POLLRDHUP, 0}};
      poll(p, 2, 20);
      uint64_t v;
      if (p[0].revents & POLLIN) (void)!read(call.get(), &v, 8);
      if (p[1].revents & (POLLRDHUP | POLLHUP | POLLERR)) {
        out.closed = true;
        return static_cast<int16_t>(used_idx() - target) >= 0;
      }
    }
    return false;
  }
  // One honest report of `len` populated bytes at `gpa`: true if it came back.
  bool honest_report(uint64_t gpa, uint32_t len) {
    if (ram_truncated) return false;
    std::memset(mem + gpa, 0x5c, len);
    const uint16_t h = next_head++ % kNum;
    desc(h, gpa, len, vq::kDescFWrite, 0);
    const uint16_t target = static_cast<uint16_t>(used_idx() + 1);
    publish(h);
    do_kick();
    const bool b = wait_used(target);
    return b;
  }
  // After the misbehaviour: does the session still serve a valid report?
  void probe_served(uint64_t gpa = 12 * MiB) {
    if (!out.closed && honest_report(gpa, 2 * MiB)) out.served = true;
  }
  // Reads (and drops) whatever fphd sends for up to `ms`; notes a close.
  void drain(int ms) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    char buf[4096];
    while (!out.closed) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          until - std::chrono::steady_clock::now()).count();
      if (left <= 0) break;
      pollfd p{sock.get(), POLLIN | POLLRDHUP, 0};
      if (poll(&p, 1, static_cast<int>(left)) <= 0) break;
      const ssize_t n = ::recv(sock.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) out.closed = true;
    }
  }
};

// ---- the catalogue ----------------------------------------------------------

using CaseFn = void (*)(Conn&, std::mt19937_64&);

// Garbage header or a version other than 1: framing lost, session closed.
void c_bad_header(Conn& c, std::mt19937_64& rng) {
  (void)c.get(Req::GetFeatures);
  uint8_t h[12];
  for (auto& b : h) b = static_cast<uint8_t>(rng());
  if (rng() & 1) {  // a clean header with version 3
    const uint32_t w[3] = {1, 3, 0};
    std::memcpy(h, w, 12);
  }
  c.raw(h, 12);
  c.drain(1500);
}
// size field past 4096 (and a few bytes of "payload").
void c_oversized_size(Conn& c, std::mt19937_64& rng) {
  (void)c.get(Req::GetFeatures);
  const uint32_t sizes[] = {4097, 0x100000, 0xffffffffu};
  const uint32_t w[3] = {static_cast<uint32_t>(Req::SetMemTable), vu::kVersion,
                         sizes[rng() % 3]};
  c.raw(w, 12);
  std::vector<uint8_t> junk(512, 0xee);
  c.raw(junk.data(), junk.size());
  c.drain(1500);
}
// A front-end message carrying the REPLY flag: session closed.
void c_reply_flag(Conn& c, std::mt19937_64& rng) {
  c.negotiate();
  if (rng() & 1) c.send(Req::GetFeatures, {}, {}, false, vu::kFlagReply);
  else c.send(Req::SetOwner, {}, {}, true, vu::kFlagReply);
  c.drain(1500);
}
// Wrong fd counts: GET_FEATURES with an fd (no error form: closed), or
// SET_MEM_TABLE with fewer fds than regions (refused, session continues).
void c_wrong_fd_count(Conn& c, std::mt19937_64& rng) {
  if (rng() & 1) {
    c.send(Req::GetFeatures, {}, {c.kick.get()});
    c.drain(1500);
    return;
  }
  if (!c.negotiate()) return;
  c.out.setup_ok = true;
  vu::MemoryRegion r[2] = {{0, 8 * MiB, kUaddr, 0}, {8 * MiB, 8 * MiB, kUaddr + 8 * MiB, 8 * MiB}};
  (void)c.ack(Req::SetMemTable, vu::encode_mem_table(r), {c.ram.get()});
  // SET_VRING_KICK without its fd, SET_VRING_CALL with two.
  (void)c.ack(Req::SetVringKick, vu::encode_u64(c.rq));
  (void)c.ack(Req::SetVringCall, vu::encode_u64(c.rq), {c.call.get(), c.call.get()});
  if (c.add_memory() && c.ring_setup()) c.probe_served();
}
// SET_FEATURES without VERSION_1: refused, not applied.
void c_no_version_1(Conn& c, std::mt19937_64&) {
  if (!c.get(Req::GetFeatures)) return;
  c.out.setup_ok = true;
  c.send(Req::SetFeatures, vu::encode_u64(balloon::kFReporting | vu::feature::kProtocolFeatures));
  auto pf = c.get(Req::GetProtocolFeatures);
  if (!pf) return;
  c.send(Req::SetProtocolFeatures,
         vu::encode_u64(*pf & (vu::protocol::bit(vu::protocol::kReplyAck) |
                               vu::protocol::bit(vu::protocol::kStatus))));
  (void)c.ack(Req::SetFeatures, vu::encode_u64(balloon::kFReporting | balloon::kFStatsVq));
  (void)c.ack(Req::SetStatus, vu::encode_u64(15));
  (void)c.get(Req::GetStatus);
  // Then go on as if nothing happened: memory, a ring, a report.
  c.rq = 2;
  if (c.ok(Req::SetOwner, {}) && c.add_memory() && c.ring_setup()) c.probe_served();
}
// GET_CONFIG / SET_CONFIG outside the config space (and to read-only fields).
void c_config_out_of_range(Conn& c, std::mt19937_64& rng) {
  if (!c.negotiate()) return;
  c.out.setup_ok = true;
  const uint32_t offs[] = {16, 20, 200, 0xfffffffcu, 8};
  for (int i = 0; i < 4; ++i) {
    const uint32_t off = offs[rng() % 5];
    const uint32_t size = 1 + static_cast<uint32_t>(rng() % 64);
    vu::ConfigPayload p{off, size, 0, std::vector<uint8_t>(size, 0xab)};
    c.send(Req::GetConfig, vu::encode_config(p));
    if (auto m = c.recv(); m && m->payload.size() <= 12) c.out.nacked = true;
    // SET_CONFIG to num_pages (device-owned), to the epoch, past the end.
    vu::ConfigPayload w{static_cast<uint32_t>(rng() % 3 == 0 ? 0 : off), 4, 0, {1, 2, 3, 4}};
    (void)c.ack(Req::SetConfig, vu::encode_config(w));
  }
  if (c.add_memory() && c.ring_setup()) c.probe_served();
}
// The same bad message in a loop (GET_CONFIG past the config space, or
// SET_FEATURES without VERSION_1): each is refused and counted, but the
// session's log lines are budgeted (docs/protocol.md "Bad input"), so the
// flood costs fphd's log about 20 lines, not one per message.
void c_message_flood(Conn& c, std::mt19937_64& rng) {
  if (!c.negotiate()) return;
  c.out.setup_ok = true;
  const int n = 200 + static_cast<int>(rng() % 800);
  const bool config = rng() & 1;
  for (int i = 0; i < n && !c.out.closed; ++i) {
    if (config) {
      c.send(Req::GetConfig, vu::encode_config({64, 8, 0, std::vector<uint8_t>(8)}));
      if (auto m = c.recv(); m && m->payload.size() <= 12) c.out.nacked = true;
      else break;
    } else if (!c.ack(Req::SetFeatures, vu::encode_u64(balloon::kFReporting))) {
      break;  // no reply: the session is gone (ack() noted a nack itself)
    }
  }
  if (c.add_memory() && c.ring_setup()) c.probe_served();
}
// A memory region larger than its memfd, or at an offset past its end.
void c_region_past_eof(Conn& c, std::mt19937_64& rng) {
  if (!c.negotiate()) return;
  c.out.setup_ok = true;
  vu::MemoryRegion r = (rng() & 1) ? vu::MemoryRegion{0, 4 * kRam, kUaddr, 0}
                                   : vu::MemoryRegion{0, 4 * MiB, kUaddr, 2 * kRam};
  if (rng() & 1) (void)c.ack(Req::AddMemReg, vu::encode_single_region(r), {c.ram.get()});
  else (void)c.ack(Req::SetMemTable, vu::encode_mem_table(std::span(&r, 1)), {c.ram.get()});
  if (c.add_memory() && c.ring_setup()) c.probe_served();
}
// The memfd truncated under a running reporting ring: fphd's SIGBUS guard,
// memory_fault, that session closed.
void c_memfd_truncated(Conn& c, std::mt19937_64& rng) {
  if (!c.setup()) return;
  c.honest_report(4 * MiB, 2 * MiB);
  // A chain posted, then the file shrinks under it (all of it, or the data part).
  std::memset(c.mem + 8 * MiB, 0x5c, 2 * MiB);
  const uint16_t h = c.next_head++ % kNum;
  c.desc(h, 8 * MiB, 2 * MiB, vq::kDescFWrite, 0);
  c.publish(h);
  const off_t to = (rng() & 1) ? 0 : static_cast<off_t>(6 * MiB);
  c.ram_truncated = true;  // from here on, mem must not be touched
  if (ftruncate(c.ram.get(), to) != 0) return;
  c.do_kick();
  c.drain(3000);
}
// SET_VRING_NUM 3 (not a power of two), then the rest of the ring and a kick.
void c_vring_num_invalid(Conn& c, std::mt19937_64& rng) {
  if (!c.negotiate() || !c.add_memory()) return;
  c.out.setup_ok = true;
  const uint32_t nums[] = {3, 0, 65536, 33};
  (void)c.ack(Req::SetVringNum, vu::encode_vring_state({c.rq, nums[rng() % 4]}));
  (void)c.ack(Req::SetVringBase, vu::encode_vring_state({c.rq, 0}));
  (void)c.ack(Req::SetVringAddr, vu::encode_vring_addr({c.rq, 0, kUaddr, kUaddr + kUsed, kUaddr + kAvail, 0}));
  (void)c.ack(Req::SetVringKick, vu::encode_u64(c.rq), {c.kick.get()});
  (void)c.ack(Req::SetVringCall, vu::encode_u64(c.rq), {c.call.get()});
  (void)c.ack(Req::SetVringEnable, vu::encode_vring_state({c.rq, 1}));
  for (uint16_t i = 0; i < 4; ++i) {
    std::memset(c.mem + 2 * MiB + i * MiB, 0x5c, MiB);
    c.desc(i, 2 * MiB + i * MiB, MiB, vq::kDescFWrite, 0);
    c.publish(i);
  }
  c.do_kick();
  c.drain(800);
  // And on a running ring: set it again to 3 and kick.
  if (!c.out.closed && c.ring_setup()) {
    (void)c.ack(Req::SetVringNum, vu::encode_vring_state({c.rq, 3}));
    c.next_head = 8;
    c.honest_report(10 * MiB, MiB);
  }
  c.drain(300);
}
// SET_VRING_ADDR outside the memory table, then kick.
void c_vring_addr_outside(Conn& c, std::mt19937_64& rng) {
  if (!c.negotiate() || !c.add_memory()) return;
  c.out.setup_ok = true;
  const uint64_t out = (rng() & 1) ? kUaddr + 64 * MiB : 0x1000;
  (void)c.ack(Req::SetVringNum, vu::encode_vring_state({c.rq, kNum}));
  (void)c.ack(Req::SetVringBase, vu::encode_vring_state({c.rq, 0}));
  (void)c.ack(Req::SetVringAddr, vu::encode_vring_addr({c.rq, 0, out, out + kUsed, kUaddr + kAvail, 0}));
  (void)c.ack(Req::SetVringKick, vu::encode_u64(c.rq), {c.kick.get()});
  (void)c.ack(Req::SetVringCall, vu::encode_u64(c.rq), {c.call.get()});
  (void)c.ack(Req::SetVringEnable, vu::encode_vring_state({c.rq, 1}));
  c.desc(0, 4 * MiB, MiB, vq::kDescFWrite, 0);
  c.publish(0);
  for (int i = 0; i < 3; ++i) c.do_kick();
  c.drain(800);
  // A ring that ends right at the table's end (used ring straddles it).
  if (!c.out.closed)
    (void)c.ack(Req::SetVringAddr, vu::encode_vring_addr({c.rq, 0, kUaddr, kUaddr + kRam - 8, kUaddr + kAvail, 0}));
  c.do_kick();
  c.drain(500);
}
// REM_MEM_REG of the region holding the ring, then kick.
void c_rem_ring_region(Conn& c, std::mt19937_64&) {
  if (!c.setup()) return;
  c.honest_report(4 * MiB, 2 * MiB);
  (void)c.ack(Req::RemMemReg, vu::encode_single_region({0, kRam, kUaddr, 0}));
  std::memset(c.mem + 6 * MiB, 0x5c, 2 * MiB);
  const uint16_t h = c.next_head++ % kNum;
  c.desc(h, 6 * MiB, 2 * MiB, vq::kDescFWrite, 0);
  c.publish(h);
  c.do_kick();
  c.drain(800);
  // Add it back and try again.
  if (!c.out.closed && c.add_memory()) {
    c.do_kick();
    c.drain(300);
  }
}
// Descriptors outside guest memory, straddling its end, overflowing, readable.
void c_desc_outside_memory(Conn& c, std::mt19937_64& rng) {
  if (!c.setup()) return;
  const uint64_t addrs[] = {kRam, kRam - MiB, ~0ull - 4095, 1ull << 50, 64 * MiB};
  for (uint16_t i = 0; i < 8; ++i) {
    c.desc(i, addrs[rng() % 5], 2 * MiB, (rng() % 4) ? vq::kDescFWrite : 0, 0);
    c.publish(i);
  }
  c.do_kick();
  c.wait_used(8);
  c.next_head = 8;
  c.probe_served();
}
// A chain that loops (a -> b -> a), next out of range, self-loop.
void c_desc_loop(Conn& c, std::mt19937_64& rng) {
  if (!c.setup()) return;
  c.desc(0, 2 * MiB, 4096, vq::kDescFWrite | vq::kDescFNext, 1);
  c.desc(1, 3 * MiB, 4096, vq::kDescFWrite | vq::kDescFNext, 0);
  c.desc(2, 4 * MiB, 4096, vq::kDescFWrite | vq::kDescFNext, 2);
  c.desc(3, 5 * MiB, 4096, vq::kDescFWrite | vq::kDescFNext, static_cast<uint16_t>(kNum + rng() % 1000));
  for (uint16_t h = 0; h < 4; ++h) c.publish(h);
  c.do_kick();
  c.wait_used(4);
  c.next_head = 8;
  c.probe_served();
}
// Huge lengths: 4 GiB - 1, a chain summing past 2^32, a zero length.
void c_desc_huge_len(Conn& c, std::mt19937_64&) {
  if (!c.setup()) return;
  c.desc(0, 2 * MiB, 0xffffffffu, vq::kDescFWrite, 0);
  c.desc(1, 2 * MiB, 0xfffff000u, vq::kDescFWrite | vq::kDescFNext, 2);
  c.desc(2, 2 * MiB, 0xfffff000u, vq::kDescFWrite, 0);
  c.desc(3, 2 * MiB, 0, vq::kDescFWrite, 0);
  c.publish(0);
  c.publish(1);
  c.publish(3);
  c.do_kick();
  c.wait_used(3);
  c.next_head = 8;
  c.probe_served();
}
// Indirect tables: garbage contents, bad lengths, outside memory, nested,
// combined with NEXT.
void c_indirect_garbage(Conn& c, std::mt19937_64& rng) {
  if (!c.setup()) return;
  const uint64_t table = 16 * 1024;  // inside the ring area, below kData
  for (size_t i = 0; i < 4096; ++i) c.mem[table + i] = static_cast<uint8_t>(rng());
  c.desc(0, table, 4096, vq::kDescFIndirect, 0);                       // garbage entries
  c.desc(1, table, 17, vq::kDescFIndirect, 0);                         // length not a multiple of 16
  c.desc(2, kRam + 4096, 256, vq::kDescFIndirect, 0);                  // table outside memory
  c.desc(3, table, 0, vq::kDescFIndirect, 0);                          // empty
  c.desc(4, table, 4096, vq::kDescFIndirect | vq::kDescFNext, 5);      // indirect + next
  c.desc(5, 2 * MiB, 4096, vq::kDescFWrite, 0);
  // A nested one: an indirect table whose entry is indirect.
  vq::Desc nested{table, 64, vq::kDescFIndirect, 0};
  std::memcpy(c.mem + table + 8192, &nested, 16);
  c.desc(6, table + 8192, 16, vq::kDescFIndirect, 0);
  c.desc(7, table, 0x100000, vq::kDescFIndirect, 0);                   // 64 Ki entries
  for (uint16_t h : {0, 1, 2, 3, 4, 6, 7}) c.publish(h);
  c.do_kick();
  c.wait_used(7);
  c.next_head = 8;
  c.probe_served();
}
// The same head offered twice while in flight: session closed.
void c_head_twice(Conn& c, std::mt19937_64&) {
  if (!c.setup()) return;
  std::memset(c.mem + 4 * MiB, 0x5c, 4 * MiB);
  c.desc(5, 4 * MiB, 4 * MiB, vq::kDescFWrite, 0);
  c.publish(5);
  c.publish(5);
  c.publish(5);
  c.do_kick();
  c.drain(1500);
}
// The avail index jumps far ahead of what fphd has taken: session closed.
void c_avail_jump(Conn& c, std::mt19937_64& rng) {
  if (!c.setup()) return;
  c.honest_report(4 * MiB, 2 * MiB);
  c.set_avail_idx(static_cast<uint16_t>(c.aidx + kNum + 1 + rng() % 30000));
  c.do_kick();
  c.drain(1500);
}
// Every descriptor posted with real populated memory, a storm of kicks,
// and gone before the requests come back.
void c_kick_storm(Conn& c, std::mt19937_64& rng) {
  if (!c.setup()) return;
  const uint32_t len = 256 * 1024;
  std::memset(c.mem + kData, 0x5c, kNum * len);
  for (uint16_t i = 0; i < kNum; ++i) {
    c.desc(i, kData + i * static_cast<uint64_t>(len), len, vq::kDescFWrite, 0);
    c.publish(i);
  }
  const int kicks = 100 + static_cast<int>(rng() % 1000);
  for (int i = 0; i < kicks; ++i) c.do_kick();
  if (rng() & 1) {  // and a message half sent
    const uint32_t w[3] = {static_cast<uint32_t>(Req::GetVringBase), vu::kVersion, 8};
    c.raw(w, 12);
  }
  // close now (the destructor), mid-request
}
// Half a message then close: a header alone, or a header and part of its payload.
void c_half_message(Conn& c, std::mt19937_64& rng) {
  if (rng() & 1) (void)c.negotiate();
  switch (rng() % 3) {
    case 0: {
      const uint32_t w[3] = {static_cast<uint32_t>(Req::GetFeatures), vu::kVersion, 0};
      c.raw(w, 6);
      break;
    }
    case 1: {
      const uint32_t w[3] = {static_cast<uint32_t>(Req::SetMemTable), vu::kVersion, 40};
      c.raw(w, 12);
      const uint8_t part[10] = {1};
      c.raw(part, sizeof part);
      break;
    }
    default: {
      const uint32_t w[3] = {static_cast<uint32_t>(Req::SetVringAddr), vu::kVersion, 40};
      c.raw(w, 12);
      break;
    }
  }
  sleep_ms(static_cast<int>(50 + rng() % 300));
}
// Connect, say nothing (or only the start of the handshake), close.
void c_idle(Conn& c, std::mt19937_64& rng) {
  if (rng() & 1) (void)c.get(Req::GetFeatures);
  sleep_ms(static_cast<int>(200 + rng() % 1300));
}

struct Case {
  const char* name;
  CaseFn fn;
  bool needs_setup;  // the case starts with an honest handshake (counted when it fails)
};
const Case kCases[] = {
    {"bad_header", c_bad_header, false},
    {"oversized_size", c_oversized_size, false},
    {"reply_flag", c_reply_flag, false},
    {"wrong_fd_count", c_wrong_fd_count, false},
    {"no_version_1", c_no_version_1, true},
    {"config_out_of_range", c_config_out_of_range, true},
    {"message_flood", c_message_flood, true},
    {"region_past_eof", c_region_past_eof, true},
    {"memfd_truncated", c_memfd_truncated, true},
    {"vring_num_invalid", c_vring_num_invalid, true},
    {"vring_addr_outside", c_vring_addr_outside, true},
    {"rem_ring_region", c_rem_ring_region, true},
    {"desc_outside_memory", c_desc_outside_memory, true},
    {"desc_loop", c_desc_loop, true},
    {"desc_huge_len", c_desc_huge_len, true},
    {"indirect_garbage", c_indirect_garbage, true},
    {"head_twice", c_head_twice, true},
    {"avail_jump", c_avail_jump, true},
    {"kick_storm_disconnect", c_kick_storm, true},
    {"half_message", c_half_message, false},
    {"idle", c_idle, false},
};
constexpr size_t kNumCases = sizeof kCases / sizeof kCases[0];

int usage() {
  std::fprintf(stderr,
               "usage: fph-hostile --socket PATH [--seconds N | --rounds N] [--seed S] "
               "[--case NAME] [--name NAME] [--list]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string path, only;
  double seconds = 0;
  uint64_t rounds = 0, seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    if (a == "--list") {
      for (const auto& k : kCases) std::printf("%s\n", k.name);
      return 0;
    } else if (a == "--socket" && (v = val())) path = v;
    else if (a == "--seconds" && (v = val())) seconds = std::atof(v);
    else if (a == "--rounds" && (v = val())) rounds = std::strtoull(v, nullptr, 10);
    else if (a == "--seed" && (v = val())) seed = std::strtoull(v, nullptr, 10);
    else if (a == "--case" && (v = val())) only = v;
    else if (a == "--name" && (v = val())) {}  // read by fphd from /proc/PID/cmdline: the VM name
    else return usage();
  }
  if (path.empty()) return usage();
  int only_idx = -1;
  if (!only.empty()) {
    for (size_t k = 0; k < kNumCases; ++k)
      if (only == kCases[k].name) only_idx = static_cast<int>(k);
    if (only_idx < 0) {
      std::fprintf(stderr, "fph-hostile: unknown case '%s' (--list)\n", only.c_str());
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  std::mt19937_64 rng(seed);
  std::map<std::string, Tally> tally;
  for (const auto& k : kCases) tally[k.name];
  const auto start = std::chrono::steady_clock::now();
  uint64_t n = 0;
  size_t next = seed % kNumCases;
  for (; !g_stop; ++n) {
    if (rounds && n >= rounds) break;
    if (seconds > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >= seconds)
      break;
    const size_t k = only_idx >= 0 ? static_cast<size_t>(only_idx) : next;
    next = (next + 1) % kNumCases;
    Tally& t = tally[kCases[k].name];
    ++t.runs;
    Conn c;
    if (!c.open(path)) {
      ++t.connect_failed;
      sleep_ms(100);
      continue;
    }
    kCases[k].fn(c, rng);
    if (kCases[k].needs_setup && !c.out.setup_ok) ++t.setup_failed;
    t.nacked += c.out.nacked;
    t.closed += c.out.closed;
    t.served += c.out.served;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("fph-hostile: %llu connections in %.1f s (seed %llu)\n",
              static_cast<unsigned long long>(n), secs, static_cast<unsigned long long>(seed));
  std::printf("%-24s %8s %8s %8s %8s %8s %8s\n", "case", "runs", "nofphd", "nosetup", "nacked",
              "closed", "served");
  for (const auto& k : kCases) {
    const Tally& t = tally[k.name];
    std::printf("%-24s %8llu %8llu %8llu %8llu %8llu %8llu\n", k.name,
                static_cast<unsigned long long>(t.runs), static_cast<unsigned long long>(t.connect_failed),
                static_cast<unsigned long long>(t.setup_failed), static_cast<unsigned long long>(t.nacked),
                static_cast<unsigned long long>(t.closed), static_cast<unsigned long long>(t.served));
  }
  std::fflush(stdout);
  return 0;
}
