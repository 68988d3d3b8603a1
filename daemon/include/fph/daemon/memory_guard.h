// Guest memory can never SIGBUS fphd.
//
// Every guest memory region is a MAP_SHARED mapping of a file the front end
// owns. The front end can ftruncate that file at any time; the next access
// by fphd to a page past the new end of file (a ring, a descriptor, the
// stats buffer) raises SIGBUS, and a SIGBUS kills the whole daemon: every
// other VM would lose reclaim because of one front end (issue 11).
//
// Sizes are checked where a region arrives (map_region refuses a region that
// ends past the end of its file); this guard covers the shrink that comes
// later. Each mapping is registered in a fixed, lock-free table. A SIGBUS
// whose address lies in a registered range replaces the WHOLE range with
// anonymous zero memory (mmap MAP_FIXED, async-signal-safe) and marks it
// faulted; the faulting instruction is retried and now reads zeros or writes
// into throwaway memory. The session that owns the region sees the mark
// (guard_faulted) at its next check and closes. Why not siglongjmp out of the
// handler: the faulting code may hold the session's mutex or be half-way
// through a ring update, and unwinding past that without destructors would
// leave locks held and state torn; a retried access that reads zeros is
// harmless because the session is closed right after and nothing it read
// from a faulted range is acted on any further than a garbage chain would be
// (chains are validated anyway).
//
// A SIGBUS outside every registered range is a real bug: the handler puts the
// previous disposition back and returns, the fault repeats and the process
// dies as before (with a core, or the sanitizer's report).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fph::daemon {

inline constexpr int kGuardSlots = 4096;

// Installs the process-wide SIGBUS handler (once; later calls do nothing).
// run() calls it at start; guard_register calls it too.
void install_memory_guard();

// Registers [p, p+len). Returns the slot, or -1 if the table is full (the
// range is then unguarded: a shrink under it kills fphd as before).
int guard_register(void* p, size_t len);
// Before the range is unmapped. -1 is ignored.
void guard_unregister(int slot);
// True once a SIGBUS hit the slot's range (it now reads zeros).
bool guard_faulted(int slot);
// The faulting address, 0 if none.
uintptr_t guard_fault_addr(int slot);
// Guarded faults since start, all ranges: 0 almost always, so a caller can
// skip looking at its own ranges with one atomic load (the data path checks
// after every returned chain).
uint64_t guard_faults();

// One registered range, unregistered on destruction (before the owner
// unmaps it: call reset() first when the owner's destructor unmaps).
class GuardedRange {
 public:
  GuardedRange() = default;
  GuardedRange(void* p, size_t len) : slot_(guard_register(p, len)) {}
  GuardedRange(const GuardedRange&) = delete;
  GuardedRange& operator=(const GuardedRange&) = delete;
  GuardedRange(GuardedRange&& o) noexcept : slot_(o.slot_) { o.slot_ = -1; }
  GuardedRange& operator=(GuardedRange&& o) noexcept {
    if (this != &o) {
      reset();
      slot_ = o.slot_;
      o.slot_ = -1;
    }
    return *this;
  }
  ~GuardedRange() { reset(); }

  void reset() {
    guard_unregister(slot_);
    slot_ = -1;
  }
  int slot() const { return slot_; }
  bool guarded() const { return slot_ >= 0; }
  bool faulted() const { return guard_faulted(slot_); }
  uintptr_t fault_addr() const { return guard_fault_addr(slot_); }

 private:
  int slot_ = -1;
};

}  // namespace fph::daemon
