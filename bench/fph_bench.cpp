// fph-bench: end-to-end reclaim throughput, request latency and CPU cost of
// fphd against the raw limit of the kernel primitive, on the same ranges and
// the same backing, in one run.
//
// METHODOLOGY
//
// Scenarios: backing (4 KiB shmem memfd, 2 MiB hugetlbfs memfd) x guest count
// (default 1, 4, 16). Every guest count shares the same total guest memory
// (--total, default 4 GiB: 1x4G, 4x1G, 16x256M; --quick: 256 MiB), so the
// same number of bytes is reclaimed in every scenario.
//
// End to end ("e2e/<backing>/guests:N"), the real binaries as separate
// processes on a loopback Unix socket:
//   1. fphd --listen SOCK --metrics 127.0.0.1:0 --threads-per-node T
//   2. N x fph-guest --connect SOCK --memory M [--hugetlb]
//        --workload alloc-free:<90% of M>:HOLD --reporting-delay-ms 0
//        --announce-reported --defer-report-events
//                               (reporting order 9, capacity 32,
//        max-inflight 1: the Linux defaults)
//      Each guest writes 90% of its RAM, holds it, verifies it and frees it;
//      its page reporting then posts the freed max-order blocks, 32 per
//      request, one request in flight at a time.
//   3. Gate: the bench opens every guest's RAM memfd itself (through
//      /proc/PID/fd) and watches st_blocks. When every guest has populated
//      its 90%, fphd is stopped (SIGSTOP); when every guest has emitted
//      workload_freed (its first request is posted and kicked), the bench
//      samples st_blocks and fphd's CPU and continues fphd (SIGCONT): t0.
//      So the window contains reporting and discarding only, never the
//      guests' allocation and verification, and every guest starts at once.
//      HOLD adapts to the observed allocation time; a run whose gate was
//      missed (a guest freed before fphd was stopped) is repeated.
//   4. The bench then sleeps (no sampling: it must not take CPU from what
//      it measures) until every guest has announced that all its free
//      memory is reported and its last chain came back (the guests stay
//      alive until then, as VMs do). The window ends when the last chain was used: each guest logs
//      when it posted a request and its kick-to-used latency, on the clock
//      of t0; a chain is used only after its discards returned.
//      reclaimed = st_blocks(t0) - st_blocks(when all have announced), summed
//      over the guests' memfds (the kernel's word, never a return code)
//      throughput = reclaimed / window;  CPU per GiB = fphd CPU / GiB, where
//      fphd CPU is every fphd thread's on-CPU time (schedstat, ns) from t0
//      until all guests have exited (so session teardown is included),
//      reported split into the discard pipeline's threads and the rest, with
//      the pipeline threads' run-queue wait (runnable, CPU taken by others).
//      latency = kick to used, per request, measured by the guest driver
//      (report_done.latency_us); requests posted before t0 (waiting at the
//      gate) are excluded. p50/p99 pool all requests of all repetitions.
//      The block size the guests report (bytes/blocks of report_done) and the
//      one fphd issues (fphd_discarded_bytes_total / fphd_discard_syscalls_total
//      delta, fphd coalesces adjacent ranges up to 16 MiB) are both reported.
// Raw limit ("raw/<backing>/guests:N"), in this process: N memfds of the same
// sizes (MFD_HUGETLB for hugetlb), mapped MAP_SHARED and populated the same way
// (every 4 KiB page of the same number of bytes written, the mapping kept like
// the guest's), then a tight loop of fallocate(PUNCH_HOLE|KEEP_SIZE) with the
// block size the guests reported (or --raw-block), blocks interleaved across
// files and taken from one atomic counter by T threads (T = fphd's discard
// threads: --threads-per-node x NUMA nodes). Wall time from release to the
// last thread; CPU = sum of the threads' CLOCK_THREAD_CPUTIME_ID.
// Repetitions run as pairs (e2e, then raw, then the next pair), so a drifting
// machine moves both sides of a ratio. Ratios: throughput e2e/raw (target
// >= 0.9) and CPU per GiB e2e/raw (target <= 1.1), the median over the pairs,
// judged for 4 or more guests.
//
// Hugetlb: the bench reserves the huge pages itself (/proc/sys/vm/nr_hugepages,
// under the same flock as the unit tests), restores the previous value at the
// end, on failure and on SIGINT/SIGTERM, and skips the hugetlb scenarios with
// a clear message if it cannot reserve them.
//
// Exit status: 1 if any end-to-end run failed or reclaimed less than 90% of
// what the guests freed (the ctest smoke test relies on this; it never
// asserts anything about time).
//
// Usage: fph-bench [--total=4G] [--quick] [--guests=1,4,16]
//          [--backing=shmem,hugetlb] [--threads=N] [--repetitions=3]
//          [--raw-block=SIZE] [--hold-ms=MS] [--fphd=PATH] [--guest=PATH]
//          [--keep-logs] [Google Benchmark flags, e.g. --benchmark_format=json]
// Environment: FPH_BENCH_FPHD, FPH_BENCH_GUEST override the binaries;
// FPH_BENCH_ARGS is prepended to the command line.
#include <benchmark/benchmark.h>
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "percentile.h"
#include "fph/probe/scrape.h"

#ifndef FPH_FPHD_PATH
#define FPH_FPHD_PATH "fphd"
#endif
#ifndef FPH_GUEST_PATH
#define FPH_GUEST_PATH "fph-guest"
#endif

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using nlohmann::json;
using fph::probe::http_get;
using fph::probe::metric_sum;

constexpr uint64_t kKiB = 1024, kMiB = kKiB * 1024, kGiB = kMiB * 1024;
constexpr double kGiBd = 1024.0 * 1024.0 * 1024.0;
constexpr uint64_t kRegionAlign = 4 * kMiB;  // fph-guest rounds RAM up to 4 MiB

// ------------------------------------------------------------------ options

struct Options {
  uint64_t total = 4 * kGiB;
  bool quick = false;
  std::vector<int> guests{1, 4, 16};
  std::vector<std::string> backings{"shmem", "hugetlb"};
  int threads = 0;  // per node; 0 = online CPUs
  int repetitions = 3;
  uint64_t raw_block = 0;  // 0 = the block size the guests reported
  int hold_ms = 0;         // 0 = adaptive
  std::string fphd = FPH_FPHD_PATH;
  std::string guest = FPH_GUEST_PATH;
  bool keep_logs = false;
  bool table_to_stderr = false;
  std::chrono::seconds patience{300};
};
Options g_opt;

