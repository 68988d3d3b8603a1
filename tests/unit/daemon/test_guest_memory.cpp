// MemoryTable over real memfd regions mapped by map_region.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fph/daemon/guest_memory.h"

using namespace fph;
using namespace fph::daemon;

namespace {

UniqueFd memfd(uint64_t size) {
  UniqueFd fd(memfd_create("test-guest", MFD_CLOEXEC));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(size)), 0);
  return fd;
}

std::shared_ptr<MappedRegion> region(uint64_t gpa, uint64_t size, uint64_t uaddr, uint64_t mmap_offset,
                                     const reclaim::Topology& topo) {
  proto::vu::MemoryRegion r{gpa, size, uaddr, mmap_offset};
  auto m = map_region(r, memfd(mmap_offset + size), topo);
  EXPECT_TRUE(m.has_value()) << (m ? "" : m.error());
  return m ? *m : nullptr;
}

}  // namespace

TEST(GuestMemory, TranslateInsideOneRegion) {
  auto topo = reclaim::Topology::from_system();
  MemoryTable t({region(0, 4 << 20, 0x7f0000000000, 0, topo),
                 region(4 << 20, 4 << 20, 0x7f1000000000, 1 << 20, topo)});
  EXPECT_EQ(t.total_bytes(), 8u << 20);
  auto a = t.translate_range(4096, 8192);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->region_offset, 4096u);
  auto b = t.translate_range((4 << 20) + 4096, 4096);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->region_offset, 4096u);
  EXPECT_EQ(b->region->desc.mmap_offset, 1u << 20);
  // The host pointer really is the region's bytes: write through it, read via the fd.
  b->host[0] = 0x5a;
  uint8_t byte = 0;
  ASSERT_EQ(pread(b->region->fd.get(), &byte, 1, (1 << 20) + 4096), 1);
  EXPECT_EQ(byte, 0x5a);
}

TEST(GuestMemory, RejectsStraddleUnmappedOverflow) {
  auto topo = reclaim::Topology::from_system();
  MemoryTable t({region(0, 4 << 20, 0x10000000, 0, topo), region(4 << 20, 4 << 20, 0x20000000, 0, topo)});
  auto s = t.translate_range((4 << 20) - 4096, 8192);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error(), RangeErrc::Straddles);
  auto u = t.translate_range(64 << 20, 4096);
  ASSERT_FALSE(u);
  EXPECT_EQ(u.error(), RangeErrc::Unmapped);
  auto o = t.translate_range(~0ull - 10, 4096);
  ASSERT_FALSE(o);
  EXPECT_EQ(o.error(), RangeErrc::Overflow);
  EXPECT_EQ(t.translate(~0ull, 2), nullptr);
  EXPECT_EQ(t.translate(0, 0), t.translate_range(0, 0)->host);
}

TEST(GuestMemory, UserAddressesAndLookup) {
  auto topo = reclaim::Topology::from_system();
  MemoryTable t({region(0, 4 << 20, 0x10000000, 0, topo)});
  EXPECT_NE(t.translate_user(0x10000000 + 100, 16), nullptr);
  EXPECT_EQ(t.translate_user(0x10000000 + (4 << 20) - 8, 16), nullptr);
  EXPECT_EQ(t.find({0, 4 << 20, 0x10000000, 0}), 0);
  EXPECT_EQ(t.find({0, 4 << 20, 0x10001000, 0}), -1);
  EXPECT_TRUE(t.overlaps({(4 << 20) - 4096, 4096, 0x50000000, 0}));
  EXPECT_TRUE(t.overlaps({8 << 20, 4096, 0x10000000 + 4096, 0}));  // user address overlap
  EXPECT_FALSE(t.overlaps({4 << 20, 4096, 0x50000000, 0}));
}

TEST(GuestMemory, MapRegionRejectsUnalignedOffsetAndBadFd) {
  auto topo = reclaim::Topology::from_system();
  auto r = map_region({0, 4096, 0, 100}, memfd(8192), topo);
  EXPECT_FALSE(r);
  auto bad = map_region({0, 4096, 0, 0}, UniqueFd(-1), topo);
  EXPECT_FALSE(bad);
}
