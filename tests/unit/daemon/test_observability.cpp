// The observability accounting: verified reclaim, "freed nothing", every skip
// reason with its counter, refault sampling, reclaim state per VM, resident
// bytes and the node view. Real sessions over real sockets, real discards on
// memfds (and hugetlbfs when huge pages can be reserved), measured by the
// kernel.
#include <fcntl.h>
#include <sys/file.h>

#include <fstream>

#include "fph/daemon/heap_trim.h"
#include "fph/probe/scrape.h"
#include "session_fixture.h"

using namespace fph;
using namespace fph::testing_support;

namespace {

void fill(uint8_t* p, uint64_t len, uint8_t v) { std::memset(p, v, len); }

std::map<std::string, std::string> vm(const std::string& extra_key = "", const std::string& v = "") {
  std::map<std::string, std::string> l{{"vm", "obs-vm"}};
  if (!extra_key.empty()) l[extra_key] = v;
  return l;
}

}  // namespace

// --- pure logic ---------------------------------------------------------------

TEST(HeapTrim, TrimsOnceABurstHasSettledAndWhenBurstsNeverSettle) {
  using daemon::HeapTrim;
  HeapTrim t;
  const auto t0 = HeapTrim::Clock::now();
  auto at = [&](int ms) { return t0 + std::chrono::milliseconds(ms); };
  EXPECT_FALSE(t.due(0, at(0), at(0)));  // nothing happened yet
  EXPECT_FALSE(t.due(0, at(0), at(1000)));
  EXPECT_FALSE(t.due(1, at(1990), at(2000)));  // a scrape began 10 ms ago: being served
  EXPECT_TRUE(t.due(1, at(1990), at(3000)));   // began a pass ago: trim
  EXPECT_FALSE(t.due(1, at(1990), at(4000)));  // once
  EXPECT_TRUE(t.due(2, at(4100), at(4300)));   // began kSettle ago: over
  EXPECT_FALSE(t.due(4, at(5950), at(6000)));  // two more (sessions closing), just now
  EXPECT_TRUE(t.due(4, at(5950), at(7000)));
  // A scraper faster than the sampler never lets the count settle: trimmed
  // every kMaxBurstsUntrimmed bursts all the same.
  int trims = 0;
  int now = 8000;
  for (uint64_t b = 5; b <= 4 + 3 * HeapTrim::kMaxBurstsUntrimmed; ++b, now += 1000)
    trims += t.due(b, at(now - 10), at(now));
  EXPECT_EQ(trims, 3);
}

TEST(Metrics, ScrapesAndClosedSessionsCountAsHeapBursts) {
  daemon::Metrics m("127.0.0.1:0", 1);
  ASSERT_FALSE(m.url().empty());
  const uint64_t b0 = m.heap_bursts();
  const auto before = std::chrono::steady_clock::now();
  const std::string body = probe::http_get(m.url());
  EXPECT_NE(body.find("fphd_sessions"), std::string::npos);
  EXPECT_EQ(m.heap_bursts(), b0 + 1);
  EXPECT_GE(m.last_heap_burst(), before);
  (void)probe::http_get(m.url());
  EXPECT_EQ(m.heap_bursts(), b0 + 2);
  m.session_opened();
  EXPECT_EQ(m.heap_bursts(), b0 + 2);
  m.session_closed();
  EXPECT_EQ(m.heap_bursts(), b0 + 3);
}

