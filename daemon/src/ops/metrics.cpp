#include "fph/daemon/metrics.h"

#include <prometheus/counter.h>

#include "fph/common/log.h"

#ifndef FPH_VERSION
#define FPH_VERSION "0.0.0"
#endif

namespace fph::daemon {

namespace {

// The registry as the endpoint sees it, counting scrapes (Metrics::heap_bursts).
class CountingCollectable final : public prometheus::Collectable {
 public:
  CountingCollectable(std::shared_ptr<prometheus::Registry> r, Metrics& m)
      : registry_(std::move(r)), m_(m) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    m_.scrape_began();
    return registry_->Collect();
  }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  Metrics& m_;
};

}  // namespace

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

std::string_view to_string(RequestOutcome o) {
  switch (o) {
    case RequestOutcome::Discarded: return "discarded";
    case RequestOutcome::Partial: return "partial";
    case RequestOutcome::Skipped: return "skipped";
    case RequestOutcome::Invalid: return "invalid";
    case RequestOutcome::Cancelled: return "cancelled";
  }
  return "?";
}

std::string_view to_string(ReclaimState s) {
  switch (s) {
    case ReclaimState::Active: return "active";
    case ReclaimState::Paused: return "paused";
    case ReclaimState::Migrating: return "migrating";
    case ReclaimState::Disabled: return "disabled";
  }
  return "?";
}

std::string_view to_string(DisabledReason r) {
  switch (r) {
    case DisabledReason::Poison: return "poison";
    case DisabledReason::NoReporting: return "no_reporting";
    case DisabledReason::MisalignedBacking: return "misaligned_backing";
  }
  return "?";
}

namespace {
prometheus::Histogram::BucketBoundaries latency_buckets() {
  // 50 us .. ~26 s, x2 per bucket: a 4 KiB-shmem request of 64 MiB takes
  // tens of milliseconds, a paused or hung one seconds.
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 50e-6; v < 30; v *= 2) b.push_back(v);
  return b;
}
}  // namespace