uint64_t parse_size(const std::string& s) {
  size_t pos = 0;
  const double v = std::stod(s, &pos);
  uint64_t mul = 1;
  if (pos < s.size()) {
    switch (std::toupper(static_cast<unsigned char>(s[pos]))) {
      case 'K': mul = kKiB; break;
      case 'M': mul = kMiB; break;
      case 'G': mul = kGiB; break;
      case 'T': mul = kGiB * 1024; break;
      default: throw std::invalid_argument("bad size " + s);
    }
  }
  if (v <= 0) throw std::invalid_argument("bad size " + s);
  return static_cast<uint64_t>(v * static_cast<double>(mul));
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, sep);)
    if (!x.empty()) out.push_back(x);
  return out;
}

[[noreturn]] void usage(const std::string& err) {
  std::fprintf(stderr,
               "fph-bench: %s\n"
               "usage: fph-bench [--total=SIZE] [--quick] [--guests=1,4,16] "
               "[--backing=shmem,hugetlb]\n"
               "                 [--threads=N] [--repetitions=N] [--raw-block=SIZE] "
               "[--hold-ms=MS]\n"
               "                 [--fphd=PATH] [--guest=PATH] [--keep-logs] "
               "[--benchmark_* flags]\n",
               err.c_str());
  std::exit(2);
}

// Takes our own flags out of argv; the rest goes to Google Benchmark.
std::vector<char*> parse_args(int argc, char** argv, std::vector<std::string>& storage) {
  if (const char* e = std::getenv("FPH_BENCH_FPHD")) g_opt.fphd = e;
  if (const char* e = std::getenv("FPH_BENCH_GUEST")) g_opt.guest = e;
  if (const char* e = std::getenv("FPH_BENCH_PATIENCE_S")) g_opt.patience = std::chrono::seconds(std::atoi(e));
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  if (const char* e = std::getenv("FPH_BENCH_ARGS")) {
    auto pre = split(e, ' ');
    args.insert(args.begin(), pre.begin(), pre.end());
  }
  bool total_set = false;
  storage.clear();
  storage.push_back(argv[0]);
  for (size_t i = 0; i < args.size(); ++i) {
    std::string a = args[i];
    if (a.rfind("--benchmark_", 0) == 0 || a.rfind("--v=", 0) == 0) {
      if (a == "--benchmark_format=json" || a == "--benchmark_format=csv") g_opt.table_to_stderr = true;
      storage.push_back(a);
      continue;
    }
    std::string key = a, val;
    const bool has_eq = a.find('=') != std::string::npos;
    if (has_eq) {
      key = a.substr(0, a.find('='));
      val = a.substr(a.find('=') + 1);
    }
    auto value = [&]() -> std::string {
      if (has_eq) return val;
      if (i + 1 >= args.size()) usage(key + " needs a value");
      return args[++i];
    };
    try {
      if (key == "--help" || key == "-h") usage("help");
      else if (key == "--quick") g_opt.quick = true;
      else if (key == "--keep-logs") g_opt.keep_logs = true;
      else if (key == "--total") g_opt.total = parse_size(value()), total_set = true;
      else if (key == "--threads") g_opt.threads = std::stoi(value());
      else if (key == "--repetitions") g_opt.repetitions = std::stoi(value());
      else if (key == "--raw-block") g_opt.raw_block = parse_size(value());
      else if (key == "--hold-ms") g_opt.hold_ms = std::stoi(value());
      else if (key == "--fphd") g_opt.fphd = value();
      else if (key == "--guest") g_opt.guest = value();
      else if (key == "--guests") {
        g_opt.guests.clear();
        for (auto& x : split(value(), ',')) g_opt.guests.push_back(std::stoi(x));
      } else if (key == "--backing") {
        g_opt.backings = split(value(), ',');
        for (auto& b : g_opt.backings)
          if (b != "shmem" && b != "hugetlb") usage("--backing takes shmem and/or hugetlb");
      } else {
        usage("unknown option " + a);
      }
    } catch (const std::invalid_argument&) {
      usage("bad value in " + a);
    } catch (const std::out_of_range&) {
      usage("bad value in " + a);
    }
  }
  if (g_opt.quick && !total_set) g_opt.total = 256 * kMiB;
  if (g_opt.repetitions < 1) usage("--repetitions must be >= 1");
  if (g_opt.threads <= 0) g_opt.threads = std::max(1, static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
  for (int g : g_opt.guests) {
    if (g < 1 || g > 256) usage("--guests: counts must be 1..256");
    if (g_opt.total / static_cast<uint64_t>(g) < 16 * kMiB)
      usage("--total / guests must be at least 16 MiB per guest");
  }
  std::vector<char*> out;
  for (auto& s : storage) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// ------------------------------------------------------------------ helpers

int64_t mono_ns(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

using fph::bench::median;

using fph::bench::percentile;

std::string human_bytes(double b) {
  char buf[64];
  if (b >= kGiBd) std::snprintf(buf, sizeof buf, "%.2f GiB", b / kGiBd);
  else if (b >= kMiB) std::snprintf(buf, sizeof buf, "%.1f MiB", b / kMiB);
  else std::snprintf(buf, sizeof buf, "%.0f KiB", b / kKiB);
  return buf;
}

std::string size_arg(uint64_t bytes) {  // for fph-guest: exact, in KiB
  return std::to_string(bytes / kKiB) + "K";
}

int64_t fd_allocated(int fd) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return -1;
  return static_cast<int64_t>(st.st_blocks) * 512;
}

// Children that must die with us (signal handler) and a possibly changed
// nr_hugepages to restore: plain arrays, usable from a signal handler.
constexpr int kMaxChildren = 512;
std::atomic<pid_t> g_children[kMaxChildren];
char g_hp_restore[32];
std::atomic<bool> g_hp_changed{false};

void track_child(pid_t p, bool add) {
  for (auto& c : g_children) {
    pid_t expected = add ? 0 : p;
    if (c.compare_exchange_strong(expected, add ? p : 0)) return;
  }
}

void restore_hugepages_raw() {
  if (!g_hp_changed.load()) return;
  int fd = ::open("/proc/sys/vm/nr_hugepages", O_WRONLY | O_CLOEXEC);
  if (fd >= 0) {
    (void)!::write(fd, g_hp_restore, std::strlen(g_hp_restore));
    ::close(fd);
  }
  g_hp_changed.store(false);
}

extern "C" void on_fatal_signal(int sig) {
  for (auto& c : g_children) {
    const pid_t p = c.load();
    if (p > 0) ::kill(p, SIGKILL);
  }
  // The children hold huge pages until they are gone; give them a moment.
  for (auto& c : g_children) {
    const pid_t p = c.load();
    if (p > 0) ::waitpid(p, nullptr, 0);
  }
  restore_hugepages_raw();
  ::_exit(128 + sig);
}

// ------------------------------------------------------------------ process

class Process {
 public:
  struct Line {
    json j;
    Clock::time_point at;
  };

  Process(const std::vector<std::string>& argv, const std::string& stderr_path)
      : stderr_path_(stderr_path) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, p[1], 1);
    posix_spawn_file_actions_addopen(&fa, 2, stderr_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<char*> args;
    std::vector<std::string> copy = argv;
    for (auto& a : copy) args.push_back(a.data());
    args.push_back(nullptr);
    const int rc = posix_spawn(&pid_, args[0], &fa, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(p[1]);
    if (rc != 0) {
      ::close(p[0]);
      throw std::runtime_error("cannot start " + argv[0] + ": " + std::strerror(rc));
    }
    track_child(pid_, true);
    out_fd_ = p[0];
    reader_ = std::thread([this] { reader(); });
  }
  ~Process() {
    if (running()) {
      ::kill(pid_, SIGKILL);
      wait(10s);
    }
    if (reader_.joinable()) reader_.join();
    if (out_fd_ >= 0) ::close(out_fd_);
  }
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  void signal(int sig) {
    if (!status_) ::kill(pid_, sig);
  }
  bool running() {
    if (status_) return false;
    int st = 0;
    const pid_t r = ::waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      track_child(pid_, false);
      return false;
    }
    return r == 0;
  }
  int wait(std::chrono::milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    while (running() && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
    if (running()) {
      ::kill(pid_, SIGKILL);
      int st = 0;
      ::waitpid(pid_, &st, 0);
      status_ = 128 + SIGKILL;
      track_child(pid_, false);
    }
    return *status_;
  }
  // The first line with this event (seen or future); nullopt on timeout/EOF.
  std::optional<Line> wait_event(const std::string& ev, std::chrono::milliseconds timeout) {
    std::unique_lock lk(mu_);
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      for (const auto& l : lines_)
        if (l.j.value("event", "") == ev) return l;
      if (eof_) return std::nullopt;
      if (cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
        for (const auto& l : lines_)
          if (l.j.value("event", "") == ev) return l;
        return std::nullopt;
      }
    }
  }
  std::optional<Line> find_event(const std::string& ev) {
    std::lock_guard lk(mu_);
    for (const auto& l : lines_)
      if (l.j.value("event", "") == ev) return l;
    return std::nullopt;
  }
  std::vector<Line> lines() {
    std::lock_guard lk(mu_);
    return lines_;
  }
  std::string stderr_tail(size_t max = 2000) const {
    std::ifstream in(stderr_path_);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string s = ss.str();
    return s.size() > max ? s.substr(s.size() - max) : s;
  }
  void wait_eof(std::chrono::milliseconds timeout) {
    std::unique_lock lk(mu_);
    cv_.wait_for(lk, timeout, [&] { return eof_; });
  }

 private:
  void reader() {
    std::string buf;
    char chunk[8192];
    for (;;) {
      const ssize_t n = ::read(out_fd_, chunk, sizeof chunk);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      const auto now = Clock::now();
      buf.append(chunk, static_cast<size_t>(n));
      size_t pos;
      while ((pos = buf.find('\n')) != std::string::npos) {
        auto j = json::parse(buf.substr(0, pos), nullptr, false);
        buf.erase(0, pos + 1);
        if (j.is_discarded() || !j.is_object()) continue;
        std::lock_guard lk(mu_);
        lines_.push_back({std::move(j), now});
        cv_.notify_all();
      }
    }
    std::lock_guard lk(mu_);
    eof_ = true;
    cv_.notify_all();
  }

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

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/fph-bench-XXXXXX";
    if (!mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!g_opt.keep_logs) std::filesystem::remove_all(path, ec);
    else std::fprintf(stderr, "fph-bench: logs kept in %s\n", path.c_str());
  }
};

