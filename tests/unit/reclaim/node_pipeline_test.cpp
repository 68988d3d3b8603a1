// NodePipelines on a synthetic four-node topology. Scheduling tests use a
// recording discarder (STYLE pattern 12); one test runs the real discarder on
// memfds and checks st_blocks. No wall-clock thresholds: every wait is on an
// event.
#include "fph/reclaim/node_pipeline.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "test_memory.h"

namespace fph::reclaim {
namespace {

using test::kMiB;
using test::kPage;

// Records every discard; optionally blocks in discard() until released, so
// tests can hold a batch "running".
class RecordingDiscarder final : public Discarder {
 public:
  struct Call {
    DiscardTarget target;
    Method method;
  };

  DiscardOutcome discard(const DiscardTarget& t, Method m) override {
    std::unique_lock lk(mu_);
    calls_.push_back({t, m});
    ++entered_;
    cv_.notify_all();
    cv_.wait(lk, [&] { return !gated_; });
    DiscardOutcome o;
    o.method = m;
    o.discarded_bytes = t.length;
    o.syscalls = 1;
    return o;
  }

  void close_gate() {
    std::lock_guard lk(mu_);
    gated_ = true;
  }
  void open_gate() {
    std::lock_guard lk(mu_);
    gated_ = false;
    cv_.notify_all();
  }
  void wait_entered(size_t n) {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return entered_ >= n; });
  }
  std::vector<Call> calls() const {
    std::lock_guard lk(mu_);
    return calls_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Call> calls_;
  size_t entered_ = 0;
  bool gated_ = false;
};

// Test double for the memory probe: fixed answers per OS node, counts reads.
class FakeProbe final : public NodeMemoryProbe {
 public:
  NodeMemory read(int os_node) override {
    std::lock_guard lk(mu_);
    ++reads_[os_node];
    auto it = mem_.find(os_node);
    return it != mem_.end() ? it->second : calm();
  }
  void set(int os_node, NodeMemory m) {
    std::lock_guard lk(mu_);
    mem_[os_node] = m;
  }
  int reads(int os_node) {
    std::lock_guard lk(mu_);
    return reads_[os_node];
  }
  static NodeMemory calm() {
    NodeMemory m;
    m.total_bytes = 1ull << 30;
    m.free_bytes = 1ull << 29;
    m.valid = true;
    return m;
  }
  static NodeMemory pressed() {
    NodeMemory m = calm();
    m.free_bytes = 1ull << 20;
    return m;
  }

 private:
  std::mutex mu_;
  std::map<int, NodeMemory> mem_;
  std::map<int, int> reads_;
};

// Collects completions; every batch is identified by its `id`.
class Completions {
 public:
  std::function<void(BatchResult&&)> callback(int id) {
    return [this, id](BatchResult&& r) {
      std::lock_guard lk(mu_);
      ++count_[id];
      results_[id] = std::move(r);
      ++total_;
      cv_.notify_all();
    };
  }
  void wait_total(int n) {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return total_ >= n; });
  }
  int total() {
    std::lock_guard lk(mu_);
    return total_;
  }
  int count(int id) {
    std::lock_guard lk(mu_);
    return count_[id];
  }
  BatchResult result(int id) {
    std::lock_guard lk(mu_);
    return results_[id];
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int, int> count_;
  std::map<int, BatchResult> results_;
  int total_ = 0;
};

DiscardTarget range(int fd, uint64_t off, uint64_t len, int node = 0,
                    Backing b = Backing::Shmem) {
  DiscardTarget t;
  t.fd = fd;
  t.fd_offset = off;
  t.length = len;
  t.backing = b;
  t.node = node;
  return t;
}

Topology four_nodes() {
  auto t = Topology::from_synthetic("node:4 core:2 pu:1");
  EXPECT_TRUE(t.has_value());
  return std::move(t).value();
}

class Pipelines : public ::testing::Test {
 protected:
  Topology topo_ = four_nodes();
  RecordingDiscarder discarder_;
  PolicyTable policy_{4};
  FakeProbe probe_;
  Completions done_;
};

