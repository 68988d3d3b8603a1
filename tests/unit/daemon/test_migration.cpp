// Live migration at the session level, over a real socketpair with real
// memfds, pipes and the real discard path: the dirty log (SET_LOG_BASE,
// LOG_ALL, what gets marked), the hold-discards policy, and device-state
// SAVE/LOAD with CHECK_DEVICE_STATE, including every failure the front end
// can cause.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "fph/daemon/session.h"
#include "fph/proto/device_state.h"
#include "session_fixture.h"


using namespace fph;
using namespace fph::daemon;
using namespace fph::testing_support;
namespace devstate = proto::devstate;
using namespace std::chrono_literals;

namespace {

// A dirty log as QEMU makes one: a memfd sized to cover the guest.
struct Log {
  UniqueFd fd{memfd_create("dirty-log", MFD_CLOEXEC)};
  uint64_t size;
  uint8_t* bits = nullptr;
  explicit Log(uint64_t bytes, uint64_t file_bytes = 0) : size(bytes) {
    EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(file_bytes ? file_bytes : bytes)), 0);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    bits = p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
  }
  ~Log() {
    if (bits) munmap(bits, size);
  }
  bool page(uint64_t gpa) const { return bits[gpa / 4096 / 8] & (1u << (gpa / 4096 % 8)); }
  uint64_t pages_set() const {
    uint64_t n = 0;
    for (uint64_t i = 0; i < size; ++i) n += __builtin_popcount(bits[i]);
    return n;
  }
  void clear() { std::memset(bits, 0, size); }
};
constexpr uint64_t kLogBytes = kRam / 4096 / 8;  // exactly covers the 64 MiB guest

uint64_t set_log_base(FrontEnd& fe, int fd, uint64_t size, uint64_t offset = 0) {
  EXPECT_TRUE(fe.send(vu::Request::SetLogBase, vu::encode_log({size, offset}), {fd}));
  auto m = fe.recv();
  EXPECT_TRUE(m.has_value());
  if (!m) return ~0ull;
  auto v = vu::parse_u64(m->payload, "reply");
  return v ? *v : ~0ull;
}

// What QEMU does to start logging on a running device (vhost_dev_set_log):
// log base, features with LOG_ALL, and the rings' addresses again with the
// log flag and the used ring's GPA.
void start_logging(FrontEnd& fe, Log& log) {
  ASSERT_EQ(set_log_base(fe, log.fd.get(), log.size), 0u);
  ASSERT_EQ(fe.acked(vu::Request::SetFeatures, vu::encode_u64(kFeatures | vu::feature::kLogAll)), 0u);
  vu::VringAddr a{fe.reporting_index, vu::kVringFlagLog, kUaddr, kUaddr + 8192, kUaddr + 4096, kRingGpa + 8192};
  ASSERT_EQ(fe.acked(vu::Request::SetVringAddr, vu::encode_vring_addr(a)), 0u);
}

uint16_t stop_ring(FrontEnd& fe) {
  EXPECT_TRUE(fe.send(vu::Request::GetVringBase, vu::encode_vring_state({fe.reporting_index, 0})));
  auto m = fe.recv();
  EXPECT_TRUE(m.has_value());
  auto st = m ? vu::parse_vring_state(m->payload) : vu::parse_vring_state({});
  return st ? static_cast<uint16_t>(st->num) : 0xffff;
}

uint64_t set_state_fd(FrontEnd& fe, uint32_t direction, int fd) {
  EXPECT_TRUE(fe.send(vu::Request::SetDeviceStateFd, vu::encode_device_state({direction, 0}), {fd}));
  auto m = fe.recv();
  EXPECT_TRUE(m.has_value());
  auto v = m ? vu::parse_u64(m->payload, "reply") : vu::parse_u64({}, "reply");
  return v ? *v : ~0ull;
}

uint64_t check_state(FrontEnd& fe) { return fe.get_u64(vu::Request::CheckDeviceState); }