// Busy CPU seconds of the whole machine (all CPUs: everything but idle and
// iowait), from /proc/stat.
class SystemCpuReader {
 public:
  SystemCpuReader()
      : fd_(::open("/proc/stat", O_RDONLY | O_CLOEXEC)), tck_(static_cast<double>(sysconf(_SC_CLK_TCK))) {}
  ~SystemCpuReader() {
    if (fd_ >= 0) ::close(fd_);
  }
  double read() const {
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

  static ThreadCpu read(pid_t pid) {
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
  std::pair<double, double> since(const ThreadCpu& before, const std::string& prefix, bool invert = false) const {
    double run = 0, wait = 0;
    for (const auto& [tid, x] : tasks) {
      if ((x.comm.rfind(prefix, 0) == 0) == invert) continue;
      auto it = before.tasks.find(tid);
      run += x.run_s - (it == before.tasks.end() ? 0 : it->second.run_s);
      wait += x.wait_s - (it == before.tasks.end() ? 0 : it->second.wait_s);
    }
    return {run, wait};
  }
};

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

// ------------------------------------------------------------------ hugetlb

struct HugePages {
  bool tried = false;
  bool ok = false;
  std::string message;
  long saved = -1;
  int lock_fd = -1;
  uint64_t page_size = 2 * kMiB;

  static long meminfo(const char* key) {
    std::ifstream in("/proc/meminfo");
    std::string k;
    long v = 0;
    while (in >> k) {
      if (k == key) {
        in >> v;
        return v;
      }
      in.ignore(1 << 12, '\n');
    }
    return -1;
  }
  static long read_knob() {
    std::ifstream in("/proc/sys/vm/nr_hugepages");
    long v = -1;
    in >> v;
    return v;
  }
  static bool write_knob(long v) {
    std::ofstream out("/proc/sys/vm/nr_hugepages");
    out << v << "\n";
    out.flush();
    return static_cast<bool>(out);
  }

  // Reserves `bytes` worth of huge pages (if not already free).
  void reserve(uint64_t bytes) {
    if (tried) return;
    tried = true;
    const long hp_kb = meminfo("Hugepagesize:");
    if (hp_kb > 0) page_size = static_cast<uint64_t>(hp_kb) * kKiB;
    const long need = static_cast<long>((bytes + page_size - 1) / page_size) + 8;
    // Serialize with the unit tests that also change the knob.
    lock_fd = ::open("/tmp/fph-test-nr_hugepages.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0 || flock(lock_fd, LOCK_EX) != 0) {
      message = "cannot take /tmp/fph-test-nr_hugepages.lock";
      return;
    }
    saved = read_knob();
    if (saved < 0) {
      message = "cannot read /proc/sys/vm/nr_hugepages";
      return;
    }
    const long free0 = meminfo("HugePages_Free:");
    if (free0 < need) {
      std::snprintf(g_hp_restore, sizeof g_hp_restore, "%ld\n", saved);
      g_hp_changed.store(true);
      if (!write_knob(saved + (need - free0))) {
        restore();
        message = "cannot write /proc/sys/vm/nr_hugepages (need root): " +
                  std::string(std::strerror(errno));
        return;
      }
    }
    const long free1 = meminfo("HugePages_Free:");
    if (free1 < need) {
      message = "could only get " + std::to_string(free1) + " of the " + std::to_string(need) +
                " huge pages of " + std::to_string(page_size / kKiB) +
                " KiB needed (memory fragmented or too small)";
      restore();
      return;
    }
    ok = true;
    message = "reserved: " + std::to_string(need) + " huge pages of " +
              std::to_string(page_size / kKiB) + " KiB free (nr_hugepages " +
              std::to_string(saved) + " -> " + std::to_string(read_knob()) +
              ", restored at exit)";
  }
  void restore() {
    if (g_hp_changed.load() && saved >= 0) {
      if (!write_knob(saved))
        std::fprintf(stderr, "fph-bench: WARNING: could not restore nr_hugepages to %ld\n", saved);
      g_hp_changed.store(false);
    }
    if (lock_fd >= 0) {
      ::close(lock_fd);
      lock_fd = -1;
    }
  }
  ~HugePages() { restore(); }
};
HugePages g_huge;

// ------------------------------------------------------------------ scenarios

struct Scenario {
  std::string backing;  // shmem | hugetlb
  int guests = 1;
  uint64_t mem = 0;    // per guest
  uint64_t alloc = 0;  // per guest: 90%
  bool hugetlb() const { return backing == "hugetlb"; }
  std::string key() const { return backing + "/guests:" + std::to_string(guests); }
};

Scenario make_scenario(const std::string& backing, int guests) {
  Scenario s;
  s.backing = backing;
  s.guests = guests;
  s.mem = g_opt.total / static_cast<uint64_t>(guests) / kRegionAlign * kRegionAlign;
  s.alloc = s.mem / 10 * 9 / (4 * kKiB) * (4 * kKiB);
  return s;
}

struct E2EResult {
  bool ok = false;
  std::string error;
  uint64_t freed = 0;
  int64_t reclaimed = 0;
  double window_s = 0;
  double fphd_cpu_s = 0;
  std::vector<double> latencies_us;
  uint64_t reported_bytes = 0, reported_blocks = 0, requests = 0;
  double issued_bytes = 0, issued_syscalls = 0;
  // Diagnostics: seconds fphd spent inside discard syscalls and handling
  // requests (taken off the ring -> returned), from its histograms' _sum;
  // per-guest sum of kick-to-used time inside the window.
  double discard_s = 0, fphd_request_s = 0, fphd_requests = 0;
  double guest_busy_s = 0;
  double system_cpu_s = 0;  // whole machine, busy, in the window
  // fphd's threads (schedstat, ns): the discard pipeline's ("fph-reclaim-N"
  // and the TBB workers it started, which inherit the name) and the rest
  // (session threads, sampler, metrics server); run-queue wait of the
  // pipeline threads: time they were runnable but another task had the CPU.
  double discard_cpu_s = 0, other_cpu_s = 0, discard_runq_s = 0;
  double guests_cpu_s = 0, bench_cpu_s = 0;  // the guest processes and this bench, same span
  double steady_tput = 0;   // between 10% and 90% of the bytes back: without ramp-up and tail
  double start_ms = 0;      // t0 until 1% of the bytes were back
  int nodes = 1;
  double alloc_s = 0;
  bool gate_missed = false;
  double tput() const { return window_s > 0 ? static_cast<double>(reclaimed) / window_s : 0; }
  double cpu_per_gib() const {
    return reclaimed > 0 ? fphd_cpu_s / (static_cast<double>(reclaimed) / kGiBd) : std::nan("");
  }
};

struct RawResult {
  bool ok = false;
  std::string error;
  uint64_t block = 0;
  int threads = 0;
  int64_t reclaimed = 0;
  double wall_s = 0;
  double cpu_s = 0;
  double tput() const { return wall_s > 0 ? static_cast<double>(reclaimed) / wall_s : 0; }
  double cpu_per_gib() const {
    return reclaimed > 0 ? cpu_s / (static_cast<double>(reclaimed) / kGiBd) : std::nan("");
  }
};

std::map<std::string, std::vector<E2EResult>> g_e2e;
std::map<std::string, std::vector<RawResult>> g_raw;
std::map<std::string, int> g_hold_ms;  // adaptive per scenario
std::map<std::string, std::string> g_skipped;
bool g_failed = false;

int default_hold_ms() {
  if (g_opt.hold_ms > 0) return g_opt.hold_ms;
  return 1500 + static_cast<int>(1500.0 * static_cast<double>(g_opt.total) / kGiBd);
}

// One end-to-end measurement. `hold_ms` is how long the guests hold their
// allocation (the gate must close within it).
E2EResult run_e2e(const Scenario& sc, int hold_ms) {
  E2EResult r;
  TempDir dir;
  const std::string sock = dir.path + "/fphd.sock";
  const auto patience = std::chrono::duration_cast<std::chrono::milliseconds>(g_opt.patience);
  Process fphd({g_opt.fphd, "--listen", sock, "--metrics", "127.0.0.1:0", "--threads-per-node",
                std::to_string(g_opt.threads), "--log-level", "warn"},
               dir.path + "/fphd.stderr");
  auto ready = fphd.wait_event("ready", 60s);
  if (!ready) {
    r.error = "fphd did not become ready: " + fphd.stderr_tail();
    return r;
  }
  const std::string metrics_url = ready->j.value("metrics", "");
  r.nodes = std::max(1, ready->j.value("nodes", 1));

  std::vector<std::unique_ptr<Process>> guests;
  for (int i = 0; i < sc.guests; ++i) {
    std::vector<std::string> argv{g_opt.guest,
                                  "--connect", sock,
                                  "--name", "bench-g" + std::to_string(i),
                                  "--memory", size_arg(sc.mem),
                                  "--workload", "alloc-free:" + size_arg(sc.alloc) + ":" + std::to_string(hold_ms),
                                  "--reporting-delay-ms", "0",
                                  "--announce-reported",
                                  "--defer-report-events",
                                  "--seed", std::to_string(i + 1),
                                  "--log-level", "warn"};
    if (sc.hugetlb()) argv.push_back("--hugetlb");
    guests.push_back(std::make_unique<Process>(argv, dir.path + "/guest" + std::to_string(i) + ".stderr"));
  }
  // Our own fds on every guest's RAM: st_blocks from the kernel, valid after
  // the guest exits. Closed at the end of the run.
  std::vector<int> memfds;
  struct CloseAll {
    std::vector<int>& v;
    ~CloseAll() {
      for (int fd : v) ::close(fd);
    }
  } close_all{memfds};
  std::vector<std::vector<int>> per_guest(guests.size());
  const auto t_ready0 = Clock::now();
  for (size_t i = 0; i < guests.size(); ++i) {
    auto ev = guests[i]->wait_event("ready", 120s);
    if (!ev) {
      r.error = "guest " + std::to_string(i) + " did not become ready: " + guests[i]->stderr_tail();
      return r;
    }
    per_guest[i] = open_memfds(guests[i]->pid(), "fph-guest-ram");
    if (per_guest[i].empty()) {
      r.error = "cannot open guest " + std::to_string(i) + "'s memfd through /proc";
      return r;
    }
    memfds.insert(memfds.end(), per_guest[i].begin(), per_guest[i].end());
  }
  auto guest_bytes = [&](size_t i) {
    int64_t s = 0;
    for (int fd : per_guest[i]) s += fd_allocated(fd);
    return s;
  };
  auto total_bytes = [&] {
    int64_t s = 0;
    for (int fd : memfds) s += fd_allocated(fd);
    return s;
  };
  // Every guest has written its 90%.
  for (;;) {
    bool all = true;
    for (size_t i = 0; i < guests.size() && all; ++i)
      all = guest_bytes(i) >= static_cast<int64_t>(sc.alloc);
    if (all) break;
    for (auto& g : guests) {
      if (!g->running()) {
        r.error = "a guest exited during its allocation: " + g->stderr_tail();
        return r;
      }
    }
    if (Clock::now() - t_ready0 > patience) {
      r.error = "guests did not populate their memory in time";
      return r;
    }
    std::this_thread::sleep_for(2ms);
  }
  r.alloc_s = std::chrono::duration<double>(Clock::now() - t_ready0).count();
  const std::string m0 = http_get(metrics_url);

  // The gate.
  fphd.signal(SIGSTOP);
  const auto t_stopped = Clock::now();
  for (auto& g : guests) {
    auto ev = g->wait_event("workload_freed", patience);
    if (!ev) {
      fphd.signal(SIGCONT);
      r.error = "a guest did not free its workload: " + g->stderr_tail();
      return r;
    }
    if (ev->at < t_stopped) r.gate_missed = true;
    r.freed += ev->j.value("bytes", uint64_t{0});
  }
  // Let every driver thread post and kick its first request.
  std::this_thread::sleep_for(20ms);

  SystemCpuReader syscpu;
  const ThreadCpu threads0 = ThreadCpu::read(fphd.pid());
  std::vector<ThreadCpu> guest_threads0;
  for (auto& g : guests) guest_threads0.push_back(ThreadCpu::read(g->pid()));
  const ThreadCpu bench_threads0 = ThreadCpu::read(getpid());
  const int64_t b0 = total_bytes();
  const double sys0 = syscpu.read();
  const auto t0 = Clock::now();
  fphd.signal(SIGCONT);
  // Nothing of ours runs in the window: this thread sleeps until every
  // guest says all its free memory is reported and no request is in flight
  // (the guests stay alive, idle: exiting would take CPU from the other
  // guests' discards), so the measurement takes no CPU from the two being
  // measured. (Sampling st_blocks every 1 ms, as this bench first did, cost
  // 2-3% of the machine and a wakeup per millisecond.)
  bool all_reported = true;
  for (auto& g : guests) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(t0 + patience - Clock::now());
    all_reported = g->wait_event("reported", std::max<std::chrono::milliseconds>(left, 1ms)).has_value() &&
                   all_reported;
  }
  // fphd's CPU: every thread, from t0 until every guest has said so, in
  // nanoseconds (schedstat; /proc/PID/stat counts 10 ms ticks).
  {
    const ThreadCpu threads1 = ThreadCpu::read(fphd.pid());
    const auto [dr, dw] = threads1.since(threads0, "fph-reclaim");
    const auto [orun, owait] = threads1.since(threads0, "fph-reclaim", /*invert=*/true);
    (void)owait;
    r.discard_cpu_s = dr;
    r.discard_runq_s = dw;
    r.other_cpu_s = orun;
    if (threads1.tasks.empty()) {
      r.error = "cannot read /proc/" + std::to_string(fphd.pid()) + "/task/*/schedstat";
      return r;
    }
    r.fphd_cpu_s = dr + orun;
    // Who else ran in the window: the guests (driver and agent threads) and
    // this bench (its stdout readers wake when a guest prints).
    for (size_t i = 0; i < guests.size(); ++i)
      r.guests_cpu_s += ThreadCpu::read(guests[i]->pid()).since(guest_threads0[i], "").first;
    r.bench_cpu_s = ThreadCpu::read(getpid()).since(bench_threads0, "").first;
  }
  r.system_cpu_s = syscpu.read() - sys0;
  // The kernel's word on what was reclaimed: allocated blocks of the guests'
  // memfds (our own descriptors) before t0 and once every guest is done.
  const int64_t b_final = total_bytes();
  for (auto& g : guests) g->signal(SIGTERM);
  if (!all_reported) {
    r.error = "guests did not finish reporting in time";
    return r;
  }
  r.reclaimed = b0 - b_final;
  // The window ends when the last chain came back to its guest (the guest
  // logs when it was posted and how long it took to be used: CLOCK_MONOTONIC,
  // the clock of t0). A chain is used only after its discards returned.
  const int64_t t0_ns = mono_ns(t0);
  std::vector<std::pair<double, double>> used;  // (ns after t0, bytes)
  for (auto& g : guests) {
    for (const auto& l : g->lines()) {
      if (l.j.value("event", "") != "report_done" || !l.j.contains("posted_ns")) continue;
      const double at = static_cast<double>(l.j["posted_ns"].get<int64_t>()) +
                        l.j.value("latency_us", 0.0) * 1e3 - static_cast<double>(t0_ns);
      if (at > 0) used.emplace_back(at, static_cast<double>(l.j.value("bytes", uint64_t{0})));
    }
  }
  if (used.empty()) {
    r.error = "no request came back after t0";
    return r;
  }
  std::sort(used.begin(), used.end());
  r.window_s = used.back().first * 1e-9;
  {
    double total = 0;
    for (const auto& u : used) total += u.second;
    auto when = [&](double frac) {  // ns after t0 when `frac` of the bytes were back
      double acc = 0;
      for (const auto& u : used)
        if ((acc += u.second) >= frac * total) return u.first;
      return used.back().first;
    };
    const double dt = (when(0.9) - when(0.1)) * 1e-9;
    r.steady_tput = dt > 0 ? 0.8 * total / dt : 0;
    r.start_ms = when(0.01) * 1e-6;
  }
  const std::string m1 = http_get(metrics_url);
  r.issued_bytes = metric_sum(m1, "fphd_discarded_bytes_total") - metric_sum(m0, "fphd_discarded_bytes_total");
  r.issued_syscalls =
      metric_sum(m1, "fphd_discard_syscalls_total") - metric_sum(m0, "fphd_discard_syscalls_total");
  r.discard_s = metric_sum(m1, "fphd_discard_duration_seconds_sum") -
                metric_sum(m0, "fphd_discard_duration_seconds_sum");
  r.fphd_request_s = metric_sum(m1, "fphd_request_duration_seconds_sum") -
                     metric_sum(m0, "fphd_request_duration_seconds_sum");
  r.fphd_requests = metric_sum(m1, "fphd_request_duration_seconds_count") -
                    metric_sum(m0, "fphd_request_duration_seconds_count");

  // Guests: exit status, integrity, requests.
  for (size_t i = 0; i < guests.size(); ++i) {
    auto& g = *guests[i];
    const int code = g.wait(30s);
    g.wait_eof(5s);
    auto summary = g.find_event("summary");
    if (code != 0 || !summary) {
      r.error = "guest " + std::to_string(i) + " exited with " + std::to_string(code) + ": " + g.stderr_tail();
      return r;
    }
    if (summary->j.value("corrupted_bytes", uint64_t{0}) != 0) {
      r.error = "guest " + std::to_string(i) + " reports corrupted memory";
      return r;
    }
    for (const auto& l : g.lines()) {
      if (l.j.value("event", "") != "report_done") continue;
      if (!l.j.contains("posted_ns")) continue;
      const int64_t posted = l.j["posted_ns"].get<int64_t>();
      if (posted < t0_ns) {
        // Waited at the gate: only its part inside the window counts as busy.
        const double used_ns = static_cast<double>(posted) + l.j.value("latency_us", 0.0) * 1e3;
        r.guest_busy_s += std::max(0.0, used_ns - static_cast<double>(t0_ns)) * 1e-9;
        continue;
      }
      r.latencies_us.push_back(l.j.value("latency_us", 0.0));
      r.guest_busy_s += l.j.value("latency_us", 0.0) * 1e-6;
      r.reported_bytes += l.j.value("bytes", uint64_t{0});
      r.reported_blocks += l.j.value("blocks", uint64_t{0});
      r.requests++;
    }
  }
  fphd.signal(SIGTERM);
  const int fcode = fphd.wait(30s);
  if (fcode != 0) {
    r.error = "fphd exited with " + std::to_string(fcode) + ": " + fphd.stderr_tail();
    return r;
  }
  if (r.reclaimed < static_cast<int64_t>(r.freed / 10 * 9)) {
    r.error = "reclaimed " + human_bytes(static_cast<double>(r.reclaimed)) + " of " +
              human_bytes(static_cast<double>(r.freed)) + " freed (< 90%)";
    return r;
  }
  r.ok = true;
  return r;
}

// The raw limit: the same discards from a tight loop in this process.
RawResult run_raw(const Scenario& sc, uint64_t block, int threads) {
  RawResult r;
  r.block = block;
  r.threads = threads;
  struct File {
    int fd = -1;
    uint64_t size = 0;
  };
  std::vector<File> files(static_cast<size_t>(sc.guests));
  // The pages are mapped and written by a child process that then sleeps,
  // as guest RAM is mapped by the (mostly idle) guest, not by the process
  // that discards: punching zaps page tables of another mm, like fphd does.
  pid_t holder = -1;
  int release_fd = -1;
  struct Cleanup {
    std::vector<File>& f;
    pid_t& holder;
    int& release_fd;
    ~Cleanup() {
      if (release_fd >= 0) ::close(release_fd);  // the holder exits on EOF
      if (holder > 0) {
        ::waitpid(holder, nullptr, 0);
        track_child(holder, false);
      }
      for (auto& x : f)
        if (x.fd >= 0) ::close(x.fd);
    }
  } cleanup{files, holder, release_fd};
  const uint64_t populate = sc.alloc / block * block;
  if (populate == 0) {
    r.error = "block larger than the populated size";
    return r;
  }
  for (auto& f : files) {
    f.size = sc.mem;
    f.fd = memfd_create("fph-bench-raw", MFD_CLOEXEC | (sc.hugetlb() ? MFD_HUGETLB : 0u));
    if (f.fd < 0 || ftruncate(f.fd, static_cast<off_t>(f.size)) != 0) {
      r.error = std::string("memfd: ") + std::strerror(errno);
      return r;
    }
  }
  int ready_pipe[2], release_pipe[2];
  if (pipe2(ready_pipe, O_CLOEXEC) != 0 || pipe2(release_pipe, O_CLOEXEC) != 0) {
    r.error = "pipe2 failed";
    return r;
  }
  holder = fork();
  if (holder == 0) {
    // Child: only async-signal-safe calls and plain memory writes.
    ::close(ready_pipe[0]);
    ::close(release_pipe[1]);
    char ok = 1;
    for (auto& f : files) {
      void* p = mmap(nullptr, f.size, PROT_READ | PROT_WRITE, MAP_SHARED, f.fd, 0);
      if (p == MAP_FAILED) {
        ok = 0;
        break;
      }
      // Populated like the guest does: every 4 KiB page written.
      auto* m = static_cast<volatile uint8_t*>(p);
      for (uint64_t off = 0; off < populate; off += 4 * kKiB) m[off] = static_cast<uint8_t>((off >> 12) | 1);
    }
    (void)!::write(ready_pipe[1], &ok, 1);
    char c;
    while (::read(release_pipe[0], &c, 1) < 0 && errno == EINTR) {
    }
    ::_exit(0);
  }
  ::close(ready_pipe[1]);
  ::close(release_pipe[0]);
  release_fd = release_pipe[1];
  if (holder < 0) {
    ::close(ready_pipe[0]);
    r.error = "fork failed";
    return r;
  }
  track_child(holder, true);
  char ok = 0;
  const bool got = ::read(ready_pipe[0], &ok, 1) == 1;
  ::close(ready_pipe[0]);
  if (!got || !ok) {
    r.error = "could not map and populate the raw memfds (hugetlb pages?)";
    return r;
  }
  // Blocks interleaved across files, as the guests' requests interleave.
  std::vector<std::pair<int, uint64_t>> work;
  for (uint64_t off = 0; off < populate; off += block)
    for (auto& f : files) work.emplace_back(f.fd, off);
  int64_t b0 = 0;
  for (auto& f : files) b0 += fd_allocated(f.fd);

  std::atomic<size_t> next{0};
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::atomic<int> errors{0};
  std::vector<double> cpu(static_cast<size_t>(threads), 0);
  std::vector<Clock::time_point> done(static_cast<size_t>(threads));
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      pthread_setname_np(pthread_self(), "fph-bench-raw");  // tells them apart in perf/top
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      timespec a{}, b{};
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
      for (;;) {
        const size_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= work.size()) break;
        if (fallocate(work[i].first, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      static_cast<off_t>(work[i].second), static_cast<off_t>(block)) != 0)
          errors.fetch_add(1);
      }
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
      done[static_cast<size_t>(t)] = Clock::now();
      cpu[static_cast<size_t>(t)] =
          static_cast<double>(b.tv_sec - a.tv_sec) + static_cast<double>(b.tv_nsec - a.tv_nsec) * 1e-9;
    });
  }
  while (ready.load() < threads) std::this_thread::yield();
  const auto t0 = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& t : ts) t.join();
  const auto t1 = *std::max_element(done.begin(), done.end());
  int64_t b1 = 0;
  for (auto& f : files) b1 += fd_allocated(f.fd);
  if (errors.load() != 0) {
    r.error = std::to_string(errors.load()) + " fallocate calls failed";
    return r;
  }
  r.reclaimed = b0 - b1;
  r.wall_s = std::chrono::duration<double>(t1 - t0).count();
  for (double c : cpu) r.cpu_s += c;
  r.ok = true;
  return r;
}

