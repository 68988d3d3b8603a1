#include "fph/guest/balloon_driver.h"

#include <pthread.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>

#include "eventfd_wake.h"
#include "fph/common/log.h"
#include "fph/proto/balloon_stats.h"

namespace fph::guest {

namespace vq = proto::vq;
using Clock = std::chrono::steady_clock;

namespace {

// The driver whose loop runs on this thread (set once by its thread).
thread_local const BalloonDriver* t_driver_on_this_thread = nullptr;

Unexpected<FrontendError> fe_error(FrontendErrc c, std::string msg) {
  return Unexpected<FrontendError>{FrontendError{c, std::move(msg)}};
}

}  // namespace

size_t ring_slot(proto::balloon::QueueRole role, size_t queue_index) {
  using R = proto::balloon::QueueRole;
  switch (role) {
    case R::Inflate: return 0;
    case R::Deflate: return 1;
    case R::Reporting: return 2;
    case R::Stats: return 3;
    default: return queue_index;
  }
}

std::vector<uint8_t> guest_stats_buffer(const BuddyStats& b) {
  using T = proto::balloon::StatTag;
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  const uint64_t free = b.free_frames * kFrameSize;
  proto::balloon::Stats s;
  s.set(T::SwapIn, 0);
  s.set(T::SwapOut, 0);
  s.set(T::MajorFaults, static_cast<uint64_t>(ru.ru_majflt));
  s.set(T::MinorFaults, static_cast<uint64_t>(ru.ru_minflt));
  s.set(T::MemFree, free);
  s.set(T::MemTotal, (b.total_frames - b.reserved_frames) * kFrameSize);
  s.set(T::Available, free);
  s.set(T::Caches, 0);
  s.set(T::HugetlbAllocs, 0);
  s.set(T::HugetlbFails, 0);
  return proto::balloon::encode_stats(s);
}

uint16_t reporting_queue_size(size_t capacity, int max_inflight) {
  const uint64_t need = uint64_t{capacity} * static_cast<uint64_t>(std::max(max_inflight, 1));
  uint64_t n = std::bit_ceil(std::max<uint64_t>(need, proto::balloon::kReportingQueueSize));
  return static_cast<uint16_t>(std::min<uint64_t>(n, 1024));
}

BalloonDriver::BalloonDriver(GuestMemory& mem, BuddyAllocator& buddy, std::mutex& zone,
                             DriverOptions opts, Connector connector, DriverHooks hooks)
    : mem_(mem), buddy_(buddy), zone_(zone), opts_(std::move(opts)),
      connector_(std::move(connector)), hooks_(std::move(hooks)),
      wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
      done_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  reporting_ = std::make_unique<PageReporting>(
      buddy_, zone_, opts_.reporting, [this](const ReportRequest& r) { return post(r); });
  // A pass newly due or a paused pass resumable: wake the driver thread.
  reporting_->set_wakeup([this] {
    if (t_driver_on_this_thread == this) {
      reporting_woken_here_ = true;
      return;
    }
    signal_eventfd(wake_fd_.get());
  });
  // The stats queue needs its own ring slot in guest memory.
  if (mem_.ring_count() <= ring_slot(proto::balloon::QueueRole::Stats, 0)) opts_.frontend.stats = false;
  if (opts_.balloon && mem_.ring_count() > ring_slot(proto::balloon::QueueRole::Deflate, 1)) {
    // The PFN arrays (256 le32 each, inflate at 0, deflate at 1 KiB) live in
    // one guest page taken from the buddy model for good, as Linux keeps
    // vb->pfns in kernel memory: the workload never gets it.
    std::optional<uint64_t> f;
    {
      std::lock_guard lk(zone_);
      f = buddy_.alloc(0);
    }
    if (f) {
      pfn_gpa_ = mem_.frame_gpa(*f);
      // Resident from the start, like the kernel memory Linux keeps vb->pfns
      // in: the host's backing then changes only by what the balloon moves.
      if (uint8_t* p = mem_.frame_ptr(*f)) std::memset(p, 0, kFrameSize);
      balloon_ = std::make_unique<BalloonTarget>(buddy_, zone_, mem_.gpa_base(),
                                                 opts_.frontend.deflate_on_oom);
      balloon_->on_inflated = [this](uint64_t frame) {
        if (hooks_.balloon_inflated) hooks_.balloon_inflated(frame);
      };
      balloon_->on_deflating = [this](uint64_t frame) {
        if (hooks_.balloon_deflating) hooks_.balloon_deflating(frame);
      };
      balloon_->on_freed = [this](int order) { notify_free(order); };
    } else {
      log::warn("driver", "no free page for the balloon's PFN arrays: balloon disabled");
    }
  }
  if (!balloon_) opts_.frontend.deflate_on_oom = false;
}

