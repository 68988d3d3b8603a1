#include "fph/daemon/balloon_targets.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "fph/common/log.h"

namespace fph::daemon {

BalloonTargets::BalloonTargets(std::string state_dir) : dir_(std::move(state_dir)) {}

std::string BalloonTargets::path() const { return dir_.empty() ? std::string() : dir_ + "/balloon-targets"; }

Expected<size_t, std::string> BalloonTargets::load() {
  if (dir_.empty()) return size_t{0};
  std::ifstream in(path());
  if (!in) {
    if (errno == ENOENT) return size_t{0};
    return unexpected(path() + ": " + std::strerror(errno));
  }
  std::lock_guard lk(mu_);
  size_t n = 0, lineno = 0;
  for (std::string line; std::getline(in, line);) {
    ++lineno;
    std::istringstream ls(line);
    std::string vm;
    uint64_t pages = 0;
    std::string rest;
    if (!(ls >> vm >> pages) || (ls >> rest) || pages == 0 || pages > UINT32_MAX) {
      log::warn("balloon", "{}:{}: '{}' is not 'NAME PAGES' (1..{}); skipped", path(), lineno, line, UINT32_MAX);
      continue;
    }
    targets_[vm] = static_cast<uint32_t>(pages);
    ++n;
  }
  return n;
}

Expected<void, std::string> BalloonTargets::set(const std::string& vm, uint32_t pages) {
  std::lock_guard lk(mu_);
  if (pages == 0) targets_.erase(vm);
  else targets_[vm] = pages;
  return save_locked();
}

std::optional<uint32_t> BalloonTargets::get(const std::string& vm) const {
  std::lock_guard lk(mu_);
  auto it = targets_.find(vm);
  if (it == targets_.end()) return std::nullopt;
  return it->second;
}

Expected<void, std::string> BalloonTargets::save_locked() const {
  if (dir_.empty()) return {};
  if (::mkdir(dir_.c_str(), 0750) != 0 && errno != EEXIST) return unexpected(dir_ + ": " + std::strerror(errno));
  std::string text;
  for (const auto& [vm, pages] : targets_) text += vm + " " + std::to_string(pages) + "\n";
  const std::string tmp = path() + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  if (fd < 0) return unexpected(tmp + ": " + std::strerror(errno));
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) return unexpected(tmp + ": " + std::strerror(err));
  if (::rename(tmp.c_str(), path().c_str()) != 0) return unexpected(path() + ": " + std::strerror(errno));
  return {};
}

}  // namespace fph::daemon
