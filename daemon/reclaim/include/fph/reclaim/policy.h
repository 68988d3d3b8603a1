// Per-node discard policy (DESIGN section 4): lazy (MADV_FREE) where the node
// has headroom and the backing allows it, eager (MADV_DONTNEED) under
// pressure; a per-node rate limit bounds the CPU the daemon spends.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "fph/reclaim/discard.h"

namespace fph::reclaim {

enum class PrivateMode : uint8_t { Auto, Eager, Lazy };

struct NodePolicy {
  PrivateMode mode = PrivateMode::Auto;
  // Auto turns eager when free memory falls below this fraction of the node.
  double pressure_free_fraction = 0.10;
  // Auto turns eager when PSI memory "some avg10" exceeds this (percent).
  double pressure_psi_some_avg10 = 10.0;
  // 0 = unlimited. Bytes per second the node's pipeline may discard.
  uint64_t rate_limit_bytes_per_sec = 0;
  // For shared memory: MADV_REMOVE instead of punch hole.
  bool prefer_madvise = false;
};

struct NodeMemory {
  uint64_t total_bytes = 0;
  uint64_t free_bytes = 0;
  double psi_some_avg10 = 0.0;  // system-wide /proc/pressure/memory when per-node is unknown
  bool valid = false;
};

// Seam: how node memory is read. Production reads
// /sys/devices/system/node/node<N>/meminfo and /proc/pressure/memory.
// (NodePipelines calls read() from each node's pipeline, so concurrently for
// different nodes, at most about every 100 ms per node.)
class NodeMemoryProbe {
 public:
  virtual ~NodeMemoryProbe() = default;
  virtual NodeMemory read(int os_node) = 0;
};
class SysfsNodeMemoryProbe final : public NodeMemoryProbe {
 public:
  NodeMemory read(int os_node) override;
};

bool under_pressure(const NodePolicy& p, const NodeMemory& m);

// Thread-safe table of per-node policies. A node index out of range reads as
// the constructor's defaults; set() on it is ignored.
class PolicyTable {
 public:
  explicit PolicyTable(int nodes, NodePolicy defaults = {});
  NodePolicy get(int node) const;
  void set(int node, const NodePolicy& p);
  int node_count() const;
  // The method for a range on `node` given the node's memory state.
  // `mode` overrides the node's private-memory mode (a VM's own policy).
  Method choose(Backing b, int node, const NodeMemory& m,
                std::optional<PrivateMode> mode = std::nullopt) const;

 private:
  mutable std::mutex mu_;
  std::vector<NodePolicy> nodes_;
  NodePolicy defaults_;  // what get() returns for a node index out of range
};

}  // namespace fph::reclaim
