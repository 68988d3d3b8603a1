// Topology behind its seam: synthetic and XML topologies make four-node logic
// testable on a one-node machine (STYLE pattern 8).
#include "fph/reclaim/topology.h"

#include <gtest/gtest.h>
#include <hwloc.h>
#include <numaif.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "test_memory.h"

namespace fph::reclaim {
namespace {

TEST(Topology, SyntheticFourNodesTwoCpusEach) {
  auto t = Topology::from_synthetic("node:4 core:2 pu:1");
  ASSERT_TRUE(t.has_value()) << t.error();
  EXPECT_TRUE(t->is_synthetic());
  ASSERT_EQ(t->node_count(), 4);
  std::set<int> all_cpus;
  for (int i = 0; i < 4; ++i) {
    const NodeInfo& n = t->nodes()[static_cast<size_t>(i)];
    EXPECT_EQ(n.index, i);
    EXPECT_EQ(n.os_index, i);
    EXPECT_EQ(n.cpus, (std::vector<int>{2 * i, 2 * i + 1}));
    EXPECT_GT(n.total_bytes, 0u);  // hwloc gives synthetic nodes 1 GiB by default
    EXPECT_EQ(t->index_of_os_node(n.os_index), i);
    all_cpus.insert(n.cpus.begin(), n.cpus.end());
  }
  EXPECT_EQ(all_cpus.size(), 8u);
  EXPECT_EQ(t->index_of_os_node(4), -1);
}

TEST(Topology, SyntheticWithPackagesAndMemory) {
  auto t = Topology::from_synthetic("pack:2 node:2(memory=2GB) core:2 pu:2");
  ASSERT_TRUE(t.has_value()) << t.error();
  ASSERT_EQ(t->node_count(), 4);
  for (const auto& n : t->nodes()) {
    EXPECT_EQ(n.cpus.size(), 4u);
    EXPECT_EQ(n.total_bytes, 2000000000ull);  // hwloc's GB is decimal
  }
}

TEST(Topology, SyntheticAddressLookupReturnsFallback) {
  auto t = Topology::from_synthetic("node:4 core:2 pu:1");
  ASSERT_TRUE(t.has_value());
  int x = 1;
  EXPECT_EQ(t->node_of_address(&x, 3), 3);
  EXPECT_EQ(t->node_of_address(&x), 0);
}

TEST(Topology, InvalidSyntheticIsAnError) {
  auto t = Topology::from_synthetic("this is not a topology");
  ASSERT_FALSE(t.has_value());
  EXPECT_FALSE(t.error().empty());
}

// Exports a synthetic topology with hwloc itself, as `lstopo --of xml` would.
std::string export_xml(const char* synthetic) {
  hwloc_topology_t raw = nullptr;
  if (hwloc_topology_init(&raw) != 0) return {};
  std::unique_ptr<hwloc_topology, void (*)(hwloc_topology_t)> t(raw, hwloc_topology_destroy);
  if (hwloc_topology_set_synthetic(raw, synthetic) != 0) return {};
  if (hwloc_topology_load(raw) != 0) return {};
  char* buf = nullptr;
  int len = 0;
  if (hwloc_topology_export_xmlbuffer(raw, &buf, &len, 0) != 0) return {};
  std::string xml(buf);  // len counts the terminating NUL
  hwloc_free_xmlbuffer(raw, buf);
  return xml;
}

TEST(Topology, XmlRoundTripMatchesSynthetic) {
  const char* desc = "pack:2 node:2 core:3 pu:1";
  const std::string xml = export_xml(desc);
  ASSERT_FALSE(xml.empty());
  auto synth = Topology::from_synthetic(desc);
  auto from_xml = Topology::from_xml_buffer(xml);
  ASSERT_TRUE(synth.has_value()) << synth.error();
  ASSERT_TRUE(from_xml.has_value()) << from_xml.error();
  // An XML file describes some machine, not necessarily this one.
  EXPECT_TRUE(from_xml->is_synthetic());
  ASSERT_EQ(from_xml->node_count(), 4);
  for (size_t i = 0; i < 4; ++i) {
    const auto& a = synth->nodes()[i];
    const auto& b = from_xml->nodes()[i];
    EXPECT_EQ(a.index, b.index);
    EXPECT_EQ(a.os_index, b.os_index);
    EXPECT_EQ(a.cpus, b.cpus);
    EXPECT_EQ(a.total_bytes, b.total_bytes);
    EXPECT_EQ(b.cpus.size(), 3u);
  }
}

TEST(Topology, GarbageXmlIsAnError) {
  auto t = Topology::from_xml_buffer("<not-hwloc/>");
  EXPECT_FALSE(t.has_value());
  auto empty = Topology::from_xml_buffer("");
  EXPECT_FALSE(empty.has_value());
}

TEST(Topology, FromSystemHasNodesAndCpus) {
  const Topology t = Topology::from_system();
  EXPECT_FALSE(t.is_synthetic());
  ASSERT_GE(t.node_count(), 1);
  size_t cpus = 0;
  for (int i = 0; i < t.node_count(); ++i) {
    const auto& n = t.nodes()[static_cast<size_t>(i)];
    EXPECT_EQ(n.index, i);
    EXPECT_EQ(t.index_of_os_node(n.os_index), i);
    cpus += n.cpus.size();
  }
  EXPECT_GE(cpus, 1u);
}

TEST(Topology, FromSystemLocatesAPopulatedPage) {
  const Topology t = Topology::from_system();
  test::PrivateAnon m(test::kPage);  // populated by the pattern fill
  // Container seccomp profiles commonly deny get_mempolicy without
  // CAP_SYS_NICE; node_of_address then falls back, which is not what this
  // test is about.
  int os_node = -1;
  if (syscall(SYS_get_mempolicy, &os_node, nullptr, 0UL, m.data(),
              MPOL_F_NODE | MPOL_F_ADDR) != 0) {
    GTEST_SKIP() << "get_mempolicy unavailable: " << std::strerror(errno);
  }
  EXPECT_EQ(t.node_of_address(m.data(), -1), t.index_of_os_node(os_node));
  const int node = t.node_of_address(m.data(), -1);
  EXPECT_GE(node, 0);
  EXPECT_LT(node, t.node_count());
}

}  // namespace
}  // namespace fph::reclaim
