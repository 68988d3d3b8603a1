// The virtio-balloon driver of fph-guest: Linux drivers/virtio/virtio_balloon.c
// for the reporting queue (reference 1.4), over the vhost-user front end.
//
//  - PageReporting posts a request: one chain of device-writable buffers,
//    one per isolated block (gpa, bytes), on the reporting ring; kick.
//  - The driver thread waits on the call eventfd, the control socket (EOF =
//    the back end is gone), a wake eventfd and PageReporting's next deadline.
//    On a call it pops every used element and completes its request
//    (spurious calls, with nothing new in the used ring, are fine: reference 7).
//  - Connection loss: without reconnect the thread ends with
//    ConnectionLost; with reconnect it connects again, redoes the setup on
//    fresh rings and re-posts the requests still in flight (their blocks
//    stay isolated meanwhile, so nothing can allocate memory the old back
//    end may still be discarding).
//  - Migration epoch (fph's kFFphEpoch, when negotiated): read at every
//    setup and, since fph-guest has no back-end channel to receive
//    CONFIG_CHANGE_MSG, polled with GET_CONFIG every `epoch_poll` from the
//    driver thread, the socket's only user (nothing else is outstanding
//    while the loop runs). When it differs from the one remembered (also
//    across reconnects), the reported marks of every free block are dropped
//    and a reporting pass is requested: all free memory is reported again,
//    once per epoch.
//  - Balloon target (DriverOptions::balloon, balloon_target.h, docs/balloon.md):
//    num_pages polled with GET_CONFIG every `balloon_poll`; inflate/deflate
//    one batch of <= 256 PFNs per loop iteration, each posted on queue 0/1
//    and waited for synchronously, then SET_CONFIG(actual); DEFLATE_ON_OOM
//    requests from the workload (oom_deflate()) served between iterations.
//  - Stop: no new requests, wait (bounded) for in-flight ones, then the
//    QEMU stop sequence (SET_VRING_ENABLE 0, GET_VRING_BASE per queue,
//    checking the returned index against what we published), SET_STATUS 0.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "fph/common/unique_fd.h"
#include "fph/guest/balloon_target.h"
#include "fph/guest/buddy.h"
#include "fph/guest/frontend.h"
#include "fph/guest/guest_memory.h"
#include "fph/guest/page_reporting.h"
#include "fph/proto/virtqueue.h"

namespace fph::guest {

// Ring sizes. Guest memory has one ring slot per queue role, in the order
// inflate, deflate, reporting, stats (ring_slot()); the queue *index* of each
// role depends on what was negotiated (dense numbering: with STATS_VQ the
// stats queue is 2 and reporting 3).
inline constexpr uint16_t kInflateQueueSize = 128;  // QEMU's size (balloon_target.h)
inline constexpr uint16_t kDeflateQueueSize = 128;
inline constexpr uint16_t kStatsQueueSize = 128;    // QEMU's size; one buffer is ever posted
// Slot of guest memory's ring area for a queue role (see above); the stats
// slot exists only if guest memory was created with four ring sizes.
size_t ring_slot(proto::balloon::QueueRole role, size_t queue_index);
// What fph-guest's stats buffer says, the way Linux update_balloon_stats()
// fills it (tags 0..9 as Linux 6.1 sends them; memory in bytes): free = the
// buddy model's free frames, total = its frames minus the reserved ring
// pages (Linux MemTotal excludes reserved memory too), available = free,
// caches 0, no swap and no hugetlb; major/minor faults are fph-guest's own
// (getrusage). Pure apart from getrusage; for tests.
std::vector<uint8_t> guest_stats_buffer(const BuddyStats& b);
// Reporting ring: 32 like QEMU (Linux needs >= PAGE_REPORTING_CAPACITY),
// more when capacity * max_inflight chains must fit at once.
uint16_t reporting_queue_size(size_t capacity, int max_inflight);

struct DriverOptions {
  FrontendOptions frontend;
  ReportingOptions reporting;
  bool reconnect = false;
  std::chrono::milliseconds drain_timeout{5000};  // waiting for in-flight requests on stop
  std::chrono::milliseconds max_sleep{200};       // upper bound of one poll() wait
  // GET_CONFIG(epoch) period while connected with the epoch negotiated
  // (FrontendOptions::epoch); 0 = only at setup.
  std::chrono::milliseconds epoch_poll{1000};
  // Balloon inflate/deflate (balloon_target.h): off unless set (it takes
  // one guest page for the PFN arrays). Needs the CONFIG protocol feature.
  bool balloon = false;
  // GET_CONFIG(num_pages) period: fph-guest has no back-end channel for
  // CONFIG_CHANGE_MSG, so it polls (0 = only at connect).
  std::chrono::milliseconds balloon_poll{500};
  // How long one inflate/deflate buffer may stay with the device before the
  // connection is considered broken.
  std::chrono::milliseconds balloon_timeout{30000};
};

// Makes a new connection to the back end (connect or accept); `cancel` is
// set when the driver is asked to stop.
using Connector = std::function<FeResult<UniqueFd>(const std::atomic<bool>* cancel)>;

struct DriverHooks {
  // The device used request `r`; its blocks are still isolated.
  std::function<void(const ReportRequest& r)> before_complete;
  // After PageReporting::complete (blocks back on the free lists).
  std::function<void(const ReportRequest& r)> after_complete;
  std::function<void(const Negotiated& n, bool reconnected)> on_connected;
  // The migration epoch changed from `from` to `to`; `forgotten_bytes` of
  // free memory lost their reported mark and will be reported again.
  // Called on the driver thread (or the caller's, during connect()).
  std::function<void(uint32_t from, uint32_t to, uint64_t forgotten_bytes)> on_epoch_changed;
  // A page went into the balloon (driver thread; it already left the buddy model).
  std::function<void(uint64_t frame)> balloon_inflated;
  // A balloon page is about to be freed to the buddy model (driver thread).
  std::function<void(uint64_t frame)> balloon_deflating;
  // Balloon news (driver thread): "target" (a new num_pages was read),
  // "reached" (actual == target), "no_memory" (inflation stalled for lack
  // of free pages; once per stall), "oom" (deflated under memory pressure).
  std::function<void(const char* reason, const BalloonStats& s)> on_balloon;
};

class BalloonDriver {
 public:
  enum class Exit { Running, Stopped, ConnectionLost, Error };

