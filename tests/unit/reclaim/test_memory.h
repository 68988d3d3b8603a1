// Real memory for the reclaim tests: memfds and mappings with a byte pattern
// that can be checked after a discard, so that "untouched" is verified, not
// assumed.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fph/common/unique_fd.h"

namespace fph::reclaim::test {

inline constexpr uint64_t kPage = 4096;
inline constexpr uint64_t kMiB = 1ull << 20;

// Byte at offset `i` of a pattern-filled region; never zero, so a discarded
// (zero-filled) byte cannot pass for an intact one.
inline uint8_t pattern_byte(uint64_t i) { return static_cast<uint8_t>((i * 131 + 7) % 251 + 1); }

inline void fill_pattern(uint8_t* p, uint64_t len) {
  for (uint64_t i = 0; i < len; ++i) p[i] = pattern_byte(i);
}

// First offset in [from, to) whose byte differs from the pattern, or `to`.
inline uint64_t first_pattern_mismatch(const uint8_t* p, uint64_t from, uint64_t to) {
  for (uint64_t i = from; i < to; ++i) {
    if (p[i] != pattern_byte(i)) return i;
  }
  return to;
}

// First non-zero offset in [from, to), or `to`.
inline uint64_t first_nonzero(const uint8_t* p, uint64_t from, uint64_t to) {
  for (uint64_t i = from; i < to; ++i) {
    if (p[i] != 0) return i;
  }
  return to;
}

// A memfd of `size` bytes mapped MAP_SHARED and filled with the pattern.
class SharedMemfd {
 public:
  explicit SharedMemfd(uint64_t size, unsigned flags = 0, const char* name = "fph-test")
      : size_(size) {
    fd_.reset(memfd_create(name, MFD_CLOEXEC | flags));
    if (!fd_) throw std::runtime_error(std::string("memfd_create: ") + std::strerror(errno));
    if (ftruncate(fd_.get(), static_cast<off_t>(size)) != 0) {
      throw std::runtime_error(std::string("ftruncate: ") + std::strerror(errno));
    }
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
    if (p == MAP_FAILED) throw std::runtime_error(std::string("mmap: ") + std::strerror(errno));
    map_ = static_cast<uint8_t*>(p);
    fill_pattern(map_, size_);
  }
  ~SharedMemfd() {
    if (map_ != nullptr) munmap(map_, size_);
  }
  SharedMemfd(const SharedMemfd&) = delete;
  SharedMemfd& operator=(const SharedMemfd&) = delete;

  int fd() const { return fd_.get(); }
  uint8_t* data() const { return map_; }
  uint64_t size() const { return size_; }

 private:
  UniqueFd fd_;
  uint8_t* map_ = nullptr;
  uint64_t size_ = 0;
};

// Private anonymous memory, pattern-filled (so every page is populated).
class PrivateAnon {
 public:
  explicit PrivateAnon(uint64_t size) : size_(size) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error(std::string("mmap: ") + std::strerror(errno));
    map_ = static_cast<uint8_t*>(p);
    fill_pattern(map_, size_);
  }
  ~PrivateAnon() { munmap(map_, size_); }
  PrivateAnon(const PrivateAnon&) = delete;
  PrivateAnon& operator=(const PrivateAnon&) = delete;

  uint8_t* data() const { return map_; }
  uint64_t size() const { return size_; }

 private:
  uint8_t* map_ = nullptr;
  uint64_t size_ = 0;
};

// Number of resident base pages in [p, p + len) (mincore(2)).
inline uint64_t resident_pages(const uint8_t* p, uint64_t len) {
  const uint64_t n = (len + kPage - 1) / kPage;
  std::string vec(n, '\0');
  if (mincore(const_cast<uint8_t*>(p), len, reinterpret_cast<unsigned char*>(vec.data())) != 0) {
    throw std::runtime_error(std::string("mincore: ") + std::strerror(errno));
  }
  uint64_t r = 0;
  for (char c : vec) r += (c & 1) ? 1 : 0;
  return r;
}

}  // namespace fph::reclaim::test
