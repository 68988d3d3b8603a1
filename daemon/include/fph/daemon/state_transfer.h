// One device-state transfer of the vhost-user DEVICE_STATE protocol
// (reference 4.7): SET_DEVICE_STATE_FD hands fphd one end of a pipe. SAVE
// writes the state blob into it and closes it; LOAD reads it to EOF. The
// front end only learns the outcome from CHECK_DEVICE_STATE.
//
// The transfer runs on its own thread: a front end that never reads its end
// (SAVE) or never closes it (LOAD) must not stall the session's control loop
// or anything else. It ends by itself at a deadline, when the session's
// cancel token is set (yank, teardown), or when it is done.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "fph/common/unique_fd.h"

namespace fph::daemon {

class StateTransfer {
 public:
  enum class Direction : uint8_t { Save, Load };
  struct Result {
    bool ok = false;
    std::string error;    // for the log, names what went wrong
    std::string reason;   // metric label: timeout, reader_closed, oversized, io_error, cancelled
    std::vector<uint8_t> bytes;  // LOAD: what was read
    uint64_t transferred = 0;
    std::chrono::steady_clock::duration elapsed{};
  };

  // SAVE: writes `blob` into `fd` and closes it.
  static std::unique_ptr<StateTransfer> save(UniqueFd fd, std::vector<uint8_t> blob,
                                             std::shared_ptr<std::atomic<bool>> cancel,
                                             std::chrono::milliseconds timeout);
  // LOAD: reads `fd` to EOF, refusing more than `max_bytes`.
  static std::unique_ptr<StateTransfer> load(UniqueFd fd, size_t max_bytes,
                                             std::shared_ptr<std::atomic<bool>> cancel,
                                             std::chrono::milliseconds timeout);
  ~StateTransfer();  // waits for the thread (which ends at its deadline at the latest)
  StateTransfer(const StateTransfer&) = delete;
  StateTransfer& operator=(const StateTransfer&) = delete;

  Direction direction() const { return dir_; }
  bool done() const { return done_.load(); }
  // Waits for the end of the transfer and returns its outcome (once).
  Result wait();

 private:
  explicit StateTransfer(Direction d) : dir_(d) {}
  static std::unique_ptr<StateTransfer> start(Direction d, std::shared_ptr<std::atomic<bool>> cancel,
                                              std::chrono::milliseconds timeout,
                                              std::function<void(StateTransfer&)> body);
  void run_save(UniqueFd fd, std::vector<uint8_t> blob);
  void run_load(UniqueFd fd, size_t max_bytes);
  // Waits until `fd` is ready for `events`; false (with result_ filled) on
  // deadline, cancel or error.
  bool wait_ready(int fd, short events);

  Direction dir_;
  std::shared_ptr<std::atomic<bool>> cancel_;
  std::chrono::steady_clock::time_point start_, deadline_;
  Result result_;
  std::atomic<bool> done_{false};
  std::thread thread_;
};

}  // namespace fph::daemon
