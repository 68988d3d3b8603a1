#include "fph/daemon/config.h"

#include <fmt/format.h>

#include <fstream>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "fph/common/log.h"

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
                                "pressure_psi_some_avg10", "node"});
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
