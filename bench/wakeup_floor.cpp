// The wakeup floor: N guest processes (forked, no exec: they only map,
// write, and use eventfds and pipes) and one responder process (fph-bench
// itself, exec'd in its hidden --floor-responder mode, so it starts clean
// and may create threads). Per request a guest writes its descriptors (up
// to 32 (offset, length) pairs) into its slot of a shared memfd, writes 1 to
// its kick eventfd and blocks reading its call eventfd; the responder's
// thread for that guest blocks reading the kick, punches the ranges
// (fallocate PUNCH_HOLE|KEEP_SIZE, one call per descriptor, on the guest's
// RAM memfd it received as a descriptor and mapped, like fphd) and writes the
// call.
//
// One responder thread per guest: the minimum a back end needs to serve N
// guests each with one request in flight without an event loop or a
// hand-off between threads (no epoll, no queue, no pipeline), so each
// request costs exactly two wakeups (responder on the kick, guest on the
// call). fphd has one session thread per VM too, but hands the discards to a
// per-node pipeline (one more hand-off and wakeup per request); that and the
// vhost-user ring, validation, accounting and metrics are what e2e/floor
// measures.
#include "wakeup_floor.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "measure.h"
#include "processes.h"

namespace fph::bench {

namespace {

// One page per guest in the shared slot memfd.
constexpr size_t kSlotBytes = 4096;
constexpr uint32_t kStop = 0xffffffffu;

struct Slot {
  std::atomic<uint32_t> n;  // descriptors in this request; kStop: the guest is gone
  uint32_t pad;
  uint64_t off[kFloorBlocksPerRequest];
  uint64_t len[kFloorBlocksPerRequest];
};
static_assert(sizeof(Slot) <= kSlotBytes);

// Per guest, in an anonymous shared mapping (the guests are forks).
struct GuestResult {
  uint64_t requests;
  uint64_t errors;
  uint64_t pad[6];
  // then posted_ns[max_req], used_ns[max_req]
};

int64_t now_ns() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<int64_t>(t.tv_sec) * 1000000000 + t.tv_nsec;
}

bool read_full(int fd, void* p, size_t n) {
  auto* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t r = ::read(fd, c, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void wait_eof(int fd) {
  char c;
  for (;;) {
    const ssize_t r = ::read(fd, &c, 1);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return;
  }
}

}  // namespace

FloorResult run_floor(const Scenario& sc, uint64_t block) {
  FloorResult r;
  r.block = block;
  const int n = sc.guests;
  const uint64_t populate = sc.alloc / block * block;
  if (populate == 0) {
    r.error = "block larger than the populated size";
    return r;
  }
  const uint64_t blocks = populate / block;
  const uint64_t max_req = (blocks + kFloorBlocksPerRequest - 1) / kFloorBlocksPerRequest;
  const size_t res_stride = sizeof(GuestResult) + 2 * max_req * sizeof(int64_t);

  // Everything we create, closed and reaped on every path.
  std::vector<int> ram(static_cast<size_t>(n), -1), kick(static_cast<size_t>(n), -1),
      call(static_cast<size_t>(n), -1);
  int slot_fd = -1;
  void* slots = MAP_FAILED;
  void* results = MAP_FAILED;
  int ready_p[2] = {-1, -1}, go_p[2] = {-1, -1}, fin_p[2] = {-1, -1}, exit_p[2] = {-1, -1};
  std::vector<pid_t> kids;
  pid_t responder = -1;
  struct Cleanup {
    std::function<void()> f;
    ~Cleanup() { f(); }
  };
  Cleanup cleanup{[&] {
    for (int* p : {go_p, exit_p, ready_p, fin_p})
      for (int k = 0; k < 2; ++k)
        if (p[k] >= 0) ::close(p[k]), p[k] = -1;
    // EOF on go and exit: guests that are still waiting leave; then the
    // responder gets their stop kicks. A guest stuck elsewhere is killed.
    for (pid_t p : kids) {
      int st = 0;
      for (int i = 0; i < 2000 && ::waitpid(p, &st, WNOHANG) == 0; ++i) std::this_thread::sleep_for(5ms);
      if (::waitpid(p, &st, WNOHANG) == 0) {
        ::kill(p, SIGKILL);
        ::waitpid(p, &st, 0);
      }
      track_child(p, false);
    }
    if (responder > 0) {
      int st = 0;
      for (int i = 0; i < 2000 && ::waitpid(responder, &st, WNOHANG) == 0; ++i) std::this_thread::sleep_for(5ms);
      if (::waitpid(responder, &st, WNOHANG) == 0) {
        ::kill(responder, SIGKILL);
        ::waitpid(responder, &st, 0);
      }
      track_child(responder, false);
    }
    for (auto* v : {&ram, &kick, &call})
      for (int fd : *v)
        if (fd >= 0) ::close(fd);
    if (slot_fd >= 0) ::close(slot_fd);
    if (slots != MAP_FAILED) ::munmap(slots, kSlotBytes * static_cast<size_t>(n));
    if (results != MAP_FAILED) ::munmap(results, res_stride * static_cast<size_t>(n));
  }};

  for (int i = 0; i < n; ++i) {
    ram[i] = memfd_create("fph-bench-floor", MFD_CLOEXEC | (sc.hugetlb() ? MFD_HUGETLB : 0u));
    kick[i] = eventfd(0, EFD_CLOEXEC);
    call[i] = eventfd(0, EFD_CLOEXEC);
    if (ram[i] < 0 || kick[i] < 0 || call[i] < 0 || ftruncate(ram[i], static_cast<off_t>(sc.mem)) != 0) {
      r.error = std::string("memfd/eventfd: ") + std::strerror(errno);
      return r;
    }
  }
  slot_fd = memfd_create("fph-bench-floor-slots", MFD_CLOEXEC);
  if (slot_fd < 0 || ftruncate(slot_fd, static_cast<off_t>(kSlotBytes * static_cast<size_t>(n))) != 0) {
    r.error = "slot memfd failed";
    return r;
  }
  slots = mmap(nullptr, kSlotBytes * static_cast<size_t>(n), PROT_READ | PROT_WRITE, MAP_SHARED, slot_fd, 0);
  results = mmap(nullptr, res_stride * static_cast<size_t>(n), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                 -1, 0);
  if (slots == MAP_FAILED || results == MAP_FAILED) {
    r.error = "mmap failed";
    return r;
  }
  if (pipe2(ready_p, O_CLOEXEC) != 0 || pipe2(go_p, O_CLOEXEC) != 0 || pipe2(fin_p, O_CLOEXEC) != 0 ||
      pipe2(exit_p, O_CLOEXEC) != 0) {
    r.error = "pipe2 failed";
    return r;
  }
  auto slot_of = [&](int i) { return reinterpret_cast<Slot*>(static_cast<char*>(slots) + kSlotBytes * i); };
  auto result_of = [&](int i) {
    return reinterpret_cast<GuestResult*>(static_cast<char*>(results) + res_stride * static_cast<size_t>(i));
  };

  // The responder's command line, built before any fork (no malloc after).
  std::vector<std::string> rargs{"fph-bench", "--floor-responder", std::to_string(slot_fd), std::to_string(n)};
  for (int i = 0; i < n; ++i)
    rargs.push_back(std::to_string(kick[i]) + "," + std::to_string(call[i]) + "," + std::to_string(ram[i]));
  std::vector<char*> rargv;
  for (auto& a : rargs) rargv.push_back(a.data());
  rargv.push_back(nullptr);

  // The guests.
  for (int i = 0; i < n; ++i) {
    const pid_t p = fork();
    if (p < 0) {
      r.error = "fork failed";
      return r;
    }
    if (p == 0) {
      // Child: syscalls and plain memory accesses only.
      ::close(go_p[1]);
      ::close(exit_p[1]);
      ::close(ready_p[0]);
      ::close(fin_p[0]);
      char ok = 1;
      void* m = mmap(nullptr, sc.mem, PROT_READ | PROT_WRITE, MAP_SHARED, ram[i], 0);
      if (m == MAP_FAILED) {
        ok = 0;
      } else {
        auto* v = static_cast<volatile uint8_t*>(m);
        for (uint64_t off = 0; off < populate; off += 4 * kKiB) v[off] = static_cast<uint8_t>((off >> 12) | 1);
      }
      (void)!::write(ready_p[1], &ok, 1);
      if (!ok) ::_exit(1);
      wait_eof(go_p[0]);  // the gate: all guests start at once
      Slot* s = slot_of(i);
      GuestResult* res = result_of(i);
      auto* posted = reinterpret_cast<int64_t*>(res + 1);
      auto* used = posted + max_req;
      uint64_t b = 0, req = 0;
      while (b < blocks) {
        uint32_t k = 0;
        for (; k < kFloorBlocksPerRequest && b < blocks; ++k, ++b) {
          s->off[k] = b * block;
          s->len[k] = block;
        }
        s->n.store(k, std::memory_order_release);
        const uint64_t one = 1;
        uint64_t got = 0;
        posted[req] = now_ns();
        if (::write(kick[i], &one, 8) != 8) res->errors++;
        while (::read(call[i], &got, 8) < 0 && errno == EINTR) {
        }
        used[req] = now_ns();
        ++req;
      }
      res->requests = req;
      (void)!::write(fin_p[1], &ok, 1);
      wait_eof(exit_p[0]);  // alive (idle) until the bench has read the CPU
      s->n.store(kStop, std::memory_order_release);
      const uint64_t one = 1;
      (void)!::write(kick[i], &one, 8);
      ::_exit(0);
    }
    kids.push_back(p);
    track_child(p, true);
  }
  // The responder: fph-bench itself, exec'd.
  responder = fork();
  if (responder < 0) {
    r.error = "fork failed";
    return r;
  }
  if (responder == 0) {
    for (int i = 0; i < n; ++i)
      for (int fd : {kick[i], call[i], ram[i]}) fcntl(fd, F_SETFD, 0);
    fcntl(slot_fd, F_SETFD, 0);
    ::execv("/proc/self/exe", rargv.data());
    ::_exit(127);
  }
  track_child(responder, true);
  ::close(ready_p[1]), ready_p[1] = -1;
  ::close(fin_p[1]), fin_p[1] = -1;
  ::close(go_p[0]), go_p[0] = -1;
  ::close(exit_p[0]), exit_p[0] = -1;

  for (int i = 0; i < n; ++i) {
    char ok = 0;
    if (!read_full(ready_p[0], &ok, 1) || !ok) {
      r.error = "a floor guest could not map and populate its memory (hugetlb pages?)";
      return r;
    }
  }
  // Let the responder's threads reach their first read.
  std::this_thread::sleep_for(50ms);
  {
    int st = 0;
    if (::waitpid(responder, &st, WNOHANG) == responder) {
      track_child(responder, false);
      responder = -1;
      r.error = "the floor responder exited early";
      return r;
    }
  }
  int64_t b0 = 0;
  for (int fd : ram) b0 += fd_allocated(fd);
  const ThreadCpu resp0 = ThreadCpu::read(responder);
  std::vector<ThreadCpu> g0;
  for (pid_t p : kids) g0.push_back(ThreadCpu::read(p));
  const int64_t t0 = now_ns();
  ::close(go_p[1]), go_p[1] = -1;  // go
  for (int i = 0; i < n; ++i) {
    char c;
    if (!read_full(fin_p[0], &c, 1)) {
      r.error = "a floor guest died during its requests";
      return r;
    }
  }
  r.responder_cpu_s = ThreadCpu::read(responder).since(resp0, "").first;
  for (size_t i = 0; i < kids.size(); ++i) r.guests_cpu_s += ThreadCpu::read(kids[i]).since(g0[i], "").first;
  int64_t b1 = 0;
  for (int fd : ram) b1 += fd_allocated(fd);
  ::close(exit_p[1]), exit_p[1] = -1;  // guests: stop kick, exit
  int64_t last = t0;
  uint64_t errors = 0;
  for (int i = 0; i < n; ++i) {
    GuestResult* res = result_of(i);
    auto* posted = reinterpret_cast<int64_t*>(res + 1);
    auto* used = posted + max_req;
    errors += res->errors;
    r.requests += res->requests;
    for (uint64_t k = 0; k < res->requests; ++k) {
      last = std::max(last, used[k]);
      r.latencies_us.push_back(static_cast<double>(used[k] - posted[k]) * 1e-3);
    }
  }
  int st = 0;
  const pid_t w = ::waitpid(responder, &st, 0);
  track_child(responder, false);
  responder = -1;
  if (w < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    r.error = "the floor responder failed (fallocate errors or a crash), status " + std::to_string(st);
    return r;
  }
  if (errors) {
    r.error = std::to_string(errors) + " kicks failed";
    return r;
  }
  r.reclaimed = b0 - b1;
  r.wall_s = static_cast<double>(last - t0) * 1e-9;
  if (r.reclaimed < static_cast<int64_t>(populate * static_cast<uint64_t>(n) / 10 * 9)) {
    r.error = "floor reclaimed " + human_bytes(static_cast<double>(r.reclaimed)) + " of " +
              human_bytes(static_cast<double>(populate * static_cast<uint64_t>(n)));
    return r;
  }
  r.ok = true;
  return r;
}

int floor_responder_main(int argc, char** argv) {
  // argv: fph-bench --floor-responder SLOT_FD GUESTS KICK,CALL,RAM ...
  if (argc < 4) return 2;
  const int slot_fd = std::atoi(argv[2]);
  const int n = std::atoi(argv[3]);
  if (n < 1 || argc != 4 + n) return 2;
  void* slots = mmap(nullptr, kSlotBytes * static_cast<size_t>(n), PROT_READ | PROT_WRITE, MAP_SHARED, slot_fd, 0);
  if (slots == MAP_FAILED) return 3;
  std::atomic<uint64_t> errors{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < n; ++i) {
    int kick = -1, call = -1, ram = -1;
    if (std::sscanf(argv[4 + i], "%d,%d,%d", &kick, &call, &ram) != 3) return 2;
    auto* s = reinterpret_cast<Slot*>(static_cast<char*>(slots) + kSlotBytes * static_cast<size_t>(i));
    // Like any vhost-user back end (fphd maps every region of SET_MEM_TABLE
    // to read the rings there), the responder maps the guest's RAM and has
    // touched a page of it. A punch then also walks this mapping: measured
    // at +8% of the responder's CPU with 16 hugetlb guests, a cost of being
    // a back end, not of fphd's design.
    struct stat st {};
    if (fstat(ram, &st) != 0) return 3;
    void* m = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, ram, 0);
    if (m == MAP_FAILED) return 3;
    (void)*static_cast<volatile char*>(m);
    ts.emplace_back([=, &errors] {
      pthread_setname_np(pthread_self(), "fph-floor");
      for (;;) {
        uint64_t v = 0;
        const ssize_t rd = ::read(kick, &v, 8);
        if (rd < 0 && errno == EINTR) continue;
        if (rd != 8) {
          errors.fetch_add(1);
          return;
        }
        const uint32_t k = s->n.load(std::memory_order_acquire);
        if (k == kStop) return;
        for (uint32_t j = 0; j < k && j < kFloorBlocksPerRequest; ++j)
          if (fallocate(ram, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(s->off[j]),
                        static_cast<off_t>(s->len[j])) != 0)
            errors.fetch_add(1);
        const uint64_t one = 1;
        if (::write(call, &one, 8) != 8) errors.fetch_add(1);
      }
    });
  }
  for (auto& t : ts) t.join();
  return errors.load() == 0 ? 0 : 1;
}

}  // namespace fph::bench
