// The vhost-user message rules (docs/protocol.md "Message rules", issue 11
// part 3) and the in-flight head rule, each driven over a real socket by a
// test front end: the offending message, then the reply or the close, the
// counter, and that nothing outside a reported range was discarded.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "fph/daemon/session.h"
#include "fph/proto/channel.h"
#include "session_fixture.h"

using namespace fph;
using namespace fph::daemon;
using namespace fph::testing_support;
namespace vu = proto::vu;
namespace vq = proto::vq;
namespace balloon = proto::balloon;

namespace {

// Whether the back end closed the connection within 10 s (EOF, no message).
bool closed_by_peer(FrontEnd& fe) {
  pollfd p{fe.sock.get(), POLLIN, 0};
  if (poll(&p, 1, 10000) != 1) return false;
  char c;
  return read(fe.sock.get(), &c, 1) == 0;
}

// The next message within 10 s, or nullopt.
std::optional<vu::Message> reply_within(FrontEnd& fe) {
  pollfd p{fe.sock.get(), POLLIN, 0};
  if (poll(&p, 1, 10000) != 1) return std::nullopt;
  return fe.recv();
}

// The session still answers (a GET_FEATURES round trip).
bool alive(FrontEnd& fe) {
  return (fe.get_u64(vu::Request::GetFeatures) & balloon::kFVersion1) != 0;
}

// Whether fphd has closed its copy of a pipe's write end we sent it: with
// our own copy closed, the read end then sees EOF.
bool write_end_closed_by_peer(int read_end) {
  pollfd p{read_end, POLLIN, 0};
  if (poll(&p, 1, 10000) != 1) return false;
  char c;
  return read(read_end, &c, 1) == 0;
}

std::optional<vu::ConfigPayload> get_config(FrontEnd& fe, uint32_t offset, uint32_t size) {
  vu::ConfigPayload q{offset, size, 0, {}};
  EXPECT_TRUE(fe.send(vu::Request::GetConfig, vu::encode_config(q)));
  auto m = reply_within(fe);
  if (!m) return std::nullopt;
  EXPECT_EQ(m->header.request, static_cast<uint32_t>(vu::Request::GetConfig));
  EXPECT_EQ(m->header.flags, vu::kVersion | vu::kFlagReply);
  // The error reply (size 0) does not parse: decode the three words by hand.
  if (m->payload.size() < 12) return std::nullopt;
  vu::ConfigPayload c;
  std::memcpy(&c.offset, m->payload.data(), 4);
  std::memcpy(&c.size, m->payload.data() + 4, 4);
  std::memcpy(&c.flags, m->payload.data() + 8, 4);
  c.data.assign(m->payload.begin() + 12, m->payload.end());
  EXPECT_EQ(c.data.size(), c.size);
  return c;
}

}  // namespace

// ---- 1. GET_CONFIG / SET_CONFIG against the 20-byte config space ----

