// A front end that behaves like Linux's virtio_uml (arch/um/drivers/
// virtio_uml.c in Linux 6.1), the in-kernel vhost-user front end user-mode
// Linux uses: what it sends differs from QEMU's in the ways
// docs/protocol.md lists under "Front ends seen in practice". Each test
// drives one of them over a real socketpair against a real Session, with
// real discards on a memfd.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "session_fixture.h"

using namespace fph;
using namespace fph::daemon;
using namespace fph::testing_support;

namespace {

// virtio_uml's SET_MEM_TABLE: a fixed payload with room for two regions
// (72 bytes), nregions = 1, one fd.
std::vector<uint8_t> uml_mem_table() {
  std::vector<vu::MemoryRegion> two = {{0, kRam, kUaddr, 0}, {0, 0, 0, 0}};
  auto b = vu::encode_mem_table(two);
  b[0] = 1;
  return b;
}

// The handshake virtio_uml performs (vhost_user_init, vu_find_vqs): protocol
// features first, the back-end channel, then features, the memory table and
// for each ring call, num, base, addr; then kick and enable. No SET_STATUS.
void uml_handshake(FrontEnd& fe, int call_fd, int backend_fd, uint16_t num = 32) {
  ASSERT_TRUE(fe.send(vu::Request::SetOwner, {}));  // before REPLY_ACK: no ack asked
  const uint64_t offered = fe.get_u64(vu::Request::GetFeatures);
  const uint64_t pf = fe.get_u64(vu::Request::GetProtocolFeatures);
  ASSERT_TRUE(pf & vu::protocol::bit(vu::protocol::kBackendReq)) << "BACKEND_REQ must be offered";
  const uint64_t want = vu::protocol::bit(vu::protocol::kReplyAck) |
                        vu::protocol::bit(vu::protocol::kBackendReq) |
                        vu::protocol::bit(vu::protocol::kConfig);
  ASSERT_TRUE(fe.send(vu::Request::SetProtocolFeatures, vu::encode_u64(pf & want)));
  if (backend_fd >= 0) {
    ASSERT_EQ(fe.acked(vu::Request::SetBackendReqFd, {}, {backend_fd}), 0u);
  }
  ASSERT_EQ(offered & kFeatures, kFeatures);
  // Linux acks VERSION_1 and REPORTING, not VHOST_USER_F_PROTOCOL_FEATURES:
  // rings are then enabled at once.
  const uint64_t features = balloon::kFVersion1 | balloon::kFReporting;
  ASSERT_EQ(fe.acked(vu::Request::SetFeatures, vu::encode_u64(features)), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetMemTable, uml_mem_table(), {fe.ram.get()}), 0u);
  fe.reporting_index = static_cast<uint32_t>(balloon::queue_layout(features).reporting);
  const uint32_t q = fe.reporting_index;
  fe.ring = vq::DriverRing(num, fe.mem, fe.mem + 4096, fe.mem + 8192);
  ASSERT_EQ(fe.acked(vu::Request::SetVringCall, vu::encode_u64(q), {call_fd}), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({q, num})), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringBase, vu::encode_vring_state({q, 0})), 0u);
  vu::VringAddr a{q, 0, kUaddr, kUaddr + 8192, kUaddr + 4096, ~0ull};
  ASSERT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(a)), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringKick, vu::encode_u64(q), {fe.kick.get()}), 0u);
}

// Waits for the next used element by polling the ring itself (the call fd
// may be a pipe nobody reads).
vq::UsedElem poll_used(FrontEnd& fe) {
  for (;;) {
    if (auto u = fe.ring.pop_used()) return *u;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}


}  // namespace

