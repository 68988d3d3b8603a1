// One VM: one vhost-user connection, served by its own thread.
//
// The session owns the protocol state (features, memory table, rings,
// config, status) and runs the control loop: it polls the socket and the
// kick eventfds, answers messages and hands kicked queues to the queue
// service. Reporting requests complete on pipeline threads, which return the
// chain to the used ring under the session's own lock: no lock is shared
// between VMs.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "fph/common/expected.h"
#include "fph/common/log.h"
#include "fph/common/unique_fd.h"
#include "fph/daemon/backend_channel.h"
#include "fph/daemon/balloon_targets.h"
#include "fph/daemon/dirty_log.h"
#include "fph/daemon/guest_memory.h"
#include "fph/daemon/metrics.h"
#include "fph/daemon/refault_backoff.h"
#include "fph/daemon/refault_sampler.h"
#include "fph/daemon/state_transfer.h"
#include "fph/daemon/stats_service.h"
#include "fph/daemon/vm_policy.h"
#include "fph/daemon/vring.h"
#include "fph/proto/balloon.h"
#include "fph/proto/channel.h"
#include "fph/reclaim/node_pipeline.h"
#include "fph/reclaim/topology.h"

namespace fph::daemon {

// What all sessions share. Everything here is thread safe.
struct DaemonContext {
  const reclaim::Topology& topology;
  reclaim::NodePipelines& pipelines;
  Metrics& metrics;
  // How often the stats queue is asked for fresh stats; 0 = STATS_VQ is not
  // offered (config daemon.stats_interval_seconds, --stats-interval).
  std::chrono::milliseconds stats_interval{std::chrono::seconds(5)};
  // While the VMM migrates a VM (dirty logging on): keep discarding and log
  // the discarded pages (true), or hold discards until logging ends (false).
  // The default for new sessions; admin `set-migration-policy` per VM.
  bool discard_while_logging = true;
  // A device-state transfer the front end does not finish within this is
  // abandoned (CHECK_DEVICE_STATE then reports the failure).
  std::chrono::milliseconds state_transfer_timeout{std::chrono::seconds(10)};
  // Balloon targets by VM name (admin set-balloon), restored when a VM of
  // that name connects; null: not kept.
  BalloonTargets* balloon_targets = nullptr;
  // Per-VM policy (vm_policy.h), resolved when a VM connects and applied
  // again on reload and admin changes; null: node policy only.
  VmPolicyTable* vm_policy = nullptr;
  // Sessions alive now (the stats queue's spacing, stats_interval()).
  std::atomic<int> live_sessions{0};
};

// The stats queue asks each VM for its stats at most every `stats_interval`
// and fphd as a whole at most once per kStatsSpacing on average: with many
// VMs the interval stretches (250 VMs: 5 s; 1024 VMs: 20.5 s), so the idle
// cost of the stats queue stays bounded (~50 exchanges/s at ~40 us of
// session-thread CPU each, two wakeups: 0.2% of a core) whatever the VM
// count. Prometheus scrapes every 15-30 s, so fresher stats would mostly go
// unread (docs/metrics.md, "What the guest says").
inline constexpr std::chrono::milliseconds kStatsSpacing{20};
std::chrono::milliseconds stats_interval(const DaemonContext& ctx);

// Features fphd offers (reference 1.1, 4.4). EVENT_IDX is not offered (we
// do not publish avail_event). LOG_ALL with LOG_SHMFD is what QEMU needs to
// migrate a VM whose device fphd serves (without them it adds a migration
// blocker): fphd then marks every guest page it changes in the dirty log.
inline constexpr uint64_t kOfferedFeatures =
    proto::balloon::kFVersion1 | proto::balloon::kFIndirectDesc | proto::balloon::kFPagePoison |
    proto::balloon::kFReporting | proto::vu::feature::kProtocolFeatures |
    proto::vu::feature::kLogAll | proto::balloon::kFFphEpoch |
    // A guest under memory pressure may take balloon pages back (virtio 1.2
    // 5.5.6.1): fphd needs nothing for it, the deflate queue is served.
    proto::balloon::kFDeflateOnOom;
inline constexpr uint64_t kOfferedProtocolFeatures =
    proto::vu::protocol::bit(proto::vu::protocol::kReplyAck) |
    proto::vu::protocol::bit(proto::vu::protocol::kConfig) |
    proto::vu::protocol::bit(proto::vu::protocol::kConfigureMemSlots) |
    proto::vu::protocol::bit(proto::vu::protocol::kStatus) |
    // The back-end channel: config change notifications. Linux's virtio_uml
    // also needs it to set up its vring interrupts (docs/protocol.md).
    proto::vu::protocol::bit(proto::vu::protocol::kBackendReq) |
    // Migration: the shared-memory dirty log and device-state transfer.
    proto::vu::protocol::bit(proto::vu::protocol::kLogShmfd) |
    proto::vu::protocol::bit(proto::vu::protocol::kDeviceState);
// What a session offers: the above, plus STATS_VQ when a stats interval is set.
uint64_t offered_features(const DaemonContext& ctx);
// The one check of SET_FEATURES: nullopt if `acked` may be applied, else
// (metric reason, log detail naming the field): `features_not_offered` (a
// bit we did not offer) or `version_1_missing` (VIRTIO_F_VERSION_1 not
// acked: fphd has no legacy interface, virtio 1.2 6.2 lets such a device
// refuse to operate).
std::optional<std::pair<std::string, std::string>> check_acked_features(uint64_t acked,
                                                                         uint64_t offered);
inline constexpr uint32_t kMaxQueues = 5;  // inflate, deflate, stats, free page, reporting

enum class SessionState : uint8_t { Negotiating, Active, Stopped, Closing };
std::string_view to_string(SessionState s);

// Where a VM is in a live migration, as fphd sees it:
//   none     no dirty logging, no state transferred
//   logging  VHOST_F_LOG_ALL on with a log attached: precopy is running
//   stopped  the rings were stopped (GET_VRING_BASE) while logging
//   saving   SAVE transfer running; saved: it completed
//   loaded   LOAD completed (destination); the epoch was bumped
//   failed   the last transfer failed (CHECK_DEVICE_STATE reported it)
enum class MigrationState : uint8_t { None, Logging, Stopped, Saving, Saved, Loaded, Failed };
std::string_view to_string(MigrationState s);

struct MigrationInfo {
  MigrationState state = MigrationState::None;
  bool log_all = false;        // VHOST_F_LOG_ALL acked
  uint64_t log_bytes = 0;      // 0: no log attached
  uint64_t log_covers = 0;     // guest bytes the log covers
  uint64_t pages_marked = 0;   // by this session, all logs
  uint64_t log_misses = 0;     // writes the log did not cover (counted as protocol errors)
  bool discard_while_logging = true;
  uint64_t epoch = 0;          // bumped on every successful LOAD
  uint64_t state_bytes_sent = 0;
  uint64_t state_bytes_received = 0;
  double last_transfer_seconds = 0;
  std::string last_error;
};

struct SessionInfo {
  std::string name;
  uint64_t features = 0;
  uint64_t protocol_features = 0;
  uint8_t status = 0;
  size_t regions = 0;
  uint64_t memory_bytes = 0;
  int inflight = 0;         // requests taken and not yet returned (a held stats buffer is not one)
  bool paused = false;
  uint32_t poison_val = 0;
  uint32_t num_pages = 0;  // balloon target (config space), 4 KiB pages
  uint32_t actual = 0;     // what the driver says the balloon holds
  bool backend_channel = false;
  // For the reclaim state (sampler.h).
  bool features_set = false;
  bool reporting_live = false;          // reporting ring started and enabled
  bool reporting_ever_started = false;  // since the last device reset
  uint64_t max_page_size = 0;           // largest backing page size of the regions
  SessionState state = SessionState::Negotiating;
  uint64_t requests = 0;    // requests returned to the driver, all queues
  bool yanked = false;
  bool stats_negotiated = false;  // STATS_VQ acked
  bool stats_held = false;        // the driver's stats buffer is held (in flight)
  VmPolicy policy;                // the VM's own policy (vm_policy.h)
  int deferred = 0;               // requests waiting for the VM's rate limit
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(DaemonContext& ctx, UniqueFd sock, std::string name);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Serves the connection until the peer disconnects, a fatal protocol error
  // occurs or request_stop() is called. Returns after every taken request has
  // been returned and no pipeline work references the session.
  void run();
  // From any thread: ends run() soon (shuts the socket down).
  void request_stop();
  // From any thread, never waits on the session (admin `yank`): shuts the
  // socket down (a blocked send or recv returns), cancels queued work through
  // the cancel token and makes GET_VRING_BASE stop waiting for in-flight
  // requests. run() then returns as soon as running discards finish.
  void yank();
  bool yanked() const { return yanked_; }