Metrics::Metrics(const std::string& bind, int nodes)
    : registry_(std::make_shared<prometheus::Registry>()),
      bind_(bind),
      nodes_(nodes),
      reported_bytes_(BuildCounter()
                          .Name("fphd_reported_bytes_total")
                          .Help("Bytes of guest memory reported free in valid ranges, by VM and host NUMA node.")
                          .Register(*registry_)),
      discarded_bytes_(BuildCounter()
                           .Name("fphd_discarded_bytes_total")
                           .Help("Bytes whose host backing was discarded (syscall accepted), by VM, node and method.")
                           .Register(*registry_)),
      skipped_bytes_(BuildCounter()
                         .Name("fphd_skipped_bytes_total")
                         .Help("Reported bytes that were deliberately not discarded, by VM and reason.")
                         .Register(*registry_)),
      requests_(BuildCounter()
                    .Name("fphd_requests_total")
                    .Help("Reporting requests returned to the guest, by VM and outcome.")
                    .Register(*registry_)),
      protocol_errors_(BuildCounter()
                           .Name("fphd_protocol_errors_total")
                           .Help("Malformed or refused vhost-user messages and virtqueue chains, by VM and reason.")
                           .Register(*registry_)),
      backend_requests_(BuildCounter()
                            .Name("fphd_backend_requests_total")
                            .Help("Requests fphd sent to a front end on its back-end channel (config_change), by VM, "
                                  "request and outcome (sent, failed).")
                            .Register(*registry_)),
      balloon_target_(BuildGauge()
                          .Name("fphd_balloon_target_bytes")
                          .Help("Balloon target the host set for the VM (config num_pages x 4 KiB).")
                          .Register(*registry_)),
      balloon_actual_(BuildGauge()
                          .Name("fphd_balloon_actual_bytes")
                          .Help("What the VM's balloon driver says its balloon holds (config actual x 4 KiB).")
                          .Register(*registry_)),
      balloon_bytes_(BuildCounter()
                         .Name("fphd_balloon_bytes_total")
                         .Help("Guest pages that came on the balloon's inflate or deflate queue, by VM and "
                               "direction (inflate: given to the host and discarded like reports; deflate: taken "
                               "back).")
                         .Register(*registry_)),
      dirty_pages_(BuildCounter()
                       .Name("fphd_dirty_log_pages_total")
                       .Help("Guest pages fphd marked in the VM's dirty log while the VMM was migrating it "
                             "(used-ring writes and discarded ranges), by VM.")
                       .Register(*registry_)),
      state_transfers_(BuildCounter()
                           .Name("fphd_device_state_transfers_total")
                           .Help("Device-state transfers (SET_DEVICE_STATE_FD), by VM, direction (save, load) and "
                                 "outcome (ok, or why it failed).")
                           .Register(*registry_)),
      state_bytes_(BuildCounter()
                       .Name("fphd_device_state_bytes_total")
                       .Help("Device-state bytes moved through the state pipe, by VM and direction (save, load).")
                       .Register(*registry_)),
      migration_state_(BuildGauge()
                           .Name("fphd_vm_migration_state")
                           .Help("Migration state of the VM: 1 for the current state (none, logging, stopped, "
                                 "saving, saved, loaded, failed), 0 for the others.")
                           .Register(*registry_)),
      syscalls_(BuildCounter()
                    .Name("fphd_discard_syscalls_total")
                    .Help("Discard syscalls issued (including retries), by node and method.")
                    .Register(*registry_)),
      sessions_opened_(BuildCounter()
                           .Name("fphd_sessions_opened_total")
                           .Help("vhost-user sessions accepted or attached since start.")
                           .Register(*registry_)),
      inflight_(BuildGauge()
                    .Name("fphd_inflight_requests")
                    .Help("Reporting requests taken from the ring and not yet returned, by VM.")
                    .Register(*registry_)),
      guest_memory_(BuildGauge()
                        .Name("fphd_guest_memory_bytes")
                        .Help("Guest memory mapped for the VM (sum of its regions).")
                        .Register(*registry_)),
      sessions_(BuildGauge().Name("fphd_sessions").Help("Live vhost-user sessions.").Register(*registry_)),
      build_info_(BuildGauge()
                      .Name("fphd_build_info")
                      .Help("Always 1; the labels carry the fphd version.")
                      .Register(*registry_)),
      reclaimed_bytes_(BuildCounter()
                           .Name("fphd_reclaimed_bytes_total")
                           .Help("Bytes the kernel stopped holding for the VM's memory, measured from the backing file's "
                                 "allocated blocks (st_blocks) before and after each discard, by VM and node.")
                           .Register(*registry_)),
      freed_nothing_(BuildCounter()
                         .Name("fphd_discards_freed_nothing_total")
                         .Help("Discard syscall groups the kernel accepted that did not lower the backing's allocated "
                               "blocks (the range was not populated, or already freed), by VM and node.")
                         .Register(*registry_)),
      refaulted_bytes_(BuildCounter()
                           .Name("fphd_refaulted_bytes_total")
                           .Help("Discarded bytes found resident again within the refault window (sampled with "
                                 "mincore on fphd's mapping), by VM.")
                           .Register(*registry_)),
      node_discarded_(BuildCounter()
                          .Name("fphd_node_discarded_bytes_total")
                          .Help("Bytes discarded (syscall accepted) on a host NUMA node, all VMs, since fphd started.")
                          .Register(*registry_)),
      node_reclaimed_(BuildCounter()
                          .Name("fphd_node_reclaimed_bytes_total")
                          .Help("Bytes measured as freed (st_blocks) on a host NUMA node, all VMs, since fphd started.")
                          .Register(*registry_)),
      resident_(BuildGauge()
                    .Name("fphd_guest_resident_bytes")
                    .Help("Bytes the kernel holds for the VM's memory (allocated blocks of its region files, sampled).")
                    .Register(*registry_)),
      backoff_(BuildGauge()
                   .Name("fphd_vm_backoff")
                   .Help("1 while fphd holds off discarding for the VM because it refaults what was discarded "
                         "(refault backoff), else 0.")
                   .Register(*registry_)),
      backoff_holds_(BuildCounter()
                         .Name("fphd_vm_backoff_holds_total")
                         .Help("Refault backoff holds started for the VM (each one holds discards off for the hold time; "
                               "a hold that follows a failed probe is twice as long as the one before).")
                         .Register(*registry_)),
      refault_share_(BuildGauge()
                         .Name("fphd_vm_refault_share")
                         .Help("Refaulted bytes over discarded bytes in the VM's backoff window (sampled; 0 when "
                               "nothing was discarded in the window).")
                         .Register(*registry_)),
      features_(BuildGauge()
                    .Name("fphd_vm_features")
                    .Help("Virtio and vhost-user feature bits the VM's front end acked (SET_FEATURES), as a number.")
                    .Register(*registry_)),
      reclaim_state_(BuildGauge()
                         .Name("fphd_vm_reclaim_state")
                         .Help("Reclaim state of the VM: 1 for the current state (active, paused, migrating, "
                               "disabled), 0 for the others; all 0 while the VM is still negotiating.")
                         .Register(*registry_)),
      reclaim_disabled_(BuildGauge()
                            .Name("fphd_vm_reclaim_disabled")
                            .Help("1 if reclaim is disabled for the VM for this reason (poison, no_reporting, "
                                  "misaligned_backing), else 0.")
                            .Register(*registry_)),
      node_total_(BuildGauge()
                      .Name("fphd_node_memory_total_bytes")
                      .Help("Memory of the host NUMA node (node meminfo MemTotal; /proc/meminfo without NUMA).")
                      .Register(*registry_)),
      node_free_(BuildGauge()
                     .Name("fphd_node_memory_free_bytes")
                     .Help("Free memory of the host NUMA node (node meminfo MemFree; /proc/meminfo without NUMA).")
                     .Register(*registry_)),
      node_pressure_(BuildGauge()
                         .Name("fphd_node_pressure")
                         .Help("Memory pressure: PSI memory 'some' avg10 as a ratio 0..1 (system-wide; the kernel "
                               "has no per-node PSI).")
                         .Register(*registry_)),
      node_under_pressure_(BuildGauge()
                               .Name("fphd_node_under_pressure")
                               .Help("1 if the node is under pressure by its discard policy (free fraction below the "
                                     "watermark or PSI above the threshold), else 0.")
                               .Register(*registry_)),
      stats_updates_(BuildCounter()
                         .Name("fphd_guest_stats_updates_total")
                         .Help("Valid stats buffers the guest sent on the stats queue, by VM.")
                         .Register(*registry_)),
      stats_unknown_tags_(BuildCounter()
                              .Name("fphd_guest_stats_unknown_tags_total")
                              .Help("Stats entries with a tag fphd does not know (ignored), by VM.")
                              .Register(*registry_)),
      stats_timestamp_(BuildGauge()
                           .Name("fphd_guest_stats_timestamp_seconds")
                           .Help("Unix time of the VM's latest valid stats buffer.")
                           .Register(*registry_)),
      unreported_free_(BuildGauge()
                           .Name("fphd_guest_unreported_free_bytes")
                           .Help("Headroom: memory the guest calls free (stats queue) whose host backing is still "
                                 "held, max(0, guest free - (guest memory - resident)), by VM.")
                           .Register(*registry_)),
      request_latency_(BuildHistogram()
                           .Name("fphd_request_duration_seconds")
                           .Help("Time from taking a reporting request off the ring to returning it, by node.")
                           .Register(*registry_)),
      discard_duration_(BuildHistogram()
                            .Name("fphd_discard_duration_seconds")
                            .Help("Time spent in discard syscalls per pipeline batch, by node.")
                            .Register(*registry_)) {
  build_info_.Add({{"version", FPH_VERSION}}).Set(1);
  // One gauge family per stats tag (docs/metrics.md "What the guest says").
  // Guest-side event counts are gauges, not counters: fphd only relays what
  // the guest claims and cannot promise they never go down (a guest reboot
  // restarts them, a guest may lie); rate() and increase() still treat a
  // drop as a reset.
  using T = proto::balloon::StatTag;
  auto* swap_in = &BuildGauge().Name("fphd_guest_swap_in_bytes").Help("Guest: bytes swapped in since guest boot (stats queue SWAP_IN; a guest-side count relayed as a gauge).").Register(*registry_);
  auto* swap_out = &BuildGauge().Name("fphd_guest_swap_out_bytes").Help("Guest: bytes swapped out since guest boot (SWAP_OUT; a guest-side count relayed as a gauge).").Register(*registry_);
  auto* majflt = &BuildGauge().Name("fphd_guest_major_faults").Help("Guest: major page faults since guest boot (MAJFLT; a guest-side count relayed as a gauge).").Register(*registry_);
  auto* minflt = &BuildGauge().Name("fphd_guest_minor_faults").Help("Guest: minor page faults since guest boot (MINFLT; a guest-side count relayed as a gauge).").Register(*registry_);
  auto* memfree = &BuildGauge().Name("fphd_guest_free_bytes").Help("Guest: memory not used at all (stats queue MEMFREE).").Register(*registry_);
  auto* memtot = &BuildGauge().Name("fphd_guest_memtotal_bytes").Help("Guest: memory the guest can use (MEMTOT, its MemTotal).").Register(*registry_);
  auto* avail = &BuildGauge().Name("fphd_guest_available_bytes").Help("Guest: memory available for new work without swapping (AVAIL, its MemAvailable).").Register(*registry_);
  auto* caches = &BuildGauge().Name("fphd_guest_caches_bytes").Help("Guest: disk caches that can be dropped quickly (CACHES).").Register(*registry_);
  auto* htlb_alloc = &BuildGauge().Name("fphd_guest_hugetlb_allocations").Help("Guest: hugetlb page allocations since guest boot (HTLB_PGALLOC; relayed as a gauge).").Register(*registry_);
  auto* htlb_fail = &BuildGauge().Name("fphd_guest_hugetlb_allocation_failures").Help("Guest: hugetlb page allocation failures since guest boot (HTLB_PGFAIL; relayed as a gauge).").Register(*registry_);
  auto* oom = &BuildGauge().Name("fphd_guest_oom_kills").Help("Guest: OOM killer invocations since guest boot (OOM_KILLS; relayed as a gauge).").Register(*registry_);
  auto* stalls = &BuildGauge().Name("fphd_guest_allocation_stalls").Help("Guest: allocation stalls since guest boot (ALLOC_STALL; relayed as a gauge).").Register(*registry_);
  auto* scanned = &BuildGauge().Name("fphd_guest_scanned_pages").Help("Guest: pages scanned by reclaim since guest boot, by reclaimer (kswapd: ASYNC_SCAN, direct: DIRECT_SCAN; relayed as a gauge).").Register(*registry_);
  auto* stolen = &BuildGauge().Name("fphd_guest_reclaimed_pages").Help("Guest: pages its own reclaim freed since guest boot, by reclaimer (kswapd: ASYNC_RECLAIM, direct: DIRECT_RECLAIM; relayed as a gauge).").Register(*registry_);
  auto set = [&](T t, prometheus::Family<prometheus::Gauge>* f, std::map<std::string, std::string> l = {}) {
    guest_stat_series_[static_cast<size_t>(t)] = {f, std::move(l)};
  };
  set(T::SwapIn, swap_in);
  set(T::SwapOut, swap_out);
  set(T::MajorFaults, majflt);
  set(T::MinorFaults, minflt);
  set(T::MemFree, memfree);
  set(T::MemTotal, memtot);
  set(T::Available, avail);
  set(T::Caches, caches);
  set(T::HugetlbAllocs, htlb_alloc);
  set(T::HugetlbFails, htlb_fail);
  set(T::OomKills, oom);
  set(T::AllocStalls, stalls);
  set(T::AsyncScan, scanned, {{"reclaimer", "kswapd"}});
  set(T::DirectScan, scanned, {{"reclaimer", "direct"}});
  set(T::AsyncReclaim, stolen, {{"reclaimer", "kswapd"}});
  set(T::DirectReclaim, stolen, {{"reclaimer", "direct"}});
  sessions_gauge_ = &sessions_.Add({});
  sessions_opened_total_ = &sessions_opened_.Add({});
  for (int n = 0; n < nodes; ++n) {
    const std::string node = std::to_string(n);
    request_latency_by_node_.push_back(&request_latency_.Add({{"node", node}}, latency_buckets()));
    discard_duration_by_node_.push_back(&discard_duration_.Add({{"node", node}}, latency_buckets()));
    std::array<prometheus::Counter*, kMethods> sc{};
    for (size_t m = 0; m < kMethods; ++m)
      sc[m] = &syscalls_.Add(
          {{"node", node}, {"method", std::string(reclaim::to_string(static_cast<reclaim::Method>(m)))}});
    syscalls_by_node_.push_back(sc);
    node_discarded_by_node_.push_back(&node_discarded_.Add({{"node", node}}));
    node_reclaimed_by_node_.push_back(&node_reclaimed_.Add({{"node", node}}));
    node_gauges_.push_back({&node_total_.Add({{"node", node}}), &node_free_.Add({{"node", node}}),
                            &node_pressure_.Add({{"node", node}}),
                            &node_under_pressure_.Add({{"node", node}})});
  }
  if (!bind.empty()) {
    exposer_ = std::make_unique<prometheus::Exposer>(bind);
    counted_registry_ = std::make_shared<CountingCollectable>(registry_, *this);
    exposer_->RegisterCollectable(counted_registry_);
  }
}

