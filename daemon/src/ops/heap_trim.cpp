#include "fph/daemon/heap_trim.h"

#include <malloc.h>

namespace fph::daemon {

bool HeapTrim::due(uint64_t bursts, Clock::time_point last, Clock::time_point now) {
  const bool settled = bursts != trimmed_ && now - last >= kSettle;
  const bool overdue = bursts - trimmed_ >= kMaxBurstsUntrimmed;
  if (!settled && !overdue) return false;
  trimmed_ = bursts;
  return true;
}

bool HeapTrim::run(uint64_t bursts, Clock::time_point last, Clock::time_point now) {
  if (!due(bursts, last, now)) return false;
  if (::mallinfo2().fordblks < kMinFreeBytes) return false;
  (void)::malloc_trim(0);
  return true;
}

}  // namespace fph::daemon
