#include "fph/daemon/stats_service.h"

#include <cstring>
#include <vector>

#include "fph/common/log.h"
#include "fph/daemon/queue_service.h"
#include "fph/daemon/session.h"

namespace fph::daemon {

namespace vq = proto::vq;
namespace balloon = proto::balloon;

uint64_t unreported_free_bytes(uint64_t guest_free, uint64_t guest_memory, uint64_t resident) {
  const uint64_t unbacked = guest_memory > resident ? guest_memory - resident : 0;
  return guest_free > unbacked ? guest_free - unbacked : 0;
}

StatsVerdict check_stats_chain(const vq::Chain& chain, const MemoryTable& table) {
  StatsVerdict v;
  auto reject = [&](std::string reason, std::string error) {
    v.reason = std::move(reason);
    v.error = fmt::format("chain head {}: stats buffer rejected: {}", chain.head, error);
    return v;
  };
  // virtio 1.2 5.5.6.3: the driver supplies an output buffer (device
  // readable) holding the stats. Linux uses one buffer; a chain of several
  // readable ones is read as their concatenation.
  if (chain.total_len > balloon::kMaxStatsBytes)
    return reject("stats_buffer_too_long",
                  fmt::format("stats.length: {} bytes is more than {} entries of {} bytes",
                              chain.total_len, balloon::kMaxStatsEntries, balloon::kStatEntryBytes));
  std::vector<uint8_t> bytes;
  bytes.reserve(static_cast<size_t>(chain.total_len));
  for (size_t i = 0; i < chain.buffers.size(); ++i) {
    const auto& b = chain.buffers[i];
    if (b.device_writable)
      return reject("stats_buffer_writable",
                    fmt::format("buffers[{}].flags: the stats buffer [0x{:x}, +0x{:x}) is device-writable; "
                                "the driver must give a device-readable buffer",
                                i, b.gpa, b.len));
    if (b.len == 0) continue;
    const uint8_t* p = table.translate(b.gpa, b.len);
    if (!p)
      return reject("stats_buffer_unmapped",
                    fmt::format("buffers[{}].addr: [0x{:x}, +0x{:x}) is not inside one region of guest memory",
                                i, b.gpa, b.len));
    // Copied out once: the guest may change the buffer while we read it.
    const size_t at = bytes.size();
    bytes.resize(at + b.len);
    std::memcpy(bytes.data() + at, p, b.len);
  }
  auto s = balloon::parse_stats(bytes);
  if (!s)
    return reject(s.error().field == "stats.length" && s.error().code == proto::ParseErrc::BadSize
                      ? "stats_buffer_length"
                      : "stats_buffer_invalid",
                  s.error().message());
  v.stats = std::move(*s);
  return v;
}

bool StatsService::service(Session& s, uint32_t queue, Vring& vr, std::mutex& mu,
                           const std::shared_ptr<const MemoryTable>& table,
                           std::chrono::milliseconds interval) {
  if (interval.count() <= 0) interval = std::chrono::seconds(5);  // never a busy loop
  for (;;) {
    uint16_t head = 0;
    Expected<vq::Chain, vq::ChainError> walked;
    std::optional<Held> displaced;
    {
      std::lock_guard lk(mu);
      if (!vr.started) return true;
      auto h = vr.ring.pop_avail();
      if (!h) {
        const auto& e = h.error();
        s.protocol_error("stats", chain_reason(e.code),
                         fmt::format("vring {} (stats): {}", queue, e.message()));
        if (vq::ends_ring(e.code)) return false;  // a jump, or a head still in flight (the held one)
        continue;  // the bad slot was consumed; there is no head to return
      }
      if (!*h) return true;
      head = **h;
      walked = vr.ring.walk(head, *table);
      s.taken_locked(queue);
      displaced = held_;
      held_ = Held{queue, head};
      due_ = Clock::now() + interval;
    }
    if (displaced) {
      log::warn(s.log_budget(), "stats",
                "vm={} vring {} (stats): a second buffer (head {}) while head {} was held; "
                "returning the earlier one",
                s.name(), queue, head, displaced->head);
      s.return_chain(displaced->queue, displaced->head);
    }
    if (!walked) {
      s.protocol_error("stats", chain_reason(walked.error().code),
                       fmt::format("vring {} (stats): invalid chain: {}", queue, walked.error().message()));
      std::lock_guard lk(mu_);
      rejected_++;
      continue;
    }
    accept(s, queue, *walked, *table, interval);
  }
}

void StatsService::accept(Session& s, uint32_t queue, const vq::Chain& chain, const MemoryTable& table,
                          std::chrono::milliseconds interval) {
  auto& vm = s.metrics();
  StatsVerdict v = check_stats_chain(chain, table);
  if (!v.stats) {
    s.protocol_error("stats", v.reason, fmt::format("vring {} (stats): {}", queue, v.error));
    std::lock_guard lk(mu_);
    rejected_++;
    if (latest_) latest_->rejected = rejected_;
    return;
  }
  const auto& st = *v.stats;
  if (st.unknown_tags)
    log::debug("stats", "vm={} stats buffer: {} entries with unknown tags ignored", s.name(), st.unknown_tags);
  vm.guest_stats(st, st.unknown_tags);
  bool first = false;
  {
    std::lock_guard lk(mu_);
    first = !latest_;
    const uint64_t updates = latest_ ? latest_->updates + 1 : 1;
    latest_ = GuestStats{st, std::chrono::system_clock::now(), updates, rejected_};
  }
  auto mib = [](std::optional<uint64_t> b) {
    return b ? fmt::format("{} MiB", *b >> 20) : std::string("?");
  };
  if (first)
    log::info("stats", "vm={} first guest stats: {} entries, free {}, available {}, total {}; "
              "asking again every {} ms", s.name(), st.entries, mib(st.get(balloon::StatTag::MemFree)),
              mib(st.get(balloon::StatTag::Available)), mib(st.get(balloon::StatTag::MemTotal)),
              interval.count());
  else
    log::debug("stats", "vm={} guest stats: free {}, available {}", s.name(),
               mib(st.get(balloon::StatTag::MemFree)), mib(st.get(balloon::StatTag::Available)));
}

std::optional<StatsService::Clock::time_point> StatsService::deadline_locked() const {
  if (!held_) return std::nullopt;
  return due_;
}

std::optional<StatsService::Held> StatsService::take_due_locked(Clock::time_point now) {
  if (!held_ || now < due_) return std::nullopt;
  auto h = held_;
  held_.reset();
  return h;
}

std::optional<StatsService::Held> StatsService::take_held_locked(int queue) {
  if (!held_ || (queue >= 0 && held_->queue != static_cast<uint32_t>(queue))) return std::nullopt;
  auto h = held_;
  held_.reset();
  return h;
}

std::optional<GuestStats> StatsService::latest() const {
  std::lock_guard lk(mu_);
  return latest_;
}

}  // namespace fph::daemon