  const std::string& name() const { return name_; }
  SessionInfo info() const;
  void set_paused(bool paused);
  // The VM's own policy (vm_policy.h) and its backoff configuration; from
  // any thread. Takes effect for requests taken from now on.
  void set_policy(const VmPolicy& p, const BackoffConfig& backoff);
  VmPolicy policy() const;
  // Writes the balloon target (config num_pages, 4 KiB pages) and tells the
  // driver through the back-end channel. The config is changed even if the
  // notification cannot be sent (the driver reads it at its next config
  // read); the error says why it was not sent.
  Expected<void, std::string> set_num_pages(uint32_t pages);
  MigrationInfo migration() const;
  void set_discard_while_logging(bool on);
  // Bumps the VM's epoch (config offset 16, feature kFFphEpoch) and tells
  // the driver through the back-end channel if there is one: a driver that
  // negotiated the epoch then reports all its free memory again. Returns the
  // new epoch; the error says why the driver was not notified (it may still
  // poll the config space, as fph-guest does).
  uint64_t bump_epoch(std::string* not_notified);


  // Called by the queue service (pipeline threads): return a chain to the
  // used ring and notify the driver if it wants it. `discarded` are the
  // guest ranges (gpa, length) the request's discards covered: while dirty
  // logging is on they are marked first, under the same lock (a discarded
  // page reads as zero now, so the VMM must send it again). Logging may have
  // been turned on while the discard ran: the state at completion decides,
  // so no discard escapes the log.
  void return_chain(uint32_t queue, uint16_t head,
                    std::span<const std::pair<uint64_t, uint64_t>> discarded = {});
  // Called by the queue service with the session lock held: a chain was
  // taken off ring `queue` and must be returned later with return_chain.
  void taken_locked(uint32_t queue);

