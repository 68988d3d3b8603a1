// Trace workloads for fph-guest (--workload trace:FILE): a CSV of timed
// allocations and frees, replayed against the guest allocator model.
// Format (docs/experiments.md, "Trace format"):
//
//   # comment lines and blank lines are ignored
//   time_ms,op,size,tag          <- optional header (exactly these names)
//   0,alloc,512M,heap            <- at 0 ms allocate 512 MiB under tag "heap"
//   5000,free,256M,heap          <- at 5 s free 256 MiB of "heap" (newest first)
//   6000,free,all,heap           <- free all of "heap"
//
//  time_ms  integer >= 0, milliseconds from the start of the replay, never
//           decreasing from one line to the next
//  op       alloc | free
//  size     bytes with an optional K/M/G/T suffix (binary), > 0; for free
//           also "all"
//  tag      optional, [A-Za-z0-9_.-]{1,64}, default "default"; a free takes
//           from the allocations of its tag and may not free more than the
//           tag holds at that point of the trace
//
// Every error names the file, the line and the field.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fph/common/expected.h"

namespace fph::guest {

struct TraceOp {
  enum class Kind { Alloc, Free };
  int64_t time_ms = 0;
  Kind op = Kind::Alloc;
  uint64_t bytes = 0;  // 0 with free: "all"
  bool all = false;
  std::string tag = "default";
  int line = 0;
};

struct Trace {
  std::string name;
  std::vector<TraceOp> ops;
  uint64_t peak_bytes = 0;  // most bytes held at once (as written, before block rounding)
  int64_t duration_ms = 0;  // time of the last operation
};

// Parses trace text; `name` (a file name) prefixes errors: "NAME:LINE: field 'F': ...".
Expected<Trace, std::string> parse_trace(std::string_view text, std::string_view name);
// Reads and parses a file.
Expected<Trace, std::string> load_trace(const std::string& path);

}  // namespace fph::guest