TEST(ReclaimStatus, FollowsFeaturesPoisonPauseRingsAndBacking) {
  SessionInfo i;
  EXPECT_FALSE(reclaim_status(i, 0, 0).state);  // not negotiated yet
  i.features_set = true;
  i.features = balloon::kFVersion1;
  auto s = reclaim_status(i, 0, 0);
  EXPECT_EQ(s.state, ReclaimState::Disabled);
  EXPECT_EQ(s.reason, DisabledReason::NoReporting);
  i.features |= balloon::kFReporting | balloon::kFPagePoison;
  i.poison_val = 0xaaaaaaaa;
  s = reclaim_status(i, 0, 0);
  EXPECT_EQ(s.reason, DisabledReason::Poison);
  i.poison_val = 0;  // PAGE_POISON negotiated but poison 0: discarded pages read right
  EXPECT_FALSE(reclaim_status(i, 0, 0).state);  // rings not up yet
  i.reporting_live = i.reporting_ever_started = true;
  EXPECT_EQ(reclaim_status(i, 0, 0).state, ReclaimState::Active);
  EXPECT_FALSE(reclaim_status(i, 0, 0).reason);
  i.paused = true;
  EXPECT_EQ(reclaim_status(i, 0, 0).state, ReclaimState::Paused);
  i.paused = false;
  i.reporting_live = false;  // GET_VRING_BASE: the front end stopped the device
  EXPECT_EQ(reclaim_status(i, 0, 0).state, ReclaimState::Migrating);
  i.reporting_live = true;
  // Every reported byte misaligned, nothing discarded: misaligned backing.
  EXPECT_EQ(reclaim_status(i, 4096, 0).reason, DisabledReason::MisalignedBacking);
  EXPECT_EQ(reclaim_status(i, 4096, 1 << 21).state, ReclaimState::Active);
  i.max_page_size = 1ull << 30;  // 1 GiB pages: no reported block can cover one
  EXPECT_EQ(reclaim_status(i, 0, 0).reason, DisabledReason::MisalignedBacking);
}

TEST(VmMetrics, StateSetHasExactlyOneStateAndReasonOnlyWhenDisabled) {
  Metrics m("", 1);
  auto v = m.acquire_vm("a");
  v->set_reclaim_state(ReclaimState::Disabled, DisabledReason::Poison);
  v->set_reclaim_state(ReclaimState::Paused, DisabledReason::Poison);  // reason ignored
  double states = 0, reasons = 0;
  for (const auto& fam : m.registry()->Collect()) {
    for (const auto& s : fam.metric) {
      if (fam.name == "fphd_vm_reclaim_state") states += s.gauge.value;
      if (fam.name == "fphd_vm_reclaim_disabled") reasons += s.gauge.value;
    }
  }
  EXPECT_EQ(states, 1);
  EXPECT_EQ(reasons, 0);
  // Node counters are fed by the VM counters and survive the VM's series.
  v->discarded(0, reclaim::Method::PunchHole, 8192);
  v->reclaimed(0, 4096);
  EXPECT_EQ(v->discarded_bytes(), 8192u);
  m.set_retention(std::chrono::seconds(0));
  v.reset();
  m.release_vm("a");
  for (const auto& fam : m.registry()->Collect()) {
    if (fam.name == "fphd_node_discarded_bytes_total") {
      EXPECT_EQ(fam.metric.at(0).counter.value, 8192);
    }
    if (fam.name == "fphd_node_reclaimed_bytes_total") {
      EXPECT_EQ(fam.metric.at(0).counter.value, 4096);
    }
    if (fam.name == "fphd_reclaimed_bytes_total") {
      EXPECT_TRUE(fam.metric.empty());
    }
  }
}