  VmMetrics& metrics() { return *vm_metrics_; }
  // The budget of the log lines this VM's front end can cause (protocol
  // errors, message handling; log.h LineBudget): a front end looping on a bad
  // message costs the log 20 lines and then one a second. Lines the operator
  // causes (admin commands) and connect/disconnect are not budgeted.
  log::LineBudget& log_budget() { return log_budget_; }
  // A protocol error of this VM's front end or driver: one line
  // "vm=NAME <detail>" under the VM's log budget, and the
  // fphd_protocol_errors_total{reason} counter (every time). Any thread.
  void protocol_error(std::string_view component, const std::string& reason, const std::string& detail);
  RefaultTracker& refaults() { return *refaults_; }
  RefaultBackoff& backoff() { return *backoff_; }
  // Requests taken from the guest's queues so far (the stats queue aside).
  uint64_t activity() const { return activity_.load(std::memory_order_relaxed); }
  // The sampler's own bookkeeping for this VM (sampler thread only).
  struct SamplerMark {
    bool sampled = false;
    uint64_t activity = 0;
    std::chrono::steady_clock::time_point at{};
  };
  SamplerMark& sampler_mark() { return sampler_mark_; }
  std::shared_ptr<const MemoryTable> table() const;
  DaemonContext& context() { return ctx_; }
  const StatsService& stats() const { return stats_; }