// A destination that has only negotiated its protocol features (vu-doc: LOAD
// comes before the device starts) loads `blob`; CHECK_DEVICE_STATE's reply.
uint64_t load_into(FrontEnd& fe, std::span<const uint8_t> blob) {
  const uint64_t pf = fe.get_u64(vu::Request::GetProtocolFeatures);
  EXPECT_TRUE(fe.send(vu::Request::SetProtocolFeatures, vu::encode_u64(pf)));
  Pipe p;
  EXPECT_EQ(set_state_fd(fe, 1, p.r.get()), 0x100u);
  p.r.reset();
  EXPECT_EQ(write(p.w.get(), blob.data(), blob.size()), static_cast<ssize_t>(blob.size()));
  p.w.reset();
  return check_state(fe);
}

// A source VM: handshake, a balloon target, the ring stopped; its saved blob.
std::vector<uint8_t> save_from_source(uint32_t num_pages, uint64_t* features = nullptr) {
  Pair sp;
  Daemon d(std::move(sp.a), "source-vm");
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  (void)d.session->set_num_pages(num_pages);
  d.session->set_paused(true);
  stop_ring(fe);
  Pipe p;
  EXPECT_EQ(set_state_fd(fe, 0, p.w.get()), 0x100u);  // ok, no fd returned
  p.w.reset();  // fphd holds its own copy
  auto blob = read_all(p.r.get());
  EXPECT_EQ(check_state(fe), 0u);
  EXPECT_EQ(d.session->migration().state, MigrationState::Saved);
  EXPECT_EQ(d.session->migration().state_bytes_sent, blob.size());
  if (features) *features = d.session->info().features;
  return blob;
}

}  // namespace

TEST(Migration, FeaturesQemuNeedsToMigrateAreOffered) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  EXPECT_TRUE(fe.get_u64(vu::Request::GetFeatures) & vu::feature::kLogAll);
  const uint64_t pf = fe.get_u64(vu::Request::GetProtocolFeatures);
  EXPECT_TRUE(pf & vu::protocol::bit(vu::protocol::kLogShmfd));
  EXPECT_TRUE(pf & vu::protocol::bit(vu::protocol::kDeviceState));
  // Postcopy is not offered: no page-fault protocol feature.
  EXPECT_FALSE(pf & vu::protocol::bit(vu::protocol::kPagefault));
}

TEST(Migration, DiscardsAndUsedRingWritesAreMarkedWhileLogging) {
  RunningVm vm;
  auto& d = vm.d;
  auto& fe = vm.fe;
  Log log(kLogBytes);
  ASSERT_NE(log.bits, nullptr);

  // Before logging: a discard marks nothing.
  std::memset(fe.mem + 16 * MiB, 0x11, 4 * MiB);
  fe.report({{16 * MiB, 4 * MiB, true}});
  ASSERT_EQ(set_log_base(fe, log.fd.get(), log.size), 0u);
  EXPECT_EQ(log.pages_set(), 0u) << "a log attached without LOG_ALL is not written";

  start_logging(fe, log);
  EXPECT_EQ(d.session->migration().state, MigrationState::Logging);
  std::memset(fe.mem + 32 * MiB, 0x22, 4 * MiB);
  const int64_t before = blocks_bytes(fe.ram.get());
  fe.report({{32 * MiB, 2 * MiB, true}, {36 * MiB - 8192, 8192, true}});
  // Still discarded (the default policy keeps reclaiming while migrating)...
  EXPECT_GE(before - blocks_bytes(fe.ram.get()), static_cast<int64_t>(2 * MiB + 8192));
  // ...and every discarded page is marked, nothing around it.
  for (uint64_t g = 32 * MiB; g < 34 * MiB; g += 4096) ASSERT_TRUE(log.page(g)) << std::hex << g;
  EXPECT_TRUE(log.page(36 * MiB - 8192));
  EXPECT_TRUE(log.page(36 * MiB - 4096));
  EXPECT_FALSE(log.page(34 * MiB));
  EXPECT_FALSE(log.page(36 * MiB));
  EXPECT_FALSE(log.page(16 * MiB));
  // The used ring (log_guest_addr = 8 KiB): its page is marked.
  EXPECT_TRUE(log.page(kRingGpa + 8192));
  EXPECT_FALSE(log.page(kRingGpa + 4096)) << "the avail ring is the driver's; fphd never writes it";
  EXPECT_EQ(log.pages_set(), 512u + 2u + 1u);
  EXPECT_EQ(d.session->migration().pages_marked, d.value("fphd_dirty_log_pages_total"));
  EXPECT_GE(d.value("fphd_vm_migration_state", {{"state", "logging"}}), 1.0);

  // Logging off: nothing more is marked.
  log.clear();
  ASSERT_EQ(fe.acked(vu::Request::SetFeatures, vu::encode_u64(kFeatures)), 0u);
  std::memset(fe.mem + 40 * MiB, 0x33, 2 * MiB);
  fe.report({{40 * MiB, 2 * MiB, true}});
  EXPECT_EQ(log.pages_set(), 0u);
  EXPECT_EQ(d.session->migration().state, MigrationState::None);
}

