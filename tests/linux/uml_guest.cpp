#include "uml_guest.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
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

using namespace std::chrono_literals;

std::string linux_guest_script() { return FPH_LINUX_GUEST_SCRIPT; }
std::string linux_workload_path() { return FPH_LINUX_WORKLOAD_PATH; }

std::optional<Marker> parse_marker(const std::string& raw) {
  std::string line = raw;
  while (!line.empty() && (line.back() == '\r' || line.back() == '\n')) line.pop_back();
  const auto at = line.find("FPH ");
  if (at == std::string::npos) return std::nullopt;
  line = line.substr(at + 4);
  Marker m;
  std::istringstream in(line);
  std::string word;
  if (!(in >> m["event"])) return std::nullopt;
  size_t pos = line.find(m["event"]) + m["event"].size();
  while (pos < line.size()) {
    while (pos < line.size() && line[pos] == ' ') ++pos;
    if (pos >= line.size()) break;
    if (line.compare(pos, 5, "text=") == 0) {
      m["text"] = line.substr(pos + 5);
      break;
    }
    size_t end = line.find(' ', pos);
    if (end == std::string::npos) end = line.size();
    word = line.substr(pos, end - pos);
    const auto eq = word.find('=');
    if (eq != std::string::npos) m[word.substr(0, eq)] = word.substr(eq + 1);
    pos = end;
  }
  return m;
}

int64_t deleted_files_bytes_under(pid_t pid, const std::string& dir) {
  const std::string fds = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(fds.c_str());
  if (!d) return -1;
  std::set<ino_t> seen;
  int64_t total = 0;
  const std::string prefix = dir + "/";
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string p = fds + "/" + e->d_name;
    char target[1024];
    const ssize_t n = readlink(p.c_str(), target, sizeof target - 1);
    if (n <= 0) continue;
    const std::string t(target, static_cast<size_t>(n));
    if (t.rfind(prefix, 0) != 0 || t.size() < 10 || t.compare(t.size() - 10, 10, " (deleted)") != 0)
      continue;
    struct stat st {};
    if (stat(p.c_str(), &st) != 0 || !seen.insert(st.st_ino).second) continue;
    total += static_cast<int64_t>(st.st_blocks) * 512;
  }
  closedir(d);
  return seen.empty() ? -1 : total;
}

std::string build_guest_root(const std::string& rootdir) {
  const std::string cmd = "'" + linux_guest_script() + "' build '" + rootdir + "' --workload '" +
                          linux_workload_path() + "' 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return "popen failed: " + std::string(std::strerror(errno));
  std::string out;
  char buf[1024];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int st = pclose(p);
  if (st != 0) return "'" + cmd + "' failed (status " + std::to_string(st) + "):\n" + out;
  return {};
}

