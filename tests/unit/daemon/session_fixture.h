// A Session served over a real socketpair to a minimal in-test front end,
// with the real node pipelines, the verifying discarder (real syscalls on a
// memfd, st_blocks measured) and a sampler driven by the test. Used by the
// session and observability tests.
#pragma once

#include <gtest/gtest.h>
#include <poll.h>
#include <prometheus/metric_family.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <thread>

#include "front_end.h"
#include "fph/daemon/sampler.h"
#include "fph/daemon/session.h"
#include "fph/proto/channel.h"
#include "fph/reclaim/verified_discard.h"

namespace fph::testing_support {

using namespace fph::daemon;
namespace vu = proto::vu;
namespace vq = proto::vq;
namespace balloon = proto::balloon;


struct Daemon {
  reclaim::Topology topo = reclaim::Topology::from_system();
  reclaim::SyscallDiscarder syscalls;
  reclaim::VerifyingDiscarder discarder{syscalls};
  reclaim::PolicyTable policy{topo.node_count()};
  reclaim::SysfsNodeMemoryProbe probe;
  Metrics metrics{"", topo.node_count()};
  reclaim::NodePipelines pipelines{topo, discarder, policy, probe};
  DaemonContext ctx{topo, pipelines, metrics};
  NodeCollector nodes{topo, probe, policy, metrics};
  Sampler sampler{metrics, &nodes, std::chrono::seconds(1)};  // driven by sample()
  std::shared_ptr<Session> session;
  std::thread thread;

  explicit Daemon(UniqueFd sock, std::string name = "obs-vm") {
    session = std::make_shared<Session>(ctx, std::move(sock), std::move(name));
    thread = std::thread([this] { session->run(); });
  }
  ~Daemon() {
    session->request_stop();
    if (thread.joinable()) thread.join();
  }
  void sample() { sampler.sample_once({session}); }

  // Sum of the samples of `name` whose labels include `labels`.
  double value(const std::string& name, const std::map<std::string, std::string>& labels = {}) {
    double sum = 0;
    for (const auto& fam : metrics.registry()->Collect()) {
      if (fam.name != name) continue;
      for (const auto& m : fam.metric) {
        bool match = true;
        for (const auto& [k, v] : labels) {
          bool found = false;
          for (const auto& l : m.label) found = found || (l.name == k && l.value == v);
          match = match && found;
        }
        if (!match) continue;
        sum += fam.type == prometheus::MetricType::Counter ? m.counter.value : m.gauge.value;
      }
    }
    return sum;
  }
};

// A session with a front end past its handshake (reporting ring running).
struct RunningVm {
  Pair sp;
  Daemon d;
  FrontEnd fe;
  explicit RunningVm(std::string name = "obs-vm", uint64_t features = kFeatures)
      : d(std::move(sp.a), std::move(name)), fe(std::move(sp.b)) {
    fe.handshake(features);
  }
};

// fphd_protocol_errors_total{reason} of the daemon's VMs.
inline double errors(Daemon& d, const std::string& reason) {
  return d.value("fphd_protocol_errors_total", {{"reason", reason}});
}

}  // namespace fph::testing_support
