// Per-node discard policy (DESIGN section 4, last paragraph): lazy where the
// node has headroom and the backing allows it, eager under pressure.
#include "fph/reclaim/policy.h"

#include <charconv>
#include <cstdlib>
#include <fstream>
#include <string>
#include <string_view>

namespace fph::reclaim {
namespace {

// Value after `key` on a meminfo line, in kB, or false. Lines look like
// "Node 0 MemFree:  123456 kB" (sysfs) or "MemFree:  123456 kB" (/proc).
bool parse_kb(std::string_view line, std::string_view key, uint64_t* kb) {
  const auto pos = line.find(key);
  if (pos == std::string_view::npos) return false;
  line.remove_prefix(pos + key.size());
  while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
  uint64_t v = 0;
  const auto [p, ec] = std::from_chars(line.data(), line.data() + line.size(), v);
  if (ec != std::errc() || p == line.data()) return false;
  *kb = v;
  return true;
}

// Reads MemTotal/MemFree from a meminfo-style file. `prefix` is "Node N " for
// the sysfs file and empty for /proc/meminfo; it is matched at line start so
// that e.g. "HugePages_Free:" never passes for "MemFree:".
bool read_meminfo(const std::string& path, const std::string& prefix, NodeMemory* m) {
  std::ifstream in(path);
  if (!in) return false;
  bool have_total = false;
  bool have_free = false;
  std::string line;
  const std::string total_key = prefix + "MemTotal:";
  const std::string free_key = prefix + "MemFree:";
  while (std::getline(in, line)) {
    uint64_t kb = 0;
    if (line.rfind(total_key, 0) == 0 && parse_kb(line, total_key, &kb)) {
      m->total_bytes = kb * 1024;
      have_total = true;
    } else if (line.rfind(free_key, 0) == 0 && parse_kb(line, free_key, &kb)) {
      m->free_bytes = kb * 1024;
      have_free = true;
    }
  }
  return have_total && have_free;
}

// System-wide PSI, "some avg10=" (Documentation/accounting/psi.rst). Absent on
// kernels without CONFIG_PSI or booted with psi=0: stays 0.
double read_psi_some_avg10() {
  std::ifstream in("/proc/pressure/memory");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("some ", 0) != 0) continue;
    const auto pos = line.find("avg10=");
    if (pos == std::string::npos) return 0.0;
    return std::strtod(line.c_str() + pos + 6, nullptr);
  }
  return 0.0;
}

}  // namespace

NodeMemory SysfsNodeMemoryProbe::read(int os_node) {
  NodeMemory m;
  const std::string prefix = "Node " + std::to_string(os_node) + " ";
  const std::string node_file =
      "/sys/devices/system/node/node" + std::to_string(os_node) + "/meminfo";
  // No node directory (kernel without CONFIG_NUMA, or a synthetic topology's
  // made-up node): the whole machine is the best estimate we have.
  m.valid = read_meminfo(node_file, prefix, &m) || read_meminfo("/proc/meminfo", "", &m);
  m.psi_some_avg10 = read_psi_some_avg10();
  return m;
}

bool under_pressure(const NodePolicy& p, const NodeMemory& m) {
  if (!m.valid) return false;
  if (m.total_bytes != 0 &&
      static_cast<double>(m.free_bytes) <
          p.pressure_free_fraction * static_cast<double>(m.total_bytes)) {
    return true;
  }
  return m.psi_some_avg10 > p.pressure_psi_some_avg10;
}

PolicyTable::PolicyTable(int nodes, NodePolicy defaults)
    : nodes_(static_cast<size_t>(nodes > 0 ? nodes : 0), defaults), defaults_(defaults) {}

NodePolicy PolicyTable::get(int node) const {
  std::lock_guard lk(mu_);
  if (node < 0 || static_cast<size_t>(node) >= nodes_.size()) return defaults_;
  return nodes_[static_cast<size_t>(node)];
}

void PolicyTable::set(int node, const NodePolicy& p) {
  std::lock_guard lk(mu_);
  if (node < 0 || static_cast<size_t>(node) >= nodes_.size()) return;
  nodes_[static_cast<size_t>(node)] = p;
}

int PolicyTable::node_count() const {
  std::lock_guard lk(mu_);
  return static_cast<int>(nodes_.size());
}

Method PolicyTable::choose(Backing b, int node, const NodeMemory& m,
                           std::optional<PrivateMode> mode) const {
  const NodePolicy p = get(node);
  bool lazy = false;
  switch (mode.value_or(p.mode)) {
    case PrivateMode::Eager: lazy = false; break;
    case PrivateMode::Lazy: lazy = true; break;
    // Unknown memory state (probe failed) counts as headroom: MADV_FREE still
    // frees the pages as soon as the host needs them.
    case PrivateMode::Auto: lazy = !under_pressure(p, m); break;
  }
  // Shared backings have no lazy primitive; method_for ignores `lazy` there.
  return method_for(b, lazy, p.prefer_madvise);
}

}  // namespace fph::reclaim