  // The device as a live migration (the VMM's part, migration.h) uses it:
  // valid only inside a task given to run_on_driver(), on the driver thread,
  // while nothing else touches the connection or the rings.
  class Device {
   public:
    Frontend& frontend() { return *d_.fe_; }
    GuestMemory& memory() { return d_.mem_; }
    // Ring area of every queue, by queue index.
    std::vector<RingArea> rings() const;
    // QEMU's vhost_dev_stop for every queue: SET_VRING_ENABLE 0 and
    // GET_VRING_BASE, whose reply comes only once the back end has returned
    // every request it took (reference 4.5). Returns the next avail index of
    // each queue, checked against what the driver published.
    FeResult<std::vector<uint16_t>> stop_rings();
    // Starts the rings on `fe` (the source again after a failed migration,
    // or the destination) at `bases`, with the same kick and call eventfds,
    // then DRIVER_OK.
    FeResult<void> start_rings(Frontend& fe, const std::vector<uint16_t>& bases);
    // The guest now runs on `fe` (the destination): the old connection is
    // closed, reconnects go through `connector`, and the epoch is read at
    // once (a migration bumps it: everything free is reported again).
    void switch_to(std::unique_ptr<Frontend> fe, Connector connector);

   private:
    friend class BalloonDriver;
    explicit Device(BalloonDriver& d) : d_(d) {}
    BalloonDriver& d_;
  };
  using Task = std::function<FeResult<void>(Device&)>;

  BalloonDriver(GuestMemory& mem, BuddyAllocator& buddy, std::mutex& zone, DriverOptions opts,
                Connector connector, DriverHooks hooks);
  ~BalloonDriver();
  BalloonDriver(const BalloonDriver&) = delete;
  BalloonDriver& operator=(const BalloonDriver&) = delete;

  // First connection and full setup, on the caller's thread.
  FeResult<Negotiated> connect();
  // Starts the driver thread (after connect()).
  void start();
  // Workload freed a block of `order` (zone lock not held).
  void notify_free(int order);
  // Runs `task` on the driver thread between two iterations of its loop
  // (no request is posted or completed meanwhile) and returns its result;
  // an error if the driver is not running or stops first.
  FeResult<void> run_on_driver(Task task);
  // Ask the thread to stop gracefully; join() waits for it.
  void request_stop();
  void join();
  // Readable once the driver thread has finished (for the main loop's poll).
  int done_fd() const { return done_fd_.get(); }
  Exit exit_state() const { return exit_.load(); }
  const std::string& exit_message() const { return exit_msg_; }

  bool reporting_active() const { return reporting_ != nullptr && reporting_enabled_.load(); }
  PageReporting* reporting() { return reporting_.get(); }
  size_t inflight_requests() const;
  uint64_t reconnects() const { return reconnects_.load(); }
  uint64_t calls() const { return calls_.load(); }
  uint64_t spurious_calls() const { return spurious_calls_.load(); }
  // Stats buffers handed to the device (the first at setup, then one per
  // request the device made by returning the previous one).
  uint64_t stats_sent() const { return stats_sent_.load(); }
  // The migration epoch last read from the device (nullopt: never read).
  std::optional<uint32_t> epoch() const {
    const int64_t e = epoch_.load();
    return e < 0 ? std::nullopt : std::optional<uint32_t>(static_cast<uint32_t>(e));
  }
  uint64_t epoch_changes() const { return epoch_changes_.load(); }
  uint64_t epoch_reads() const { return epoch_reads_.load(); }  // GET_CONFIG(epoch) answered
  // The balloon (nullptr unless DriverOptions::balloon).
  const BalloonTarget* balloon() const { return balloon_.get(); }
  // DEFLATE_ON_OOM: called by an allocation that failed for lack of memory
  // (any thread but the driver's). If negotiated and the balloon holds
  // pages, the driver thread deflates up to 256 pages and writes actual;
  // returns the pages given back (0: nothing to gain, retrying is useless).
  uint32_t oom_deflate();

