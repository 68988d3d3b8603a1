#include "fph/daemon/session.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "fph/common/checked.h"
#include "fph/common/log.h"
#include "fph/daemon/queue_service.h"

namespace fph::daemon {

namespace vu = proto::vu;
namespace balloon = proto::balloon;
using vu::Request;

std::string_view to_string(SessionState s) {
  switch (s) {
    case SessionState::Negotiating: return "negotiating";
    case SessionState::Active: return "active";
    case SessionState::Stopped: return "stopped";
    case SessionState::Closing: return "closing";
  }
  return "?";
}

std::string_view to_string(MigrationState s) {
  switch (s) {
    case MigrationState::None: return "none";
    case MigrationState::Logging: return "logging";
    case MigrationState::Stopped: return "stopped";
    case MigrationState::Saving: return "saving";
    case MigrationState::Saved: return "saved";
    case MigrationState::Loaded: return "loaded";
    case MigrationState::Failed: return "failed";
  }
  return "?";
}

std::chrono::milliseconds stats_interval(const DaemonContext& ctx) {
  const auto spread = kStatsSpacing * std::max(ctx.live_sessions.load(std::memory_order_relaxed), 1);
  return std::max(ctx.stats_interval, std::chrono::duration_cast<std::chrono::milliseconds>(spread));
}

uint64_t offered_features(const DaemonContext& ctx) {
  return kOfferedFeatures | (ctx.stats_interval.count() > 0 ? balloon::kFStatsVq : 0);
}

std::optional<std::pair<std::string, std::string>> check_acked_features(uint64_t acked, uint64_t offered) {
  if (acked & ~offered)
    return std::pair<std::string, std::string>{
        "features_not_offered", fmt::format("features: 0x{:x} include bits we did not offer (0x{:x})",
                                            acked, acked & ~offered)};
  if (!(acked & balloon::kFVersion1))
    return std::pair<std::string, std::string>{
        "version_1_missing",
        fmt::format("features: 0x{:x} lack VIRTIO_F_VERSION_1 (bit 32); fphd is a virtio 1.x device "
                    "only (no legacy interface); features not applied",
                    acked)};
  return std::nullopt;
}

Session::Session(DaemonContext& ctx, UniqueFd sock, std::string name)
    : ctx_(ctx),
      sock_(std::move(sock)),
      wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
      name_(std::move(name)),
      vm_metrics_(ctx.metrics.acquire_vm(name_)) {
  discard_while_logging_ = ctx_.discard_while_logging;
  ctx_.live_sessions.fetch_add(1, std::memory_order_relaxed);
  vm_metrics_->set_migration_state(to_string(MigrationState::None));
  ctx_.metrics.session_opened();
  // A target the operator set for this VM survives its reconnects and fphd
  // restarts (balloon_targets.h): in place before the driver reads it.
  if (ctx_.balloon_targets) {
    if (auto t = ctx_.balloon_targets->get(name_)) {
      config_.num_pages = *t;
      log::info("session", "vm={} balloon target restored: num_pages={} ({} MiB)", name_, *t,
                (uint64_t{*t} << balloon::kPfnShift) >> 20);
    }
  }
  if (ctx_.vm_policy) {
    const VmPolicy p = ctx_.vm_policy->resolve(name_);
    set_policy(p, ctx_.vm_policy->backoff_for(p));
  }
}

Session::~Session() {
  ctx_.live_sessions.fetch_sub(1, std::memory_order_relaxed);
  vm_metrics_->set_inflight(0);
  vm_metrics_->clear_state();
  vm_metrics_.reset();
  ctx_.metrics.release_vm(name_);
  ctx_.metrics.session_closed();
}

void Session::request_stop() {
  stopping_ = true;
  if (sock_) ::shutdown(sock_.get(), SHUT_RDWR);
  uint64_t one = 1;
  if (wake_) (void)!::write(wake_.get(), &one, sizeof one);
}

void Session::yank() {
  yanked_ = true;
  cancel_->store(true);
  request_stop();
  // Wake a GET_VRING_BASE waiting for in-flight requests (wait_inflight).
  { std::lock_guard lk(mu_); }
  cv_.notify_all();
  log::warn("session", "vm={} yanked", name_);
}

void Session::set_paused(bool p) {
  {
    std::lock_guard lk(mu_);
    policy_.paused = p;
  }
  paused_ = p;
  log::info("session", "vm={} reclaim {}", name_, p ? "paused" : "resumed");
}

void Session::set_policy(const VmPolicy& p, const BackoffConfig& backoff) {
  VmPolicy before;
  {
    std::lock_guard lk(mu_);
    before = policy_;
    policy_ = p;
  }
  paused_ = p.paused;
  backoff_->configure(backoff);
  if (before != p)
    log::info("session", "vm={} policy: rate-limit={} B/s min-block={} mode={} paused={} backoff={}", name_,
              p.rate_limit, p.min_block,
              !p.mode ? "node" : *p.mode == reclaim::PrivateMode::Eager ? "eager"
                               : *p.mode == reclaim::PrivateMode::Lazy  ? "lazy" : "auto",
              p.paused,
              p.backoff ? "on" : "off");
}

VmPolicy Session::policy() const {
  std::lock_guard lk(mu_);
  return policy_;
}

void Session::run_batch_at(uint32_t queue, std::chrono::steady_clock::time_point due, reclaim::Batch b) {
  if (due > std::chrono::steady_clock::now()) {
    // Over the VM's rate: the request waits here, on its own session, not
    // in the node pipeline where it would hold up every other VM's work.
    deferred_.push_back({due, queue, std::move(b)});
    deferred_count_.store(static_cast<int>(deferred_.size()), std::memory_order_relaxed);
    return;
  }
  dispatch(b);
}

void Session::dispatch(reclaim::Batch& b) {
  // Cheap work (a hugetlb request: tens to hundreds of microseconds in the
  // kernel) is done here, on the thread that took the kick: handing it to
  // the node's pipeline and back would cost as much as the discard itself.
  // Expensive work goes to the node's pipeline (node_pipeline.h).
  if (!ctx_.pipelines.try_run_inline(b)) ctx_.pipelines.submit(std::move(b));
}

void Session::run_deferred(bool all, int queue) {
  if (deferred_.empty()) return;
  const auto now = std::chrono::steady_clock::now();
  std::vector<reclaim::Batch> ready;
  std::erase_if(deferred_, [&](DeferredBatch& d) {
    const bool go = d.due <= now || (all && (queue < 0 || d.queue == static_cast<uint32_t>(queue)));
    if (go) ready.push_back(std::move(d.batch));
    return go;
  });
  deferred_count_.store(static_cast<int>(deferred_.size()), std::memory_order_relaxed);
  for (auto& b : ready) dispatch(b);
}

std::optional<std::chrono::steady_clock::time_point> Session::next_deferred() const {
  std::optional<std::chrono::steady_clock::time_point> t;
  for (const auto& d : deferred_)
    if (!t || d.due < *t) t = d.due;
  return t;
}

Expected<void, std::string> Session::set_num_pages(uint32_t pages) {
  {
    std::lock_guard lk(mu_);
    config_.num_pages = pages;
  }
  log::info("session", "vm={} balloon target num_pages={} ({} MiB)", name_, pages,
            (uint64_t{pages} << balloon::kPfnShift) >> 20);
  auto r = backend_.config_changed();
  vm_metrics_->backend_request("config_change", r.has_value());
  if (!r) {
    log::warn("session", "vm={} config change not notified: {}", name_, r.error());
    return r;
  }
  return {};
}

SessionInfo Session::info() const {
  std::lock_guard lk(mu_);
  SessionInfo i;
  i.name = name_;
  i.features = features_;
  i.protocol_features = protocol_features_;
  i.status = status_;
  i.regions = table_->regions().size();
  i.memory_bytes = table_->total_bytes();
  i.inflight = exported_inflight_locked();
  i.paused = paused_;
  i.poison_val = config_.poison_val;
  i.num_pages = config_.num_pages;
  i.actual = config_.actual;
  i.backend_channel = backend_.attached();
  i.features_set = features_set_;
  if (layout_.reporting >= 0 && layout_.reporting < static_cast<int>(kMaxQueues)) {
    const Vring& r = vrings_[layout_.reporting];
    i.reporting_live = r.started && r.enabled;
    i.reporting_ever_started = r.ever_started;
  }
  for (const auto& r : table_->regions()) i.max_page_size = std::max(i.max_page_size, r->page_size);
  i.yanked = yanked_;
  i.stats_negotiated = features_ & balloon::kFStatsVq;
  i.stats_held = stats_.holding_locked();
  i.policy = policy_;
  i.deferred = deferred_count_.load(std::memory_order_relaxed);
  bool any_started = false;
  for (const auto& v : vrings_) {
    i.requests += v.requests;
    any_started = any_started || v.started;
  }
  i.state = stopping_     ? SessionState::Closing
            : any_started ? SessionState::Active
            : status_ != 0 && features_set_ ? SessionState::Stopped
                                            : SessionState::Negotiating;
  return i;
}

std::shared_ptr<const MemoryTable> Session::table() const {
  std::lock_guard lk(mu_);
  return table_;
}

reclaim::SkipReason Session::skip_reason(uint32_t queue) const {
  // Called with mu_ held by the queue service.
  if ((features_ & balloon::kFPagePoison) && config_.poison_val != 0)
    return reclaim::SkipReason::Poisoned;  // a discarded page would read 0, not poison_val
  if (paused_) return reclaim::SkipReason::Paused;
  if (logging_locked() && !discard_while_logging_) return reclaim::SkipReason::Migrating;
  if (queue < kMaxQueues && !vrings_[queue].enabled)
    return reclaim::SkipReason::Stopped;  // started + disabled: no side effects (vu-doc)
  // Backoff concerns what the guest offers: pages the host asked for with
  // the balloon target (inflate) are always taken.
  if (static_cast<int>(queue) == layout_.reporting && backoff_->holding())
    return reclaim::SkipReason::Backoff;
  return reclaim::SkipReason::None;
}

void Session::run() {
  log::info("session", "vm={} connected", name_);
  while (!stopping_ && serve_one()) {
  }
  // Teardown: nothing taken is left behind. Queued work of a disconnected
  // or yanked guest is cancelled (nobody waits for it), running work
  // finishes. A stop we asked for (SIGTERM drain, detach) completes the
  // queued work instead: a returned request then means what it always
  // means, its blocks were discarded, and a guest that reconnects and
  // checks them finds them zero.
  if (!stopping_ || yanked_) cancel_->store(true);
  ::shutdown(sock_.get(), SHUT_RDWR);  // the peer sees EOF now, not when we are destroyed
  transfer_.reset();  // ends at its deadline at the latest (at once if cancelled)
  // Requests waiting for the VM's rate limit go now: cancelled if the
  // front end is gone (the token is set above), completed if we stop.
  run_deferred(true);
  std::unique_lock lk(mu_);
  release_stats_locked(-1);  // a held stats buffer is never waited for
  for (auto& v : vrings_) v.started = false;
  cv_.wait(lk, [&] { return inflight_total_ == 0; });
  const uint64_t held = log_budget_.held_back_total();
  log::info("session", "vm={} disconnected{}", name_,
            held ? fmt::format(" ({} of its log lines were held back by its budget)", held) : "");
}

bool Session::serve_one() {
  std::vector<pollfd> fds;
  fds.push_back({sock_.get(), POLLIN, 0});
  fds.push_back({wake_.get(), POLLIN, 0});
  std::vector<uint32_t> kick_queue;
  {
    std::lock_guard lk(mu_);
    for (uint32_t i = 0; i < kMaxQueues; ++i) {
      if (vrings_[i].started && vrings_[i].kick) {
        fds.push_back({vrings_[i].kick.get(), POLLIN, 0});
        kick_queue.push_back(i);
      }
    }
  }
  // The stats queue's timer (the held stats buffer is due) and the rate
  // limit's (a deferred request is due): the earlier one.
  int timeout_ms = -1;
  {
    std::lock_guard lk(mu_);
    auto due = stats_.deadline_locked();
    if (auto d = next_deferred(); d && (!due || *d < *due)) due = d;
    if (due) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(*due - StatsService::Clock::now());
      timeout_ms = static_cast<int>(std::clamp<int64_t>(left.count(), 0, 60'000));
    }
  }
  int n = ::poll(fds.data(), fds.size(), timeout_ms);
  if (n < 0) {
    if (errno == EINTR) return true;
    log::error("session", "vm={} poll: {}", name_, std::strerror(errno));
    return false;
  }
  if (fds[1].revents) return false;  // request_stop
  request_stats_if_due();
  run_deferred(false);
  // A fault since the last pass (a completion's used-ring write on a
  // pipeline thread, the stats timer's just above) closes the session here.
  if (check_memory_faults()) return false;
  for (size_t i = 2; i < fds.size(); ++i) {
    if (fds[i].revents & POLLIN) {
      uint64_t v;
      (void)!::read(fds[i].fd, &v, sizeof v);
      service_kick(kick_queue[i - 2]);
    }
  }
  if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
    auto msg = vu::recv_message(sock_.get());
    if (!msg) {
      const auto& e = msg.error();
      if (e.code == vu::ChannelErrc::Closed) return false;
      if (e.code == vu::ChannelErrc::TooManyFds) {
        // The header was valid and the payload consumed: framing is intact,
        // so only this message is refused (its fds are already closed), and
        // answered like any refused message.
        return refuse(e.header, "too_many_fds", e.message());
      }
      if (e.code == vu::ChannelErrc::Protocol) {
        log::error("session", "vm={} bad message header, closing: {}", name_, e.message());
        vm_metrics_->protocol_error("bad_header");
        return false;
      }
      if (!stopping_) log::warn("session", "vm={} socket error, closing: {}", name_, e.message());
      return false;
    }
    // A message handler that touched a shrunk region (starting a ring reads
    // its used index) does not wait for the next kick to close.
    return handle(*msg) && !check_memory_faults();
  }
  return true;
}

void Session::fail(const vu::Message& m, const std::string& reason, const std::string& detail) {
  fail(m.header, reason, detail);
}

void Session::fail(const vu::Header& h, const std::string& reason, const std::string& detail) {
  protocol_error("session", reason, fmt::format("{}: {}", vu::request_name(h.request), detail));
}

void Session::protocol_error(std::string_view component, const std::string& reason,
                             const std::string& detail) {
  log::error(log_budget_, component, "vm={} {}", name_, detail);
  vm_metrics_->protocol_error(reason);
}

bool Session::refuse(const vu::Header& h, const std::string& reason, const std::string& detail) {
  fail(h, reason, detail);
  if (vu::always_replies(h.request)) {
    // The front end waits for this message's own reply; NEED_REPLY does not
    // apply to it (vu-doc), so a REPLY_ACK nack would be read as the answer.
    if (auto e = vu::error_reply(h.request)) {
      auto r = vu::send_reply(sock_.get(), h.request, *e);
      if (!r) {
        log::warn("session", "vm={} error reply to {} failed: {}", name_, vu::request_name(h.request),
                  r.error().message());
        return false;
      }
      return true;
    }
    log::error("session", "vm={} {} refused and its reply has no error form: closing the session "
               "rather than leaving the front end waiting", name_, vu::request_name(h.request));
    return false;
  }
  if (!h.need_reply()) return true;
  if (!(protocol_features_ & vu::protocol::bit(vu::protocol::kReplyAck))) return true;
  (void)vu::send_reply(sock_.get(), h.request, vu::encode_u64(1));
  return true;
}

void Session::send_ack(const vu::Message& m, bool ok) {
  // REPLY_ACK (vu-doc): with the feature negotiated, NEED_REPLY asks for a
  // u64 status, 0 = success.
  if (!m.header.need_reply()) return;
  if (!(protocol_features_ & vu::protocol::bit(vu::protocol::kReplyAck))) return;
  auto payload = vu::encode_u64(ok ? 0 : 1);
  (void)vu::send_reply(sock_.get(), m.header.request, payload);
}

bool Session::send_reply_payload(const vu::Message& m, std::span<const uint8_t> payload) {
  auto r = vu::send_reply(sock_.get(), m.header.request, payload);
  if (!r) {
    log::warn("session", "vm={} reply to {} failed: {}", name_, vu::request_name(m.header.request),
              r.error().message());
    return false;
  }
  return true;
}

void Session::set_table(std::shared_ptr<const MemoryTable> t, std::string_view why) {
  // Every started ring is located again in the new table (vring.h), in the
  // same critical section as the swap: a chain returned meanwhile writes the
  // used ring either in the old mapping (kept by ring_regions) or the new.
  std::vector<uint32_t> lost;
  {
    std::lock_guard lk(mu_);
    table_ = std::move(t);
    vm_metrics_->set_guest_memory(table_->total_bytes());
    for (uint32_t idx = 0; idx < kMaxQueues; ++idx) {
      Vring& v = vrings_[idx];
      if (!v.started) continue;
      auto parts = locate_ring(v.addr, v.num, *table_);
      if (parts) {
        place_ring_locked(idx, *parts);
        continue;
      }
      // Its memory is gone: the front end may reuse those pages, so the used
      // ring is never written again; chains in flight are dropped.
      protocol_error("session", "ring_unmapped",
                     fmt::format("vring {} is no longer inside guest memory after {}: {}; ring stopped "
                                 "(set its addresses again)",
                                 idx, why, parts.error()));
      v.abandoned = true;
      lost.push_back(idx);
    }
  }
  for (uint32_t idx : lost) {
    stop_ring(idx);
    std::lock_guard lk(mu_);
    vrings_[idx].unconfigure(Vring::Field::Addr);
  }
}

void Session::wait_inflight(uint32_t idx, std::unique_lock<std::mutex>& lk) {
  // A yank gives up waiting: the front end is gone or hung, and run()'s
  // teardown waits for the cancelled work instead.
  cv_.wait(lk, [&] { return vrings_[idx].inflight == 0 || yanked_; });
}

// SET_VRING_NUM/BASE/ADDR arrive for a ring that is still started.
//
// QEMU always stops a ring (GET_VRING_BASE) before it sets it up again.
// Linux's virtio_uml never sends GET_VRING_BASE: when the balloon driver is
// unloaded and loaded again (or the guest resets the device) it sends
// SET_FEATURES, a new memory table and sets every ring up again from scratch
// (docs/protocol.md, "Front ends seen in practice"). It does not ack
// VHOST_USER_F_PROTOCOL_FEATURES, so its rings are enabled from the start and
// it has no message to disable them either. A ring the front end cannot
// stop otherwise (no PROTOCOL_FEATURES), or that it has disabled, is
// therefore stopped here exactly as GET_VRING_BASE would stop it: its
// in-flight requests are returned first, so nothing is discarded for the old
// ring afterwards, and the new ring is checked when it starts. A ring that
// is started and enabled by a front end that could have stopped it is live:
// SET_VRING_NUM on it is refused (`ring_busy`, which stops it: vring.h);
// BASE is stored for the next start and new ADDR (QEMU sends the same
// addresses with the log flag when dirty logging starts) is used at once.
// Returns false if the message was refused (already answered).
bool Session::prepare_reconfigure(const vu::Message& m, uint32_t idx, bool refuse_if_enabled) {
  bool live;
  {
    std::lock_guard lk(mu_);
    const Vring& v = vrings_[idx];
    if (!v.started) return true;
    live = v.enabled && (features_ & vu::feature::kProtocolFeatures);
  }
  if (live) {
    if (!refuse_if_enabled) return true;
    // Refused, so (vring.h) the ring stops and its size is unconfigured.
    (void)refuse_ring_config(m.header, idx, Vring::Field::Num, "ring_busy",
                             fmt::format("vring {} is started and enabled (GET_VRING_BASE stops it)", idx));
    return false;
  }
  // The driver reset the device without telling us (virtio_uml's reset is
  // local) and may already have freed the ring's memory: from now on fphd
  // must not write the old used ring. Chains still out (the held stats
  // buffer, a reporting request of a driver that did not wait) are dropped,
  // not returned. Seen with Linux 6.1 UML: returning the held stats buffer
  // into the old ring panicked the guest at the next `insmod virtio_balloon`.
  {
    std::lock_guard lk(mu_);
    vrings_[idx].abandoned = true;
  }
  log::info(log_budget_, "session",
            "vm={} vring {} set up again while started: the driver reset it; stopping it "
            "without writing the old ring",
            name_, idx);
  stop_ring(idx);
  return true;
}

void Session::start_ring(uint32_t idx) {
  bool lost = false;
  {
    std::lock_guard lk(mu_);
    Vring& v = vrings_[idx];
    if (!v.configured()) return;
    // The addresses were inside the table when they arrived; the table may
    // have changed since (they are checked again, for the full size).
    auto parts = locate_ring(v.addr, v.num, *table_);
    if (!parts) {
      protocol_error(
          "session", "ring_unmapped",
          fmt::format("vring {}: {}; ring not started (set its addresses again)", idx, parts.error()));
      v.unconfigure(Vring::Field::Addr);
      lost = v.started;
      v.abandoned = v.abandoned || lost;
    } else {
      place_ring_locked(idx, *parts);
      v.started = true;
      v.ever_started = true;
      v.abandoned = false;
      log::debug("session", "vm={} vring {} ({}) started: num={} base={}", name_, idx,
                 balloon::to_string(layout_.role(idx)), v.num, v.base);
    }
  }
  if (lost) stop_ring(idx);
}

void Session::place_ring_locked(uint32_t idx, const RingParts& parts) {
  Vring& v = vrings_[idx];
  // A ring that is already running (a new kick fd, new addresses or a new
  // memory table while started) continues where it is: restarting from
  // SET_VRING_BASE's value would take chains that were already returned a
  // second time, and their ranges may have been reallocated by the guest
  // since. Its in-flight heads stay in flight: they come back through the
  // new ring, and offering one of them again is still an error.
  const uint16_t next_avail = v.started ? v.ring.next_avail() : v.base;
  proto::vq::DeviceRing ring(static_cast<uint16_t>(v.num), parts.desc, parts.avail, parts.used, next_avail,
                             features_ & balloon::kFIndirectDesc, false);
  if (v.started) ring.inherit_in_flight(v.ring);
  v.ring = std::move(ring);
  v.ring.sync_used_idx();
  v.ring_regions = table_->regions();
}

bool Session::refuse_ring_config(const vu::Header& h, uint32_t idx, Vring::Field f,
                                 const std::string& reason, const std::string& detail) {
  // vring.h: a refused SET_VRING_* leaves the ring unusable until it is set
  // again correctly. A started ring stops first, as GET_VRING_BASE would stop
  // it (its in-flight requests are returned), so the nack reaches the front
  // end with the ring already stopped.
  bool was_started;
  {
    std::lock_guard lk(mu_);
    was_started = vrings_[idx].started;
  }
  if (was_started) stop_ring(idx);
  {
    std::lock_guard lk(mu_);
    vrings_[idx].unconfigure(f);
  }
  return refuse(h, reason,
                fmt::format("{}; vring {} {} unconfigured{}", detail, idx, Vring::field_name(f),
                            was_started ? ", ring stopped" : ""));
}

void Session::request_stats_if_due() {
  // Asking the driver for fresh stats = returning its buffer (virtio 1.2
  // 5.5.6.3): it refills the buffer, adds it again and kicks.
  std::lock_guard lk(mu_);
  if (auto h = stats_.take_due_locked(StatsService::Clock::now())) {
    log::debug("session", "vm={} vring {}: requesting guest stats", name_, h->queue);
    return_chain_locked(h->queue, h->head);
  }
}

void Session::release_stats_locked(int idx) {
  if (auto h = stats_.take_held_locked(idx)) return_chain_locked(h->queue, h->head);
}

int Session::exported_inflight_locked() const {
  int n = inflight_total_;
  if (layout_.stats >= 0 && layout_.stats < static_cast<int>(kMaxQueues)) n -= vrings_[layout_.stats].inflight;
  return n;
}

void Session::stop_ring(uint32_t idx) {
  // Requests of this ring waiting for the VM's rate limit are in flight:
  // they run now, so the wait below ends.
  run_deferred(true, static_cast<int>(idx));
  std::unique_lock lk(mu_);
  Vring& v = vrings_[idx];
  // The stats queue's buffer is held until the next request: return it now,
  // it is not something to wait for.
  release_stats_locked(static_cast<int>(idx));
  // GET_VRING_BASE: every taken request is returned before the ring stops
  // (vu-doc: finish in-flight requests before stopping), so the driver never
  // waits forever and nothing is discarded after the state is captured.
  wait_inflight(idx, lk);
  if (yanked_) return;  // in-flight requests still use the ring and its regions
  if (v.started) v.base = v.ring.next_avail();
  v.started = false;
  v.kick.reset();
  v.ring_regions.clear();
  if (migration_ == MigrationState::Logging && !any_ring_started_locked())
    set_migration_state_locked(MigrationState::Stopped);
}

void Session::reset_device() {
  for (uint32_t i = 0; i < kMaxQueues; ++i) stop_ring(i);
  std::lock_guard lk(mu_);
  for (auto& v : vrings_) {
    v.enabled = false;
    v.ever_started = false;
    v.base = 0;
    v.base_set = true;
    v.addr_set = false;
    v.num = 0;
  }
}

void Session::service_kick(uint32_t idx) {
  std::shared_ptr<const MemoryTable> table;
  balloon::QueueRole role;
  {
    std::lock_guard lk(mu_);
    if (!vrings_[idx].started) return;
    table = table_;
    role = layout_.role(idx);
  }
  const bool ok = role == balloon::QueueRole::Stats ? stats_.service(*this, idx, vrings_[idx], mu_, table, stats_interval(ctx_))
                                                    : service_queue(*this, idx, role, vrings_[idx], mu_, table);
  // A fault in the ring or a buffer (the front end shrank its file) was
  // turned into zeros by the SIGBUS guard: what was read there is garbage,
  // so the session ends here, before anything else is served.
  if (check_memory_faults()) return;
  if (!ok) {
    // The queue service logged and counted why (chain_avail_index_jump,
    // chain_head_in_flight): the ring cannot be served any more.
    log::error("session", "vm={} vring {} is broken; closing the session", name_, idx);
    request_stop();
  }
}

bool Session::check_memory_faults() {
  // The one place a guarded fault becomes a closed session (DESIGN: a SIGBUS
  // would kill every VM's reclaim, so memory_guard.h turns it into zeros and
  // this check closes the VM that caused it). Cheap: one atomic load per
  // region. Regions of the current table and those a started ring still
  // uses (a replaced table's regions live on until the ring restarts).
  if (memory_fault_reported_.load(std::memory_order_relaxed)) return true;
  if (guard_faults() == 0) return false;  // no fault anywhere: no lock, no scan
  std::shared_ptr<const MappedRegion> hit;
  bool log_hit = false;
  {
    std::lock_guard lk(mu_);
    for (const auto& r : table_->regions())
      if (r->faulted()) hit = r;
    for (const auto& v : vrings_)
      for (const auto& r : v.ring_regions)
        if (!hit && r->faulted()) hit = r;
    log_hit = log_ && log_->faulted();
  }
  if (!hit && !log_hit) return false;
  if (memory_fault_reported_.exchange(true)) return true;
  if (!hit) {
    log::error("session", "vm={} the dirty log faulted (the front end shrank the log file under "
               "its mapping); closing the session", name_);
    vm_metrics_->protocol_error("memory_fault");
    request_stop();
    return true;
  }
  const uintptr_t at = hit->guard.fault_addr();
  const uint64_t off = at >= reinterpret_cast<uintptr_t>(hit->host_base())
                           ? at - reinterpret_cast<uintptr_t>(hit->host_base())
                           : 0;
  log::error("session",
             "vm={} guest memory region gpa=0x{:x} size=0x{:x} faulted at +0x{:x} (the front end "
             "shrank the file under its mapping); closing the session",
             name_, hit->desc.guest_phys_addr, hit->desc.memory_size, off);
  vm_metrics_->protocol_error("memory_fault");
  request_stop();
  return true;
}

void Session::taken_locked(uint32_t queue) {
  // The sampler visits VMs with requests every second, idle ones less often.
  if (static_cast<int>(queue) != layout_.stats) activity_.fetch_add(1, std::memory_order_relaxed);
  vrings_[queue].inflight++;
  inflight_total_++;
  vm_metrics_->set_inflight(exported_inflight_locked());
}

void Session::return_chain(uint32_t queue, uint16_t head,
                           std::span<const std::pair<uint64_t, uint64_t>> discarded) {
  {
    std::lock_guard lk(mu_);
    if (!discarded.empty() && logging_locked())
      for (const auto& [gpa, len] : discarded) log_write_locked(gpa, len);
    return_chain_locked(queue, head);
  }
  // The used ring write above may have been the access that faulted (it
  // runs on a node pipeline's thread): close the session now rather than at
  // its next kick.
  (void)check_memory_faults();
}

void Session::return_chain_locked(uint32_t queue, uint16_t head) {
  Vring& v = vrings_[queue];
  const uint16_t old = v.ring.used_idx();
  // The device writes nothing into reported pages, nor into the stats
  // buffer (device-readable): used length 0. An abandoned ring (the driver
  // reset it, see prepare_reconfigure) is not written at all.
  if (!v.abandoned) {
    v.ring.push_used(head, 0);
    log_used_write_locked(v, old);
  }
  v.requests++;
  if (!v.abandoned && v.call && v.ring.should_notify(old)) {
    // The call fd is an eventfd (QEMU) or a pipe (Linux virtio_uml). It is
    // non-blocking: EAGAIN means a notification is already pending, EPIPE
    // that the driver closed its end (unloaded); neither is worth waiting for.
    uint64_t one = 1;
    (void)!::write(v.call.get(), &one, sizeof one);
  }
  v.inflight--;
  inflight_total_--;
  vm_metrics_->set_inflight(exported_inflight_locked());
  cv_.notify_all();
}

bool Session::handle(vu::Message& m) {
  const uint32_t req = m.header.request;
  const auto payload = std::span<const uint8_t>(m.payload);
  const std::string rname = vu::request_name(req);

  // Only the back end sends replies on this socket (vu-doc: REPLY is set on
  // replies): a front end that sets the flag has lost track of the
  // conversation, and answering it could only add to the confusion.
  if (m.header.is_reply()) {
    fail(m, "unexpected_reply",
         fmt::format("flags 0x{:x} carry the REPLY flag (0x{:x}), which only the back end sets; "
                     "closing the session", m.header.flags, vu::kFlagReply));
    return false;
  }
  // File descriptor count first: a message with the wrong number of fds is
  // refused as a whole (its fds are closed when `m` goes away).
  if (req >= 1 && req <= vu::kMaxRequest) {
    auto ok = vu::check_fds(req, payload, m.fds.size());
    if (!ok) {
      const bool count = ok.error().code == proto::ParseErrc::BadFdCount;
      return refuse(m.header, count ? "bad_fd_count" : "bad_payload", ok.error().message());
    }
  }

  auto bad = [&](const proto::ParseError& e) {
    return refuse(m.header, "bad_payload", e.message());
  };

  switch (static_cast<Request>(req)) {
    case Request::GetFeatures:
      return send_reply_payload(m, vu::encode_u64(offered_features(ctx_)));

    case Request::SetFeatures: {
      auto f = vu::parse_u64(payload, "features");
      if (!f) return bad(f.error());
      if (auto why = check_acked_features(*f, offered_features(ctx_))) {
        {
          std::lock_guard lk(mu_);
          features_refused_ = true;
        }
        return refuse(m.header, why->first, why->second);
      }
      std::lock_guard lk(mu_);
      features_refused_ = false;
      const bool was_logging = features_ & vu::feature::kLogAll;
      const bool logging = *f & vu::feature::kLogAll;
      features_ = *f;
      features_set_ = true;
      if (logging != was_logging) {
        log::info(log_budget_, "session", "vm={} dirty logging {}{}", name_, logging ? "on" : "off",
                  logging && !log_ ? " (no log attached yet)" : "");
        if (logging && log_) set_migration_state_locked(MigrationState::Logging);
        if (!logging && migration_ == MigrationState::Logging)
          set_migration_state_locked(MigrationState::None);
      }
      layout_ = balloon::queue_layout(features_);
      // Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled at once
      // (vu-doc "Ring states").
      if (!(features_ & vu::feature::kProtocolFeatures))
        for (auto& v : vrings_) v.enabled = true;
      log::info(log_budget_, "session", "vm={} features 0x{:x} ({}reporting{}{}, reporting queue {})", name_,
                features_, (features_ & balloon::kFReporting) ? "" : "no ",
                (features_ & balloon::kFPagePoison) ? ", page poison" : "",
                (features_ & balloon::kFStatsVq) ? fmt::format(", stats queue {}", layout_.stats) : "",
                layout_.reporting);
      break;
    }

    case Request::GetProtocolFeatures:
      return send_reply_payload(m, vu::encode_u64(kOfferedProtocolFeatures));

    case Request::SetProtocolFeatures: {
      auto f = vu::parse_u64(payload, "protocol_features");
      if (!f) return bad(f.error());
      if (*f & ~kOfferedProtocolFeatures) {
        fail(m, "features_not_offered",
             fmt::format("protocol features 0x{:x} include bits we did not offer", *f));
        // Keep what we understand; the front end must not use the rest.
      }
      std::lock_guard lk(mu_);
      protocol_features_ = *f & kOfferedProtocolFeatures;
      break;
    }

    case Request::SetOwner:
      break;

    case Request::ResetOwner:
    case Request::ResetDevice:
      reset_device();
      break;

    case Request::SetMemTable: {
      auto regions = vu::parse_mem_table(payload);
      if (!regions) return bad(regions.error());
      std::vector<std::shared_ptr<MappedRegion>> mapped;
      for (size_t i = 0; i < regions->size(); ++i) {
        auto r = map_region((*regions)[i], std::move(m.fds[i]), ctx_.topology);
        if (!r) {
          return refuse(m.header, "map_failed", fmt::format("regions[{}]: {}", i, r.error()));
        }
        mapped.push_back(std::move(*r));
      }
      auto t = std::make_shared<MemoryTable>(std::move(mapped));
      log::info(log_budget_, "session", "vm={} memory table: {} regions, {} MiB", name_, t->regions().size(),
                t->total_bytes() >> 20);
      set_table(std::move(t), "SET_MEM_TABLE");
      break;
    }

    case Request::AddMemReg: {
      auto r = vu::parse_single_region(payload);
      if (!r) return bad(r.error());
      std::shared_ptr<const MemoryTable> cur;
      {
        std::lock_guard lk(mu_);
        cur = table_;
      }
      if (cur->regions().size() >= vu::kMaxMemSlots) {
        return refuse(m.header, "too_many_regions",
                      fmt::format("already {} regions", cur->regions().size()));
      }
      if (cur->overlaps(*r)) {
        return refuse(m.header, "bad_payload",
             fmt::format("region.guest_phys_addr: [0x{:x}, +0x{:x}) overlaps an existing region",
                         r->guest_phys_addr, r->memory_size));
      }
      auto mr = map_region(*r, std::move(m.fds[0]), ctx_.topology);
      if (!mr) {
        return refuse(m.header, "map_failed", mr.error());
      }
      auto regions = cur->regions();
      regions.push_back(std::move(*mr));
      auto t = std::make_shared<MemoryTable>(std::move(regions));
      log::info(log_budget_, "session", "vm={} added region gpa=0x{:x} size={} MiB ({} total)", name_,
                r->guest_phys_addr, r->memory_size >> 20, t->regions().size());
      set_table(std::move(t), "ADD_MEM_REG");
      break;
    }

    case Request::RemMemReg: {
      auto r = vu::parse_single_region(payload);
      if (!r) return bad(r.error());
      std::shared_ptr<const MemoryTable> cur;
      {
        std::lock_guard lk(mu_);
        cur = table_;
      }
      const int i = cur->find(*r);
      if (i < 0) {
        return refuse(m.header, "bad_payload",
                      fmt::format("region.guest_phys_addr: no region at 0x{:x} size 0x{:x}",
                                  r->guest_phys_addr, r->memory_size));
      }
      auto regions = cur->regions();
      regions.erase(regions.begin() + i);
      // Work in flight keeps its own reference: the mapping goes away when
      // the last discard on it finishes.
      set_table(std::make_shared<MemoryTable>(std::move(regions)),
                fmt::format("REM_MEM_REG of gpa=0x{:x}", r->guest_phys_addr));
      break;
    }

    case Request::SetVringNum: {
      auto s = vu::parse_vring_state(payload);
      if (!s) return bad(s.error());
      if (s->index >= kMaxQueues)
        return refuse(m.header, "bad_payload",
                      fmt::format("vring_state.index {} out of range (< {})", s->index, kMaxQueues));
      if (!proto::vq::valid_queue_size(s->num))
        return refuse_ring_config(m.header, s->index, Vring::Field::Num, "bad_payload",
                                  fmt::format("vring_state.num {}: need a power of two <= 32768", s->num));
      if (!prepare_reconfigure(m, s->index, /*refuse_if_enabled=*/true)) return true;
      std::lock_guard lk(mu_);
      vrings_[s->index].num = s->num;
      break;
    }

    case Request::SetVringAddr: {
      auto a = vu::parse_vring_addr(payload);
      if (!a) return bad(a.error());
      if (a->index >= kMaxQueues)
        return refuse(m.header, "bad_payload",
                      fmt::format("vring_addr.index {} out of range (< {})", a->index, kMaxQueues));
      if (!prepare_reconfigure(m, a->index, /*refuse_if_enabled=*/false)) return true;
      // Checked where they arrive (vring.h), against the table as it is now.
      Expected<RingParts, std::string> where = unexpected(std::string());
      {
        std::lock_guard lk(mu_);
        where = locate_ring(*a, vrings_[a->index].num, *table_);
      }
      if (!where) {
        const bool misaligned = where.error().find("misaligned") != std::string::npos;
        return refuse_ring_config(m.header, a->index, Vring::Field::Addr,
                                  misaligned ? "bad_payload" : "ring_unmapped", where.error());
      }
      {
        std::lock_guard lk(mu_);
        vrings_[a->index].addr = *a;
        vrings_[a->index].addr_set = true;
      }
      start_ring(a->index);  // no-op until the kick fd arrives
      break;
    }

    case Request::SetVringBase: {
      auto s = vu::parse_vring_state(payload);
      if (!s) return bad(s.error());
      if (s->index >= kMaxQueues)
        return refuse(m.header, "bad_payload",
                      fmt::format("vring_state.index {} out of range (< {})", s->index, kMaxQueues));
      if (s->num > 0xffff)
        return refuse_ring_config(m.header, s->index, Vring::Field::Base, "bad_payload",
                                  fmt::format("vring_state.num: base {} does not fit in 16 bits", s->num));
      if (!prepare_reconfigure(m, s->index, /*refuse_if_enabled=*/false)) return true;
      std::lock_guard lk(mu_);
      vrings_[s->index].base = static_cast<uint16_t>(s->num);
      vrings_[s->index].base_set = true;
      break;
    }

    case Request::GetVringBase: {
      auto s = vu::parse_vring_state(payload);
      if (!s) return bad(s.error());
      if (s->index >= kMaxQueues)  // no error form: any base would be taken for the answer
        return refuse(m.header, "bad_payload", fmt::format("vring_state.index {} out of range", s->index));
      stop_ring(s->index);
      uint16_t base;
      {
        std::lock_guard lk(mu_);
        base = vrings_[s->index].base;
      }
      return send_reply_payload(m, vu::encode_vring_state({s->index, base}));
    }

    case Request::SetVringKick:
    case Request::SetVringCall:
    case Request::SetVringErr: {
      auto p = vu::parse_vring_fd(payload);
      if (!p) return bad(p.error());
      if (p->index >= kMaxQueues) {
        return refuse(m.header, "bad_payload", fmt::format("vring index {} out of range", p->index));
      }
      if (static_cast<Request>(req) == Request::SetVringKick) {
        if (p->no_fd)
          return refuse_ring_config(m.header, p->index, Vring::Field::Kick, "unsupported",
                                    "polling mode (no kick fd) is not supported");
        {
          std::lock_guard lk(mu_);
          vrings_[p->index].kick = std::move(m.fds[0]);
        }
        start_ring(p->index);
        // A kick may have been missed while the ring was being set up.
        service_kick(p->index);
        // The device runs again after a LOAD that bumped the epoch: tell the
        // driver now (a stopped device must not message the front end).
        bool notify = false;
        {
          std::lock_guard lk(mu_);
          notify = epoch_notify_pending_ && vrings_[p->index].started;
          if (notify) epoch_notify_pending_ = false;
        }
        if (notify) {
          auto r = backend_.config_changed();
          vm_metrics_->backend_request("config_change", r.has_value());
        }
      } else {
        UniqueFd fd = p->no_fd ? UniqueFd() : std::move(m.fds[0]);
        // Never block a pipeline thread on a driver that does not read its
        // call fd (see return_chain).
        if (fd && static_cast<Request>(req) == Request::SetVringCall) {
          const int fl = ::fcntl(fd.get(), F_GETFL);
          if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl | O_NONBLOCK) < 0) {
            return refuse(m.header, "bad_payload", fmt::format("vring {} call fd: fcntl: {}", p->index,
                                               std::strerror(errno)));
          }
        }
        std::lock_guard lk(mu_);
        auto& slot = static_cast<Request>(req) == Request::SetVringCall ? vrings_[p->index].call
                                                                         : vrings_[p->index].err;
        slot = std::move(fd);
      }
      break;
    }