TEST_F(Pipelines, EveryBatchCompletesExactlyOnceOnItsNode) {
  NodePipelines p(topo_, discarder_, policy_, probe_);
  ASSERT_EQ(p.node_count(), 4);
  std::mt19937 rng(42);
  constexpr int kBatches = 400;
  uint64_t bytes_per_node[4] = {};
  for (int i = 0; i < kBatches; ++i) {
    const int node = static_cast<int>(rng() % 4);
    Batch b;
    b.node = node;
    const int n = 1 + static_cast<int>(rng() % 8);
    for (int r = 0; r < n; ++r) {
      // Distinct fds per range: nothing coalesces, so calls == ranges.
      b.ranges.push_back(range(1000 + r, (rng() % 64) * kPage, kPage * (1 + rng() % 4), node));
      bytes_per_node[node] += b.ranges.back().length;
    }
    b.on_done = done_.callback(i);
    p.submit(std::move(b));
  }
  p.drain();
  EXPECT_EQ(done_.total(), kBatches);
  for (int i = 0; i < kBatches; ++i) {
    EXPECT_EQ(done_.count(i), 1) << i;
    const BatchResult r = done_.result(i);
    EXPECT_FALSE(r.cancelled);
    EXPECT_EQ(r.skipped_bytes, 0u);
    for (const auto& rr : r.ranges) EXPECT_EQ(rr.target.node, r.node);
  }
  uint64_t batches = 0;
  for (int node = 0; node < 4; ++node) {
    const NodeCounters& c = p.counters(node);
    EXPECT_EQ(c.discarded_bytes.load(), bytes_per_node[node]) << node;
    EXPECT_EQ(c.skipped_bytes.load(), 0u);
    EXPECT_EQ(c.failures.load(), 0u);
    EXPECT_EQ(c.queued.load(), 0u);
    batches += c.batches.load();
  }
  EXPECT_EQ(batches, static_cast<uint64_t>(kBatches));
  // Each probe read is for a node of this topology (os index 0..3).
  for (int node = 0; node < 4; ++node) EXPECT_GE(probe_.reads(node), bytes_per_node[node] ? 1 : 0);
  EXPECT_EQ(probe_.reads(4), 0);
}

TEST_F(Pipelines, CoalescesAdjacentRangesOnly) {
  NodePipelines p(topo_, discarder_, policy_, probe_);
  Batch b;
  b.node = 2;
  // Out of order but contiguous on fd 7: 0..12K becomes one call.
  b.ranges.push_back(range(7, 2 * kPage, kPage, 2));
  b.ranges.push_back(range(7, 0, kPage, 2));
  b.ranges.push_back(range(7, kPage, kPage, 2));
  // One byte of gap: not adjacent, never merged.
  b.ranges.push_back(range(7, 3 * kPage + 1, kPage, 2));
  // Adjacent offset but another fd.
  b.ranges.push_back(range(8, 3 * kPage, kPage, 2));
  // Adjacent offset, same fd, another backing.
  b.ranges.push_back(range(7, 100 * kPage, kPage, 2, Backing::Hugetlb));
  b.ranges.push_back(range(7, 101 * kPage, kPage, 2));
  b.on_done = done_.callback(0);
  p.submit(std::move(b));
  p.drain();

  const auto calls = discarder_.calls();
  ASSERT_EQ(calls.size(), 5u);
  std::map<std::tuple<int, uint64_t, Backing>, uint64_t> got;
  for (const auto& c : calls) got[{c.target.fd, c.target.fd_offset, c.target.backing}] = c.target.length;
  EXPECT_EQ((got[{7, 0, Backing::Shmem}]), 3 * kPage);
  EXPECT_EQ((got[{7, 3 * kPage + 1, Backing::Shmem}]), kPage);
  EXPECT_EQ((got[{8, 3 * kPage, Backing::Shmem}]), kPage);
  EXPECT_EQ((got[{7, 100 * kPage, Backing::Hugetlb}]), kPage);
  EXPECT_EQ((got[{7, 101 * kPage, Backing::Shmem}]), kPage);

  const BatchResult r = done_.result(0);
  EXPECT_EQ(r.node, 2);
  EXPECT_EQ(r.ranges.size(), 5u);
  EXPECT_EQ(r.discarded_bytes, 7 * kPage);
}