TEST(Migration, HoldDiscardsWhileLoggingIsPerVmAndStillReturnsChains) {
  RunningVm vm;
  auto& d = vm.d;
  auto& fe = vm.fe;
  d.session->set_discard_while_logging(false);
  Log log(kLogBytes);
  start_logging(fe, log);
  std::memset(fe.mem + 32 * MiB, 0x44, 4 * MiB);
  const int64_t before = blocks_bytes(fe.ram.get());
  fe.report({{32 * MiB, 4 * MiB, true}});  // returned at once
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);
  EXPECT_EQ(fe.mem[32 * MiB + 12345], 0x44);
  EXPECT_EQ(d.value("fphd_skipped_bytes_total", {{"reason", "migrating"}}), 4.0 * MiB);
  // Nothing discarded, so only the used ring's page is marked.
  EXPECT_FALSE(log.page(32 * MiB));
  EXPECT_TRUE(log.page(kRingGpa + 8192));
  // Logging over: reclaim resumes.
  ASSERT_EQ(fe.acked(vu::Request::SetFeatures, vu::encode_u64(kFeatures)), 0u);
  fe.report({{32 * MiB, 4 * MiB, true}});
  EXPECT_GE(before - blocks_bytes(fe.ram.get()), static_cast<int64_t>(4 * MiB));
}

TEST(Migration, UnusableLogsAreRefusedWithAReason) {
  RunningVm vm;
  auto& d = vm.d;
  auto& fe = vm.fe;
  {
    Log small(kLogBytes / 2);  // covers 32 of the 64 MiB
    EXPECT_EQ(set_log_base(fe, small.fd.get(), small.size), 1u);
  }
  {
    Log shortfile(kLogBytes, 1024);  // the file is shorter than the mapping asked for
    EXPECT_EQ(set_log_base(fe, shortfile.fd.get(), kLogBytes), 1u);
    EXPECT_EQ(set_log_base(fe, shortfile.fd.get(), 1024, 4096), 1u);  // offset past EOF
  }
  {
    UniqueFd ev(eventfd(0, EFD_CLOEXEC));  // not a file
    EXPECT_EQ(set_log_base(fe, ev.get(), kLogBytes), 1u);
  }
  {
    Log log(kLogBytes);
    EXPECT_EQ(set_log_base(fe, log.fd.get(), 0), 1u);  // size 0
    EXPECT_EQ(set_log_base(fe, log.fd.get(), DirtyLog::kMaxLogBytes + 1), 1u);
  }
  EXPECT_EQ(d.value("fphd_protocol_errors_total", {{"reason", "bad_log"}}), 5.0);
  EXPECT_EQ(d.value("fphd_protocol_errors_total", {{"reason", "bad_payload"}}), 1.0);
  EXPECT_EQ(d.session->migration().log_bytes, 0u);
  // The session still serves.
  EXPECT_GE(fe.reclaimed_by_report(32 * MiB), static_cast<int64_t>(2 * MiB));
}