Metrics::~Metrics() {
  std::lock_guard lk(vms_mu_);
  vms_.clear();  // VmMetrics remove their series from families we still own
}

std::string Metrics::url() const {
  if (!exposer_) return {};
  const auto ports = exposer_->GetListeningPorts();
  if (ports.empty()) return {};
  std::string host = bind_.substr(0, bind_.rfind(':'));
  return "http://" + host + ":" + std::to_string(ports.front()) + "/metrics";
}

void Metrics::observe_request_latency(int node, double s) {
  if (node >= 0 && node < nodes_) request_latency_by_node_[node]->Observe(s);
}
void Metrics::observe_discard_duration(int node, double s) {
  if (node >= 0 && node < nodes_) discard_duration_by_node_[node]->Observe(s);
}
void Metrics::session_opened() {
  sessions_gauge_->Increment();
  sessions_opened_total_->Increment();
}
void Metrics::session_closed() {
  sessions_gauge_->Decrement();
  heap_burst_began();
  sessions_closed_.fetch_add(1, std::memory_order_relaxed);
}
void Metrics::scrape_began() {
  heap_burst_began();
  scrapes_.fetch_add(1, std::memory_order_relaxed);
}

void Metrics::heap_burst_began() {
  last_burst_.store(std::chrono::steady_clock::now().time_since_epoch().count(), std::memory_order_relaxed);
}
void Metrics::protocol_error_unnamed(const std::string& reason) {
  protocol_errors_.Add({{"vm", ""}, {"reason", reason}}).Increment();
}
void Metrics::discard_syscalls(int node, reclaim::Method m, uint64_t n) {
  if (node >= 0 && node < nodes_ && n)
    syscalls_by_node_[node][static_cast<size_t>(m)]->Increment(static_cast<double>(n));
}

