#include "fph/daemon/refault_sampler.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <vector>

namespace fph::daemon {

namespace {
constexpr uint64_t kPage = 4096;
constexpr uint64_t kChunkPages = 4096;  // mincore 16 MiB at a time: a 4 KiB vector
}  // namespace

int64_t resident_bytes(const uint8_t* addr, uint64_t len) {
  if (reinterpret_cast<uintptr_t>(addr) % kPage != 0) return -1;
  unsigned char vec[kChunkPages];
  int64_t resident = 0;
  for (uint64_t off = 0; off < len; off += kChunkPages * kPage) {
    const uint64_t n = std::min(len - off, kChunkPages * kPage);
    if (::mincore(const_cast<uint8_t*>(addr + off), n, vec) != 0) return -1;
    const uint64_t pages = (n + kPage - 1) / kPage;
    for (uint64_t i = 0; i < pages; ++i) resident += (vec[i] & 1) ? static_cast<int64_t>(kPage) : 0;
  }
  return resident;
}

int64_t range_resident_bytes(const MappedRegion& region, const uint8_t* addr, uint64_t len) {
  if (addr < region.map_base || len > region.map_len ||
      static_cast<uint64_t>(addr - region.map_base) > region.map_len - len)
    return -1;
  const uint64_t offset = static_cast<uint64_t>(addr - region.map_base);
  if (offset > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) return -1;
  const off_t d = ::lseek(region.seek_fd.get(), static_cast<off_t>(offset), SEEK_DATA);
  if (d < 0) return errno == ENXIO ? 0 : -1;  // ENXIO: no data from offset to the end of the file
  const uint64_t first = static_cast<uint64_t>(d) & ~(kPage - 1);
  if (first >= offset + len) return 0;
  return resident_bytes(addr + (first - offset), offset + len - first);
}

void RefaultTracker::discarded(const std::shared_ptr<MappedRegion>& region, uint8_t* addr,
                               uint64_t len, Clock::time_point now, int64_t freed) {
  if (!region || !region->seek_fd || len == 0 || reinterpret_cast<uintptr_t>(addr) % kPage != 0 ||
      len % kPage != 0 || addr < region->map_base || len > region->map_len ||
      static_cast<uint64_t>(addr - region->map_base) > region->map_len - len)
    return;
  std::lock_guard lk(mu_);
  // A range discarded again supersedes older entries that overlap it.
  for (auto it = ring_.begin(); it != ring_.end();) {
    if (it->addr < addr + len && addr < it->addr + it->len) {
      if (freed > 0 && now - it->at <= opts_.window) {
        // What the new discard freed inside the old range was populated
        // again since the old discard: a refault the sampler may not have
        // seen. Freed bytes are spread evenly over the new range.
        const uint64_t overlap = std::min(addr + len, it->addr + it->len) - std::max(addr, it->addr);
        const uint64_t share = static_cast<uint64_t>(static_cast<double>(freed) * static_cast<double>(overlap) /
                                                     static_cast<double>(len));
        const uint64_t back = std::min(share, overlap);
        if (back > it->counted) {
          const auto age = std::chrono::duration_cast<std::chrono::seconds>(now - it->at).count();
          if (!credit_by_age_) credit_by_age_ = std::make_unique<std::array<uint64_t, 122>>();
          auto& credit = *credit_by_age_;
          credit[static_cast<size_t>(std::clamp<int64_t>(age, 0, credit.size() - 1))] += back - it->counted;
        }
      }
      bytes_ -= it->len;
      it = ring_.erase(it);
    } else {
      ++it;
    }
  }
  ring_.push_back({next_id_++, region, addr, len, now, 0});
  bytes_ += len;
  evict_locked();
}

void RefaultTracker::evict_locked() {
  while (!ring_.empty() && (ring_.size() > opts_.max_ranges || bytes_ > opts_.max_bytes)) {
    bytes_ -= ring_.front().len;
    ring_.pop_front();
  }
}

uint64_t RefaultTracker::sample(Clock::time_point now, Clock::duration recent, uint64_t* recent_bytes) {
  if (recent_bytes) *recent_bytes = 0;
  // Snapshot under the lock, read the files without it: discards never wait for a sample.
  std::vector<Entry> snap;
  {
    std::lock_guard lk(mu_);
    while (!ring_.empty() && now - ring_.front().at > opts_.window) {
      bytes_ -= ring_.front().len;
      ring_.pop_front();
    }
    snap.assign(ring_.begin(), ring_.end());
  }
  struct Seen {
    uint64_t id;
    int64_t resident;  // -1: mapping gone
  };
  std::vector<Seen> seen;
  seen.reserve(snap.size());
  for (const auto& e : snap) {
    auto region = e.region.lock();  // keeps the file open while it is read
    seen.push_back({e.id, region ? range_resident_bytes(*region, e.addr, e.len) : -1});
  }
  uint64_t added = 0;
  std::lock_guard lk(mu_);
  const auto recent_s = std::chrono::duration_cast<std::chrono::seconds>(recent).count();
  if (credit_by_age_) {
    auto& credit = *credit_by_age_;
    for (size_t age = 0; age < credit.size(); ++age) {
      added += credit[age];
      if (recent_bytes && static_cast<int64_t>(age) < std::max<int64_t>(recent_s, 1)) *recent_bytes += credit[age];
      credit[age] = 0;
    }
  }
  for (const auto& s : seen) {
    auto it = std::lower_bound(ring_.begin(), ring_.end(), s.id,
                               [](const Entry& e, uint64_t id) { return e.id < id; });
    if (it == ring_.end() || it->id != s.id) continue;  // superseded or evicted meanwhile
    if (s.resident < 0) {
      bytes_ -= it->len;
      ring_.erase(it);
      continue;
    }
    const auto r = static_cast<uint64_t>(s.resident);
    if (r > it->counted) {
      added += r - it->counted;
      if (recent_bytes && now - it->at <= recent) *recent_bytes += r - it->counted;
      it->counted = r;
    }
    if (it->counted >= it->len) {  // all of it is back: nothing more to count
      bytes_ -= it->len;
      ring_.erase(it);
    }
  }
  return added;
}

size_t RefaultTracker::tracked_ranges() const {
  std::lock_guard lk(mu_);
  return ring_.size();
}

uint64_t RefaultTracker::tracked_bytes() const {
  std::lock_guard lk(mu_);
  return bytes_;
}

}  // namespace fph::daemon
