// The admin socket (DESIGN section 6): JSON commands in the style of QMP over
// a Unix stream socket (mode 0660 by default).
//
//   server: {"fph":{"version":"0.1.0","package":"fph"},"capabilities":[]}   (greeting)
//   client: {"execute":"query-sessions","arguments":{},"id":1}
//   server: {"return":[...],"id":1}
//       or: {"error":{"class":"DeviceNotFound","desc":"no VM named 'x'"},"id":1}
//
// One JSON object per line in both directions. Error classes:
//   GenericError      the command was understood but failed
//   CommandNotFound   no such command
//   DeviceNotFound    the named VM / node / attach target does not exist
//   InvalidParameter  a missing, unknown or ill-typed argument, or a bad value
//   ParseError        the line is not a JSON object with a string "execute"
// Commands are listed in docs/admin.md and by `query-commands`.
//
// The parsing and dispatch (AdminDispatcher) are pure: they take a line and a
// command table and give back the reply, so they are unit tested without
// sockets. AdminServer is the socket around them; daemon_commands() binds the
// command table to a running daemon.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"
#include "fph/daemon/balloon_targets.h"
#include "fph/daemon/vm_policy.h"
#include "fph/reclaim/policy.h"

namespace fph::reclaim {
class Topology;
class NodePipelines;
}  // namespace fph::reclaim

namespace fph::daemon {

class Server;

struct AdminError {
  std::string cls;   // "GenericError", "CommandNotFound", ...
  std::string desc;  // for humans
};
inline AdminError generic_error(std::string d) { return {"GenericError", std::move(d)}; }
inline AdminError invalid_parameter(std::string d) { return {"InvalidParameter", std::move(d)}; }
inline AdminError device_not_found(std::string d) { return {"DeviceNotFound", std::move(d)}; }

enum class ArgType : uint8_t { String, Integer, UnsignedInteger, Boolean, Array, Object };
struct ArgSpec {
  std::string name;
  ArgType type = ArgType::String;
  bool required = false;
};

using AdminResult = Expected<nlohmann::json, AdminError>;
using AdminHandler = std::function<AdminResult(const nlohmann::json& args)>;

struct AdminCommand {
  std::vector<ArgSpec> args;
  AdminHandler handler;
  std::string help;
};

// fphd's version (the project version CMake knows).
std::string_view daemon_version();

nlohmann::json admin_greeting(std::string_view version);
nlohmann::json admin_error(const AdminError& e, const nlohmann::json& id = nullptr);

class AdminDispatcher {
 public:
  void add(std::string name, AdminCommand c);
  // One request line in, one reply object out. Never throws: a handler that
  // throws becomes a GenericError.
  nlohmann::json handle_line(std::string_view line) const;
  nlohmann::json handle(const nlohmann::json& request) const;
  std::vector<std::string> names() const;

 private:
  std::map<std::string, AdminCommand> commands_;
};

// Validates `args` against `spec`: unknown arguments, missing required ones
// and wrong JSON types are InvalidParameter errors naming the argument.
Expected<void, AdminError> check_args(const nlohmann::json& args, const std::vector<ArgSpec>& spec);

// set-policy's arguments, parsed and range checked (pure).
struct PolicyChange {
  std::optional<int> node;
  std::optional<std::string> vm;
  std::optional<reclaim::PrivateMode> mode;
  std::optional<uint64_t> rate_limit;  // bytes per second, 0 = unlimited
  std::optional<bool> paused;          // vm only
  std::optional<uint64_t> min_block;   // vm only: bytes, multiple of 4096, <= 1 GiB
  std::optional<bool> backoff;         // vm only: refault backoff on or off
};
Expected<PolicyChange, AdminError> parse_policy_change(const nlohmann::json& args);
std::string_view to_string(reclaim::PrivateMode m);
// A VM's resolved policy as query-sessions and set-policy show it.
nlohmann::json vm_policy_json(const VmPolicy& p);
// "eager" | "lazy" | "auto"
std::optional<reclaim::PrivateMode> parse_private_mode(std::string_view s);

class VmMetrics;
// What a VM got back, for query-sessions: read from the VM's own metric
// series (never counted twice). Cumulative bytes since the VM's series were
// created: reported-bytes, discarded-bytes (the syscall accepted),
// reclaimed-bytes (kernel-verified), refaulted-bytes; headroom-bytes
// (fphd_guest_unreported_free_bytes) is null unless `guest_stats` (this
// session has stats from the guest) and the sampler has derived it.
nlohmann::json vm_reclaim_json(VmMetrics& m, bool guest_stats);

// What the daemon's commands act on.
struct AdminDeps {
  Server& server;
  const reclaim::Topology& topology;
  reclaim::PolicyTable& policy;
  reclaim::NodePipelines& pipelines;
  reclaim::NodeMemoryProbe& probe;
  std::string version;
  // Optional: called after a policy change (e.g. to log or persist).
  std::function<void()> on_policy_change;
  // Optional: balloon targets are remembered here (set-balloon).
  BalloonTargets* balloon_targets = nullptr;
  // Optional: per-VM policy (set-policy vm=...); without it a VM takes only 'paused'.
  VmPolicyTable* vm_policy = nullptr;
};
void add_daemon_commands(AdminDispatcher& d, AdminDeps deps);
// Applies the table's policy to every connected VM (reload, set-policy).
void apply_vm_policies(Server& server, const VmPolicyTable& table);

// The socket: one thread serving every client with poll(); commands never
// wait on a session, so a hung VM cannot hang the admin socket.
class AdminServer {
 public:
  explicit AdminServer(const AdminDispatcher& d, std::string version);
  ~AdminServer();
  // Binds `path` (a stale socket file is replaced) with permissions `mode`.
  Expected<void, std::string> start(const std::string& path, unsigned mode = 0660);
  // Serves an already listening socket (socket activation).
  Expected<void, std::string> start_fd(UniqueFd listener, std::string path_for_logs);
  void stop();
  const std::string& path() const { return path_; }

 private:
  void loop();
  const AdminDispatcher& dispatcher_;
  std::string version_;
  std::string path_;
  bool unlink_on_stop_ = false;
  UniqueFd listener_;
  UniqueFd wake_;
  std::thread thread_;
};

}  // namespace fph::daemon
