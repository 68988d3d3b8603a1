// Per-node discard pipelines (DESIGN section 3, step 4; shape after oneTBB's
// examples/parallel_pipeline: serial source, parallel middle, serial sink,
// bounded tokens).
//
// Completion contract: every submitted Batch gets exactly one on_done call,
// whatever happens (cancel, stop, node out of range, a throwing discarder or
// probe). A request that never completes leaks the guest's isolated memory
// (STYLE: "requests always completed with a status, never dropped").
#include "fph/reclaim/node_pipeline.h"

#include <pthread.h>
#include <tbb/info.h>
#include <tbb/parallel_pipeline.h>
#include <tbb/task_arena.h>
#include <time.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>

#include "fph/common/checked.h"
#include "fph/common/log.h"

namespace fph::reclaim {

namespace {

using Clock = std::chrono::steady_clock;

// The probe reads files; once per ~100 ms per node is plenty for a pressure
// signal whose own averaging window (PSI avg10) is 10 s.
constexpr auto kProbeInterval = std::chrono::milliseconds(100);
// Longest single sleep of a rate-limited range, so stop() and cancel tokens
// are noticed promptly.
constexpr auto kRateSlice = std::chrono::milliseconds(10);

void mark_progress(NodeCounters& c) {
  c.progress_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                          Clock::now().time_since_epoch()).count(),
                      std::memory_order_relaxed);
}

bool is_cancelled(const Batch& b) {
  return b.cancel != nullptr && b.cancel->load(std::memory_order_acquire);
}

// Result of a batch that never reached the discarder: every byte skipped.
BatchResult skipped_result(const Batch& b, SkipReason why) {
  BatchResult r;
  r.node = b.node;
  r.cancelled = why == SkipReason::Cancelled;
  r.ranges.reserve(b.ranges.size());
  for (const auto& t : b.ranges) {
    RangeResult rr;
    rr.target = t;
    rr.outcome.skipped_bytes = t.length;
    rr.outcome.skip = why;
    r.skipped_bytes += t.length;
    r.ranges.push_back(rr);
  }
  return r;
}

void call_done(Batch& b, BatchResult&& r) {
  if (!b.on_done) return;
  // The callback is released as soon as it has run: what it captured (a
  // session, its mappings) must not live on inside the pipeline's work list.
  auto done = std::move(b.on_done);
  b.on_done = nullptr;
  try {
    done(std::move(r));
  } catch (const std::exception& e) {
    log::error("reclaim", "batch completion callback threw: {}", e.what());
  } catch (...) {
    log::error("reclaim", "batch completion callback threw");
  }
}

// This thread's CPU time (a syscall: the vDSO serves only the system-wide
// clocks; ~0.5 us, twice per coalesced range).
std::chrono::nanoseconds thread_cpu_now() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
}

// Two ranges may become one syscall only if every byte between them was
// reported too, i.e. they touch, and they share everything the syscall needs.
bool can_merge(const DiscardTarget& a, const DiscardTarget& b, uint64_t max_bytes) {
  if (a.backing != b.backing || a.page_size != b.page_size || a.node != b.node || a.fd != b.fd) {
    return false;
  }
  const auto len = checked_add(a.length, b.length);
  if (!len || *len > max_bytes) return false;
  if ((a.addr == nullptr) != (b.addr == nullptr)) return false;
  if (a.fd < 0 && a.addr == nullptr) return false;  // nothing to address: leave it to the discarder
  if (a.fd >= 0) {
    const auto end = checked_add(a.fd_offset, a.length);
    if (!end || *end != b.fd_offset) return false;
  }
  if (a.addr != nullptr) {
    const auto end = checked_add(reinterpret_cast<uintptr_t>(a.addr), a.length);
    if (!end || *end != reinterpret_cast<uintptr_t>(b.addr)) return false;
  }
  return true;
}

