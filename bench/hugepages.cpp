// Hugetlb backing: reserving the huge pages the scenarios need
// (/proc/sys/vm/nr_hugepages, under the same flock as the unit tests) and
// restoring the previous value at the end, on failure and on SIGINT/SIGTERM.
#include "hugepages.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

namespace fph::bench {

namespace {

// A possibly changed nr_hugepages to restore: a plain array, usable from a
// signal handler.
char g_hp_restore[32];
std::atomic<bool> g_hp_changed{false};

}  // namespace

void restore_hugepages_raw() {
  if (!g_hp_changed.load()) return;
  int fd = ::open("/proc/sys/vm/nr_hugepages", O_WRONLY | O_CLOEXEC);
  if (fd >= 0) {
    (void)!::write(fd, g_hp_restore, std::strlen(g_hp_restore));
    ::close(fd);
  }
  g_hp_changed.store(false);
}

long HugePages::meminfo(const char* key) {
  std::ifstream in("/proc/meminfo");
  std::string k;
  long v = 0;
  while (in >> k) {
    if (k == key) {
      in >> v;
      return v;
    }
    in.ignore(1 << 12, '\n');
  }
  return -1;
}

long HugePages::read_knob() {
  std::ifstream in("/proc/sys/vm/nr_hugepages");
  long v = -1;
  in >> v;
  return v;
}

bool HugePages::write_knob(long v) {
  std::ofstream out("/proc/sys/vm/nr_hugepages");
  out << v << "\n";
  out.flush();
  return static_cast<bool>(out);
}

// Reserves `bytes` worth of huge pages (if not already free).
void HugePages::reserve(uint64_t bytes) {
  if (tried) return;
  tried = true;
  const long hp_kb = meminfo("Hugepagesize:");
  if (hp_kb > 0) page_size = static_cast<uint64_t>(hp_kb) * kKiB;
  const long need = static_cast<long>((bytes + page_size - 1) / page_size) + 8;
  // Serialize with the unit tests that also change the knob.
  lock_fd = ::open("/tmp/fph-test-nr_hugepages.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock_fd < 0 || flock(lock_fd, LOCK_EX) != 0) {
    message = "cannot take /tmp/fph-test-nr_hugepages.lock";
    return;
  }
  saved = read_knob();
  if (saved < 0) {
    message = "cannot read /proc/sys/vm/nr_hugepages";
    return;
  }
  const long free0 = meminfo("HugePages_Free:");
  if (free0 < need) {
    std::snprintf(g_hp_restore, sizeof g_hp_restore, "%ld\n", saved);
    g_hp_changed.store(true);
    if (!write_knob(saved + (need - free0))) {
      restore();
      message = "cannot write /proc/sys/vm/nr_hugepages (need root): " +
                std::string(std::strerror(errno));
      return;
    }
  }
  const long free1 = meminfo("HugePages_Free:");
  if (free1 < need) {
    message = "could only get " + std::to_string(free1) + " of the " + std::to_string(need) +
              " huge pages of " + std::to_string(page_size / kKiB) +
              " KiB needed (memory fragmented or too small)";
    restore();
    return;
  }
  ok = true;
  message = "reserved: " + std::to_string(need) + " huge pages of " +
            std::to_string(page_size / kKiB) + " KiB free (nr_hugepages " +
            std::to_string(saved) + " -> " + std::to_string(read_knob()) +
            ", restored at exit)";
}

void HugePages::restore() {
  if (g_hp_changed.load() && saved >= 0) {
    if (!write_knob(saved))
      std::fprintf(stderr, "fph-bench: WARNING: could not restore nr_hugepages to %ld\n", saved);
    g_hp_changed.store(false);
  }
  if (lock_fd >= 0) {
    ::close(lock_fd);
    lock_fd = -1;
  }
}

HugePages g_huge;

}  // namespace fph::bench