TEST(VerifyingDiscarder, MeasuresWhatTheKernelFreed) {
  UniqueFd fd(memfd_create("verify", MFD_CLOEXEC));
  ASSERT_EQ(ftruncate(fd.get(), 8 * MiB), 0);
  auto* p = static_cast<uint8_t*>(mmap(nullptr, 8 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0));
  ASSERT_NE(p, MAP_FAILED);
  fill(p, 4 * MiB, 1);
  reclaim::SyscallDiscarder sys;
  reclaim::VerifyingDiscarder v(sys);
  reclaim::DiscardTarget t;
  t.fd = fd.get();
  t.addr = p;
  t.length = 4 * MiB;
  auto o = v.discard(t, reclaim::Method::PunchHole);
  EXPECT_EQ(o.discarded_bytes, 4 * MiB);
  EXPECT_EQ(o.freed_bytes, static_cast<int64_t>(4 * MiB));
  t.fd_offset = 4 * MiB;  // never populated: accepted, frees nothing
  t.addr = p + 4 * MiB;
  o = v.discard(t, reclaim::Method::PunchHole);
  EXPECT_EQ(o.discarded_bytes, 4 * MiB);
  EXPECT_EQ(o.freed_bytes, 0);
  // Private anonymous memory has no file to measure.
  auto* anon = static_cast<uint8_t*>(mmap(nullptr, MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  reclaim::DiscardTarget a;
  a.addr = anon;
  a.length = MiB;
  a.backing = reclaim::Backing::PrivateAnon;
  EXPECT_EQ(v.discard(a, reclaim::Method::MadvDontneed).freed_bytes, -1);
  munmap(anon, MiB);
  munmap(p, 8 * MiB);
}

// --- refault sampling on a real memfd mapping -----------------------------------

TEST(RefaultTracker, CountsPagesResidentAgainOnceAndForgetsOldRanges) {
  UniqueFd fd(memfd_create("refault", MFD_CLOEXEC));
  ASSERT_EQ(ftruncate(fd.get(), 16 * MiB), 0);
  proto::vu::MemoryRegion desc{};
  desc.guest_phys_addr = 0;
  desc.memory_size = 16 * MiB;
  UniqueFd dup_fd(::dup(fd.get()));
  auto mapped = map_region(desc, std::move(dup_fd), reclaim::Topology::from_system());
  ASSERT_TRUE(mapped) << mapped.error();
  auto region = std::move(*mapped);
  ASSERT_TRUE(region->seek_fd);  // the sampler's own file description
  uint8_t* base = region->map_base;
  fill(base, 8 * MiB, 1);
  ASSERT_EQ(fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 8 * MiB), 0);

  using Clock = RefaultTracker::Clock;
  RefaultTracker::Options o;
  o.window = std::chrono::seconds(60);
  RefaultTracker t(o);
  const auto t0 = Clock::now();
  t.discarded(region, base, 4 * MiB, t0);
  t.discarded(region, base + 4 * MiB, 4 * MiB, t0);
  EXPECT_EQ(t.sample(t0), 0u);  // nothing touched yet
  // The "guest" touches 1 MiB of the first range (a write faults in a page;
  // a read of a shmem hole does too).
  fill(base, MiB, 2);
  volatile uint8_t r = base[4 * MiB];
  (void)r;
  ASSERT_EQ(lseek(fd.get(), 12345, SEEK_SET), 12345);  // the front end's file position
  EXPECT_EQ(t.sample(t0 + std::chrono::seconds(1)), MiB + 4096);
  EXPECT_EQ(lseek(fd.get(), 0, SEEK_CUR), 12345);  // the sampler seeks on its own description
  EXPECT_EQ(t.sample(t0 + std::chrono::seconds(2)), 0u);  // counted once
  // Discarded again: the new entry replaces the old one (no double count).
  ASSERT_EQ(fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4 * MiB), 0);
  t.discarded(region, base, 4 * MiB, t0 + std::chrono::seconds(3));
  EXPECT_EQ(t.tracked_ranges(), 2u);
  fill(base, 4096, 3);
  EXPECT_EQ(t.sample(t0 + std::chrono::seconds(4)), 4096u);
  // Past the window, ranges are forgotten: touching them counts nothing.
  fill(base + 5 * MiB, MiB, 4);
  EXPECT_EQ(t.sample(t0 + std::chrono::seconds(200)), 0u);
  EXPECT_EQ(t.tracked_ranges(), 0u);
  // A range wholly back is counted and forgotten: it cannot refault again.
  RefaultTracker c(o);
  c.discarded(region, base + 12 * MiB, MiB, t0);
  fill(base + 12 * MiB, MiB, 5);
  EXPECT_EQ(c.sample(t0 + std::chrono::seconds(1)), MiB);
  EXPECT_EQ(c.tracked_ranges(), 0u);
  // Bounded: the oldest ranges go first.
  RefaultTracker::Options small;
  small.max_ranges = 2;
  RefaultTracker b(small);
  for (int i = 0; i < 4; ++i) b.discarded(region, base + i * MiB, MiB, t0);
  EXPECT_EQ(b.tracked_ranges(), 2u);
  EXPECT_EQ(b.tracked_bytes(), 2 * MiB);
  // A region that went away is dropped, not read.
  std::weak_ptr<MappedRegion> w = region;
  region.reset();
  EXPECT_TRUE(w.expired());
  EXPECT_EQ(b.sample(t0), 0u);
  EXPECT_EQ(b.tracked_ranges(), 0u);
}

