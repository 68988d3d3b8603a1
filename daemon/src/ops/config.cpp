#include "fph/daemon/config.h"

#include <fmt/format.h>

#include <algorithm>

#include <fstream>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "fph/common/log.h"
#include "fph/common/size.h"

namespace fph::daemon {

reclaim::NodePolicy PolicyConfig::for_node(int n) const {
  reclaim::NodePolicy p = defaults;
  if (auto it = nodes.find(n); it != nodes.end()) {
    if (it->second.mode) p.mode = *it->second.mode;
    if (it->second.rate_limit) p.rate_limit_bytes_per_sec = *it->second.rate_limit;
  }
  return p;
}

namespace {

struct Err {
  std::string msg;
};

class Parser {
 public:
  explicit Parser(std::string source) : source_(std::move(source)) {}

  [[noreturn]] void fail(const toml::node& n, const std::string& key, const std::string& what) const {
    throw Err{fmt::format("{}:{}: {}: {}", source_, n.source().begin.line, key, what)};
  }

  void only_keys(const toml::table& t, const std::string& prefix, const std::set<std::string>& allowed) const {
    for (const auto& [k, v] : t) {
      const std::string key(k.str());
      if (!allowed.count(key)) {
        std::string list;
        for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
        fail(v, prefix + key, "unknown key (expected one of: " + list + ")");
      }
    }
  }

  std::string str(const toml::node& n, const std::string& key) const {
    if (auto v = n.value<std::string>(); n.is_string() && v) return *v;
    fail(n, key, "must be a string");
  }
  int64_t integer(const toml::node& n, const std::string& key, int64_t lo, int64_t hi) const {
    if (!n.is_integer()) fail(n, key, "must be an integer");
    const int64_t v = *n.value<int64_t>();
    if (v < lo || v > hi) fail(n, key, fmt::format("{} is out of range [{}, {}]", v, lo, hi));
    return v;
  }
  double number(const toml::node& n, const std::string& key, double lo, double hi) const {
    if (!n.is_number()) fail(n, key, "must be a number");
    const double v = *n.value<double>();
    if (!(v >= lo && v <= hi)) fail(n, key, fmt::format("{} is out of range [{}, {}]", v, lo, hi));
    return v;
  }
  bool boolean(const toml::node& n, const std::string& key) const {
    if (!n.is_boolean()) fail(n, key, "must be true or false");
    return *n.value<bool>();
  }
  reclaim::PrivateMode mode(const toml::node& n, const std::string& key) const {
    const std::string s = str(n, key);
    if (s == "auto") return reclaim::PrivateMode::Auto;
    if (s == "eager") return reclaim::PrivateMode::Eager;
    if (s == "lazy") return reclaim::PrivateMode::Lazy;
    fail(n, key, "'" + s + "' is not one of eager, lazy, auto");
  }
  // Bytes: an integer, or a string with a binary unit ("64M", "2GiB").
  uint64_t bytes(const toml::node& n, const std::string& key, uint64_t lo, uint64_t hi) const {
    uint64_t v = 0;
    if (n.is_integer()) {
      const int64_t i = *n.value<int64_t>();
      if (i < 0) fail(n, key, fmt::format("{} is negative", i));
      v = static_cast<uint64_t>(i);
    } else if (n.is_string()) {
      auto r = parse_size(*n.value<std::string>());
      if (!r) fail(n, key, r.error());
      v = *r;
    } else {
      fail(n, key, "must be a size: bytes, or a string like \"64M\"");
    }
    if (v < lo || v > hi) fail(n, key, fmt::format("{} is out of range [{}, {}]", v, lo, hi));
    return v;
  }
  VmPolicySettings vm_settings(const toml::table& t, const std::string& key) const {
    only_keys(t, key + ".", {"rate_limit", "min_block", "mode", "paused", "backoff"});
    VmPolicySettings s;
    if (const auto* n = t.get("rate_limit")) s.rate_limit = bytes(*n, key + ".rate_limit", 0, INT64_MAX);
    if (const auto* n = t.get("min_block")) {
      s.min_block = bytes(*n, key + ".min_block", 0, kMaxMinBlock);
      if (*s.min_block % 4096 != 0) fail(*n, key + ".min_block", fmt::format("{} is not a multiple of 4096", *s.min_block));
    }
    if (const auto* n = t.get("mode")) s.mode = mode(*n, key + ".mode");
    if (const auto* n = t.get("paused")) s.paused = boolean(*n, key + ".paused");
    if (const auto* n = t.get("backoff")) s.backoff = boolean(*n, key + ".backoff");
    return s;
  }
  BackoffConfig backoff(const toml::node& node) const {
    const auto* t = node.as_table();
    if (!t) fail(node, "policy.backoff", "must be a table");
    only_keys(*t, "policy.backoff.", {"enabled", "threshold", "window_seconds", "min_discarded", "hold_seconds",
                                      "max_hold_seconds"});
    BackoffConfig b;
    if (const auto* n = t->get("enabled")) b.enabled = boolean(*n, "policy.backoff.enabled");
    if (const auto* n = t->get("threshold")) b.threshold = number(*n, "policy.backoff.threshold", 0.01, 1.0);
    if (const auto* n = t->get("window_seconds"))
      b.window = std::chrono::seconds(integer(*n, "policy.backoff.window_seconds", 1, RefaultBackoff::kMaxWindow));
    if (const auto* n = t->get("min_discarded")) b.min_discarded = bytes(*n, "policy.backoff.min_discarded", 0, INT64_MAX);
    if (const auto* n = t->get("hold_seconds")) b.hold = std::chrono::seconds(integer(*n, "policy.backoff.hold_seconds", 1, 86400));
    if (const auto* n = t->get("max_hold_seconds"))
      b.max_hold = std::chrono::seconds(integer(*n, "policy.backoff.max_hold_seconds", 1, 86400));
    if (b.max_hold < b.hold)
      fail(node, "policy.backoff.max_hold_seconds",
           fmt::format("{} is less than hold_seconds ({})", b.max_hold.count(), b.hold.count()));
    return b;
  }
  std::vector<NamedPath> named_paths(const toml::node& n, const std::string& key) const {
    const auto* arr = n.as_array();
    if (!arr) fail(n, key, "must be an array of tables: [[" + key + "]] name = \"...\" path = \"...\"");
    std::vector<NamedPath> out;
    for (size_t i = 0; i < arr->size(); ++i) {
      const auto& e = (*arr)[i];
      const std::string k = fmt::format("{}[{}]", key, i);
      const auto* t = e.as_table();
      if (!t) fail(e, k, "must be a table with name and path");
      only_keys(*t, k + ".", {"name", "path"});
      const auto* name = t->get("name");
      const auto* path = t->get("path");
      if (!name) fail(e, k + ".name", "missing");
      if (!path) fail(e, k + ".path", "missing");
      NamedPath np{str(*name, k + ".name"), str(*path, k + ".path")};
      if (np.name.empty()) fail(*name, k + ".name", "must not be empty");
      if (np.path.empty()) fail(*path, k + ".path", "must not be empty");
      out.push_back(np);
    }
    return out;
  }