TEST_F(Pipelines, CoalescingNeedsContiguousAddressesTooAndRespectsTheCap) {
  PipelineOptions opts;
  opts.max_coalesced_bytes = 2 * kPage;
  NodePipelines p(topo_, discarder_, policy_, probe_, opts);
  alignas(4096) static uint8_t buf[16 * 4096];
  Batch b;
  b.node = 1;
  for (int i = 0; i < 5; ++i) {
    auto t = range(9, i * kPage, kPage, 1);
    t.addr = buf + i * kPage;
    b.ranges.push_back(t);
  }
  // Contiguous in the file, but mapped elsewhere: not one madvise range.
  auto far = range(9, 5 * kPage, kPage, 1);
  far.addr = buf + 10 * kPage;
  b.ranges.push_back(far);
  b.on_done = done_.callback(0);
  p.submit(std::move(b));
  p.drain();
  std::vector<uint64_t> lengths;
  for (const auto& c : discarder_.calls()) lengths.push_back(c.target.length);
  std::sort(lengths.begin(), lengths.end());
  EXPECT_EQ(lengths, (std::vector<uint64_t>{kPage, kPage, 2 * kPage, 2 * kPage}));
}

TEST_F(Pipelines, HugetlbRangesCoalesceUpToTheirOwnCap) {
  // The shmem cap (16 MiB by default) is about 4 KiB struct pages; huge
  // pages are freed as folios, so hugetlbfs ranges have their own, larger cap.
  constexpr uint64_t kHuge = 2ull << 20;
  PipelineOptions opts;
  opts.max_coalesced_bytes = 4 * kHuge;
  opts.max_coalesced_hugetlb_bytes = 16 * kHuge;
  NodePipelines p(topo_, discarder_, policy_, probe_, opts);
  Batch b;
  b.node = 0;
  for (int i = 0; i < 20; ++i) {
    b.ranges.push_back(range(5, i * kHuge, kHuge, 0, Backing::Hugetlb));
    b.ranges.push_back(range(6, i * kHuge, kHuge, 0, Backing::Shmem));
  }
  b.on_done = done_.callback(0);
  p.submit(std::move(b));
  p.drain();
  std::map<int, std::vector<uint64_t>> lengths;  // by fd
  for (const auto& c : discarder_.calls()) lengths[c.target.fd].push_back(c.target.length);
  for (auto& [fd, v] : lengths) std::sort(v.begin(), v.end());
  EXPECT_EQ(lengths[5], (std::vector<uint64_t>{4 * kHuge, 16 * kHuge}));
  EXPECT_EQ(lengths[6], (std::vector<uint64_t>{4 * kHuge, 4 * kHuge, 4 * kHuge, 4 * kHuge, 4 * kHuge}));
  EXPECT_EQ(done_.result(0).discarded_bytes, 40 * kHuge);
}

TEST_F(Pipelines, CoalescingCanBeTurnedOff) {
  PipelineOptions opts;
  opts.coalesce = false;
  NodePipelines p(topo_, discarder_, policy_, probe_, opts);
  Batch b;
  b.node = 0;
  for (int i = 0; i < 4; ++i) b.ranges.push_back(range(3, i * kPage, kPage));
  b.on_done = done_.callback(0);
  p.submit(std::move(b));
  p.drain();
  EXPECT_EQ(discarder_.calls().size(), 4u);
}

TEST_F(Pipelines, MethodFollowsEachNodesPolicyAndMemory) {
  NodePolicy eager;
  eager.mode = PrivateMode::Eager;
  policy_.set(1, eager);
  NodePolicy lazy;
  lazy.mode = PrivateMode::Lazy;
  policy_.set(2, lazy);
  probe_.set(3, FakeProbe::pressed());  // node 3: Auto under pressure
  NodePipelines p(topo_, discarder_, policy_, probe_);
  for (int node = 0; node < 4; ++node) {
    Batch b;
    b.node = node;
    auto t = range(-1, 0, kPage, node, Backing::PrivateAnon);
    t.addr = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(0x100000 * (node + 1)));
    b.ranges.push_back(t);
    b.ranges.push_back(range(5, node * kPage, kPage, node));  // shmem
    b.on_done = done_.callback(node);
    p.submit(std::move(b));
  }
  p.drain();
  const Method want_anon[4] = {Method::MadvFree, Method::MadvDontneed, Method::MadvFree,
                               Method::MadvDontneed};
  for (int node = 0; node < 4; ++node) {
    const BatchResult r = done_.result(node);
    ASSERT_EQ(r.ranges.size(), 2u);
    for (const auto& rr : r.ranges) {
      const Method want =
          rr.target.backing == Backing::PrivateAnon ? want_anon[node] : Method::PunchHole;
      EXPECT_EQ(rr.outcome.method, want) << "node " << node;
    }
    EXPECT_GE(probe_.reads(node), 1);
  }
}