// A block freed, reused and freed again between two samples: the sampler
// never sees it resident, but the second discard freed memory inside the
// first range, so the guest had populated it again. That is credited (by the
// age of the discard it came back after: within `recent` or not).
TEST(RefaultTracker, ARediscardThatFreesMemoryCreditsTheRefaultTheSamplerMissed) {
  UniqueFd fd(memfd_create("refault", MFD_CLOEXEC));
  ASSERT_EQ(ftruncate(fd.get(), 16 * MiB), 0);
  proto::vu::MemoryRegion desc{};
  desc.memory_size = 16 * MiB;
  auto mapped = map_region(desc, UniqueFd(::dup(fd.get())), reclaim::Topology::from_system());
  ASSERT_TRUE(mapped) << mapped.error();
  auto region = std::move(*mapped);
  using Clock = RefaultTracker::Clock;
  RefaultTracker::Options o;
  o.window = std::chrono::seconds(60);
  RefaultTracker t(o);
  const auto t0 = Clock::now();
  t.discarded(region, region->map_base, 4 * MiB, t0, 4 * MiB);
  // Half of it came back and went again before any sample: the new discard
  // of the same 4 MiB freed 2 MiB.
  t.discarded(region, region->map_base, 4 * MiB, t0 + std::chrono::seconds(2), 2 * MiB);
  uint64_t recent = 0;
  EXPECT_EQ(t.sample(t0 + std::chrono::seconds(3), std::chrono::seconds(10), &recent), 2 * MiB);
  EXPECT_EQ(recent, 2 * MiB);
  EXPECT_EQ(t.sample(t0 + std::chrono::seconds(4), std::chrono::seconds(10), &recent), 0u);  // once
  // A re-discard that freed nothing: nothing had come back.
  t.discarded(region, region->map_base, 4 * MiB, t0 + std::chrono::seconds(5), 0);
  EXPECT_EQ(t.sample(t0 + std::chrono::seconds(6)), 0u);
  // Came back 30 s after its discard: a refault, but not a recent one.
  t.discarded(region, region->map_base, 4 * MiB, t0 + std::chrono::seconds(35), 4 * MiB);
  EXPECT_EQ(t.sample(t0 + std::chrono::seconds(36), std::chrono::seconds(10), &recent), 4 * MiB);
  EXPECT_EQ(recent, 0u);
}

TEST(RefaultTracker, RangeResidentBytesSkipsTheLeadingHoleAndStopsAtTheRangeEnd) {
  UniqueFd fd(memfd_create("extents", MFD_CLOEXEC));
  ASSERT_EQ(ftruncate(fd.get(), 8 * MiB), 0);
  proto::vu::MemoryRegion desc{};
  desc.memory_size = 8 * MiB;
  auto mapped = map_region(desc, UniqueFd(::dup(fd.get())), reclaim::Topology::from_system());
  ASSERT_TRUE(mapped) << mapped.error();
  const MappedRegion& region = **mapped;
  uint8_t* p = region.map_base;
  EXPECT_EQ(range_resident_bytes(region, p, 8 * MiB), 0);  // all hole
  for (uint64_t off = 0; off < MiB; off += 2 * 4096) p[off] = 1;  // every other page
  fill(p + 4 * MiB, 4 * MiB, 7);                                  // data to the end of the file
  EXPECT_EQ(range_resident_bytes(region, p, 8 * MiB), static_cast<int64_t>(MiB / 2 + 4 * MiB));
  // Ranges cut the data at both ends.
  EXPECT_EQ(range_resident_bytes(region, p + 4 * MiB + 4096, 8192), 8192);
  EXPECT_EQ(range_resident_bytes(region, p + 4 * MiB - 4096, 8192), 4096);
  EXPECT_EQ(range_resident_bytes(region, p + 4096, 4096), 0);
  EXPECT_EQ(range_resident_bytes(region, p + 2 * MiB, MiB), 0);  // a hole followed by data
  // Outside the mapping: an error, never a read.
  EXPECT_EQ(range_resident_bytes(region, p + 8 * MiB, 4096), -1);
  EXPECT_EQ(range_resident_bytes(region, p - 4096, 8192), -1);
  EXPECT_EQ(range_resident_bytes(region, p, UINT64_MAX), -1);
}

