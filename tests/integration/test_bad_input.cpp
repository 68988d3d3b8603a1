// Bad input from a hostile front end: fphd logs what and where, counts it,
// closes only that session where it must, never discards outside a reported
// range, and keeps reclaiming for the other VMs.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>

#include "fph/common/unique_fd.h"
#include "fph/proto/balloon.h"
#include "fph/proto/channel.h"
#include "fph/proto/vhost_user.h"
#include "fph/proto/virtqueue.h"
#include "harness.h"

using namespace fph;
using namespace fph::test;
namespace vu = proto::vu;
namespace vq = proto::vq;
namespace balloon = proto::balloon;

namespace {

constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t kRegion = 32 * MiB;  // two regions, adjacent in guest physical space
constexpr uint64_t kUaddr0 = 0x600000000000;
constexpr uint64_t kUaddr1 = 0x610000000000;
constexpr uint16_t kNum = 32;
constexpr uint64_t kFeatures =
    balloon::kFVersion1 | balloon::kFReporting | vu::feature::kProtocolFeatures;

UniqueFd connect_unix(const std::string& path) {
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  EXPECT_EQ(connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  return fd;
}

// A hand-rolled hostile front end: two 32 MiB memfd regions, one reporting ring.
struct EvilFrontEnd {
  UniqueFd sock;
  UniqueFd ram[2];
  uint8_t* mem[2] = {};
  UniqueFd kick{eventfd(0, EFD_CLOEXEC)};
  UniqueFd call{eventfd(0, EFD_CLOEXEC)};
  vq::DriverRing ring;

  explicit EvilFrontEnd(const std::string& path) : sock(connect_unix(path)) {
    for (int i = 0; i < 2; ++i) {
      ram[i].reset(memfd_create("evil-ram", MFD_CLOEXEC));
      EXPECT_EQ(ftruncate(ram[i].get(), kRegion), 0);
      mem[i] = static_cast<uint8_t*>(
          mmap(nullptr, kRegion, PROT_READ | PROT_WRITE, MAP_SHARED, ram[i].get(), 0));
    }
  }
  ~EvilFrontEnd() {
    for (auto* m : mem) munmap(m, kRegion);
  }

  bool send(uint32_t req, std::span<const uint8_t> payload, std::vector<int> fds = {},
            bool need_reply = true) {
    vu::Header h{req, vu::kVersion | (need_reply ? vu::kFlagNeedReply : 0u),
                 static_cast<uint32_t>(payload.size())};
    return vu::send_message(sock.get(), h, payload, fds).has_value();
  }
  std::optional<vu::Message> recv() {
    pollfd p{sock.get(), POLLIN, 0};
    if (poll(&p, 1, 60000) <= 0) return std::nullopt;
    auto m = vu::recv_message(sock.get());
    if (!m) return std::nullopt;
    return std::move(*m);
  }
  // REPLY_ACK status of a request (0 = ok); ~0 if no reply came.
  uint64_t ack(vu::Request r, std::span<const uint8_t> payload, std::vector<int> fds = {}) {
    if (!send(static_cast<uint32_t>(r), payload, fds)) return ~0ull;
    auto m = recv();
    if (!m) return ~0ull;
    auto v = vu::parse_u64(m->payload, "ack");
    return v ? *v : ~0ull;
  }
  uint64_t get(vu::Request r) {
    send(static_cast<uint32_t>(r), {}, {}, false);
    auto m = recv();
    auto v = m ? vu::parse_u64(m->payload, "reply") : vu::parse_u64({}, "");
    return v ? *v : ~0ull;
  }

  void handshake() {
    ASSERT_NE(get(vu::Request::GetFeatures), ~0ull);
    ASSERT_TRUE(send(static_cast<uint32_t>(vu::Request::SetFeatures), vu::encode_u64(kFeatures), {}, false));
    const uint64_t pf = get(vu::Request::GetProtocolFeatures);
    ASSERT_TRUE(send(static_cast<uint32_t>(vu::Request::SetProtocolFeatures), vu::encode_u64(pf), {}, false));
    ASSERT_EQ(ack(vu::Request::SetOwner, {}), 0u);
    ASSERT_EQ(ack(vu::Request::AddMemReg, vu::encode_single_region({0, kRegion, kUaddr0, 0}), {ram[0].get()}), 0u);
    ASSERT_EQ(ack(vu::Request::AddMemReg, vu::encode_single_region({kRegion, kRegion, kUaddr1, 0}), {ram[1].get()}), 0u);
    ring = vq::DriverRing(kNum, mem[0], mem[0] + 4096, mem[0] + 8192);
    ASSERT_EQ(ack(vu::Request::SetVringNum, vu::encode_vring_state({2, kNum})), 0u);
    ASSERT_EQ(ack(vu::Request::SetVringBase, vu::encode_vring_state({2, 0})), 0u);
    ASSERT_EQ(ack(vu::Request::SetVringAddr, vu::encode_vring_addr({2, 0, kUaddr0, kUaddr0 + 8192, kUaddr0 + 4096, 0})), 0u);
    ASSERT_EQ(ack(vu::Request::SetVringKick, vu::encode_u64(2), {kick.get()}), 0u);
    ASSERT_EQ(ack(vu::Request::SetVringCall, vu::encode_u64(2), {call.get()}), 0u);
    ASSERT_EQ(ack(vu::Request::SetVringEnable, vu::encode_vring_state({2, 1})), 0u);
  }

  void kick_now() {
    uint64_t one = 1;
    ASSERT_EQ(write(kick.get(), &one, 8), 8);
  }
  // Publishes a raw head index in the avail ring, whatever it is.
  void publish_head(uint16_t head) {
    uint8_t* avail = mem[0] + 4096;
    uint16_t idx = __atomic_load_n(reinterpret_cast<uint16_t*>(avail + 2), __ATOMIC_RELAXED);
    std::memcpy(avail + 4 + 2 * (idx % kNum), &head, 2);
    __atomic_store_n(reinterpret_cast<uint16_t*>(avail + 2), static_cast<uint16_t>(idx + 1), __ATOMIC_RELEASE);
  }
  uint16_t used_idx() const {
    return __atomic_load_n(reinterpret_cast<uint16_t*>(mem[0] + 8192 + 2), __ATOMIC_ACQUIRE);
  }
  int64_t allocated() const {
    int64_t t = 0;
    for (const auto& f : ram) {
      struct stat st {};
      fstat(f.get(), &st);
      t += st.st_blocks * 512;
    }
    return t;
  }
};

// sendmsg with an arbitrary number of fds (proto's encoder refuses > 8).
bool send_with_fds(int sock, uint32_t req, std::span<const uint8_t> payload, int nfds, int fd) {
  vu::Header h{req, vu::kVersion, static_cast<uint32_t>(payload.size())};
  auto hb = vu::encode_header(h);
  std::vector<uint8_t> buf(hb.begin(), hb.end());
  buf.insert(buf.end(), payload.begin(), payload.end());
  iovec iov{buf.data(), buf.size()};
  std::vector<char> cbuf(CMSG_SPACE(sizeof(int) * nfds));
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = cbuf.data();
  mh.msg_controllen = cbuf.size();
  cmsghdr* c = CMSG_FIRSTHDR(&mh);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
  std::vector<int> fds(nfds, fd);
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * nfds);
  return sendmsg(sock, &mh, MSG_NOSIGNAL) == static_cast<ssize_t>(buf.size());
}

}  // namespace

