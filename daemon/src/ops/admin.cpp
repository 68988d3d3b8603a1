#include "fph/daemon/admin.h"

#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>

#include "fph/common/log.h"
#include "fph/daemon/sampler.h"
#include "fph/daemon/server.h"
#include "fph/daemon/stats_service.h"
#include "fph/proto/balloon.h"
#include "fph/proto/vhost_user.h"
#include "fph/reclaim/node_pipeline.h"
#include "fph/reclaim/topology.h"

namespace fph::daemon {

using nlohmann::json;

namespace {

constexpr size_t kMaxLine = 64 * 1024;

std::string_view type_name(ArgType t) {
  switch (t) {
    case ArgType::String: return "a string";
    case ArgType::Integer: return "an integer";
    case ArgType::UnsignedInteger: return "a non-negative integer";
    case ArgType::Boolean: return "a boolean";
    case ArgType::Array: return "an array";
    case ArgType::Object: return "an object";
  }
  return "?";
}

bool has_type(const json& v, ArgType t) {
  switch (t) {
    case ArgType::String: return v.is_string();
    case ArgType::Integer: return v.is_number_integer();
    case ArgType::UnsignedInteger: return v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0);
    case ArgType::Boolean: return v.is_boolean();
    case ArgType::Array: return v.is_array();
    case ArgType::Object: return v.is_object();
  }
  return false;
}

}  // namespace

std::string_view daemon_version() { return FPH_VERSION; }

json admin_greeting(std::string_view version) {
  return {{"fph", {{"version", std::string(version)}, {"package", "fph"}}},
          {"capabilities", json::array()}};
}

json admin_error(const AdminError& e, const json& id) {
  json r = {{"error", {{"class", e.cls}, {"desc", e.desc}}}};
  if (!id.is_null()) r["id"] = id;
  return r;
}

Expected<void, AdminError> check_args(const json& args, const std::vector<ArgSpec>& spec) {
  if (!args.is_object()) return unexpected(invalid_parameter("'arguments' must be an object"));
  for (const auto& [k, v] : args.items()) {
    const ArgSpec* s = nullptr;
    for (const auto& a : spec)
      if (a.name == k) s = &a;
    if (!s) return unexpected(invalid_parameter("unknown argument '" + k + "'"));
    if (!has_type(v, s->type))
      return unexpected(invalid_parameter("argument '" + k + "' must be " + std::string(type_name(s->type))));
  }
  for (const auto& a : spec)
    if (a.required && !args.contains(a.name))
      return unexpected(invalid_parameter("missing argument '" + a.name + "'"));
  return {};
}

void AdminDispatcher::add(std::string name, AdminCommand c) { commands_[std::move(name)] = std::move(c); }

std::vector<std::string> AdminDispatcher::names() const {
  std::vector<std::string> v;
  for (const auto& [n, c] : commands_) v.push_back(n);
  return v;
}

json AdminDispatcher::handle_line(std::string_view line) const {
  json req = json::parse(line, nullptr, false);
  if (req.is_discarded()) return admin_error({"ParseError", "not valid JSON"});
  return handle(req);
}

json AdminDispatcher::handle(const json& req) const {
  if (!req.is_object()) return admin_error({"ParseError", "a request must be a JSON object"});
  const json id = req.contains("id") ? req["id"] : json();
  for (const auto& [k, v] : req.items())
    if (k != "execute" && k != "arguments" && k != "id")
      return admin_error(invalid_parameter("unknown member '" + k + "' in request"), id);
  if (!req.contains("execute") || !req["execute"].is_string())
    return admin_error({"ParseError", "missing string member 'execute'"}, id);
  const std::string cmd = req["execute"].get<std::string>();
  auto it = commands_.find(cmd);
  if (it == commands_.end()) return admin_error({"CommandNotFound", "unknown command '" + cmd + "'"}, id);
  const json args = req.contains("arguments") ? req["arguments"] : json::object();
  if (auto ok = check_args(args, it->second.args); !ok) return admin_error(ok.error(), id);
  AdminResult r = unexpected(generic_error("internal error"));
  try {
    r = it->second.handler(args);
  } catch (const std::exception& e) {
    r = unexpected(generic_error(std::string("internal error: ") + e.what()));
  }
  if (!r) return admin_error(r.error(), id);
  json out = {{"return", std::move(r.value())}};
  if (!id.is_null()) out["id"] = id;
  return out;
}

