// Guest memory can never SIGBUS fphd (issue 11): a region past the end of its
// file is refused where it arrives, and a file the front end shrinks later
// turns into zeros under the SIGBUS guard, the session that owns it closes
// with `memory_fault`, and every other session keeps reclaiming.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "fph/daemon/dirty_log.h"
#include "fph/daemon/memory_guard.h"
#include "session_fixture.h"

using namespace fph;
using namespace fph::daemon;
using namespace fph::testing_support;

namespace {

UniqueFd memfd_of(uint64_t size) {
  UniqueFd fd(memfd_create("guard-test", MFD_CLOEXEC));
  EXPECT_TRUE(fd);
  EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(size)), 0);
  return fd;
}

uint8_t* map_shared(int fd, uint64_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  EXPECT_NE(p, MAP_FAILED);
  return p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
}

bool closed_by_peer(int sock) {
  pollfd p{sock, POLLIN, 0};
  if (poll(&p, 1, 10'000) != 1) return false;
  char c;
  return read(sock, &c, 1) == 0;
}

}  // namespace

TEST(MemoryGuard, ShrunkFileUnderAGuardedMappingReadsZerosInsteadOfSigbus) {
  constexpr uint64_t kSize = 1 << 20;
  auto fd = memfd_of(kSize);
  uint8_t* p = map_shared(fd.get(), kSize);
  ASSERT_NE(p, nullptr);
  std::memset(p, 0x5a, kSize);
  GuardedRange g(p, kSize);
  ASSERT_TRUE(g.guarded());
  EXPECT_FALSE(g.faulted());

  ASSERT_EQ(ftruncate(fd.get(), 0), 0);  // the front end shrinks its file
  volatile uint8_t* v = p;
  EXPECT_EQ(v[4096 * 3], 0);  // would be SIGBUS: reads zero now
  EXPECT_TRUE(g.faulted());
  EXPECT_EQ(g.fault_addr(), reinterpret_cast<uintptr_t>(p) + 4096 * 3);
  v[100] = 7;  // writes go to throwaway memory, no second fault
  EXPECT_EQ(v[100], 7);
  EXPECT_EQ(v[kSize - 1], 0);  // the whole range was replaced
  g.reset();
  EXPECT_EQ(munmap(p, kSize), 0);
}

TEST(MemoryGuard, UnguardedSigbusStillKills) {
  // Install the guard (a registration does), then fault outside every range:
  // a real bug must still crash.
  constexpr uint64_t kSize = 1 << 16;
  auto other = memfd_of(kSize);
  uint8_t* q = map_shared(other.get(), kSize);
  GuardedRange g(q, kSize);
  ASSERT_TRUE(g.guarded());
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    UniqueFd fd(memfd_create("guard-unguarded", MFD_CLOEXEC));
    if (!fd || ftruncate(fd.get(), kSize) != 0) _exit(3);
    void* m = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (m == MAP_FAILED) _exit(3);
    if (ftruncate(fd.get(), 0) != 0) _exit(3);
    volatile uint8_t* v = static_cast<uint8_t*>(m);
    (void)v[0];
    _exit(0);  // survived: the guard swallowed a fault it must not
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 3) << "child setup failed";
  // SIGBUS without a sanitizer; with one, its report and then a non-zero
  // exit or SIGABRT (ASAN_OPTIONS=abort_on_error=1, as scripts/test.sh sets).
  EXPECT_TRUE((WIFSIGNALED(status) &&
               (WTERMSIG(status) == SIGBUS || WTERMSIG(status) == SIGABRT)) ||
              (WIFEXITED(status) && WEXITSTATUS(status) != 0))
      << "status 0x" << std::hex << status;
  EXPECT_FALSE(g.faulted());
  g.reset();
  munmap(q, kSize);
}

// The dirty log is a front end's file too: a log shrunk after SET_LOG_BASE
// validated it takes marks into throwaway memory and says so.
TEST(MemoryGuard, DirtyLogShrunkAfterValidationFaultsInsteadOfSigbus) {
  UniqueFd fd = memfd_of(1 << 16);
  const int raw = fd.get();
  auto log = DirtyLog::map(UniqueFd(dup(raw)), proto::vu::LogParams{1 << 16, 0});
  ASSERT_TRUE(log) << log.error();
  EXPECT_TRUE((*log)->mark(0, 4096));
  EXPECT_FALSE((*log)->faulted());
  ASSERT_EQ(ftruncate(raw, 0), 0);
  EXPECT_TRUE((*log)->mark(64 * 4096, 4096));  // would be SIGBUS without the guard
  EXPECT_TRUE((*log)->faulted());
}