void Metrics::set_node_memory(int node, uint64_t total, uint64_t free, double pressure,
                              bool under_pressure) {
  if (node < 0 || node >= nodes_) return;
  auto& g = node_gauges_[node];
  g.total->Set(static_cast<double>(total));
  g.free->Set(static_cast<double>(free));
  g.pressure->Set(pressure);
  g.under_pressure->Set(under_pressure ? 1 : 0);
}

std::shared_ptr<VmMetrics> Metrics::acquire_vm(const std::string& vm) {
  std::lock_guard lk(vms_mu_);
  sweep_locked();
  auto& e = vms_[vm];
  if (!e.metrics) e.metrics = std::make_shared<VmMetrics>(*this, vm, nodes_);
  e.users++;
  return e.metrics;
}

void Metrics::release_vm(const std::string& vm) {
  std::lock_guard lk(vms_mu_);
  auto it = vms_.find(vm);
  if (it != vms_.end() && --it->second.users == 0) it->second.released = std::chrono::steady_clock::now();
  sweep_locked();
}

void Metrics::sweep_locked() {
  const auto now = std::chrono::steady_clock::now();
  for (auto it = vms_.begin(); it != vms_.end();) {
    if (it->second.users == 0 && now - it->second.released >= retention_) it = vms_.erase(it);
    else ++it;
  }
}