BalloonDriver::~BalloonDriver() {
  request_stop();
  join();
}

size_t BalloonDriver::inflight_requests() const {
  std::lock_guard lk(req_mu_);
  return requests_.size();
}

FeResult<Negotiated> BalloonDriver::connect() {
  if (!wake_fd_ || !done_fd_)
    return fe_error(FrontendErrc::Setup, fmt::format("eventfd: {}", std::strerror(errno)));
  auto s = connector_(&stop_);
  if (!s) return Unexpected<FrontendError>{s.error()};
  // PageReporting's constructor already requested the initial pass over
  // memory that is free at registration (reference 2, "Registration").
  return setup(std::move(*s), false);
}

FeResult<Negotiated> BalloonDriver::setup(UniqueFd sock, bool reconnected) {
  auto fe = std::make_unique<Frontend>(std::move(sock));
  auto n = fe->negotiate(mem_, opts_.frontend);
  if (!n) return n;
  std::vector<Queue> queues(static_cast<size_t>(n->layout.count));
  uint64_t stats_gpa = 0;
  for (size_t q = 0; q < queues.size(); ++q) {
    const auto role = n->layout.role(static_cast<uint32_t>(q));
    const size_t slot = ring_slot(role, q);
    if (slot >= mem_.ring_count())
      return fe_error(FrontendErrc::Setup, fmt::format("no ring area for queue {} ({})", q,
                                                       proto::balloon::to_string(role)));
    const RingArea& ra = mem_.ring(slot);
    if (role == proto::balloon::QueueRole::Stats) {
      // The stats buffer lives in the rest of the slot's last page, after
      // the used ring (slots are page aligned, so that space is reserved).
      const uint64_t used_end = ra.used_gpa + vq::used_ring_bytes(ra.num);
      stats_gpa = (used_end + 15) / 16 * 16;
      const uint64_t page_end = (used_end + kFrameSize - 1) / kFrameSize * kFrameSize;
      if (stats_gpa + proto::balloon::kMaxStatsBytes > page_end)
        return fe_error(FrontendErrc::Setup, "no room for the stats buffer after the stats ring");
    }
    auto* desc = mem_.translate(ra.desc_gpa, vq::desc_table_bytes(ra.num));
    auto* avail = mem_.translate(ra.avail_gpa, vq::avail_ring_bytes(ra.num));
    auto* used = mem_.translate(ra.used_gpa, vq::used_ring_bytes(ra.num));
    // A fresh ring on every connection: a restarted back end has no state,
    // so both sides start at index 0 (SET_VRING_BASE 0 below).
    queues[q].ring = vq::DriverRing(ra.num, desc, avail, used);
    queues[q].kick.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    queues[q].call.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!queues[q].kick || !queues[q].call)
      return fe_error(FrontendErrc::Setup, fmt::format("eventfd: {}", std::strerror(errno)));
    if (auto r = fe->setup_queue(static_cast<uint32_t>(q), ra, mem_, queues[q].kick.get(),
                                 queues[q].call.get());
        !r)
      return Unexpected<FrontendError>{r.error()};
  }
  if (auto r = fe->driver_ok(); !r) return Unexpected<FrontendError>{r.error()};

  fe_ = std::move(fe);
  queues_ = std::move(queues);
  report_q_ = n->layout.reporting;
  stats_q_ = n->layout.stats;
  stats_gpa_ = stats_gpa;
  head_to_id_.clear();
  {
    std::lock_guard lk(req_mu_);
    requests_.clear();
  }
  reporting_enabled_ = n->reporting() && report_q_ >= 0;
  log::info("driver", "{}: features {:#x} (device {:#x}), protocol {:#x}, {} queues, reporting "
            "queue {}, stats queue {}, memory via {}", reconnected ? "reconnected" : "connected",
            n->features, n->device_features, n->protocol, n->layout.count, report_q_, stats_q_,
            n->used_mem_table ? "SET_MEM_TABLE" : "ADD_MEM_REG");
  // Linux init_vqs: prime the stats queue with one buffer, so the device
  // can ask for stats by returning it.
  if (stats_q_ >= 0 && !post_stats())
    return fe_error(FrontendErrc::Setup, "cannot post the stats buffer");

  // Requests that were in flight on the old connection: their blocks are
  // still isolated; post them again on the new ring, or give them back
  // unreported if the new back end does not do reporting.
  const auto inflight = reporting_->inflight();
  for (const auto& r : inflight) {
    if (!(reporting_enabled_ && post(r))) reporting_->complete(r.id, false);
  }
  if (!inflight.empty())
    log::info("driver", "re-posted {} in-flight reporting request(s)", inflight.size());
  if (hooks_.on_connected) hooks_.on_connected(*n, reconnected);
  // The epoch read during negotiate() is compared with the one remembered
  // from the previous connection, so a reconnect to a migration destination
  // (or to an fphd restarted after a bump) reports everything again. No
  // epoch in that read (a back end that does not serve offset 16 yet): no
  // polling either, each read would only be refused again.
  epoch_polling_ = n->epoch.has_value() && opts_.epoch_poll.count() > 0;
  next_epoch_poll_ = Clock::now() + opts_.epoch_poll;
  if (n->epoch) observe_epoch(*n->epoch);
  // Balloon: Linux virtballoon_probe ends with "if (towards_target(vb))
  // virtballoon_changed(vb)": the target read during negotiate() counts as
  // a config change. A reconnect tells the (new) back end what we hold.
  balloon_active_ = balloon_ && n->has_protocol(proto::vu::protocol::kConfig);
  balloon_error_.clear();
  if (balloon_active_) {
    balloon_->set_deflate_on_oom(n->deflate_on_oom());
    if (balloon_->actual() > 0 || n->config.actual != 0) {
      if (auto w = fe_->write_actual(balloon_->actual()); !w)
        return Unexpected<FrontendError>{w.error()};
    }
    balloon_observe(n->config.num_pages);
    next_balloon_poll_ = Clock::now() + opts_.balloon_poll;
  }
  return n;
}

