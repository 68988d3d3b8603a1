// The sampler thread: every `interval` it refreshes what is sampled rather
// than counted on the data path (docs/metrics.md):
//   - the node view (NodeCollector),
//   - per VM: resident bytes (allocated blocks of its region files), the
//     reclaim state and feature bits, and refaulted bytes (RefaultTracker),
//     and the headroom from the latest guest stats (stats_service.h).
// It takes each session's lock only to copy its info and table pointer.
// A VM that takes no requests is visited every kIdleSampleInterval (10 s)
// instead of every interval: on a host of many idle VMs the per-VM work was
// most of fphd's idle CPU.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "fph/daemon/heap_trim.h"
#include "fph/daemon/metrics.h"
#include "fph/daemon/node_collector.h"
#include "fph/daemon/session.h"

namespace fph::daemon {

struct ReclaimStatus {
  std::optional<ReclaimState> state;  // empty: still negotiating / setting up
  std::optional<DisabledReason> reason;
};

// Largest backing page a reported block can cover: Linux reports order
// page_reporting_order = pageblock_order (9) blocks, 2 MiB with 4 KiB pages.
inline constexpr uint64_t kReportBlockBytes = 2ull << 20;

// The reclaim state of a VM, a pure function (unit tested):
//   disabled   poison (PAGE_POISON with a non-zero poison_val), no_reporting
//              (features acked without FREE_PAGE_REPORTING), misaligned_backing
//              (a backing page larger than a reported block, or reports arriving
//              whose bytes are all skipped as misaligned and none discarded);
//   paused     reclaim paused for the VM;
//   active     the reporting ring is started and enabled;
//   migrating  the ring was started and the front end stopped or disabled it
//              (GET_VRING_BASE / SET_VRING_ENABLE 0: what a VMM does to migrate,
//              and also to stop the VM);
//   none       features not negotiated yet, or rings not set up yet.
ReclaimStatus reclaim_status(const SessionInfo& info, uint64_t misaligned_bytes,
                             uint64_t discarded_bytes);

// Bytes the kernel holds for the regions of a table (st_blocks of each
// distinct backing file; regions sharing a file count it once).
uint64_t table_resident_bytes(const MemoryTable& t);

class Sampler {
 public:
  using Source = std::function<std::vector<std::shared_ptr<Session>>()>;
  Sampler(Metrics& metrics, NodeCollector* nodes, std::chrono::milliseconds interval)
      : metrics_(metrics), nodes_(nodes), interval_(interval) {}
  ~Sampler() { stop(); }
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  void start(Source source);
  void stop();
  // One pass over every session, on the caller's thread (tests).
  void sample_once(const std::vector<std::shared_ptr<Session>>& sessions);
  // What the thread does every interval: the node view, and the sessions
  // that took requests since their last visit, are in refault backoff, or
  // were last visited kIdleSampleInterval ago. Returns the sessions visited.
  size_t sample_due(const std::vector<std::shared_ptr<Session>>& sessions,
                    std::chrono::steady_clock::time_point now);

 private:
  Metrics& metrics_;
  NodeCollector* nodes_;
  HeapTrim heap_trim_;  // used by the sampler thread only
  std::chrono::milliseconds interval_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

void sample_session(Session& s);

// How often the sampler visits a VM that takes no requests (sampler.cpp).
inline constexpr std::chrono::seconds kIdleSampleInterval{10};

}  // namespace fph::daemon