// A VM's own private-memory mode (Batch::mode, the per-VM policy) wins over
// its node's, for that batch only; shared memory is unaffected.
TEST_F(Pipelines, ABatchsOwnModeOverridesTheNodes) {
  NodePolicy eager;
  eager.mode = PrivateMode::Eager;
  policy_.set(1, eager);
  NodePipelines p(topo_, discarder_, policy_, probe_);
  const std::optional<PrivateMode> modes[3] = {PrivateMode::Lazy, std::nullopt, PrivateMode::Eager};
  for (int i = 0; i < 3; ++i) {
    Batch b;
    b.node = 1;
    b.mode = modes[i];
    auto t = range(-1, 0, kPage, 1, Backing::PrivateAnon);
    t.addr = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(0x100000 * (i + 1)));
    b.ranges.push_back(t);
    b.ranges.push_back(range(5, i * kPage, kPage, 1));  // shmem
    b.on_done = done_.callback(i);
    p.submit(std::move(b));
  }
  p.drain();
  const Method want_anon[3] = {Method::MadvFree, Method::MadvDontneed, Method::MadvDontneed};
  for (int i = 0; i < 3; ++i) {
    const BatchResult r = done_.result(i);
    ASSERT_EQ(r.ranges.size(), 2u);
    for (const auto& rr : r.ranges)
      EXPECT_EQ(rr.outcome.method, rr.target.backing == Backing::PrivateAnon ? want_anon[i] : Method::PunchHole)
          << "batch " << i;
  }
}

TEST_F(Pipelines, CancelledBatchIsNotDiscarded) {
  NodePipelines p(topo_, discarder_, policy_, probe_);
  Batch b;
  b.node = 3;
  b.ranges = {range(4, 0, kPage, 3), range(4, 8 * kPage, 2 * kPage, 3)};
  b.cancel = std::make_shared<std::atomic<bool>>(true);
  b.on_done = done_.callback(0);
  p.submit(std::move(b));
  p.drain();
  EXPECT_TRUE(discarder_.calls().empty());
  const BatchResult r = done_.result(0);
  EXPECT_TRUE(r.cancelled);
  EXPECT_EQ(r.discarded_bytes, 0u);
  EXPECT_EQ(r.skipped_bytes, 3 * kPage);
  for (const auto& rr : r.ranges) EXPECT_EQ(rr.outcome.skip, SkipReason::Cancelled);
  EXPECT_EQ(done_.count(0), 1);
}

TEST_F(Pipelines, CancelTokenSetWhileQueuedIsHonoured) {
  PipelineOptions opts;
  opts.threads_per_node = 1;
  opts.max_tokens_per_node = 1;
  NodePipelines p(topo_, discarder_, policy_, probe_, opts);
  discarder_.close_gate();
  Batch first;
  first.node = 0;
  first.ranges = {range(4, 0, kPage)};
  first.on_done = done_.callback(0);
  p.submit(std::move(first));
  discarder_.wait_entered(1);  // node 0 is busy with `first`

  auto token = std::make_shared<std::atomic<bool>>(false);
  Batch second;
  second.node = 0;
  second.ranges = {range(4, 4 * kPage, kPage)};
  second.cancel = token;
  second.on_done = done_.callback(1);
  p.submit(std::move(second));
  token->store(true);  // session torn down while the batch waits
  discarder_.open_gate();
  p.drain();
  EXPECT_FALSE(done_.result(0).cancelled);
  EXPECT_TRUE(done_.result(1).cancelled);
  EXPECT_EQ(discarder_.calls().size(), 1u);
}

