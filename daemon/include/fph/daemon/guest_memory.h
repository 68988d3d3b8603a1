// The guest memory of one VM as the daemon sees it: every region the front end
// shared (SET_MEM_TABLE / ADD_MEM_REG) mapped MAP_SHARED into fphd, with its fd
// kept open because hole punching needs the fd and the offset into the file
// (reference section 7: libvhost-user folds the offset into its mmap and keeps
// no fd, so it cannot punch).
//
// Regions are immutable once mapped and shared by pointer: work in flight
// holds a reference, so a REM_MEM_REG or a new table never unmaps memory a
// discard is still using.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"
#include "fph/daemon/memory_guard.h"
#include "fph/proto/vhost_user.h"
#include "fph/proto/virtqueue.h"
#include "fph/reclaim/discard.h"
#include "fph/reclaim/topology.h"

namespace fph::daemon {

struct MappedRegion {
  proto::vu::MemoryRegion desc;  // as the front end described it
  UniqueFd fd;
  // fphd's own open file description of the same file (shmem only), for
  // lseek(SEEK_DATA) by the refault sampler: `fd` shares its file position
  // with the front end's descriptor, so fphd never seeks on it. Empty when
  // /proc/self/fd could not reopen the file; refaults then go unmeasured.
  UniqueFd seek_fd;
  uint8_t* map_base = nullptr;   // mmap(0, mmap_offset + size, ..., fd, 0)
  uint64_t map_len = 0;
  reclaim::Backing backing = reclaim::Backing::Shmem;
  uint64_t page_size = 4096;     // backing page size (huge page size on hugetlbfs)
  int node = -1;                 // dense host node if the whole region is bound to one, else -1
  // [map_base, map_base + map_len) under the SIGBUS guard (memory_guard.h):
  // if the front end shrinks the file later, this range turns into zeros
  // instead of killing fphd, and faulted() tells the session to close.
  GuardedRange guard;

  MappedRegion() = default;
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;
  ~MappedRegion();

  uint8_t* host_base() const { return map_base + desc.mmap_offset; }
  uint64_t gpa_end() const { return desc.guest_phys_addr + desc.memory_size; }
  bool faulted() const { return guard.faulted(); }
};

// Maps one region. Errors say what failed ("mmap: Invalid argument"). A
// region that ends past the end of its file (a regular file, memfd or
// hugetlbfs file) is refused here: touching it would SIGBUS.
Expected<std::shared_ptr<MappedRegion>, std::string> map_region(
    const proto::vu::MemoryRegion& r, UniqueFd fd, const reclaim::Topology& topo);

// Where a validated guest range lives.
struct Translation {
  std::shared_ptr<MappedRegion> region;
  uint64_t region_offset = 0;  // gpa - region gpa
  uint8_t* host = nullptr;
};

enum class RangeErrc : uint8_t { Unmapped, Straddles, Overflow };
std::string_view to_string(RangeErrc e);

// An immutable snapshot of a VM's regions. Copy-on-write: the session builds
// a new table on every change and swaps the pointer.
class MemoryTable final : public proto::vq::GuestMemory {
 public:
  MemoryTable() = default;
  explicit MemoryTable(std::vector<std::shared_ptr<MappedRegion>> regions);

  const std::vector<std::shared_ptr<MappedRegion>>& regions() const { return regions_; }
  uint64_t total_bytes() const;

  // [gpa, gpa+len) must lie inside exactly one region (checked arithmetic).
  Expected<Translation, RangeErrc> translate_range(uint64_t gpa, uint64_t len) const;
  // proto::vq::GuestMemory: host pointer or nullptr.
  uint8_t* translate(uint64_t gpa, uint64_t len) const override;
  // Front-end virtual address (ring addresses in SET_VRING_ADDR) to host pointer.
  uint8_t* translate_user(uint64_t uaddr, uint64_t len) const;
  // Region index whose description matches exactly (REM_MEM_REG), or -1.
  int find(const proto::vu::MemoryRegion& r) const;
  // True if `r` overlaps an existing region in GPA or user address space.
  bool overlaps(const proto::vu::MemoryRegion& r) const;

 private:
  std::vector<std::shared_ptr<MappedRegion>> regions_;  // sorted by gpa
};

}  // namespace fph::daemon