uint64_t raw_block_for(const std::string& key) {
  if (g_opt.raw_block) return g_opt.raw_block;
  uint64_t bytes = 0, blocks = 0;
  for (const auto& e : g_e2e[key]) {
    bytes += e.reported_bytes;
    blocks += e.reported_blocks;
  }
  if (blocks == 0) return 2 * kMiB;  // order 9
  // Round the mean descriptor to a power of two of at least 4 KiB.
  const double mean = static_cast<double>(bytes) / static_cast<double>(blocks);
  uint64_t b = 4 * kKiB;
  while (static_cast<double>(b) * 1.5 < mean) b *= 2;
  return b;
}

bool prepare_backing(const Scenario& sc, benchmark::State& state) {
  if (!sc.hugetlb()) return true;
  uint64_t need = 0;
  for (int g : g_opt.guests)
    need = std::max(need, make_scenario("hugetlb", g).mem * static_cast<uint64_t>(g));
  if (!g_huge.tried) {
    g_huge.reserve(need);
    std::fprintf(stderr, "fph-bench: hugetlb: %s\n", g_huge.message.c_str());
  }
  if (!g_huge.ok) {
    const std::string msg = "hugetlb skipped: " + g_huge.message;
    g_skipped[sc.key()] = msg;
    state.SkipWithError(msg.c_str());
    return false;
  }
  return true;
}