TEST(Migration, GetVringBaseReturnsTheRequestInFlightBeforeItReplies) {
  RunningVm vm;
  auto& d = vm.d;
  auto& fe = vm.fe;
  Log log(kLogBytes);
  start_logging(fe, log);
  std::memset(fe.mem + 8 * MiB, 0x66, 32 * MiB);
  fe.post({{8 * MiB, 16 * MiB, true}, {24 * MiB, 16 * MiB, true}});
  EXPECT_EQ(stop_ring(fe), 1u);
  // Returned before the reply: the used element is already there.
  auto u = fe.ring.pop_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(d.session->info().inflight, 0);
  EXPECT_EQ(d.session->migration().state, MigrationState::Stopped);
  // Nothing is discarded after the stop: a kick on the stopped ring is ignored.
  std::memset(fe.mem + 48 * MiB, 0x77, 2 * MiB);
  fe.post({{48 * MiB, 2 * MiB, true}});
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(fe.mem[48 * MiB + 100], 0x77);
  EXPECT_FALSE(fe.ring.pop_used().has_value());
}

TEST(Migration, SaveThenLoadCarriesTheDeviceAndBumpsTheEpoch) {
  uint64_t features = 0;
  auto blob = save_from_source(1234, &features);
  auto st = devstate::decode(blob);
  ASSERT_TRUE(st) << st.error().message();
  EXPECT_EQ(st->config.num_pages, 1234u);
  EXPECT_EQ(st->features, features);
  EXPECT_TRUE(st->paused);
  EXPECT_EQ(st->epoch, 0u);
  EXPECT_EQ(st->source, "source-vm");

  // The destination: a fresh session, no memory table yet (vu-doc: LOAD comes
  // before the device starts).
  Pair sp;
  Daemon d(std::move(sp.a), "dest-vm");
  FrontEnd fe(std::move(sp.b));
  EXPECT_EQ(load_into(fe, blob), 0u);
  auto mi = d.session->migration();
  EXPECT_EQ(mi.state, MigrationState::Loaded);
  EXPECT_EQ(mi.epoch, 1u);
  EXPECT_EQ(mi.state_bytes_received, blob.size());
  EXPECT_EQ(d.session->info().num_pages, 1234u);
  EXPECT_TRUE(d.session->info().paused);
  EXPECT_EQ(d.value("fphd_device_state_transfers_total", {{"direction", "load"}, {"outcome", "ok"}}), 1.0);

  // Migrating on again: the epoch keeps counting.
  auto st2 = *st;
  st2.epoch = mi.epoch;
  EXPECT_EQ(devstate::decode(devstate::encode(st2))->epoch, 1u);
}

// Every way a transfer can fail: CHECK_DEVICE_STATE says so, the error names
// what, the session keeps serving.
class LoadFailure : public ::testing::Test {
 protected:
  Pair sp;
  Daemon d{std::move(sp.a), "dest-vm"};
  FrontEnd fe{std::move(sp.b)};
  void SetUp() override {
    signal(SIGPIPE, SIG_IGN);
    d.ctx.state_transfer_timeout = 500ms;
    const uint64_t pf = fe.get_u64(vu::Request::GetProtocolFeatures);
    ASSERT_TRUE(fe.send(vu::Request::SetProtocolFeatures, vu::encode_u64(pf)));
  }
  // Loads `bytes` (closing the pipe after them unless `keep_open`), checks.
  uint64_t load(std::span<const uint8_t> bytes, bool keep_open = false) {
    Pipe p;
    EXPECT_EQ(set_state_fd(fe, 1, p.r.get()), 0x100u);
    p.r.reset();
    std::thread writer([&] {
      size_t off = 0;
      while (off < bytes.size()) {
        ssize_t n = write(p.w.get(), bytes.data() + off, bytes.size() - off);
        if (n <= 0) break;  // EPIPE: fphd stopped reading (oversized)
        off += static_cast<size_t>(n);
      }
      if (!keep_open) p.w.reset();
    });
    const uint64_t r = check_state(fe);
    writer.join();
    return r;
  }
  void expect_failed(const std::string& reason, const std::string& text) {
    auto mi = d.session->migration();
    EXPECT_EQ(mi.state, MigrationState::Failed);
    EXPECT_NE(mi.last_error.find(text), std::string::npos) << mi.last_error;
    EXPECT_EQ(d.value("fphd_device_state_transfers_total", {{"direction", "load"}, {"outcome", reason}}), 1.0);
    EXPECT_EQ(mi.epoch, 0u) << "a failed LOAD changes nothing";
    EXPECT_EQ(d.session->info().num_pages, 0u);
  }
  std::vector<uint8_t> good() {
    devstate::DeviceState s;
    s.features = kFeatures;
    s.config.num_pages = 77;
    return devstate::encode(s);
  }
};

