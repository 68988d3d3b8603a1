// Prometheus metrics of fphd (DESIGN section 6; the full list and meaning is in
// docs/metrics.md). Names follow Prometheus conventions: fphd_ prefix, base
// units (bytes, seconds), _total for counters. Histograms are labelled by host
// node, never by VM, to keep cardinality bounded on hosts with many VMs.
//
// The hot path never looks a series up by label: a session resolves its
// series once (VmMetrics) and increments atomics after that.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fph/proto/balloon_stats.h"
#include "fph/reclaim/discard.h"

namespace fph::daemon {

inline constexpr size_t kMethods = 4;    // reclaim::Method values
inline constexpr size_t kSkipReasons = 12;  // reclaim::SkipReason values

// Request outcomes: every request ends in exactly one.
enum class RequestOutcome : uint8_t { Discarded, Partial, Skipped, Invalid, Cancelled };
inline constexpr size_t kOutcomes = 5;
std::string_view to_string(RequestOutcome o);

// Reclaim state of a VM (fphd_vm_reclaim_state, a state set: exactly one is 1
// once the VM has negotiated its features; none while it is still setting up).
enum class ReclaimState : uint8_t { Active, Paused, Migrating, Disabled };
inline constexpr size_t kReclaimStates = 4;
std::string_view to_string(ReclaimState s);
// Why reclaim is disabled for a VM (fphd_vm_reclaim_disabled{reason}).
enum class DisabledReason : uint8_t { Poison, NoReporting, MisalignedBacking };
inline constexpr size_t kDisabledReasons = 3;
std::string_view to_string(DisabledReason r);
// fphd_vm_migration_state's states (session.h MigrationState).
inline constexpr std::string_view kMigrationStates[] = {"none",   "logging", "stopped", "saving",
                                                        "saved",  "loaded",  "failed"};

class Metrics;

// One VM's series. Created when a session gets its name, removed with it.
class VmMetrics {
 public:
  VmMetrics(Metrics& m, std::string vm, int nodes);
  ~VmMetrics();
  VmMetrics(const VmMetrics&) = delete;
  VmMetrics& operator=(const VmMetrics&) = delete;

  void reported(int node, uint64_t bytes);
  void discarded(int node, reclaim::Method m, uint64_t bytes);
  void skipped(reclaim::SkipReason r, uint64_t bytes);
  void request_done(RequestOutcome o);
  void protocol_error(const std::string& reason);
  // A request fphd sent the front end on the back-end channel
  // (`request`: config_change), and whether it could be sent.
  void backend_request(const std::string& request, bool sent);
  // Live migration (docs/metrics.md "Migration"): dirty-log pages marked,
  // device-state transfers by direction (save, load) and outcome (ok or the
  // failure reason), and the migration state (one of kMigrationStates is 1).
  void dirty_pages(uint64_t pages);
  void state_transfer(const std::string& direction, const std::string& outcome, uint64_t bytes);
  void set_migration_state(std::string_view state);
  void set_inflight(int64_t n);
  void set_guest_memory(uint64_t bytes);
  // Verified reclaim: bytes the kernel stopped holding (measured around the
  // discard), and discard groups the kernel accepted that freed nothing.
  void reclaimed(int node, uint64_t bytes);
  void freed_nothing(int node);
  void refaulted(uint64_t bytes);
  void set_resident(uint64_t bytes);
  // Refault backoff (refault_backoff.h): 1 while discards are held off, the
  // holds started (cumulative, from the session's backoff), the refaulted
  // share of the window.
  void set_backoff(bool holding, uint64_t holds, double share);
  void set_features(uint64_t features);
  // `state` empty: still negotiating (every state series 0). `reason` only
  // for Disabled.
  void set_reclaim_state(std::optional<ReclaimState> state, std::optional<DisabledReason> reason);
  void clear_state() { set_reclaim_state(std::nullopt, std::nullopt); }
  // What the guest said on the stats queue (one valid buffer): a gauge per
  // tag it sent (created on first use: a tag the guest never sends has no
  // series), the update count, the time, and entries with unknown tags.
  void guest_stats(const proto::balloon::Stats& s, uint64_t unknown_tags);
  // Headroom (stats_service.h unreported_free_bytes), once stats arrived.
  void set_unreported_free(uint64_t bytes);
  // The balloon (docs/metrics.md "Balloon"): the target the host set and
  // what the driver says it holds (config num_pages / actual, in bytes), and
  // pages that came on the inflate or deflate queue (`direction`), counted
  // apart from free page reporting.
  void set_balloon(uint64_t target_bytes, uint64_t actual_bytes);
  void balloon_pages(std::string_view direction, uint64_t bytes);