std::string_view to_string(reclaim::PrivateMode m) {
  switch (m) {
    case reclaim::PrivateMode::Auto: return "auto";
    case reclaim::PrivateMode::Eager: return "eager";
    case reclaim::PrivateMode::Lazy: return "lazy";
  }
  return "?";
}

std::optional<reclaim::PrivateMode> parse_private_mode(std::string_view s) {
  if (s == "auto") return reclaim::PrivateMode::Auto;
  if (s == "eager") return reclaim::PrivateMode::Eager;
  if (s == "lazy") return reclaim::PrivateMode::Lazy;
  return std::nullopt;
}

Expected<PolicyChange, AdminError> parse_policy_change(const json& args) {
  static const std::vector<ArgSpec> spec = {{"node", ArgType::UnsignedInteger},
                                            {"vm", ArgType::String},
                                            {"mode", ArgType::String},
                                            {"rate-limit", ArgType::UnsignedInteger},
                                            {"paused", ArgType::Boolean},
                                            {"min-block", ArgType::UnsignedInteger},
                                            {"backoff", ArgType::Boolean}};
  if (auto ok = check_args(args, spec); !ok) return unexpected(ok.error());
  PolicyChange c;
  if (args.contains("node")) {
    const auto n = args["node"].get<uint64_t>();
    if (n > 4096) return unexpected(invalid_parameter("argument 'node': " + std::to_string(n) + " is out of range"));
    c.node = static_cast<int>(n);
  }
  if (args.contains("vm")) c.vm = args["vm"].get<std::string>();
  if (c.node.has_value() == c.vm.has_value())
    return unexpected(invalid_parameter("give exactly one of 'node' and 'vm'"));
  if (args.contains("mode")) {
    auto m = parse_private_mode(args["mode"].get<std::string>());
    if (!m)
      return unexpected(invalid_parameter("argument 'mode': '" + args["mode"].get<std::string>() +
                                          "' is not one of eager, lazy, auto"));
    c.mode = m;
  }
  if (args.contains("rate-limit")) {
    c.rate_limit = args["rate-limit"].get<uint64_t>();
    if (*c.rate_limit > static_cast<uint64_t>(INT64_MAX))
      return unexpected(invalid_parameter("argument 'rate-limit': out of range"));
  }
  if (args.contains("paused")) c.paused = args["paused"].get<bool>();
  if (args.contains("backoff")) c.backoff = args["backoff"].get<bool>();
  if (args.contains("min-block")) {
    const uint64_t b = args["min-block"].get<uint64_t>();
    const std::string who = c.vm ? " of VM '" + *c.vm + "'" : "";
    if (b > kMaxMinBlock)
      return unexpected(invalid_parameter(fmt::format("argument 'min-block'{}: {} is more than {} (1 GiB)", who, b, kMaxMinBlock)));
    if (b % 4096 != 0)
      return unexpected(invalid_parameter(fmt::format("argument 'min-block'{}: {} is not a multiple of 4096", who, b)));
    c.min_block = b;
  }
  if (c.node && (c.paused || c.min_block || c.backoff))
    return unexpected(invalid_parameter("'paused', 'min-block' and 'backoff' are per VM (give 'vm')"));
  if (!c.mode && !c.rate_limit && !c.paused && !c.min_block && !c.backoff)
    return unexpected(invalid_parameter("nothing to change"));
  return c;
}

json vm_policy_json(const VmPolicy& p) {
  return {{"rate-limit", p.rate_limit},
          {"min-block", p.min_block},
          {"mode", p.mode ? json(std::string(to_string(*p.mode))) : json(nullptr)},
          {"paused", p.paused},
          {"backoff", p.backoff}};
}

void apply_vm_policies(Server& server, const VmPolicyTable& table) {
  for (const auto& s : server.sessions()) {
    const VmPolicy p = table.resolve(s->name());
    s->set_policy(p, table.backoff_for(p));
  }
}

