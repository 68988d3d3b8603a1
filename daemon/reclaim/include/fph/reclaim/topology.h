// Host NUMA topology behind a seam: hwloc fills it from the running system in
// production, from a synthetic description or an XML file in tests, so that
// multi-node logic runs unchanged on a one-node machine.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fph/common/expected.h"

namespace fph::reclaim {

struct NodeInfo {
  int index = 0;              // dense index 0..n-1, what the rest of fph uses
  int os_index = 0;           // kernel node number (hwloc os_index)
  std::vector<int> cpus;      // OS cpu numbers of the node's PUs
  uint64_t total_bytes = 0;   // local memory, as hwloc reports it
};

class Topology {
 public:
  // The running system (hwloc_topology_load). Never fails: on a machine
  // without NUMA it returns one node holding every CPU.
  static Topology from_system();
  // hwloc synthetic description, e.g. "pack:2 node:2 core:2 pu:1".
  static Expected<Topology, std::string> from_synthetic(std::string_view desc);
  // hwloc XML export (lstopo --of xml).
  static Expected<Topology, std::string> from_xml_buffer(std::string_view xml);

  const std::vector<NodeInfo>& nodes() const { return nodes_; }
  int node_count() const { return static_cast<int>(nodes_.size()); }
  bool is_synthetic() const { return synthetic_; }

  // Dense node index holding the page at `addr` (get_mempolicy
  // MPOL_F_NODE|MPOL_F_ADDR; the page must be populated to be meaningful).
  // Returns `fallback` for synthetic topologies, unpopulated pages or errors.
  int node_of_address(const void* addr, int fallback = 0) const;
  // Dense index for a kernel node number, or -1.
  int index_of_os_node(int os_node) const;

 private:
  std::vector<NodeInfo> nodes_;
  bool synthetic_ = false;
};

}  // namespace fph::reclaim
