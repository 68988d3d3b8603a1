#include "fph/daemon/state_transfer.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace fph::daemon {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {
bool set_nonblocking(int fd) {
  const int fl = ::fcntl(fd, F_GETFL);
  return fl >= 0 && ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0;
}
}  // namespace

std::unique_ptr<StateTransfer> StateTransfer::start(Direction d, std::shared_ptr<std::atomic<bool>> cancel,
                                                    std::chrono::milliseconds timeout,
                                                    std::function<void(StateTransfer&)> body) {
  std::unique_ptr<StateTransfer> t(new StateTransfer(d));
  t->cancel_ = std::move(cancel);
  t->start_ = Clock::now();
  t->deadline_ = t->start_ + timeout;
  t->thread_ = std::thread([p = t.get(), body = std::move(body)] {
    pthread_setname_np(pthread_self(), p->dir_ == Direction::Save ? "fph-state-save" : "fph-state-load");
    body(*p);
    p->result_.elapsed = Clock::now() - p->start_;
    p->done_ = true;
  });
  return t;
}

std::unique_ptr<StateTransfer> StateTransfer::save(UniqueFd fd, std::vector<uint8_t> blob,
                                                   std::shared_ptr<std::atomic<bool>> cancel,
                                                   std::chrono::milliseconds timeout) {
  auto fdp = std::make_shared<UniqueFd>(std::move(fd));
  auto bp = std::make_shared<std::vector<uint8_t>>(std::move(blob));
  return start(Direction::Save, std::move(cancel), timeout,
               [fdp, bp](StateTransfer& t) { t.run_save(std::move(*fdp), std::move(*bp)); });
}

std::unique_ptr<StateTransfer> StateTransfer::load(UniqueFd fd, size_t max_bytes,
                                                   std::shared_ptr<std::atomic<bool>> cancel,
                                                   std::chrono::milliseconds timeout) {
  auto fdp = std::make_shared<UniqueFd>(std::move(fd));
  return start(Direction::Load, std::move(cancel), timeout,
               [fdp, max_bytes](StateTransfer& t) { t.run_load(std::move(*fdp), max_bytes); });
}

StateTransfer::~StateTransfer() {
  if (thread_.joinable()) thread_.join();
}

StateTransfer::Result StateTransfer::wait() {
  if (thread_.joinable()) thread_.join();
  return std::move(result_);
}

bool StateTransfer::wait_ready(int fd, short events) {
  for (;;) {
    if (cancel_ && cancel_->load()) {
      result_.reason = "cancelled";
      result_.error = "cancelled (session closing or yanked)";
      return false;
    }
    const auto left = deadline_ - Clock::now();
    if (left <= Clock::duration::zero()) {
      result_.reason = "timeout";
      result_.error = fmt::format("the front end did not {} within the deadline ({} bytes so far)",
                                  dir_ == Direction::Save ? "read the state" : "finish writing the state",
                                  result_.transferred);
      return false;
    }
    // Short slices so a cancel is seen soon.
    const auto slice = std::min<Clock::duration>(left, 100ms);
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(slice).count()));
    if (n < 0 && errno != EINTR) {
      result_.reason = "io_error";
      result_.error = fmt::format("poll: {}", std::strerror(errno));
      return false;
    }
    if (n > 0) return true;  // ready, hung up or error: the read/write says which
  }
}

void StateTransfer::run_save(UniqueFd fd, std::vector<uint8_t> blob) {
  if (!set_nonblocking(fd.get())) {
    result_.reason = "io_error";
    result_.error = fmt::format("state fd: fcntl: {}", std::strerror(errno));
    return;
  }
  size_t off = 0;
  while (off < blob.size()) {
    const ssize_t n = ::write(fd.get(), blob.data() + off, blob.size() - off);
    if (n > 0) {
      off += static_cast<size_t>(n);
      result_.transferred = off;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      if (!wait_ready(fd.get(), POLLOUT)) return;
      continue;
    }
    // SIGPIPE is ignored by fphd (run.cpp): a closed reader is EPIPE here.
    result_.reason = errno == EPIPE ? "reader_closed" : "io_error";
    result_.error = fmt::format("write after {} of {} bytes: {}", off, blob.size(),
                                errno == EPIPE ? "the front end closed its end early" : std::strerror(errno));
    return;
  }
  fd.reset();  // the reader sees EOF: the state is complete
  result_.ok = true;
}

void StateTransfer::run_load(UniqueFd fd, size_t max_bytes) {
  if (!set_nonblocking(fd.get())) {
    result_.reason = "io_error";
    result_.error = fmt::format("state fd: fcntl: {}", std::strerror(errno));
    return;
  }
  std::vector<uint8_t>& buf = result_.bytes;
  uint8_t chunk[16384];
  for (;;) {
    const ssize_t n = ::read(fd.get(), chunk, sizeof chunk);
    if (n > 0) {
      if (buf.size() + static_cast<size_t>(n) > max_bytes) {
        result_.reason = "oversized";
        result_.error = fmt::format("the state is larger than the {}-byte bound", max_bytes);
        buf.clear();
        return;
      }
      buf.insert(buf.end(), chunk, chunk + n);
      result_.transferred = buf.size();
      continue;
    }
    if (n == 0) break;  // EOF: the writer is done
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {
      if (!wait_ready(fd.get(), POLLIN)) {
        buf.clear();
        return;
      }
      continue;
    }
    result_.reason = "io_error";
    result_.error = fmt::format("read after {} bytes: {}", buf.size(), std::strerror(errno));
    buf.clear();
    return;
  }
  result_.ok = true;
}

}  // namespace fph::daemon