json vm_reclaim_json(VmMetrics& m, bool guest_stats) {
  const auto headroom = guest_stats ? m.unreported_free() : std::nullopt;
  return {{"reported-bytes", m.reported_total()},
          {"discarded-bytes", m.discarded_bytes()},
          {"reclaimed-bytes", m.reclaimed_total()},
          {"refaulted-bytes", m.refaulted_total()},
          {"headroom-bytes", headroom ? json(*headroom) : json(nullptr)}};
}

namespace {

json features_json(uint64_t f) {
  namespace b = proto::balloon;
  json names = json::array();
  if (f & b::kFVersion1) names.push_back("VERSION_1");
  if (f & b::kFStatsVq) names.push_back("STATS_VQ");
  if (f & b::kFIndirectDesc) names.push_back("INDIRECT_DESC");
  if (f & b::kFPagePoison) names.push_back("PAGE_POISON");
  if (f & b::kFDeflateOnOom) names.push_back("DEFLATE_ON_OOM");
  if (f & b::kFReporting) names.push_back("FREE_PAGE_REPORTING");
  if (f & proto::vu::feature::kLogAll) names.push_back("LOG_ALL");
  if (f & proto::vu::feature::kProtocolFeatures) names.push_back("PROTOCOL_FEATURES");
  if (f & b::kFFphEpoch) names.push_back("FPH_EPOCH");
  return names;
}

std::string hex(uint64_t v) { return fmt::format("0x{:x}", v); }

// The latest stats the guest sent on the stats queue (null: none yet, or
// STATS_VQ not negotiated), and the headroom derived from them.
json guest_stats_json(const Session& s, const SessionInfo& i) {
  namespace b = proto::balloon;
  auto gs = s.stats().latest();
  if (!gs) return nullptr;
  json j = json::object();
  for (size_t t = 0; t < b::kStatTags; ++t)
    if (gs->stats.values[t]) j[std::string(b::to_string(static_cast<b::StatTag>(t)))] = *gs->stats.values[t];
  const double age = std::chrono::duration<double>(std::chrono::system_clock::now() - gs->at).count();
  json out = {{"values", j}, {"age-seconds", std::round(age * 10) / 10}, {"updates", gs->updates},
              {"rejected", gs->rejected}};
  if (auto free = gs->stats.get(b::StatTag::MemFree))
    out["unreported-free"] = unreported_free_bytes(*free, i.memory_bytes, table_resident_bytes(*s.table()));
  return out;
}

json backoff_json(RefaultBackoff& b) {
  const auto snap = b.snapshot();
  return {{"state", std::string(to_string(snap.state))},
          {"enabled", snap.enabled},
          {"share", std::round(snap.share * 1000) / 1000},
          {"window-discarded", snap.window_discarded},
          {"window-refaulted", snap.window_refaulted},
          {"holds", snap.holds},
          {"hold-left-seconds", std::round(snap.hold_left_seconds * 10) / 10},
          {"next-hold-seconds", snap.next_hold.count()},
          {"held-seconds", std::round(snap.held_seconds * 10) / 10}};
}

json session_json(Session& s) {
  const SessionInfo i = s.info();
  json j = {{"name", i.name},
            {"state", std::string(to_string(i.state))},
            {"features", hex(i.features)},
            {"feature-names", features_json(i.features)},
            {"protocol-features", hex(i.protocol_features)},
            {"status", i.status},
            {"regions", i.regions},
            {"memory", i.memory_bytes},
            {"paused", i.paused},
            {"yanked", i.yanked},
            {"poison-val", i.poison_val},
            {"num-pages", i.num_pages},
            {"actual", i.actual},
            {"balloon", {{"target", uint64_t{i.num_pages} << proto::balloon::kPfnShift},
                         {"actual", uint64_t{i.actual} << proto::balloon::kPfnShift}}},
            {"backend-channel", i.backend_channel},
            {"guest-stats", guest_stats_json(s, i)},
            {"policy", vm_policy_json(i.policy)},
            {"backoff", backoff_json(s.backoff())},
            {"counters", {{"inflight", i.inflight}, {"requests", i.requests}, {"deferred", i.deferred}}}};
  // Headroom only from this session's stats (the series outlive a session).
  const auto gs = s.stats().latest();
  j.update(vm_reclaim_json(s.metrics(), gs && gs->stats.get(proto::balloon::StatTag::MemFree)));
  return j;
}

std::shared_ptr<Session> need_vm(Server& server, const json& args) {
  return server.find(args["vm"].get<std::string>());
}

AdminError no_vm(const std::string& n) { return device_not_found("no VM named '" + n + "'"); }

}  // namespace

