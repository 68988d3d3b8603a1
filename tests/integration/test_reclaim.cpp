// The core reclaim path end to end: one fphd, several fph-guest processes,
// memory reclaim measured from the kernel.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <fstream>

#include "harness.h"

using namespace fph::test;

namespace fph {
// Holds an exclusive flock on a file for the scope (serialises tests that
// change system-wide knobs such as nr_hugepages).
struct FileLock {
  int fd;
  explicit FileLock(const char* path) : fd(open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) {
    if (fd >= 0) flock(fd, LOCK_EX);
  }
  ~FileLock() {
    if (fd >= 0) close(fd);
  }
};
}  // namespace fph

namespace {

constexpr int64_t MiB = 1 << 20;

struct Guest {
  std::unique_ptr<Process> proc;
  int64_t peak = 0;    // backing right after the workload freed its memory
  int64_t freed = 0;   // bytes the workload freed
};

std::vector<std::string> guest_args(const Fphd& d, const TempDir& dir, const std::string& name,
                                    std::vector<std::string> extra) {
  std::vector<std::string> a{guest_path(), "--connect", d.socket, "--name", name,
                             "--memory", "512M", "--resident", "32M",
                             "--reporting-delay-ms", "200"};
  a.insert(a.end(), extra.begin(), extra.end());
  (void)dir;
  return a;
}

Guest start_guest(const Fphd& d, const TempDir& dir, const std::string& name,
                  std::vector<std::string> extra) {
  Guest g;
  g.proc = std::make_unique<Process>(guest_args(d, dir, name, std::move(extra)),
                                     dir.path + "/" + name + ".stderr");
  return g;
}

nlohmann::json stop_and_summarize(Guest& g) {
  g.proc->signal(SIGTERM);
  auto s = g.proc->wait_event("summary");
  EXPECT_TRUE(s.has_value()) << g.proc->stderr_text();
  EXPECT_EQ(g.proc->wait(), 0) << g.proc->stderr_text();
  return s.value_or(nlohmann::json::object());
}

}  // namespace

// Three guests of 512 MiB each write 400 MiB and free it; fphd must drop at
// least 95% of the freed bytes from each guest's memfd, as the kernel counts
// them, and the resident sets must come through intact.
TEST(Reclaim, ThreeGuestsGetTheirFreedMemoryReclaimed) {
  TempDir dir;
  Fphd fphd(dir);
  std::vector<Guest> guests;
  for (int i = 0; i < 3; ++i)
    guests.push_back(start_guest(fphd, dir, "vm" + std::to_string(i),
                                 {"--workload", "alloc-free:400M:3000"}));
  for (auto& g : guests) ASSERT_TRUE(g.proc->wait_event("ready")) << g.proc->stderr_text();
  // While the workloads hold their 400 MiB (allocated blocks are never
  // reported), the kernel must show it populated: that is the peak the
  // reclaim is measured from.
  ASSERT_TRUE(eventually([&] {
    bool all = true;
    for (auto& g : guests) {
      g.peak = std::max(g.peak, memfd_allocated_bytes(g.proc->pid()));
      all = all && g.peak >= 400 * MiB;
    }
    return all;
  })) << guests[0].proc->stderr_text();
  // The workloads may still be writing their resident part: keep sampling
  // the peak until each has freed (reporting waits 2 s after a free, so no
  // discard lowers the backing before then; max() keeps the peak anyway).
  const auto deadline = std::chrono::steady_clock::now() + kPatience;
  for (auto& g : guests) {
    std::optional<nlohmann::json> freed;
    while (!(freed = g.proc->wait_event("workload_freed", 100ms)) &&
           std::chrono::steady_clock::now() < deadline) {
      for (auto& o : guests) o.peak = std::max(o.peak, memfd_allocated_bytes(o.proc->pid()));
    }
    ASSERT_TRUE(freed) << g.proc->stderr_text();
    g.freed = (*freed)["bytes"].get<int64_t>();
    EXPECT_EQ(g.freed, 400 * MiB);
  }
  for (auto& g : guests) {
    const int64_t want_drop = g.freed * 95 / 100;
    int64_t now = g.peak;
    const bool ok = eventually([&] {
      now = memfd_allocated_bytes(g.proc->pid());
      return now >= 0 && g.peak - now >= want_drop;
    });
    EXPECT_TRUE(ok) << "backing " << now / MiB << " MiB, peak " << g.peak / MiB << " MiB\n"
                    << g.proc->stderr_text();
  }
  const std::string metrics = fphd.scrape();
  for (int i = 0; i < 3; ++i) {
    const std::string vm = "vm" + std::to_string(i);
    EXPECT_GE(metric_sum(metrics, "fphd_discarded_bytes_total", {{"vm", vm}}), 0.95 * 400 * MiB)
        << metrics;
    EXPECT_GE(metric_sum(metrics, "fphd_reported_bytes_total", {{"vm", vm}}), 0.95 * 400 * MiB);
  }
  EXPECT_GT(metric_sum(metrics, "fphd_request_duration_seconds_count"), 0);
  for (auto& g : guests) {
    auto s = stop_and_summarize(g);
    EXPECT_EQ(s.value("corrupted_bytes", -1), 0);
    EXPECT_GT(s.value("resident_checks", 0), 1);  // checked after discard waves and at the end
    EXPECT_GE(s.value("reported_bytes", 0), 380 * MiB);
  }
  fphd.proc->signal(SIGTERM);
  EXPECT_EQ(fphd.proc->wait(), 0) << fphd.proc->stderr_text();
}