class BalloonDriver::Transport final : public BalloonTransport {
 public:
  explicit Transport(BalloonDriver& d) : d_(d) {}
  bool tell(bool inflate, std::span<const uint32_t> pfns) override {
    return d_.balloon_tell(inflate, pfns);
  }
  bool write_actual(uint32_t actual) override { return d_.balloon_write_actual(actual); }

 private:
  BalloonDriver& d_;
};

bool BalloonDriver::balloon_tell(bool inflate, std::span<const uint32_t> pfns) {
  if (!balloon_error_.empty()) return false;
  const int qi = inflate ? 0 : 1;  // inflate and deflate are always queues 0 and 1
  if (!fe_ || queues_.size() < 2 || pfns.empty() || pfns.size() > kBalloonArrayPfns) {
    balloon_error_ = "balloon request without a connection";
    return false;
  }
  // Linux tell_host(): one device-readable buffer holding the PFN array.
  const uint64_t gpa = pfn_gpa_ + (inflate ? 0 : kBalloonArrayPfns * 4);
  const auto len = static_cast<uint32_t>(pfns.size() * 4);
  uint8_t* p = mem_.translate(gpa, len);
  if (!p) {
    balloon_error_ = "PFN array outside guest memory";
    return false;
  }
  for (size_t i = 0; i < pfns.size(); ++i) {
    const uint32_t v = pfns[i];
    p[4 * i] = static_cast<uint8_t>(v);
    p[4 * i + 1] = static_cast<uint8_t>(v >> 8);
    p[4 * i + 2] = static_cast<uint8_t>(v >> 16);
    p[4 * i + 3] = static_cast<uint8_t>(v >> 24);
  }
  Queue& q = queues_[static_cast<size_t>(qi)];
  const vq::Buffer b{gpa, len, false};
  auto head = q.ring.add_chain(std::span<const vq::Buffer>(&b, 1));
  if (!head) {
    balloon_error_ = fmt::format("{} ring full", inflate ? "inflate" : "deflate");
    return false;
  }
  kick(q);
  // wait_event(vb->acked, virtqueue_get_buf(vq, &len)): the device used it.
  const auto deadline = Clock::now() + opts_.balloon_timeout;
  for (;;) {
    while (auto u = q.ring.pop_used()) {
      if (u->id == *head) return true;
      log::warn("driver", "{} queue: used head {} is not the one in flight ({})",
                inflate ? "inflate" : "deflate", u->id, *head);
    }
    const auto now = Clock::now();
    if (now >= deadline) {
      balloon_error_ = fmt::format("the device did not use the {} buffer within {} ms",
                                   inflate ? "inflate" : "deflate", opts_.balloon_timeout.count());
      return false;
    }
    pollfd pf[2] = {{q.call.get(), POLLIN, 0}, {fe_->fd(), POLLIN, 0}};
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - now);
    const int n = ::poll(pf, 2, static_cast<int>(std::min<int64_t>(left.count(), 100)));
    if (n < 0 && errno != EINTR) {
      balloon_error_ = fmt::format("poll: {}", std::strerror(errno));
      return false;
    }
    if (n > 0 && pf[0].revents) drain_eventfd(pf[0].fd);
    if (n > 0 && pf[1].revents) {
      balloon_error_ = "the control socket became readable while a balloon buffer was in flight "
                       "(back end gone?)";
      return false;
    }
  }
}

