// Workloads of fph-guest and the memory integrity checks that make them a
// test of the back end: every allocated page carries a pattern derived from
// (frame, generation) and is verified before it is freed; pages that come
// back after a successful report must read as the free value (zero, or the
// poison value when PAGE_POISON is negotiated: reference 1.5), which proves
// the host really dropped (or rightly kept) their backing.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

#include "fph/common/expected.h"
#include "fph/common/size.h"
#include "fph/guest/buddy.h"
#include "fph/guest/guest_memory.h"
#include "fph/guest/trace.h"

namespace fph::guest {

// "4096", "64K", "512M", "1G", "2T" (binary units; optional trailing "iB"/"B").
using ::fph::parse_size;  // now in fph::common (fphctl uses it too)

struct WorkloadSpec {
  enum class Kind { None, AllocFree, Churn, Trace };
  Kind kind = Kind::None;
  uint64_t bytes = 0;
  std::chrono::milliseconds hold{0};    // alloc-free: hold time
  std::chrono::milliseconds duration{0};  // churn: run time
  std::string text;
  std::shared_ptr<const Trace> trace;  // trace: the parsed file
};
// "none", "alloc-free:SIZE[:HOLD_MS]", "churn:SIZE:SECONDS", "trace:FILE"
// (the file is read and validated here: trace.h).
Expected<WorkloadSpec, std::string> parse_workload(std::string_view s);

struct IntegrityCounters {
  std::atomic<uint64_t> corrupted_bytes{0};         // pattern or resident mismatches
  std::atomic<uint64_t> reported_nonzero_bytes{0};  // reported pages not reading as the free value
  std::atomic<uint64_t> reported_bytes_checked{0};  // reported pages checked on allocation
  std::atomic<uint64_t> resident_checks{0};
  std::atomic<uint64_t> verified_bytes{0};
  std::atomic<uint64_t> alloc_shortfall_bytes{0};  // asked for but not allocated (guest OOM)
};

// Pattern writing/verification and tracking of reported (discarded) frames.
class MemoryChecker {
 public:
  MemoryChecker(const GuestMemory& mem, std::optional<uint32_t> poison);

  // The 64-bit word `word` (0..511) of frame `frame` in generation `gen`.
  static uint64_t pattern_word(uint64_t frame, uint64_t gen, size_t word);
  void fill(uint64_t frame, int order, uint64_t gen) const;
  // Number of bytes of the block that differ from the pattern.
  uint64_t verify(uint64_t frame, int order, uint64_t gen) const;
  // What a free page holds: 0, or poison_val repeated (PAGE_POISON).
  uint64_t free_word() const { return free_word_; }
  // With PAGE_POISON the driver writes poison_val into pages before they
  // are freed/reported (reference 1.5); without it this is a no-op.
  void poison(uint64_t frame, int order) const;
  // Poisons every frame from `first_frame` on: at start-up all RAM is free
  // (Linux poisons free pages as it frees them into the buddy at boot).
  void poison_all(uint64_t first_frame) const;

  // Called for a request the device used, while its blocks are still
  // isolated: their frames must read as the free value until allocated.
  void mark_reported(uint64_t frame, int order);
  // Called right after allocating a block (before writing to it): counts
  // the bytes of previously reported frames that do not read as the free
  // value, and clears their marks. Returns {checked bytes, bad bytes}.
  std::pair<uint64_t, uint64_t> check_allocated(uint64_t frame, int order);
  // Clears the reported marks of a freshly allocated block without reading
  // it (--no-check-reported: timing runs where the check's reads would
  // distort the refault cost being measured).
  void forget_reported(uint64_t frame, int order);

  // Local mode with MADV_FREE (lazy): after madvise(MADV_FREE) the kernel
  // may free a page at any time before it is written again, or never (no
  // memory pressure). A reported page therefore legitimately reads either
  // as zero (reclaimed) or exactly as it read when it was reported (not
  // reclaimed yet; reading does not cancel MADV_FREE, only a write does).
  // In this mode mark_reported() records a hash of every frame and
  // check_allocated() accepts, per 4 KiB frame, zero or that hash; anything
  // else is counted as bad. Set before the first report.
  void set_lazy_free(bool on);
  bool lazy_free() const { return lazy_; }
  // Lazy mode: reported frames found zero (the kernel reclaimed them) and
  // found intact (still resident when reallocated) by check_allocated().
  uint64_t lazy_zero_frames() const { return lazy_zero_.load(); }
  uint64_t lazy_kept_frames() const { return lazy_kept_.load(); }

