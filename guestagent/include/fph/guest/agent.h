// fph-guest as a whole: guest memory + buddy model + balloon driver +
// workload thread, with JSON-lines events on stdout and an exit code:
//   0 ran and verified clean, 1 usage/setup error, 2 connection lost,
//   3 corruption detected.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "fph/common/expected.h"
#include "fph/guest/local_reporter.h"
#include "fph/guest/workload.h"

namespace fph::guest {

inline constexpr int kExitOk = 0;
inline constexpr int kExitSetup = 1;
inline constexpr int kExitConnectionLost = 2;
inline constexpr int kExitCorruption = 3;

struct Config {
  std::string connect_path;  // exactly one of connect_path / listen_path / local_reclaim
  std::string listen_path;
  // Local mode: private anonymous RAM, reclaim engine in-process
  // (LocalReporter) instead of a vhost-user connection.
  std::optional<LocalMethod> local_reclaim;
  std::string name;          // default "fph-guest-<pid>"
  std::chrono::milliseconds connect_timeout{30000};

  uint64_t memory = 256ull << 20;
  uint32_t regions = 1;
  uint64_t gpa_base = 0;
  uint64_t mmap_offset = 0;
  bool hugetlb = false;
  std::optional<int> numa_node;

  int reporting_order = 9;
  std::chrono::milliseconds reporting_delay{2000};
  size_t capacity = 32;
  int max_inflight = 1;
  bool no_reporting = false;
  bool no_stats = false;  // do not negotiate the stats queue (STATS_VQ)
  bool no_epoch = false;  // do not negotiate fph's migration epoch (kFFphEpoch)
  std::chrono::milliseconds epoch_poll{1000};  // GET_CONFIG(epoch) period; 0 = setup only
  bool no_balloon = false;          // ignore the balloon target (num_pages)
  bool no_deflate_on_oom = false;   // do not negotiate VIRTIO_BALLOON_F_DEFLATE_ON_OOM
  std::chrono::milliseconds balloon_poll{500};  // GET_CONFIG(num_pages) period; 0 = setup only
  // Each run of the workload (--repeat) waits for a SIGUSR1 first (tests:
  // run the workload at a point the test chose, e.g. once the balloon is
  // inflated, without timing assumptions).
  bool workload_on_signal = false;
  std::optional<uint32_t> poison;
  bool mem_table = false;

  WorkloadSpec workload;
  uint64_t resident = 0;
  int repeat = 1;
  std::optional<std::chrono::milliseconds> duration;
  bool exit_when_reported = false;
  // Emit {"event":"reported"} once when the workload is done and all free
  // memory is reported, and keep running (fph-bench: a guest exiting would
  // take CPU from the other guests' discards still in the window).
  bool announce_reported = false;
  // Hold report_done events in memory until the next other event (timing
  // runs: a pipe write per request, and its reader waking up, are not part
  // of reclaim, and on hugetlbfs they cost as much as the discard).
  bool defer_report_events = false;
  bool reconnect = false;
  // Live migration (migration.h): to the back end at `migrate_to`,
  // `migrate_after` the driver started, precopy lasting at least
  // `migrate_min_precopy`. `migrate_ignore_device_log`: a negative control
  // for tests (the back end's dirty log is read but not acted on).
  std::string migrate_to;
  std::chrono::milliseconds migrate_after{0};
  std::chrono::milliseconds migrate_min_precopy{0};
  std::chrono::milliseconds migrate_reply_timeout{10000};  // the destination's answers
  bool migrate_ignore_device_log = false;
  bool require_discard = false;
  bool check_reported = true;    // false: --no-check-reported (timing runs)  // reported pages not reading as free value -> exit 3
  uint64_t seed = 1;
};

// Checks ranges and combinations; fills defaults (name).
Expected<void, std::string> validate(Config& c);

// Thread-safe JSON lines writer (one object per line, flushed).
class EventSink {
 public:
  explicit EventSink(std::FILE* out = stdout) : out_(out) {}
  // One JSON line per event. A `deferrable` event (report_done) is held in
  // memory while deferring is on, and printed, in order, before the next
  // event that is not (or at exit).
  void emit(const nlohmann::json& j, bool deferrable = false);
  // The same for a line the caller already formatted as one JSON object (no
  // newline): the per-request report_done event, built without a json tree
  // (its allocations were a visible part of the guest's CPU per request).
  void emit_line(std::string line, bool deferrable = false);
  void set_deferring(bool on) { defer_ = on; }
  void flush();
  ~EventSink() { flush(); }

 private:
  void write_held_locked();
  std::mutex mu_;
  std::FILE* out_;
  bool defer_ = false;
  std::string held_;
};

// Runs fph-guest until --duration, SIGTERM/SIGINT, --exit-when-reported, or
// connection loss. Blocks SIGTERM/SIGINT in the calling thread (and the
// threads it starts) and waits for them with a signalfd.
int run(const Config& c, EventSink& events);

}  // namespace fph::guest