void add_daemon_commands(AdminDispatcher& d, AdminDeps deps) {
  auto D = std::make_shared<AdminDeps>(std::move(deps));
  const auto* dp = &d;

  d.add("qmp_capabilities", {{}, [](const json&) -> AdminResult { return json::object(); },
                             "accepted for QMP clients; does nothing"});
  d.add("query-commands", {{}, [dp](const json&) -> AdminResult {
                             json v = json::array();
                             for (const auto& n : dp->names()) v.push_back({{"name", n}});
                             return v;
                           }, "list the commands"});
  d.add("query-version", {{}, [D](const json&) -> AdminResult {
                            return json{{"version", D->version}, {"package", "fph"}};
                          }, "the daemon's version"});
  d.add("query-status", {{}, [D](const json&) -> AdminResult {
                           json socks = json::array();
                           for (const auto& p : D->server.socket_paths()) socks.push_back(p);
                           json att = json::array();
                           for (const auto& a : D->server.attach_targets())
                             att.push_back({{"name", a.name}, {"path", a.path}});
                           return json{{"version", D->version},
                                       {"pid", static_cast<int>(::getpid())},
                                       {"running", true},
                                       {"nodes", D->topology.node_count()},
                                       {"sessions", D->server.sessions().size()},
                                       {"sockets", socks},
                                       {"attach", att}};
                         }, "daemon status"});
  d.add("query-sessions", {{}, [D](const json&) -> AdminResult {
                             json v = json::array();
                             for (const auto& s : D->server.sessions()) v.push_back(session_json(*s));
                             return v;
                           }, "one entry per connected VM"});
  d.add("query-nodes", {{}, [D](const json&) -> AdminResult {
                          json v = json::array();
                          for (const auto& n : D->topology.nodes()) {
                            const auto mem = D->probe.read(n.os_index);
                            const auto pol = D->policy.get(n.index);
                            const auto& c = D->pipelines.counters(n.index);
                            v.push_back({{"node", n.index},
                                         {"os-node", n.os_index},
                                         {"cpus", n.cpus},
                                         {"total", mem.valid ? mem.total_bytes : n.total_bytes},
                                         {"free", mem.valid ? json(mem.free_bytes) : json()},
                                         {"psi-some-avg10", mem.psi_some_avg10},
                                         {"pressure", mem.valid && reclaim::under_pressure(pol, mem)},
                                         {"policy",
                                          {{"mode", std::string(to_string(pol.mode))},
                                           {"rate-limit", pol.rate_limit_bytes_per_sec},
                                           {"prefer-madvise", pol.prefer_madvise}}},
                                         {"counters",
                                          {{"batches", c.batches.load()},
                                           {"inline-batches", c.inline_batches.load()},
                                           {"discarded", c.discarded_bytes.load()},
                                           {"skipped", c.skipped_bytes.load()},
                                           {"failures", c.failures.load()},
                                           {"queued", c.queued.load()}}}});
                          }
                          return v;
                        }, "host NUMA nodes: memory, pressure, policy"});
  d.add("query-migration", {{}, [D](const json&) -> AdminResult {
                              json v = json::array();
                              for (const auto& s : D->server.sessions()) {
                                const MigrationInfo m = s->migration();
                                v.push_back({{"name", s->name()},
                                             {"state", std::string(to_string(m.state))},
                                             {"log-all", m.log_all},
                                             {"log-bytes", m.log_bytes},
                                             {"log-covers", m.log_covers},
                                             {"pages-marked", m.pages_marked},
                                             {"log-misses", m.log_misses},
                                             {"discard-while-logging", m.discard_while_logging},
                                             {"epoch", m.epoch},
                                             {"state-bytes-sent", m.state_bytes_sent},
                                             {"state-bytes-received", m.state_bytes_received},
                                             {"last-transfer-seconds", m.last_transfer_seconds},
                                             {"last-error", m.last_error}});
                              }
                              return v;
                            }, "live migration per VM: dirty log, device-state transfers, epoch"});
  d.add("re-report",
        {{{"vm", ArgType::String, true}},
         [D](const json& args) -> AdminResult {
           auto s = need_vm(D->server, args);
           if (!s) return unexpected(no_vm(args["vm"].get<std::string>()));
           std::string why;
           const uint64_t e = s->bump_epoch(&why);
           const bool knows = s->info().features & proto::balloon::kFFphEpoch;
           json out = {{"epoch", e}, {"notified", why.empty()}, {"driver-knows-epoch", knows}};
           if (!why.empty()) out["reason"] = why;
           return out;
         },
         "bump the VM's epoch: a driver that negotiated it (fph-guest) reports all its free memory again"});
  d.add("set-migration-policy",
        {{{"vm", ArgType::String, true}, {"discard-while-logging", ArgType::Boolean, true}},
         [D](const json& args) -> AdminResult {
           auto s = need_vm(D->server, args);
           if (!s) return unexpected(no_vm(args["vm"].get<std::string>()));
           s->set_discard_while_logging(args["discard-while-logging"].get<bool>());
           return json::object();
         },
         "while the VMM migrates a VM: keep discarding and log it (true), or hold discards (false)"});
  d.add("query-yank", {{}, [D](const json&) -> AdminResult {
                         json v = json::array();
                         for (const auto& s : D->server.sessions())
                           v.push_back({{"type", "vm"}, {"name", s->name()}});
                         return v;
                       }, "what `yank` can tear down"});

  auto pause = [D](bool p) {
    return [D, p](const json& args) -> AdminResult {
      auto s = need_vm(D->server, args);
      if (!s) return unexpected(no_vm(args["vm"].get<std::string>()));
      if (D->vm_policy) {
        VmPolicySettings o;
        o.paused = p;
        D->vm_policy->set_override(s->name(), o);
      }
      s->set_paused(p);
      return json::object();
    };
  };
  d.add("pause-reclaim", {{{"vm", ArgType::String, true}}, pause(true), "stop discarding for a VM"});
  d.add("resume-reclaim", {{{"vm", ArgType::String, true}}, pause(false), "discard again for a VM"});

  // One path for both spellings of the balloon target: checked against the
  // VM's memory, written to its config space, the driver notified, and
  // remembered for its reconnects and fphd restarts (balloon_targets.h).
  auto set_target = [D](const json& args, uint64_t pages, const std::string& arg,
                        const std::string& asked) -> AdminResult {
    auto s = need_vm(D->server, args);
    if (!s) return unexpected(no_vm(args["vm"].get<std::string>()));
    const SessionInfo i = s->info();
    const uint64_t guest_pages = i.memory_bytes >> proto::balloon::kPfnShift;
    if (pages > guest_pages || pages > UINT32_MAX)
      return unexpected(invalid_parameter(fmt::format(
          "argument '{}': {} ({} MiB) is more than VM '{}' has ({} MiB of guest memory)", arg, asked,
          (pages << proto::balloon::kPfnShift) >> 20, i.name, i.memory_bytes >> 20)));
    auto r = s->set_num_pages(static_cast<uint32_t>(pages));
    json out = {{"vm", i.name},
                {"target", pages << proto::balloon::kPfnShift},
                {"num-pages", pages},
                {"notified", r.has_value()}};
    if (!r) out["reason"] = r.error();
    if (D->balloon_targets) {
      auto saved = D->balloon_targets->set(i.name, static_cast<uint32_t>(pages));
      out["remembered"] = saved.has_value();
      if (!saved) {
        log::warn("admin", "balloon target of vm={} not saved: {}", i.name, saved.error());
        out["remembered-error"] = saved.error();
      }
    }
    return out;
  };
  d.add("set-balloon",
        {{{"vm", ArgType::String, true}, {"target", ArgType::UnsignedInteger, true}},
         [set_target](const json& args) -> AdminResult {
           const uint64_t bytes = args["target"].get<uint64_t>();
           // Whole 4 KiB pages (the unit of num_pages), rounded down.
           return set_target(args, bytes >> proto::balloon::kPfnShift, "target",
                             fmt::format("{} bytes", bytes));
         },
         "balloon target in bytes (rounded down to 4 KiB pages): the guest gives that much memory "
         "to the host (inflates) or takes it back (deflates); 0 deflates fully"});
  d.add("set-num-pages",
        {{{"vm", ArgType::String, true}, {"pages", ArgType::UnsignedInteger, true}},
         [set_target](const json& args) -> AdminResult {
           const uint64_t pages = args["pages"].get<uint64_t>();
           return set_target(args, pages, "pages", fmt::format("{} pages", pages));
         },
         "balloon target in 4 KiB pages (config num_pages); the driver is told over the back-end channel"});

  d.add("set-policy",
        {{{"node", ArgType::UnsignedInteger}, {"vm", ArgType::String}, {"mode", ArgType::String},
          {"rate-limit", ArgType::UnsignedInteger}, {"paused", ArgType::Boolean},
          {"min-block", ArgType::UnsignedInteger}, {"backoff", ArgType::Boolean}},
         [D](const json& args) -> AdminResult {
           auto c = parse_policy_change(args);
           if (!c) return unexpected(c.error());
           if (c->vm) {
             auto s = D->server.find(*c->vm);
             if (!s) return unexpected(no_vm(*c->vm));
             VmPolicySettings o;
             o.rate_limit = c->rate_limit;
             o.min_block = c->min_block;
             o.mode = c->mode;
             o.paused = c->paused;
             o.backoff = c->backoff;
             if (!D->vm_policy) {
               if (c->rate_limit || c->min_block || c->mode || c->backoff)
                 return unexpected(generic_error("this fphd has no per-VM policy table"));
               s->set_paused(*c->paused);
               return json::object();
             }
             // Kept by name until the next reload: a VM that reconnects keeps it.
             D->vm_policy->set_override(*c->vm, o);
             const VmPolicy p = D->vm_policy->resolve(*c->vm);
             s->set_policy(p, D->vm_policy->backoff_for(p));
             return vm_policy_json(p);
           }
           if (*c->node >= D->topology.node_count())
             return unexpected(device_not_found("no node " + std::to_string(*c->node) + " (" +
                                                std::to_string(D->topology.node_count()) + " nodes)"));
           auto p = D->policy.get(*c->node);
           if (c->mode) p.mode = *c->mode;
           if (c->rate_limit) p.rate_limit_bytes_per_sec = *c->rate_limit;
           D->policy.set(*c->node, p);
           log::info("admin", "node {} policy: mode={} rate-limit={} B/s", *c->node, to_string(p.mode),
                     p.rate_limit_bytes_per_sec);
           if (D->on_policy_change) D->on_policy_change();
           return json::object();
         },
         "node: mode eager|lazy|auto, rate-limit bytes/s; vm: the same, and paused, min-block bytes, "
         "backoff (kept until the next reload)"});

  d.add("attach", {{{"name", ArgType::String, true}, {"path", ArgType::String, true}},
                   [D](const json& args) -> AdminResult {
                     auto r = D->server.attach(args["name"].get<std::string>(), args["path"].get<std::string>());
                     if (!r) return unexpected(generic_error(r.error()));
                     return json::object();
                   }, "connect to a front end's server socket (and reconnect after it goes away)"});
  d.add("detach", {{{"name", ArgType::String, true}}, [D](const json& args) -> AdminResult {
                     const auto n = args["name"].get<std::string>();
                     if (!D->server.detach(n)) return unexpected(device_not_found("no attach target named '" + n + "'"));
                     return json::object();
                   }, "stop an attach target and end its session"});
  d.add("yank", {{{"instances", ArgType::Array, true}}, [D](const json& args) -> AdminResult {
                   // All instances are checked before any is yanked: a bad
                   // request changes nothing.
                   std::vector<std::string> names;
                   for (const auto& i : args["instances"]) {
                     if (!i.is_object() || !i.contains("type") || !i["type"].is_string())
                       return unexpected(invalid_parameter("each instance needs a string 'type'"));
                     if (i["type"] != "vm")
                       return unexpected(invalid_parameter("instance type '" + i["type"].get<std::string>() +
                                                           "' is not yankable (only 'vm')"));
                     if (!i.contains("name") || !i["name"].is_string())
                       return unexpected(invalid_parameter("a 'vm' instance needs a string 'name'"));
                     const auto n = i["name"].get<std::string>();
                     if (!D->server.find(n)) return unexpected(no_vm(n));
                     names.push_back(n);
                   }
                   for (const auto& n : names) D->server.yank(n);
                   return json::object();
                 }, "tear down hung VM sessions at once"});
}