// --- sessions: each skip reason and "freed nothing" really happen -----------

TEST(Observability, VerifiedReclaimIsMeasuredAndAnUnpopulatedRangeFreesNothing) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  fill(fe.mem + 32 * MiB, 8 * MiB, 0x11);
  const int64_t before = blocks_bytes(fe.ram.get());
  fe.report({{32 * MiB, static_cast<uint32_t>(8 * MiB), true}});
  const int64_t freed = before - blocks_bytes(fe.ram.get());
  EXPECT_EQ(freed, static_cast<int64_t>(8 * MiB));
  EXPECT_EQ(d.value("fphd_reclaimed_bytes_total", vm()), static_cast<double>(freed));
  EXPECT_EQ(d.value("fphd_discards_freed_nothing_total", vm()), 0);
  // Never populated: the punch succeeds, st_blocks does not move.
  fe.report({{48 * MiB, static_cast<uint32_t>(4 * MiB), true}});
  EXPECT_EQ(d.value("fphd_discarded_bytes_total", vm()), 12.0 * MiB);  // the syscall accepted both
  EXPECT_EQ(d.value("fphd_reclaimed_bytes_total", vm()), 8.0 * MiB);   // the kernel freed one
  EXPECT_EQ(d.value("fphd_discards_freed_nothing_total", vm()), 1);
  EXPECT_EQ(d.value("fphd_node_reclaimed_bytes_total"), 8.0 * MiB);
  // Sampled: resident bytes are the memfd's blocks, state active, features.
  d.sample();
  EXPECT_EQ(d.value("fphd_guest_resident_bytes", vm()), static_cast<double>(blocks_bytes(fe.ram.get())));
  EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm("state", "active")), 1);
  EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm()), 1);
  EXPECT_EQ(d.value("fphd_vm_features", vm()), static_cast<double>(kFeatures));
  EXPECT_GT(d.value("fphd_node_memory_total_bytes"), 0);
  EXPECT_GT(d.value("fphd_node_memory_free_bytes"), 0);
  // The guest reuses half of what was reclaimed: the sampler sees it again.
  fill(fe.mem + 32 * MiB, 4 * MiB, 0x12);
  d.sample();
  EXPECT_EQ(d.value("fphd_refaulted_bytes_total", vm()), 4.0 * MiB);
  d.sample();
  EXPECT_EQ(d.value("fphd_refaulted_bytes_total", vm()), 4.0 * MiB);
  // The front end stops the ring (as for migration): state migrating.
  ASSERT_TRUE(fe.send(vu::Request::GetVringBase, vu::encode_vring_state({fe.reporting_index, 0})));
  ASSERT_TRUE(fe.recv());
  d.sample();
  EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm("state", "migrating")), 1);
  EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm()), 1);
}

TEST(Observability, PausedVmSkipsWithReasonPausedAndShowsState) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  d.session->set_paused(true);
  fill(fe.mem + 32 * MiB, 2 * MiB, 0x21);
  const int64_t before = blocks_bytes(fe.ram.get());
  fe.report({{32 * MiB, static_cast<uint32_t>(2 * MiB), true}});
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);
  EXPECT_EQ(d.value("fphd_skipped_bytes_total", vm("reason", "paused")), 2.0 * MiB);
  EXPECT_EQ(d.value("fphd_discarded_bytes_total", vm()), 0);
  d.sample();
  EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm("state", "paused")), 1);
  EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm()), 1);
  d.session->set_paused(false);
  fe.report({{32 * MiB, static_cast<uint32_t>(2 * MiB), true}});
  EXPECT_EQ(d.value("fphd_reclaimed_bytes_total", vm()), 2.0 * MiB);
  d.sample();
  EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm("state", "active")), 1);
}