  FphdConfig parse(const toml::table& root) const {
    FphdConfig c;
    only_keys(root, "", {"daemon", "vm", "attach", "policy"});
    if (const auto* d = root.get("daemon")) {
      const auto* t = d->as_table();
      if (!t) fail(*d, "daemon", "must be a table");
      only_keys(*t, "daemon.", {"listen", "admin_socket", "socket_mode", "metrics", "log_level",
                                "threads_per_node", "stall_limit_seconds", "stats_interval_seconds",
                                "discard_while_logging", "synthetic_topology", "state_dir"});
      if (const auto* n = t->get("listen")) {
        const auto* arr = n->as_array();
        if (!arr) fail(*n, "daemon.listen", "must be an array of socket paths");
        for (size_t i = 0; i < arr->size(); ++i) c.listen.push_back(str((*arr)[i], fmt::format("daemon.listen[{}]", i)));
      }
      if (const auto* n = t->get("admin_socket")) c.admin_socket = str(*n, "daemon.admin_socket");
      if (const auto* n = t->get("socket_mode")) {
        const std::string s = str(*n, "daemon.socket_mode");
        char* end = nullptr;
        const unsigned long m = std::strtoul(s.c_str(), &end, 8);
        if (s.empty() || *end != '\0' || m > 0777) fail(*n, "daemon.socket_mode", "'" + s + "' is not an octal mode like \"0660\"");
        c.socket_mode = static_cast<unsigned>(m);
      }
      if (const auto* n = t->get("metrics")) c.metrics = str(*n, "daemon.metrics");
      if (const auto* n = t->get("log_level")) {
        c.log_level = str(*n, "daemon.log_level");
        log::Level l;
        if (!log::parse_level(c.log_level, &l)) fail(*n, "daemon.log_level", "'" + c.log_level + "' is not one of debug, info, warn, error");
      }
      if (const auto* n = t->get("threads_per_node")) c.threads_per_node = static_cast<int>(integer(*n, "daemon.threads_per_node", 0, 1024));
      if (const auto* n = t->get("stall_limit_seconds"))
        c.stall_limit_seconds = static_cast<int>(integer(*n, "daemon.stall_limit_seconds", 0, 86400));
      if (const auto* n = t->get("stats_interval_seconds"))
        c.stats_interval_seconds = static_cast<int>(integer(*n, "daemon.stats_interval_seconds", 0, 86400));
      if (const auto* n = t->get("discard_while_logging"))
        c.discard_while_logging = boolean(*n, "daemon.discard_while_logging");
      if (const auto* n = t->get("synthetic_topology")) c.synthetic_topology = str(*n, "daemon.synthetic_topology");
      if (const auto* n = t->get("state_dir")) {
        c.state_dir = str(*n, "daemon.state_dir");
        if (!c.state_dir.empty() && c.state_dir[0] != '/')
          fail(*n, "daemon.state_dir", "'" + c.state_dir + "' is not an absolute path");
      }
    }
    if (const auto* n = root.get("vm")) c.vms = named_paths(*n, "vm");
    if (const auto* n = root.get("attach")) c.attach = named_paths(*n, "attach");
    if (const auto* p = root.get("policy")) {
      const auto* t = p->as_table();
      if (!t) fail(*p, "policy", "must be a table");
      only_keys(*t, "policy.", {"mode", "rate_limit", "prefer_madvise", "pressure_free_fraction",
                                "pressure_psi_some_avg10", "node", "vm", "backoff"});
      auto& d = c.policy.defaults;
      if (const auto* n = t->get("mode")) d.mode = mode(*n, "policy.mode");
      if (const auto* n = t->get("rate_limit")) d.rate_limit_bytes_per_sec = static_cast<uint64_t>(integer(*n, "policy.rate_limit", 0, INT64_MAX));
      if (const auto* n = t->get("prefer_madvise")) d.prefer_madvise = boolean(*n, "policy.prefer_madvise");
      if (const auto* n = t->get("pressure_free_fraction")) d.pressure_free_fraction = number(*n, "policy.pressure_free_fraction", 0.0, 1.0);
      if (const auto* n = t->get("pressure_psi_some_avg10")) d.pressure_psi_some_avg10 = number(*n, "policy.pressure_psi_some_avg10", 0.0, 100.0);
      if (const auto* nn = t->get("node")) {
        const auto* nt = nn->as_table();
        if (!nt) fail(*nn, "policy.node", "must be a table of [policy.node.N] tables");
        for (const auto& [k, v] : *nt) {
          const std::string key = "policy.node." + std::string(k.str());
          char* end = nullptr;
          const std::string ks(k.str());
          const long idx = std::strtol(ks.c_str(), &end, 10);
          if (ks.empty() || *end != '\0' || idx < 0 || idx > 4096) fail(v, key, "the node must be a node index (0, 1, ...)");
          const auto* vt = v.as_table();
          if (!vt) fail(v, key, "must be a table");
          only_keys(*vt, key + ".", {"mode", "rate_limit"});
          NodePolicyOverride o;
          if (const auto* n = vt->get("mode")) o.mode = mode(*n, key + ".mode");
          if (const auto* n = vt->get("rate_limit")) o.rate_limit = static_cast<uint64_t>(integer(*n, key + ".rate_limit", 0, INT64_MAX));
          c.policy.nodes[static_cast<int>(idx)] = o;
        }
      }
      if (const auto* n = t->get("backoff")) c.policy.backoff = backoff(*n);
      if (const auto* vn = t->get("vm")) {
        const auto* vt = vn->as_table();
        if (!vt) fail(*vn, "policy.vm", "must be a table of [policy.vm.\"NAME\"] tables (NAME may be a glob: \"db-*\")");
        for (const auto& [k, v] : *vt) {
          const std::string pattern(k.str());
          const std::string key = "policy.vm.\"" + pattern + "\"";
          if (pattern.empty()) fail(v, key, "the VM name or pattern must not be empty");
          const auto* t2 = v.as_table();
          if (!t2) fail(v, key, "must be a table");
          c.policy.vms.push_back({pattern, vm_settings(*t2, key)});
        }
        // toml++ keeps a table's keys sorted, not in file order: order the
        // rules by where they were written (equal specificity: later wins).
        std::stable_sort(c.policy.vms.begin(), c.policy.vms.end(), [&](const auto& a, const auto& b) {
          return vt->get(a.pattern)->source().begin.line < vt->get(b.pattern)->source().begin.line;
        });
      }
    }
    return c;
  }

 private:
  std::string source_;
};

}  // namespace

Expected<FphdConfig, std::string> parse_config(std::string_view text, const std::string& source) {
  try {
    toml::table root = toml::parse(text, source);
    return Parser(source).parse(root);
  } catch (const toml::parse_error& e) {
    return unexpected(fmt::format("{}:{}: {}", source, e.source().begin.line, e.description()));
  } catch (const Err& e) {
    return unexpected(e.msg);
  }
}

Expected<FphdConfig, std::string> load_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) return unexpected(path + ": cannot open: " + std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_config(ss.str(), path);
}

}  // namespace fph::daemon
