// Per-NUMA-node discard pipelines (DESIGN section 3, step 4).
//
// One tbb::task_arena per host node, constrained to that node's cores
// (tbb::info::numa_nodes() / task_arena::constraints when TBB's hwloc binding
// is available; otherwise an unconstrained arena of the node's core count).
// Each node has a dispatcher thread that takes whole batches from the node's
// queue and runs a tbb::parallel_pipeline over them inside the arena:
//
//   serial in-order source: take the next batch          (one request's ranges on this node)
//   parallel:               coalesce adjacent ranges, choose the method, discard
//   serial out-of-order:    account and complete the batch (callback)
//
// A whole request's ranges on one node are one unit of work: there is no
// sleep/wake handoff per block, and no lock shared by all VMs on the hot path
// (each node's queue has its own lock; batches from different VMs only meet
// there).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fph/reclaim/discard.h"
#include "fph/reclaim/policy.h"
#include "fph/reclaim/topology.h"

namespace fph::reclaim {

struct RangeResult {
  DiscardTarget target;     // as submitted (after coalescing, one entry per syscall group)
  DiscardOutcome outcome;
};

struct BatchResult {
  int node = 0;
  std::vector<RangeResult> ranges;
  uint64_t discarded_bytes = 0;
  uint64_t skipped_bytes = 0;
  std::chrono::nanoseconds discard_time{0};  // wall time spent in discard syscalls
  bool cancelled = false;                    // cancelled before it ran (nothing discarded)
};

struct Batch {
  int node = 0;
  std::vector<DiscardTarget> ranges;
  // Called exactly once, from a pipeline thread (or from cancel/stop), when
  // every range has been discarded or skipped.
  std::function<void(BatchResult&&)> on_done;
  // Optional: a batch whose token reads true when its turn comes is not
  // discarded but completed with cancelled = true (session yanked / stopped).
  std::shared_ptr<std::atomic<bool>> cancel;
  // Optional: the private-memory mode of the VM the batch is for (its own
  // policy), instead of the node's.
  std::optional<PrivateMode> mode;
};

struct PipelineOptions {
  int max_tokens_per_node = 0;      // 0 = threads of the node (one batch per thread)
  int threads_per_node = 0;         // 0 = the node's CPU count (at least 1)
  bool coalesce = true;             // merge adjacent ranges of the same fd
  // 16 MiB: big enough that syscalls are few (8 per 128 MiB request), small
  // enough that the struct pages one punch touches in its unmap pass are
  // still in L2 for its free pass. fph-bench (4 and 16 guests, 4 KiB shmem,
  // 2 threads, paired runs) measured 0.92/1.03 and 0.92/1.05 (throughput and
  // CPU per GiB against the raw loop) at 16 MiB, 0.86/1.09 and 0.93/1.03 at
  // 64 MiB; a raw loop of 64 MiB punches costs ~3% more per byte than 4 MiB.
  uint64_t max_coalesced_bytes = 16ull << 20;
  // The same cap for hugetlbfs ranges. The L2 argument above is about the
  // 4 KiB struct pages of a shmem range; a huge page is freed as one folio,
  // so a bigger punch only saves syscalls (and the two fstat calls of the
  // verified discard around each). 256 MiB takes a whole Linux-sized report
  // (32 blocks of up to 4 MiB) in one call: fph-bench measured 8 calls per
  // 112 MiB hugetlb request at 16 MiB, about 1 at 256 MiB (README, "Per-request
  // cost"). The inode stays locked for one call: ~0.1 ms per 256 MiB.
  uint64_t max_coalesced_hugetlb_bytes = 256ull << 20;
  // try_run_inline: a batch whose discards are expected to take less than
  // this (CPU time) runs on the submitting thread. 0 = never inline. A
  // request that costs the kernel tens to a few hundred microseconds (a
  // Linux-sized 128 MiB hugetlb report: ~30 us on a quiet host, 150-180 us
  // on the 2-core dev VM) costs as much again in a handoff to a pipeline
  // thread and back (two wakeups). 500 us: 200 us, the first choice, sat
  // just above a 128 MiB hugetlb report on the dev VM, and fph-bench saw a
  // fifth of them take the hand-off. Still well below one 4 KiB-shmem report
  // (128 MiB: ~10 ms), which stays on the pipeline with its NUMA placement
  // and concurrency bound; a shmem request of a few MiB may now run inline.
  std::chrono::nanoseconds inline_budget{std::chrono::microseconds(500)};
};

struct NodeCounters {
  std::atomic<uint64_t> batches{0};
  std::atomic<uint64_t> discarded_bytes{0};
  std::atomic<uint64_t> skipped_bytes{0};
  std::atomic<uint64_t> failures{0};
  std::atomic<uint64_t> queued{0};  // batches waiting or running
  // Last sign of life of the node's pipeline while it had work
  // (steady_clock, ns since its epoch): a batch submitted to an idle node, a
  // batch taken, a range started or finished, a rate-limit wait slice.
  std::atomic<int64_t> progress_ns{0};
  std::atomic<uint64_t> inline_batches{0};  // of `batches`: run on the submitting thread
};

class NodePipelines {
 public:
  NodePipelines(const Topology& topo, Discarder& discarder, PolicyTable& policy,
                NodeMemoryProbe& probe, PipelineOptions opts = {});
  ~NodePipelines();  // stop()
  NodePipelines(const NodePipelines&) = delete;
  NodePipelines& operator=(const NodePipelines&) = delete;

  // Thread safe, never blocks on discard work. A batch for a node index out of
  // range is completed at once with every byte skipped (Unsupported).
  // (Also: a batch submitted after stop() is completed at once, cancelled.
  // BatchResult::ranges come sorted by position and coalesced, not in
  // submission order. on_done may call submit(), never drain() or stop().)
  void submit(Batch b);
  // The cheap path of submit(): runs the batch on the calling thread and
  // calls on_done before returning, if its expected cost (bytes times the
  // node's measured discard cost for the backing) is within
  // PipelineOptions::inline_budget, the node has no rate limit and is not
  // stopping. Same policy, coalescing, accounting and completion as the
  // pipeline; drain() waits for it too. Returns false, leaving `b`
  // untouched, when the batch must go through submit(): unknown cost (no
  // discard of that backing measured on the node yet), too expensive, rate
  // limited. Never waits for other batches.
  bool try_run_inline(Batch& b);
  // Waits until every batch submitted so far has completed.
  void drain();
  // Completes queued batches as cancelled, waits for running ones, joins.
  // (A running batch waiting on its node's rate limit stops waiting; its
  // remaining ranges are skipped as Cancelled. Idempotent.)
  void stop();

  int node_count() const;
  const NodeCounters& counters(int node) const;

  // Health for the service manager's watchdog: the first node that has work
  // queued or running and has shown no sign of life for longer than `limit`
  // (a discard stuck in the kernel, a wedged pipeline), described for the
  // log; nullopt when every node is idle or moving.
  std::optional<std::string> stalled(std::chrono::nanoseconds limit,
                                     std::chrono::steady_clock::time_point now =
                                         std::chrono::steady_clock::now()) const;

 private:
  struct Node;
  std::vector<std::unique_ptr<Node>> nodes_;
};

}  // namespace fph::reclaim
