// fphd: the host daemon. Parses the command line, loads the configuration
// file (flags override it), and runs (run.cpp).
#include <CLI/CLI.hpp>
#include <sys/resource.h>

#include <cerrno>
#include <cstring>
#include <iostream>

#include "fph/daemon/admin.h"
#include "fph/daemon/config.h"
#include "fph/daemon/run.h"
#include "fph/common/log.h"

using namespace fph;

namespace {

bool split_named(const std::string& s, daemon::NamedPath* out) {
  const auto eq = s.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == s.size()) return false;
  *out = {s.substr(0, eq), s.substr(eq + 1)};
  return true;
}

// Every VM costs fphd about twelve descriptors (its connection, one memfd per
// memory region, a kick and a call eventfd per virtqueue, the log fd while
// migrating; fph-bench --scale measured 12297 at 1024 VMs), so the usual
// soft limit of 1024 stops fphd at ~80 VMs. The soft limit is raised to the
// hard one (systemd: LimitNOFILE in fphd.service). fphd never uses select(),
// so descriptors above 1024 are safe.
void raise_fd_limit() {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  const rlim_t before = rl.rlim_cur;
  if (rl.rlim_cur != rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &rl) != 0) {
      log::warn("fphd", "RLIMIT_NOFILE: cannot raise the soft limit {} to the hard limit {}: {}", before,
                rl.rlim_max, std::strerror(errno));
      return;
    }
  }
  log::info("fphd", "RLIMIT_NOFILE: soft {} (was {}), hard {}: room for about {} VMs at ~12 descriptors each",
            rl.rlim_cur, before, rl.rlim_max, rl.rlim_cur / 12);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fphd: host-side memory reclaim for virtio free page reporting (vhost-user back end)"};
  app.set_version_flag("--version", std::string(daemon::daemon_version()));
  std::string config_path;
  std::vector<std::string> listen, vms, attach;
  std::string metrics_bind, log_level, private_mode, synthetic, admin_socket;
  int threads_per_node = 0;
  int stats_interval = 5;
  uint64_t rate_limit = 0;
  bool prefer_madvise = false, check_config = false;
  app.add_option("-c,--config", config_path, "TOML configuration file (see etc/fphd.toml); flags override it")
      ->type_name("FILE");
  app.add_flag("--check-config", check_config, "Validate the configuration and exit (0 ok, 2 invalid)");
  auto* o_listen = app.add_option("--listen", listen, "Shared listening socket; VM names come from the peer")
                       ->type_name("PATH");
  auto* o_vm = app.add_option("--vm", vms, "Listening socket dedicated to one VM")->type_name("NAME=PATH");
  auto* o_attach = app.add_option("--attach", attach, "Connect to a front end's server socket")->type_name("NAME=PATH");
  auto* o_admin = app.add_option("--admin-socket", admin_socket, "Admin socket (JSON commands, docs/admin.md)")
                      ->type_name("PATH");
  auto* o_metrics = app.add_option("--metrics", metrics_bind,
                                   "Prometheus endpoint ADDRESS:PORT (port 0: any; 'off': none) [127.0.0.1:9477]");
  auto* o_threads = app.add_option("--threads-per-node", threads_per_node, "Discard threads per NUMA node (0: its cores)");
  std::string state_dir;
  auto* o_state = app.add_option("--state-dir", state_dir,
                                 "Keep balloon targets here across fphd restarts (config daemon.state_dir)");
  auto* o_stats = app.add_option("--stats-interval", stats_interval,
                                 "Ask guests for memory stats (STATS_VQ) every N seconds; 0: do not offer STATS_VQ [5]")
                      ->check(CLI::Range(0, 86400))
                      ->type_name("SECONDS");
  auto* o_mode = app.add_option("--private-mode", private_mode,
                                "Private memory policy: auto, eager (MADV_DONTNEED), lazy (MADV_FREE) [auto]")
                     ->check(CLI::IsMember({"auto", "eager", "lazy"}));
  auto* o_rate = app.add_option("--rate-limit", rate_limit, "Bytes per second each node may discard (0: unlimited)");
  auto* o_madv = app.add_flag("--prefer-madvise", prefer_madvise, "Shared memory: MADV_REMOVE instead of punching holes");
  std::string backoff;
  auto* o_backoff = app.add_option("--backoff", backoff,
                                   "Refault backoff for every VM without a setting of its own: on or off "
                                   "(config policy.backoff.enabled) [on]")
                        ->check(CLI::IsMember({"on", "off"}));
  auto* o_synth = app.add_option("--synthetic-topology", synthetic,
                                 "Use an hwloc synthetic topology (testing), e.g. 'node:4 core:1 pu:1'");
  auto* o_log = app.add_option("--log-level", log_level, "debug, info, warn, error [info]");
  CLI11_PARSE(app, argc, argv);

  daemon::FphdConfig cfg;
  if (!config_path.empty()) {
    auto c = daemon::load_config_file(config_path);
    if (!c) {
      std::cerr << "fphd: " << c.error() << "\n";
      return 2;
    }
    cfg = std::move(*c);
  }
  std::string bad;
  auto named = [&](const std::vector<std::string>& in, const char* flag) {
    std::vector<daemon::NamedPath> out;
    for (const auto& v : in) {
      daemon::NamedPath np;
      if (!split_named(v, &np)) bad = std::string(flag) + ": expected NAME=PATH, got '" + v + "'";
      out.push_back(np);
    }
    return out;
  };
  // Flags replace what the file says; the policy flags are re-applied after
  // every SIGHUP reload so that a flag keeps winning.
  if (o_listen->count()) cfg.listen = listen;
  if (o_vm->count()) cfg.vms = named(vms, "--vm");
  if (o_attach->count()) cfg.attach = named(attach, "--attach");
  if (o_admin->count()) cfg.admin_socket = admin_socket;
  if (o_metrics->count()) cfg.metrics = metrics_bind;
  if (o_threads->count()) cfg.threads_per_node = threads_per_node;
  if (o_stats->count()) cfg.stats_interval_seconds = stats_interval;
  if (o_synth->count()) cfg.synthetic_topology = synthetic;
  if (o_state->count()) cfg.state_dir = state_dir;
  if (o_log->count()) cfg.log_level = log_level;
  if (!bad.empty()) {
    std::cerr << "fphd: " << bad << "\n";
    return 2;
  }
  auto apply_cli = [=](daemon::FphdConfig& c) {
    if (o_mode->count()) c.policy.defaults.mode = *daemon::parse_private_mode(private_mode);
    if (o_rate->count()) c.policy.defaults.rate_limit_bytes_per_sec = rate_limit;
    if (o_madv->count()) c.policy.defaults.prefer_madvise = prefer_madvise;
    if (o_backoff->count()) c.policy.backoff.enabled = backoff == "on";
    if (o_log->count()) c.log_level = log_level;
  };
  apply_cli(cfg);
  if (check_config) {
    std::cout << "fphd: configuration ok\n";
    return 0;
  }
  if (log::Level l; log::parse_level(cfg.log_level, &l)) log::set_level(l);  // run_daemon checks it
  raise_fd_limit();
  return daemon::run_daemon({std::move(cfg), config_path, apply_cli});
}