bool BalloonDriver::balloon_write_actual(uint32_t actual) {
  if (!balloon_error_.empty() || !fe_) return false;
  if (auto w = fe_->write_actual(actual); !w) {
    balloon_error_ = "SET_CONFIG(actual): " + w.error().message;
    return false;
  }
  return true;
}

void BalloonDriver::balloon_event(const char* reason) {
  if (hooks_.on_balloon) hooks_.on_balloon(reason, balloon_->stats());
}

void BalloonDriver::balloon_observe(uint32_t num_pages) {
  const uint32_t before = balloon_->target();
  const bool was_pending = balloon_->pending();
  balloon_->set_target(num_pages);
  if (balloon_->target() != before || (balloon_->pending() && !was_pending)) {
    log::info("driver", "balloon target {} pages ({} MiB), actual {}", num_pages,
              (uint64_t{num_pages} * kFrameSize) >> 20, balloon_->actual());
    balloon_stalled_ = false;
    balloon_event("target");
  }
}

bool BalloonDriver::balloon_work() {
  if (!balloon_active_ || !balloon_) return false;
  Transport t(*this);
  switch (balloon_->step(t)) {
    case BalloonTarget::Step::Progress:
      balloon_stalled_ = false;
      return true;
    case BalloonTarget::Step::Reached:
      balloon_stalled_ = false;
      log::info("driver", "balloon reached its target: {} pages", balloon_->actual());
      balloon_event("reached");
      return false;
    case BalloonTarget::Step::NoMemory:
      if (!balloon_stalled_) {
        balloon_stalled_ = true;
        log::info("driver", "balloon: no free page to inflate (actual {}, target {}); retrying at "
                  "the next config poll", balloon_->actual(), balloon_->target());
        balloon_event("no_memory");
      }
      return false;
    case BalloonTarget::Step::Failed:
    case BalloonTarget::Step::Idle:
      return false;
  }
  return false;
}

uint32_t BalloonDriver::oom_deflate() {
  if (!balloon_ || balloon_->actual() == 0 || !balloon_active_.load() ||
      exit_.load() != Exit::Running)
    return 0;
  std::unique_lock lk(oom_mu_);
  const uint64_t mine = ++oom_requested_;
  signal_eventfd(wake_fd_.get());
  // Served at the driver loop's next iteration; given up when the driver
  // stops (an allocation must not hang a shutdown).
  while (oom_served_ < mine) {
    if (stop_.load() || exit_.load() != Exit::Running) return 0;
    oom_cv_.wait_for(lk, std::chrono::milliseconds(50));
  }
  return oom_got_;
}

void BalloonDriver::serve_oom() {
  {
    std::lock_guard lk(oom_mu_);
    if (oom_served_ == oom_requested_) return;
  }
  uint32_t got = 0;
  if (balloon_ && balloon_active_.load() && balloon_error_.empty()) {
    Transport t(*this);
    got = balloon_->oom_deflate(t);
    if (got > 0) {
      log::info("driver", "balloon: deflated {} pages under memory pressure (actual {})", got,
                balloon_->actual());
      balloon_event("oom");
    }
  }
  {
    std::lock_guard lk(oom_mu_);
    oom_got_ = got;
    oom_served_ = oom_requested_;
  }
  oom_cv_.notify_all();
}

bool BalloonDriver::poll_epoch(std::string* why) {
  // Safe to do synchronously: only this thread uses the control socket once
  // the loop runs, and every request we make is answered before the next,
  // so the next message on the socket is this reply (or EOF, or something
  // unsolicited, which read_reply() refuses -- the loop would drop the
  // connection for those anyway).
  auto e = fe_->read_epoch();
  if (!e) {
    *why = e.error().message;
    return false;
  }
  if (!*e) {
    log::warn("driver", "GET_CONFIG(epoch) returned no data; no longer polling the epoch on this "
              "connection");
    epoch_polling_ = false;
    return true;
  }
  epoch_reads_++;
  observe_epoch(**e);
  return true;
}

