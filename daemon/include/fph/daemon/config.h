// fphd's configuration: a TOML file (etc/fphd.toml documents every key and
// its default), then command line flags on top. Parsing and validation are
// pure functions of the text, unit tested; errors name the key and the line.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fph/common/expected.h"
#include "fph/daemon/refault_backoff.h"
#include "fph/daemon/server.h"
#include "fph/daemon/vm_policy.h"
#include "fph/reclaim/policy.h"

namespace fph::daemon {

struct NodePolicyOverride {
  std::optional<reclaim::PrivateMode> mode;
  std::optional<uint64_t> rate_limit;
};

struct PolicyConfig {
  reclaim::NodePolicy defaults;                  // [policy]
  std::map<int, NodePolicyOverride> nodes;       // [policy.node.N]
  std::vector<VmPolicyRule> vms;                 // [policy.vm."NAME or PATTERN"], file order
  BackoffConfig backoff;                         // [policy.backoff]
  // The policy of node `n`: the defaults with that node's overrides applied.
  reclaim::NodePolicy for_node(int n) const;
};

struct FphdConfig {
  // [daemon]
  std::vector<std::string> listen;
  std::vector<NamedPath> vms;      // [[vm]] name, path
  std::vector<NamedPath> attach;   // [[attach]] name, path
  std::string admin_socket;        // "" = none
  unsigned socket_mode = 0660;
  std::string metrics = "127.0.0.1:9477";  // "off" = none
  std::string log_level = "info";
  int threads_per_node = 0;
  // The watchdog stops pinging systemd when a node pipeline has had work and
  // no progress for this long (0 = never judge the pipelines).
  int stall_limit_seconds = 120;
  // The stats queue (VIRTIO_BALLOON_F_STATS_VQ): ask each guest for its
  // memory stats this often; 0 = do not offer the feature.
  int stats_interval_seconds = 5;
  // While a VMM migrates a VM (dirty logging on): keep discarding and mark
  // the discarded pages in the log (true), or hold discards (false).
  bool discard_while_logging = true;
  std::string synthetic_topology;
  // Where fphd keeps what must survive its restart (balloon targets); ""
  // = nothing is kept across restarts.
  std::string state_dir;
  // [policy]
  PolicyConfig policy;
};

// Parses and validates TOML text. `source` names the file in errors, e.g.
// "fphd.toml:12: policy.mode: 'fast' is not one of eager, lazy, auto".
// Unknown keys are errors (a typo must not silently keep a default).
Expected<FphdConfig, std::string> parse_config(std::string_view text, const std::string& source);
Expected<FphdConfig, std::string> load_config_file(const std::string& path);

}  // namespace fph::daemon
