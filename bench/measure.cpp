// Measurement: allocated bytes of a memfd (the kernel's word on what was
// reclaimed), the guests' RAM memfds opened through /proc, and CPU time of
// the machine (/proc/stat) and of every thread of a process (schedstat).
#include "measure.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>

namespace fph::bench {

int64_t fd_allocated(int fd) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return -1;
  return static_cast<int64_t>(st.st_blocks) * 512;
}

// Busy CPU seconds of the whole machine (all CPUs: everything but idle and
// iowait), from /proc/stat.
SystemCpuReader::SystemCpuReader()
    : fd_(::open("/proc/stat", O_RDONLY | O_CLOEXEC)), tck_(static_cast<double>(sysconf(_SC_CLK_TCK))) {}
SystemCpuReader::~SystemCpuReader() {
  if (fd_ >= 0) ::close(fd_);
}
double SystemCpuReader::read() const {
  char buf[512];
  const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
  if (n <= 0) return -1;
  buf[n] = 0;
  unsigned long long v[8] = {};
  if (std::sscanf(buf, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                  &v[4], &v[5], &v[6], &v[7]) < 7)
    return -1;
  return static_cast<double>(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / tck_;
}

// Per-thread CPU of a process from /proc/PID/task/*/schedstat: nanoseconds
// on CPU and waiting on a run queue (runnable, not running), by thread name.
// Precise where utime+stime are in clock ticks (10 ms against a 200 ms window).
ThreadCpu ThreadCpu::read(pid_t pid) {
  ThreadCpu out;
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string t = dir + "/" + e->d_name;
    std::ifstream ss(t + "/schedstat"), cs(t + "/comm");
    unsigned long long run = 0, wait = 0;
    Times x;
    if (!(ss >> run >> wait) || !std::getline(cs, x.comm)) continue;
    x.run_s = static_cast<double>(run) * 1e-9;
    x.wait_s = static_cast<double>(wait) * 1e-9;
    out.tasks[static_cast<pid_t>(std::atoi(e->d_name))] = x;
  }
  closedir(d);
  return out;
}

// (on-CPU seconds, run-queue seconds) since `before`, of the threads whose
// name starts with `prefix` ("" = all). Threads that exited in between are
// lost: fphd's threads live as long as the run.
std::pair<double, double> ThreadCpu::since(const ThreadCpu& before, const std::string& prefix, bool invert) const {
  double run = 0, wait = 0;
  for (const auto& [tid, x] : tasks) {
    if ((x.comm.rfind(prefix, 0) == 0) == invert) continue;
    auto it = before.tasks.find(tid);
    run += x.run_s - (it == before.tasks.end() ? 0 : it->second.run_s);
    wait += x.wait_s - (it == before.tasks.end() ? 0 : it->second.wait_s);
  }
  return {run, wait};
}

std::map<std::string, double> ThreadCpu::by_class(const ThreadCpu& before) const {
  std::map<std::string, double> out;
  for (const auto& [tid, x] : tasks) {
    std::string c = x.comm.rfind("vm:", 0) == 0 ? std::string("vm:*") : x.comm;
    while (!c.empty() && std::isdigit(static_cast<unsigned char>(c.back()))) c.pop_back();
    auto it = before.tasks.find(tid);
    out[c] += x.run_s - (it == before.tasks.end() ? 0 : it->second.run_s);
  }
  return out;
}

// Opens (O_RDONLY, CLOEXEC) every distinct memfd named `name` process `pid` has.
std::vector<int> open_memfds(pid_t pid, const std::string& name) {
  std::vector<int> out;
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(dir.c_str());
  if (!d) return out;
  std::set<ino_t> seen;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string p = dir + "/" + e->d_name;
    char target[512];
    const ssize_t n = readlink(p.c_str(), target, sizeof target - 1);
    if (n <= 0) continue;
    target[n] = 0;
    if (std::strstr(target, ("memfd:" + name).c_str()) == nullptr) continue;
    const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat st {};
    if (fstat(fd, &st) != 0 || !seen.insert(st.st_ino).second) {
      ::close(fd);
      continue;
    }
    out.push_back(fd);
  }
  closedir(d);
  return out;
}

}  // namespace fph::bench
