// Helpers for integration tests that run the real binaries as separate
// processes: spawn and read JSON event lines, scrape the metrics endpoint,
// and measure guest memory from the kernel (memfd st_blocks through
// /proc/PID/fd, never from anything the processes claim).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "fph/probe/scrape.h"

namespace fph::test {

using namespace std::chrono_literals;

// Generous bound for waits that only exist so a broken build fails instead of
// hanging; never a performance expectation.
inline const auto kPatience = std::chrono::seconds(
    std::getenv("FPH_TEST_PATIENCE_S") ? std::atoi(std::getenv("FPH_TEST_PATIENCE_S")) : 300);

std::string fphd_path();
std::string guest_path();
// A fresh directory under /tmp for sockets and logs, removed by the caller's TempDir.
struct TempDir {
  std::string path;
  TempDir();
  ~TempDir();
};

class Process {
 public:
  // Starts argv[0] with stdout captured (parsed as JSON lines) and stderr
  // written to `stderr_path`.
  Process(std::vector<std::string> argv, std::string stderr_path);
  ~Process();  // SIGKILL if still running
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  // Waits for the next JSON line whose "event" is `event` (lines seen before
  // are searched too, once). nullopt on timeout or exit.
  std::optional<nlohmann::json> wait_event(const std::string& event,
                                           std::chrono::milliseconds timeout = kPatience);
  std::vector<nlohmann::json> events() const;
  void signal(int sig);
  // Exit code (or 128+signal). Waits up to `timeout`, then SIGKILLs.
  int wait(std::chrono::milliseconds timeout = kPatience);
  bool running();
  std::string stderr_text() const;

 private:
  void reader();
  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string stderr_path_;
  std::thread reader_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<nlohmann::json> lines_;
  size_t consumed_ = 0;
  bool eof_ = false;
  std::optional<int> status_;
};

// Scraping fphd's metrics: fph::probe, shared with fph-bench.
using probe::http_get;
using probe::metric_sum;
// Bytes the kernel holds for the memfds (name containing `memfd_name`) that
// process `pid` has open: st_blocks * 512 summed over distinct inodes.
int64_t memfd_allocated_bytes(pid_t pid, const std::string& memfd_name = "fph-guest-ram");
// Waits for the guest's `event` (normally "workload_freed") while sampling its
// memfd backing into *peak. The peak is only known once the workload has
// stopped writing: stopping at the first sample over a threshold can catch it
// part-way, and then less than the test expects can ever come back.
std::optional<nlohmann::json> wait_event_sampling_peak(Process& guest, const std::string& event,
                                                       int64_t* peak);

// Polls `pred` every 200 ms until true or `timeout` passes.
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout = kPatience) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(200ms);
  }
  return pred();
}

// Starts fphd with a listening socket and metrics on a free port; waits for ready.
struct Fphd {
  std::unique_ptr<Process> proc;
  std::string socket;
  std::string metrics_url;
  Fphd(const TempDir& dir, std::vector<std::string> extra = {});
  std::string scrape() const { return http_get(metrics_url); }
};

}  // namespace fph::test