TEST(BadInput, MalformedMessagesAndChainsAreRefusedWhileOtherVmsKeepReclaiming) {
  TempDir dir;
  Fphd fphd(dir);
  // A well-behaved guest reclaiming on the same daemon throughout.
  Process good({guest_path(), "--connect", fphd.socket, "--name", "good", "--memory", "512M",
                "--workload", "alloc-free:400M:2000", "--resident", "32M", "--reporting-delay-ms",
                "200"},
               dir.path + "/good.stderr");
  ASSERT_TRUE(good.wait_event("ready")) << good.stderr_text();

  // --- malformed vhost-user messages on one connection ---
  {
    EvilFrontEnd fe(fphd.socket);
    fe.handshake();
    // Bad size: SET_FEATURES with a 4-byte payload.
    EXPECT_NE(fe.ack(vu::Request::SetFeatures, std::vector<uint8_t>(4)), 0u);
    // Unknown request.
    EXPECT_NE(fe.ack(static_cast<vu::Request>(77), {}), 0u);
    // Region that overflows.
    EXPECT_NE(fe.ack(vu::Request::AddMemReg,
                     vu::encode_single_region({~0ull - MiB, 2 * MiB, 0x1000, 0}), {fe.ram[0].get()}),
              0u);
    // SET_MEM_TABLE claiming 9 regions.
    std::vector<uint8_t> mt(8 + 32 * 9, 0);
    mt[0] = 9;
    EXPECT_NE(fe.ack(vu::Request::SetMemTable, mt), 0u);
    // Wrong fd count: SET_VRING_CALL with two fds.
    EXPECT_NE(fe.ack(vu::Request::SetVringCall, vu::encode_u64(2), {fe.call.get(), fe.call.get()}), 0u);
    // Too many fds for any message: 9 fds on SET_VRING_CALL (no reply asked).
    ASSERT_TRUE(send_with_fds(fe.sock.get(), static_cast<uint32_t>(vu::Request::SetVringCall),
                              vu::encode_u64(2), 9, fe.call.get()));
    // The session is still up and answering.
    EXPECT_NE(fe.get(vu::Request::GetFeatures), ~0ull);
    // A header with version 3: framing is lost, this session (only) is closed.
    const uint8_t hdr[12] = {1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0};
    ASSERT_EQ(write(fe.sock.get(), hdr, 12), 12);
    pollfd p{fe.sock.get(), POLLIN, 0};
    ASSERT_EQ(poll(&p, 1, 60000), 1);
    char c;
    EXPECT_EQ(read(fe.sock.get(), &c, 1), 0) << "fphd should close the session";
  }

  // --- malformed chains on another connection ---
  {
    EvilFrontEnd fe(fphd.socket);
    fe.handshake();
    // Every byte of guest memory past the rings carries a pattern.
    std::memset(fe.mem[0] + MiB, 0x5c, kRegion - MiB);
    std::memset(fe.mem[1], 0x5c, kRegion);
    const int64_t before = fe.allocated();
    uint16_t expect_used = 0;
    auto post = [&](std::vector<vq::Buffer> b) {
      ASSERT_TRUE(fe.ring.add_chain(b).has_value());
      fe.kick_now();
      ++expect_used;
    };
    post({{2 * kRegion + 4 * MiB, 2 * MiB, true}});                 // outside guest memory
    post({{kRegion - MiB, 2 * MiB, true}});                           // straddles the two regions
    post({{4 * MiB + 4096 + 512, 2 * MiB, true}});                    // misaligned
    post({{~0ull - MiB + 1, 2 * MiB, true}});                         // overflows
    post({{8 * MiB, 2 * MiB, false}});                                // not device-writable
    // A loop written by hand: 20 -> 21 -> 20.
    auto* desc = reinterpret_cast<vq::Desc*>(fe.mem[0]);
    desc[20] = {10 * MiB, 4096, vq::kDescFWrite | vq::kDescFNext, 21};
    desc[21] = {12 * MiB, 4096, vq::kDescFWrite | vq::kDescFNext, 20};
    fe.publish_head(20);
    fe.kick_now();
    ++expect_used;
    // Next index out of range.
    desc[22] = {14 * MiB, 4096, vq::kDescFWrite | vq::kDescFNext, 999};
    fe.publish_head(22);
    fe.kick_now();
    ++expect_used;
    // Head index out of range: consumed, logged, nothing to return.
    fe.publish_head(999);
    fe.kick_now();
    ASSERT_TRUE(eventually([&] { return fe.used_idx() == expect_used; }))
        << "used " << fe.used_idx() << " of " << expect_used;
    // Nothing was discarded: not a block, not a byte.
    EXPECT_EQ(fe.allocated(), before);
    for (uint64_t i = MiB; i < kRegion; i += 4096) ASSERT_EQ(fe.mem[0][i], 0x5c) << i;
    for (uint64_t i = 0; i < kRegion; i += 4096) ASSERT_EQ(fe.mem[1][i], 0x5c) << i;
    // A valid report on the same session still works afterwards. The
    // hand-published heads bypassed the DriverRing's own avail index, so
    // this one is published by hand too.
    desc[25] = {kRegion + 8 * MiB, 4 * MiB, vq::kDescFWrite, 0};
    fe.publish_head(25);
    fe.kick_now();
    ++expect_used;
    ASSERT_TRUE(eventually([&] { return fe.used_idx() == expect_used; }));
    EXPECT_LE(fe.allocated(), before - static_cast<int64_t>(4 * MiB));
    for (uint64_t i = 0; i < 4 * MiB; i += 4096) ASSERT_EQ(fe.mem[1][8 * MiB + i], 0);
    EXPECT_EQ(fe.mem[1][12 * MiB], 0x5c);  // the byte right after the range is intact
    EXPECT_EQ(fe.mem[1][8 * MiB - 1], 0x5c);  // and right before
  }

  // The good guest's freed memory was reclaimed all along.
  auto freed = good.wait_event("workload_freed");
  ASSERT_TRUE(freed) << good.stderr_text();
  ASSERT_TRUE(eventually([&] {
    const int64_t a = memfd_allocated_bytes(good.pid());
    return a >= 0 && a < static_cast<int64_t>(120 * MiB);
  })) << good.stderr_text();

  // fphd is alive, logged each problem naming the message or field, and counted it.
  ASSERT_TRUE(fphd.proc->running());
  const std::string log = fphd.proc->stderr_text();
  for (const char* needle :
       {"SET_FEATURES", "UNKNOWN(77)", "ADD_MEM_REG", "SET_MEM_TABLE", "SET_VRING_CALL",
        "file descriptors", "bad message header", "outside_guest_memory", "straddles_regions",
        "not device-writable", "loop", "next index out of range", "head index out of range"})
    EXPECT_NE(log.find(needle), std::string::npos) << "log lacks '" << needle << "':\n" << log;
  const std::string m = fphd.scrape();
  for (const char* reason : {"bad_payload", "unknown_request", "bad_fd_count", "too_many_fds",
                             "bad_header", "range_outside_guest_memory", "range_straddles_regions",
                             "range_overflow", "reporting_buffer_not_writable", "chain_too_long",
                             "chain_next_out_of_range", "chain_head_out_of_range"})
    EXPECT_GE(metric_sum(m, "fphd_protocol_errors_total", {{"reason", reason}}), 1) << reason << "\n" << m;
  EXPECT_GE(metric_sum(m, "fphd_skipped_bytes_total", {{"reason", "misaligned"}}), 2 * MiB);

  good.signal(SIGTERM);
  auto s = good.wait_event("summary");
  ASSERT_TRUE(s);
  EXPECT_EQ((*s)["corrupted_bytes"].get<int64_t>(), 0);
  EXPECT_EQ(good.wait(), 0);
}