TEST(MemoryGuard, SlotsAreReused) {
  constexpr uint64_t kSize = 4096;
  auto fd = memfd_of(kSize);
  uint8_t* p = map_shared(fd.get(), kSize);
  for (int i = 0; i < 3 * kGuardSlots; ++i) {
    GuardedRange g(p, kSize);
    ASSERT_TRUE(g.guarded()) << i;
  }
  munmap(p, kSize);
}

TEST(MemoryGuard, RegionPastTheEndOfItsFileIsRefusedWhereItArrives) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  ASSERT_EQ(fe.get_u64(vu::Request::GetFeatures) & kFeatures, kFeatures);
  ASSERT_TRUE(fe.send(vu::Request::SetFeatures, vu::encode_u64(kFeatures)));
  const uint64_t pf = fe.get_u64(vu::Request::GetProtocolFeatures);
  ASSERT_TRUE(fe.send(vu::Request::SetProtocolFeatures, vu::encode_u64(pf)));
  ASSERT_EQ(fe.acked(vu::Request::SetOwner, {}), 0u);
  // The file is 64 MiB: a 128 MiB region, then an offset past EOF.
  vu::MemoryRegion longer{0, 2 * kRam, kUaddr, 0};
  EXPECT_EQ(fe.acked(vu::Request::AddMemReg, vu::encode_single_region(longer), {fe.ram.get()}), 1u);
  vu::MemoryRegion past{0, 2 * MiB, kUaddr, kRam};
  EXPECT_EQ(fe.acked(vu::Request::AddMemReg, vu::encode_single_region(past), {fe.ram.get()}), 1u);
  EXPECT_EQ(d.value("fphd_protocol_errors_total", {{"reason", "map_failed"}}), 2);
  EXPECT_EQ(d.session->info().regions, 0u);
  // The session goes on: a region that fits is accepted.
  vu::MemoryRegion fits{0, kRam, kUaddr, 0};
  EXPECT_EQ(fe.acked(vu::Request::AddMemReg, vu::encode_single_region(fits), {fe.ram.get()}), 0u);
  EXPECT_EQ(d.session->info().regions, 1u);
}

TEST(MemoryGuard, FileShrunkUnderARunningRingClosesOnlyThatSession) {
  RunningVm bad("guard-bad");
  RunningVm good("guard-good");
  ASSERT_GT(bad.fe.reclaimed_by_report(32 * MiB), 0);
  ASSERT_GT(good.fe.reclaimed_by_report(32 * MiB), 0);

  // The bad front end offers a chain, then shrinks its RAM file to nothing
  // and kicks: fphd's next read of the ring is past EOF. (The test front
  // end must not touch its own mapping after the shrink: it is in this
  // process and unguarded.)
  ASSERT_TRUE(bad.fe.ring.add_chain(std::vector<vq::Buffer>{{40 * MiB, 2 * MiB, true}}).has_value());
  ASSERT_EQ(ftruncate(bad.fe.ram.get(), 0), 0);
  uint64_t one = 1;
  ASSERT_EQ(write(bad.fe.kick.get(), &one, 8), 8);

  EXPECT_TRUE(closed_by_peer(bad.fe.sock.get()));  // that session closed
  bad.d.thread.join();
  EXPECT_EQ(bad.d.value("fphd_protocol_errors_total", {{"reason", "memory_fault"}}), 1);

  // The process is alive and the other VM still reclaims.
  EXPECT_GT(good.fe.reclaimed_by_report(34 * MiB), 0);
  EXPECT_EQ(good.d.value("fphd_protocol_errors_total", {{"reason", "memory_fault"}}), 0);
  // The bad front end's mapping is past EOF too: drop it without touching it.
  munmap(bad.fe.mem, kRam);
  bad.fe.mem = nullptr;
}
