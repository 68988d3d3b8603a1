// fphd's life: build the topology, pipelines, metrics, server and admin
// socket from a configuration, tell the service manager, serve until
// SIGTERM/SIGINT, then drain and exit. SIGHUP reloads the configuration
// file's policy (a bad file is logged and the running policy kept).
#pragma once

#include <functional>
#include <string>

#include "fph/daemon/config.h"

namespace fph::daemon {

struct RunOptions {
  FphdConfig config;
  std::string config_path;                       // "" = no file (SIGHUP reloads nothing)
  std::function<void(FphdConfig&)> apply_cli;    // command line overrides, re-applied on reload
};

// Returns the process exit code: 0 after a clean drain, 1 if startup failed
// (message on stderr), 2 for a configuration error.
int run_daemon(RunOptions opts);

}  // namespace fph::daemon