TEST(LinuxFrontEnd, SpareRoomTableAndFourMiBReportsAreServed) {
  Pair sp;
  Daemon d(std::move(sp.a), "uml");
  FrontEnd fe(std::move(sp.b));
  Pipe call;
  uml_handshake(fe, call.w.get(), -1);
  EXPECT_EQ(d.session->info().regions, 1u);
  // Order-10 reports: 4 MiB per buffer (Linux's default on UML).
  std::memset(fe.mem + 16 * MiB, 0x5a, 32 * MiB);
  const int64_t before = blocks_bytes(fe.ram.get());
  std::vector<vq::Buffer> bufs;
  for (uint64_t off = 16 * MiB; off < 48 * MiB; off += 4 * MiB) bufs.push_back({off, 4 * MiB, true});
  fe.post(bufs);
  poll_used(fe);
  EXPECT_GE(before - blocks_bytes(fe.ram.get()), static_cast<int64_t>(32 * MiB));
  // The pipe got the notification: 8 bytes, as virtio_uml's vu_interrupt reads them.
  uint64_t v = 0;
  EXPECT_EQ(read(call.r.get(), &v, 8), 8);
  EXPECT_EQ(v, 1u);
}

// A driver that stops reading its call pipe (a hung or hostile guest) must
// not block fphd: the call fd is made non-blocking, a full pipe means a
// notification is already pending. With a blocking write the 513th return
// below would hang this test (and the pipeline thread) forever.
TEST(LinuxFrontEnd, AFullCallPipeNeverBlocksTheDaemon) {
  Pair sp;
  Daemon d(std::move(sp.a), "uml");
  FrontEnd fe(std::move(sp.b));
  Pipe call;
  ASSERT_EQ(fcntl(call.w.get(), F_SETPIPE_SZ, 4096), 4096);  // 512 notifications
  uml_handshake(fe, call.w.get(), -1);
  for (int i = 0; i < 600; ++i) {
    fe.post({{32 * MiB, 4096, true}});
    poll_used(fe);
  }
  EXPECT_EQ(d.session->info().requests, 600u);
}

// Driver unload and reload (rmmod/insmod virtio_balloon, or a device reset
// in the guest): virtio_uml sends SET_FEATURES, a new memory table and sets
// the rings up from scratch, never sending GET_VRING_BASE, and (having not
// acked VHOST_USER_F_PROTOCOL_FEATURES) no SET_VRING_ENABLE either. Seen with
// Linux 6.1 UML: before the fix the reloaded driver's probe failed with
// "slave reports error: 1" (ring_busy).
TEST(LinuxFrontEnd, RingsSetUpAgainAfterTheDriverIsReloaded) {
  Pair sp;
  Daemon d(std::move(sp.a), "uml");
  FrontEnd fe(std::move(sp.b));
  Pipe call;
  uml_handshake(fe, call.w.get(), -1);
  const uint32_t q = fe.reporting_index;
  std::memset(fe.mem + 32 * MiB, 1, 4 * MiB);
  fe.post({{32 * MiB, 4 * MiB, true}});
  poll_used(fe);

  // The new driver: same memory, a fresh ring at index 0 with another size.
  std::memset(fe.mem, 0, 3 * 4096);
  Pipe call2;
  UniqueFd kick2{eventfd(0, EFD_CLOEXEC)};
  const uint64_t features = balloon::kFVersion1 | balloon::kFReporting;
  ASSERT_EQ(fe.acked(vu::Request::SetFeatures, vu::encode_u64(features)), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetMemTable, uml_mem_table(), {fe.ram.get()}), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringCall, vu::encode_u64(q), {call2.w.get()}), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({q, 64})), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringBase, vu::encode_vring_state({q, 0})), 0u);
  vu::VringAddr a{q, 0, kUaddr, kUaddr + 8192, kUaddr + 4096, ~0ull};
  ASSERT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(a)), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetVringKick, vu::encode_u64(q), {kick2.get()}), 0u);
  fe.ring = vq::DriverRing(64, fe.mem, fe.mem + 4096, fe.mem + 8192);

  std::memset(fe.mem + 40 * MiB, 2, 4 * MiB);
  const int64_t before = blocks_bytes(fe.ram.get());
  ASSERT_TRUE(fe.ring.add_chain(std::vector<vq::Buffer>{{40 * MiB, 4 * MiB, true}}).has_value());
  const uint64_t one = 1;
  ASSERT_EQ(write(kick2.get(), &one, 8), 8);
  auto u = poll_used(fe);
  EXPECT_EQ(u.len, 0u);
  EXPECT_GE(before - blocks_bytes(fe.ram.get()), static_cast<int64_t>(4 * MiB));
  EXPECT_EQ(d.value("fphd_protocol_errors_total", {{"reason", "ring_busy"}}), 0);
}

