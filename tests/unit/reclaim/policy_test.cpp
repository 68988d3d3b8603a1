// Per-node policy (DESIGN section 4): lazy with headroom, eager under pressure,
// shared backings never lazy.
#include "fph/reclaim/policy.h"

#include <gtest/gtest.h>

#include <fstream>
#include <string>

namespace fph::reclaim {
namespace {

constexpr uint64_t kGiB = 1ull << 30;

NodeMemory mem(uint64_t total, uint64_t free_bytes, double psi = 0.0) {
  NodeMemory m;
  m.total_bytes = total;
  m.free_bytes = free_bytes;
  m.psi_some_avg10 = psi;
  m.valid = true;
  return m;
}

TEST(Policy, UnderPressure) {
  const NodePolicy p;  // 10 % free, PSI 10
  EXPECT_FALSE(under_pressure(p, NodeMemory{}));  // unknown: no pressure
  EXPECT_FALSE(under_pressure(p, mem(10 * kGiB, 5 * kGiB)));
  EXPECT_TRUE(under_pressure(p, mem(10 * kGiB, kGiB / 2)));
  EXPECT_FALSE(under_pressure(p, mem(10 * kGiB, kGiB)));  // exactly at the watermark
  EXPECT_TRUE(under_pressure(p, mem(10 * kGiB, 5 * kGiB, 10.5)));
  EXPECT_FALSE(under_pressure(p, mem(10 * kGiB, 5 * kGiB, 10.0)));
  EXPECT_FALSE(under_pressure(p, mem(0, 0)));  // no total: free fraction unknown
  NodePolicy strict;
  strict.pressure_free_fraction = 0.6;
  EXPECT_TRUE(under_pressure(strict, mem(10 * kGiB, 5 * kGiB)));
}

TEST(Policy, ChooseMatrix) {
  const NodeMemory calm = mem(10 * kGiB, 8 * kGiB);
  const NodeMemory pressed = mem(10 * kGiB, 8 * kGiB, 50.0);
  struct Row {
    PrivateMode mode;
    bool pressure;
    bool prefer_madvise;
    Backing backing;
    Method want;
  };
  const Row rows[] = {
      {PrivateMode::Auto, false, false, Backing::PrivateAnon, Method::MadvFree},
      {PrivateMode::Auto, true, false, Backing::PrivateAnon, Method::MadvDontneed},
      {PrivateMode::Eager, false, false, Backing::PrivateAnon, Method::MadvDontneed},
      {PrivateMode::Eager, true, false, Backing::PrivateAnon, Method::MadvDontneed},
      {PrivateMode::Lazy, false, false, Backing::PrivateAnon, Method::MadvFree},
      {PrivateMode::Lazy, true, false, Backing::PrivateAnon, Method::MadvFree},
      {PrivateMode::Lazy, false, true, Backing::PrivateAnon, Method::MadvFree},
      // Shared backings ignore lazy/eager: only punch hole / MADV_REMOVE free them.
      {PrivateMode::Auto, false, false, Backing::Shmem, Method::PunchHole},
      {PrivateMode::Lazy, false, false, Backing::Shmem, Method::PunchHole},
      {PrivateMode::Eager, true, false, Backing::Shmem, Method::PunchHole},
      {PrivateMode::Auto, false, true, Backing::Shmem, Method::MadvRemove},
      {PrivateMode::Eager, true, true, Backing::Shmem, Method::MadvRemove},
      {PrivateMode::Lazy, false, false, Backing::Hugetlb, Method::PunchHole},
      {PrivateMode::Auto, true, true, Backing::Hugetlb, Method::PunchHole},
  };
  PolicyTable table(2);
  for (const Row& r : rows) {
    NodePolicy p;
    p.mode = r.mode;
    p.prefer_madvise = r.prefer_madvise;
    table.set(1, p);
    EXPECT_EQ(table.choose(r.backing, 1, r.pressure ? pressed : calm), r.want)
        << "mode " << static_cast<int>(r.mode) << " pressure " << r.pressure << " madvise "
        << r.prefer_madvise << " " << to_string(r.backing);
    // Node 0 keeps the defaults (Auto, punch hole).
    EXPECT_EQ(table.choose(Backing::PrivateAnon, 0, calm), Method::MadvFree);
  }
}

TEST(Policy, TableOutOfRangeUsesDefaults) {
  NodePolicy defaults;
  defaults.mode = PrivateMode::Eager;
  PolicyTable table(2, defaults);
  EXPECT_EQ(table.node_count(), 2);
  EXPECT_EQ(table.get(7).mode, PrivateMode::Eager);
  EXPECT_EQ(table.get(-1).mode, PrivateMode::Eager);
  NodePolicy lazy;
  lazy.mode = PrivateMode::Lazy;
  table.set(7, lazy);  // ignored
  EXPECT_EQ(table.get(7).mode, PrivateMode::Eager);
  table.set(1, lazy);
  EXPECT_EQ(table.get(1).mode, PrivateMode::Lazy);
  EXPECT_EQ(table.get(0).mode, PrivateMode::Eager);
  EXPECT_EQ(table.choose(Backing::PrivateAnon, 9, mem(kGiB, kGiB)), Method::MadvDontneed);
}

uint64_t proc_meminfo_kb(const std::string& key) {
  std::ifstream in("/proc/meminfo");
  std::string k;
  uint64_t v = 0;
  while (in >> k) {
    if (k == key) {
      in >> v;
      return v;
    }
    in.ignore(1 << 10, '\n');
  }
  return 0;
}

TEST(Policy, SysfsProbeReadsNodeZero) {
  SysfsNodeMemoryProbe probe;
  const NodeMemory m = probe.read(0);
  ASSERT_TRUE(m.valid);
  EXPECT_GT(m.total_bytes, 0u);
  EXPECT_LE(m.free_bytes, m.total_bytes);
  EXPECT_GE(m.psi_some_avg10, 0.0);
}

TEST(Policy, SysfsProbeFallsBackToProcMeminfoForUnknownNode) {
  SysfsNodeMemoryProbe probe;
  const NodeMemory m = probe.read(4095);  // no such node directory
  ASSERT_TRUE(m.valid);
  EXPECT_EQ(m.total_bytes, proc_meminfo_kb("MemTotal:") * 1024);
  EXPECT_LE(m.free_bytes, m.total_bytes);
}

}  // namespace
}  // namespace fph::reclaim
