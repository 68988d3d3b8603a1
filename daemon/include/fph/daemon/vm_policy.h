// Per-VM policy (docs/admin.md "Per-VM policy", etc/fphd.toml [policy.vm]).
//
// The node policy (mode, rate limit) stays the default; a VM's own settings
// refine it for that VM only:
//   rate_limit  bytes per second discarded for this VM (0: no limit of its
//               own). Requests over it wait in the session, not in the node
//               pipeline, so a slow VM never holds up the others on its node.
//   min_block   reported blocks smaller than this are returned without a
//               discard (skip reason `small`): a VM that frees and refills
//               small blocks costs the host syscalls for little memory.
//   mode        private-memory mode (eager, lazy, auto) instead of the node's.
//   paused      no discards at all (skip reason `paused`).
//   backoff     refault-driven backoff on or off (refault_backoff.h).
//
// Where settings come from, weakest first: [policy.vm."PATTERN"] tables
// whose glob pattern (fnmatch) matches the VM name, less specific first
// (fewer literal characters), then the table naming the VM exactly, then
// what the admin socket set for that name. Each key is taken from the
// strongest layer that sets it. A SIGHUP reload replaces the file's layers
// and forgets the admin's: the file is the truth again, as for node policy.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "fph/daemon/refault_backoff.h"
#include "fph/reclaim/policy.h"

namespace fph::daemon {

struct VmPolicySettings {
  std::optional<uint64_t> rate_limit;
  std::optional<uint64_t> min_block;
  std::optional<reclaim::PrivateMode> mode;
  std::optional<bool> paused;
  std::optional<bool> backoff;
  // Keys set in `over` replace ours.
  void merge(const VmPolicySettings& over);
  bool empty() const { return !rate_limit && !min_block && !mode && !paused && !backoff; }
};

// What one VM gets, every key resolved.
struct VmPolicy {
  uint64_t rate_limit = 0;                   // 0: none of its own
  uint64_t min_block = 0;                    // 0: every block
  std::optional<reclaim::PrivateMode> mode;  // empty: the node's
  bool paused = false;
  bool backoff = true;                       // within [policy.backoff] enabled
  bool operator==(const VmPolicy&) const = default;
};

struct VmPolicyRule {
  std::string pattern;  // a VM name, or a glob (*, ?, [...])
  VmPolicySettings settings;
};

// The largest min_block: a reported block is at most 2^MAX_ORDER pages.
inline constexpr uint64_t kMaxMinBlock = 1ull << 30;

// The settings for `vm` from the file's rules (no admin layer).
VmPolicySettings match_rules(const std::vector<VmPolicyRule>& rules, const std::string& vm);

class VmPolicyTable {
 public:
  // The file's layers (config load and SIGHUP); forgets admin overrides.
  void set_rules(std::vector<VmPolicyRule> rules, BackoffConfig backoff);
  // Admin: keys of `s` override the file for VM `vm` until the next reload.
  void set_override(const std::string& vm, const VmPolicySettings& s);
  VmPolicy resolve(const std::string& vm) const;
  // The backoff configuration for a VM whose policy is `p`.
  BackoffConfig backoff_for(const VmPolicy& p) const;
  std::vector<VmPolicyRule> rules() const;

 private:
  mutable std::mutex mu_;
  std::vector<VmPolicyRule> rules_;
  std::map<std::string, VmPolicySettings> overrides_;
  BackoffConfig backoff_;
};

// A per-VM rate limit as a schedule (GCRA): a request may start at once while
// the VM is within one second's worth of bytes ahead of its rate; later ones
// get a start time that keeps the average at the rate. Not thread safe (the
// session thread owns it).
class VmRateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  // When `bytes` may start; charges them. rate 0: now.
  Clock::time_point reserve(uint64_t bytes, uint64_t rate, Clock::time_point now = Clock::now());

 private:
  Clock::time_point tat_{};  // theoretical arrival time of the next byte
};

}  // namespace fph::daemon