  // Cumulative counts the reclaim state is derived from (misaligned backing:
  // reports arrive but every byte is skipped as misaligned).
  uint64_t misaligned_bytes() const { return misaligned_bytes_.load(std::memory_order_relaxed); }
  uint64_t discarded_bytes() const { return discarded_bytes_.load(std::memory_order_relaxed); }
  // The values of this VM's own series, read back (the admin socket's
  // query-sessions shows them: one source of truth with /metrics), summed
  // over nodes: fphd_reported_bytes_total, fphd_reclaimed_bytes_total,
  // fphd_refaulted_bytes_total; and fphd_guest_unreported_free_bytes, empty
  // while that series does not exist (no stats from the guest yet).
  uint64_t reported_total() const;
  uint64_t reclaimed_total() const;
  uint64_t refaulted_total() const;
  std::optional<uint64_t> unreported_free();

 private:
  Metrics& m_;
  std::string vm_;
  int nodes_;
  std::vector<prometheus::Counter*> reported_;              // [node]
  std::vector<std::array<prometheus::Counter*, kMethods>> discarded_;  // [node][method], lazily
  std::array<prometheus::Counter*, kSkipReasons> skipped_{};
  std::array<prometheus::Counter*, kOutcomes> requests_{};
  prometheus::Gauge* inflight_ = nullptr;
  prometheus::Gauge* guest_memory_ = nullptr;
  prometheus::Gauge* resident_ = nullptr;
  prometheus::Gauge* backoff_ = nullptr;
  prometheus::Counter* backoff_holds_ = nullptr;
  uint64_t backoff_holds_seen_ = 0;  // sampler thread only
  prometheus::Gauge* refault_share_ = nullptr;
  prometheus::Gauge* features_ = nullptr;
  prometheus::Counter* refaulted_ = nullptr;
  std::vector<prometheus::Counter*> reclaimed_;      // [node]
  std::vector<prometheus::Counter*> freed_nothing_;  // [node]
  std::array<prometheus::Gauge*, kReclaimStates> state_{};
  std::array<prometheus::Gauge*, kDisabledReasons> disabled_{};
  std::atomic<uint64_t> misaligned_bytes_{0};
  std::atomic<uint64_t> discarded_bytes_{0};
  std::mutex err_mu_;  // protocol errors are rare: a map is fine
  std::map<std::string, prometheus::Counter*> errors_;
  std::map<std::pair<std::string, bool>, prometheus::Counter*> backend_requests_;  // under err_mu_
  prometheus::Counter* dirty_pages_ = nullptr;                                     // under err_mu_
  std::map<std::pair<std::string, std::string>, prometheus::Counter*> transfers_;  // under err_mu_
  std::map<std::string, prometheus::Counter*> state_bytes_;                        // under err_mu_
  std::map<std::string, prometheus::Gauge*> migration_state_;                      // under err_mu_
  prometheus::Gauge* balloon_target_ = nullptr;
  prometheus::Gauge* balloon_actual_ = nullptr;
  std::map<std::string, prometheus::Counter*, std::less<>> balloon_bytes_;  // under err_mu_
  std::mutex lazy_mu_;
  // Stats queue series, created on first use (under lazy_mu_).
  std::array<prometheus::Gauge*, proto::balloon::kStatTags> guest_stat_{};
  prometheus::Counter* stats_updates_ = nullptr;
  prometheus::Counter* stats_unknown_ = nullptr;
  prometheus::Gauge* stats_time_ = nullptr;
  prometheus::Gauge* unreported_free_ = nullptr;
};

class Metrics {
 public:
  // `bind` is "ADDRESS:PORT" (port 0 picks a free one) or empty for no
  // endpoint (the registry still works, e.g. in unit tests).
  Metrics(const std::string& bind, int nodes);
  ~Metrics();

  // A VM's series. Series outlive the session by `retention` so a scrape
  // after a disconnect still sees the final counts, and a VM that reconnects
  // under the same name continues its counters instead of resetting them.
  std::shared_ptr<VmMetrics> acquire_vm(const std::string& vm);
  void release_vm(const std::string& vm);
  void set_retention(std::chrono::seconds r) { retention_ = r; }

  // "http://127.0.0.1:PORT/metrics", or empty.
  std::string url() const;
  int nodes() const { return nodes_; }
  std::shared_ptr<prometheus::Registry> registry() { return registry_; }

  void observe_request_latency(int node, double seconds);
  void observe_discard_duration(int node, double seconds);
  void session_opened();
  void session_closed();
  // Bursts of freed heap (heap_trim.h): scrapes served through the endpoint
  // (at 1024 VMs one builds ~15 MiB of metric objects and text) plus
  // sessions closed.
  uint64_t heap_bursts() const {
    return scrapes_.load(std::memory_order_relaxed) + sessions_closed_.load(std::memory_order_relaxed);
  }
  // When the last of them began (steady clock).
  std::chrono::steady_clock::time_point last_heap_burst() const {
    return std::chrono::steady_clock::time_point(
        std::chrono::steady_clock::duration(last_burst_.load(std::memory_order_relaxed)));
  }
  // Called by the endpoint's registry wrapper as each scrape is collected.
  void scrape_began();
  void protocol_error_unnamed(const std::string& reason);  // before a session has a name
  void discard_syscalls(int node, reclaim::Method m, uint64_t n);
  // Node view (sampled by the NodeCollector).
  void set_node_memory(int node, uint64_t total, uint64_t free, double pressure, bool under_pressure);