// A front end that negotiated PROTOCOL_FEATURES can stop a ring properly, so
// its live (started and enabled) ring still refuses SET_VRING_NUM; once it
// disables the ring, the ring may be set up again.
TEST(LinuxFrontEnd, ALiveRingOfAFrontEndThatCanStopItStillRefusesANewSize) {
  Pair sp;
  Daemon d(std::move(sp.a), "qemu-like");
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);  // with VHOST_USER_F_PROTOCOL_FEATURES
  const uint32_t q = fe.reporting_index;
  EXPECT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({q, 32})), 1u);
  EXPECT_EQ(d.value("fphd_protocol_errors_total", {{"reason", "ring_busy"}}), 1);
  ASSERT_EQ(fe.acked(vu::Request::SetVringEnable, vu::encode_vring_state({q, 0})), 0u);
  EXPECT_EQ(fe.acked(vu::Request::SetVringNum, vu::encode_vring_state({q, 32})), 0u);
  EXPECT_EQ(d.value("fphd_protocol_errors_total", {{"reason", "ring_busy"}}), 1);
}

// The back-end channel: a new balloon target is written to the config space
// and announced with CONFIG_CHANGE_MSG; the driver reads it with GET_CONFIG.
TEST(LinuxFrontEnd, ConfigChangeIsSentOnTheBackendChannel) {
  Pair sp;
  Daemon d(std::move(sp.a), "uml");
  FrontEnd fe(std::move(sp.b));
  Pipe call;
  Pair backend;
  uml_handshake(fe, call.w.get(), backend.b.get());
  backend.b.reset();  // the front end keeps only its end, as virtio_uml does
  EXPECT_TRUE(d.session->info().backend_channel);

  auto r = d.session->set_num_pages(2048);
  ASSERT_TRUE(r.has_value()) << r.error();
  auto m = vu::recv_message(backend.a.get());
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->header.request, static_cast<uint32_t>(vu::BackendRequest::ConfigChangeMsg));
  EXPECT_EQ(m->header.flags, vu::kVersion);  // no NEED_REPLY: fphd never waits on the guest
  EXPECT_TRUE(m->payload.empty());
  EXPECT_EQ(d.value("fphd_backend_requests_total", {{"request", "config_change"}, {"outcome", "sent"}}), 1);

  // virtio_uml reads config from offset 0 up to the field it wants.
  vu::ConfigPayload q{0, 8, 0, std::vector<uint8_t>(8)};
  ASSERT_TRUE(fe.send(vu::Request::GetConfig, vu::encode_config(q)));
  auto c = fe.recv();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->header.flags, vu::kVersion | vu::kFlagReply);
  auto got = vu::parse_config(c->payload);
  ASSERT_TRUE(got);
  ASSERT_EQ(got->size, 8u);
  uint32_t num_pages;
  std::memcpy(&num_pages, got->data.data(), 4);
  EXPECT_EQ(num_pages, 2048u);

  // The front end goes away from its channel: the next change is still
  // written to the config space, the notification fails and is counted.
  backend.a.reset();
  EXPECT_FALSE(d.session->set_num_pages(1).has_value());
  EXPECT_GE(d.value("fphd_backend_requests_total", {{"outcome", "failed"}}), 1);
  EXPECT_EQ(d.session->info().num_pages, 1u);
}

// Without BACKEND_REQ negotiated the target still changes; the admin reply
// says the driver was not told.
TEST(LinuxFrontEnd, NoBackendChannelMeansNotNotified) {
  Pair sp;
  Daemon d(std::move(sp.a), "uml");
  FrontEnd fe(std::move(sp.b));
  Pipe call;
  uml_handshake(fe, call.w.get(), -1);
  auto r = d.session->set_num_pages(10);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().find("no back-end channel"), std::string::npos) << r.error();
  EXPECT_EQ(d.session->info().num_pages, 10u);
}
