// The discard primitives (DESIGN section 4). Every byte handed in is either
// discarded or skipped with a reason; no byte outside [start, start + length)
// is ever touched (DESIGN section 3: the one invariant that, broken, corrupts
// guests), which is why hugetlb ranges are rounded inward, never outward.
#include "fph/reclaim/discard.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdint>
#include <limits>

#include "fph/common/checked.h"

namespace fph::reclaim {

std::string_view to_string(Backing b) {
  switch (b) {
    case Backing::Shmem: return "shmem";
    case Backing::Hugetlb: return "hugetlb";
    case Backing::PrivateAnon: return "private_anon";
  }
  return "unknown";
}

std::string_view to_string(Method m) {
  switch (m) {
    case Method::PunchHole: return "punch_hole";
    case Method::MadvRemove: return "madv_remove";
    case Method::MadvDontneed: return "madv_dontneed";
    case Method::MadvFree: return "madv_free";
  }
  return "unknown";
}

std::string_view to_string(SkipReason r) {
  switch (r) {
    case SkipReason::None: return "none";
    case SkipReason::Misaligned: return "misaligned";
    case SkipReason::Poisoned: return "poisoned";
    case SkipReason::Paused: return "paused";
    case SkipReason::Stopped: return "stopped";
    case SkipReason::Invalid: return "invalid";
    case SkipReason::Failed: return "failed";
    case SkipReason::Unsupported: return "unsupported";
    case SkipReason::Cancelled: return "cancelled";
    case SkipReason::Migrating: return "migrating";
    case SkipReason::Small: return "small";
    case SkipReason::Backoff: return "backoff";
  }
  return "unknown";
}

Method method_for(Backing b, bool lazy, bool prefer_madvise) {
  switch (b) {
    case Backing::Shmem: return prefer_madvise ? Method::MadvRemove : Method::PunchHole;
    // Hugetlb: punch hole on the fd is what QEMU does too (physmem.c
    // ram_block_discard_range); it needs no mapping in this process.
    case Backing::Hugetlb: return Method::PunchHole;
    case Backing::PrivateAnon: return lazy ? Method::MadvFree : Method::MadvDontneed;
  }
  return Method::PunchHole;
}

namespace {

// EINTR/EAGAIN retries per range. Bounded: a range that keeps failing is
// skipped as Failed and counted, never spun on (STYLE pattern 7).
constexpr int kMaxAttempts = 8;

// Which primitives really free memory for a backing (DESIGN section 4).
// MADV_DONTNEED on a shared mapping only drops our own page table entries and
// MADV_FREE is refused by the kernel there; punch hole / MADV_REMOVE on
// private anonymous memory have no file to punch.
bool frees_memory(Backing b, Method m) {
  switch (b) {
    case Backing::Shmem:
    case Backing::Hugetlb: return m == Method::PunchHole || m == Method::MadvRemove;
    case Backing::PrivateAnon: return m == Method::MadvDontneed || m == Method::MadvFree;
  }
  return false;
}

DiscardOutcome skip_all(const DiscardTarget& t, Method m, SkipReason why, int error = 0) {
  DiscardOutcome o;
  o.method = m;
  o.skipped_bytes = t.length;
  o.skip = why;
  o.error = error;
  return o;
}

// Runs `call` until it succeeds, fails with something other than
// EINTR/EAGAIN, or kMaxAttempts is reached. Returns 0 or the last errno.
template <class F>
int issue(F&& call, uint64_t& syscalls) {
  for (int attempt = 1;; ++attempt) {
    ++syscalls;
    if (call() == 0) return 0;
    const int e = errno;
    if ((e != EINTR && e != EAGAIN) || attempt >= kMaxAttempts) return e;
    if (e == EAGAIN) sched_yield();
  }
}

}  // namespace

DiscardOutcome SyscallDiscarder::discard(const DiscardTarget& t, Method m) {
  if (t.length == 0) {
    DiscardOutcome o;
    o.method = m;
    return o;
  }
  if (!frees_memory(t.backing, m)) return skip_all(t, m, SkipReason::Unsupported);
  const bool punch = m == Method::PunchHole;
  if (punch ? t.fd < 0 : t.addr == nullptr) return skip_all(t, m, SkipReason::Unsupported);
  if (!is_power_of_two(t.page_size)) return skip_all(t, m, SkipReason::Invalid, EINVAL);

  // Alignment is judged on the coordinate the syscall uses: the file offset
  // for fallocate, the address for madvise.
  const uint64_t base = punch ? t.fd_offset : reinterpret_cast<uintptr_t>(t.addr);
  const auto end = checked_add(base, t.length);
  if (!end || (punch && *end > static_cast<uint64_t>(std::numeric_limits<off_t>::max()))) {
    return skip_all(t, m, SkipReason::Invalid, EOVERFLOW);
  }

  uint64_t start = base;
  uint64_t stop = *end;
  const uint64_t mask = t.page_size - 1;
  if (t.backing == Backing::Hugetlb) {
    // Whole huge pages only, rounded inward: a partial huge page still holds
    // bytes the guest did not report (DESIGN section 4, hugetlbfs row).
    if (start > std::numeric_limits<uint64_t>::max() - mask) {
      return skip_all(t, m, SkipReason::Misaligned);
    }
    start = (start + mask) & ~mask;
    stop &= ~mask;
    if (stop <= start) return skip_all(t, m, SkipReason::Misaligned);
  } else if ((start & mask) != 0 || (t.length & mask) != 0) {
    // Base pages: the kernel would zero a partial page on punch hole (losing
    // bytes nobody reported) and rejects unaligned madvise; skip it whole.
    return skip_all(t, m, SkipReason::Misaligned);
  }

  const uint64_t head = start - base;
  const uint64_t len = stop - start;
  DiscardOutcome o;
  o.method = m;
  int err = 0;
  // A guest range the SIGBUS guard replaced with anonymous memory (the front
  // end shrank its file, daemon memory_guard.h) stays safe to discard while
  // the session closes: punch hole works on the fd (past EOF it frees
  // nothing and succeeds), and madvise on the private anonymous replacement
  // either drops throwaway pages or fails (MADV_REMOVE: EINVAL, counted as
  // failed). Neither touches any other memory.
  switch (m) {
    case Method::PunchHole:
      err = issue(
          [&] {
            return fallocate(t.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             static_cast<off_t>(start), static_cast<off_t>(len));
          },
          o.syscalls);
      break;
    case Method::MadvRemove:
    case Method::MadvDontneed:
    case Method::MadvFree: {
      const int advice = m == Method::MadvRemove     ? MADV_REMOVE
                         : m == Method::MadvDontneed ? MADV_DONTNEED
                                                     : MADV_FREE;
      err = issue([&] { return madvise(t.addr + head, len, advice); }, o.syscalls);
      break;
    }
  }
  if (err != 0) {
    o.skipped_bytes = t.length;
    o.skip = SkipReason::Failed;
    o.error = err;
    return o;
  }
  o.discarded_bytes = len;
  o.skipped_bytes = t.length - len;
  if (o.skipped_bytes != 0) o.skip = SkipReason::Misaligned;
  return o;
}

int64_t allocated_bytes(int fd) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return -1;
  // st_blocks is always in 512-byte units (POSIX/Linux stat(2)), whatever the
  // file system block size.
  return static_cast<int64_t>(st.st_blocks) * 512;
}

}  // namespace fph::reclaim