VmMetrics::VmMetrics(Metrics& m, std::string vm, int nodes) : m_(m), vm_(std::move(vm)), nodes_(nodes) {
  for (int n = 0; n < nodes; ++n)
    reported_.push_back(&m_.reported_bytes_.Add({{"vm", vm_}, {"node", std::to_string(n)}}));
  discarded_.resize(nodes);
  for (auto& row : discarded_) row.fill(nullptr);
  for (size_t o = 0; o < kOutcomes; ++o)
    requests_[o] = &m_.requests_.Add(
        {{"vm", vm_}, {"outcome", std::string(to_string(static_cast<RequestOutcome>(o)))}});
  inflight_ = &m_.inflight_.Add({{"vm", vm_}});
  guest_memory_ = &m_.guest_memory_.Add({{"vm", vm_}});
  resident_ = &m_.resident_.Add({{"vm", vm_}});
  backoff_ = &m_.backoff_.Add({{"vm", vm_}});
  backoff_holds_ = &m_.backoff_holds_.Add({{"vm", vm_}});
  refault_share_ = &m_.refault_share_.Add({{"vm", vm_}});
  features_ = &m_.features_.Add({{"vm", vm_}});
  refaulted_ = &m_.refaulted_bytes_.Add({{"vm", vm_}});
  for (int n = 0; n < nodes; ++n) {
    reclaimed_.push_back(&m_.reclaimed_bytes_.Add({{"vm", vm_}, {"node", std::to_string(n)}}));
    freed_nothing_.push_back(&m_.freed_nothing_.Add({{"vm", vm_}, {"node", std::to_string(n)}}));
  }
  for (size_t i = 0; i < kReclaimStates; ++i)
    state_[i] = &m_.reclaim_state_.Add(
        {{"vm", vm_}, {"state", std::string(to_string(static_cast<ReclaimState>(i)))}});
  for (size_t i = 0; i < kDisabledReasons; ++i)
    disabled_[i] = &m_.reclaim_disabled_.Add(
        {{"vm", vm_}, {"reason", std::string(to_string(static_cast<DisabledReason>(i)))}});
}

