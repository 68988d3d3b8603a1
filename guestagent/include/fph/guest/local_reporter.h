// Local mode of fph-guest (--local-reclaim dontneed|free): no vhost-user
// connection and no fphd. Guest RAM is private anonymous memory of this
// process, and free page reporting posts its requests to an in-process
// "device" that discards every reported block with the reclaim engine
// (fph::reclaim::SyscallDiscarder, Backing::PrivateAnon, MADV_DONTNEED or
// MADV_FREE: DESIGN 4, last row) and then completes the request, exactly as
// the back end would use the chain.
//
// The interface mirrors BalloonDriver's so that the agent drives both the
// same way (start, notify_free, request_stop, join, done_fd, statistics).
// One thread: it runs PageReporting::poll(), and the requests poll() posts
// are queued and handled by the same thread right after, so a request is
// never discarded and completed while the pass that posted it is running.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "fph/common/unique_fd.h"
#include "fph/guest/balloon_driver.h"
#include "fph/guest/buddy.h"
#include "fph/guest/guest_memory.h"
#include "fph/guest/page_reporting.h"
#include "fph/reclaim/discard.h"

namespace fph::guest {

enum class LocalMethod { Dontneed, Free };
std::string_view to_string(LocalMethod m);

struct LocalOptions {
  ReportingOptions reporting;
  LocalMethod method = LocalMethod::Dontneed;
  bool reporting_enabled = true;  // false: --no-reporting (nothing is ever discarded)
  std::chrono::milliseconds max_sleep{200};
};

struct LocalStats {
  uint64_t discard_syscalls = 0;
  uint64_t discarded_bytes = 0;  // accepted by madvise (not "reclaimed": see backing_bytes)
  uint64_t skipped_bytes = 0;    // failed or unsupported (counted, request failed)
  uint64_t discard_ns = 0;       // time spent in madvise, all requests
  uint64_t discard_ns_max = 0;   // longest single request
};

class LocalReporter {
 public:
  using Exit = BalloonDriver::Exit;

  LocalReporter(GuestMemory& mem, BuddyAllocator& buddy, std::mutex& zone, LocalOptions opts,
                DriverHooks hooks,
                std::unique_ptr<reclaim::Discarder> discarder = nullptr);  // null: syscalls
  ~LocalReporter();
  LocalReporter(const LocalReporter&) = delete;
  LocalReporter& operator=(const LocalReporter&) = delete;

  void start();
  void notify_free(int order);
  void request_stop();
  void join();
  int done_fd() const { return done_fd_.get(); }
  Exit exit_state() const { return exit_.load(); }
  const std::string& exit_message() const { return exit_msg_; }
  bool reporting_active() const { return opts_.reporting_enabled; }
  PageReporting* reporting() { return reporting_.get(); }
  size_t inflight_requests() const { return inflight_.load(); }
  uint64_t reconnects() const { return 0; }
  uint64_t calls() const { return calls_.load(); }
  uint64_t spurious_calls() const { return 0; }
  LocalStats local_stats() const;
  reclaim::Method method() const;

 private:
  bool post(const ReportRequest& r);
  void handle(ReportRequest r);
  void loop();

  GuestMemory& mem_;
  BuddyAllocator& buddy_;
  std::mutex& zone_;
  LocalOptions opts_;
  DriverHooks hooks_;
  std::unique_ptr<reclaim::Discarder> discarder_;
  std::unique_ptr<PageReporting> reporting_;

  mutable std::mutex mu_;
  std::deque<ReportRequest> pending_;  // posted, not yet discarded
  LocalStats stats_{};
  std::atomic<size_t> inflight_{0};
  std::atomic<uint64_t> calls_{0};

  UniqueFd wake_fd_;
  UniqueFd done_fd_;
  std::atomic<bool> stop_{false};
  std::atomic<Exit> exit_{Exit::Running};
  std::string exit_msg_;
  std::thread thread_;
};

}  // namespace fph::guest