TEST_F(Pipelines, StopCompletesQueuedBatchesAsCancelledAndFinishesRunningOnes) {
  PipelineOptions opts;
  opts.threads_per_node = 1;
  opts.max_tokens_per_node = 1;
  NodePipelines p(topo_, discarder_, policy_, probe_, opts);
  discarder_.close_gate();
  Batch running;
  running.node = 1;
  running.ranges = {range(4, 0, kPage, 1)};
  running.on_done = done_.callback(0);
  p.submit(std::move(running));
  discarder_.wait_entered(1);
  for (int i = 1; i <= 5; ++i) {
    Batch b;
    b.node = 1;
    b.ranges = {range(4, i * 16 * kPage, kPage, 1)};
    b.on_done = done_.callback(i);
    p.submit(std::move(b));
  }
  std::thread stopper([&] { p.stop(); });
  done_.wait_total(5);  // the queued ones complete while the running one still runs
  EXPECT_EQ(done_.count(0), 0);
  discarder_.open_gate();
  stopper.join();

  EXPECT_EQ(done_.count(0), 1);
  EXPECT_FALSE(done_.result(0).cancelled);
  EXPECT_EQ(done_.result(0).discarded_bytes, kPage);
  for (int i = 1; i <= 5; ++i) {
    EXPECT_EQ(done_.count(i), 1);
    EXPECT_TRUE(done_.result(i).cancelled);
    EXPECT_EQ(done_.result(i).skipped_bytes, kPage);
  }
  EXPECT_EQ(discarder_.calls().size(), 1u);

  // After stop: completed at once, as cancelled.
  Batch late;
  late.node = 2;
  late.ranges = {range(4, 0, kPage, 2)};
  late.on_done = done_.callback(99);
  p.submit(std::move(late));
  EXPECT_EQ(done_.count(99), 1);
  EXPECT_TRUE(done_.result(99).cancelled);
  p.stop();  // idempotent
}

TEST_F(Pipelines, DestructorStopsWithWorkQueued) {
  {
    PipelineOptions opts;
    opts.threads_per_node = 1;
    opts.max_tokens_per_node = 1;
    NodePipelines p(topo_, discarder_, policy_, probe_, opts);
    for (int i = 0; i < 50; ++i) {
      Batch b;
      b.node = i % 4;
      b.ranges = {range(4, i * kPage, kPage, i % 4)};
      b.on_done = done_.callback(i);
      p.submit(std::move(b));
    }
  }
  EXPECT_EQ(done_.total(), 50);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(done_.count(i), 1) << i;
}

TEST_F(Pipelines, DrainWaitsForRunningBatches) {
  NodePipelines p(topo_, discarder_, policy_, probe_);
  discarder_.close_gate();
  Batch b;
  b.node = 2;
  b.ranges = {range(4, 0, kPage, 2)};
  b.on_done = done_.callback(0);
  p.submit(std::move(b));
  discarder_.wait_entered(1);
  std::atomic<bool> drained{false};
  std::thread drainer([&] {
    p.drain();
    drained = true;
  });
  // Whatever the scheduling, drain cannot have returned: the batch is blocked.
  std::this_thread::yield();
  EXPECT_FALSE(drained.load());
  EXPECT_EQ(done_.count(0), 0);
  discarder_.open_gate();
  drainer.join();
  EXPECT_TRUE(drained.load());
  EXPECT_EQ(done_.count(0), 1);
  EXPECT_EQ(p.counters(2).queued.load(), 0u);
}

// The watchdog's health check: a node with work whose discard does not
// return is named once its last sign of life is older than the limit; idle
// nodes never are. (Time is passed in: nothing here waits for it.)
TEST_F(Pipelines, StalledNamesANodeWhoseDiscardDoesNotReturn) {
  using std::chrono::seconds;
  NodePipelines p(topo_, discarder_, policy_, probe_);
  const auto far = std::chrono::steady_clock::now() + std::chrono::hours(1);
  EXPECT_EQ(p.stalled(seconds(120), far), std::nullopt);  // idle: never stalled
  discarder_.close_gate();
  Batch b;
  b.node = 1;
  b.ranges = {range(4, 0, kPage, 1)};
  b.on_done = done_.callback(0);
  p.submit(std::move(b));
  discarder_.wait_entered(1);  // inside discard(), which does not return
  const auto now = std::chrono::steady_clock::now();
  EXPECT_EQ(p.stalled(seconds(120), now), std::nullopt);  // it just moved
  auto s = p.stalled(seconds(120), now + seconds(121));
  ASSERT_TRUE(s.has_value());
  EXPECT_NE(s->find("node 1:"), std::string::npos) << *s;
  EXPECT_NE(s->find("1 batch(es)"), std::string::npos) << *s;
  discarder_.open_gate();
  p.drain();
  EXPECT_EQ(p.stalled(seconds(120), far), std::nullopt);  // done: idle again
}

