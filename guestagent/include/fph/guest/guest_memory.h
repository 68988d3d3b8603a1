// Guest RAM of fph-guest: one or more memfd regions mapped MAP_SHARED, laid
// out contiguously in guest physical address space, shared with the back end
// by fd (vhost-user requires shared memory: reference section 4.2, DESIGN 7).
//
// Layout: regions of equal size (a multiple of 4 MiB, so that no max-order
// buddy block ever straddles two regions) from `gpa_base` (4 MiB aligned).
// Frames are numbered from 0 at gpa_base (the buddy model's frame numbers).
// The first `reserved_frames()` frames hold the split rings of the queues,
// one page-aligned slot per queue (virtio 1.2 section 2.7: desc 16-aligned,
// avail 2-aligned, used 4-aligned); the buddy model never hands them out.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"
#include "fph/guest/buddy.h"
#include "fph/proto/virtqueue.h"

namespace fph::guest {

inline constexpr uint64_t kRegionAlign = kFrameSize << kMaxOrder;  // 4 MiB

struct GuestMemoryOptions {
  uint64_t bytes = 256ull << 20;     // total; rounded up to regions * 4 MiB
  uint32_t regions = 1;
  uint64_t gpa_base = 0;             // multiple of 4 MiB
  bool hugetlb = false;              // MFD_HUGETLB (2 MiB pages, must be reserved)
  std::optional<int> numa_node;      // mbind(MPOL_BIND) each region to this host node
  uint64_t mmap_offset = 0;          // region starts this far into its memfd
  std::vector<uint16_t> ring_sizes;  // one ring slot per queue index
  // Local mode (--local-reclaim): MAP_PRIVATE|MAP_ANONYMOUS instead of memfd
  // regions; no fd, nothing to share with a back end (DESIGN 4, last row).
  bool private_anon = false;
};

struct RingArea {
  uint16_t num = 0;
  uint64_t desc_gpa = 0;
  uint64_t avail_gpa = 0;
  uint64_t used_gpa = 0;
};

struct MemRegion {
  uint64_t gpa = 0;
  uint64_t size = 0;
  uint8_t* host = nullptr;   // our mapping of [gpa, gpa+size)
  uint64_t mmap_offset = 0;  // offset of the region inside `fd`
  UniqueFd fd;
  // The address announced to the back end (userspace_addr), if not `host`:
  // a migration's twin announces where it will be mapped after the switch,
  // the guest's current addresses, which ring addresses are given in.
  uint64_t user_addr = 0;
};

// Computes the ring slots (pure; exposed for tests). Slot q starts at
// gpa_base + sum of previous slot sizes, each slot rounded up to 4 KiB.
std::vector<RingArea> layout_rings(uint64_t gpa_base, const std::vector<uint16_t>& sizes,
                                   uint64_t* reserved_bytes);

class GuestMemory final : public proto::vq::GuestMemory {
 public:
  static Expected<std::unique_ptr<GuestMemory>, std::string> create(const GuestMemoryOptions& o);
  ~GuestMemory() override;
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  // proto::vq::GuestMemory: host pointer iff [gpa, gpa+len) is inside one region.
  uint8_t* translate(uint64_t gpa, uint64_t len) const override;

  uint64_t gpa_base() const { return gpa_base_; }
  uint64_t size() const { return total_; }
  uint64_t frames() const { return total_ / kFrameSize; }
  uint64_t reserved_frames() const { return reserved_frames_; }
  uint64_t frame_gpa(uint64_t frame) const { return gpa_base_ + frame * kFrameSize; }
  // Host pointer of a frame (frame < frames()). A block never crosses a
  // region, so [frame_ptr(f), + bytes) is contiguous for a buddy block.
  uint8_t* frame_ptr(uint64_t frame) const;
  const std::vector<MemRegion>& regions() const { return regions_; }
  const RingArea& ring(size_t q) const { return rings_.at(q); }
  size_t ring_count() const { return rings_.size(); }
  bool hugetlb() const { return hugetlb_; }
  bool private_anon() const { return private_anon_; }
  // Bytes of memfd backing the kernel holds (st_blocks * 512, all regions):
  // what "resident" means for shared guest memory (DESIGN 4). For private
  // anonymous RAM: resident pages according to mincore(2) (MADV_FREE pages
  // count until the kernel actually reclaims them).
  uint64_t backing_bytes() const;

  // The options this memory was created with (a migration creates the
  // destination's RAM as an identical twin).
  const GuestMemoryOptions& options() const { return options_; }
  // Live migration switch-over: maps `twin`'s regions over ours, at the same
  // host addresses (MAP_FIXED), and takes its fds; from here every pointer
  // into guest RAM (rings, blocks) reads and writes the twin's memory, as a
  // guest resumed on the destination does. `twin` must have the same layout
  // (created from options()); it is left without regions.
  Expected<void, std::string> adopt_backing(GuestMemory& twin);
  // Announce `other`'s host addresses (set on a twin, before its memory
  // table is sent: the destination then sees the addresses the rings will
  // have after adopt_backing()).
  void announce_addresses_of(const GuestMemory& other);

 private:
  GuestMemory() = default;
  uint64_t gpa_base_ = 0;
  uint64_t total_ = 0;
  uint64_t region_size_ = 0;
  uint64_t reserved_frames_ = 0;
  bool hugetlb_ = false;
  bool private_anon_ = false;
  std::vector<MemRegion> regions_;
  std::vector<RingArea> rings_;
  GuestMemoryOptions options_;
};

}  // namespace fph::guest