void bm_e2e(benchmark::State& state, Scenario sc) {
  if (!prepare_backing(sc, state)) return;
  for (auto _ : state) {
    int hold = g_hold_ms.count(sc.key()) ? g_hold_ms[sc.key()] : default_hold_ms();
    E2EResult r;
    for (int attempt = 0; attempt < 3; ++attempt) {
      r = run_e2e(sc, hold);
      if (!r.ok || !r.gate_missed) break;
      std::fprintf(stderr, "fph-bench: %s: a guest freed before the gate closed (hold %d ms); again\n",
                   sc.key().c_str(), hold);
      hold *= 2;
    }
    if (!r.ok) {
      g_failed = true;
      std::fprintf(stderr, "fph-bench: %s FAILED: %s\n", sc.key().c_str(), r.error.c_str());
      state.SkipWithError(r.error.c_str());
      break;
    }
    // Next time: hold just long enough for the allocations seen, with margin.
    if (g_opt.hold_ms <= 0)
      g_hold_ms[sc.key()] = std::max(hold / 2, static_cast<int>(r.alloc_s * 1000 * 1.5) + 500);
    state.SetIterationTime(std::max(r.window_s, 1e-9));
    state.SetBytesProcessed(r.reclaimed);
    state.counters["reclaimed_GiB"] = static_cast<double>(r.reclaimed) / kGiBd;
    state.counters["freed_GiB"] = static_cast<double>(r.freed) / kGiBd;
    state.counters["fphd_cpu_s"] = r.fphd_cpu_s;
    state.counters["cpu_s_per_GiB"] = r.cpu_per_gib();
    state.counters["p50_us"] = percentile(r.latencies_us, 50);
    state.counters["p99_us"] = percentile(r.latencies_us, 99);
    state.counters["requests"] = static_cast<double>(r.requests);
    state.counters["reported_block_KiB"] =
        r.reported_blocks ? static_cast<double>(r.reported_bytes) / static_cast<double>(r.reported_blocks) / kKiB : 0;
    state.counters["issued_block_KiB"] = r.issued_syscalls > 0 ? r.issued_bytes / r.issued_syscalls / kKiB : 0;
    // Mean number of fphd threads inside a discard syscall during the window,
    // and the fraction of the window each guest had a request in flight.
    state.counters["discard_threads_busy"] = r.window_s > 0 ? r.discard_s / r.window_s : 0;
    state.counters["guest_inflight_frac"] =
        r.window_s > 0 ? r.guest_busy_s / (r.window_s * sc.guests) : 0;
    state.counters["machine_cpu_s"] = r.system_cpu_s;
    state.counters["steady_GiB_s"] = r.steady_tput / kGiBd;
    state.counters["first_1pct_ms"] = r.start_ms;
    state.counters["discard_cpu_s"] = r.discard_cpu_s;
    state.counters["other_cpu_s"] = r.other_cpu_s;
    state.counters["discard_runq_s"] = r.discard_runq_s;
    state.counters["guests_cpu_s"] = r.guests_cpu_s;
    state.counters["bench_cpu_s"] = r.bench_cpu_s;
    state.counters["fphd_req_ms"] = r.fphd_requests > 0 ? r.fphd_request_s / r.fphd_requests * 1e3 : 0;
    g_e2e[sc.key()].push_back(std::move(r));
  }
}

