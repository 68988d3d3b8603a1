// Host NUMA topology from hwloc 2.x (STYLE pattern 8: NUMA behind a seam).
#include "fph/reclaim/topology.h"

#include <hwloc.h>
#include <numaif.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <memory>

#include "fph/common/log.h"

namespace fph::reclaim {
namespace {

struct TopologyDeleter {
  void operator()(hwloc_topology* t) const { hwloc_topology_destroy(t); }
};
using HwlocTopology = std::unique_ptr<hwloc_topology, TopologyDeleter>;

std::string errno_text(std::string_view what) {
  return std::string(what) + ": " + std::strerror(errno);
}

// Nodes in hwloc logical order; the dense index is the logical index.
std::vector<NodeInfo> extract_nodes(hwloc_topology_t t) {
  std::vector<NodeInfo> out;
  const int n = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE);
  for (int i = 0; i < n; ++i) {
    hwloc_obj_t node = hwloc_get_obj_by_type(t, HWLOC_OBJ_NUMANODE, static_cast<unsigned>(i));
    if (node == nullptr) continue;
    NodeInfo info;
    info.index = static_cast<int>(out.size());
    info.os_index = static_cast<int>(node->os_index);
    info.total_bytes = node->attr != nullptr ? node->attr->numanode.local_memory : 0;
    if (node->cpuset != nullptr) {
      hwloc_obj_t pu = nullptr;
      while ((pu = hwloc_get_next_obj_inside_cpuset_by_type(t, node->cpuset, HWLOC_OBJ_PU, pu)) !=
             nullptr) {
        info.cpus.push_back(static_cast<int>(pu->os_index));
      }
    }
    out.push_back(std::move(info));
  }
  return out;
}

// A machine (or hwloc build) that exposes no NUMA node: one node, every PU.
NodeInfo single_node(hwloc_topology_t t) {
  NodeInfo info;
  if (t != nullptr) {
    hwloc_obj_t pu = nullptr;
    while ((pu = hwloc_get_next_obj_by_type(t, HWLOC_OBJ_PU, pu)) != nullptr) {
      info.cpus.push_back(static_cast<int>(pu->os_index));
    }
    if (hwloc_obj_t root = hwloc_get_root_obj(t)) info.total_bytes = root->total_memory;
  }
  if (info.cpus.empty()) {
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    for (long i = 0; i < (n > 0 ? n : 1); ++i) info.cpus.push_back(static_cast<int>(i));
  }
  if (info.total_bytes == 0) {
    const long pages = sysconf(_SC_PHYS_PAGES);
    const long page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) info.total_bytes = static_cast<uint64_t>(pages) * page;
  }
  return info;
}

}  // namespace

// Loads a configured hwloc topology into a Topology. `configure` selects the
// source (synthetic, XML); it runs between init and load.
template <class Configure>
static Expected<HwlocTopology, std::string> load(Configure&& configure) {
  hwloc_topology_t raw = nullptr;
  if (hwloc_topology_init(&raw) != 0) return unexpected(errno_text("hwloc_topology_init"));
  HwlocTopology t(raw);
  if (auto err = configure(raw); !err.empty()) return unexpected(std::move(err));
  if (hwloc_topology_load(raw) != 0) return unexpected(errno_text("hwloc_topology_load"));
  return t;
}

Topology Topology::from_system() {
  Topology topo;
  auto t = load([](hwloc_topology_t) { return std::string(); });
  if (!t) {
    log::warn("reclaim", "hwloc failed ({}); assuming one NUMA node", t.error());
    topo.nodes_.push_back(single_node(nullptr));
    return topo;
  }
  topo.nodes_ = extract_nodes(t->get());
  topo.synthetic_ = hwloc_topology_is_thissystem(t->get()) == 0;
  if (topo.nodes_.empty()) topo.nodes_.push_back(single_node(t->get()));
  return topo;
}

Expected<Topology, std::string> Topology::from_synthetic(std::string_view desc) {
  const std::string d(desc);
  auto t = load([&](hwloc_topology_t raw) {
    return hwloc_topology_set_synthetic(raw, d.c_str()) == 0
               ? std::string()
               : "invalid hwloc synthetic description '" + d + "'";
  });
  if (!t) return unexpected(std::move(t.error()));
  Topology topo;
  topo.nodes_ = extract_nodes(t->get());
  topo.synthetic_ = true;
  if (topo.nodes_.empty()) return unexpected("synthetic topology '" + d + "' has no NUMA node");
  return topo;
}

Expected<Topology, std::string> Topology::from_xml_buffer(std::string_view xml) {
  // hwloc wants the size including the terminating NUL, as
  // hwloc_topology_export_xmlbuffer() reports it.
  const std::string buf(xml);
  if (buf.size() >= static_cast<size_t>(INT_MAX)) return unexpected(std::string("XML too large"));
  auto t = load([&](hwloc_topology_t raw) {
    return hwloc_topology_set_xmlbuffer(raw, buf.c_str(), static_cast<int>(buf.size() + 1)) == 0
               ? std::string()
               : errno_text("hwloc_topology_set_xmlbuffer");
  });
  if (!t) return unexpected(std::move(t.error()));
  Topology topo;
  topo.nodes_ = extract_nodes(t->get());
  // An XML topology describes some machine, not necessarily this one: treat
  // it like a synthetic one (no get_mempolicy, no NUMA-bound arenas) unless
  // the user asserted otherwise with HWLOC_THISSYSTEM=1.
  topo.synthetic_ = hwloc_topology_is_thissystem(t->get()) == 0;
  if (topo.nodes_.empty()) return unexpected(std::string("XML topology has no NUMA node"));
  return topo;
}

int Topology::node_of_address(const void* addr, int fallback) const {
  if (synthetic_ || addr == nullptr) return fallback;
  int os_node = -1;
  // MPOL_F_NODE|MPOL_F_ADDR: the node of the page at addr (get_mempolicy(2)).
  if (get_mempolicy(&os_node, nullptr, 0, const_cast<void*>(addr), MPOL_F_NODE | MPOL_F_ADDR) !=
      0) {
    return fallback;
  }
  const int index = index_of_os_node(os_node);
  return index >= 0 ? index : fallback;
}

int Topology::index_of_os_node(int os_node) const {
  for (const auto& n : nodes_) {
    if (n.os_index == os_node) return n.index;
  }
  return -1;
}

}  // namespace fph::reclaim
