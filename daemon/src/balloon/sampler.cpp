#include "fph/daemon/sampler.h"

#include <pthread.h>
#include <sys/stat.h>

#include <set>
#include <utility>

#include "fph/common/log.h"
#include "fph/reclaim/discard.h"

namespace fph::daemon {

namespace balloon = proto::balloon;

ReclaimStatus reclaim_status(const SessionInfo& i, uint64_t misaligned_bytes,
                             uint64_t discarded_bytes) {
  ReclaimStatus st;
  if (!i.features_set) return st;
  auto disabled = [&](DisabledReason r) {
    st.state = ReclaimState::Disabled;
    st.reason = r;
    return st;
  };
  if (!(i.features & balloon::kFReporting)) return disabled(DisabledReason::NoReporting);
  if ((i.features & balloon::kFPagePoison) && i.poison_val != 0) return disabled(DisabledReason::Poison);
  if (i.max_page_size > kReportBlockBytes || (misaligned_bytes > 0 && discarded_bytes == 0))
    return disabled(DisabledReason::MisalignedBacking);
  if (i.paused) {
    st.state = ReclaimState::Paused;
    return st;
  }
  if (i.reporting_live) st.state = ReclaimState::Active;
  else if (i.reporting_ever_started) st.state = ReclaimState::Migrating;
  return st;
}

uint64_t table_resident_bytes(const MemoryTable& t) {
  std::set<std::pair<dev_t, ino_t>> seen;
  uint64_t total = 0;
  for (const auto& r : t.regions()) {
    struct stat st {};
    if (::fstat(r->fd.get(), &st) != 0) continue;
    if (!seen.insert({st.st_dev, st.st_ino}).second) continue;
    total += static_cast<uint64_t>(st.st_blocks) * 512;
  }
  return total;
}

void sample_session(Session& s) {
  auto& vm = s.metrics();
  const SessionInfo info = s.info();
  const auto st = reclaim_status(info, vm.misaligned_bytes(), vm.discarded_bytes());
  vm.set_reclaim_state(st.state, st.reason);
  vm.set_features(info.features);
  vm.set_balloon(uint64_t{info.num_pages} << balloon::kPfnShift, uint64_t{info.actual} << balloon::kPfnShift);
  const uint64_t resident = table_resident_bytes(*s.table());
  vm.set_resident(resident);
  // Refault backoff (refault_backoff.h) judges the VM once per sample, on
  // what came back within its window of the discard.
  auto& bo = s.backoff();
  uint64_t recent = 0;
  const uint64_t back = s.refaults().sample(RefaultTracker::Clock::now(), bo.window(), &recent);
  vm.refaulted(back);
  const bool hold_started = bo.refaulted(recent);
  const auto snap = bo.snapshot();
  if (hold_started)
    log::info("backoff", "vm={} refaults {:.0f}% of what was discarded: holding discards off for {:.0f} s "
              "(hold {})", info.name, snap.trigger_share * 100, snap.hold_left_seconds, snap.holds);
  vm.set_backoff(snap.state == RefaultBackoff::State::Holding, snap.holds, snap.share);
  // Headroom, once the guest has told us what it has free (stats queue).
  if (auto gs = s.stats().latest()) {
    if (auto free = gs->stats.get(balloon::StatTag::MemFree))
      vm.set_unreported_free(unreported_free_bytes(*free, info.memory_bytes, resident));
  }
}

void Sampler::sample_once(const std::vector<std::shared_ptr<Session>>& sessions) {
  if (nodes_) nodes_->sample();
  const auto now = std::chrono::steady_clock::now();
  for (const auto& s : sessions) {
    if (!s) continue;
    sample_session(*s);
    s->sampler_mark() = {true, s->activity(), now};
  }
}

size_t Sampler::sample_due(const std::vector<std::shared_ptr<Session>>& sessions,
                           std::chrono::steady_clock::time_point now) {
  if (nodes_) nodes_->sample();
  size_t visited = 0;
  for (const auto& s : sessions) {
    if (!s) continue;
    // A VM that took no request since its last visit and is not in refault
    // backoff is visited every kIdleSampleInterval: on a host of 1024 idle
    // VMs the per-VM work (a few microseconds each) was half of fphd's idle
    // CPU. Its gauges (resident, headroom) are then up to that old.
    auto& mark = s->sampler_mark();
    const uint64_t act = s->activity();
    const bool busy = !mark.sampled || act != mark.activity || !s->backoff().normal();
    if (!busy && now - mark.at < kIdleSampleInterval) continue;
    sample_session(*s);
    mark = {true, act, now};
    ++visited;
  }
  return visited;
}

void Sampler::start(Source source) {
  thread_ = std::thread([this, source = std::move(source)] {
    pthread_setname_np(pthread_self(), "fph-sampler");
    std::unique_lock lk(mu_);
    while (!stop_) {
      lk.unlock();
      sample_due(source(), std::chrono::steady_clock::now());
      // After a scrape or closed sessions (heap_trim.h).
      heap_trim_.run(metrics_.heap_bursts(), metrics_.last_heap_burst(), std::chrono::steady_clock::now());
      lk.lock();
      cv_.wait_for(lk, interval_, [&] { return stop_; });
    }
  });
}

void Sampler::stop() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

}  // namespace fph::daemon