void bm_raw(benchmark::State& state, Scenario sc) {
  if (!prepare_backing(sc, state)) return;
  int nodes = 1;
  if (!g_e2e[sc.key()].empty()) nodes = g_e2e[sc.key()].front().nodes;
  const int threads = g_opt.threads * nodes;
  const uint64_t block = raw_block_for(sc.key());
  for (auto _ : state) {
    RawResult r = run_raw(sc, block, threads);
    if (!r.ok) {
      g_failed = true;
      std::fprintf(stderr, "fph-bench: raw %s FAILED: %s\n", sc.key().c_str(), r.error.c_str());
      state.SkipWithError(r.error.c_str());
      break;
    }
    state.SetIterationTime(std::max(r.wall_s, 1e-9));
    state.SetBytesProcessed(r.reclaimed);
    state.counters["reclaimed_GiB"] = static_cast<double>(r.reclaimed) / kGiBd;
    state.counters["cpu_s"] = r.cpu_s;
    state.counters["cpu_s_per_GiB"] = r.cpu_per_gib();
    state.counters["block_KiB"] = static_cast<double>(block) / kKiB;
    state.counters["threads"] = threads;
    // This pair's ratios: the end-to-end run just before this one.
    const auto& es = g_e2e[sc.key()];
    if (es.size() == g_raw[sc.key()].size() + 1) {
      state.counters["tput_ratio"] = es.back().tput() / r.tput();
      state.counters["cpu_ratio"] = es.back().cpu_per_gib() / r.cpu_per_gib();
    }
    g_raw[sc.key()].push_back(std::move(r));
  }
}