TEST_F(Pipelines, OutOfRangeNodeCompletesAtOnceAsUnsupported) {
  NodePipelines p(topo_, discarder_, policy_, probe_);
  for (const int node : {4, -1, 1000}) {
    Batch b;
    b.node = node;
    b.ranges = {range(4, 0, kPage, node), range(4, 4 * kPage, 2 * kPage, node)};
    b.on_done = done_.callback(node);
    p.submit(std::move(b));
    // Synchronous: done before submit returned.
    ASSERT_EQ(done_.count(node), 1);
    const BatchResult r = done_.result(node);
    EXPECT_EQ(r.node, node);
    EXPECT_FALSE(r.cancelled);
    EXPECT_EQ(r.discarded_bytes, 0u);
    EXPECT_EQ(r.skipped_bytes, 3 * kPage);
    for (const auto& rr : r.ranges) EXPECT_EQ(rr.outcome.skip, SkipReason::Unsupported);
  }
  EXPECT_TRUE(discarder_.calls().empty());
}

TEST_F(Pipelines, ThrowingCallbackDoesNotLoseOtherBatches) {
  NodePipelines p(topo_, discarder_, policy_, probe_);
  std::atomic<int> calls{0};
  for (int i = 0; i < 20; ++i) {
    Batch b;
    b.node = 0;
    b.ranges = {range(4, i * 2 * kPage, kPage)};
    if (i % 2 == 0) {
      b.on_done = [&](BatchResult&&) {
        ++calls;
        throw std::runtime_error("callback failure");
      };
    } else {
      b.on_done = done_.callback(i);
    }
    p.submit(std::move(b));
  }
  p.drain();
  EXPECT_EQ(calls.load(), 10);
  EXPECT_EQ(done_.total(), 10);
  EXPECT_EQ(p.counters(0).batches.load(), 20u);
}

TEST_F(Pipelines, RateLimitedWaitIsAbandonedOnStop) {
  NodePolicy slow;
  slow.rate_limit_bytes_per_sec = 1;  // the second range would wait ~an hour
  policy_.set(0, slow);
  PipelineOptions opts;
  opts.coalesce = false;
  NodePipelines p(topo_, discarder_, policy_, probe_, opts);
  Batch b;
  b.node = 0;
  b.ranges = {range(4, 0, kPage), range(4, 2 * kPage, kPage)};
  b.on_done = done_.callback(0);
  p.submit(std::move(b));
  discarder_.wait_entered(1);
  p.stop();
  ASSERT_EQ(done_.count(0), 1);
  const BatchResult r = done_.result(0);
  EXPECT_FALSE(r.cancelled);  // part of it ran
  EXPECT_EQ(r.discarded_bytes, kPage);
  EXPECT_EQ(r.skipped_bytes, kPage);
  ASSERT_EQ(r.ranges.size(), 2u);
  EXPECT_EQ(r.ranges[1].outcome.skip, SkipReason::Cancelled);
  EXPECT_EQ(discarder_.calls().size(), 1u);
}

TEST_F(Pipelines, GenerousRateLimitStillCompletes) {
  NodePolicy fast;
  fast.rate_limit_bytes_per_sec = 1ull << 40;
  for (int n = 0; n < 4; ++n) policy_.set(n, fast);
  NodePipelines p(topo_, discarder_, policy_, probe_);
  for (int i = 0; i < 40; ++i) {
    Batch b;
    b.node = i % 4;
    b.ranges = {range(4, i * 2 * kPage, kPage, i % 4)};
    b.on_done = done_.callback(i);
    p.submit(std::move(b));
  }
  p.drain();
  EXPECT_EQ(done_.total(), 40);
}