// Sorts by position in the backing so that ranges reported out of order still
// merge; identical or overlapping ranges never merge (they do not touch).
std::vector<DiscardTarget> coalesce(const std::vector<DiscardTarget>& in, uint64_t max_bytes,
                                    uint64_t max_hugetlb_bytes) {
  std::vector<DiscardTarget> sorted(in);
  std::stable_sort(sorted.begin(), sorted.end(), [](const DiscardTarget& x, const DiscardTarget& y) {
    auto key = [](const DiscardTarget& t) {
      return std::tuple(t.backing, t.page_size, t.node, t.fd, t.fd_offset,
                        reinterpret_cast<uintptr_t>(t.addr));
    };
    return key(x) < key(y);
  });
  std::vector<DiscardTarget> out;
  out.reserve(sorted.size());
  for (const auto& t : sorted) {
    if (t.length == 0) continue;
    const uint64_t cap = t.backing == Backing::Hugetlb ? max_hugetlb_bytes : max_bytes;
    if (!out.empty() && can_merge(out.back(), t, cap)) {
      out.back().length += t.length;
    } else {
      out.push_back(t);
    }
  }
  return out;
}

}  // namespace

struct NodePipelines::Node {
  Node(const NodeInfo& info, Discarder& d, PolicyTable& p, NodeMemoryProbe& pr,
       const PipelineOptions& o)
      : index(info.index), os_index(info.os_index), discarder(d), policy(p), probe(pr), opts(o) {}

  // One unit of pipeline work: a batch and what became of it.
  struct Work {
    uint64_t seq = 0;
    Batch batch;
    NodeMemory memory;
    BatchResult result;
    bool completed = false;
  };

  // Batches one pipeline run may take before it ends and a new run starts
  // (bounds the run's bookkeeping when the node never goes idle).
  static constexpr size_t kMaxBatchesPerRun = 4096;

  const int index;
  const int os_index;
  Discarder& discarder;
  PolicyTable& policy;
  NodeMemoryProbe& probe;
  const PipelineOptions opts;
  int max_tokens = 1;
  int threads = 1;  // the arena's concurrency
  std::optional<tbb::task_arena> arena;
  NodeCounters counters;

  // The node's queue. Batches from every VM meet here and nowhere else.
  std::mutex mu;
  std::condition_variable cv;       // queue non-empty or stopping
  std::condition_variable done_cv;  // a batch completed (drain)
  std::deque<std::pair<uint64_t, Batch>> queue;  // (sequence, batch)
  std::set<uint64_t> in_flight;                  // sequences submitted, not completed
  uint64_t next_seq = 0;
  int in_pipeline = 0;  // batches the running pipeline took and has not completed
  bool stopping = false;
  std::atomic<bool> stop_flag{false};  // stopping, readable without mu
  std::thread dispatcher;

  // The last pressure reading: the pipeline's source stage and inline
  // batches (session threads) share it.
  std::mutex memory_mu;
  NodeMemory memory;
  std::optional<Clock::time_point> memory_at;

  // Measured discard cost per backing (picoseconds per byte, an EWMA of
  // every discard on this node; 0 = not measured yet): what try_run_inline
  // estimates a batch's cost from. Races between writers lose a sample, no
  // more. Learned from the discarding thread's CPU time, not wall time: with
  // 16 session threads on 2 CPUs a 112 MiB hugetlb punch (~150 us of CPU)
  // was often preempted, its wall time taught "over budget", and the next
  // cheap requests took the pipeline hand-off (fph-bench --thread-cpu showed
  // up to 2 ms of pipeline threads per 4 ms window).
  std::atomic<uint64_t> ps_per_byte[3] = {0, 0, 0};
  void learn_cost(Backing b, uint64_t bytes, Clock::duration took);
  std::optional<std::chrono::nanoseconds> estimate(const Batch& b) const;

  // Token bucket (DESIGN section 4: a per-node rate limit bounds the CPU the
  // daemon spends). Shared by the node's parallel stage.
  std::mutex rate_mu;
  double tokens = 0;
  Clock::time_point refilled_at = Clock::now();

  void run();
  void run_pipeline();
  NodeMemory read_memory();
  void process(Work& w);
  bool take_tokens(uint64_t bytes, uint64_t rate, const Batch& b);
  void complete(uint64_t seq, Batch& b, BatchResult&& r, bool from_pipeline = false);
};

