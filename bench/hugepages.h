// Hugetlb backing: the bench reserves the huge pages itself
// (/proc/sys/vm/nr_hugepages, under the same flock as the unit tests) and
// restores the previous value at the end, on failure and, through
// restore_hugepages_raw(), from the fatal-signal handler.
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace fph::bench {

// Writes back the nr_hugepages value saved by HugePages::reserve, if it was
// changed: async-signal-safe (for on_fatal_signal).
void restore_hugepages_raw();

struct HugePages {
  bool tried = false;
  bool ok = false;
  std::string message;
  long saved = -1;
  int lock_fd = -1;
  uint64_t page_size = 2 * kMiB;

  static long meminfo(const char* key);
  static long read_knob();
  static bool write_knob(long v);

  // Reserves `bytes` worth of huge pages (if not already free).
  void reserve(uint64_t bytes);
  void restore();
  ~HugePages() { restore(); }
};
extern HugePages g_huge;

}  // namespace fph::bench
