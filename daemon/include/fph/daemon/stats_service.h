// The stats queue service (VIRTIO_BALLOON_F_STATS_VQ; virtio 1.2 5.5.6.3,
// Linux drivers/virtio/virtio_balloon.c; docs/protocol.md "The stats queue").
//
// The driver puts ONE device-readable buffer of {le16 tag; le64 val}
// entries on the stats queue and kicks. The device parses it and HOLDS the
// chain: it stays in flight (counted in the ring's inflight like any taken
// request). To ask for fresh stats the device returns the chain (used len 0)
// and notifies; the driver refills the buffer, adds it again and kicks.
//
// Division of work: the session owns the ring, the lock and the timer (its
// poll timeout) and returns the held chain when it is due, and before
// anything waits for the ring's in-flight requests (GET_VRING_BASE, reset,
// a ring set up again, teardown): a held stats chain is never waited for.
// This class takes chains off the stats ring, validates and parses them,
// remembers which one is held, keeps the latest stats and exports them.
//
// Threading: service(), take_due_locked() and take_held_locked() run on the
// session thread; the held chain is guarded by the session's lock (the
// `_locked` functions are called with it held). latest() may be called from
// any thread (admin, sampler).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "fph/daemon/guest_memory.h"
#include "fph/daemon/vring.h"
#include "fph/proto/balloon_stats.h"
#include "fph/proto/virtqueue.h"

namespace fph::daemon {

class Session;

// What the guest said last, and when.
struct GuestStats {
  proto::balloon::Stats stats;
  std::chrono::system_clock::time_point at;  // when fphd parsed it
  uint64_t updates = 0;   // valid buffers parsed since the session started
  uint64_t rejected = 0;  // buffers rejected as malformed
};

// Memory the guest calls free whose host backing is still held: a page the
// guest uses is always backed, so at most (memory - resident) of the free
// memory can be unbacked, and the rest is backed free memory that reporting
// has not returned (reporting stuck, or free blocks below the reporting
// order). max(0, guest_free - (guest_memory - resident)).
uint64_t unreported_free_bytes(uint64_t guest_free, uint64_t guest_memory, uint64_t resident);

// Why a stats chain was rejected: a metric reason and a log line naming the
// field. Pure (unit tested): the chain as walked, and the guest memory.
struct StatsVerdict {
  std::optional<proto::balloon::Stats> stats;  // set if valid
  std::string reason;                          // fphd_protocol_errors_total reason, if not
  std::string error;                           // log line, if not
};
StatsVerdict check_stats_chain(const proto::vq::Chain& chain, const MemoryTable& table);

class StatsService {
 public:
  using Clock = std::chrono::steady_clock;

  // The stats ring `queue` was kicked: take every available chain, parse it
  // and hold it. Called on the session thread without the session lock.
  // Returns false if the ring is broken (avail index jumped): close the
  // session. A chain that arrives while another is held (a driver that
  // adds a second buffer) makes the earlier one due at once.
  // `interval`: the held chain is due that long after it was taken.
  bool service(Session& s, uint32_t queue, Vring& vr, std::mutex& mu,
               const std::shared_ptr<const MemoryTable>& table, std::chrono::milliseconds interval);

  // When the held chain is due to be returned (a stats request), if one is
  // held. With the session lock held.
  std::optional<Clock::time_point> deadline_locked() const;
  // The held chain if it is due at `now` (it is then no longer held).
  struct Held {
    uint32_t queue = 0;
    uint16_t head = 0;
  };
  std::optional<Held> take_due_locked(Clock::time_point now);
  // The held chain of ring `queue` (any queue if queue < 0), due or not.
  std::optional<Held> take_held_locked(int queue = -1);
  bool holding_locked() const { return held_.has_value(); }

  std::optional<GuestStats> latest() const;

 private:
  void accept(Session& s, uint32_t queue, const proto::vq::Chain& chain, const MemoryTable& table,
              std::chrono::milliseconds interval);

  // Guarded by the session's lock.
  std::optional<Held> held_;
  Clock::time_point due_{};
  // The latest stats: own lock, read by other threads.
  mutable std::mutex mu_;
  std::optional<GuestStats> latest_;
  uint64_t rejected_ = 0;
};

}  // namespace fph::daemon