void NodePipelines::Node::learn_cost(Backing b, uint64_t bytes, Clock::duration took) {
  if (bytes == 0) return;
  const double ps = std::chrono::duration<double, std::pico>(took).count() / static_cast<double>(bytes);
  const uint64_t sample = std::max<uint64_t>(1, static_cast<uint64_t>(ps));
  auto& slot = ps_per_byte[static_cast<size_t>(b) % 3];
  const uint64_t old = slot.load(std::memory_order_relaxed);
  slot.store(old == 0 ? sample : (old * 7 + sample) / 8, std::memory_order_relaxed);
}

std::optional<std::chrono::nanoseconds> NodePipelines::Node::estimate(const Batch& b) const {
  double ps = 0;
  for (const auto& t : b.ranges) {
    const uint64_t per = ps_per_byte[static_cast<size_t>(t.backing) % 3].load(std::memory_order_relaxed);
    if (per == 0) return std::nullopt;
    ps += static_cast<double>(per) * static_cast<double>(t.length);
  }
  return std::chrono::nanoseconds(static_cast<int64_t>(ps / 1000));
}

NodeMemory NodePipelines::Node::read_memory() {
  std::lock_guard lk(memory_mu);
  const auto now = Clock::now();
  if (!memory_at || now - *memory_at >= kProbeInterval) {
    try {
      memory = probe.read(os_index);
    } catch (...) {
      memory = NodeMemory{};  // invalid: policy treats it as no pressure
    }
    memory_at = now;
  }
  return memory;
}

// Debt-based token bucket: a range may start while the bucket is not in debt
// and then takes its full size (so ranges larger than one second's worth still
// pass); the average stays at `rate`. Returns false if the wait was abandoned
// because of stop() or the batch's cancel token.
bool NodePipelines::Node::take_tokens(uint64_t bytes, uint64_t rate, const Batch& b) {
  const double capacity = static_cast<double>(rate);  // one second of burst
  for (;;) {
    Clock::duration wait{};
    {
      std::lock_guard lk(rate_mu);
      const auto now = Clock::now();
      const double elapsed = std::chrono::duration<double>(now - refilled_at).count();
      tokens = std::min(capacity, tokens + elapsed * static_cast<double>(rate));
      refilled_at = now;
      if (tokens >= 0) {
        tokens -= static_cast<double>(bytes);
        return true;
      }
      wait = std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(-tokens / static_cast<double>(rate)));
    }
    if (stop_flag.load(std::memory_order_acquire) || is_cancelled(b)) return false;
    std::this_thread::sleep_for(std::min<Clock::duration>(wait, kRateSlice));
    mark_progress(counters);  // waiting on the rate limit is not being stuck
  }
}