    case Request::SetLogBase:
      return handle_set_log_base(m);

    case Request::SetLogFd: {
      // Optional "log updated" eventfd; QEMU's vhost-user front end does not
      // send it. Non-blocking: a full eventfd already says "updated".
      UniqueFd fd = m.fds.empty() ? UniqueFd() : std::move(m.fds[0]);
      if (fd) {
        const int fl = ::fcntl(fd.get(), F_GETFL);
        if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl | O_NONBLOCK) < 0) {
          return refuse(m.header, "bad_payload", fmt::format("log fd: fcntl: {}", std::strerror(errno)));
        }
      }
      std::lock_guard lk(mu_);
      log_call_ = std::move(fd);
      break;
    }

    case Request::SetDeviceStateFd:
      return handle_set_device_state_fd(m);

    case Request::CheckDeviceState:
      return handle_check_device_state(m);

    case Request::SetBackendReqFd:
      // The payload is empty (vu-doc); the fd count was checked above.
      backend_.attach(std::move(m.fds[0]));
      log::info("session", "vm={} back-end channel attached", name_);
      break;

    case Request::SetVringEnable: {
      auto s = vu::parse_vring_state(payload);
      if (!s) return bad(s.error());
      if (s->index >= kMaxQueues || s->num > 1) {
        return refuse(m.header, "bad_payload",
                      fmt::format("vring_state: index {} enable {}", s->index, s->num));
      }
      std::lock_guard lk(mu_);
      vrings_[s->index].enabled = s->num == 1;
      break;
    }

    case Request::GetConfig: {
      auto c = vu::parse_config(payload);
      if (!c) return bad(c.error());  // the error reply: offset 0, size 0
      const uint32_t space = balloon::config_space_size(offered_features(ctx_));
      if (auto ok = balloon::check_config_access(c->offset, c->size, space, balloon::ConfigAccess::Read); !ok)
        return refuse(m.header, "bad_config_access", ok.error().message());
      // The standard 16 bytes, then fph's epoch (balloon.h kFFphEpoch).
      std::array<uint8_t, balloon::kExtConfigSize> bytes{};
      {
        std::lock_guard lk(mu_);
        const auto std_bytes = balloon::encode_config(config_);
        std::copy(std_bytes.begin(), std_bytes.end(), bytes.begin());
        const uint32_t e = static_cast<uint32_t>(epoch_);
        for (int i = 0; i < 4; ++i) bytes[balloon::kOffFphEpoch + i] = static_cast<uint8_t>(e >> (8 * i));
      }
      vu::ConfigPayload out = *c;
      std::copy_n(bytes.begin() + c->offset, c->size, out.data.begin());
      return send_reply_payload(m, vu::encode_config(out));
    }

    case Request::SetConfig: {
      auto c = vu::parse_config(payload);
      if (!c) return bad(c.error());
      const auto access =
          c->flags == 1 ? balloon::ConfigAccess::MigrationWrite : balloon::ConfigAccess::Write;
      const uint32_t space = balloon::config_space_size(offered_features(ctx_));
      if (auto ok = balloon::check_config_access(c->offset, c->size, space, access); !ok)
        return refuse(m.header, "bad_config_access", ok.error().message());
      std::lock_guard lk(mu_);
      auto bytes = balloon::encode_config(config_);
      std::copy(c->data.begin(), c->data.end(), bytes.begin() + c->offset);
      const uint32_t old_poison = config_.poison_val;
      config_ = balloon::decode_config(bytes);
      if (config_.poison_val != old_poison)
        log::info(log_budget_, "session", "vm={} poison_val=0x{:x}{}", name_, config_.poison_val,
                  config_.poison_val ? ": reported pages will not be discarded" : "");
      break;
    }

    case Request::GetMaxMemSlots:
      return send_reply_payload(m, vu::encode_u64(vu::kMaxMemSlots));

    case Request::GetQueueNum:
      return send_reply_payload(m, vu::encode_u64(kMaxQueues));

    case Request::SetStatus: {
      auto s = vu::parse_u64(payload, "status");
      if (!s) return bad(s.error());
      if (*s > 0xff) {
        return refuse(m.header, "bad_payload", fmt::format("status 0x{:x} does not fit in 8 bits", *s));
      }
      if (*s == 0) reset_device();  // virtio reset
      std::lock_guard lk(mu_);
      uint8_t st = static_cast<uint8_t>(*s);
      if ((st & balloon::kStatusFeaturesOk) && features_refused_) {
        // virtio 1.2 2.2.2: a device that does not accept the driver's
        // features fails to set FEATURES_OK; GET_STATUS shows it cleared.
        log::warn(log_budget_, "session",
                  "vm={} SET_STATUS 0x{:x}: FEATURES_OK not taken, the last SET_FEATURES "
                  "was refused",
                  name_, st);
        st = static_cast<uint8_t>(st & ~balloon::kStatusFeaturesOk);
      }
      status_ = st;
      break;
    }

    case Request::GetStatus: {
      uint8_t st;
      {
        std::lock_guard lk(mu_);
        st = status_;
      }
      return send_reply_payload(m, vu::encode_u64(st));
    }

    default:
      if (req == 0 || req > vu::kMaxRequest)
        return refuse(m.header, "unknown_request", fmt::format("unknown request id {}", req));
      return refuse(m.header, "unsupported",
                    "request not supported by this back end (feature not offered)");
  }
  send_ack(m, true);
  (void)rname;
  return true;
}

}  // namespace fph::daemon
