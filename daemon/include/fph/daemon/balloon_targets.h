// The balloon targets the host set (admin `set-balloon`), by VM name, kept
// across reconnects and, with a state directory, across fphd restarts: a
// target is the operator's decision, not the session's, so a VM whose front
// end comes back (QEMU reconnect=, fph-guest --reconnect) or a restarted
// fphd (systemd keeps /run/fphd) gets the same num_pages again before its
// driver reads the config space.
//
// The file `<state_dir>/balloon-targets` holds one "NAME PAGES" line per VM
// with a target; it is replaced atomically (write, fsync, rename) on every
// change. fphd's own file: a malformed line is logged and skipped.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "fph/common/expected.h"

namespace fph::daemon {

class BalloonTargets {
 public:
  // `state_dir` empty: kept in memory only (reconnects, not restarts).
  explicit BalloonTargets(std::string state_dir = {});
  // Reads the file if there is one; returns how many targets were loaded.
  Expected<size_t, std::string> load();
  // Records a target (0 removes it) and rewrites the file. The error says
  // why the file could not be written (the target is still kept in memory).
  Expected<void, std::string> set(const std::string& vm, uint32_t pages);
  std::optional<uint32_t> get(const std::string& vm) const;
  std::string path() const;

 private:
  Expected<void, std::string> save_locked() const;
  std::string dir_;
  mutable std::mutex mu_;
  std::map<std::string, uint32_t> targets_;
};

}  // namespace fph::daemon
