// fphd: the host daemon. Parses arguments, builds the topology, pipelines,
// metrics and server, then waits for SIGTERM/SIGINT and drains.
#include <CLI/CLI.hpp>

#include <csignal>
#include <cstdio>
#include <iostream>

#include "fph/common/log.h"
#include "fph/daemon/metrics.h"
#include "fph/daemon/sampler.h"
#include "fph/daemon/server.h"
#include "fph/reclaim/node_pipeline.h"
#include "fph/reclaim/policy.h"
#include "fph/reclaim/topology.h"
#include "fph/reclaim/verified_discard.h"

using namespace fph;

namespace {

bool split_named(const std::string& s, daemon::NamedPath* out) {
  const auto eq = s.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == s.size()) return false;
  *out = {s.substr(0, eq), s.substr(eq + 1)};
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fphd: host-side memory reclaim for virtio free page reporting (vhost-user back end)"};
  std::vector<std::string> listen, vms, attach;
  std::string metrics_bind = "127.0.0.1:9477";
  std::string log_level = "info";
  std::string private_mode = "auto";
  std::string synthetic;
  int threads_per_node = 0;
  bool prefer_madvise = false;
  app.add_option("--listen", listen, "Shared listening socket; VM names come from the peer")
      ->type_name("PATH");
  app.add_option("--vm", vms, "Listening socket dedicated to one VM")->type_name("NAME=PATH");
  app.add_option("--attach", attach, "Connect to a front end's server socket")->type_name("NAME=PATH");
  app.add_option("--metrics", metrics_bind, "Prometheus endpoint ADDRESS:PORT (port 0: any; 'off': none)")
      ->capture_default_str();
  app.add_option("--threads-per-node", threads_per_node, "Discard threads per NUMA node (0: its cores)");
  app.add_option("--private-mode", private_mode, "Private memory policy: auto, eager (MADV_DONTNEED), lazy (MADV_FREE)")
      ->check(CLI::IsMember({"auto", "eager", "lazy"}))
      ->capture_default_str();
  app.add_flag("--prefer-madvise", prefer_madvise, "Shared memory: MADV_REMOVE instead of punching holes");
  app.add_option("--synthetic-topology", synthetic,
                 "Use an hwloc synthetic topology (testing), e.g. 'node:4 core:1 pu:1'");
  app.add_option("--log-level", log_level, "debug, info, warn, error")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  log::Level lvl;
  if (!log::parse_level(log_level, &lvl)) {
    std::cerr << "fphd: --log-level: unknown level '" << log_level << "'\n";
    return 2;
  }
  log::set_level(lvl);

  daemon::ServerConfig scfg;
  scfg.listen = listen;
  for (const auto& v : vms) {
    daemon::NamedPath np;
    if (!split_named(v, &np)) {
      std::cerr << "fphd: --vm: expected NAME=PATH, got '" << v << "'\n";
      return 2;
    }
    scfg.vm_sockets.push_back(np);
  }
  for (const auto& v : attach) {
    daemon::NamedPath np;
    if (!split_named(v, &np)) {
      std::cerr << "fphd: --attach: expected NAME=PATH, got '" << v << "'\n";
      return 2;
    }
    scfg.attach.push_back(np);
  }
  if (scfg.listen.empty() && scfg.vm_sockets.empty() && scfg.attach.empty()) {
    std::cerr << "fphd: nothing to serve: give --listen, --vm or --attach\n";
    return 2;
  }

  // Block the signals we handle before any thread starts, so only sigwait
  // below receives them.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  reclaim::Topology topo;
  if (!synthetic.empty()) {
    auto t = reclaim::Topology::from_synthetic(synthetic);
    if (!t) {
      std::cerr << "fphd: --synthetic-topology: " << t.error() << "\n";
      return 2;
    }
    topo = std::move(*t);
  } else {
    topo = reclaim::Topology::from_system();
  }

  reclaim::NodePolicy np;
  np.mode = private_mode == "eager" ? reclaim::PrivateMode::Eager
          : private_mode == "lazy"  ? reclaim::PrivateMode::Lazy
                                    : reclaim::PrivateMode::Auto;
  np.prefer_madvise = prefer_madvise;
  reclaim::PolicyTable policy(topo.node_count(), np);
  reclaim::SysfsNodeMemoryProbe probe;
  reclaim::SyscallDiscarder syscalls;
  reclaim::VerifyingDiscarder discarder(syscalls);  // measures what each discard freed
  reclaim::PipelineOptions popts;
  popts.threads_per_node = threads_per_node;

  std::unique_ptr<daemon::Metrics> metrics;
  try {
    metrics = std::make_unique<daemon::Metrics>(metrics_bind == "off" ? "" : metrics_bind,
                                                topo.node_count());
  } catch (const std::exception& e) {
    std::cerr << "fphd: --metrics " << metrics_bind << ": " << e.what() << "\n";
    return 2;
  }
  reclaim::NodePipelines pipelines(topo, discarder, policy, probe, popts);
  daemon::DaemonContext ctx{topo, pipelines, *metrics};
  daemon::Server server(ctx, scfg);
  if (auto r = server.start(); !r) {
    std::cerr << "fphd: " << r.error() << "\n";
    return 1;
  }
  // Node view, resident bytes, reclaim state and refaults (docs/metrics.md).
  daemon::NodeCollector node_collector(topo, probe, policy, *metrics);
  daemon::Sampler sampler(*metrics, &node_collector, std::chrono::seconds(1));
  sampler.start([&server] { return server.sessions(); });

  std::string socks;
  for (const auto& p : server.socket_paths()) socks += (socks.empty() ? "\"" : ",\"") + p + "\"";
  log::info("fphd", "ready: {} NUMA node(s){}, metrics at {}", topo.node_count(),
            topo.is_synthetic() ? " (synthetic)" : "", metrics->url().empty() ? "off" : metrics->url());
  // One machine-readable line for scripts and tests.
  std::printf("{\"event\":\"ready\",\"pid\":%d,\"nodes\":%d,\"metrics\":\"%s\",\"sockets\":[%s]}\n",
              getpid(), topo.node_count(), metrics->url().c_str(), socks.c_str());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&sigs, &sig);
  log::info("fphd", "signal {}: draining sessions", sig);
  sampler.stop();
  server.stop();
  pipelines.drain();
  pipelines.stop();
  log::info("fphd", "stopped");
  return 0;
}
