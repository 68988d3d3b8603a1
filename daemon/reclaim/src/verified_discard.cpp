#include "fph/reclaim/verified_discard.h"

namespace fph::reclaim {

DiscardOutcome VerifyingDiscarder::discard(const DiscardTarget& t, Method m) {
  if (t.fd < 0) return inner_.discard(t, m);
  std::lock_guard lk(stripes_[static_cast<unsigned>(t.fd) % stripes_.size()]);
  const int64_t before = allocated_bytes(t.fd);
  DiscardOutcome o = inner_.discard(t, m);
  const int64_t after = allocated_bytes(t.fd);
  if (before >= 0 && after >= 0) o.freed_bytes = before > after ? before - after : 0;
  return o;
}

}  // namespace fph::reclaim
