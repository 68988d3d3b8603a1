// fphctl: the command line client of fphd's admin socket.
//
// Exit codes (scripts rely on them):
//   0  success
//   1  the daemon refused the command (its error class and description are printed)
//   2  usage error (bad command line)
//   3  cannot connect to the admin socket (or no greeting)
//   4  the connection failed or the reply was malformed after connecting
#include <CLI/CLI.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <map>
#include <sstream>
#include <thread>
#include <tuple>
#include <vector>

#include "client.h"
#include "fph/common/size.h"

using nlohmann::json;

namespace {

constexpr int kOk = 0, kDaemonError = 1, kUsage = 2, kNoConnect = 3, kTransport = 4;

std::string human_bytes(const json& v) {
  if (!v.is_number()) return "-";
  double b = v.get<double>();
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  char s[32];
  std::snprintf(s, sizeof s, u ? "%.1f %s" : "%.0f %s", b, units[u]);
  return s;
}

std::string str(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "-";
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "no";
  return v.dump();
}

void table(const std::vector<std::string>& head, const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> w(head.size());
  for (size_t i = 0; i < head.size(); ++i) w[i] = head[i].size();
  for (const auto& r : rows)
    for (size_t i = 0; i < r.size() && i < w.size(); ++i) w[i] = std::max(w[i], r[i].size());
  auto line = [&](const std::vector<std::string>& r) {
    std::string s;
    for (size_t i = 0; i < r.size(); ++i) {
      s += r[i];
      if (i + 1 < r.size()) s += std::string(w[i] - r[i].size() + 2, ' ');
    }
    std::cout << s << "\n";
  };
  line(head);
  for (const auto& r : rows) line(r);
}

// The balloon as ACTUAL/TARGET ("-" when no target was ever set and the
// driver holds nothing).
std::string balloon(const json& b) {
  if (!b.is_object()) return "-";
  const uint64_t target = b.value("target", 0ull), actual = b.value("actual", 0ull);
  if (target == 0 && actual == 0) return "-";
  return human_bytes(json(actual)) + "/" + human_bytes(json(target));
}

// A VM's refault backoff: off, normal, probing, or holding with the time left.
std::string backoff(const json& b) {
  if (!b.is_object()) return "-";
  if (!b.value("enabled", true)) return "off";
  const std::string st = b.value("state", "-");
  if (st == "holding") {
    char buf[48];
    std::snprintf(buf, sizeof buf, "holding %.0fs", b.value("hold-left-seconds", 0.0));
    return buf;
  }
  return st;
}

// The VM's own policy, only what differs from the node's ("-": none).
std::string vm_policy(const json& p) {
  if (!p.is_object()) return "-";
  std::string out;
  auto add = [&](const std::string& s) { out += (out.empty() ? "" : ",") + s; };
  if (p.value("rate-limit", 0ull)) add("rate=" + human_bytes(p["rate-limit"]) + "/s");
  if (p.value("min-block", 0ull)) add("min=" + human_bytes(p["min-block"]));
  if (p.contains("mode") && p["mode"].is_string()) add("mode=" + p["mode"].get<std::string>());
  return out.empty() ? "-" : out;
}

void print_human(const std::string& cmd, const json& ret) {
  if (cmd == "query-sessions") {
    std::vector<std::vector<std::string>> rows;
    for (const auto& s : ret) {
      std::string feats;
      for (const auto& f : s.value("feature-names", json::array())) feats += (feats.empty() ? "" : ",") + f.get<std::string>();
      // What the guest says is free (stats queue); UNREPORTED is the
      // headroom, the part of it whose backing the host still holds ("-": no
      // stats from this guest; the column keeps its name for scripts). Reported, reclaimed (kernel-verified) and refaulted bytes are
      // cumulative, the same counters as fphd's metrics.
      const json gs = s.value("guest-stats", json());
      const json gfree = gs.is_object() ? gs["values"].value("memfree", json()) : json();
      rows.push_back({str(s["name"]), str(s["state"]), str(s["regions"]), human_bytes(s["memory"]),
                      human_bytes(s.value("reported-bytes", json())), human_bytes(s.value("reclaimed-bytes", json())),
                      human_bytes(s.value("refaulted-bytes", json())), human_bytes(s.value("headroom-bytes", json())),
                      human_bytes(gfree), str(s["counters"]["inflight"]), str(s["counters"]["requests"]),
                      str(s["paused"]), backoff(s.value("backoff", json())), vm_policy(s.value("policy", json())),
                      balloon(s.value("balloon", json())), feats});
    }
    if (rows.empty()) std::cout << "no sessions\n";
    else table({"NAME", "STATE", "REGIONS", "MEMORY", "REPORTED", "RECLAIMED", "REFAULTED", "UNREPORTED", "GUEST-FREE",
                "INFLIGHT", "REQUESTS", "PAUSED", "BACKOFF", "POLICY", "BALLOON", "FEATURES"}, rows);
  } else if (cmd == "query-nodes") {
    std::vector<std::vector<std::string>> rows;
    for (const auto& n : ret) {
      const auto& p = n["policy"];
      const uint64_t rate = p.value("rate-limit", 0ull);
      rows.push_back({str(n["node"]), str(n["os-node"]), std::to_string(n["cpus"].size()),
                      human_bytes(n["total"]), human_bytes(n["free"]), str(n["pressure"]), str(p["mode"]),
                      rate ? human_bytes(rate) + "/s" : "unlimited", human_bytes(n["counters"]["discarded"])});
    }
    table({"NODE", "OS", "CPUS", "TOTAL", "FREE", "PRESSURE", "MODE", "RATE-LIMIT", "DISCARDED"}, rows);
  } else if (cmd == "query-migration") {
    std::vector<std::vector<std::string>> rows;
    for (const auto& m : ret)
      rows.push_back({str(m["name"]), str(m["state"]), str(m["log-all"]), human_bytes(m["log-bytes"]),
                      str(m["pages-marked"]), str(m["discard-while-logging"]), str(m["epoch"]),
                      human_bytes(m["state-bytes-sent"]), human_bytes(m["state-bytes-received"]),
                      m.value("last-error", "").empty() ? "-" : str(m["last-error"])});
    if (rows.empty()) std::cout << "no sessions\n";
    else table({"NAME", "STATE", "LOG-ALL", "LOG", "MARKED", "DISCARD-WHILE-LOGGING", "EPOCH", "SENT", "RECEIVED",
                "LAST-ERROR"}, rows);
  } else if (cmd == "query-yank") {
    std::vector<std::vector<std::string>> rows;
    for (const auto& i : ret) rows.push_back({str(i["type"]), str(i["name"])});
    if (rows.empty()) std::cout << "nothing to yank\n";
    else table({"TYPE", "NAME"}, rows);
  } else if (ret.is_object() && !ret.empty()) {
    for (const auto& [k, v] : ret.items()) std::cout << k << ": " << (v.is_string() ? v.get<std::string>() : v.dump()) << "\n";
  } else if (!ret.is_object()) {
    std::cout << ret.dump(2) << "\n";
  }
}

volatile std::sig_atomic_t g_interrupted = 0;
extern "C" void on_sigint(int) { g_interrupted = 1; }

uint64_t counter(const json& s, const char* key) {
  const json v = s.value(key, json());
  return v.is_number_unsigned() || v.is_number_integer() ? v.get<uint64_t>() : 0;
}

// `fphctl top`: query-sessions every `interval` seconds; per VM the
// cumulative reclaimed and refaulted bytes, the headroom, and the rates over
// the last interval (difference of the cumulative counters / elapsed time).
// On a terminal the screen is cleared before each table; otherwise (a pipe,
// a file, `watch`) the tables follow each other, one per refresh.
int run_top(fph::ctl::AdminClient& client, double interval, int count, bool as_json) {
  struct sigaction sa {};
  sa.sa_handler = on_sigint;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  const bool tty = ::isatty(STDOUT_FILENO) == 1;
  struct Prev {
    uint64_t reclaimed, refaulted;
  };
  std::map<std::string, Prev> prev;
  auto prev_at = std::chrono::steady_clock::now();
  for (int n = 0; !g_interrupted && (count <= 0 || n < count); ++n) {
    if (n > 0) {
      // Sleep in short steps so SIGINT ends it at once.
      const auto until = prev_at + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                       std::chrono::duration<double>(interval));
      while (!g_interrupted && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
            until - std::chrono::steady_clock::now(), std::chrono::milliseconds(100)));
      if (g_interrupted) break;
    }
    auto reply = client.execute("query-sessions");
    if (!reply) {
      if (g_interrupted) break;
      std::cerr << "fphctl: " << reply.error() << "\n";
      return kTransport;
    }
    if (reply->contains("error")) {
      const auto& e = (*reply)["error"];
      std::cerr << "fphctl: query-sessions: " << e.value("class", "?") << ": " << e.value("desc", "?") << "\n";
      return kDaemonError;
    }
    if (!reply->contains("return") || !(*reply)["return"].is_array()) {
      std::cerr << "fphctl: malformed reply: " << reply->dump() << "\n";
      return kTransport;
    }
    const auto now = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(now - prev_at).count();
    std::vector<json> vms((*reply)["return"].begin(), (*reply)["return"].end());
    std::map<std::string, Prev> cur;
    for (auto& s : vms) {
      const std::string name = s.value("name", "");
      const Prev c{counter(s, "reclaimed-bytes"), counter(s, "refaulted-bytes")};
      cur[name] = c;
      auto p = prev.find(name);
      // No rate on the first refresh, for a new VM, or if its counters went
      // back (its series were dropped and created again).
      if (n > 0 && dt > 0 && p != prev.end() && c.reclaimed >= p->second.reclaimed &&
          c.refaulted >= p->second.refaulted) {
        s["reclaim-rate"] = static_cast<double>(c.reclaimed - p->second.reclaimed) / dt;
        s["refault-rate"] = static_cast<double>(c.refaulted - p->second.refaulted) / dt;
      } else {
        s["reclaim-rate"] = nullptr;
        s["refault-rate"] = nullptr;
      }
    }
    prev = std::move(cur);
    prev_at = now;
    std::stable_sort(vms.begin(), vms.end(), [](const json& a, const json& b) {
      return counter(a, "reclaimed-bytes") > counter(b, "reclaimed-bytes");
    });
    if (as_json) {
      json out = json::array();
      for (const auto& s : vms)
        out.push_back({{"name", s.value("name", "")}, {"state", s.value("state", json())},
                       {"memory", s.value("memory", json())}, {"reclaimed-bytes", s.value("reclaimed-bytes", json())},
                       {"refaulted-bytes", s.value("refaulted-bytes", json())},
                       {"headroom-bytes", s.value("headroom-bytes", json())},
                       {"reclaim-rate", s["reclaim-rate"]}, {"refault-rate", s["refault-rate"]},
                       {"backoff", s.value("backoff", json())}});
      std::cout << out.dump() << std::endl;
      continue;
    }
    if (tty) std::cout << "\x1b[H\x1b[2J";
    char head[160];
    const std::time_t t = std::time(nullptr);
    std::tm tm{};
    ::localtime_r(&t, &tm);
    char clock[16];
    std::strftime(clock, sizeof clock, "%H:%M:%S", &tm);
    std::snprintf(head, sizeof head, "fphctl top  %s  %zu VM%s  every %gs%s", clock, vms.size(),
                  vms.size() == 1 ? "" : "s", interval, tty && count <= 0 ? "  (Ctrl-C quits)" : "");
    std::cout << head << "\n";
    std::vector<std::vector<std::string>> rows;
    auto rate = [](const json& v) { return v.is_number() ? human_bytes(v) + "/s" : std::string("-"); };
    for (const auto& s : vms)
      rows.push_back({str(s["name"]), str(s.value("state", json())), human_bytes(s.value("memory", json())),
                      human_bytes(s.value("reclaimed-bytes", json())), rate(s["reclaim-rate"]),
                      human_bytes(s.value("refaulted-bytes", json())), rate(s["refault-rate"]),
                      human_bytes(s.value("headroom-bytes", json())), backoff(s.value("backoff", json()))});
    if (rows.empty()) std::cout << "no sessions\n";
    else table({"NAME", "STATE", "MEMORY", "RECLAIMED", "RECLAIM/S", "REFAULTED", "REFAULT/S", "UNREPORTED", "BACKOFF"},
               rows);
    if (!tty) std::cout << "\n";
    std::cout << std::flush;
  }
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fphctl: control a running fphd through its admin socket.\n"
               "Exit codes: 0 ok, 1 the daemon refused the command, 2 usage, 3 cannot connect, "
               "4 connection lost or bad reply."};
  const char* env = std::getenv("FPHD_ADMIN_SOCKET");
  std::string socket = env ? env : "/run/fphd/admin.sock";
  bool as_json = false;
  app.add_option("-s,--socket", socket, "Admin socket (default $FPHD_ADMIN_SOCKET or /run/fphd/admin.sock)")
      ->capture_default_str();
  app.add_flag("--json", as_json, "Print the daemon's reply as JSON (for scripts)");
  app.require_subcommand(1);

  std::string cmd;
  json args = json::object();
  std::string vm, name, path, mode, raw_cmd, raw_args;
  std::vector<std::string> vms;
  int node = -1;
  bool paused_flag = false, resumed_flag = false;

  auto* c_status = app.add_subcommand("status", "Daemon status (query-status)");
  auto* c_sessions = app.add_subcommand("sessions", "Connected VMs (query-sessions)");
  double top_interval = 2;
  int top_count = 0;
  auto* c_top = app.add_subcommand(
      "top", "Per VM, refreshed: reclaimed, refaulted, headroom and the reclaim rate over the last interval");
  c_top->add_option("-i,--interval", top_interval, "Seconds between refreshes")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 86400.0));
  c_top->add_option("-n,--count", top_count, "Exit after this many refreshes (default: until Ctrl-C)")
      ->check(CLI::PositiveNumber);
  auto* c_nodes = app.add_subcommand("nodes", "Host NUMA nodes: memory, pressure, policy (query-nodes)");
  auto* c_yankable = app.add_subcommand("yankable", "What can be yanked (query-yank)");
  auto* c_pause = app.add_subcommand("pause", "Pause reclaim for a VM");
  c_pause->add_option("vm", vm, "VM name")->required();
  auto* c_resume = app.add_subcommand("resume", "Resume reclaim for a VM");
  c_resume->add_option("vm", vm, "VM name")->required();
  auto* c_policy = app.add_subcommand(
      "set-policy", "Change a node's policy (mode, rate limit) or a VM's (mode, rate limit, minimum block, "
                    "paused, backoff; kept until the next reload)");
  auto* o_node = c_policy->add_option("--node", node, "Node index");
  auto* o_vm = c_policy->add_option("--vm", vm, "VM name");
  auto* o_mode = c_policy->add_option("--mode", mode, "eager, lazy or auto");
  std::string rate_s, min_block_s, backoff_s;
  auto* o_rate = c_policy->add_option("--rate-limit", rate_s,
                                      "Bytes per second the node (or VM) may discard, e.g. 256M (0: unlimited)");
  auto* o_min = c_policy->add_option("--min-block", min_block_s,
                                     "VM: reported blocks smaller than this are not discarded, e.g. 4M (0: any)");
  auto* o_backoff = c_policy->add_option("--backoff", backoff_s, "VM: refault backoff on or off")
                        ->check(CLI::IsMember({"on", "off"}));
  c_policy->add_flag("--paused", paused_flag, "Pause the VM's reclaim");
  c_policy->add_flag("--resumed", resumed_flag, "Resume the VM's reclaim");
  uint64_t pages = 0;
  auto* c_pages = app.add_subcommand("set-num-pages",
                                     "Set a VM's balloon target (config num_pages, 4 KiB pages); the driver is notified");
  c_pages->add_option("vm", vm, "VM name")->required();
  c_pages->add_option("pages", pages, "Target in 4 KiB pages (0: deflate fully)")->required();
  std::string balloon_size;
  auto* c_balloon = app.add_subcommand(
      "set-balloon", "Set a VM's balloon target: the guest gives that much memory back to the host (inflates) "
                     "or takes it back (deflates); e.g. set-balloon web1 2G, set-balloon web1 0");
  c_balloon->add_option("vm", vm, "VM name")->required();
  c_balloon->add_option("size", balloon_size, "Target: bytes or with K, M, G, T (binary), e.g. 512M; 0 deflates")
      ->required();
  auto* c_migration = app.add_subcommand("migration", "Live migration per VM: dirty log, state transfers, epoch (query-migration)");
  std::string while_logging;
  auto* c_migpol = app.add_subcommand("set-migration-policy",
                                      "While a VM is migrated: keep discarding (and log it) or hold discards");
  c_migpol->add_option("vm", vm, "VM name")->required();
  c_migpol->add_option("--while-logging", while_logging, "discard (default) or hold")
      ->required()
      ->check(CLI::IsMember({"discard", "hold"}));
  auto* c_rereport = app.add_subcommand("re-report", "Ask a VM to report all its free memory again (bumps its epoch)");
  c_rereport->add_option("vm", vm, "VM name")->required();
  auto* c_attach = app.add_subcommand("attach", "Connect to a front end's server socket");
  c_attach->add_option("name", name, "VM name")->required();
  c_attach->add_option("path", path, "The front end's socket")->required();
  auto* c_detach = app.add_subcommand("detach", "Stop an attach target");
  c_detach->add_option("name", name, "VM name")->required();
  auto* c_yank = app.add_subcommand("yank", "Tear down hung VM sessions at once");
  c_yank->add_option("vm", vms, "VM names")->required();
  auto* c_raw = app.add_subcommand("raw", "Run any admin command: raw COMMAND ['{json arguments}']");
  c_raw->add_option("command", raw_cmd, "Command name")->required();
  c_raw->add_option("arguments", raw_args, "Arguments as a JSON object");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? kOk : kUsage;
  }

  if (c_status->parsed()) cmd = "query-status";
  else if (c_sessions->parsed()) cmd = "query-sessions";
  else if (c_nodes->parsed()) cmd = "query-nodes";
  else if (c_yankable->parsed()) cmd = "query-yank";
  else if (c_pause->parsed()) cmd = "pause-reclaim", args = {{"vm", vm}};
  else if (c_resume->parsed()) cmd = "resume-reclaim", args = {{"vm", vm}};
  else if (c_pages->parsed()) cmd = "set-num-pages", args = {{"vm", vm}, {"pages", pages}};
  else if (c_balloon->parsed()) {
    auto bytes = fph::parse_size(balloon_size);
    if (!bytes) {
      std::cerr << "fphctl: set-balloon: " << bytes.error() << "\n";
      return kUsage;
    }
    cmd = "set-balloon", args = {{"vm", vm}, {"target", *bytes}};
  }
  else if (c_migration->parsed()) cmd = "query-migration";
  else if (c_rereport->parsed()) cmd = "re-report", args = {{"vm", vm}};
  else if (c_migpol->parsed())
    cmd = "set-migration-policy", args = {{"vm", vm}, {"discard-while-logging", while_logging == "discard"}};
  else if (c_attach->parsed()) cmd = "attach", args = {{"name", name}, {"path", path}};
  else if (c_detach->parsed()) cmd = "detach", args = {{"name", name}};
  else if (c_yank->parsed()) {
    cmd = "yank";
    json inst = json::array();
    for (const auto& v : vms) inst.push_back({{"type", "vm"}, {"name", v}});
    args = {{"instances", inst}};
  } else if (c_policy->parsed()) {
    cmd = "set-policy";
    if (o_node->count()) args["node"] = node;
    if (o_vm->count()) args["vm"] = vm;
    if (o_mode->count()) args["mode"] = mode;
    for (auto [opt, text, key] : {std::tuple{o_rate, &rate_s, "rate-limit"}, std::tuple{o_min, &min_block_s, "min-block"}}) {
      if (!opt->count()) continue;
      auto b = fph::parse_size(*text);
      if (!b) {
        std::cerr << "fphctl: set-policy: --" << key << ": " << b.error() << "\n";
        return kUsage;
      }
      args[key] = *b;
    }
    if (o_backoff->count()) args["backoff"] = backoff_s == "on";
    if (paused_flag && resumed_flag) {
      std::cerr << "fphctl: set-policy: --paused and --resumed exclude each other\n";
      return kUsage;
    }
    if (paused_flag) args["paused"] = true;
    if (resumed_flag) args["paused"] = false;
  } else if (c_raw->parsed()) {
    cmd = raw_cmd;
    if (!raw_args.empty()) {
      args = json::parse(raw_args, nullptr, false);
      if (args.is_discarded() || !args.is_object()) {
        std::cerr << "fphctl: raw: arguments must be a JSON object\n";
        return kUsage;
      }
    }
  }

  auto client = fph::ctl::AdminClient::connect(socket);
  if (!client) {
    std::cerr << "fphctl: " << client.error() << "\n";
    return kNoConnect;
  }
  if (c_top->parsed()) return run_top(*client, top_interval, top_count, as_json);
  auto reply = client->execute(cmd, args);
  if (!reply) {
    std::cerr << "fphctl: " << reply.error() << "\n";
    return kTransport;
  }
  if (reply->contains("error")) {
    const auto& e = (*reply)["error"];
    if (as_json) std::cout << e.dump() << "\n";
    std::cerr << "fphctl: " << cmd << ": " << e.value("class", "?") << ": " << e.value("desc", "?") << "\n";
    return kDaemonError;
  }
  if (!reply->contains("return")) {
    std::cerr << "fphctl: malformed reply: " << reply->dump() << "\n";
    return kTransport;
  }
  const json& ret = (*reply)["return"];
  if (as_json) std::cout << ret.dump() << "\n";
  else print_human(cmd, ret);
  return kOk;
}