TEST(MessageRules, GetConfigIsBoundedByTheConfigSpace) {
  RunningVm vm;
  // What real front ends ask: Linux virtio_uml reads from 0 to the end of
  // the field it wants (4, 8, 16 bytes), QEMU the size it is configured
  // with (8 seen), fph-guest the epoch at 16.
  for (uint32_t size : {4u, 8u, 16u, 20u}) {
    auto c = get_config(vm.fe, 0, size);
    ASSERT_TRUE(c) << size;
    EXPECT_EQ(c->offset, 0u);
    EXPECT_EQ(c->size, size);
  }
  auto epoch = get_config(vm.fe, balloon::kOffFphEpoch, 4);
  ASSERT_TRUE(epoch);
  EXPECT_EQ(epoch->size, 4u);
  EXPECT_EQ(errors(vm.d, "bad_config_access"), 0);

  // Past the end, size 0, an offset that wraps: the error reply (size 0,
  // no data), counted; the session goes on.
  for (auto [offset, size] : {std::pair<uint32_t, uint32_t>{16, 8}, {20, 4}, {0, 24}, {4, 0}}) {
    auto c = get_config(vm.fe, offset, size);
    ASSERT_TRUE(c) << offset << "+" << size;
    EXPECT_EQ(c->size, 0u) << offset << "+" << size;
    EXPECT_TRUE(c->data.empty());
  }
  EXPECT_EQ(errors(vm.d, "bad_config_access"), 3);
  EXPECT_EQ(errors(vm.d, "bad_payload"), 1);  // size 0: the wire format says so already
  {
    // offset 0xfffffffc + 8 wraps 32 bits: refused by the payload parser.
    std::vector<uint8_t> p(12 + 8, 0);
    const uint32_t words[3] = {0xfffffffcu, 8, 0};
    std::memcpy(p.data(), words, 12);
    ASSERT_TRUE(vm.fe.send(vu::Request::GetConfig, p));
    auto m = reply_within(vm.fe);
    ASSERT_TRUE(m);
    EXPECT_EQ(m->payload.size(), 12u);
  }
  EXPECT_EQ(errors(vm.d, "bad_payload"), 2);
  EXPECT_TRUE(alive(vm.fe));
}

TEST(MessageRules, SetConfigWritesOnlyTheDriverWritableFields) {
  RunningVm vm;
  auto write = [&](uint32_t offset, uint32_t size, uint32_t flags, uint8_t v) {
    vu::ConfigPayload c{offset, size, flags, std::vector<uint8_t>(size, v)};
    return vm.fe.acked(vu::Request::SetConfig, vu::encode_config(c));
  };
  EXPECT_EQ(write(balloon::kOffActual, 4, 0, 0x11), 0u);
  EXPECT_NE(write(balloon::kOffNumPages, 4, 0, 0x22), 0u);    // device-written field
  EXPECT_NE(write(balloon::kOffFphEpoch, 4, 0, 0x33), 0u);    // the epoch: read only
  EXPECT_NE(write(balloon::kOffFphEpoch, 4, 1, 0x33), 0u);    // even for a migration write
  EXPECT_NE(write(balloon::kOffActual, 8, 0, 0x44), 0u);      // actual + free_page_hint_cmd_id
  EXPECT_EQ(write(balloon::kOffNumPages, 4, 1, 0x55), 0u);    // migration may restore num_pages
  EXPECT_EQ(errors(vm.d, "bad_config_access"), 4);
  auto c = get_config(vm.fe, 0, 20);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->data[balloon::kOffNumPages], 0x55);
  EXPECT_EQ(c->data[balloon::kOffActual], 0x11);
  EXPECT_EQ(c->data[balloon::kOffActual + 4], 0);
  EXPECT_EQ(c->data[balloon::kOffFphEpoch], 0);
  EXPECT_EQ(vm.d.session->info().actual, 0x11111111u);
}

// ---- 2. The REPLY flag from the front end ----

TEST(MessageRules, AMessageWithTheReplyFlagClosesTheSession) {
  RunningVm vm;
  RunningVm other("other-vm");
  vu::Header h{static_cast<uint32_t>(vu::Request::GetFeatures), vu::kVersion | vu::kFlagReply, 0};
  ASSERT_TRUE(vu::send_message(vm.fe.sock.get(), h, {}).has_value());
  EXPECT_TRUE(closed_by_peer(vm.fe)) << "no reply, the session is closed";
  vm.d.thread.join();
  EXPECT_EQ(errors(vm.d, "unexpected_reply"), 1);
  // Another VM is untouched.
  EXPECT_GT(other.fe.reclaimed_by_report(16 * MiB), 0);
}

// ---- 3. SET_FEATURES without VIRTIO_F_VERSION_1 ----