// ---------------------------------------------------------------------------

AdminServer::AdminServer(const AdminDispatcher& d, std::string version)
    : dispatcher_(d), version_(std::move(version)), wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

AdminServer::~AdminServer() { stop(); }

Expected<void, std::string> AdminServer::start(const std::string& path, unsigned mode) {
  auto fd = listen_unix(path, mode);
  if (!fd) return unexpected(fd.error());
  unlink_on_stop_ = true;
  return start_fd(std::move(*fd), path);
}

Expected<void, std::string> AdminServer::start_fd(UniqueFd listener, std::string path) {
  listener_ = std::move(listener);
  path_ = std::move(path);
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "fph-admin");
    loop();
  });
  return {};
}

void AdminServer::stop() {
  if (!thread_.joinable()) return;
  uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof one);
  thread_.join();
  if (unlink_on_stop_) ::unlink(path_.c_str());
}

namespace {

bool send_line(int fd, const json& j) {
  const std::string s = j.dump() + "\n";
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

void AdminServer::loop() {
  struct Client {
    UniqueFd fd;
    std::string buf;
  };
  std::vector<Client> clients;
  for (;;) {
    std::vector<pollfd> fds = {{wake_.get(), POLLIN, 0}, {listener_.get(), POLLIN, 0}};
    for (const auto& c : clients) fds.push_back({c.fd.get(), POLLIN, 0});
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      log::error("admin", "poll: {}", std::strerror(errno));
      return;
    }
    if (fds[0].revents) return;
    std::vector<bool> drop(clients.size(), false);
    for (size_t i = 0; i < clients.size(); ++i) {
      if (!fds[i + 2].revents) continue;
      Client& c = clients[i];
      char chunk[4096];
      ssize_t n = ::recv(c.fd.get(), chunk, sizeof chunk, MSG_DONTWAIT);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) {
        drop[i] = true;
        continue;
      }
      c.buf.append(chunk, static_cast<size_t>(n));
      size_t pos;
      while (!drop[i] && (pos = c.buf.find('\n')) != std::string::npos) {
        std::string line = c.buf.substr(0, pos);
        c.buf.erase(0, pos + 1);
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        json reply = dispatcher_.handle_line(line);
        if (reply.contains("error"))
          log::info("admin", "request refused: {}: {}", reply["error"]["class"].get<std::string>(),
                    reply["error"]["desc"].get<std::string>());
        if (!send_line(c.fd.get(), reply)) drop[i] = true;
      }
      if (c.buf.size() > kMaxLine) {
        (void)send_line(c.fd.get(), admin_error({"ParseError", "request line longer than 64 KiB"}));
        drop[i] = true;
      }
    }
    for (size_t i = clients.size(); i-- > 0;)
      if (drop[i]) clients.erase(clients.begin() + static_cast<long>(i));
    if (fds[1].revents & POLLIN) {
      UniqueFd c(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!c) continue;
      // A client that stops reading must not stall the admin thread.
      timeval tv{5, 0};
      ::setsockopt(c.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
      if (clients.size() >= 64 || !send_line(c.get(), admin_greeting(version_))) continue;
      clients.push_back({std::move(c), {}});
    }
  }
}

}  // namespace fph::daemon