void NodePipelines::Node::process(Work& w) {
  Batch& b = w.batch;
  BatchResult& r = w.result;
  r.node = index;
  // "when its turn comes" (node_pipeline.h): a batch cancelled or stopped
  // before this point discards nothing.
  if (is_cancelled(b) || stop_flag.load(std::memory_order_acquire)) {
    r = skipped_result(b, SkipReason::Cancelled);
    r.node = index;
    return;
  }
  const NodePolicy pol = policy.get(index);
  std::vector<DiscardTarget> groups =
      opts.coalesce ? coalesce(b.ranges, std::max<uint64_t>(opts.max_coalesced_bytes, 1),
                               std::max<uint64_t>(opts.max_coalesced_hugetlb_bytes, 1))
                    : b.ranges;

  // One choose() per backing per batch: the policy table's lock is shared by
  // all nodes, so it stays off the per-range path.
  std::optional<Method> chosen[3];
  r.ranges.reserve(groups.size());
  bool abandoned = false;
  for (const auto& t : groups) {
    RangeResult rr;
    rr.target = t;
    auto& m = chosen[static_cast<size_t>(t.backing) % 3];
    if (!m) m = policy.choose(t.backing, index, w.memory, b.mode);
    rr.outcome.method = *m;
    if (t.length == 0) {
      r.ranges.push_back(rr);
      continue;
    }
    if (!abandoned && pol.rate_limit_bytes_per_sec != 0) {
      abandoned = !take_tokens(t.length, pol.rate_limit_bytes_per_sec, b);
    }
    if (abandoned) {
      rr.outcome.skipped_bytes = t.length;
      rr.outcome.skip = SkipReason::Cancelled;
    } else {
      mark_progress(counters);
      const auto t0 = Clock::now();
      const auto cpu0 = thread_cpu_now();
      try {
        rr.outcome = discarder.discard(t, *m);
      } catch (...) {
        rr.outcome = DiscardOutcome{};
        rr.outcome.method = *m;
        rr.outcome.skipped_bytes = t.length;
        rr.outcome.skip = SkipReason::Failed;
      }
      const auto took = Clock::now() - t0;
      r.discard_time += took;
      if (rr.outcome.discarded_bytes != 0)
        learn_cost(t.backing, rr.outcome.discarded_bytes, thread_cpu_now() - cpu0);
      mark_progress(counters);
    }
    r.discarded_bytes += rr.outcome.discarded_bytes;
    r.skipped_bytes += rr.outcome.skipped_bytes;
    r.ranges.push_back(rr);
  }
}

void NodePipelines::Node::complete(uint64_t seq, Batch& b, BatchResult&& r, bool from_pipeline) {
  mark_progress(counters);
  counters.batches.fetch_add(1, std::memory_order_relaxed);
  counters.discarded_bytes.fetch_add(r.discarded_bytes, std::memory_order_relaxed);
  counters.skipped_bytes.fetch_add(r.skipped_bytes, std::memory_order_relaxed);
  uint64_t failures = 0;
  for (const auto& rr : r.ranges) failures += rr.outcome.skip == SkipReason::Failed ? 1 : 0;
  if (failures != 0) counters.failures.fetch_add(failures, std::memory_order_relaxed);
  call_done(b, std::move(r));
  // Counted as done only after the callback returned, so that drain() means
  // "every callback has run".
  std::lock_guard lk(mu);
  in_flight.erase(seq);
  counters.queued.fetch_sub(1, std::memory_order_relaxed);
  if (from_pipeline) {
    --in_pipeline;
    cv.notify_all();  // a source waiting for work may have to end the run
  }
  done_cv.notify_all();
}

// One pipeline run: it lasts while the node has work. The source takes
// batches from the node's queue itself, one at a time, so a batch submitted
// while others are being discarded starts as soon as a thread is free,
// instead of waiting until every batch of a snapshot is done (with guests
// that keep one request in flight, as Linux does, that barrier left a thread
// idle at the end of every snapshot while the next requests sat queued).
// With the queue empty and batches still running, the source waits for the
// next submit: the thread running it has nothing else to do (max_tokens <=
// threads, so no taken batch waits for a thread meanwhile). With nothing
// running either, the run ends and the dispatcher waits for work.
void NodePipelines::Node::run_pipeline() {
  // Stable addresses: the deque only grows at the back, by the serial source.
  std::deque<Work> work;
  try {
    arena->execute([&] {
      tbb::parallel_pipeline(
          static_cast<size_t>(max_tokens),
          tbb::make_filter<void, Work*>(
              tbb::filter_mode::serial_in_order,
              [&](tbb::flow_control& fc) -> Work* {
                std::unique_lock lk(mu);
                if (work.size() >= kMaxBatchesPerRun) {
                  fc.stop();
                  return nullptr;
                }
                cv.wait(lk, [&] {
                  return stopping || !queue.empty() || in_pipeline == 0 || in_pipeline >= threads;
                });
                if (queue.empty() || stopping) {
                  fc.stop();  // stop() completes whatever is queued itself
                  return nullptr;
                }
                Work& w = work.emplace_back();
                w.seq = queue.front().first;
                w.batch = std::move(queue.front().second);
                queue.pop_front();
                ++in_pipeline;
                lk.unlock();
                mark_progress(counters);
                w.memory = read_memory();
                return &w;
              }) &
              tbb::make_filter<Work*, Work*>(tbb::filter_mode::parallel,
                                             [&](Work* w) {
                                               process(*w);
                                               return w;
                                             }) &
              tbb::make_filter<Work*, void>(tbb::filter_mode::serial_out_of_order,
                                            [&](Work* w) {
                                              w->completed = true;
                                              complete(w->seq, w->batch, std::move(w->result), true);
                                              w->batch = Batch{};  // drop the callback's captures now
                                            }));
    });
  } catch (const std::exception& e) {
    log::error("reclaim", "node {} pipeline failed: {}", index, e.what());
  } catch (...) {
    log::error("reclaim", "node {} pipeline failed", index);
  }
  // Stages catch everything, so this only runs if TBB itself failed: the
  // batches still owed a completion get one, with nothing claimed discarded.
  for (auto& w : work) {
    if (!w.completed) {
      w.completed = true;
      complete(w.seq, w.batch, skipped_result(w.batch, SkipReason::Failed), true);
    }
  }
}

