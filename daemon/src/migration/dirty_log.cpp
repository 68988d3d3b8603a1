#include "fph/daemon/dirty_log.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace fph::daemon {

Expected<std::shared_ptr<DirtyLog>, std::string> DirtyLog::map(UniqueFd fd,
                                                               const proto::vu::LogParams& p) {
  if (p.mmap_size == 0 || p.mmap_size > kMaxLogBytes)
    return unexpected(std::string(fmt::format("log.mmap_size: {} bytes (need 1..{})", p.mmap_size, kMaxLogBytes)));
  struct stat st{};
  if (::fstat(fd.get(), &st) != 0)
    return unexpected(std::string(fmt::format("log fd: fstat: {}", std::strerror(errno))));
  if (!S_ISREG(st.st_mode))
    return unexpected(std::string("log fd: not a regular file or memfd (cannot be mapped safely)"));
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (p.mmap_offset > file_size || p.mmap_size > file_size - p.mmap_offset)
    return unexpected(std::string(fmt::format("log.mmap_offset/mmap_size: [{:#x}, +{:#x}) runs past the end of "
                                   "the {}-byte log file",
                                   p.mmap_offset, p.mmap_size, file_size)));
  // mmap needs a page-aligned offset: map from the page below and step in.
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t lead = p.mmap_offset % page;
  const uint64_t map_len = lead + p.mmap_size;
  void* m = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(),
                   static_cast<off_t>(p.mmap_offset - lead));
  if (m == MAP_FAILED) return unexpected(std::string(fmt::format("log: mmap: {}", std::strerror(errno))));
  auto* base = static_cast<uint8_t*>(m);
  return std::shared_ptr<DirtyLog>(new DirtyLog(std::move(fd), base, map_len, base + lead, p.mmap_size));
}

DirtyLog::DirtyLog(UniqueFd fd, uint8_t* map_base, uint64_t map_len, uint8_t* bitmap, uint64_t size)
    : fd_(std::move(fd)), map_base_(map_base), map_len_(map_len), bitmap_(bitmap), size_(size),
      guard_(map_base, map_len) {}

DirtyLog::~DirtyLog() {
  guard_.reset();  // before the range can be reused by another mapping
  if (map_base_) ::munmap(map_base_, map_len_);
}

bool DirtyLog::mark(uint64_t gpa, uint64_t len) {
  if (len == 0) return true;
  const uint64_t first = gpa / kPageSize;
  if (gpa > UINT64_MAX - (len - 1)) return false;
  const uint64_t last = (gpa + len - 1) / kPageSize;
  if (last / 8 >= size_) return false;
  // Whole bytes in the middle are set with one store each; the front end
  // only ever clears bits (after reading them), so a plain OR per byte
  // through an atomic reference cannot lose its clears or our sets.
  for (uint64_t pg = first; pg <= last;) {
    const uint64_t byte = pg / 8;
    uint8_t bits;
    uint64_t n;
    if (pg % 8 == 0 && last - pg >= 7) {
      bits = 0xff;
      n = 8;
    } else {
      const uint64_t end = std::min<uint64_t>(last, byte * 8 + 7);
      n = end - pg + 1;
      bits = static_cast<uint8_t>(((1u << n) - 1) << (pg % 8));
    }
    std::atomic_ref<uint8_t>(bitmap_[byte]).fetch_or(bits, std::memory_order_relaxed);
    pg += n;
  }
  pages_marked_.fetch_add(last - first + 1, std::memory_order_relaxed);
  return true;
}

}  // namespace fph::daemon
