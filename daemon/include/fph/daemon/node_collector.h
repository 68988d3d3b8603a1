// Node view for the metrics: per host NUMA node total and free memory,
// pressure, and whether the node's discard policy sees it under pressure.
// Read through the same NodeMemoryProbe the pipelines use (node meminfo and
// /proc/pressure/memory), by the sampler thread, never on the data path.
#pragma once

#include "fph/daemon/metrics.h"
#include "fph/reclaim/policy.h"
#include "fph/reclaim/topology.h"

namespace fph::daemon {

class NodeCollector {
 public:
  NodeCollector(const reclaim::Topology& topo, reclaim::NodeMemoryProbe& probe,
                const reclaim::PolicyTable& policy, Metrics& metrics)
      : topo_(topo), probe_(probe), policy_(policy), metrics_(metrics) {}
  void sample();

 private:
  const reclaim::Topology& topo_;
  reclaim::NodeMemoryProbe& probe_;
  const reclaim::PolicyTable& policy_;
  Metrics& metrics_;
};

}  // namespace fph::daemon
