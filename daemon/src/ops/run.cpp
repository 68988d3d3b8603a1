#include "fph/daemon/run.h"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <iostream>

#include "fph/common/log.h"
#include "fph/daemon/admin.h"
#include "fph/daemon/memory_guard.h"
#include "fph/daemon/metrics.h"
#include "fph/daemon/sampler.h"
#include "fph/daemon/server.h"
#include "fph/daemon/systemd.h"
#include "fph/reclaim/node_pipeline.h"
#include "fph/reclaim/policy.h"
#include "fph/reclaim/topology.h"
#include "fph/reclaim/verified_discard.h"

namespace fph::daemon {

namespace {

void apply_policy(reclaim::PolicyTable& table, const PolicyConfig& p) {
  for (int n = 0; n < table.node_count(); ++n) table.set(n, p.for_node(n));
}


}  // namespace

int run_daemon(RunOptions opts) {
  FphdConfig& cfg = opts.config;
  log::Level lvl;
  if (!log::parse_level(cfg.log_level, &lvl)) {
    std::cerr << "fphd: log level: unknown level '" << cfg.log_level << "'\n";
    return 2;
  }
  log::set_level(lvl);

  ServerConfig scfg;
  scfg.listen = cfg.listen;
  scfg.vm_sockets = cfg.vms;
  scfg.attach = cfg.attach;
  scfg.socket_mode = cfg.socket_mode;

  // Sockets from the service manager: "admin" is the admin socket,
  // "vm-NAME" a socket dedicated to VM NAME, anything else a shared socket.
  std::vector<std::string> sd_errors;
  int admin_fd = -1;
  std::string admin_path = cfg.admin_socket;
  for (auto& s : inherited_sockets(&sd_errors)) {
    log::info("systemd", "inherited socket fd {} name '{}' path {}", s.fd, s.name, s.path);
    if (s.name == "admin") {
      if (admin_fd >= 0) ::close(admin_fd);
      admin_fd = s.fd;
      admin_path = s.path;
    } else if (s.name.rfind("vm-", 0) == 0) {
      scfg.inherited.push_back({s.fd, s.path, s.name.substr(3)});
    } else {
      scfg.inherited.push_back({s.fd, s.path, ""});
    }
  }
  for (const auto& e : sd_errors) log::warn("systemd", "{}", e);
  // A path the manager already passed is not bound again (that would unlink
  // the manager's socket file).
  auto inherited_path = [&](const std::string& p) {
    for (const auto& in : scfg.inherited)
      if (in.path == p) return true;
    return false;
  };
  std::erase_if(scfg.listen, inherited_path);
  std::erase_if(scfg.vm_sockets, [&](const NamedPath& v) { return inherited_path(v.path); });
  if (scfg.listen.empty() && scfg.vm_sockets.empty() && scfg.attach.empty() && scfg.inherited.empty()) {
    std::cerr << "fphd: nothing to serve: give --listen, --vm or --attach (or the config file's "
                 "daemon.listen, [[vm]], [[attach]], or sockets by socket activation)\n";
    return 2;
  }

  // Block the signals we handle before any thread starts, so only sigwait
  // below receives them.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
  // A front end that shrinks its memory file must not SIGBUS the daemon
  // (memory_guard.h); installed before any session maps guest memory.
  install_memory_guard();

  reclaim::Topology topo;
  if (!cfg.synthetic_topology.empty()) {
    auto t = reclaim::Topology::from_synthetic(cfg.synthetic_topology);
    if (!t) {
      std::cerr << "fphd: synthetic topology: " << t.error() << "\n";
      return 2;
    }
    topo = std::move(*t);
  } else {
    topo = reclaim::Topology::from_system();
  }

  reclaim::PolicyTable policy(topo.node_count(), cfg.policy.defaults);
  apply_policy(policy, cfg.policy);
  reclaim::SysfsNodeMemoryProbe probe;
  reclaim::SyscallDiscarder syscalls;
  reclaim::VerifyingDiscarder discarder(syscalls);  // measures what each discard freed
  reclaim::PipelineOptions popts;
  popts.threads_per_node = cfg.threads_per_node;

  std::unique_ptr<Metrics> metrics;
  try {
    metrics = std::make_unique<Metrics>(cfg.metrics == "off" ? "" : cfg.metrics, topo.node_count());
  } catch (const std::exception& e) {
    std::cerr << "fphd: metrics " << cfg.metrics << ": " << e.what() << "\n";
    return 2;
  }
  reclaim::NodePipelines pipelines(topo, discarder, policy, probe, popts);
  DaemonContext ctx{topo, pipelines, *metrics, std::chrono::seconds(cfg.stats_interval_seconds)};
  ctx.discard_while_logging = cfg.discard_while_logging;
  BalloonTargets balloon_targets(cfg.state_dir);
  if (auto n = balloon_targets.load(); !n) {
    log::warn("fphd", "balloon targets: {} (starting without them)", n.error());
  } else if (*n) {
    log::info("fphd", "{} balloon target(s) loaded from {}", *n, balloon_targets.path());
  }
  ctx.balloon_targets = &balloon_targets;
  VmPolicyTable vm_policy;
  vm_policy.set_rules(cfg.policy.vms, cfg.policy.backoff);
  ctx.vm_policy = &vm_policy;
  Server server(ctx, scfg);
  if (auto r = server.start(); !r) {
    std::cerr << "fphd: " << r.error() << "\n";
    return 1;
  }

  // Node view, resident bytes, reclaim state and refaults (docs/metrics.md).
  NodeCollector node_collector(topo, probe, policy, *metrics);
  Sampler sampler(*metrics, &node_collector, std::chrono::seconds(1));
  sampler.start([&server] { return server.sessions(); });

  const std::string version(daemon_version());
  AdminDispatcher admin_cmds;
  add_daemon_commands(admin_cmds, {server, topo, policy, pipelines, probe, version, {}, &balloon_targets, &vm_policy});
  AdminServer admin(admin_cmds, version);
  if (admin_fd >= 0) {
    (void)admin.start_fd(UniqueFd(admin_fd), admin_path);
  } else if (!admin_path.empty()) {
    if (auto r = admin.start(admin_path, cfg.socket_mode); !r) {
      std::cerr << "fphd: admin socket: " << r.error() << "\n";
      sampler.stop();
      server.stop();
      return 1;
    }
  }

  std::string socks;
  for (const auto& p : server.socket_paths()) socks += (socks.empty() ? "\"" : ",\"") + p + "\"";
  log::info("fphd", "ready: {} NUMA node(s){}, metrics at {}{}{}", topo.node_count(),
            topo.is_synthetic() ? " (synthetic)" : "", metrics->url().empty() ? "off" : metrics->url(),
            admin_path.empty() ? "" : ", admin socket ", admin_path);
  // One machine-readable line for scripts and tests.
  std::printf("{\"event\":\"ready\",\"pid\":%d,\"nodes\":%d,\"metrics\":\"%s\",\"admin\":\"%s\",\"sockets\":[%s]}\n",
              getpid(), topo.node_count(), metrics->url().c_str(), admin_path.c_str(), socks.c_str());
  std::fflush(stdout);
  notify(fmt::format("READY=1\nSTATUS=serving {} socket(s) on {} node(s)", server.socket_paths().size(),
                     topo.node_count()));
  // Pings stop while a node pipeline has work and has not moved for
  // daemon.stall_limit_seconds (default two minutes: a discard stuck in the
  // kernel, a wedged pipeline): the service manager then restarts fphd, and
  // the front ends reconnect. Two minutes is far above any single discard (a
  // 16 MiB punch takes milliseconds) and rate-limit waits count as progress.
  const std::chrono::seconds stall_limit(cfg.stall_limit_seconds);
  Watchdog watchdog([&pipelines, stall_limit] {
    if (stall_limit.count() == 0) return true;
    if (auto s = pipelines.stalled(stall_limit)) {
      log::error("fphd", "discard pipeline stalled: {}", *s);
      notify("STATUS=discard pipeline stalled: " + *s);
      return false;
    }
    return true;
  });

  for (;;) {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (sig != SIGHUP) {
      log::info("fphd", "signal {}: draining sessions", sig);
      break;
    }
    if (opts.config_path.empty()) {
      log::info("fphd", "SIGHUP: no configuration file to reload");
      continue;
    }
    notify("RELOADING=1");
    auto next = load_config_file(opts.config_path);
    if (!next) {
      log::error("fphd", "reload refused, keeping the running configuration: {}", next.error());
      notify("READY=1\nSTATUS=reload failed: " + next.error());
      continue;
    }
    if (opts.apply_cli) opts.apply_cli(*next);
    apply_policy(policy, next->policy);
    // The file is the truth again for every VM: admin changes are dropped.
    vm_policy.set_rules(next->policy.vms, next->policy.backoff);
    apply_vm_policies(server, vm_policy);
    if (log::parse_level(next->log_level, &lvl)) log::set_level(lvl);
    log::info("fphd", "reloaded {}: policy mode={} rate-limit={} B/s ({} node override(s), {} VM "
              "rule(s), backoff {}); sockets and threads change only on restart",
              opts.config_path, to_string(next->policy.defaults.mode),
              next->policy.defaults.rate_limit_bytes_per_sec, next->policy.nodes.size(),
              next->policy.vms.size(), next->policy.backoff.enabled ? "on" : "off");
    notify("READY=1\nSTATUS=configuration reloaded");
  }
  notify("STOPPING=1\nSTATUS=draining");
  sampler.stop();
  admin.stop();
  server.stop();
  pipelines.drain();
  pipelines.stop();
  log::info("fphd", "stopped");
  return 0;
}

}  // namespace fph::daemon