// The inline path (try_run_inline): a batch of a backing whose cost the node
// has not measured yet goes to the pipeline; once measured, a batch within the
// budget runs on the calling thread and completes before the call returns,
// counted like any batch (drain() included); beyond the budget, with the
// budget off, under a rate limit or after stop() it is left to submit().
// Budgets are 0, 1 ns or an hour, so no test depends on how fast anything runs.
TEST_F(Pipelines, CheapBatchesRunInlineOnceTheirCostIsKnown) {
  PipelineOptions opts;
  opts.inline_budget = std::chrono::hours(1);
  NodePipelines p(topo_, discarder_, policy_, probe_, opts);
  auto batch = [&](int id, uint64_t off) {
    Batch b;
    b.node = 1;
    b.ranges = {range(7, off, 4 * kPage, 1)};
    b.on_done = done_.callback(id);
    return b;
  };
  Batch first = batch(0, 0);
  EXPECT_FALSE(p.try_run_inline(first)) << "no cost measured yet";
  ASSERT_TRUE(first.on_done) << "a refused batch is left untouched";
  p.submit(std::move(first));
  p.drain();
  ASSERT_EQ(done_.count(0), 1);

  const auto caller = std::this_thread::get_id();
  std::thread::id ran_on;
  Batch second = batch(1, 64 * kPage);
  auto record = std::move(second.on_done);
  second.on_done = [&, record](BatchResult&& r) {
    ran_on = std::this_thread::get_id();
    record(std::move(r));
  };
  ASSERT_TRUE(p.try_run_inline(second));
  EXPECT_EQ(done_.count(1), 1) << "completed before try_run_inline returned";
  EXPECT_EQ(ran_on, caller);
  EXPECT_EQ(done_.result(1).discarded_bytes, 4 * kPage);
  p.drain();
  const NodeCounters& c = p.counters(1);
  EXPECT_EQ(c.batches.load(), 2u);
  EXPECT_EQ(c.inline_batches.load(), 1u);
  EXPECT_EQ(c.discarded_bytes.load(), 8 * kPage);
  EXPECT_EQ(c.queued.load(), 0u);
  // The other backings' costs are still unknown.
  Batch huge = batch(2, 128 * kPage);
  huge.ranges[0].backing = Backing::Hugetlb;
  EXPECT_FALSE(p.try_run_inline(huge));
}

TEST_F(Pipelines, BatchesStayOnThePipelineWhenExpensiveRateLimitedDisabledOrStopped) {
  auto measured = [&](NodePipelines& p) {
    Batch b;
    b.node = 0;
    b.ranges = {range(7, 0, kPage, 0)};
    b.on_done = done_.callback(100);
    p.submit(std::move(b));
    p.drain();
  };
  auto big = [&] {
    Batch b;
    b.node = 0;
    b.ranges = {range(7, 0, 1ull << 30, 0)};
    b.on_done = done_.callback(0);
    return b;
  };
  {
    PipelineOptions opts;
    opts.inline_budget = std::chrono::nanoseconds(1);  // 1 GiB at >= 1 ps/byte is 1 ms
    NodePipelines p(topo_, discarder_, policy_, probe_, opts);
    measured(p);
    Batch b = big();
    EXPECT_FALSE(p.try_run_inline(b));
  }
  {
    PipelineOptions opts;
    opts.inline_budget = std::chrono::nanoseconds(0);
    NodePipelines p(topo_, discarder_, policy_, probe_, opts);
    measured(p);
    Batch b = big();
    EXPECT_FALSE(p.try_run_inline(b));
  }
  {
    PipelineOptions opts;
    opts.inline_budget = std::chrono::hours(1);
    NodePipelines p(topo_, discarder_, policy_, probe_, opts);
    measured(p);
    NodePolicy slow;
    slow.rate_limit_bytes_per_sec = 1ull << 40;
    policy_.set(0, slow);
    Batch b = big();
    EXPECT_FALSE(p.try_run_inline(b)) << "a rate limit may wait: never on the caller's thread";
    policy_.set(0, NodePolicy{});
    EXPECT_TRUE(p.try_run_inline(b));
    p.stop();
    Batch c = big();
    EXPECT_FALSE(p.try_run_inline(c));
  }
  EXPECT_EQ(done_.count(0), 1);  // only the one that ran inline
}

