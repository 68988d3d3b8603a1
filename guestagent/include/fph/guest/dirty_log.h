// The front end's side of the vhost-user shared-memory dirty log
// (VHOST_USER_PROTOCOL_F_LOG_SHMFD): a memfd the VMM hands to the back end
// with SET_LOG_BASE, one bit per 4 KiB page of guest physical address space
// from GPA 0. The back end sets bits with atomic ORs while logging is on; the
// VMM reads them, and takes them with atomic exchanges (QEMU's
// vhost_sync_dirty_bitmap). Used by fph-guest's migration and by
// fph-migration-bench.
#pragma once

#include <atomic>
#include <bit>
#include <cstdint>
#include <string>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"

namespace fph::guest {

class DirtyLogBitmap {
 public:
  static constexpr uint64_t kPage = 4096;  // VHOST_LOG_PAGE

  // A log covering guest physical addresses [0, guest_end), in whole u64
  // words.
  static Expected<DirtyLogBitmap, std::string> create(uint64_t guest_end);
  DirtyLogBitmap() = default;
  DirtyLogBitmap(DirtyLogBitmap&& o) noexcept;
  DirtyLogBitmap& operator=(DirtyLogBitmap&& o) noexcept;
  DirtyLogBitmap(const DirtyLogBitmap&) = delete;
  DirtyLogBitmap& operator=(const DirtyLogBitmap&) = delete;
  ~DirtyLogBitmap();

  int fd() const { return fd_.get(); }
  uint64_t bytes() const { return words_count_ * 8; }
  // Whether the page holding `gpa` is marked (false past the log).
  bool test(uint64_t gpa) const;
  uint64_t count() const;  // marked pages
  void clear();
  // Clears every marked bit and calls f(gfn) for it.
  template <class F>
  void take(F&& f) {
    for (uint64_t i = 0; i < words_count_; ++i)
      for (uint64_t w = std::atomic_ref<uint64_t>(words_[i]).exchange(0); w; w &= w - 1)
        f(i * 64 + static_cast<uint64_t>(std::countr_zero(w)));
  }

 private:
  UniqueFd fd_;
  uint64_t* words_ = nullptr;
  uint64_t words_count_ = 0;
};

}  // namespace fph::guest