TEST(MessageRules, FeaturesWithoutVersion1AreRefusedAndNotApplied) {
  RunningVm vm;
  const uint64_t legacy = kFeatures & ~balloon::kFVersion1;
  EXPECT_EQ(vm.fe.acked(vu::Request::SetFeatures, vu::encode_u64(legacy | balloon::kFPagePoison)), 1u);
  EXPECT_EQ(errors(vm.d, "version_1_missing"), 1);
  EXPECT_EQ(vm.d.session->info().features, kFeatures) << "the refused features were not applied";
  // The device does not take FEATURES_OK after a refused SET_FEATURES
  // (virtio 1.2 2.2.2): GET_STATUS tells a front end without REPLY_ACK.
  EXPECT_EQ(vm.fe.acked(vu::Request::SetStatus, vu::encode_u64(balloon::kStatusAcknowledge |
                                                               balloon::kStatusDriver |
                                                               balloon::kStatusFeaturesOk)),
            0u);
  EXPECT_EQ(vm.fe.get_u64(vu::Request::GetStatus),
            uint64_t{balloon::kStatusAcknowledge | balloon::kStatusDriver});
  // Without NEED_REPLY: refused all the same, nothing to answer.
  ASSERT_TRUE(vm.fe.send(vu::Request::SetFeatures, vu::encode_u64(legacy)));
  EXPECT_TRUE(alive(vm.fe));
  EXPECT_EQ(errors(vm.d, "version_1_missing"), 2);
  EXPECT_EQ(vm.d.session->info().features, kFeatures);
  // Acceptable features again: applied, FEATURES_OK taken.
  EXPECT_EQ(vm.fe.acked(vu::Request::SetFeatures, vu::encode_u64(kFeatures)), 0u);
  EXPECT_EQ(vm.fe.acked(vu::Request::SetStatus, vu::encode_u64(15)), 0u);
  EXPECT_EQ(vm.fe.get_u64(vu::Request::GetStatus), 15u);
  EXPECT_GT(vm.fe.reclaimed_by_report(16 * MiB), 0);
}

TEST(MessageRules, AckedFeaturesCheck) {
  const uint64_t offered = kOfferedFeatures;
  EXPECT_FALSE(check_acked_features(balloon::kFVersion1, offered));
  EXPECT_FALSE(check_acked_features(kFeatures, offered));
  auto v1 = check_acked_features(balloon::kFReporting, offered);
  ASSERT_TRUE(v1);
  EXPECT_EQ(v1->first, "version_1_missing");
  EXPECT_NE(v1->second.find("VIRTIO_F_VERSION_1"), std::string::npos);
  auto extra = check_acked_features(kFeatures | (1ull << 40), offered);
  ASSERT_TRUE(extra);
  EXPECT_EQ(extra->first, "features_not_offered");
  // What Linux virtio_uml sends (docs/protocol.md) passes.
  EXPECT_FALSE(check_acked_features(0x150000030ull, offered));
  EXPECT_FALSE(check_acked_features(0x110000020ull, offered));
}

// ---- 4. Unexpected file descriptors ----

TEST(MessageRules, UnexpectedFdsOnAMessageWhoseReplyHasNoErrorFormCloseTheSession) {
  RunningVm vm;
  RunningVm other("other-vm");
  Pipe p;
  ASSERT_TRUE(vm.fe.send(vu::Request::GetFeatures, {}, {p.w.get()}));
  p.w.reset();
  EXPECT_TRUE(closed_by_peer(vm.fe)) << "GET_FEATURES must not be left unanswered";
  EXPECT_TRUE(write_end_closed_by_peer(p.r.get())) << "the fd was not closed";
  vm.d.thread.join();
  EXPECT_EQ(errors(vm.d, "bad_fd_count"), 1);
  EXPECT_GT(other.fe.reclaimed_by_report(16 * MiB), 0);
}

