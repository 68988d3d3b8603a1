#include "fph/daemon/node_collector.h"

namespace fph::daemon {

void NodeCollector::sample() {
  for (const auto& n : topo_.nodes()) {
    const reclaim::NodeMemory m = probe_.read(n.os_index);
    if (!m.valid) continue;
    metrics_.set_node_memory(n.index, m.total_bytes, m.free_bytes, m.psi_some_avg10 / 100.0,
                             reclaim::under_pressure(policy_.get(n.index), m));
  }
}

}  // namespace fph::daemon