TEST_F(LoadFailure, TruncatedBlob) {
  auto b = good();
  ASSERT_GT(b.size(), 5u);
  b.erase(b.end() - 5, b.end());  // not resize(): GCC 12 warned of a huge default-append
  EXPECT_EQ(load(b), 1u);
  expect_failed("invalid", "blob.");
}

TEST_F(LoadFailure, BadChecksum) {
  auto b = good();
  b[b.size() - 3] ^= 0x10;
  EXPECT_EQ(load(b), 1u);
  expect_failed("invalid", "blob.checksum");
}

TEST_F(LoadFailure, WrongVersion) {
  auto b = good();
  b[4] = 9;
  EXPECT_EQ(load(b), 1u);
  expect_failed("invalid", "blob.version");
}

TEST_F(LoadFailure, OversizedStream) {
  std::vector<uint8_t> big(devstate::kMaxBlobBytes + 4096, 0x5a);
  EXPECT_EQ(load(big), 1u);
  expect_failed("oversized", "bound");
}

TEST_F(LoadFailure, WriterThatNeverClosesTimesOut) {
  auto b = good();
  EXPECT_EQ(load(b, /*keep_open=*/true), 1u);
  expect_failed("timeout", "deadline");
}

TEST_F(LoadFailure, LoadIntoARunningDeviceIsRefused) {
  fe.handshake(kFeatures);
  Pipe p;
  EXPECT_EQ(set_state_fd(fe, 1, p.r.get()) & 0xff, 1u);
  EXPECT_NE(d.session->migration().last_error.find("still started"), std::string::npos);
  EXPECT_EQ(check_state(fe), 1u) << "no transfer was started";
  // The device keeps running and reclaiming.
  EXPECT_GE(fe.reclaimed_by_report(32 * MiB), static_cast<int64_t>(2 * MiB));
}

TEST(Migration, SaveBeforeTheRingsStopIsRefusedAndTheSourceKeepsReclaiming) {
  RunningVm vm;
  auto& d = vm.d;
  auto& fe = vm.fe;
  Pipe p;
  EXPECT_EQ(set_state_fd(fe, 0, p.w.get()), 0x101u);  // error, no fd
  EXPECT_EQ(check_state(fe), 1u);
  EXPECT_EQ(d.session->migration().state, MigrationState::Failed);
  EXPECT_GE(fe.reclaimed_by_report(32 * MiB), static_cast<int64_t>(2 * MiB));
}

TEST(Migration, ReaderClosingEarlyFailsTheSave) {
  signal(SIGPIPE, SIG_IGN);
  RunningVm vm;
  auto& d = vm.d;
  auto& fe = vm.fe;
  stop_ring(fe);
  Pipe p;
  p.r.reset();  // nobody will read
  EXPECT_EQ(set_state_fd(fe, 0, p.w.get()), 0x100u);
  EXPECT_EQ(check_state(fe), 1u);
  EXPECT_NE(d.session->migration().last_error.find("closed its end early"), std::string::npos)
      << d.session->migration().last_error;
  EXPECT_EQ(d.value("fphd_device_state_transfers_total", {{"direction", "save"}, {"outcome", "reader_closed"}}), 1.0);
}

