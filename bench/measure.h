// Measurement: what the kernel says was reclaimed (allocated blocks of a
// memfd, and the guests' RAM memfds opened through /proc), and CPU time
// (the whole machine from /proc/stat; per thread of a process from
// schedstat).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace fph::bench {

// Bytes allocated to the file (st_blocks), -1 if fstat fails.
int64_t fd_allocated(int fd);

// Busy CPU seconds of the whole machine (all CPUs: everything but idle and
// iowait), from /proc/stat.
class SystemCpuReader {
 public:
  SystemCpuReader();
  ~SystemCpuReader();
  double read() const;

 private:
  int fd_;
  double tck_;
};

// Per-thread CPU of a process from /proc/PID/task/*/schedstat: nanoseconds
// on CPU and waiting on a run queue (runnable, not running), by thread name.
// Precise where utime+stime are in clock ticks (10 ms against a 200 ms window).
struct ThreadCpu {
  struct Times {
    std::string comm;
    double run_s = 0, wait_s = 0;
  };
  std::map<pid_t, Times> tasks;

  static ThreadCpu read(pid_t pid);
  // (on-CPU seconds, run-queue seconds) since `before`, of the threads whose
  // name starts with `prefix` ("" = all). Threads that exited in between are
  // lost: fphd's threads live as long as the run.
  std::pair<double, double> since(const ThreadCpu& before, const std::string& prefix, bool invert = false) const;
  // On-CPU seconds since `before` per thread class: the name without trailing
  // digits, and "vm:*" for every session thread ("fph-reclaim-", "vm:*", ...).
  std::map<std::string, double> by_class(const ThreadCpu& before) const;
};

// Opens (O_RDONLY, CLOEXEC) every distinct memfd named `name` process `pid` has.
std::vector<int> open_memfds(pid_t pid, const std::string& name);

}  // namespace fph::bench