 private:
  friend class VmMetrics;
  std::shared_ptr<prometheus::Registry> registry_;
  void heap_burst_began();  // stamps last_heap_burst()
  std::atomic<uint64_t> scrapes_{0}, sessions_closed_{0};
  std::atomic<std::chrono::steady_clock::rep> last_burst_{0};
  std::shared_ptr<prometheus::Collectable> counted_registry_;  // registry_, counting scrapes_
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string bind_;
  int nodes_;

  prometheus::Family<prometheus::Counter>& reported_bytes_;
  prometheus::Family<prometheus::Counter>& discarded_bytes_;
  prometheus::Family<prometheus::Counter>& skipped_bytes_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Counter>& protocol_errors_;
  prometheus::Family<prometheus::Counter>& backend_requests_;
  prometheus::Family<prometheus::Gauge>& balloon_target_;
  prometheus::Family<prometheus::Gauge>& balloon_actual_;
  prometheus::Family<prometheus::Counter>& balloon_bytes_;
  prometheus::Family<prometheus::Counter>& dirty_pages_;
  prometheus::Family<prometheus::Counter>& state_transfers_;
  prometheus::Family<prometheus::Counter>& state_bytes_;
  prometheus::Family<prometheus::Gauge>& migration_state_;
  prometheus::Family<prometheus::Counter>& syscalls_;
  prometheus::Family<prometheus::Counter>& sessions_opened_;
  prometheus::Family<prometheus::Gauge>& inflight_;
  prometheus::Family<prometheus::Gauge>& guest_memory_;
  prometheus::Family<prometheus::Gauge>& sessions_;
  prometheus::Family<prometheus::Gauge>& build_info_;
  prometheus::Family<prometheus::Counter>& reclaimed_bytes_;
  prometheus::Family<prometheus::Counter>& freed_nothing_;
  prometheus::Family<prometheus::Counter>& refaulted_bytes_;
  prometheus::Family<prometheus::Counter>& node_discarded_;
  prometheus::Family<prometheus::Counter>& node_reclaimed_;
  prometheus::Family<prometheus::Gauge>& resident_;
  prometheus::Family<prometheus::Gauge>& backoff_;
  prometheus::Family<prometheus::Counter>& backoff_holds_;
  prometheus::Family<prometheus::Gauge>& refault_share_;
  prometheus::Family<prometheus::Gauge>& features_;
  prometheus::Family<prometheus::Gauge>& reclaim_state_;
  prometheus::Family<prometheus::Gauge>& reclaim_disabled_;
  prometheus::Family<prometheus::Gauge>& node_total_;
  prometheus::Family<prometheus::Gauge>& node_free_;
  prometheus::Family<prometheus::Gauge>& node_pressure_;
  prometheus::Family<prometheus::Gauge>& node_under_pressure_;
  // The stats queue (what the guest says): one gauge family per tag
  // (guest_stat_series_), registered in the constructor.
  prometheus::Family<prometheus::Counter>& stats_updates_;
  prometheus::Family<prometheus::Counter>& stats_unknown_tags_;
  prometheus::Family<prometheus::Gauge>& stats_timestamp_;
  prometheus::Family<prometheus::Gauge>& unreported_free_;
  struct GuestStatSeries {
    prometheus::Family<prometheus::Gauge>* family;
    std::map<std::string, std::string> labels;  // besides vm
  };
  std::array<GuestStatSeries, proto::balloon::kStatTags> guest_stat_series_{};
  std::vector<prometheus::Counter*> node_discarded_by_node_;
  std::vector<prometheus::Counter*> node_reclaimed_by_node_;
  struct NodeGauges {
    prometheus::Gauge* total;
    prometheus::Gauge* free;
    prometheus::Gauge* pressure;
    prometheus::Gauge* under_pressure;
  };
  std::vector<NodeGauges> node_gauges_;
  prometheus::Family<prometheus::Histogram>& request_latency_;
  prometheus::Family<prometheus::Histogram>& discard_duration_;
  std::vector<prometheus::Histogram*> request_latency_by_node_;
  std::vector<prometheus::Histogram*> discard_duration_by_node_;
  std::vector<std::array<prometheus::Counter*, kMethods>> syscalls_by_node_;
  prometheus::Gauge* sessions_gauge_ = nullptr;
  prometheus::Counter* sessions_opened_total_ = nullptr;

  struct VmEntry {
    std::shared_ptr<VmMetrics> metrics;
    int users = 0;
    std::chrono::steady_clock::time_point released;
  };
  std::mutex vms_mu_;  // session open/close only, never the data path
  std::map<std::string, VmEntry> vms_;
  std::chrono::seconds retention_{600};
  void sweep_locked();
};

}  // namespace fph::daemon