TEST(MessageRules, UnexpectedFdsAreClosedAndAnsweredWithAnError) {
  RunningVm vm;
  {
    // A message with an error form: GET_CONFIG gets its empty reply.
    Pipe p;
    vu::ConfigPayload q{0, 8, 0, {}};
    ASSERT_TRUE(vm.fe.send(vu::Request::GetConfig, vu::encode_config(q), {p.w.get()}));
    p.w.reset();
    auto m = reply_within(vm.fe);
    ASSERT_TRUE(m);
    EXPECT_EQ(m->payload.size(), 12u);
    EXPECT_TRUE(write_end_closed_by_peer(p.r.get()));
  }
  {
    // A message without a reply of its own, NEED_REPLY set: a nack.
    Pipe p;
    EXPECT_EQ(vm.fe.acked(vu::Request::SetOwner, {}, {p.w.get()}), 1u);
    p.w.reset();
    EXPECT_TRUE(write_end_closed_by_peer(p.r.get()));
  }
  {
    // No reply of its own, no NEED_REPLY: the front end waits for nothing;
    // refused, counted, the fd closed, the session continues.
    Pipe p;
    ASSERT_TRUE(vm.fe.send(vu::Request::SetVringEnable, vu::encode_vring_state({2, 1}), {p.w.get()}));
    p.w.reset();
    EXPECT_TRUE(write_end_closed_by_peer(p.r.get()));
  }
  EXPECT_EQ(errors(vm.d, "bad_fd_count"), 3);
  EXPECT_TRUE(alive(vm.fe));
  EXPECT_GT(vm.fe.reclaimed_by_report(16 * MiB), 0);
}

TEST(MessageRules, TooManyFdsOnGetProtocolFeaturesCloseTheSession) {
  RunningVm vm;
  // Nine fds: more than any message may carry (send_message refuses to).
  Pipe p;
  const auto hdr = vu::encode_header({static_cast<uint32_t>(vu::Request::GetProtocolFeatures),
                                      vu::kVersion, 0});
  iovec iov{const_cast<uint8_t*>(hdr.data()), hdr.size()};
  alignas(cmsghdr) unsigned char cbuf[CMSG_SPACE(sizeof(int) * 9)] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof cbuf;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * 9);
  int fds[9];
  for (int& f : fds) f = p.w.get();
  std::memcpy(CMSG_DATA(c), fds, sizeof fds);
  ASSERT_EQ(sendmsg(vm.fe.sock.get(), &msg, 0), static_cast<ssize_t>(hdr.size()));
  p.w.reset();
  EXPECT_TRUE(closed_by_peer(vm.fe));
  EXPECT_TRUE(write_end_closed_by_peer(p.r.get()));
  vm.d.thread.join();
  EXPECT_EQ(errors(vm.d, "too_many_fds"), 1);
}

TEST(MessageRules, ABadGetVringBaseClosesTheSessionInsteadOfInventingABase) {
  RunningVm vm;
  ASSERT_TRUE(vm.fe.send(vu::Request::GetVringBase, vu::encode_vring_state({9, 0})));
  EXPECT_TRUE(closed_by_peer(vm.fe));
  vm.d.thread.join();
  EXPECT_EQ(errors(vm.d, "bad_payload"), 1);
}

// ---- 5. An available head that is still in flight ----

namespace {

// The real discard syscalls behind a gate: the test decides when a discard
// may run, and every target handed to the engine is recorded.
class GatedDiscarder final : public reclaim::Discarder {
 public:
  reclaim::DiscardOutcome discard(const reclaim::DiscardTarget& t, reclaim::Method m) override {
    {
      std::unique_lock lk(mu_);
      targets_.emplace_back(t.fd_offset, t.length);
      cv_.notify_all();
      cv_.wait(lk, [&] { return open_; });
    }
    return real_.discard(t, m);
  }
  void open() {
    std::lock_guard lk(mu_);
    open_ = true;
    cv_.notify_all();
  }
  bool wait_for(size_t n) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, std::chrono::seconds(10), [&] { return targets_.size() >= n; });
  }
  std::vector<std::pair<uint64_t, uint64_t>> targets() {
    std::lock_guard lk(mu_);
    return targets_;
  }

 private:
  reclaim::SyscallDiscarder real_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
  std::vector<std::pair<uint64_t, uint64_t>> targets_;
};