// The same run without free page reporting: nothing is reported, the
// backing stays.
TEST(Reclaim, WithoutReportingTheBackingStays) {
  TempDir dir;
  Fphd fphd(dir);
  std::vector<Guest> guests;
  for (int i = 0; i < 3; ++i)
    guests.push_back(start_guest(fphd, dir, "nr" + std::to_string(i),
                                 {"--workload", "alloc-free:400M:500", "--no-reporting"}));
  for (auto& g : guests) {
    auto ready = g.proc->wait_event("ready");
    ASSERT_TRUE(ready) << g.proc->stderr_text();
    EXPECT_FALSE((*ready)["reporting"].get<bool>());
    ASSERT_TRUE(g.proc->wait_event("workload_freed")) << g.proc->stderr_text();
  }
  // Ten reporting delays: with reporting on, this is when most would be gone.
  std::this_thread::sleep_for(2s);
  for (auto& g : guests) EXPECT_GE(memfd_allocated_bytes(g.proc->pid()), 400 * MiB);
  const std::string metrics = fphd.scrape();
  EXPECT_EQ(metric_sum(metrics, "fphd_reported_bytes_total"), 0);
  EXPECT_EQ(metric_sum(metrics, "fphd_discarded_bytes_total"), 0);
  for (auto& g : guests) {
    auto s = stop_and_summarize(g);
    EXPECT_EQ(s.value("reported_bytes", -1), 0);
    EXPECT_EQ(s.value("corrupted_bytes", -1), 0);
  }
}

// Churn: blocks are reported, reallocated and reported again. Every block
// reallocated after a report must read as zero (its backing really went),
// and the resident set must be intact after every discard wave.
TEST(Reclaim, ChurnKeepsIntegrityAndReallocatedReportedBlocksReadZero) {
  TempDir dir;
  // Every reported block must be discarded here (--require-discard): refault
  // backoff would rightly return some undiscarded (test_policy.cpp tests it).
  Fphd fphd(dir, {"--backoff", "off"});
  Guest g = start_guest(fphd, dir, "churn", {"--workload", "churn:256M:8", "--require-discard"});
  ASSERT_TRUE(g.proc->wait_event("ready")) << g.proc->stderr_text();
  // Wait until the guest has seen reported blocks come back to it.
  ASSERT_TRUE(eventually([&] {
    auto ev = g.proc->events();
    int done = 0;
    for (const auto& e : ev) done += e.value("event", "") == "report_done";
    return done >= 5;
  })) << g.proc->stderr_text();
  std::this_thread::sleep_for(3s);  // let the churn reallocate reported blocks
  auto s = stop_and_summarize(g);
  EXPECT_EQ(s.value("corrupted_bytes", -1), 0);
  EXPECT_EQ(s.value("reported_nonzero_bytes", -1), 0);
  EXPECT_GT(s.value("reported_bytes_checked", 0), 0) << s.dump();
}