 private:
  const GuestMemory& mem_;
  uint64_t free_word_ = 0;
  bool poisoning_ = false;
  // One byte per frame. Ownership of a frame's byte follows the frame: the
  // driver thread writes it while the block is isolated, the workload thread
  // while it is allocated; every hand-over goes through the zone lock
  // (isolate/putback/alloc), which orders the accesses.
  std::vector<uint8_t> reported_;
  bool lazy_ = false;
  std::vector<uint64_t> snapshot_;  // lazy mode: hash of each reported frame
  std::atomic<uint64_t> lazy_zero_{0};
  std::atomic<uint64_t> lazy_kept_{0};
};

struct Held {
  uint64_t frame = 0;
  int order = 0;
  uint64_t gen = 0;
  uint64_t bytes() const { return kFrameSize << order; }
};

// The vCPUs of the VM, as far as fph-guest's workload is one: a live
// migration stops them for its final copy (QEMU's vm_stop before the
// stop-and-copy phase). Each workload operation that writes guest memory
// (allocate and fill, poison and free) runs inside enter(); pause() waits for
// the ones running and holds new ones until resume().
class VcpuGate {
 public:
  std::shared_lock<std::shared_mutex> enter() { return std::shared_lock(mu_); }
  void pause() { mu_.lock(); }
  void resume() { mu_.unlock(); }

 private:
  std::shared_mutex mu_;
};

struct WorkloadHooks {
  std::function<void(int order)> notify_free;         // PageReporting::notify_free + wake
  std::function<void(uint64_t bytes)> on_freed;       // a free phase finished
  // A trace operation was replayed: bytes allocated/freed (whole blocks),
  // its duration and the minor page faults of the process meanwhile
  // (getrusage): the refault cost of reallocating reported memory.
  std::function<void(const TraceOp& op, uint64_t bytes, uint64_t us, uint64_t minflt)> on_trace_op;
  // An allocation found no free memory (Linux: the OOM notifier chain, where
  // virtio_balloon's DEFLATE_ON_OOM handler sits). Returns the pages made
  // free; > 0 retries the allocation.
  std::function<uint64_t()> on_oom;
};

// What the workload did, over all its runs (run()): the bytes it allocated
// (every successful alloc_block, the pattern fill included: that is where a
// page the host discarded is faulted back in) and the wall time of the runs
// (alloc-free: allocation, hold and free; churn: its SECONDS), so
// alloc_bytes / seconds is its allocation throughput. alloc_seconds is the
// part of that spent inside alloc_block (allocation and fill alone).
struct WorkloadTotals {
  uint64_t runs = 0;
  uint64_t alloc_bytes = 0;
  uint64_t ops = 0;  // churn: operations (an allocation or a free each)
  double seconds = 0;
  double alloc_seconds = 0;
  // alloc_bytes / seconds, 0 if the workload has not run.
  double alloc_bytes_per_sec() const {
    return seconds > 0 ? static_cast<double>(alloc_bytes) / seconds : 0.0;
  }
};

class Workload {
 public:
  Workload(BuddyAllocator& buddy, std::mutex& zone, MemoryChecker& checker,
           IntegrityCounters& counters, WorkloadHooks hooks, uint64_t seed = 1);

  // Allocates `bytes` in blocks of the largest order that fits (falling
  // back to lower orders when the buddy has none), checks reported frames,
  // fills every page with the pattern. Returns fewer bytes if memory runs out.
  std::vector<Held> alloc_bytes(uint64_t bytes);
  std::optional<Held> alloc_block(int order);
  // Verifies (unless `verify` is false: the caller just did), poisons
  // (PAGE_POISON) and frees one block; counts mismatches.
  void free_block(const Held& h, bool verify = true);
  void free_all(std::vector<Held>& blocks, bool verify = true);
  // Bytes that do not match their pattern (adds to corrupted_bytes).
  uint64_t verify_all(const std::vector<Held>& blocks);

  // Operations run inside gate->enter() (live migration); nullptr: no gate.
  void set_gate(VcpuGate* gate) { gate_ = gate; }
  // false: do not read reported pages on reallocation (timing runs).
  void set_check_reported(bool on) { check_reported_ = on; }

  // Runs `spec` once (returns early on *stop).
  void run(const WorkloadSpec& spec, const std::atomic<bool>& stop);

  // Totals since construction; safe to call from any thread.
  WorkloadTotals totals() const;

 private:
  void run_once(const WorkloadSpec& spec, const std::atomic<bool>& stop);
  void churn(const WorkloadSpec& spec, const std::atomic<bool>& stop);
  void replay(const Trace& trace, const std::atomic<bool>& stop);

  BuddyAllocator& buddy_;
  std::mutex& zone_;
  MemoryChecker& checker_;
  IntegrityCounters& counters_;
  WorkloadHooks hooks_;
  std::mt19937_64 rng_;
  uint64_t next_gen_ = 1;
  const std::atomic<bool>* stop_ = nullptr;  // run()'s stop flag: ends allocation stalls
  bool warned_oom_ = false;
  bool check_reported_ = true;
  VcpuGate* gate_ = nullptr;
  // totals(): written by the workload thread, read by any.
  std::atomic<uint64_t> runs_{0};
  std::atomic<uint64_t> alloc_bytes_{0};
  std::atomic<uint64_t> ops_{0};
  std::atomic<uint64_t> run_ns_{0};
  std::atomic<uint64_t> alloc_ns_{0};
};

}  // namespace fph::guest