TEST(Observability, PoisonSkipsWithReasonPoisonedAndDisablesReclaim) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures | balloon::kFPagePoison);
  fe.set_poison_aa();
  fill(fe.mem + 32 * MiB, 2 * MiB, 0xaa);
  fe.report({{32 * MiB, static_cast<uint32_t>(2 * MiB), true}});
  EXPECT_EQ(d.value("fphd_skipped_bytes_total", vm("reason", "poisoned")), 2.0 * MiB);
  EXPECT_EQ(d.value("fphd_reclaimed_bytes_total", vm()), 0);
  d.sample();
  EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm("state", "disabled")), 1);
  EXPECT_EQ(d.value("fphd_vm_reclaim_disabled", vm("reason", "poison")), 1);
  EXPECT_EQ(d.value("fphd_vm_reclaim_disabled", vm()), 1);
}

TEST(Observability, MisalignedShmemReportIsSkippedAndCounted) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  fill(fe.mem + 32 * MiB, 2 * MiB, 0x31);
  const int64_t before = blocks_bytes(fe.ram.get());
  fe.report({{32 * MiB + 2048, 6144, true}});  // not on a 4 KiB boundary
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);
  EXPECT_EQ(d.value("fphd_skipped_bytes_total", vm("reason", "misaligned")), 6144);
  d.sample();
  EXPECT_EQ(d.value("fphd_vm_reclaim_disabled", vm("reason", "misaligned_backing")), 1);
}

// hugetlbfs with 2 MiB pages receiving a 4 KiB report: nothing can be
// discarded without freeing memory the guest still uses.
TEST(Observability, HugetlbBackingWithSmallReportsIsMisaligned) {
  const char* knob = "/proc/sys/vm/nr_hugepages";
  UniqueFd lock(open("/tmp/fph-test-nr_hugepages.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!lock || flock(lock.get(), LOCK_EX) != 0) GTEST_SKIP() << "cannot take the hugetlb lock";
  auto read_long = [](const char* path, const std::string& key) {
    std::ifstream in(path);
    std::string k;
    long v = -1;
    if (key.empty()) {
      in >> v;
      return v;
    }
    while (in >> k) {
      if (k == key) {
        in >> v;
        return v;
      }
      in.ignore(1 << 10, '\n');
    }
    return -1L;
  };
  if (read_long("/proc/meminfo", "Hugepagesize:") != 2048) GTEST_SKIP() << "default huge pages are not 2 MiB";
  const long saved = read_long(knob, "");
  if (saved < 0) GTEST_SKIP() << "cannot read " << knob;
  const long need = static_cast<long>(kRam / (2 * MiB));
  bool changed = false;
  if (read_long("/proc/meminfo", "HugePages_Free:") < need) {
    std::ofstream(knob) << saved + need << "\n";
    changed = true;
  }
  struct Restore {
    bool changed;
    long saved;
    const char* knob;
    ~Restore() {
      if (changed) std::ofstream(knob) << saved << "\n";
    }
  } restore{changed, saved, knob};
  if (read_long("/proc/meminfo", "HugePages_Free:") < need) GTEST_SKIP() << "could not reserve huge pages";
  {
    Pair sp;
    Daemon d(std::move(sp.a));
    FrontEnd fe(std::move(sp.b), MFD_HUGETLB);
    ASSERT_NE(fe.mem, nullptr);
    fe.handshake(kFeatures);
    fill(fe.mem + 32 * MiB, 2 * MiB, 0x41);
    const int64_t before = blocks_bytes(fe.ram.get());
    fe.report({{32 * MiB, 4096, true}});  // 4 KiB-aligned, smaller than a huge page
    EXPECT_EQ(blocks_bytes(fe.ram.get()), before);
    EXPECT_EQ(d.value("fphd_skipped_bytes_total", vm("reason", "misaligned")), 4096);
    EXPECT_EQ(d.value("fphd_discarded_bytes_total", vm()), 0);
    d.sample();
    EXPECT_EQ(d.value("fphd_vm_reclaim_disabled", vm("reason", "misaligned_backing")), 1);
    EXPECT_EQ(d.value("fphd_guest_resident_bytes", vm()), static_cast<double>(before));
    // A whole huge page is reclaimed and measured as such.
    fe.report({{32 * MiB, static_cast<uint32_t>(2 * MiB), true}});
    EXPECT_EQ(d.value("fphd_reclaimed_bytes_total", vm()), 2.0 * MiB);
    d.sample();
    EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm("state", "active")), 1);
  }
}