void NodePipelines::Node::run() {
  const std::string name = "fph-reclaim-" + std::to_string(index);
  pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
  for (;;) {
    {
      std::unique_lock lk(mu);
      cv.wait(lk, [&] { return stopping || !queue.empty(); });
      // stop() completes whatever is queued itself, under this lock.
      if (queue.empty()) return;
    }
    run_pipeline();
  }
}

NodePipelines::NodePipelines(const Topology& topo, Discarder& discarder, PolicyTable& policy,
                             NodeMemoryProbe& probe, PipelineOptions opts) {
  // NUMA-bound arenas only when the topology is this machine's and TBB's hwloc
  // binding (tbbbind) sees more than one node; otherwise the numa ids would
  // not match the topology's os indexes.
  std::vector<tbb::numa_node_id> tbb_nodes;
  // tbb::info::numa_nodes() loads tbbbind with RTLD_DEEPBIND, which the
  // sanitizer runtimes refuse (google/sanitizers#611): single-node hosts
  // and sanitized builds never need it.
#if defined(__SANITIZE_ADDRESS__)
  constexpr bool kMayLoadTbbbind = false;
#else
  constexpr bool kMayLoadTbbbind = true;
#endif
  if (kMayLoadTbbbind && !topo.is_synthetic() && topo.node_count() > 1) {
    try {
      tbb_nodes = tbb::info::numa_nodes();
    } catch (...) {
    }
    if (tbb_nodes.size() < 2) tbb_nodes.clear();
  }
  for (const auto& info : topo.nodes()) {
    auto n = std::make_unique<Node>(info, discarder, policy, probe, opts);
    const int threads = opts.threads_per_node > 0
                            ? opts.threads_per_node
                            : std::max(1, static_cast<int>(info.cpus.size()));
    // One token per thread: a batch is one unit of work from source to sink,
    // and the source may wait for work only while a thread is spare.
    n->max_tokens = opts.max_tokens_per_node > 0 ? opts.max_tokens_per_node : threads;
    n->threads = threads;
    if (std::find(tbb_nodes.begin(), tbb_nodes.end(), info.os_index) != tbb_nodes.end()) {
      tbb::task_arena::constraints c;
      c.set_numa_id(info.os_index);
      c.set_max_concurrency(threads);
      n->arena.emplace(c);
    } else {
      n->arena.emplace(threads);
    }
    log::debug("reclaim", "node {} (os {}): {} threads, {} tokens, {}", info.index, info.os_index,
               threads, n->max_tokens, tbb_nodes.empty() ? "unbound arena" : "numa arena");
    nodes_.push_back(std::move(n));
  }
  for (auto& n : nodes_) n->dispatcher = std::thread([node = n.get()] { node->run(); });
}

NodePipelines::~NodePipelines() { stop(); }

