// The wakeup floor ("floor/<backing>/guests:N"): the same discards as the
// end-to-end run, issued by a minimal responder process that is woken by a
// kick eventfd and answers on a call eventfd per request, with N guest
// processes of the same memory (backing, size, populated bytes) posting the
// same requests (32 blocks of the reported block size, one in flight per
// guest). A ping-pong with no vhost-user logic: what any vhost-user back end
// must pay on top of the raw syscall loop (two process wakeups and a context
// switch per request). See METHODOLOGY in fph_bench.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "scenarios.h"

namespace fph::bench {

struct FloorResult {
  bool ok = false;
  std::string error;
  uint64_t block = 0;
  uint64_t requests = 0;
  int64_t reclaimed = 0;
  double wall_s = 0;
  double responder_cpu_s = 0;  // the responder process, t0 to the end (schedstat)
  double guests_cpu_s = 0;     // the guest processes, same span
  std::vector<double> latencies_us;  // kick written -> call read, per request
  double tput() const { return wall_s > 0 ? static_cast<double>(reclaimed) / wall_s : 0; }
  // Back end only (comparable with e2e's fphd CPU per GiB).
  double cpu_per_gib() const {
    return reclaimed > 0 ? responder_cpu_s / (static_cast<double>(reclaimed) / kGiBd) : std::nan("");
  }
  double total_cpu_per_gib() const {
    return reclaimed > 0 ? (responder_cpu_s + guests_cpu_s) / (static_cast<double>(reclaimed) / kGiBd)
                         : std::nan("");
  }
};

// Blocks per request, as the guests' page reporting (capacity 32).
constexpr int kFloorBlocksPerRequest = 32;

// One floor measurement with `block`-sized descriptors.
FloorResult run_floor(const Scenario& sc, uint64_t block);

// The hidden mode of fph-bench that is the responder:
//   fph-bench --floor-responder SLOT_FD GUESTS KICK,CALL,RAM ...
// Returns the exit status.
int floor_responder_main(int argc, char** argv);

}  // namespace fph::bench