  // Session-level reason to not discard right now (poison, paused, ring
  // disabled, refault backoff on the reporting queue), or SkipReason::None.
  // Called with the session lock held by the queue service.
  reclaim::SkipReason skip_reason(uint32_t queue) const;
  // The VM policy's minimum reported block (0: any); session lock held.
  uint64_t min_block_locked() const { return policy_.min_block; }
  std::optional<reclaim::PrivateMode> private_mode_locked() const { return policy_.mode; }
  uint64_t rate_limit_locked() const { return policy_.rate_limit; }  // bytes/s, 0: none
  // The VM's rate limit (queue service, session thread): when a request of
  // `bytes` may start at `rate` (rate_limit_locked(), read with the chain).
  // Now when the VM has no rate limit of its own.
  std::chrono::steady_clock::time_point rate_reserve(uint64_t bytes, uint64_t rate) {
    return rate_.reserve(bytes, rate);
  }
  // Queue service, session thread: runs `b` (inline if cheap, else on the
  // node pipeline) at `due`, or now if `due` has passed.
  void run_batch_at(uint32_t queue, std::chrono::steady_clock::time_point due, reclaim::Batch b);
  std::shared_ptr<std::atomic<bool>> cancel_token() const { return cancel_; }

 private:
  struct Reply;
  bool serve_one();                     // false: close the session
  bool handle(proto::vu::Message& m);  // false: close the session
  void fail(const proto::vu::Message& m, const std::string& reason, const std::string& detail);
  void fail(const proto::vu::Header& h, const std::string& reason, const std::string& detail);
  // Refuses a message: logged and counted by fail(), then answered the way
  // the front end can understand (docs/protocol.md "Message rules"): a
  // message with a reply of its own gets that reply's error form, or, if it
  // has none (GET_FEATURES, GET_VRING_BASE, ...), the session is closed
  // rather than leaving the front end waiting; any other message gets a
  // REPLY_ACK nack if it asked for one. Returns false: close the session.
  bool refuse(const proto::vu::Header& h, const std::string& reason, const std::string& detail);
  void send_ack(const proto::vu::Message& m, bool ok);
  bool send_reply_payload(const proto::vu::Message& m, std::span<const uint8_t> payload);
  void start_ring(uint32_t idx);
  void stop_ring(uint32_t idx);         // waits for in-flight requests of that ring
  // The stats queue: returns the held stats chain (of ring `idx`, or any
  // if idx < 0) to the used ring, so nothing waits for it.
  void release_stats_locked(int idx);
  void request_stats_if_due();  // the stats timer: return the held buffer when due
  void return_chain_locked(uint32_t queue, uint16_t head);
  int exported_inflight_locked() const;  // inflight_total_ minus the held stats chain
  void wait_inflight(uint32_t idx, std::unique_lock<std::mutex>& lk);
  void service_kick(uint32_t idx);
  // Batches waiting for the VM's rate limit (session thread only): runs
  // those due (all of them for `queue`, or all if queue < 0 and `all`).
  void run_deferred(bool all, int queue = -1);
  // Runs a batch that is due: inline if cheap, else on its node's pipeline.
  void dispatch(reclaim::Batch& b);
  std::optional<std::chrono::steady_clock::time_point> next_deferred() const;
  // A region of this VM's memory took a SIGBUS (the front end shrank its
  // file, memory_guard.h): logs and counts it once and closes the session.
  // Returns true if the session is closing for it. Takes mu_.
  bool check_memory_faults();
  // Swaps the memory table and locates every started ring in it again
  // (vring.h); a ring the new table does not hold is stopped. `why` names
  // the message for the log.
  void set_table(std::shared_ptr<const MemoryTable> t, std::string_view why);
  // Points ring `idx` at `parts` (mu_ held), keeping its position and its
  // in-flight heads if it is running.
  void place_ring_locked(uint32_t idx, const RingParts& parts);
  // Refuses a SET_VRING_* for ring `idx` (vring.h): stops the ring if it is
  // started, unconfigures `f`, then refuse(). Returns refuse()'s answer.
  bool refuse_ring_config(const proto::vu::Header& h, uint32_t idx, Vring::Field f,
                          const std::string& reason, const std::string& detail);
  // SET_VRING_NUM/BASE/ADDR on a started ring: see session.cpp.
  bool prepare_reconfigure(const proto::vu::Message& m, uint32_t idx, bool refuse_if_enabled);
  void reset_device();
  // Dirty log (mu_ held): marks [gpa, gpa+len) if logging is on.
  bool logging_locked() const { return (features_ & proto::vu::feature::kLogAll) && log_; }
  void log_write_locked(uint64_t gpa, uint64_t len);
  void log_used_write_locked(const Vring& v, uint16_t used_idx_before);
  // Migration messages (session_migration.cpp).
  bool handle_set_log_base(proto::vu::Message& m);
  bool handle_set_device_state_fd(proto::vu::Message& m);
  bool handle_check_device_state(proto::vu::Message& m);
  void set_migration_state_locked(MigrationState s);
  bool any_ring_started_locked() const;

