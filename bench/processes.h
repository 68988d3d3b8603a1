// The processes of an end-to-end run: fphd and fph-guest started as children
// (stderr to a log file, stdout read line by line as JSON events, each
// stamped with the time it arrived), their temporary directory, and the
// bookkeeping that lets a signal handler kill them all.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common.h"

namespace fph::bench {

using nlohmann::json;

// Children that must die with us (signal handler): registered when started,
// removed when reaped. Usable from a signal handler.
void track_child(pid_t p, bool add);

// SIGINT/SIGTERM/SIGHUP: kills and reaps every tracked child, restores
// nr_hugepages (hugepages.h) and exits with 128 + sig.
extern "C" void on_fatal_signal(int sig);

class Process {
 public:
  struct Line {
    json j;
    Clock::time_point at;
  };

  Process(const std::vector<std::string>& argv, const std::string& stderr_path);
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  void signal(int sig);
  bool running();
  int wait(std::chrono::milliseconds timeout);
  // The first line with this event (seen or future); nullopt on timeout/EOF.
  std::optional<Line> wait_event(const std::string& ev, std::chrono::milliseconds timeout);
  std::optional<Line> find_event(const std::string& ev);
  std::vector<Line> lines();
  std::string stderr_tail(size_t max = 2000) const;
  void wait_eof(std::chrono::milliseconds timeout);

 private:
  void reader();

  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string stderr_path_;
  std::thread reader_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Line> lines_;
  bool eof_ = false;
  std::optional<int> status_;
};

// /tmp/fph-bench-XXXXXX, removed at the end unless --keep-logs.
struct TempDir {
  std::string path;
  TempDir();
  ~TempDir();
};

}  // namespace fph::bench