void NodePipelines::submit(Batch b) {
  if (b.node < 0 || b.node >= node_count()) {
    BatchResult r = skipped_result(b, SkipReason::Unsupported);
    call_done(b, std::move(r));
    return;
  }
  Node& n = *nodes_[static_cast<size_t>(b.node)];
  {
    std::lock_guard lk(n.mu);
    if (!n.stopping) {
      const uint64_t seq = n.next_seq++;
      n.in_flight.insert(seq);
      // An idle node's stall clock starts with its first batch.
      if (n.counters.queued.fetch_add(1, std::memory_order_relaxed) == 0) mark_progress(n.counters);
      n.queue.emplace_back(seq, std::move(b));
      n.cv.notify_one();
      return;
    }
  }
  // Submitted after stop(): completed at once, never silently dropped.
  BatchResult r = skipped_result(b, SkipReason::Cancelled);
  call_done(b, std::move(r));
}

bool NodePipelines::try_run_inline(Batch& b) {
  if (b.node < 0 || b.node >= node_count()) return false;
  Node& n = *nodes_[static_cast<size_t>(b.node)];
  if (n.opts.inline_budget.count() <= 0 || n.stop_flag.load(std::memory_order_acquire)) return false;
  const auto cost = n.estimate(b);
  if (!cost || *cost > n.opts.inline_budget) return false;
  // A rate-limited node may make a range wait: never on a session thread.
  if (n.policy.get(n.index).rate_limit_bytes_per_sec != 0) return false;
  uint64_t seq;
  {
    std::lock_guard lk(n.mu);
    if (n.stopping) return false;
    seq = n.next_seq++;
    n.in_flight.insert(seq);  // drain() waits for it like any batch
    if (n.counters.queued.fetch_add(1, std::memory_order_relaxed) == 0) mark_progress(n.counters);
  }
  Node::Work w;
  w.seq = seq;
  w.batch = std::move(b);
  b = Batch{};
  w.memory = n.read_memory();
  n.process(w);
  n.counters.inline_batches.fetch_add(1, std::memory_order_relaxed);
  n.complete(seq, w.batch, std::move(w.result));
  return true;
}

void NodePipelines::drain() {
  for (auto& n : nodes_) {
    std::unique_lock lk(n->mu);
    // Only batches submitted before this call: later ones may keep coming.
    const uint64_t horizon = n->next_seq;
    n->done_cv.wait(lk, [&] { return n->in_flight.empty() || *n->in_flight.begin() >= horizon; });
  }
}

void NodePipelines::stop() {
  for (auto& n : nodes_) {
    std::deque<std::pair<uint64_t, Batch>> queued;
    {
      std::lock_guard lk(n->mu);
      n->stopping = true;
      n->stop_flag.store(true, std::memory_order_release);
      queued.swap(n->queue);
      n->cv.notify_all();
    }
    for (auto& [seq, b] : queued) n->complete(seq, b, skipped_result(b, SkipReason::Cancelled));
  }
  for (auto& n : nodes_) {
    if (n->dispatcher.joinable()) n->dispatcher.join();
  }
}

int NodePipelines::node_count() const { return static_cast<int>(nodes_.size()); }

std::optional<std::string> NodePipelines::stalled(std::chrono::nanoseconds limit,
                                                  Clock::time_point now) const {
  for (const auto& n : nodes_) {
    const uint64_t queued = n->counters.queued.load(std::memory_order_relaxed);
    if (queued == 0) continue;
    const Clock::time_point last{std::chrono::duration_cast<Clock::duration>(
        std::chrono::nanoseconds(n->counters.progress_ns.load(std::memory_order_relaxed)))};
    const auto idle = now - last;
    if (idle > limit) {
      return "node " + std::to_string(n->index) + ": " + std::to_string(queued) +
             " batch(es) queued or running, no progress for " +
             std::to_string(std::chrono::duration_cast<std::chrono::seconds>(idle).count()) + " s";
    }
  }
  return std::nullopt;
}

const NodeCounters& NodePipelines::counters(int node) const {
  if (node < 0 || node >= node_count()) {
    static const NodeCounters kNone;  // out of range: always zero
    return kNone;
  }
  return nodes_[static_cast<size_t>(node)]->counters;
}

}  // namespace fph::reclaim