void BalloonDriver::observe_epoch(uint32_t e) {
  const int64_t old = epoch_.exchange(e);
  if (old < 0 || static_cast<uint32_t>(old) == e) return;
  const auto from = static_cast<uint32_t>(old);
  // Reported blocks may be backed again on this host (the destination of a
  // migration holds pages the source had discarded), and the guest never
  // reports a block twice: drop the marks so the next passes report every
  // free block again, batched and budgeted as usual. Blocks in flight keep
  // theirs: they are being reported to the current back end right now (or
  // were re-posted to it by setup()). The marks are dropped even when
  // reporting is off on this connection, so a later one reports them.
  uint64_t forgotten = 0;
  if (reporting_enabled_) {
    forgotten = reporting_->reset_reported_marks();
  } else {
    std::lock_guard lk(zone_);
    forgotten = buddy_.forget_reported();
  }
  epoch_changes_++;
  log::info("driver", "epoch {} -> {}: reporting all free memory again ({} MiB had been reported)",
            from, e, forgotten * kFrameSize >> 20);
  if (hooks_.on_epoch_changed) hooks_.on_epoch_changed(from, e, forgotten * kFrameSize);
}

bool BalloonDriver::post(const ReportRequest& r) {
  if (!fe_ || report_q_ < 0 || static_cast<size_t>(report_q_) >= queues_.size()) return false;
  std::vector<vq::Buffer> bufs;
  bufs.reserve(r.blocks.size());
  for (const auto& b : r.blocks) {
    // One device-writable buffer per block, as virtballoon_free_page_report
    // does with virtqueue_add_inbuf (reference 1.4). A block is at most
    // 4 MiB, so its length fits the descriptor's le32.
    bufs.push_back(vq::Buffer{mem_.frame_gpa(b.frame), static_cast<uint32_t>(b.bytes()), true});
  }
  Queue& q = queues_[static_cast<size_t>(report_q_)];
  auto head = q.ring.add_chain(bufs);
  if (!head) {
    log::warn("driver", "reporting ring full ({} free descriptors, {} needed)",
              q.ring.free_count(), bufs.size());
    return false;
  }
  head_to_id_[*head] = r.id;
  {
    std::lock_guard lk(req_mu_);
    auto& stored = requests_[r.id];
    stored = r;
    stored.posted = Clock::now();  // latency = kick .. used (report_done's latency_us)
  }
  log::debug("driver", "posted request {} ({} blocks) at head {}", r.id, r.blocks.size(), *head);
  kick(q);
  return true;
}

bool BalloonDriver::post_stats() {
  if (!fe_ || stats_q_ < 0 || static_cast<size_t>(stats_q_) >= queues_.size()) return false;
  BuddyStats bs;
  {
    std::lock_guard lk(zone_);
    bs = buddy_.stats();
  }
  // Linux update_balloon_stats() then virtqueue_add_outbuf(): one
  // device-readable buffer.
  const auto bytes = guest_stats_buffer(bs);
  uint8_t* p = mem_.translate(stats_gpa_, bytes.size());
  if (!p) return false;
  std::memcpy(p, bytes.data(), bytes.size());
  Queue& q = queues_[static_cast<size_t>(stats_q_)];
  const vq::Buffer b{stats_gpa_, static_cast<uint32_t>(bytes.size()), false};
  if (!q.ring.add_chain(std::span<const vq::Buffer>(&b, 1))) {
    log::warn("driver", "stats ring full");
    return false;
  }
  stats_sent_++;
  log::debug("driver", "stats buffer posted: free {} MiB", bs.free_frames * kFrameSize >> 20);
  kick(q);
  return true;
}

void BalloonDriver::kick(Queue& q) {
  if (!q.ring.kick_suppressed()) signal_eventfd(q.kick.get());
}

void BalloonDriver::notify_free(int order) {
  if (!reporting_enabled_) return;
  reporting_->notify_free(order);  // wakes us through the wakeup hook if a pass got scheduled
}

