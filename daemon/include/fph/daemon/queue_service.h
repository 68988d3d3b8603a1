// The reporting queue service (DESIGN section 3, steps 3-5): take every
// available chain of a kicked queue, validate it before touching anything,
// translate each range to (region fd, offset, host node), hand the request to
// the node pipelines, and return the chain when every range is done or
// deliberately skipped. A chain is always returned, whatever happened to its
// ranges, because the Linux driver sleeps until it comes back.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fph/daemon/guest_memory.h"
#include "fph/daemon/vring.h"
#include "fph/proto/balloon.h"
#include "fph/proto/virtqueue.h"
#include "fph/reclaim/discard.h"
#include "fph/reclaim/topology.h"

namespace fph::daemon {

class Session;

struct SkippedBytes {
  reclaim::SkipReason reason;
  uint64_t bytes;
};

// What one chain asks for, after validation: a pure function of the chain,
// the memory table and the session's state, so it is unit tested directly.
struct RequestPlan {
  std::vector<std::vector<reclaim::DiscardTarget>> per_node;  // [node] sorted by (fd, offset)
  std::vector<uint64_t> reported_per_node;                    // valid reported bytes by node
  std::vector<SkippedBytes> skipped;                          // decided before any discard
  std::vector<std::string> errors;                            // one line per invalid buffer
  std::vector<std::string> error_reasons;                     // metric reason per invalid buffer
  std::vector<std::shared_ptr<MappedRegion>> regions;         // keeps mappings alive
  // Guest ranges (gpa, length) handed to the discard engine: marked in the
  // dirty log when the request completes while the VMM is migrating.
  std::vector<std::pair<uint64_t, uint64_t>> discard_gpas;
  uint64_t invalid_bytes = 0;
  uint64_t deflated_bytes = 0;  // deflate queue: pages the driver takes back (4 KiB each)
  size_t targets() const;
};

// Balloon inflate chains carry arrays of le32 PFNs (4 KiB units) in readable
// buffers; reporting chains carry device-writable buffers that ARE the free
// ranges. `pfns` is filled from guest memory for inflate (read once).
// `min_block` (the VM's policy, reporting only): a reported range shorter
// than this is skipped as SkipReason::Small, without a discard.
RequestPlan plan_request(const proto::vq::Chain& chain, proto::balloon::QueueRole role,
                         const MemoryTable& table, reclaim::SkipReason session_skip,
                         const reclaim::Topology& topo, uint64_t min_block = 0);

// The fphd_protocol_errors_total reason for a chain error
// (`chain_too_long`, ...); the proto text is for humans.
std::string chain_reason(proto::vq::ChainErrc c);

// Services a kicked queue. Returns false if the ring is broken beyond use
// (vq::ends_ring: the avail index jumped, or a head still in flight was
// offered again; nothing is taken for it): the session must be closed.
bool service_queue(Session& s, uint32_t queue, proto::balloon::QueueRole role, Vring& vr,
                   std::mutex& mu, const std::shared_ptr<const MemoryTable>& table);

}  // namespace fph::daemon
