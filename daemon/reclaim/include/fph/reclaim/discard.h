// The discard engine: frees the host backing of a byte range. It knows nothing
// of virtio or vhost-user: it takes (fd or address, offset, length, node) and
// picks the primitive that really returns memory for that backing
// (DESIGN section 4):
//
//   shared (memfd/tmpfs/shm)  fallocate(PUNCH_HOLE|KEEP_SIZE) on the fd, or MADV_REMOVE
//   hugetlbfs                 fallocate(PUNCH_HOLE|KEEP_SIZE) in whole huge pages only
//   private anonymous         MADV_DONTNEED (eager) or MADV_FREE (lazy), chosen by policy
//
// MADV_DONTNEED on a shared mapping frees nothing (it only drops our own PTEs)
// and MADV_FREE is refused there; the engine never uses them for shared memory.
#pragma once

#include <cstdint>
#include <string_view>

namespace fph::reclaim {

enum class Backing : uint8_t {
  Shmem,        // memfd, tmpfs, /dev/shm file: base pages
  Hugetlb,      // hugetlbfs or memfd(MFD_HUGETLB): page_size is the huge page size
  PrivateAnon,  // MAP_PRIVATE|MAP_ANONYMOUS memory of this process
};

enum class Method : uint8_t {
  PunchHole,     // fallocate(fd, PUNCH_HOLE|KEEP_SIZE, offset, len)
  MadvRemove,    // madvise(addr, len, MADV_REMOVE)
  MadvDontneed,  // madvise(addr, len, MADV_DONTNEED)
  MadvFree,      // madvise(addr, len, MADV_FREE)
};

// Why (part of) a range was not discarded. Every skipped byte has a reason.
enum class SkipReason : uint8_t {
  None,
  Misaligned,   // not aligned to the backing page size (e.g. partial huge page)
  Poisoned,     // driver set a non-zero poison value (session level)
  Paused,       // reclaim paused for this VM (session level)
  Stopped,      // ring stopped / device suspended / migrating (session level)
  Invalid,      // descriptor failed validation (session level)
  Failed,       // the syscall failed (errno in DiscardOutcome::error)
  Unsupported,  // no primitive for this backing/method combination
  Cancelled,    // session torn down before the work ran
  Migrating,    // dirty logging on and the VM's policy holds discards while migrating (session level)
  Small,        // a reported block below the VM's minimum block size (VM policy)
  Backoff,      // the VM refaults what was discarded: discards held off for a while (VM policy)
};

std::string_view to_string(Backing b);
std::string_view to_string(Method m);
std::string_view to_string(SkipReason r);

// One range to discard. `fd` and `fd_offset` address the backing file (-1 if
// none); `addr` is this process's mapping of the same bytes (nullptr if none).
// At least one of them must be usable for the chosen method.
struct DiscardTarget {
  int fd = -1;
  uint64_t fd_offset = 0;
  uint8_t* addr = nullptr;
  uint64_t length = 0;
  Backing backing = Backing::Shmem;
  uint64_t page_size = 4096;  // backing page size: 4 KiB, or the huge page size
  int node = 0;               // dense node index in the Topology (not the OS index)
};

struct DiscardOutcome {
  Method method = Method::PunchHole;
  uint64_t discarded_bytes = 0;  // bytes the syscall was issued on and accepted
  uint64_t skipped_bytes = 0;    // bytes left alone (rounded off, failed, unsupported)
  SkipReason skip = SkipReason::None;  // reason for skipped_bytes, if any
  int error = 0;                 // errno of the failed syscall, 0 if none
  uint64_t syscalls = 0;         // number of syscalls issued (including retries)
  // Bytes the kernel stopped holding for the backing file, measured from its
  // allocated blocks around the syscall (VerifyingDiscarder), or -1 if not
  // measured (no fd, or a discarder that does not measure).
  int64_t freed_bytes = -1;
};

// The primitive for a backing. For PrivateAnon, `lazy` selects MADV_FREE over
// MADV_DONTNEED. For Shmem, `prefer_madvise` selects MADV_REMOVE over punch hole
// (both free the same pages; punch hole needs no mapping).
Method method_for(Backing b, bool lazy, bool prefer_madvise = false);

// Seam: the pipelines call a Discarder. Production uses SyscallDiscarder; unit
// tests of the pipeline use a recording implementation.
class Discarder {
 public:
  virtual ~Discarder() = default;
  virtual DiscardOutcome discard(const DiscardTarget& t, Method m) = 0;
};

// Issues the real syscall. Hugetlb ranges are rounded inward to whole huge
// pages (the rest is skipped as Misaligned); other backings must be aligned to
// page_size or the whole range is skipped as Misaligned. EINTR/EAGAIN are
// retried a bounded number of times. Thread safe (stateless).
class SyscallDiscarder final : public Discarder {
 public:
  DiscardOutcome discard(const DiscardTarget& t, Method m) override;
};

// Allocated bytes of a file (st_blocks * 512): what the kernel really holds.
// Returns -1 on error.
int64_t allocated_bytes(int fd);

}  // namespace fph::reclaim