// Issue 11: a front end owns its memory fds and can shrink them under fphd's
// mapping at any time. fphd must not take SIGBUS (it would end reclaim for
// every VM): that session alone is closed, with a log line naming the region
// and the `memory_fault` counter, and the other VM keeps reclaiming.
TEST(BadInput, FrontEndShrinkingItsMemoryUnderARunningRingClosesOnlyItsSession) {
  TempDir dir;
  Fphd fphd(dir);
  EvilFrontEnd good(fphd.socket);
  good.handshake();
  EvilFrontEnd bad(fphd.socket);
  bad.handshake();

  // Both reclaim to begin with.
  auto reclaims = [](EvilFrontEnd& fe, uint64_t gpa, uint16_t used_before) {
    std::memset(fe.mem[1] + (gpa - kRegion), 0x5c, 4 * MiB);
    const int64_t before = fe.allocated();
    EXPECT_TRUE(fe.ring.add_chain(std::vector<vq::Buffer>{{gpa, 4 * MiB, true}}).has_value());
    fe.kick_now();
    EXPECT_TRUE(eventually([&] { return fe.used_idx() == used_before + 1; }));
    return before - fe.allocated();
  };
  EXPECT_GE(reclaims(good, kRegion + 4 * MiB, 0), static_cast<int64_t>(4 * MiB));
  EXPECT_GE(reclaims(bad, kRegion + 4 * MiB, 0), static_cast<int64_t>(4 * MiB));

  // The bad front end offers a chain, then truncates the region holding the
  // rings to nothing and kicks: fphd's next ring read is past EOF. (From
  // here on the test must not touch bad.mem[0] itself: it would SIGBUS.)
  ASSERT_TRUE(bad.ring.add_chain(std::vector<vq::Buffer>{{kRegion + 8 * MiB, 2 * MiB, true}}).has_value());
  ASSERT_EQ(ftruncate(bad.ram[0].get(), 0), 0);
  bad.kick_now();
  pollfd p{bad.sock.get(), POLLIN, 0};
  ASSERT_EQ(poll(&p, 1, 60000), 1);
  char c;
  EXPECT_EQ(read(bad.sock.get(), &c, 1), 0) << "fphd should close the faulting session";

  // fphd is alive, said what happened, counted it once, and the other VM
  // still reclaims.
  ASSERT_TRUE(fphd.proc->running()) << fphd.proc->stderr_text();
  EXPECT_GE(reclaims(good, kRegion + 12 * MiB, 1), static_cast<int64_t>(4 * MiB));
  ASSERT_TRUE(fphd.proc->running());
  const std::string log = fphd.proc->stderr_text();
  EXPECT_NE(log.find("guest memory region gpa=0x0 size=0x2000000 faulted at"), std::string::npos) << log;
  EXPECT_NE(log.find("shrank the file"), std::string::npos) << log;
  const std::string m = fphd.scrape();
  EXPECT_EQ(metric_sum(m, "fphd_protocol_errors_total", {{"reason", "memory_fault"}}), 1) << m;
}