// vhost-user deployments also run the other way round: the front end
// listens and the back end connects (QEMU server=on). fphd --attach.
TEST(Reclaim, AttachModeConnectsOutToAListeningFrontEnd) {
  TempDir dir;
  const std::string guest_sock = dir.path + "/guest.sock";
  Process guest({guest_path(), "--listen", guest_sock, "--name", "ignored", "--memory", "256M",
                 "--workload", "alloc-free:200M:0", "--reporting-delay-ms", "100",
                 "--exit-when-reported"},
                dir.path + "/guest.stderr");
  ASSERT_TRUE(guest.wait_event("listening")) << guest.stderr_text();
  Fphd fphd(dir, {"--attach", "attached-vm=" + guest_sock});
  ASSERT_TRUE(guest.wait_event("ready")) << guest.stderr_text() << fphd.proc->stderr_text();
  auto s = guest.wait_event("summary");
  ASSERT_TRUE(s) << guest.stderr_text();
  EXPECT_EQ(guest.wait(), 0);
  EXPECT_EQ((*s)["reason"], "reported");
  EXPECT_LT((*s)["backing_bytes"].get<int64_t>(), 40 * MiB);  // kernel-measured by the guest
  // The configured name, not the peer's, labels the VM.
  EXPECT_GE(metric_sum(fphd.scrape(), "fphd_discarded_bytes_total", {{"vm", "attached-vm"}}),
            190.0 * MiB);
}

// A front end disconnects and a new one connects under the same name: the
// new session reclaims, and the VM's counters continue rather than reset.
TEST(Reclaim, FrontEndReconnectUnderTheSameName) {
  TempDir dir;
  Fphd fphd(dir);
  double first = 0;
  for (int round = 0; round < 2; ++round) {
    Process g({guest_path(), "--connect", fphd.socket, "--name", "same", "--memory", "256M",
               "--workload", "alloc-free:200M:0", "--reporting-delay-ms", "100",
               "--exit-when-reported"},
              dir.path + "/g" + std::to_string(round) + ".stderr");
    auto s = g.wait_event("summary");
    ASSERT_TRUE(s) << g.stderr_text();
    EXPECT_EQ(g.wait(), 0) << g.stderr_text();
    EXPECT_LT((*s)["backing_bytes"].get<int64_t>(), 40 * MiB);
    // Wait until fphd has seen the disconnect.
    ASSERT_TRUE(eventually([&] { return metric_sum(fphd.scrape(), "fphd_sessions") == 0; }));
    const double d = metric_sum(fphd.scrape(), "fphd_discarded_bytes_total", {{"vm", "same"}});
    if (round == 0) first = d;
    else EXPECT_GE(d, first + 190.0 * MiB);
  }
  EXPECT_EQ(metric_sum(fphd.scrape(), "fphd_sessions_opened_total"), 2);
}

// Huge page guest RAM (memfd MFD_HUGETLB): fphd punches whole 2 MiB pages.
// Reserves the pages itself (serialised with other tests by a lock file) and
// restores the previous reservation.
TEST(Reclaim, HugetlbBackedGuestIsReclaimedInWholeHugePages) {
  const char* knob = "/proc/sys/vm/nr_hugepages";
  fph::FileLock lock("/tmp/fph-test-nr_hugepages.lock");
  auto read_knob = [&] {
    std::ifstream in(knob);
    long v = -1;
    in >> v;
    return v;
  };
  const long before = read_knob();
  {
    std::ofstream out(knob);
    out << before + 160;
  }
  if (read_knob() < before + 160) {
    std::ofstream(knob) << before;
    GTEST_SKIP() << "could not reserve 160 huge pages (need root and free memory)";
  }
  struct Restore {
    const char* k;
    long v;
    ~Restore() { std::ofstream(k) << v; }
  } restore{knob, before};

  TempDir dir;
  Fphd fphd(dir);
  Process g({guest_path(), "--connect", fphd.socket, "--name", "huge", "--memory", "256M",
             "--hugetlb", "--workload", "alloc-free:200M:0", "--reporting-delay-ms", "100",
             "--exit-when-reported", "--require-discard"},
            dir.path + "/huge.stderr");
  auto s = g.wait_event("summary");
  ASSERT_TRUE(s) << g.stderr_text();
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
  EXPECT_EQ((*s)["corrupted_bytes"].get<int64_t>(), 0);
  EXPECT_LT((*s)["backing_bytes"].get<int64_t>(), 56 * MiB) << s->dump();
  const std::string m = fphd.scrape();
  EXPECT_GE(metric_sum(m, "fphd_discarded_bytes_total", {{"vm", "huge"}, {"method", "punch_hole"}}),
            190.0 * MiB);
  EXPECT_EQ(metric_sum(m, "fphd_skipped_bytes_total", {{"vm", "huge"}, {"reason", "misaligned"}}), 0);
}
