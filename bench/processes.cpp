// The processes of an end-to-end run: starting fphd and fph-guest
// (posix_spawn), reading their JSON event lines, waiting for them, their
// temporary directory, and the fatal-signal handler that kills them.
#include "processes.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "hugepages.h"
#include "options.h"

extern char** environ;

namespace fph::bench {

namespace {

// Children that must die with us (signal handler): a plain array, usable
// from a signal handler.
constexpr int kMaxChildren = 4096;  // --scale up to 4096 guests
std::atomic<pid_t> g_children[kMaxChildren];

}  // namespace

void track_child(pid_t p, bool add) {
  for (auto& c : g_children) {
    pid_t expected = add ? 0 : p;
    if (c.compare_exchange_strong(expected, add ? p : 0)) return;
  }
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

Process::Process(const std::vector<std::string>& argv, const std::string& stderr_path)
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

Process::~Process() {
  if (running()) {
    ::kill(pid_, SIGKILL);
    wait(10s);
  }
  if (reader_.joinable()) reader_.join();
  if (out_fd_ >= 0) ::close(out_fd_);
}

void Process::signal(int sig) {
  if (!status_) ::kill(pid_, sig);
}

bool Process::running() {
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

int Process::wait(std::chrono::milliseconds timeout) {
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
std::optional<Process::Line> Process::wait_event(const std::string& ev, std::chrono::milliseconds timeout) {
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

std::optional<Process::Line> Process::find_event(const std::string& ev) {
  std::lock_guard lk(mu_);
  for (const auto& l : lines_)
    if (l.j.value("event", "") == ev) return l;
  return std::nullopt;
}

std::vector<Process::Line> Process::lines() {
  std::lock_guard lk(mu_);
  return lines_;
}

std::string Process::stderr_tail(size_t max) const {
  std::ifstream in(stderr_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  return s.size() > max ? s.substr(s.size() - max) : s;
}

void Process::wait_eof(std::chrono::milliseconds timeout) {
  std::unique_lock lk(mu_);
  cv_.wait_for(lk, timeout, [&] { return eof_; });
}

void Process::reader() {
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

TempDir::TempDir() {
  char tmpl[] = "/tmp/fph-bench-XXXXXX";
  if (!mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
  path = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  if (!g_opt.keep_logs) std::filesystem::remove_all(path, ec);
  else std::fprintf(stderr, "fph-bench: logs kept in %s\n", path.c_str());
}

}  // namespace fph::bench