 private:
  struct Queue {
    proto::vq::DriverRing ring;
    UniqueFd kick;
    UniqueFd call;
  };

  FeResult<Negotiated> setup(UniqueFd sock, bool reconnected);
  bool post(const ReportRequest& r);
  bool post_stats();  // fill the stats buffer from the buddy model, add it, kick
  void kick(Queue& q);
  void drain_used();
  void loop();
  // GET_CONFIG(epoch) on the live connection; false = the connection failed
  // (`*why` says how; the caller drops it). A reply without the epoch is fine.
  bool poll_epoch(std::string* why);
  void run_pending_task();
  void fail_pending_task(const std::string& why);
  // A value read from the device: remember it, and on a change forget the
  // reported marks so that a pass reports all free memory again.
  void observe_epoch(uint32_t e);
  // The connection broke while running: false = the loop must end.
  bool connection_lost(const std::string& why);
  bool reconnect_loop();
  void shutdown();
  void drop_connection();
  void finish(Exit e, std::string msg);
  // Balloon, on the driver thread.
  class Transport;
  bool balloon_tell(bool inflate, std::span<const uint32_t> pfns);
  bool balloon_write_actual(uint32_t actual);
  void balloon_observe(uint32_t num_pages);
  bool balloon_work();  // one step; true = more to do at once
  void balloon_event(const char* reason);
  void serve_oom();

  GuestMemory& mem_;
  BuddyAllocator& buddy_;
  std::mutex& zone_;
  DriverOptions opts_;
  Connector connector_;
  DriverHooks hooks_;
  std::unique_ptr<PageReporting> reporting_;
  std::atomic<bool> reporting_enabled_{false};

  // Owned by the driver thread once it runs (by the caller before).
  std::unique_ptr<Frontend> fe_;
  std::vector<Queue> queues_;
  int report_q_ = -1;
  int stats_q_ = -1;
  uint64_t stats_gpa_ = 0;  // the stats buffer: in the stats ring slot's last page
  std::map<uint16_t, uint64_t> head_to_id_;
  mutable std::mutex req_mu_;                  // requests_ is read by other threads
  std::map<uint64_t, ReportRequest> requests_;  // posted, not yet used

  UniqueFd wake_fd_;
  // The reporting wakeup raised on the driver thread itself (a completion
  // drained by the loop): the loop polls the reporting state again before it
  // sleeps, with no eventfd write, poll and read (three syscalls per request).
  bool reporting_woken_here_ = false;
  UniqueFd done_fd_;
  std::atomic<bool> stop_{false};
  std::atomic<Exit> exit_{Exit::Running};
  std::string exit_msg_;
  std::atomic<uint64_t> reconnects_{0};
  std::atomic<uint64_t> calls_{0};
  std::atomic<uint64_t> spurious_calls_{0};
  std::atomic<uint64_t> stats_sent_{0};
  bool epoch_polling_ = false;            // this connection negotiated the epoch
  std::chrono::steady_clock::time_point next_epoch_poll_{};
  std::atomic<int64_t> epoch_{-1};        // remembered across connections; -1 = unknown
  std::atomic<uint64_t> epoch_changes_{0};
  std::atomic<uint64_t> epoch_reads_{0};
  std::unique_ptr<BalloonTarget> balloon_;
  uint64_t pfn_gpa_ = 0;  // the PFN array page (taken from the buddy model)
  std::atomic<bool> balloon_active_{false};  // this connection can read num_pages / write actual
  bool balloon_stalled_ = false;  // "no_memory" said for the current stall
  std::string balloon_error_;     // a tell failed on the connection: drop it
  // DEFLATE_ON_OOM requests from the workload thread (oom_deflate()),
  // served by the driver loop (serve_oom()), also while reconnecting.
  std::mutex oom_mu_;
  std::condition_variable oom_cv_;
  uint64_t oom_requested_ = 0;
  uint64_t oom_served_ = 0;
  uint32_t oom_got_ = 0;
  std::chrono::steady_clock::time_point next_balloon_poll_{};
  std::mutex task_mu_;
  std::condition_variable task_cv_;
  Task* task_ = nullptr;                     // set by run_on_driver, taken by the loop
  std::optional<FeResult<void>> task_result_;
  std::thread thread_;
};

}  // namespace fph::guest
