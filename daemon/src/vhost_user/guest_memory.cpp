#include "fph/daemon/guest_memory.h"

#include <linux/magic.h>
#include <numaif.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "fph/common/checked.h"
#include "fph/common/log.h"  // fmt

namespace fph::daemon {

MappedRegion::~MappedRegion() {
  guard.reset();  // out of the SIGBUS guard's table before the range goes away
  if (map_base) ::munmap(map_base, map_len);
}

namespace {

// The host node a shared memory region is bound to, if the front end bound
// it (mbind on a shmem mapping sets the shared policy of the file, which we
// see through our own mapping). Asking the policy never faults pages in,
// unlike get_mempolicy(MPOL_F_NODE|MPOL_F_ADDR).
int bound_node(uint8_t* addr, const reclaim::Topology& topo) {
  if (topo.is_synthetic() || topo.node_count() <= 1) return topo.node_count() == 1 ? 0 : -1;
  int mode = 0;
  unsigned long mask[16] = {};
  if (get_mempolicy(&mode, mask, sizeof(mask) * 8, addr, MPOL_F_ADDR) != 0) return -1;
  if (mode != MPOL_BIND && mode != MPOL_PREFERRED) return -1;
  int found = -1;
  for (int n = 0; n < static_cast<int>(sizeof(mask) * 8); ++n) {
    if (mask[n / 64] & (1ul << (n % 64))) {
      if (found != -1) return -1;  // more than one node
      found = n;
    }
  }
  return found < 0 ? -1 : topo.index_of_os_node(found);
}

}  // namespace

Expected<std::shared_ptr<MappedRegion>, std::string> map_region(const proto::vu::MemoryRegion& r,
                                                                UniqueFd fd,
                                                                const reclaim::Topology& topo) {
  auto region = std::make_shared<MappedRegion>();
  region->desc = r;
  const auto len = checked_add(r.mmap_offset, r.memory_size);
  if (!len) return unexpected(std::string("mmap_offset + memory_size overflows"));

  // A file shorter than the region would SIGBUS on the first access past its
  // end (a ring or buffer there): refuse it where it arrives. Only regular
  // files (memfd, tmpfs, hugetlbfs) have a size that bounds the mapping; a
  // later shrink is caught by the SIGBUS guard (memory_guard.h).
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return unexpected(std::string("fstat: ") + std::strerror(errno));
  if (S_ISREG(st.st_mode) && *len > static_cast<uint64_t>(st.st_size)) {
    return unexpected(fmt::format(
        "region gpa=0x{:x} size=0x{:x} at mmap_offset 0x{:x} ends past the end of its file "
        "(0x{:x} bytes): the file must cover mmap_offset + memory_size",
        r.guest_phys_addr, r.memory_size, r.mmap_offset, st.st_size));
  }

  struct statfs sfs {};
  if (::fstatfs(fd.get(), &sfs) != 0)
    return unexpected(std::string("fstatfs: ") + std::strerror(errno));
  if (static_cast<unsigned long>(sfs.f_type) == HUGETLBFS_MAGIC) {
    region->backing = reclaim::Backing::Hugetlb;
    region->page_size = static_cast<uint64_t>(sfs.f_bsize);
  } else {
    region->backing = reclaim::Backing::Shmem;
    region->page_size = 4096;
  }
  // mmap needs a page-aligned length on hugetlbfs; the offset must be aligned too.
  if (!is_aligned(r.mmap_offset, 4096))
    return unexpected(std::string("mmap_offset is not page aligned"));
  uint64_t map_len = *len;
  if (region->backing == reclaim::Backing::Hugetlb) {
    map_len = (map_len + region->page_size - 1) & ~(region->page_size - 1);
  }
  void* p = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd.get(), 0);
  if (p == MAP_FAILED) return unexpected(std::string("mmap: ") + std::strerror(errno));
  region->map_base = static_cast<uint8_t*>(p);
  region->map_len = map_len;
  region->guard = GuardedRange(region->map_base, region->map_len);
  region->fd = std::move(fd);
  if (region->backing == reclaim::Backing::Shmem) {
    const std::string self = "/proc/self/fd/" + std::to_string(region->fd.get());
    region->seek_fd = UniqueFd(::open(self.c_str(), O_RDONLY | O_CLOEXEC));
  }
  region->node = bound_node(region->host_base(), topo);
  return region;
}

std::string_view to_string(RangeErrc e) {
  switch (e) {
    case RangeErrc::Unmapped: return "outside_guest_memory";
    case RangeErrc::Straddles: return "straddles_regions";
    case RangeErrc::Overflow: return "overflow";
  }
  return "?";
}

MemoryTable::MemoryTable(std::vector<std::shared_ptr<MappedRegion>> regions)
    : regions_(std::move(regions)) {
  std::sort(regions_.begin(), regions_.end(), [](const auto& a, const auto& b) {
    return a->desc.guest_phys_addr < b->desc.guest_phys_addr;
  });
}

uint64_t MemoryTable::total_bytes() const {
  uint64_t t = 0;
  for (const auto& r : regions_) t += r->desc.memory_size;
  return t;
}

Expected<Translation, RangeErrc> MemoryTable::translate_range(uint64_t gpa, uint64_t len) const {
  if (!checked_add(gpa, len)) return unexpected(RangeErrc::Overflow);
  // Regions are few (<= 509, usually 1-8): a linear scan is cheaper than a map.
  for (const auto& r : regions_) {
    const auto& d = r->desc;
    if (gpa < d.guest_phys_addr || gpa >= r->gpa_end()) continue;
    if (!range_within(gpa, len, d.guest_phys_addr, d.memory_size))
      return unexpected(RangeErrc::Straddles);
    const uint64_t off = gpa - d.guest_phys_addr;
    return Translation{r, off, r->host_base() + off};
  }
  return unexpected(RangeErrc::Unmapped);
}

uint8_t* MemoryTable::translate(uint64_t gpa, uint64_t len) const {
  auto t = translate_range(gpa, len);
  return t ? t->host : nullptr;
}

uint8_t* MemoryTable::translate_user(uint64_t uaddr, uint64_t len) const {
  for (const auto& r : regions_) {
    const auto& d = r->desc;
    if (range_within(uaddr, len, d.userspace_addr, d.memory_size))
      return r->host_base() + (uaddr - d.userspace_addr);
  }
  return nullptr;
}

int MemoryTable::find(const proto::vu::MemoryRegion& m) const {
  for (size_t i = 0; i < regions_.size(); ++i) {
    const auto& d = regions_[i]->desc;
    if (d.guest_phys_addr == m.guest_phys_addr && d.memory_size == m.memory_size &&
        d.userspace_addr == m.userspace_addr)
      return static_cast<int>(i);
  }
  return -1;
}

bool MemoryTable::overlaps(const proto::vu::MemoryRegion& m) const {
  for (const auto& r : regions_) {
    const auto& d = r->desc;
    const bool gpa_overlap = m.guest_phys_addr < d.guest_phys_addr + d.memory_size &&
                             d.guest_phys_addr < m.guest_phys_addr + m.memory_size;
    const bool ua_overlap = m.userspace_addr < d.userspace_addr + d.memory_size &&
                            d.userspace_addr < m.userspace_addr + m.memory_size;
    if (gpa_overlap || ua_overlap) return true;
  }
  return false;
}

}  // namespace fph::daemon