VmMetrics::~VmMetrics() {
  // Series of a VM that is gone are removed: VM names come and go on a busy
  // host and stale series would grow without bound.
  for (auto* c : reported_) m_.reported_bytes_.Remove(c);
  for (auto& row : discarded_)
    for (auto* c : row)
      if (c) m_.discarded_bytes_.Remove(c);
  for (auto* c : skipped_)
    if (c) m_.skipped_bytes_.Remove(c);
  for (auto* c : requests_) m_.requests_.Remove(c);
  for (auto& [k, c] : errors_) m_.protocol_errors_.Remove(c);
  for (auto& [k, c] : backend_requests_) m_.backend_requests_.Remove(c);
  if (dirty_pages_) m_.dirty_pages_.Remove(dirty_pages_);
  if (balloon_target_) m_.balloon_target_.Remove(balloon_target_);
  if (balloon_actual_) m_.balloon_actual_.Remove(balloon_actual_);
  for (auto& [k, c] : balloon_bytes_) m_.balloon_bytes_.Remove(c);
  for (auto& [k, c] : transfers_) m_.state_transfers_.Remove(c);
  for (auto& [k, c] : state_bytes_) m_.state_bytes_.Remove(c);
  for (auto& [k, g] : migration_state_) m_.migration_state_.Remove(g);
  m_.inflight_.Remove(inflight_);
  m_.guest_memory_.Remove(guest_memory_);
  m_.resident_.Remove(resident_);
  m_.backoff_.Remove(backoff_);
  m_.backoff_holds_.Remove(backoff_holds_);
  m_.refault_share_.Remove(refault_share_);
  m_.features_.Remove(features_);
  m_.refaulted_bytes_.Remove(refaulted_);
  for (auto* c : reclaimed_) m_.reclaimed_bytes_.Remove(c);
  for (auto* c : freed_nothing_) m_.freed_nothing_.Remove(c);
  for (auto* g : state_) m_.reclaim_state_.Remove(g);
  for (auto* g : disabled_) m_.reclaim_disabled_.Remove(g);
  for (size_t t = 0; t < guest_stat_.size(); ++t)
    if (guest_stat_[t]) m_.guest_stat_series_[t].family->Remove(guest_stat_[t]);
  if (stats_updates_) m_.stats_updates_.Remove(stats_updates_);
  if (stats_unknown_) m_.stats_unknown_tags_.Remove(stats_unknown_);
  if (stats_time_) m_.stats_timestamp_.Remove(stats_time_);
  if (unreported_free_) m_.unreported_free_.Remove(unreported_free_);
}

void VmMetrics::reported(int node, uint64_t bytes) {
  if (node >= 0 && node < nodes_) reported_[node]->Increment(static_cast<double>(bytes));
}

void VmMetrics::discarded(int node, reclaim::Method method, uint64_t bytes) {
  if (node < 0 || node >= nodes_ || bytes == 0) return;
  auto& slot = discarded_[node][static_cast<size_t>(method)];
  prometheus::Counter* c = __atomic_load_n(&slot, __ATOMIC_ACQUIRE);
  if (!c) {
    // Created on first use so a VM only shows the methods it really used.
    std::lock_guard lk(lazy_mu_);
    c = slot;
    if (!c) {
      c = &m_.discarded_bytes_.Add({{"vm", vm_},
                                    {"node", std::to_string(node)},
                                    {"method", std::string(reclaim::to_string(method))}});
      __atomic_store_n(&slot, c, __ATOMIC_RELEASE);
    }
  }
  c->Increment(static_cast<double>(bytes));
  discarded_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  m_.node_discarded_by_node_[node]->Increment(static_cast<double>(bytes));
}

