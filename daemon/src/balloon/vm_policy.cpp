#include "fph/daemon/vm_policy.h"

#include <fnmatch.h>

#include <algorithm>

namespace fph::daemon {

void VmPolicySettings::merge(const VmPolicySettings& o) {
  if (o.rate_limit) rate_limit = o.rate_limit;
  if (o.min_block) min_block = o.min_block;
  if (o.mode) mode = o.mode;
  if (o.paused) paused = o.paused;
  if (o.backoff) backoff = o.backoff;
}

namespace {

bool is_glob(const std::string& p) { return p.find_first_of("*?[") != std::string::npos; }

size_t literal_chars(const std::string& p) {
  return static_cast<size_t>(std::count_if(p.begin(), p.end(), [](char c) {
    return c != '*' && c != '?' && c != '[' && c != ']';
  }));
}

}  // namespace

VmPolicySettings match_rules(const std::vector<VmPolicyRule>& rules, const std::string& vm) {
  std::vector<const VmPolicyRule*> hits;
  const VmPolicyRule* exact = nullptr;
  for (const auto& r : rules) {
    if (!is_glob(r.pattern)) {
      if (r.pattern == vm) exact = &r;
    } else if (::fnmatch(r.pattern.c_str(), vm.c_str(), 0) == 0) {
      hits.push_back(&r);
    }
  }
  // Less specific first, so the more specific pattern's keys win; equal
  // specificity: file order (stable).
  std::stable_sort(hits.begin(), hits.end(), [](const VmPolicyRule* a, const VmPolicyRule* b) {
    return literal_chars(a->pattern) < literal_chars(b->pattern);
  });
  VmPolicySettings s;
  for (const auto* r : hits) s.merge(r->settings);
  if (exact) s.merge(exact->settings);
  return s;
}

void VmPolicyTable::set_rules(std::vector<VmPolicyRule> rules, BackoffConfig backoff) {
  std::lock_guard lk(mu_);
  rules_ = std::move(rules);
  backoff_ = backoff;
  overrides_.clear();
}

void VmPolicyTable::set_override(const std::string& vm, const VmPolicySettings& s) {
  std::lock_guard lk(mu_);
  overrides_[vm].merge(s);
}

VmPolicy VmPolicyTable::resolve(const std::string& vm) const {
  std::lock_guard lk(mu_);
  VmPolicySettings s = match_rules(rules_, vm);
  if (auto it = overrides_.find(vm); it != overrides_.end()) s.merge(it->second);
  VmPolicy p;
  p.rate_limit = s.rate_limit.value_or(0);
  p.min_block = s.min_block.value_or(0);
  p.mode = s.mode;
  p.paused = s.paused.value_or(false);
  p.backoff = s.backoff.value_or(backoff_.enabled);
  return p;
}

BackoffConfig VmPolicyTable::backoff_for(const VmPolicy& p) const {
  std::lock_guard lk(mu_);
  BackoffConfig c = backoff_;
  c.enabled = p.backoff;
  return c;
}

std::vector<VmPolicyRule> VmPolicyTable::rules() const {
  std::lock_guard lk(mu_);
  return rules_;
}

VmRateLimiter::Clock::time_point VmRateLimiter::reserve(uint64_t bytes, uint64_t rate,
                                                        Clock::time_point now) {
  if (rate == 0) return now;
  // One second of burst: a VM within a second's worth of its rate starts at once.
  constexpr auto kBurst = std::chrono::seconds(1);
  const auto cost = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(static_cast<double>(bytes) / static_cast<double>(rate)));
  if (tat_ < now) tat_ = now;
  const auto start = std::max(now, tat_ - kBurst);
  tat_ += cost;
  return start;
}

}  // namespace fph::daemon
