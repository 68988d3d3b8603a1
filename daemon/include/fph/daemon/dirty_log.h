// The vhost-user dirty log (reference 4.6): a bitmap the front end shares
// through SET_LOG_BASE, one bit per 4 KiB guest page from GPA 0. While the
// VMM migrates a VM it sets VHOST_F_LOG_ALL, and every guest page the back
// end changes must be marked here so the VMM sends it again: for fphd that is
// the used-ring writes and every discarded range (a discarded page now reads
// as zero on the source, while the destination may still hold the old copy).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"
#include "fph/proto/vhost_user.h"
#include "fph/daemon/memory_guard.h"

namespace fph::daemon {

class DirtyLog {
 public:
  static constexpr uint64_t kPageSize = 4096;  // VHOST_LOG_PAGE
  // A bound on what a front end may make fphd map: 1 GiB of log covers
  // 32 TiB of guest memory.
  static constexpr uint64_t kMaxLogBytes = 1ull << 30;

  // Maps the log. The fd must be a file (memfd, shm) at least
  // mmap_offset + mmap_size long: a mapping past the end of the file would
  // fault (SIGBUS) on the first mark instead of failing here. The error text
  // names the field at fault.
  static Expected<std::shared_ptr<DirtyLog>, std::string> map(UniqueFd fd,
                                                               const proto::vu::LogParams& p);
  ~DirtyLog();
  DirtyLog(const DirtyLog&) = delete;
  DirtyLog& operator=(const DirtyLog&) = delete;

  uint64_t size_bytes() const { return size_; }
  // Guest physical bytes the bitmap covers: [0, covered_bytes()).
  uint64_t covered_bytes() const { return size_ * 8 * kPageSize; }
  // Marks every page touching [gpa, gpa + len) dirty (atomic OR: the front
  // end reads and clears the bitmap concurrently). Returns false, marking
  // nothing, if the range is not covered by the log.
  bool mark(uint64_t gpa, uint64_t len);
  uint64_t pages_marked() const { return pages_marked_.load(std::memory_order_relaxed); }
  // The front end shrank the log file under the mapping after it was
  // validated: marks since went to throwaway memory (memory_guard.h).
  bool faulted() const { return guard_.faulted(); }

 private:
  DirtyLog(UniqueFd fd, uint8_t* map_base, uint64_t map_len, uint8_t* bitmap, uint64_t size);
  UniqueFd fd_;
  uint8_t* map_base_ = nullptr;
  uint64_t map_len_ = 0;
  uint8_t* bitmap_ = nullptr;
  uint64_t size_ = 0;
  std::atomic<uint64_t> pages_marked_{0};
  GuardedRange guard_;  // the log is a front end's file like guest memory
};

}  // namespace fph::daemon