TEST(Migration, YankEndsATransferThatTheFrontEndAbandoned) {
  Pair sp;
  Daemon d(std::move(sp.a));
  d.ctx.state_transfer_timeout = std::chrono::minutes(10);
  FrontEnd fe(std::move(sp.b));
  const uint64_t pf = fe.get_u64(vu::Request::GetProtocolFeatures);
  ASSERT_TRUE(fe.send(vu::Request::SetProtocolFeatures, vu::encode_u64(pf)));
  Pipe p;
  ASSERT_EQ(set_state_fd(fe, 1, p.r.get()), 0x100u);
  // The front end asks for the check but never closes its writer: the
  // session thread waits in CHECK_DEVICE_STATE. Yank must end it anyway.
  ASSERT_TRUE(fe.send(vu::Request::CheckDeviceState, {}));
  std::this_thread::sleep_for(200ms);
  const auto t0 = std::chrono::steady_clock::now();
  d.session->yank();
  d.thread.join();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);  // a bound against hangs, not a speed target
}

namespace {
uint32_t read_epoch(FrontEnd& fe) {
  vu::ConfigPayload q{balloon::kOffFphEpoch, 4, 0, std::vector<uint8_t>(4)};
  EXPECT_TRUE(fe.send(vu::Request::GetConfig, vu::encode_config(q)));
  auto m = fe.recv();
  EXPECT_TRUE(m.has_value());
  auto got = m ? vu::parse_config(m->payload) : vu::parse_config({});
  if (!got || got->size != 4) return ~0u;
  return got->data[0] | got->data[1] << 8 | got->data[2] << 16 | static_cast<uint32_t>(got->data[3]) << 24;
}
}  // namespace

TEST(Migration, TheEpochIsInTheConfigSpaceAfterTheStandardFields) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  EXPECT_TRUE(fe.get_u64(vu::Request::GetFeatures) & balloon::kFFphEpoch);
  fe.handshake(kFeatures | balloon::kFFphEpoch);
  EXPECT_EQ(read_epoch(fe), 0u);
  std::string why;
  EXPECT_EQ(d.session->bump_epoch(&why), 1u);
  EXPECT_FALSE(why.empty()) << "no back-end channel here: the driver polls";
  EXPECT_EQ(read_epoch(fe), 1u);
  // The whole extended space reads in one go; past it is refused.
  vu::ConfigPayload all{0, balloon::kExtConfigSize, 0, std::vector<uint8_t>(balloon::kExtConfigSize)};
  ASSERT_TRUE(fe.send(vu::Request::GetConfig, vu::encode_config(all)));
  auto m = fe.recv();
  ASSERT_TRUE(m);
  EXPECT_EQ(vu::parse_config(m->payload)->size, balloon::kExtConfigSize);
  vu::ConfigPayload past{balloon::kOffFphEpoch, 8, 0, std::vector<uint8_t>(8)};
  ASSERT_TRUE(fe.send(vu::Request::GetConfig, vu::encode_config(past)));
  m = fe.recv();
  ASSERT_TRUE(m);
  ASSERT_EQ(m->payload.size(), 12u) << "an empty config reply: the front end sees a failure";
  EXPECT_EQ(m->payload[4] | m->payload[5] | m->payload[6] | m->payload[7], 0);
  // The driver cannot write it.
  vu::ConfigPayload w{balloon::kOffFphEpoch, 4, 0, {9, 0, 0, 0}};
  EXPECT_EQ(fe.acked(vu::Request::SetConfig, vu::encode_config(w)), 1u);
  EXPECT_EQ(read_epoch(fe), 1u);
}

TEST(Migration, ALoadedEpochIsReadableByTheDriver) {
  devstate::DeviceState s;
  s.features = kFeatures | balloon::kFFphEpoch;
  s.epoch = 41;
  const auto blob = devstate::encode(s);
  Pair sp;
  Daemon d(std::move(sp.a), "dest-vm");
  FrontEnd fe(std::move(sp.b));
  ASSERT_EQ(load_into(fe, blob), 0u);
  EXPECT_EQ(read_epoch(fe), 42u);
}