void VmMetrics::skipped(reclaim::SkipReason r, uint64_t bytes) {
  if (bytes == 0) return;
  if (r == reclaim::SkipReason::Misaligned) misaligned_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  auto& slot = skipped_[static_cast<size_t>(r)];
  prometheus::Counter* c = __atomic_load_n(&slot, __ATOMIC_ACQUIRE);
  if (!c) {
    std::lock_guard lk(lazy_mu_);
    c = slot;
    if (!c) {
      c = &m_.skipped_bytes_.Add({{"vm", vm_}, {"reason", std::string(reclaim::to_string(r))}});
      __atomic_store_n(&slot, c, __ATOMIC_RELEASE);
    }
  }
  c->Increment(static_cast<double>(bytes));
}

void VmMetrics::request_done(RequestOutcome o) { requests_[static_cast<size_t>(o)]->Increment(); }

void VmMetrics::protocol_error(const std::string& reason) {
  std::lock_guard lk(err_mu_);
  auto it = errors_.find(reason);
  if (it == errors_.end())
    it = errors_.emplace(reason, &m_.protocol_errors_.Add({{"vm", vm_}, {"reason", reason}})).first;
  it->second->Increment();
}

void VmMetrics::backend_request(const std::string& request, bool sent) {
  std::lock_guard lk(err_mu_);
  auto key = std::make_pair(request, sent);
  auto it = backend_requests_.find(key);
  if (it == backend_requests_.end()) {
    auto& c = m_.backend_requests_.Add(
        {{"vm", vm_}, {"request", request}, {"outcome", sent ? "sent" : "failed"}});
    it = backend_requests_.emplace(key, &c).first;
  }
  it->second->Increment();
}

void VmMetrics::set_balloon(uint64_t target_bytes, uint64_t actual_bytes) {
  std::lock_guard lk(err_mu_);
  // Created once a balloon is in use (a target was set or the driver
  // reports pages), so a host that never sets one has no such series.
  if (!balloon_target_) {
    if (target_bytes == 0 && actual_bytes == 0) return;
    balloon_target_ = &m_.balloon_target_.Add({{"vm", vm_}});
    balloon_actual_ = &m_.balloon_actual_.Add({{"vm", vm_}});
  }
  balloon_target_->Set(static_cast<double>(target_bytes));
  balloon_actual_->Set(static_cast<double>(actual_bytes));
}

void VmMetrics::balloon_pages(std::string_view direction, uint64_t bytes) {
  std::lock_guard lk(err_mu_);
  auto it = balloon_bytes_.find(direction);
  if (it == balloon_bytes_.end())
    it = balloon_bytes_
             .emplace(std::string(direction),
                      &m_.balloon_bytes_.Add({{"vm", vm_}, {"direction", std::string(direction)}}))
             .first;
  it->second->Increment(static_cast<double>(bytes));
}

void VmMetrics::dirty_pages(uint64_t pages) {
  if (!pages) return;
  std::lock_guard lk(err_mu_);
  if (!dirty_pages_) dirty_pages_ = &m_.dirty_pages_.Add({{"vm", vm_}});
  dirty_pages_->Increment(static_cast<double>(pages));
}

void VmMetrics::state_transfer(const std::string& direction, const std::string& outcome, uint64_t bytes) {
  std::lock_guard lk(err_mu_);
  auto key = std::make_pair(direction, outcome);
  auto it = transfers_.find(key);
  if (it == transfers_.end())
    it = transfers_.emplace(key, &m_.state_transfers_.Add({{"vm", vm_}, {"direction", direction}, {"outcome", outcome}}))
             .first;
  it->second->Increment();
  auto b = state_bytes_.find(direction);
  if (b == state_bytes_.end())
    b = state_bytes_.emplace(direction, &m_.state_bytes_.Add({{"vm", vm_}, {"direction", direction}})).first;
  if (bytes) b->second->Increment(static_cast<double>(bytes));
}

void VmMetrics::set_migration_state(std::string_view state) {
  std::lock_guard lk(err_mu_);
  if (migration_state_.empty()) {
    for (auto s : kMigrationStates)
      migration_state_.emplace(std::string(s), &m_.migration_state_.Add({{"vm", vm_}, {"state", std::string(s)}}));
    // Counters start at 0 for every VM, so rate() and increase() have a
    // series before the first migration (failure outcomes appear on first use).
    if (!dirty_pages_) dirty_pages_ = &m_.dirty_pages_.Add({{"vm", vm_}});
    for (const char* dir : {"save", "load"}) {
      auto key = std::make_pair(std::string(dir), std::string("ok"));
      if (!transfers_.count(key))
        transfers_.emplace(key, &m_.state_transfers_.Add({{"vm", vm_}, {"direction", dir}, {"outcome", "ok"}}));
      if (!state_bytes_.count(dir))
        state_bytes_.emplace(dir, &m_.state_bytes_.Add({{"vm", vm_}, {"direction", dir}}));
    }
  }
  for (auto& [k, g] : migration_state_) g->Set(k == state ? 1 : 0);
}