namespace {

size_t mappings_of(pid_t pid) {
  std::ifstream maps("/proc/" + std::to_string(pid) + "/maps");
  size_t n = 0;
  for (std::string line; std::getline(maps, line);) ++n;
  return n;
}

// One short session: a GET_FEATURES round trip, then the front end hangs up.
void one_session(const std::string& path) {
  UniqueFd fd = connect_unix(path);
  vu::Header h{static_cast<uint32_t>(vu::Request::GetFeatures), vu::kVersion, 0};
  ASSERT_TRUE(vu::send_message(fd.get(), h, {}, {}).has_value());
  auto r = vu::recv_message(fd.get());
  ASSERT_TRUE(r.has_value());
}

}  // namespace

// Found by the adversarial soak (docs/soak.md): every ended session kept its
// thread unjoined (its stack and two mappings) until fphd stopped, so a
// front end that reconnects all day grew fphd without bound and, at the
// kernel's 65530 mappings, made thread creation fail and fphd abort. Ended
// session threads are now joined as they end: 400 sessions later fphd has
// the mappings it had after the first few.
// A front end that repeats a bad message in a loop is refused and counted
// every time, but its log lines are budgeted (log.h LineBudget: 20, then one
// a second): a flood must not fill the disk or, through journald's
// per-service rate limit, hide the lines of the other VMs.
TEST(BadInput, AFrontEndLoopingOnABadMessageCannotFloodTheLog) {
  TempDir dir;
  Fphd fphd(dir);
  constexpr int kFlood = 3000;  // and one more after a pause
  const auto began = std::chrono::steady_clock::now();
  {
    EvilFrontEnd fe(fphd.socket);
    fe.handshake();
    // GET_CONFIG past the end of the config space: always answered (with an
    // empty payload), never closes the session.
    const auto bad = vu::encode_config({64, 8, 0, std::vector<uint8_t>(8)});
    for (int i = 0; i < kFlood; ++i) {
      ASSERT_TRUE(fe.send(static_cast<uint32_t>(vu::Request::GetConfig), bad, {}, false)) << i;
      auto r = fe.recv();
      ASSERT_TRUE(r) << "no reply to GET_CONFIG " << i;
      ASSERT_EQ(r->header.request, static_cast<uint32_t>(vu::Request::GetConfig));
    }
    EXPECT_NE(fe.get(vu::Request::GetFeatures), ~0ull) << "the session is still up";
    // A second later the budget lets one line through, and it says how many
    // were held back.
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    ASSERT_TRUE(fe.send(static_cast<uint32_t>(vu::Request::GetConfig), bad, {}, false));
    ASSERT_TRUE(fe.recv());
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  // Another VM's problem after the flood is logged at once.
  {
    EvilFrontEnd other(fphd.socket);
    other.handshake();
    EXPECT_NE(other.ack(vu::Request::SetFeatures, std::vector<uint8_t>(4)), 0u);
    EXPECT_NE(other.get(vu::Request::GetFeatures), ~0ull);
  }
  // ... and the flooding session's last line says how many of its lines
  // were held back in all.
  ASSERT_TRUE(eventually([&] {
    const std::string t = fphd.proc->stderr_text();
    return t.find("SET_FEATURES") != std::string::npos &&
           t.find("of its log lines were held back by its budget") != std::string::npos;
  })) << fphd.proc->stderr_text();
  ASSERT_TRUE(fphd.proc->running());

  const std::string log = fphd.proc->stderr_text();
  size_t lines = 0, at = 0;
  bool says_held_back = false;
  while ((at = log.find("GET_CONFIG:", at)) != std::string::npos) {
    const size_t eol = log.find('\n', at);
    says_held_back |= log.substr(at, eol - at).find("held back before this one") != std::string::npos;
    ++lines;
    at = eol;
  }
  // 20 at once (less the handshake's own lines), then at most one per
  // second of the flood (plus one for the second that had begun).
  EXPECT_GE(lines, 10u) << log;
  EXPECT_LE(lines, 20u + static_cast<size_t>(secs) + 1) << secs << " s\n" << log;
  EXPECT_TRUE(says_held_back) << log;
  // The counter saw every one of them.
  EXPECT_EQ(metric_sum(fphd.scrape(), "fphd_protocol_errors_total", {{"reason", "bad_config_access"}}), kFlood + 1);
}

TEST(BadInput, EndedSessionsLeaveNoThreadBehind) {
  TempDir dir;
  Fphd fphd(dir);
  for (int i = 0; i < 20; ++i) ASSERT_NO_FATAL_FAILURE(one_session(fphd.socket));
  ASSERT_TRUE(eventually([&] { return metric_sum(fphd.scrape(), "fphd_sessions") == 0; }, 30s));
  const size_t baseline = mappings_of(fphd.proc->pid());
  for (int i = 0; i < 400; ++i) ASSERT_NO_FATAL_FAILURE(one_session(fphd.socket));
  EXPECT_TRUE(eventually([&] { return mappings_of(fphd.proc->pid()) <= baseline + 16; }, 30s))
      << "fphd has " << mappings_of(fphd.proc->pid()) << " mappings, " << baseline
      << " after the first 20 sessions: ended session threads are not joined";
  EXPECT_TRUE(fphd.proc->running());
}