struct GatedVm {
  reclaim::Topology topo = reclaim::Topology::from_system();
  GatedDiscarder discarder;
  reclaim::PolicyTable policy{topo.node_count()};
  reclaim::SysfsNodeMemoryProbe probe;
  Metrics metrics{"", topo.node_count()};
  reclaim::NodePipelines pipelines{topo, discarder, policy, probe};
  DaemonContext ctx{topo, pipelines, metrics};
  Pair sp;
  std::shared_ptr<Session> session = std::make_shared<Session>(ctx, std::move(sp.a), "gated-vm");
  std::thread thread{[this] { session->run(); }};
  FrontEnd fe{std::move(sp.b)};

  ~GatedVm() {
    discarder.open();
    session->request_stop();
    if (thread.joinable()) thread.join();
  }
};

// Publishes `head` in the next avail slot by hand (the DriverRing would
// never offer a head it has not got back) and kicks.
void publish_again(FrontEnd& fe, uint16_t head) {
  uint8_t* avail = fe.mem + kRingGpa + 4096;
  uint16_t idx;
  std::memcpy(&idx, avail + 2, 2);
  std::memcpy(avail + 4 + 2 * (idx % 32), &head, 2);
  __atomic_store_n(reinterpret_cast<uint16_t*>(avail + 2), static_cast<uint16_t>(idx + 1),
                   __ATOMIC_RELEASE);
  uint64_t one = 1;
  ASSERT_EQ(write(fe.kick.get(), &one, 8), 8);
}

uint16_t used_idx(FrontEnd& fe) {
  return __atomic_load_n(reinterpret_cast<uint16_t*>(fe.mem + kRingGpa + 8192 + 2), __ATOMIC_ACQUIRE);
}

}  // namespace

TEST(MessageRules, AHeadOfferedAgainWhileInFlightIsAProtocolErrorForThatSession) {
  GatedVm vm;
  vm.fe.handshake(kFeatures);
  std::memset(vm.fe.mem + 16 * MiB, 0x5c, 8 * MiB);
  // The first report is taken and held in its discard by the gate.
  vm.fe.post({{16 * MiB, 2 * MiB, true}});
  ASSERT_TRUE(vm.discarder.wait_for(1));
  const uint16_t head = 0;  // the DriverRing's first head
  // The same head again, with a different range behind it.
  auto* desc = reinterpret_cast<vq::Desc*>(vm.fe.mem + kRingGpa);
  desc[head] = {20 * MiB, 2 * MiB, vq::kDescFWrite, 0};
  publish_again(vm.fe, head);
  // The session closes; the first request still completes and is returned once.
  EXPECT_TRUE(closed_by_peer(vm.fe));
  vm.discarder.open();
  vm.thread.join();
  EXPECT_EQ(used_idx(vm.fe), 1) << "the head was returned exactly once";
  uint32_t id;
  std::memcpy(&id, vm.fe.mem + kRingGpa + 8192 + 4, 4);
  EXPECT_EQ(id, head);
  // Nothing was discarded for the duplicate: one target, the first range.
  auto t = vm.discarder.targets();
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].first, 16 * MiB);
  EXPECT_EQ(t[0].second, 2 * MiB);
  for (uint64_t i = 0; i < 2 * MiB; i += 4096) ASSERT_EQ(vm.fe.mem[20 * MiB + i], 0x5c) << i;
  double n = 0;
  for (const auto& fam : vm.metrics.registry()->Collect())
    if (fam.name == "fphd_protocol_errors_total")
      for (const auto& m : fam.metric)
        for (const auto& l : m.label)
          if (l.name == "reason" && l.value == "chain_head_in_flight") n += m.counter.value;
  EXPECT_EQ(n, 1);
}