void BalloonDriver::drain_used() {
  for (size_t qi = 0; qi < queues_.size(); ++qi) {
    auto& q = queues_[qi];
    while (auto u = q.ring.pop_used()) {
      if (static_cast<int>(qi) == stats_q_) {
        // The device asks for fresh stats (Linux stats_request ->
        // stats_handle_request): refill and add the buffer again, unless
        // we are stopping the rings.
        if (!stop_.load()) (void)post_stats();
        continue;
      }
      if (static_cast<int>(qi) != report_q_) {
        log::warn("driver", "queue {}: used element {} for a buffer we never posted", qi, u->id);
        continue;
      }
      auto it = head_to_id_.find(static_cast<uint16_t>(u->id));
      if (it == head_to_id_.end()) {
        log::warn("driver", "reporting queue: used head {} is not in flight; ignored", u->id);
        continue;
      }
      const uint64_t id = it->second;
      head_to_id_.erase(it);
      const auto used_at = Clock::now();
      ReportRequest req;
      {
        std::lock_guard lk(req_mu_);
        auto rit = requests_.find(id);
        if (rit != requests_.end()) {
          req = std::move(rit->second);
          requests_.erase(rit);
        }
      }
      req.id = id;
      req.used = used_at;
      // The device ignores nothing we could check: Linux also ignores the
      // used length (reference 1.4). Using the chain means "done".
      if (hooks_.before_complete) hooks_.before_complete(req);
      reporting_->complete(id, true);
      if (hooks_.after_complete) hooks_.after_complete(req);
    }
  }
}

void BalloonDriver::drop_connection() {
  fe_.reset();
  epoch_polling_ = false;
  queues_.clear();
  head_to_id_.clear();
  report_q_ = -1;
  stats_q_ = -1;
  balloon_active_ = false;
}

void BalloonDriver::finish(Exit e, std::string msg) {
  if (exit_.load() != Exit::Running) return;
  exit_msg_ = std::move(msg);
  fail_pending_task("the driver stopped: " + exit_msg_);
  exit_.store(e);
  oom_cv_.notify_all();
  signal_eventfd(done_fd_.get());
}

FeResult<void> BalloonDriver::run_on_driver(Task task) {
  std::unique_lock lk(task_mu_);
  if (exit_.load() != Exit::Running || !thread_.joinable())
    return fe_error(FrontendErrc::Cancelled, "the driver is not running");
  task_cv_.wait(lk, [&] { return task_ == nullptr; });  // one task at a time
  task_ = &task;
  task_result_.reset();
  signal_eventfd(wake_fd_.get());
  task_cv_.wait(lk, [&] { return task_result_.has_value(); });
  auto r = std::move(*task_result_);
  task_result_.reset();
  task_ = nullptr;
  task_cv_.notify_all();
  return r;
}

void BalloonDriver::run_pending_task() {
  Task* t = nullptr;
  {
    std::lock_guard lk(task_mu_);
    if (task_ == nullptr || task_result_) return;
    t = task_;
  }
  FeResult<void> r = fe_ ? FeResult<void>{}
                         : FeResult<void>{fe_error(FrontendErrc::Closed, "not connected")};
  if (fe_) {
    Device dev(*this);
    r = (*t)(dev);
  }
  std::lock_guard lk(task_mu_);
  task_result_ = std::move(r);
  task_cv_.notify_all();
}

void BalloonDriver::fail_pending_task(const std::string& why) {
  std::lock_guard lk(task_mu_);
  if (task_ == nullptr || task_result_) return;
  task_result_ = FeResult<void>{fe_error(FrontendErrc::Cancelled, why)};
  task_cv_.notify_all();
}

std::vector<RingArea> BalloonDriver::Device::rings() const {
  std::vector<RingArea> out;
  const auto& layout = d_.fe_->negotiated().layout;
  for (size_t q = 0; q < d_.queues_.size(); ++q)
    out.push_back(d_.mem_.ring(ring_slot(layout.role(static_cast<uint32_t>(q)), q)));
  return out;
}

FeResult<std::vector<uint16_t>> BalloonDriver::Device::stop_rings() {
  std::vector<uint16_t> bases;
  for (size_t q = 0; q < d_.queues_.size(); ++q) {
    auto base = d_.fe_->stop_queue(static_cast<uint32_t>(q));
    if (!base) return Unexpected<FrontendError>{base.error()};
    const uint16_t published = d_.queues_[q].ring.avail_idx();
    if ((*base & 0xffff) != published)
      return fe_error(FrontendErrc::Protocol,
                      fmt::format("queue {}: GET_VRING_BASE says next avail {}, we published {}",
                                  q, *base, published));
    bases.push_back(published);
  }
  return bases;
}

