// plan_request: validation and translation of reporting and inflate chains.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "fph/daemon/queue_service.h"

using namespace fph;
using namespace fph::daemon;
using proto::balloon::QueueRole;
using reclaim::SkipReason;

namespace {

constexpr uint64_t MiB = 1 << 20;

std::shared_ptr<MappedRegion> region(uint64_t gpa, uint64_t size, uint64_t mmap_offset,
                                     const reclaim::Topology& topo, int node = -1) {
  UniqueFd fd(memfd_create("test-guest", MFD_CLOEXEC));
  EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(mmap_offset + size)), 0);
  auto m = map_region({gpa, size, 0x40000000 + gpa, mmap_offset}, std::move(fd), topo);
  EXPECT_TRUE(m.has_value());
  if (node >= 0) (*m)->node = node;
  return *m;
}

proto::vq::Chain chain(std::initializer_list<proto::vq::Buffer> bufs) {
  proto::vq::Chain c;
  c.head = 3;
  for (const auto& b : bufs) {
    c.buffers.push_back(b);
    c.total_len += b.len;
  }
  return c;
}

uint64_t skipped(const RequestPlan& p, SkipReason r) {
  uint64_t n = 0;
  for (const auto& s : p.skipped)
    if (s.reason == r) n += s.bytes;
  return n;
}

}  // namespace

TEST(PlanRequest, ValidRangesBecomeSortedTargetsWithFileOffsets) {
  auto topo = reclaim::Topology::from_system();
  auto r0 = region(0, 16 * MiB, 2 * MiB, topo);
  MemoryTable t({r0});
  auto c = chain({{8 * MiB, 2 * MiB, true}, {0, 2 * MiB, true}, {4 * MiB, 4 * MiB, true}});
  auto p = plan_request(c, QueueRole::Reporting, t, SkipReason::None, topo);
  EXPECT_TRUE(p.errors.empty());
  ASSERT_EQ(p.targets(), 3u);
  const auto& v = p.per_node[0];
  EXPECT_EQ(v[0].fd_offset, 2 * MiB);  // mmap_offset + (gpa - region gpa)
  EXPECT_EQ(v[1].fd_offset, 6 * MiB);
  EXPECT_EQ(v[2].fd_offset, 10 * MiB);
  EXPECT_EQ(v[0].addr, r0->host_base());
  EXPECT_EQ(v[0].fd, r0->fd.get());
  EXPECT_EQ(p.reported_per_node[0], 8 * MiB);
  EXPECT_EQ(p.regions.size(), 1u);
}

TEST(PlanRequest, InvalidRangesAreSkippedAndNamed) {
  auto topo = reclaim::Topology::from_system();
  MemoryTable t({region(0, 4 * MiB, 0, topo), region(4 * MiB, 4 * MiB, 0, topo)});
  auto c = chain({
      {2 * MiB, 4 * MiB, true},   // straddles the two regions
      {64 * MiB, 2 * MiB, true},  // outside guest memory
      {0, 2 * MiB, false},        // not device-writable
      {~0ull - 4095, 4096, true}, // overflows
      {4096 + 1, 4096, true},     // misaligned: skipped, not an error
      {4 * MiB, 2 * MiB, true},   // fine
  });
  auto p = plan_request(c, QueueRole::Reporting, t, SkipReason::None, topo);
  ASSERT_EQ(p.errors.size(), 4u);
  EXPECT_NE(p.errors[0].find("straddles_regions"), std::string::npos) << p.errors[0];
  EXPECT_NE(p.errors[1].find("outside_guest_memory"), std::string::npos) << p.errors[1];
  EXPECT_NE(p.errors[2].find("not device-writable"), std::string::npos) << p.errors[2];
  EXPECT_EQ(p.error_reasons[3], "range_overflow");
  EXPECT_EQ(skipped(p, SkipReason::Invalid), 4 * MiB + 2 * MiB + 2 * MiB + 4096);
  EXPECT_EQ(skipped(p, SkipReason::Misaligned), 4096u);
  ASSERT_EQ(p.targets(), 1u);
  EXPECT_EQ(p.per_node[0][0].length, 2 * MiB);
}

TEST(PlanRequest, SessionSkipReasonsDiscardNothing) {
  auto topo = reclaim::Topology::from_system();
  MemoryTable t({region(0, 8 * MiB, 0, topo)});
  auto c = chain({{0, 2 * MiB, true}, {2 * MiB, 2 * MiB, true}});
  for (auto why : {SkipReason::Poisoned, SkipReason::Paused, SkipReason::Stopped}) {
    auto p = plan_request(c, QueueRole::Reporting, t, why, topo);
    EXPECT_EQ(p.targets(), 0u);
    EXPECT_EQ(skipped(p, why), 4 * MiB);
    EXPECT_EQ(p.reported_per_node[0], 4 * MiB);  // still counted as reported
  }
}

TEST(PlanRequest, SplitsByHostNodeOnSyntheticTopology) {
  auto topo = reclaim::Topology::from_synthetic("node:4 core:1 pu:1");
  ASSERT_TRUE(topo);
  MemoryTable t({region(0, 4 * MiB, 0, *topo, 0), region(4 * MiB, 4 * MiB, 0, *topo, 2),
                 region(8 * MiB, 4 * MiB, 0, *topo, 3)});
  auto c = chain({{8 * MiB, 2 * MiB, true}, {0, 2 * MiB, true}, {4 * MiB, 2 * MiB, true},
                  {10 * MiB, 2 * MiB, true}});
  auto p = plan_request(c, QueueRole::Reporting, t, SkipReason::None, *topo);
  ASSERT_EQ(p.per_node.size(), 4u);
  EXPECT_EQ(p.per_node[0].size(), 1u);
  EXPECT_EQ(p.per_node[1].size(), 0u);
  EXPECT_EQ(p.per_node[2].size(), 1u);
  EXPECT_EQ(p.per_node[3].size(), 2u);
  for (int n : {0, 2, 3})
    for (const auto& d : p.per_node[n]) EXPECT_EQ(d.node, n);
  EXPECT_EQ(p.reported_per_node[3], 4 * MiB);
}

TEST(PlanRequest, InflatePfnArraysAreMergedIntoRuns) {
  auto topo = reclaim::Topology::from_system();
  auto r = region(0, 8 * MiB, 0, topo);
  MemoryTable t({r});
  // PFN array stored in guest memory at gpa 7 MiB: pages 16,17,18 and 100.
  uint32_t pfns[] = {16, 17, 18, 100};
  std::memcpy(r->host_base() + 7 * MiB, pfns, sizeof pfns);
  auto c = chain({{7 * MiB, sizeof pfns, false}});
  auto p = plan_request(c, QueueRole::Inflate, t, SkipReason::None, topo);
  EXPECT_TRUE(p.errors.empty());
  ASSERT_EQ(p.targets(), 2u);
  EXPECT_EQ(p.per_node[0][0].fd_offset, 16u * 4096);
  EXPECT_EQ(p.per_node[0][0].length, 3u * 4096);
  EXPECT_EQ(p.per_node[0][1].fd_offset, 100u * 4096);
}

TEST(PlanRequest, DeflateDoesNothing) {
  auto topo = reclaim::Topology::from_system();
  MemoryTable t({region(0, 4 * MiB, 0, topo)});
  auto p = plan_request(chain({{0, 8, false}}), QueueRole::Deflate, t, SkipReason::None, topo);
  EXPECT_EQ(p.targets(), 0u);
  EXPECT_TRUE(p.errors.empty());
}