void print_table(FILE* out) {
  std::fprintf(out,
               "\nfph-bench summary: total guest memory %s per scenario, %d discard thread(s) per "
               "node, medians of %d repetition(s); ratio = median of the per-pair ratios (each "
               "end-to-end run against the raw loop run right after it)\n",
               human_bytes(static_cast<double>(g_opt.total)).c_str(), g_opt.threads, g_opt.repetitions);
  std::fprintf(out, "%-8s %6s %9s | %9s %9s %6s | %9s %9s %6s | %8s %8s | %9s %9s | %s\n", "backing",
               "guests", "per-guest", "e2e GiB/s", "raw GiB/s", "ratio", "e2e s/GiB", "raw s/GiB",
               "ratio", "p50 us", "p99 us", "reported", "issued", "target (>=0.9 tput, <=1.1 cpu)");
  for (const auto& b : g_opt.backings) {
    for (int g : g_opt.guests) {
      const Scenario sc = make_scenario(b, g);
      const std::string key = sc.key();
      if (g_skipped.count(key)) {
        std::fprintf(out, "%-8s %6d %9s | %s\n", b.c_str(), g, human_bytes(static_cast<double>(sc.mem)).c_str(),
                     g_skipped[key].c_str());
        continue;
      }
      const auto& es = g_e2e[key];
      const auto& rs = g_raw[key];
      if (es.empty()) {
        std::fprintf(out, "%-8s %6d %9s | no end-to-end result (failed or filtered out)\n", b.c_str(), g,
                     human_bytes(static_cast<double>(sc.mem)).c_str());
        continue;
      }
      std::vector<double> et, ec, lat;
      double rep_b = 0, rep_n = 0, iss_b = 0, iss_n = 0;
      for (const auto& e : es) {
        et.push_back(e.tput());
        ec.push_back(e.cpu_per_gib());
        lat.insert(lat.end(), e.latencies_us.begin(), e.latencies_us.end());
        rep_b += static_cast<double>(e.reported_bytes);
        rep_n += static_cast<double>(e.reported_blocks);
        iss_b += e.issued_bytes;
        iss_n += e.issued_syscalls;
      }
      std::vector<double> rt, rc;
      for (const auto& r : rs) {
        rt.push_back(r.tput());
        rc.push_back(r.cpu_per_gib());
      }
      const double e_t = median(et), e_c = median(ec);
      const double r_t = median(rt), r_c = median(rc);
      // Median of the per-pair ratios (each end-to-end run against the raw
      // loop that ran right after it), not the ratio of medians.
      std::vector<double> ptr, pcr;
      for (size_t i = 0; i < std::min(es.size(), rs.size()); ++i) {
        ptr.push_back(es[i].tput() / rs[i].tput());
        pcr.push_back(es[i].cpu_per_gib() / rs[i].cpu_per_gib());
      }
      const double tr = ptr.empty() ? std::nan("") : median(ptr);
      const double cr = pcr.empty() ? std::nan("") : median(pcr);
      std::string verdict;
      if (rs.empty()) verdict = "no raw result";
      else if (g < 4) verdict = std::string("(not judged, < 4 guests) ") + (tr >= 0.9 && cr <= 1.1 ? "would meet" : "would miss");
      else verdict = std::string(tr >= 0.9 ? "tput MET" : "tput MISSED") + ", " + (cr <= 1.1 ? "cpu MET" : "cpu MISSED");
      std::fprintf(out, "%-8s %6d %9s | %9.2f %9.2f %6.2f | %9.3f %9.3f %6.2f | %8.0f %8.0f | %9s %9s | %s\n",
                   b.c_str(), g, human_bytes(static_cast<double>(sc.mem)).c_str(), e_t / kGiBd, r_t / kGiBd, tr,
                   e_c, r_c, cr, percentile(lat, 50), percentile(lat, 99),
                   rep_n > 0 ? human_bytes(rep_b / rep_n).c_str() : "-",
                   iss_n > 0 ? human_bytes(iss_b / iss_n).c_str() : "-", verdict.c_str());
    }
  }
  std::fprintf(out,
               "reported = mean descriptor the guests posted (raw loop block: %s); issued = mean "
               "fallocate fphd made (it coalesces adjacent ranges)\n",
               g_opt.raw_block ? human_bytes(static_cast<double>(g_opt.raw_block)).c_str()
                               : "the reported size, rounded to a power of two");
  std::fflush(out);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> storage;
  auto bargv = parse_args(argc, argv, storage);
  int bargc = static_cast<int>(bargv.size()) - 1;
  for (int s : {SIGINT, SIGTERM, SIGHUP}) ::signal(s, on_fatal_signal);
  ::signal(SIGPIPE, SIG_IGN);
  for (const auto* p : {&g_opt.fphd, &g_opt.guest}) {
    if (::access(p->c_str(), X_OK) != 0) {
      std::fprintf(stderr, "fph-bench: %s is not executable (use --fphd/--guest or FPH_BENCH_FPHD/FPH_BENCH_GUEST)\n",
                   p->c_str());
      return 2;
    }
  }
  benchmark::Initialize(&bargc, bargv.data());
  if (benchmark::ReportUnrecognizedArguments(bargc, bargv.data())) return 2;
  std::fprintf(stderr, "fph-bench: fphd %s, guest %s, total %s, %d thread(s)/node, %d repetition(s)\n",
               g_opt.fphd.c_str(), g_opt.guest.c_str(), human_bytes(static_cast<double>(g_opt.total)).c_str(),
               g_opt.threads, g_opt.repetitions);
  // Each repetition is a pair, the end-to-end run and then the raw loop, so
  // both see the same machine (page allocator state, other tenants of a
  // shared host): the ratios are taken per pair, then their median.
  for (const auto& b : g_opt.backings) {
    for (int g : g_opt.guests) {
      const Scenario sc = make_scenario(b, g);
      for (int rep = 0; rep < g_opt.repetitions; ++rep) {
        benchmark::RegisterBenchmark(("e2e/" + sc.key()).c_str(), bm_e2e, sc)
            ->Iterations(1)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("raw/" + sc.key()).c_str(), bm_raw, sc)
            ->Iterations(1)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_huge.restore();
  print_table(g_opt.table_to_stderr ? stderr : stdout);
  if (g_failed) {
    std::fprintf(stderr, "fph-bench: FAILED (see the errors above)\n");
    return 1;
  }
  return 0;
}