// The other session-level reasons: a disabled ring (stopped) and a range
// outside guest memory (invalid, also a protocol error).
TEST(Observability, DisabledRingAndInvalidRangesAreSkippedWithTheirReasons) {
  Pair sp;
  Daemon d(std::move(sp.a));
  FrontEnd fe(std::move(sp.b));
  fe.handshake(kFeatures);
  fill(fe.mem + 32 * MiB, 2 * MiB, 0x51);
  fe.report({{kRam + 4 * MiB, static_cast<uint32_t>(2 * MiB), true}});
  EXPECT_EQ(d.value("fphd_skipped_bytes_total", vm("reason", "invalid")), 2.0 * MiB);
  EXPECT_EQ(d.value("fphd_protocol_errors_total", vm("reason", "range_outside_guest_memory")), 1);
  ASSERT_EQ(fe.acked(vu::Request::SetVringEnable, vu::encode_vring_state({fe.reporting_index, 0})), 0u);
  const int64_t before = blocks_bytes(fe.ram.get());
  fe.report({{32 * MiB, static_cast<uint32_t>(2 * MiB), true}});
  EXPECT_EQ(blocks_bytes(fe.ram.get()), before);
  EXPECT_EQ(d.value("fphd_skipped_bytes_total", vm("reason", "stopped")), 2.0 * MiB);
  d.sample();
  EXPECT_EQ(d.value("fphd_vm_reclaim_state", vm("state", "migrating")), 1);
}

namespace {
struct FakeProbe final : reclaim::NodeMemoryProbe {
  reclaim::NodeMemory m;
  reclaim::NodeMemory read(int) override { return m; }
};
}  // namespace

TEST(NodeCollector, PublishesMemoryPressureAndThePolicyVerdict) {
  auto topo = reclaim::Topology::from_synthetic("node:2 core:1 pu:1");
  ASSERT_TRUE(topo);
  FakeProbe probe;
  probe.m = {1000 * MiB, 50 * MiB, 12.5, true};  // 5% free: below the 10% watermark
  reclaim::PolicyTable policy(2);
  Metrics m("", 2);
  NodeCollector c(*topo, probe, policy, m);
  c.sample();
  std::map<std::string, double> v;
  for (const auto& fam : m.registry()->Collect())
    for (const auto& s : fam.metric)
      for (const auto& l : s.label)
        if (l.name == "node" && l.value == "1") v[fam.name] = s.gauge.value;
  EXPECT_EQ(v["fphd_node_memory_total_bytes"], 1000.0 * MiB);
  EXPECT_EQ(v["fphd_node_memory_free_bytes"], 50.0 * MiB);
  EXPECT_DOUBLE_EQ(v["fphd_node_pressure"], 0.125);
  EXPECT_EQ(v["fphd_node_under_pressure"], 1);
  probe.m.free_bytes = 500 * MiB;
  probe.m.psi_some_avg10 = 0;
  c.sample();
  for (const auto& fam : m.registry()->Collect())
    if (fam.name == "fphd_node_under_pressure") {
      for (const auto& s : fam.metric) EXPECT_EQ(s.gauge.value, 0);
    }
}