  DaemonContext& ctx_;
  UniqueFd sock_;
  UniqueFd wake_;  // eventfd: request_stop()
  std::string name_;
  std::shared_ptr<VmMetrics> vm_metrics_;
  log::LineBudget log_budget_;
  std::shared_ptr<RefaultTracker> refaults_ = std::make_shared<RefaultTracker>();
  std::shared_ptr<RefaultBackoff> backoff_ = std::make_shared<RefaultBackoff>();
  // Session thread only: the VM's rate limit and what waits for it.
  VmRateLimiter rate_;
  struct DeferredBatch {
    std::chrono::steady_clock::time_point due;
    uint32_t queue;
    reclaim::Batch batch;
  };
  std::vector<DeferredBatch> deferred_;
  std::atomic<int> deferred_count_{0};
  std::shared_ptr<std::atomic<bool>> cancel_ = std::make_shared<std::atomic<bool>>(false);
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> activity_{0};
  SamplerMark sampler_mark_;
  std::atomic<bool> paused_{false};
  std::atomic<bool> yanked_{false};
  std::atomic<bool> memory_fault_reported_{false};

  // Guarded by mu_ (the session thread and pipeline completions).
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t features_ = 0;        // acked by SET_FEATURES
  bool features_set_ = false;
  // The last SET_FEATURES was refused: SET_STATUS does not take FEATURES_OK
  // (virtio 1.2 2.2.2), so GET_STATUS tells the front end.
  bool features_refused_ = false;
  uint64_t protocol_features_ = 0;
  uint8_t status_ = 0;
  proto::balloon::Config config_{};
  proto::balloon::QueueLayout layout_{};
  std::shared_ptr<const MemoryTable> table_ = std::make_shared<MemoryTable>();
  BackendChannel backend_;  // own lock; never taken with mu_ held
  Vring vrings_[kMaxQueues];
  int inflight_total_ = 0;
  StatsService stats_;  // its held chain is guarded by mu_
  VmPolicy policy_;     // the VM's own policy

  // Migration, guarded by mu_.
  std::shared_ptr<DirtyLog> log_;  // SET_LOG_BASE
  UniqueFd log_call_;              // SET_LOG_FD: signalled after marking
  uint64_t log_misses_ = 0;
  uint64_t pages_marked_ = 0;
  std::atomic<bool> discard_while_logging_{true};
  uint64_t epoch_ = 0;
  bool epoch_notify_pending_ = false;  // LOAD bumped it: notify when the device starts
  MigrationState migration_ = MigrationState::None;
  std::string migration_error_;
  uint64_t state_sent_ = 0, state_received_ = 0;
  double last_transfer_seconds_ = 0;
  // Session thread only: the running or finished device-state transfer.
  std::unique_ptr<StateTransfer> transfer_;
};

}  // namespace fph::daemon
