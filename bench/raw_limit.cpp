// The raw limit: N memfds mapped and written by a holder child process (as
// guest RAM is mapped by the guest, not by the process that discards), then
// T threads punching blocks, interleaved across files, taken from one atomic
// counter; wall time from release to the last thread, CPU from
// CLOCK_THREAD_CPUTIME_ID, reclaimed bytes from st_blocks.
#include "raw_limit.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "measure.h"
#include "processes.h"

namespace fph::bench {

RawResult run_raw(const Scenario& sc, uint64_t block, int threads) {
  RawResult r;
  r.block = block;
  r.threads = threads;
  struct File {
    int fd = -1;
    uint64_t size = 0;
  };
  std::vector<File> files(static_cast<size_t>(sc.guests));
  // The pages are mapped and written by a child process that then sleeps,
  // as guest RAM is mapped by the (mostly idle) guest, not by the process
  // that discards: punching zaps page tables of another mm, like fphd does.
  pid_t holder = -1;
  int release_fd = -1;
  struct Cleanup {
    std::vector<File>& f;
    pid_t& holder;
    int& release_fd;
    ~Cleanup() {
      if (release_fd >= 0) ::close(release_fd);  // the holder exits on EOF
      if (holder > 0) {
        ::waitpid(holder, nullptr, 0);
        track_child(holder, false);
      }
      for (auto& x : f)
        if (x.fd >= 0) ::close(x.fd);
    }
  } cleanup{files, holder, release_fd};
  const uint64_t populate = sc.alloc / block * block;
  if (populate == 0) {
    r.error = "block larger than the populated size";
    return r;
  }
  for (auto& f : files) {
    f.size = sc.mem;
    f.fd = memfd_create("fph-bench-raw", MFD_CLOEXEC | (sc.hugetlb() ? MFD_HUGETLB : 0u));
    if (f.fd < 0 || ftruncate(f.fd, static_cast<off_t>(f.size)) != 0) {
      r.error = std::string("memfd: ") + std::strerror(errno);
      return r;
    }
  }
  int ready_pipe[2], release_pipe[2];
  if (pipe2(ready_pipe, O_CLOEXEC) != 0 || pipe2(release_pipe, O_CLOEXEC) != 0) {
    r.error = "pipe2 failed";
    return r;
  }
  holder = fork();
  if (holder == 0) {
    // Child: only async-signal-safe calls and plain memory writes.
    ::close(ready_pipe[0]);
    ::close(release_pipe[1]);
    char ok = 1;
    for (auto& f : files) {
      void* p = mmap(nullptr, f.size, PROT_READ | PROT_WRITE, MAP_SHARED, f.fd, 0);
      if (p == MAP_FAILED) {
        ok = 0;
        break;
      }
      // Populated like the guest does: every 4 KiB page written.
      auto* m = static_cast<volatile uint8_t*>(p);
      for (uint64_t off = 0; off < populate; off += 4 * kKiB) m[off] = static_cast<uint8_t>((off >> 12) | 1);
    }
    (void)!::write(ready_pipe[1], &ok, 1);
    char c;
    while (::read(release_pipe[0], &c, 1) < 0 && errno == EINTR) {
    }
    ::_exit(0);
  }
  ::close(ready_pipe[1]);
  ::close(release_pipe[0]);
  release_fd = release_pipe[1];
  if (holder < 0) {
    ::close(ready_pipe[0]);
    r.error = "fork failed";
    return r;
  }
  track_child(holder, true);
  char ok = 0;
  const bool got = ::read(ready_pipe[0], &ok, 1) == 1;
  ::close(ready_pipe[0]);
  if (!got || !ok) {
    r.error = "could not map and populate the raw memfds (hugetlb pages?)";
    return r;
  }
  // Blocks interleaved across files, as the guests' requests interleave.
  std::vector<std::pair<int, uint64_t>> work;
  for (uint64_t off = 0; off < populate; off += block)
    for (auto& f : files) work.emplace_back(f.fd, off);
  int64_t b0 = 0;
  for (auto& f : files) b0 += fd_allocated(f.fd);

  std::atomic<size_t> next{0};
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::atomic<int> errors{0};
  std::vector<double> cpu(static_cast<size_t>(threads), 0);
  std::vector<Clock::time_point> done(static_cast<size_t>(threads));
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      pthread_setname_np(pthread_self(), "fph-bench-raw");  // tells them apart in perf/top
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      timespec a{}, b{};
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
      for (;;) {
        const size_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= work.size()) break;
        if (fallocate(work[i].first, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      static_cast<off_t>(work[i].second), static_cast<off_t>(block)) != 0)
          errors.fetch_add(1);
      }
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
      done[static_cast<size_t>(t)] = Clock::now();
      cpu[static_cast<size_t>(t)] =
          static_cast<double>(b.tv_sec - a.tv_sec) + static_cast<double>(b.tv_nsec - a.tv_nsec) * 1e-9;
    });
  }
  while (ready.load() < threads) std::this_thread::yield();
  const auto t0 = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& t : ts) t.join();
  const auto t1 = *std::max_element(done.begin(), done.end());
  int64_t b1 = 0;
  for (auto& f : files) b1 += fd_allocated(f.fd);
  if (errors.load() != 0) {
    r.error = std::to_string(errors.load()) + " fallocate calls failed";
    return r;
  }
  r.reclaimed = b0 - b1;
  r.wall_s = std::chrono::duration<double>(t1 - t0).count();
  for (double c : cpu) r.cpu_s += c;
  r.ok = true;
  return r;
}

}  // namespace fph::bench