UmlGuest::UmlGuest(UmlGuestOptions opts) : opts_(std::move(opts)) {
  // Guest RAM must be shmem (fphd punches holes in it): a directory on tmpfs.
  char tmpl[] = "/dev/shm/fph-uml-XXXXXX";
  if (!mkdtemp(tmpl)) throw std::runtime_error("mkdtemp under /dev/shm failed");
  tmpdir_ = tmpl;
  log_path_ = opts_.workdir + "/" + opts_.label + ".console";

  std::vector<std::string> argv{"/bin/bash", linux_guest_script(), "boot", "--socket", opts_.socket,
                                "--rootdir", opts_.rootdir, "--mem", opts_.mem, "--tmpdir", tmpdir_};
  if (!opts_.balloon) argv.push_back("--no-balloon");
  for (const auto& k : opts_.kernel_args) {
    argv.push_back("--kernel-arg");
    argv.push_back(k);
  }
  argv.push_back("--");
  argv.insert(argv.end(), opts_.workload_args.begin(), opts_.workload_args.end());

  int in[2], out[2];
  if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
  pid_ = fork();
  if (pid_ < 0) throw std::runtime_error("fork");
  if (pid_ == 0) {
    setsid();  // its own process group: UML forks helpers, the group goes down together
    dup2(in[0], 0);
    dup2(out[1], 1);
    dup2(out[1], 2);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  in_fd_ = in[1];
  out_fd_ = out[0];
  reader_ = std::thread([this] { reader(); });
}

UmlGuest::~UmlGuest() {
  if (pid_ > 0) {
    kill(-pid_, SIGKILL);  // the script execs UML: pid == process group
    if (!status_) {
      int st;
      waitpid(pid_, &st, 0);
    }
  }
  if (in_fd_ >= 0) close(in_fd_);
  if (reader_.joinable()) reader_.join();
  if (out_fd_ >= 0) close(out_fd_);
  std::error_code ec;
  std::filesystem::remove_all(tmpdir_, ec);
}

void UmlGuest::reader() {
  std::ofstream log(log_path_);
  std::string buf;
  char chunk[4096];
  for (;;) {
    const ssize_t n = read(out_fd_, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    log.write(chunk, n);
    log.flush();
    buf.append(chunk, static_cast<size_t>(n));
    size_t pos;
    while ((pos = buf.find('\n')) != std::string::npos) {
      std::string line = buf.substr(0, pos);
      buf.erase(0, pos + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      std::lock_guard lk(mu_);
      lines_.push_back(std::move(line));
      cv_.notify_all();
    }
  }
  std::lock_guard lk(mu_);
  if (!buf.empty()) lines_.push_back(buf);
  eof_ = true;
  cv_.notify_all();
}

static bool matches(const Marker& m, const std::string& event, const Marker& match) {
  if (m.at("event") != event) return false;
  for (const auto& [k, v] : match) {
    auto it = m.find(k);
    if (it == m.end() || it->second != v) return false;
  }
  return true;
}

std::optional<Marker> UmlGuest::find_marker(const std::string& event, const Marker& match) const {
  std::lock_guard lk(mu_);
  for (const auto& l : lines_)
    if (auto m = parse_marker(l); m && matches(*m, event, match)) return m;
  return std::nullopt;
}

std::optional<Marker> UmlGuest::wait_marker(const std::string& event, const Marker& match,
                                            std::chrono::milliseconds timeout) {
  std::unique_lock lk(mu_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  size_t scanned = 0;
  for (;;) {
    for (; scanned < lines_.size(); ++scanned)
      if (auto m = parse_marker(lines_[scanned]); m && matches(*m, event, match)) return m;
    if (eof_) return std::nullopt;
    if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && scanned == lines_.size())
      return std::nullopt;
  }
}

void UmlGuest::send_line() {
  const char nl = '\n';
  if (write(in_fd_, &nl, 1) != 1) {
    // The guest is gone; the caller's next wait fails with the console.
  }
}

std::string UmlGuest::console() const {
  std::lock_guard lk(mu_);
  std::string s;
  for (const auto& l : lines_) s += l + "\n";
  return s;
}

std::string UmlGuest::console_tail(size_t n) const {
  std::lock_guard lk(mu_);
  std::string s = "--- console of " + opts_.label + " (last " + std::to_string(n) + " lines, full: " +
                  log_path_ + ") ---\n";
  for (size_t i = lines_.size() > n ? lines_.size() - n : 0; i < lines_.size(); ++i) s += lines_[i] + "\n";
  return s;
}

bool UmlGuest::running() {
  if (status_) return false;
  int st;
  const pid_t r = waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return false;
  }
  return r == 0;
}

int UmlGuest::wait_exit(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(50ms);
  if (running()) {
    kill(-pid_, SIGKILL);
    int st;
    waitpid(pid_, &st, 0);
    status_ = 128 + SIGKILL;
  }
  return *status_;
}

static std::string lines_with(const std::vector<std::string>& lines, std::initializer_list<const char*> pats) {
  std::string s;
  for (const auto& l : lines)
    for (const char* p : pats)
      if (l.find(p) != std::string::npos) {
        s += l + "\n";
        break;
      }
  return s;
}

std::string UmlGuest::kernel_problems() const {
  std::lock_guard lk(mu_);
  return lines_with(lines_, {"Oops", "BUG:", "kernel BUG", "Kernel panic", "general protection",
                             "Unable to handle", "soft lockup", "blocked for more than", "hung_task"});
}

std::string UmlGuest::kernel_warnings() const {
  std::lock_guard lk(mu_);
  return lines_with(lines_, {"WARNING:"});
}

std::vector<Marker> UmlGuest::markers(const std::string& event) const {
  std::lock_guard lk(mu_);
  std::vector<Marker> out;
  for (const auto& l : lines_)
    if (auto m = parse_marker(l); m && m->at("event") == event) out.push_back(std::move(*m));
  return out;
}

}  // namespace fph::test