// The real thing: punch holes in memfds through the pipelines and check that
// the kernel really let go of the blocks.
TEST(PipelinesReal, PunchHolesThroughPipelinesDropStBlocks) {
  auto topo = Topology::from_synthetic("node:2 core:1 pu:1");
  ASSERT_TRUE(topo.has_value());
  SyscallDiscarder discarder;
  PolicyTable policy(2);
  SysfsNodeMemoryProbe probe;
  NodePipelines p(*topo, discarder, policy, probe);

  test::SharedMemfd a(8 * kMiB), b(8 * kMiB);
  const int64_t a0 = allocated_bytes(a.fd());
  const int64_t b0 = allocated_bytes(b.fd());
  ASSERT_GE(a0, static_cast<int64_t>(8 * kMiB));
  Completions done;
  // Node 0: memfd a, 2 MiB as 512 adjacent pages (coalesced) plus a
  // misaligned range that must be skipped.
  Batch ba;
  ba.node = 0;
  for (uint64_t off = 2 * kMiB; off < 4 * kMiB; off += kPage) {
    ba.ranges.push_back(range(a.fd(), off, kPage, 0));
  }
  ba.ranges.push_back(range(a.fd(), 6 * kMiB + 1, kPage, 0));
  ba.on_done = done.callback(0);
  // Node 1: memfd b, two 1 MiB holes.
  Batch bb;
  bb.node = 1;
  bb.ranges = {range(b.fd(), 0, kMiB, 1), range(b.fd(), 4 * kMiB, kMiB, 1)};
  bb.on_done = done.callback(1);
  p.submit(std::move(ba));
  p.submit(std::move(bb));
  p.drain();

  const BatchResult ra = done.result(0);
  EXPECT_EQ(ra.discarded_bytes, 2 * kMiB);
  EXPECT_EQ(ra.skipped_bytes, kPage);
  EXPECT_EQ(ra.ranges.size(), 2u);  // 512 pages became one syscall
  EXPECT_EQ(allocated_bytes(a.fd()), a0 - static_cast<int64_t>(2 * kMiB));
  EXPECT_EQ(test::first_pattern_mismatch(a.data(), 0, 2 * kMiB), 2 * kMiB);
  EXPECT_EQ(test::first_nonzero(a.data(), 2 * kMiB, 4 * kMiB), 4 * kMiB);
  EXPECT_EQ(test::first_pattern_mismatch(a.data(), 4 * kMiB, 8 * kMiB), 8 * kMiB);

  const BatchResult rb = done.result(1);
  EXPECT_EQ(rb.discarded_bytes, 2 * kMiB);
  EXPECT_EQ(allocated_bytes(b.fd()), b0 - static_cast<int64_t>(2 * kMiB));
  EXPECT_EQ(p.counters(0).discarded_bytes.load(), 2 * kMiB);
  EXPECT_EQ(p.counters(0).skipped_bytes.load(), kPage);
  EXPECT_EQ(p.counters(1).discarded_bytes.load(), 2 * kMiB);
}

// The inline path frees real memory too (budget an hour: node 0's shmem cost
// was measured by the first batch).
TEST(PipelinesReal, InlineBatchesPunchRealHoles) {
  auto topo = Topology::from_synthetic("node:1 core:1 pu:1");
  ASSERT_TRUE(topo.has_value());
  SyscallDiscarder discarder;
  PolicyTable policy(1);
  SysfsNodeMemoryProbe probe;
  PipelineOptions opts;
  opts.inline_budget = std::chrono::hours(1);
  NodePipelines p(*topo, discarder, policy, probe, opts);
  test::SharedMemfd a(8 * kMiB);
  const int64_t a0 = allocated_bytes(a.fd());
  Completions done;
  Batch first;
  first.node = 0;
  first.ranges = {range(a.fd(), 0, kMiB, 0)};
  first.on_done = done.callback(0);
  p.submit(std::move(first));
  p.drain();
  Batch second;
  second.node = 0;
  second.ranges = {range(a.fd(), 4 * kMiB, 2 * kMiB, 0)};
  second.on_done = done.callback(1);
  ASSERT_TRUE(p.try_run_inline(second));
  EXPECT_EQ(done.result(1).discarded_bytes, 2 * kMiB);
  EXPECT_EQ(allocated_bytes(a.fd()), a0 - static_cast<int64_t>(3 * kMiB));
  EXPECT_EQ(test::first_nonzero(a.data(), 4 * kMiB, 6 * kMiB), 6 * kMiB);
  EXPECT_EQ(test::first_pattern_mismatch(a.data(), 6 * kMiB, 8 * kMiB), 8 * kMiB);
  EXPECT_EQ(p.counters(0).inline_batches.load(), 1u);
}

}  // namespace
}  // namespace fph::reclaim
