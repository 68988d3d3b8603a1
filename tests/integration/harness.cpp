#include "harness.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

namespace fph::test {

std::string fphd_path() { return FPH_FPHD_PATH; }
std::string guest_path() { return FPH_GUEST_PATH; }

TempDir::TempDir() {
  char tmpl[] = "/tmp/fph-it-XXXXXX";
  if (!mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
  path = tmpl;
}
TempDir::~TempDir() {
  std::error_code ec;
  if (!std::getenv("FPH_KEEP_TEST_DIRS")) std::filesystem::remove_all(path, ec);
}

Process::Process(std::vector<std::string> argv, std::string stderr_path)
    : stderr_path_(std::move(stderr_path)) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
  pid_ = fork();
  if (pid_ < 0) throw std::runtime_error("fork");
  if (pid_ == 0) {
    dup2(p[1], 1);
    int e = open(stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (e >= 0) dup2(e, 2);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(p[1]);
  out_fd_ = p[0];
  reader_ = std::thread([this] { reader(); });
}

Process::~Process() {
  if (running()) {
    kill(pid_, SIGKILL);
    wait(10s);
  }
  if (reader_.joinable()) reader_.join();
  if (out_fd_ >= 0) close(out_fd_);
}

void Process::reader() {
  std::string buf;
  char chunk[4096];
  for (;;) {
    ssize_t n = read(out_fd_, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    buf.append(chunk, static_cast<size_t>(n));
    size_t pos;
    while ((pos = buf.find('\n')) != std::string::npos) {
      std::string line = buf.substr(0, pos);
      buf.erase(0, pos + 1);
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded()) continue;
      std::lock_guard lk(mu_);
      lines_.push_back(std::move(j));
      cv_.notify_all();
    }
  }
  std::lock_guard lk(mu_);
  eof_ = true;
  cv_.notify_all();
}

std::optional<nlohmann::json> Process::wait_event(const std::string& event,
                                                  std::chrono::milliseconds timeout) {
  std::unique_lock lk(mu_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    for (; consumed_ < lines_.size(); ++consumed_) {
      if (lines_[consumed_].value("event", "") == event) return lines_[consumed_++];
    }
    if (eof_) return std::nullopt;
    if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && consumed_ == lines_.size())
      return std::nullopt;
  }
}

std::vector<nlohmann::json> Process::events() const {
  std::lock_guard lk(mu_);
  return lines_;
}

void Process::signal(int sig) {
  if (pid_ > 0 && !status_) kill(pid_, sig);
}

bool Process::running() {
  if (status_) return false;
  int st;
  pid_t r = waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return false;
  }
  return r == 0;
}

int Process::wait(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(50ms);
  if (running()) {
    kill(pid_, SIGKILL);
    int st;
    waitpid(pid_, &st, 0);
    status_ = 128 + SIGKILL;
  }
  return *status_;
}

std::string Process::stderr_text() const {
  std::ifstream in(stderr_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::optional<nlohmann::json> wait_event_sampling_peak(Process& guest, const std::string& event,
                                                       int64_t* peak) {
  const auto deadline = std::chrono::steady_clock::now() + kPatience;
  std::optional<nlohmann::json> seen;
  while (!(seen = guest.wait_event(event, 20ms)) && std::chrono::steady_clock::now() < deadline)
    *peak = std::max(*peak, memfd_allocated_bytes(guest.pid()));
  // One more sample once the event is seen: the guest may have finished
  // writing and freed within the last 20 ms wait (a loaded CI machine), and its
  // backing stays at the peak until the reporting delay has passed.
  *peak = std::max(*peak, memfd_allocated_bytes(guest.pid()));
  return seen;
}

int64_t memfd_allocated_bytes(pid_t pid, const std::string& memfd_name) {
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(dir.c_str());
  if (!d) return -1;
  std::set<ino_t> seen;
  int64_t total = 0;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string p = dir + "/" + e->d_name;
    char target[512];
    ssize_t n = readlink(p.c_str(), target, sizeof target - 1);
    if (n <= 0) continue;
    target[n] = 0;
    if (std::strstr(target, ("memfd:" + memfd_name).c_str()) == nullptr) continue;
    struct stat st {};
    if (stat(p.c_str(), &st) != 0 || !seen.insert(st.st_ino).second) continue;
    total += static_cast<int64_t>(st.st_blocks) * 512;
  }
  closedir(d);
  return total;
}

Fphd::Fphd(const TempDir& dir, std::vector<std::string> extra) {
  socket = dir.path + "/fphd.sock";
  std::vector<std::string> argv{fphd_path(), "--listen", socket, "--metrics", "127.0.0.1:0"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  proc = std::make_unique<Process>(argv, dir.path + "/fphd.stderr");
  auto ready = proc->wait_event("ready", 60s);
  if (!ready) throw std::runtime_error("fphd did not become ready: " + proc->stderr_text());
  metrics_url = (*ready)["metrics"].get<std::string>();
}

}  // namespace fph::test