FeResult<void> BalloonDriver::Device::start_rings(Frontend& fe, const std::vector<uint16_t>& bases) {
  const auto areas = rings();
  if (bases.size() != areas.size())
    return fe_error(FrontendErrc::Setup, "ring bases do not match the queues");
  for (size_t q = 0; q < areas.size(); ++q) {
    if (auto r = fe.setup_queue(static_cast<uint32_t>(q), areas[q], d_.mem_,
                                d_.queues_[q].kick.get(), d_.queues_[q].call.get(), bases[q]);
        !r)
      return r;
  }
  return fe.driver_ok();
}

void BalloonDriver::Device::switch_to(std::unique_ptr<Frontend> fe, Connector connector) {
  d_.fe_ = std::move(fe);  // closes the source connection
  d_.connector_ = std::move(connector);
  const auto& n = d_.fe_->negotiated();
  d_.epoch_polling_ = n.epoch.has_value() && d_.opts_.epoch_poll.count() > 0;
  d_.next_epoch_poll_ = Clock::now() + d_.opts_.epoch_poll;
  if (!n.fph_epoch()) return;
  // Read now, not at the next poll: the destination's LOAD bumped it.
  if (auto e = d_.fe_->read_epoch(); e && *e) {
    d_.epoch_reads_++;
    d_.observe_epoch(**e);
  }
}

void BalloonDriver::start() {
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "fph-driver");  // top -H, perf
    t_driver_on_this_thread = this;
    loop();
    if (fe_ && stop_.load()) shutdown();
    finish(Exit::Stopped, "stopped");
  });
}

void BalloonDriver::request_stop() {
  stop_.store(true);
  if (wake_fd_) signal_eventfd(wake_fd_.get());
}

void BalloonDriver::join() {
  if (thread_.joinable()) thread_.join();
}

void BalloonDriver::loop() {
  while (!stop_.load()) {
    run_pending_task();
    drain_used();
    serve_oom();
    if (epoch_polling_ && Clock::now() >= next_epoch_poll_) {
      std::string why;
      if (!poll_epoch(&why)) {
        if (!connection_lost("epoch read: " + why)) return;
        continue;
      }
      // From now, not from the deadline: a slow reply must not make the
      // polls pile up back to back.
      next_epoch_poll_ = Clock::now() + opts_.epoch_poll;
    }
    bool balloon_more = false;
    if (balloon_active_) {
      bool polled = false;
      if (opts_.balloon_poll.count() > 0 && Clock::now() >= next_balloon_poll_) {
        polled = true;
        auto sz = fe_->read_balloon_size();
        if (!sz) {
          if (!connection_lost("balloon config read: " + sz.error().message)) return;
          continue;
        }
        balloon_observe(sz->first);
        next_balloon_poll_ = Clock::now() + opts_.balloon_poll;
      }
      // A stalled inflation (no free page) is retried at the next poll.
      if (!balloon_stalled_ || polled || opts_.balloon_poll.count() == 0)
        balloon_more = balloon_work();
      if (!balloon_error_.empty()) {
        if (!connection_lost("balloon: " + balloon_error_)) return;
        continue;
      }
    }
    auto now = Clock::now();
    auto next = Clock::time_point::max();
    reporting_woken_here_ = false;  // what woke it so far is seen by this poll
    if (reporting_enabled_) next = reporting_->poll(now);
    if (epoch_polling_) next = std::min(next, next_epoch_poll_);
    if (balloon_active_ && opts_.balloon_poll.count() > 0) next = std::min(next, next_balloon_poll_);
    if (balloon_more) next = now;
    now = Clock::now();
    auto wait = opts_.max_sleep;
    if (next != Clock::time_point::max()) {
      wait = std::min(wait, std::chrono::ceil<std::chrono::milliseconds>(
                                std::max(next - now, Clock::duration::zero())));
    }
    if (reporting_woken_here_) continue;  // raised during the reporting poll: again
    pollfd p[4] = {{wake_fd_.get(), POLLIN, 0},
                   {report_q_ >= 0 ? queues_[static_cast<size_t>(report_q_)].call.get() : -1,
                    POLLIN, 0},
                   {fe_->fd(), POLLIN, 0},
                   {stats_q_ >= 0 ? queues_[static_cast<size_t>(stats_q_)].call.get() : -1,
                    POLLIN, 0}};
    const int n = ::poll(p, 4, static_cast<int>(wait.count()));
    if (n < 0 && errno != EINTR) {
      finish(Exit::Error, fmt::format("poll: {}", std::strerror(errno)));
      return;
    }
    if (n <= 0) continue;
    if (p[0].revents) drain_eventfd(wake_fd_.get());
    if (p[3].revents) {
      drain_eventfd(p[3].fd);
      drain_used();  // the stats buffer came back: refilled and re-added there
    }
    if (p[1].revents) {
      drain_eventfd(p[1].fd);
      calls_++;
      const uint16_t before = queues_[static_cast<size_t>(report_q_)].ring.last_used();
      drain_used();
      if (queues_.empty() ||
          queues_[static_cast<size_t>(report_q_)].ring.last_used() == before)
        spurious_calls_++;  // tolerated (reference 7, "Spurious calls")
    }
    if (p[2].revents) {
      // Nothing is outstanding on the control socket while we run, so
      // readability is EOF, an error, or a message we never asked for.
      std::string why;
      auto m = proto::vu::recv_message(fe_->fd());
      if (!m) {
        why = m.error().code == proto::vu::ChannelErrc::Closed ? "the back end closed the socket"
                                                                : m.error().message();
      } else {
        why = fmt::format("unsolicited {} from the back end",
                          proto::vu::request_name(m->header.request));
      }
      if (!connection_lost(why)) return;
    }
  }
}