void VmMetrics::set_inflight(int64_t n) { inflight_->Set(static_cast<double>(n)); }
void VmMetrics::set_guest_memory(uint64_t b) { guest_memory_->Set(static_cast<double>(b)); }
void VmMetrics::set_resident(uint64_t b) { resident_->Set(static_cast<double>(b)); }

void VmMetrics::set_backoff(bool holding, uint64_t holds, double share) {
  backoff_->Set(holding ? 1 : 0);
  if (holds > backoff_holds_seen_) backoff_holds_->Increment(static_cast<double>(holds - backoff_holds_seen_));
  backoff_holds_seen_ = holds;
  refault_share_->Set(share);
}
void VmMetrics::set_features(uint64_t f) { features_->Set(static_cast<double>(f)); }
void VmMetrics::refaulted(uint64_t b) {
  if (b) refaulted_->Increment(static_cast<double>(b));
}

void VmMetrics::reclaimed(int node, uint64_t bytes) {
  if (node < 0 || node >= nodes_ || bytes == 0) return;
  reclaimed_[node]->Increment(static_cast<double>(bytes));
  m_.node_reclaimed_by_node_[node]->Increment(static_cast<double>(bytes));
}

uint64_t VmMetrics::reported_total() const {
  double sum = 0;
  for (const auto* c : reported_) sum += c->Value();
  return static_cast<uint64_t>(sum);
}

uint64_t VmMetrics::reclaimed_total() const {
  double sum = 0;
  for (const auto* c : reclaimed_) sum += c->Value();
  return static_cast<uint64_t>(sum);
}

uint64_t VmMetrics::refaulted_total() const { return static_cast<uint64_t>(refaulted_->Value()); }

void VmMetrics::freed_nothing(int node) {
  if (node >= 0 && node < nodes_) freed_nothing_[node]->Increment();
}

void VmMetrics::set_reclaim_state(std::optional<ReclaimState> state,
                                  std::optional<DisabledReason> reason) {
  for (size_t i = 0; i < kReclaimStates; ++i)
    state_[i]->Set(state && static_cast<size_t>(*state) == i ? 1 : 0);
  for (size_t i = 0; i < kDisabledReasons; ++i)
    disabled_[i]->Set(state == ReclaimState::Disabled && reason && static_cast<size_t>(*reason) == i ? 1 : 0);
}

}  // namespace fph::daemon

namespace fph::daemon {

void VmMetrics::guest_stats(const proto::balloon::Stats& s, uint64_t unknown_tags) {
  std::lock_guard lk(lazy_mu_);
  for (size_t t = 0; t < proto::balloon::kStatTags; ++t) {
    if (!s.values[t]) continue;
    auto& g = guest_stat_[t];
    if (!g) {
      auto labels = m_.guest_stat_series_[t].labels;
      labels["vm"] = vm_;
      g = &m_.guest_stat_series_[t].family->Add(labels);
    }
    g->Set(static_cast<double>(*s.values[t]));
  }
  if (!stats_updates_) {
    stats_updates_ = &m_.stats_updates_.Add({{"vm", vm_}});
    stats_unknown_ = &m_.stats_unknown_tags_.Add({{"vm", vm_}});
    stats_time_ = &m_.stats_timestamp_.Add({{"vm", vm_}});
  }
  stats_updates_->Increment();
  if (unknown_tags) stats_unknown_->Increment(static_cast<double>(unknown_tags));
  stats_time_->SetToCurrentTime();
}

std::optional<uint64_t> VmMetrics::unreported_free() {
  std::lock_guard lk(lazy_mu_);
  if (!unreported_free_) return std::nullopt;
  return static_cast<uint64_t>(unreported_free_->Value());
}

void VmMetrics::set_unreported_free(uint64_t bytes) {
  std::lock_guard lk(lazy_mu_);
  if (!unreported_free_) unreported_free_ = &m_.unreported_free_.Add({{"vm", vm_}});
  unreported_free_->Set(static_cast<double>(bytes));
}

}  // namespace fph::daemon
