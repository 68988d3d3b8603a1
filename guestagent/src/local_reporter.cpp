#include "fph/guest/local_reporter.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>

#include "eventfd_wake.h"
#include "fph/common/log.h"

namespace fph::guest {

using Clock = std::chrono::steady_clock;

std::string_view to_string(LocalMethod m) {
  return m == LocalMethod::Free ? "free" : "dontneed";
}

LocalReporter::LocalReporter(GuestMemory& mem, BuddyAllocator& buddy, std::mutex& zone,
                             LocalOptions opts, DriverHooks hooks,
                             std::unique_ptr<reclaim::Discarder> discarder)
    : mem_(mem), buddy_(buddy), zone_(zone), opts_(std::move(opts)), hooks_(std::move(hooks)),
      discarder_(discarder ? std::move(discarder)
                           : std::make_unique<reclaim::SyscallDiscarder>()),
      wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
      done_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  reporting_ = std::make_unique<PageReporting>(
      buddy_, zone_, opts_.reporting, [this](const ReportRequest& r) { return post(r); });
  reporting_->set_wakeup([this] { signal_eventfd(wake_fd_.get()); });
}

LocalReporter::~LocalReporter() {
  request_stop();
  join();
}

reclaim::Method LocalReporter::method() const {
  return reclaim::method_for(reclaim::Backing::PrivateAnon, opts_.method == LocalMethod::Free);
}

LocalStats LocalReporter::local_stats() const {
  std::lock_guard lk(mu_);
  return stats_;
}

void LocalReporter::notify_free(int order) {
  if (opts_.reporting_enabled) reporting_->notify_free(order);
}

bool LocalReporter::post(const ReportRequest& r) {
  ReportRequest copy = r;
  copy.posted = Clock::now();
  {
    std::lock_guard lk(mu_);
    pending_.push_back(std::move(copy));
  }
  inflight_++;
  signal_eventfd(wake_fd_.get());
  return true;
}

void LocalReporter::handle(ReportRequest r) {
  // The "device": discard every block of the chain, then use it. The blocks
  // are isolated (off the free lists) until complete() below, so nothing can
  // allocate and write them while they are discarded (DESIGN 3).
  calls_++;
  const auto m = method();
  uint64_t syscalls = 0, discarded = 0, skipped = 0;
  const auto t0 = Clock::now();
  for (const auto& b : r.blocks) {
    reclaim::DiscardTarget t;
    t.addr = mem_.frame_ptr(b.frame);
    t.length = b.bytes();
    t.backing = reclaim::Backing::PrivateAnon;
    t.page_size = kFrameSize;
    const auto o = discarder_->discard(t, m);
    syscalls += o.syscalls;
    discarded += o.discarded_bytes;
    skipped += o.skipped_bytes;
    if (o.skipped_bytes)
      log::warn("local", "request {}: {} of {} bytes at frame {} not discarded ({}, errno {})",
                r.id, o.skipped_bytes, t.length, b.frame, reclaim::to_string(o.skip), o.error);
  }
  const auto t1 = Clock::now();
  r.used = t1;
  const auto ns = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
  {
    std::lock_guard lk(mu_);
    stats_.discard_syscalls += syscalls;
    stats_.discarded_bytes += discarded;
    stats_.skipped_bytes += skipped;
    stats_.discard_ns += ns;
    stats_.discard_ns_max = std::max(stats_.discard_ns_max, ns);
  }
  // A request whose blocks could not all be discarded is returned as failed:
  // its blocks go back unmarked (PageReporting), so the checker does not
  // expect them to read as zero.
  const bool ok = skipped == 0;
  if (ok && hooks_.before_complete) hooks_.before_complete(r);
  reporting_->complete(r.id, ok);
  inflight_--;
  if (ok && hooks_.after_complete) hooks_.after_complete(r);
}

void LocalReporter::start() {
  thread_ = std::thread([this] {
    loop();
    if (exit_.load() == Exit::Running) {
      exit_msg_ = "stopped";
      exit_.store(Exit::Stopped);
    }
    signal_eventfd(done_fd_.get());
  });
}

void LocalReporter::request_stop() {
  stop_.store(true);
  if (wake_fd_) signal_eventfd(wake_fd_.get());
}

void LocalReporter::join() {
  if (thread_.joinable()) thread_.join();
}

void LocalReporter::loop() {
  auto take = [this](ReportRequest* out) {
    std::lock_guard lk(mu_);
    if (pending_.empty()) return false;
    *out = std::move(pending_.front());
    pending_.pop_front();
    return true;
  };
  while (!stop_.load()) {
    ReportRequest r;
    while (take(&r)) handle(std::move(r));
    auto next = Clock::time_point::max();
    if (opts_.reporting_enabled) next = reporting_->poll(Clock::now());
    {
      std::lock_guard lk(mu_);
      if (!pending_.empty()) continue;  // poll() posted: handle it now
    }
    auto wait = opts_.max_sleep;
    const auto now = Clock::now();
    if (next != Clock::time_point::max())
      wait = std::min(wait, std::chrono::ceil<std::chrono::milliseconds>(
                                std::max(next - now, Clock::duration::zero())));
    pollfd p{wake_fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(wait.count())) > 0) drain_eventfd(wake_fd_.get());
  }
  // Stopping: requests already posted are still isolated; finish them so
  // every block is back on the free lists (the device always returns chains).
  ReportRequest r;
  while (take(&r)) handle(std::move(r));
}

}  // namespace fph::guest
