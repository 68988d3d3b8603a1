// Refault-driven backoff, per VM (docs/metrics.md "Backoff").
//
// Reporting costs the guest: a discarded block the guest allocates again is
// faulted in and zeroed once more. When most of what fphd discards for a VM
// comes back soon after, the discards buy the host little memory for that
// cost: the VM frees and reuses the same memory. Then fphd holds off
// discarding for that VM for a while (chains are still returned at once;
// their bytes are counted with skip reason `backoff`), probes again when
// the hold ends, and doubles the hold each time the probe finds the same.
//
// The signal is a share over a sliding window: bytes the refault sampler
// found back within `window` of their discard (refault_sampler.h) against
// bytes whose discard freed memory, both summed over the last `window`. A
// VM that reuses its memory long after freeing it (a batch job every
// minute) is not held: its discards give the host that memory meanwhile. It is judged only once `min_discarded`
// bytes were discarded in the window, so a VM that discards little (an idle
// VM with cold free memory: nothing comes back) is never held back.
//
//   normal  --share >= threshold-->  holding (hold = first hold)
//   holding --hold over----------->  probing (discards again)
//   probing --share >= threshold-->  holding (hold doubled, up to max_hold)
//   probing --a window clean------>  normal  (hold back to the first)
//
// The window is emptied when a hold starts: what comes back during the hold
// was discarded before it and says nothing about the probe.
//
// Thread safe: the discard pipeline reports discards, the sampler refaults,
// the session thread asks holding().
#pragma once

#include <vector>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string_view>

namespace fph::daemon {

struct BackoffConfig {
  bool enabled = true;
  double threshold = 0.5;  // refaulted / discarded over the window
  std::chrono::seconds window{10};
  uint64_t min_discarded = 64ull << 20;
  std::chrono::seconds hold{5};
  std::chrono::seconds max_hold{300};
};

// "" if the configuration is usable, else what is wrong (for config errors).
std::string_view check(const BackoffConfig& c);

class RefaultBackoff {
 public:
  using Clock = std::chrono::steady_clock;
  enum class State : uint8_t { Normal, Holding, Probing };
  // The longest window (seconds) the sliding sums can hold.
  static constexpr size_t kMaxWindow = 120;

  struct Snapshot {
    State state = State::Normal;
    bool enabled = true;
    double share = 0;           // refaulted / discarded over the current window (0: none discarded)
    uint64_t window_discarded = 0;
    uint64_t window_refaulted = 0;
    std::chrono::seconds next_hold{0};  // the hold the next trigger gets
    double hold_left_seconds = 0;       // while holding
    uint64_t holds = 0;                 // holds started since the session began
    double trigger_share = 0;           // the share that started the last hold
    double held_seconds = 0;            // total time spent holding
  };

  explicit RefaultBackoff(BackoffConfig c = {}, Clock::time_point now = Clock::now());

  // A new configuration (reload, admin). `enabled` false ends a hold at once.
  void configure(const BackoffConfig& c, Clock::time_point now = Clock::now());
  // Bytes whose discard freed memory (pipeline threads).
  void discarded(uint64_t bytes, Clock::time_point now = Clock::now());
  // Bytes the refault sampler found back since its previous sample.
  // Returns true if this started a hold (for the log).
  bool refaulted(uint64_t bytes, Clock::time_point now = Clock::now());
  // True while discards for the VM are held off.
  bool holding(Clock::time_point now = Clock::now());
  Snapshot snapshot(Clock::time_point now = Clock::now());
  // Normal: neither holding nor probing (the sampler may visit it less often).
  bool normal();
  // Refaults count only if they come back within this of their discard.
  std::chrono::seconds window() const;

 private:
  struct Bucket {
    int64_t second = -1;  // Clock seconds since its epoch this bucket counts
    uint64_t discarded = 0;
    uint64_t refaulted = 0;
  };
  Bucket& bucket_locked(Clock::time_point now);
  void sums_locked(Clock::time_point now, uint64_t* discarded, uint64_t* refaulted) const;
  void advance_locked(Clock::time_point now);  // holding -> probing -> normal by time
  bool judge_locked(Clock::time_point now);    // normal/probing -> holding by the share
  void clear_window_locked();

  mutable std::mutex mu_;
  BackoffConfig cfg_;
  State state_ = State::Normal;
  std::chrono::seconds next_hold_;
  Clock::time_point hold_until_{};
  Clock::time_point probe_since_{};
  Clock::time_point hold_started_{};
  uint64_t holds_ = 0;
  double trigger_share_ = 0;
  Clock::duration held_{0};
  // One per second of the window (and one more): sized by configure(), so
  // a VM costs ~260 bytes for the default 10 s window (1024 VMs on a host).
  std::vector<Bucket> buckets_;
};

std::string_view to_string(RefaultBackoff::State s);

}  // namespace fph::daemon
