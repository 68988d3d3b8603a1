// A session's part in live migration (reference 4.5-4.7, DESIGN section 5):
// the dirty log, and the device-state transfer. The session's control loop
// (vhost_user/session.cpp) dispatches the messages here.
//
// Source: SET_LOG_BASE, SET_FEATURES(+LOG_ALL), precopy (fphd keeps serving
// and marks what it writes: used rings and discarded ranges), then the VMM
// stops the rings (GET_VRING_BASE drains every taken request first), sends
// SET_DEVICE_STATE_FD(SAVE) and reads the blob, CHECK_DEVICE_STATE.
// Destination: SET_DEVICE_STATE_FD(LOAD), the VMM writes the blob and closes,
// CHECK_DEVICE_STATE applies it (config space, pause and logging policy, the
// epoch, bumped by one), then the rings start with the source's indices.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "fph/common/log.h"
#include "fph/daemon/session.h"
#include "fph/proto/device_state.h"

namespace fph::daemon {

namespace vu = proto::vu;
namespace devstate = proto::devstate;

namespace {
// SET_DEVICE_STATE_FD reply (vu-doc): bits 0-7 error (0 = ok), bit 8 = no fd
// returned (fphd never returns one: it uses the front end's pipe end).
constexpr uint64_t kStateNoFd = 1u << 8;
constexpr uint64_t kStateError = 1;
}  // namespace

bool Session::any_ring_started_locked() const {
  for (const auto& v : vrings_)
    if (v.started) return true;
  return false;
}

void Session::set_migration_state_locked(MigrationState s) {
  if (migration_ == s) return;
  migration_ = s;
  vm_metrics_->set_migration_state(to_string(s));
}

MigrationInfo Session::migration() const {
  std::lock_guard lk(mu_);
  MigrationInfo i;
  i.state = migration_;
  i.log_all = features_ & vu::feature::kLogAll;
  if (log_) {
    i.log_bytes = log_->size_bytes();
    i.log_covers = log_->covered_bytes();
  }
  i.pages_marked = pages_marked_;
  i.log_misses = log_misses_;
  i.discard_while_logging = discard_while_logging_;
  i.epoch = epoch_;
  i.state_bytes_sent = state_sent_;
  i.state_bytes_received = state_received_;
  i.last_transfer_seconds = last_transfer_seconds_;
  i.last_error = migration_error_;
  return i;
}

void Session::set_discard_while_logging(bool on) {
  discard_while_logging_ = on;
  log::info("session", "vm={} while migrating: {}", name_,
            on ? "keep discarding (discarded pages are logged)" : "hold discards until logging ends");
}

void Session::log_write_locked(uint64_t gpa, uint64_t len) {
  if (!logging_locked() || len == 0) return;
  if (!log_->mark(gpa, len)) {
    // The memory table grew past the log and the VMM did not resize it: the
    // page cannot be marked, so say so loudly (the migration may be wrong).
    if (log_misses_++ == 0)
      log::error("session", "vm={} dirty log of {} bytes does not cover [0x{:x}, +0x{:x}): pages not "
                 "marked (further misses are only counted)", name_, log_->size_bytes(), gpa, len);
    vm_metrics_->protocol_error("log_too_small");
    return;
  }
  const uint64_t pages = (gpa + len - 1) / DirtyLog::kPageSize - gpa / DirtyLog::kPageSize + 1;
  pages_marked_ += pages;
  vm_metrics_->dirty_pages(pages);
  if (log_call_) {
    uint64_t one = 1;
    (void)!::write(log_call_.get(), &one, sizeof one);
  }
}

void Session::log_used_write_locked(const Vring& v, uint16_t used_idx_before) {
  // Only rings the VMM asked to be logged (VHOST_VRING_F_LOG), at the GPA it
  // gave for the used ring: the element just written and the index.
  if (!(v.addr.flags & vu::kVringFlagLog) || !logging_locked()) return;
  const uint64_t base = v.addr.log_guest_addr;
  const uint64_t slot = used_idx_before % v.num;
  log_write_locked(base + 4 + 8 * slot, 8);  // struct vring_used_elem
  log_write_locked(base + 2, 2);             // used->idx
}

uint64_t Session::bump_epoch(std::string* not_notified) {
  uint64_t e;
  {
    std::lock_guard lk(mu_);
    epoch_ = (epoch_ + 1) & devstate::kMaxEpoch;
    e = epoch_;
  }
  log::info("session", "vm={} epoch {}: the driver is asked to report its free memory again", name_, e);
  auto r = backend_.config_changed();
  vm_metrics_->backend_request("config_change", r.has_value());
  if (!r && not_notified) *not_notified = r.error();
  return e;
}

bool Session::handle_set_log_base(vu::Message& m) {
  // With LOG_SHMFD this message always gets a u64 reply, 0 = success.
  auto refuse = [&](const std::string& reason, const std::string& detail) {
    return this->refuse(m.header, reason, detail);  // the error form: u64 1
  };
  if (!(protocol_features_ & vu::protocol::bit(vu::protocol::kLogShmfd)))
    return refuse("unsupported", "SET_LOG_BASE without the LOG_SHMFD protocol feature");
  auto p = vu::parse_log(m.payload);
  if (!p) return refuse("bad_payload", p.error().message());
  auto l = DirtyLog::map(std::move(m.fds[0]), *p);
  if (!l) return refuse("bad_log", l.error());
  uint64_t needed = 0;
  {
    std::lock_guard lk(mu_);
    for (const auto& r : table_->regions())
      needed = std::max(needed, r->desc.guest_phys_addr + r->desc.memory_size);
  }
  if ((*l)->covered_bytes() < needed)
    return refuse("bad_log", fmt::format("log.mmap_size: {} bytes cover {} MiB of guest memory, the "
                                         "memory table reaches {} MiB",
                                         (*l)->size_bytes(), (*l)->covered_bytes() >> 20, needed >> 20));
  {
    std::lock_guard lk(mu_);
    log_ = std::move(*l);
    if (features_ & vu::feature::kLogAll) set_migration_state_locked(MigrationState::Logging);
  }
  log::info(log_budget_, "session", "vm={} dirty log attached: {} bytes (covers {} MiB)", name_, p->mmap_size,
            (p->mmap_size * 8 * DirtyLog::kPageSize) >> 20);
  return send_reply_payload(m, vu::encode_u64(0));
}

bool Session::handle_set_device_state_fd(vu::Message& m) {
  auto refuse = [&](const std::string& reason, const std::string& detail) {
    {
      std::lock_guard lk(mu_);
      migration_error_ = detail;
      set_migration_state_locked(MigrationState::Failed);
    }
    return this->refuse(m.header, reason, detail);  // the error form: kStateError | kStateNoFd
  };
  if (!(protocol_features_ & vu::protocol::bit(vu::protocol::kDeviceState)))
    return refuse("unsupported", "SET_DEVICE_STATE_FD without the DEVICE_STATE protocol feature");
  auto p = vu::parse_device_state(m.payload);
  if (!p) return refuse("bad_payload", p.error().message());
  const bool save = p->direction == 0;
  if (transfer_) {
    // A new transfer supersedes an unchecked one (a VMM that retries).
    log::warn(log_budget_, "session",
              "vm={} SET_DEVICE_STATE_FD: a previous transfer was never checked; "
              "abandoning it",
              name_);
    transfer_.reset();
  }
  devstate::DeviceState st;
  std::string running;
  {
    std::lock_guard lk(mu_);
    // vu-doc: the state is transferred only while the device is stopped
    // (all rings stopped by GET_VRING_BASE): a running device would change
    // after the snapshot, and a LOAD into a running device would change it
    // under the driver.
    for (uint32_t i = 0; i < kMaxQueues; ++i)
      if (vrings_[i].started) running += fmt::format("{}{}", running.empty() ? "" : ", ", i);
  }
  if (!running.empty())
    return refuse("device_running", fmt::format("{} refused: vring(s) {} still started (stop them with "
                                                "GET_VRING_BASE first)", save ? "SAVE" : "LOAD", running));
  {
    std::lock_guard lk(mu_);
    st.features = features_;
    st.protocol_features = protocol_features_;
    st.config = config_;
    st.epoch = epoch_;
    st.paused = paused_;
    st.pause_while_logging = !discard_while_logging_;
    st.status = status_;
    devstate::Counters c;
    for (const auto& v : vrings_) c.requests += v.requests;
    st.counters = c;
    st.source = name_;
    set_migration_state_locked(save ? MigrationState::Saving : MigrationState::None);
    migration_error_.clear();
  }
  if (save) {
    auto blob = devstate::encode(st);
    log::info(log_budget_, "session", "vm={} saving device state: {} bytes", name_, blob.size());
    transfer_ = StateTransfer::save(std::move(m.fds[0]), std::move(blob), cancel_,
                                    ctx_.state_transfer_timeout);
  } else {
    log::info(log_budget_, "session", "vm={} loading device state", name_);
    transfer_ = StateTransfer::load(std::move(m.fds[0]), devstate::kMaxBlobBytes, cancel_,
                                    ctx_.state_transfer_timeout);
  }
  return send_reply_payload(m, vu::encode_u64(kStateNoFd));
}

bool Session::handle_check_device_state(vu::Message& m) {
  auto outcome = [&](bool ok, const std::string& reason, const std::string& detail, uint64_t bytes,
                     const char* dir) {
    vm_metrics_->state_transfer(dir, ok ? "ok" : reason, bytes);
    if (!ok) {
      std::lock_guard lk(mu_);
      migration_error_ = detail;
      set_migration_state_locked(MigrationState::Failed);
    }
    return send_reply_payload(m, vu::encode_u64(ok ? 0 : 1));
  };
  if (!transfer_) {
    fail(m, "no_transfer", "CHECK_DEVICE_STATE without a SET_DEVICE_STATE_FD before it");
    return outcome(false, "no_transfer", "CHECK_DEVICE_STATE without a transfer", 0, "none");
  }
  // Waits for the transfer: it ends by itself at its deadline, or at once
  // when the session is yanked.
  const bool save = transfer_->direction() == StateTransfer::Direction::Save;
  auto r = transfer_->wait();
  transfer_.reset();
  const double secs = std::chrono::duration<double>(r.elapsed).count();
  const char* dir = save ? "save" : "load";
  {
    std::lock_guard lk(mu_);
    last_transfer_seconds_ = secs;
    (save ? state_sent_ : state_received_) += r.transferred;
  }
  if (!r.ok) {
    protocol_error("session", "state_" + r.reason, fmt::format("device state {} failed: {}", dir, r.error));
    return outcome(false, r.reason, fmt::format("{}: {}", dir, r.error), r.transferred, dir);
  }
  if (save) {
    log::info(log_budget_, "session", "vm={} device state saved: {} bytes in {:.1f} ms", name_, r.transferred,
              secs * 1e3);
    {
      std::lock_guard lk(mu_);
      set_migration_state_locked(MigrationState::Saved);
    }
    return outcome(true, "", "", r.transferred, dir);
  }
  auto st = devstate::decode(r.bytes);
  if (!st) {
    protocol_error("session", "state_invalid",
                   fmt::format("device state rejected ({} bytes): {}", r.bytes.size(), st.error().message()));
    return outcome(false, "invalid", "load: " + st.error().message(), r.transferred, dir);
  }
  bool running;
  {
    std::lock_guard lk(mu_);
    running = any_ring_started_locked();
  }
  if (running) {
    // Rings started while the state was being read: applying it now would
    // change a running device under its driver.
    fail(m, "device_running", "LOAD: a vring was started before CHECK_DEVICE_STATE; state not applied");
    return outcome(false, "device_running", "load: the device was started before the state was applied",
                   r.transferred, dir);
  }
  uint64_t epoch;
  {
    std::lock_guard lk(mu_);
    config_ = st->config;
    paused_ = st->paused;
    discard_while_logging_ = !st->pause_while_logging;
    // The destination may hold pages the source had already discarded
    // (sent before the discard, or resent as zero pages into memory the
    // guest reallocated since): a new epoch tells a guest that knows it to
    // report its free memory again (docs/migration.md).
    epoch_ = (st->epoch + 1) & devstate::kMaxEpoch;  // wraps to 0 after 2^63 - 1 migrations
    epoch = epoch_;
    epoch_notify_pending_ = true;
    set_migration_state_locked(MigrationState::Loaded);
  }
  log::info(log_budget_, "session",
            "vm={} device state loaded from {} ({} bytes in {:.1f} ms): num_pages={} actual={} "
            "{}epoch {}",
            name_, st->source.empty() ? "?" : st->source, r.transferred, secs * 1e3, st->config.num_pages,
            st->config.actual, st->paused ? "paused, " : "", epoch);
  return outcome(true, "", "", r.transferred, dir);
}

}  // namespace fph::daemon
