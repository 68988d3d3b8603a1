// The SIGBUS guard for guest memory mappings: see memory_guard.h for the
// mechanism and why. Everything the handler touches is a lock-free atomic in
// a static table; the handler takes no lock, allocates nothing and logs
// nothing (only async-signal-safe calls: mmap, sigaction).
#include "fph/daemon/memory_guard.h"

#include <signal.h>
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <mutex>

namespace fph::daemon {
namespace {

struct Slot {
  std::atomic<bool> used{false};      // owned by a registration
  std::atomic<uintptr_t> start{0};
  std::atomic<size_t> len{0};         // 0: not armed (being set up or torn down)
  std::atomic<bool> faulted{false};
  std::atomic<uintptr_t> fault_addr{0};
};

static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uintptr_t>::is_always_lock_free && std::atomic<size_t>::is_always_lock_free &&
                  std::atomic<bool>::is_always_lock_free,
              "the SIGBUS handler reads these: they must be lock-free");

Slot g_slots[kGuardSlots];
std::atomic<uint64_t> g_faults{0};
std::atomic<int> g_high{0};  // slots [0, g_high) have ever been used: the handler scans no further
struct sigaction g_previous {};
std::once_flag g_installed;

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  const auto addr = reinterpret_cast<uintptr_t>(info ? info->si_addr : nullptr);
  const int high = g_high.load(std::memory_order_acquire);
  for (int i = 0; i < high; ++i) {
    Slot& s = g_slots[i];
    const size_t len = s.len.load(std::memory_order_acquire);
    if (len == 0) continue;
    const uintptr_t start = s.start.load(std::memory_order_acquire);
    if (addr < start || addr - start >= len) continue;
    // The front end's file no longer covers this address. Swap the whole
    // range for anonymous memory: every further access anywhere in it reads
    // zeros or writes into throwaway pages instead of faulting again, and
    // the owner's munmap of the range later still matches one mapping.
    const int saved = errno;
    void* p = ::mmap(reinterpret_cast<void*>(start), len, PROT_READ | PROT_WRITE,
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    errno = saved;
    if (p == MAP_FAILED) break;  // cannot repair: die as an unguarded fault would
    s.fault_addr.store(addr, std::memory_order_relaxed);
    s.faulted.store(true, std::memory_order_release);
    g_faults.fetch_add(1, std::memory_order_release);
    return;  // the faulting access is retried on the new pages
  }
  // Not guest memory (or no repair possible): a real bug. Put back what was
  // there before us (SIG_DFL, or a sanitizer's handler) and return; the
  // access faults again and the process dies with the usual report.
  ::sigaction(SIGBUS, &g_previous, nullptr);
  (void)sig;
  (void)ctx;
}

}  // namespace

void install_memory_guard() {
  std::call_once(g_installed, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, &g_previous);
  });
}

int guard_register(void* p, size_t len) {
  install_memory_guard();
  if (!p || len == 0) return -1;
  for (int i = 0; i < kGuardSlots; ++i) {
    bool expected = false;
    if (!g_slots[i].used.compare_exchange_strong(expected, true, std::memory_order_acq_rel)) continue;
    Slot& s = g_slots[i];
    s.faulted.store(false, std::memory_order_relaxed);
    s.fault_addr.store(0, std::memory_order_relaxed);
    s.start.store(reinterpret_cast<uintptr_t>(p), std::memory_order_release);
    s.len.store(len, std::memory_order_release);  // armed last
    int high = g_high.load(std::memory_order_relaxed);
    while (high < i + 1 && !g_high.compare_exchange_weak(high, i + 1, std::memory_order_acq_rel)) {
    }
    return i;
  }
  return -1;
}

void guard_unregister(int slot) {
  if (slot < 0 || slot >= kGuardSlots) return;
  Slot& s = g_slots[slot];
  s.len.store(0, std::memory_order_release);  // disarmed first
  s.start.store(0, std::memory_order_release);
  s.used.store(false, std::memory_order_release);
}

bool guard_faulted(int slot) {
  if (slot < 0 || slot >= kGuardSlots) return false;
  return g_slots[slot].faulted.load(std::memory_order_acquire);
}

uintptr_t guard_fault_addr(int slot) {
  if (slot < 0 || slot >= kGuardSlots) return 0;
  return g_slots[slot].fault_addr.load(std::memory_order_acquire);
}

}  // namespace fph::daemon

namespace fph::daemon {
uint64_t guard_faults() { return g_faults.load(std::memory_order_acquire); }
}  // namespace fph::daemon
