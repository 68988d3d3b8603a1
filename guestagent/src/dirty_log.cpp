#include "fph/guest/dirty_log.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace fph::guest {

Expected<DirtyLogBitmap, std::string> DirtyLogBitmap::create(uint64_t guest_end) {
  auto fail = [](const char* what) {
    return Unexpected<std::string>{std::string(what) + ": " + std::strerror(errno)};
  };
  DirtyLogBitmap l;
  l.words_count_ = ((guest_end + kPage - 1) / kPage + 63) / 64;
  l.fd_.reset(::memfd_create("fph-dirty-log", MFD_CLOEXEC));
  if (!l.fd_) return fail("memfd_create(dirty log)");
  if (::ftruncate(l.fd_.get(), static_cast<off_t>(l.bytes())) != 0) return fail("ftruncate(dirty log)");
  void* p = ::mmap(nullptr, l.bytes(), PROT_READ | PROT_WRITE, MAP_SHARED, l.fd_.get(), 0);
  if (p == MAP_FAILED) return fail("mmap(dirty log)");
  l.words_ = static_cast<uint64_t*>(p);
  return l;
}

DirtyLogBitmap::DirtyLogBitmap(DirtyLogBitmap&& o) noexcept { *this = std::move(o); }

DirtyLogBitmap& DirtyLogBitmap::operator=(DirtyLogBitmap&& o) noexcept {
  std::swap(fd_, o.fd_);
  std::swap(words_, o.words_);
  std::swap(words_count_, o.words_count_);
  return *this;
}

DirtyLogBitmap::~DirtyLogBitmap() {
  if (words_) ::munmap(words_, bytes());
}

bool DirtyLogBitmap::test(uint64_t gpa) const {
  const uint64_t pg = gpa / kPage;
  if (pg / 64 >= words_count_) return false;
  return std::atomic_ref<uint64_t>(words_[pg / 64]).load(std::memory_order_acquire) >> (pg % 64) & 1;
}

uint64_t DirtyLogBitmap::count() const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < words_count_; ++i)
    n += static_cast<uint64_t>(std::popcount(std::atomic_ref<uint64_t>(words_[i]).load()));
  return n;
}

void DirtyLogBitmap::clear() {
  for (uint64_t i = 0; i < words_count_; ++i) std::atomic_ref<uint64_t>(words_[i]).store(0);
}

}  // namespace fph::guest