bool BalloonDriver::connection_lost(const std::string& why) {
  const size_t inflight = inflight_requests();
  drop_connection();
  if (!opts_.reconnect) {
    log::error("driver", "connection lost: {} ({} request(s) in flight stay isolated)", why,
               inflight);
    finish(Exit::ConnectionLost, "connection lost: " + why);
    return false;
  }
  log::warn("driver", "connection lost: {}; reconnecting ({} request(s) in flight stay "
            "isolated)", why, inflight);
  return reconnect_loop();
}

bool BalloonDriver::reconnect_loop() {
  while (!stop_.load()) {
    auto s = connector_(&stop_);
    if (!s) {
      if (s.error().code == FrontendErrc::Cancelled) return false;
      log::warn("driver", "reconnect: {}", s.error().message);
    } else if (auto n = setup(std::move(*s), true); !n) {
      log::warn("driver", "reconnect setup failed: {}", n.error().message);
      drop_connection();
    } else {
      reconnects_++;
      // New work may have arrived while disconnected; let a pass look.
      reporting_->notify_free(kMaxOrder);
      return true;
    }
    serve_oom();  // not connected: nothing is deflated, the allocation goes on failing
    pollfd p{wake_fd_.get(), POLLIN, 0};
    (void)::poll(&p, 1, 500);
    if (p.revents) drain_eventfd(wake_fd_.get());
  }
  return false;
}

void BalloonDriver::shutdown() {
  // 1. Wait (bounded) for the requests in flight: the back end finishes
  //    them anyway before answering GET_VRING_BASE (reference 4.5), but we
  //    want them completed and their blocks back on the free lists.
  const auto deadline = Clock::now() + opts_.drain_timeout;
  while (inflight_requests() > 0 && Clock::now() < deadline) {
    pollfd p[2] = {{queues_[static_cast<size_t>(report_q_)].call.get(), POLLIN, 0},
                   {fe_->fd(), POLLIN, 0}};
    const int n = ::poll(p, 2, 50);
    if (n > 0 && p[0].revents) drain_eventfd(p[0].fd);
    drain_used();
    if (n > 0 && p[1].revents) {
      log::warn("driver", "back end closed the socket during shutdown");
      drop_connection();
      return;
    }
  }
  if (const size_t left = inflight_requests(); left > 0)
    log::warn("driver", "{} request(s) still in flight after {} ms; stopping the rings anyway",
              left, opts_.drain_timeout.count());
  // 2. Stop every ring and check where the device stopped: it must have
  //    consumed everything we made available.
  for (size_t q = 0; q < queues_.size(); ++q) {
    auto base = fe_->stop_queue(static_cast<uint32_t>(q));
    if (!base) {
      log::warn("driver", "stopping queue {}: {}", q, base.error().message);
      drop_connection();
      return;
    }
    const uint16_t published = queues_[q].ring.avail_idx();
    if ((*base & 0xffff) != published)
      log::warn("driver", "queue {}: GET_VRING_BASE says next avail {}, we published {}", q,
                *base, published);
    else
      log::debug("driver", "queue {} stopped at avail index {}", q, published);
  }
  drain_used();
  if (auto s = fe_->reset_status(); !s) log::warn("driver", "SET_STATUS 0: {}", s.error().message);
  log::info("driver", "rings stopped, closing the connection");
  drop_connection();
}

}  // namespace fph::guest
