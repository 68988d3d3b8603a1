// vhost-user header and payload parsers: happy paths, every rejection,
// encode/decode round trips, fd counts and request names.
#include <gtest/gtest.h>

#include <cstring>
#include <limits>

#include "fph/proto/vhost_user.h"

namespace vu = fph::proto::vu;
using fph::proto::ParseErrc;

namespace {

std::vector<uint8_t> bytes_u32(std::initializer_list<uint32_t> vals) {
  std::vector<uint8_t> out;
  for (uint32_t v : vals) {
    const size_t o = out.size();
    out.resize(o + 4);
    std::memcpy(out.data() + o, &v, 4);
  }
  return out;
}

vu::MemoryRegion region(uint64_t gpa, uint64_t size, uint64_t uaddr, uint64_t off = 0) {
  return vu::MemoryRegion{gpa, size, uaddr, off};
}

bool same(const vu::MemoryRegion& a, const vu::MemoryRegion& b) {
  return a.guest_phys_addr == b.guest_phys_addr && a.memory_size == b.memory_size &&
         a.userspace_addr == b.userspace_addr && a.mmap_offset == b.mmap_offset;
}

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

}  // namespace

// ---- header ----

TEST(VhostUserHeader, RoundTrip) {
  vu::Header h{5, vu::kVersion | vu::kFlagNeedReply, 40};
  auto b = vu::encode_header(h);
  auto p = vu::parse_header(b);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->request, 5u);
  EXPECT_EQ(p->flags, vu::kVersion | vu::kFlagNeedReply);
  EXPECT_EQ(p->size, 40u);
  EXPECT_TRUE(p->need_reply());
  EXPECT_FALSE(p->is_reply());
}

TEST(VhostUserHeader, ReplyFlagAccepted) {
  auto p = vu::parse_header(vu::encode_header({1, vu::kVersion | vu::kFlagReply, 8}));
  ASSERT_TRUE(p);
  EXPECT_TRUE(p->is_reply());
}

TEST(VhostUserHeader, Truncated) {
  auto b = vu::encode_header({1, 1, 0});
  auto p = vu::parse_header(std::span<const uint8_t>(b).first(11));
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, ParseErrc::Truncated);
  EXPECT_FALSE(vu::parse_header({}));
}

TEST(VhostUserHeader, ExtraBytesRejected) {
  std::vector<uint8_t> b(13, 0);
  auto h = vu::encode_header({1, 1, 0});
  std::copy(h.begin(), h.end(), b.begin());
  auto p = vu::parse_header(b);
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, ParseErrc::BadSize);
}

TEST(VhostUserHeader, BadVersion) {
  for (uint32_t v : {0u, 2u, 3u}) {
    auto p = vu::parse_header(vu::encode_header({1, v, 0}));
    ASSERT_FALSE(p) << v;
    EXPECT_EQ(p.error().code, ParseErrc::BadVersion);
    EXPECT_EQ(p.error().field, "header.flags");
  }
}

TEST(VhostUserHeader, ReservedFlagBits) {
  for (uint32_t bit = 4; bit < 32; ++bit) {
    auto p = vu::parse_header(vu::encode_header({1, vu::kVersion | (1u << bit), 0}));
    ASSERT_FALSE(p) << bit;
    EXPECT_EQ(p.error().code, ParseErrc::BadFlags);
  }
}

TEST(VhostUserHeader, SizeLimit) {
  EXPECT_TRUE(vu::parse_header(vu::encode_header({1, 1, vu::kMaxPayload})));
  auto p = vu::parse_header(vu::encode_header({1, 1, vu::kMaxPayload + 1}));
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, ParseErrc::BadSize);
  EXPECT_EQ(p.error().field, "header.size");
  EXPECT_NE(p.error().detail.find("4097"), std::string::npos) << p.error().detail;
}

TEST(VhostUserHeader, UnknownRequestIsNotAHeaderError) {
  EXPECT_TRUE(vu::parse_header(vu::encode_header({999, 1, 0})));
}

// ---- fixed payloads ----

TEST(VhostUserPayload, U64) {
  auto p = vu::parse_u64(vu::encode_u64(0x1122334455667788ull), "features");
  ASSERT_TRUE(p);
  EXPECT_EQ(*p, 0x1122334455667788ull);
  std::vector<uint8_t> seven(7), nine(9);
  auto t = vu::parse_u64(seven, "features");
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code, ParseErrc::Truncated);
  EXPECT_EQ(t.error().field, "features");
  auto l = vu::parse_u64(nine, "features");
  ASSERT_FALSE(l);
  EXPECT_EQ(l.error().code, ParseErrc::BadSize);
}

TEST(VhostUserPayload, VringState) {
  auto p = vu::parse_vring_state(vu::encode_vring_state({2, 256}));
  ASSERT_TRUE(p);
  EXPECT_EQ(p->index, 2u);
  EXPECT_EQ(p->num, 256u);
  EXPECT_FALSE(vu::parse_vring_state(std::vector<uint8_t>(4)));
  EXPECT_FALSE(vu::parse_vring_state(std::vector<uint8_t>(12)));
}

TEST(VhostUserPayload, VringAddrRoundTrip) {
  vu::VringAddr a{1, vu::kVringFlagLog, 0x7f0000001000, 0x7f0000002000, 0x7f0000003000, 0x4000};
  auto b = vu::encode_vring_addr(a);
  ASSERT_EQ(b.size(), 40u);
  auto p = vu::parse_vring_addr(b);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->index, 1u);
  EXPECT_EQ(p->flags, vu::kVringFlagLog);
  EXPECT_EQ(p->desc_user_addr, a.desc_user_addr);
  EXPECT_EQ(p->used_user_addr, a.used_user_addr);
  EXPECT_EQ(p->avail_user_addr, a.avail_user_addr);
  EXPECT_EQ(p->log_guest_addr, a.log_guest_addr);
}

TEST(VhostUserPayload, VringAddrRejects) {
  vu::VringAddr good{0, 0, 0x1000, 0x2000, 0x3000, 0};
  auto size = vu::parse_vring_addr(std::vector<uint8_t>(39));
  ASSERT_FALSE(size);
  EXPECT_EQ(size.error().code, ParseErrc::Truncated);

  auto bad = good;
  bad.flags = 2;
  auto f = vu::parse_vring_addr(vu::encode_vring_addr(bad));
  ASSERT_FALSE(f);
  EXPECT_EQ(f.error().code, ParseErrc::BadFlags);

  bad = good;
  bad.desc_user_addr += 8;
  auto d = vu::parse_vring_addr(vu::encode_vring_addr(bad));
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().field, "vring_addr.desc_user_addr");

  bad = good;
  bad.avail_user_addr += 1;
  auto av = vu::parse_vring_addr(vu::encode_vring_addr(bad));
  ASSERT_FALSE(av);
  EXPECT_EQ(av.error().field, "vring_addr.avail_user_addr");

  bad = good;
  bad.used_user_addr += 2;
  auto u = vu::parse_vring_addr(vu::encode_vring_addr(bad));
  ASSERT_FALSE(u);
  EXPECT_EQ(u.error().field, "vring_addr.used_user_addr");
}

TEST(VhostUserPayload, VringFd) {
  auto p = vu::parse_vring_fd(vu::encode_u64(3));
  ASSERT_TRUE(p);
  EXPECT_EQ(p->index, 3u);
  EXPECT_FALSE(p->no_fd);
  auto q = vu::parse_vring_fd(vu::encode_u64(0x1ff));
  ASSERT_TRUE(q);
  EXPECT_EQ(q->index, 0xffu);
  EXPECT_TRUE(q->no_fd);
  for (uint64_t bad : {0x200ull, 0x10000ull, 1ull << 63}) {
    auto r = vu::parse_vring_fd(vu::encode_u64(bad | 1));
    ASSERT_FALSE(r) << bad;
    EXPECT_EQ(r.error().code, ParseErrc::BadFlags);
  }
  EXPECT_FALSE(vu::parse_vring_fd(std::vector<uint8_t>(4)));
}

TEST(VhostUserPayload, LogRoundTripAndRejects) {
  auto p = vu::parse_log(vu::encode_log({0x10000, 0x2000}));
  ASSERT_TRUE(p);
  EXPECT_EQ(p->mmap_size, 0x10000u);
  EXPECT_EQ(p->mmap_offset, 0x2000u);
  auto z = vu::parse_log(vu::encode_log({0, 0}));
  ASSERT_FALSE(z);
  EXPECT_EQ(z.error().field, "log.mmap_size");
  auto o = vu::parse_log(vu::encode_log({2, kMax}));
  ASSERT_FALSE(o);
  EXPECT_EQ(o.error().code, ParseErrc::Overflow);
  EXPECT_FALSE(vu::parse_log(std::vector<uint8_t>(15)));
}

TEST(VhostUserPayload, DeviceState) {
  auto p = vu::parse_device_state(vu::encode_device_state({1, 0}));
  ASSERT_TRUE(p);
  EXPECT_EQ(p->direction, 1u);
  auto d = vu::parse_device_state(vu::encode_device_state({2, 0}));
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().field, "device_state.direction");
  auto ph = vu::parse_device_state(vu::encode_device_state({0, 1}));
  ASSERT_FALSE(ph);
  EXPECT_EQ(ph.error().field, "device_state.phase");
  EXPECT_FALSE(vu::parse_device_state(std::vector<uint8_t>(9)));
}

// ---- config ----

TEST(VhostUserConfig, RoundTrip) {
  vu::ConfigPayload c{4, 4, 0, {1, 2, 3, 4}};
  auto b = vu::encode_config(c);
  ASSERT_EQ(b.size(), 16u);
  auto p = vu::parse_config(b);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->offset, 4u);
  EXPECT_EQ(p->size, 4u);
  EXPECT_EQ(p->flags, 0u);
  EXPECT_EQ(p->data, (std::vector<uint8_t>{1, 2, 3, 4}));
}

TEST(VhostUserConfig, EncodePadsToSize) {
  auto b = vu::encode_config({0, 16, 0, {}});  // a GET_CONFIG request
  ASSERT_EQ(b.size(), 28u);
  auto p = vu::parse_config(b);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->data, std::vector<uint8_t>(16, 0));
}

TEST(VhostUserConfig, WholeSpaceAccepted) {
  EXPECT_TRUE(vu::parse_config(vu::encode_config({0, vu::kMaxConfigSize, 1, {}})));
  EXPECT_TRUE(vu::parse_config(vu::encode_config({255, 1, 0, {}})));
}

TEST(VhostUserConfig, Rejects) {
  auto t = vu::parse_config(std::vector<uint8_t>(11));
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code, ParseErrc::Truncated);

  auto sz = bytes_u32({0, 8, 0});  // claims 8 bytes, carries 0
  auto s = vu::parse_config(sz);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, ParseErrc::BadSize);
  EXPECT_EQ(s.error().field, "config.size");

  auto zero = vu::parse_config(bytes_u32({0, 0, 0}));
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error().field, "config.size");

  auto range = vu::parse_config(vu::encode_config({253, 4, 0, {}}));
  ASSERT_FALSE(range);
  EXPECT_EQ(range.error().code, ParseErrc::OutOfRange);

  // offset + size wraps 32 bits: must still be rejected.
  auto wrap = bytes_u32({0xfffffffcu, 4, 0, 0});
  auto w = vu::parse_config(wrap);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code, ParseErrc::OutOfRange);

  auto fl = vu::parse_config(vu::encode_config({0, 4, 2, {}}));
  ASSERT_FALSE(fl);
  EXPECT_EQ(fl.error().code, ParseErrc::BadFlags);
}

// ---- memory regions ----

TEST(VhostUserMem, TableRoundTrip) {
  std::vector<vu::MemoryRegion> rs = {region(0, 0x80000000, 0x7f0000000000, 0),
                                      region(0x100000000, 0x40000000, 0x7f1000000000, 0x1000)};
  auto b = vu::encode_mem_table(rs);
  ASSERT_EQ(b.size(), 8u + 64u);
  auto p = vu::parse_mem_table(b);
  ASSERT_TRUE(p) << p.error().message();
  ASSERT_EQ(p->size(), 2u);
  EXPECT_TRUE(same((*p)[0], rs[0]));
  EXPECT_TRUE(same((*p)[1], rs[1]));
}

TEST(VhostUserMem, EightRegionsAcceptedNineRejected) {
  std::vector<vu::MemoryRegion> rs;
  for (uint64_t i = 0; i < 9; ++i) rs.push_back(region(i << 30, 1 << 20, (i + 1) << 40));
  auto eight = vu::parse_mem_table(vu::encode_mem_table(std::span(rs).first(8)));
  ASSERT_TRUE(eight) << eight.error().message();
  EXPECT_EQ(eight->size(), 8u);
  auto nine = vu::parse_mem_table(vu::encode_mem_table(rs));
  ASSERT_FALSE(nine);
  EXPECT_EQ(nine.error().code, ParseErrc::OutOfRange);
  EXPECT_EQ(nine.error().field, "mem_table.nregions");
}

TEST(VhostUserMem, ZeroRegionsRejected) {
  auto p = vu::parse_mem_table(vu::encode_mem_table({}));
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().field, "mem_table.nregions");
}

TEST(VhostUserMem, SizeMismatch) {
  std::vector<vu::MemoryRegion> rs = {region(0, 4096, 0x10000)};
  auto b = vu::encode_mem_table(rs);
  auto shorter = std::span<const uint8_t>(b).first(b.size() - 1);
  auto t = vu::parse_mem_table(shorter);
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code, ParseErrc::Truncated);
  b.push_back(0);
  auto l = vu::parse_mem_table(b);
  ASSERT_FALSE(l);
  EXPECT_EQ(l.error().code, ParseErrc::BadSize);
  EXPECT_FALSE(vu::parse_mem_table(std::vector<uint8_t>(4)));
}

// Linux's virtio_uml sends its fixed two-slot table (72 bytes) with
// nregions = 1: the spare slot is accepted and never read, one fd expected.
TEST(VhostUserMem, SpareRoomAfterTheAnnouncedRegions) {
  std::vector<vu::MemoryRegion> rs = {region(0x1000000, 0x1f000000, 0x1000000, 0x1000000),
                                      region(kMax - 10, 4096, kMax - 10)};  // garbage in the spare slot
  auto b = vu::encode_mem_table(rs);
  ASSERT_EQ(b.size(), 72u);
  b[0] = 1;  // nregions = 1
  auto p = vu::parse_mem_table(b);
  ASSERT_TRUE(p) << p.error().message();
  ASSERT_EQ(p->size(), 1u);
  EXPECT_TRUE(same((*p)[0], rs[0]));
  EXPECT_EQ(*vu::expected_fds(static_cast<uint32_t>(vu::Request::SetMemTable), b), 1u);

  // Still bounded: whole slots only, and never more than 8 slots.
  auto ragged = b;
  ragged.resize(72 + 16);
  auto r = vu::parse_mem_table(ragged);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ParseErrc::BadSize);
  auto huge = b;
  huge.resize(8 + 32 * 9);
  auto h = vu::parse_mem_table(huge);
  ASSERT_FALSE(h);
  EXPECT_EQ(h.error().code, ParseErrc::BadSize);
  // The announced regions are still checked.
  auto two = b;
  two[0] = 2;  // now the garbage slot is announced
  auto g = vu::parse_mem_table(two);
  ASSERT_FALSE(g);
  EXPECT_EQ(g.error().field, "regions[1].memory_size");
}

TEST(VhostUserMem, RegionChecks) {
  struct Case {
    vu::MemoryRegion r;
    ParseErrc code;
    const char* what;
  } cases[] = {
      {region(0, 0, 0x1000), ParseErrc::OutOfRange, "memory_size is 0"},
      {region(kMax - 10, 4096, 0x1000), ParseErrc::Overflow, "guest_phys_addr"},
      {region(0, 4096, kMax - 10), ParseErrc::Overflow, "userspace_addr"},
      {region(0, 4096, 0x1000, kMax - 10), ParseErrc::Overflow, "mmap_offset"},
  };
  for (const auto& c : cases) {
    std::vector<vu::MemoryRegion> rs = {region(1ull << 40, 4096, 1ull << 41), c.r};
    auto p = vu::parse_mem_table(vu::encode_mem_table(rs));
    ASSERT_FALSE(p) << c.what;
    EXPECT_EQ(p.error().code, c.code) << c.what;
    EXPECT_EQ(p.error().field, "regions[1].memory_size") << c.what;
    if (c.code == ParseErrc::Overflow) {
      EXPECT_NE(p.error().detail.find(c.what), std::string::npos) << p.error().detail;
    }
  }
  // gpa + size == 2^64 exactly is an overflow of the exclusive end too.
  EXPECT_FALSE(vu::check_region(region(kMax - 4095, 4096, 0), "r"));
  EXPECT_TRUE(vu::check_region(region(kMax - 4096, 4096, 0), "r"));
}

TEST(VhostUserMem, OverlapInGuestPhysical) {
  std::vector<vu::MemoryRegion> rs = {region(0, 0x2000, 0x100000), region(0x1000, 0x1000, 0x200000)};
  auto p = vu::parse_mem_table(vu::encode_mem_table(rs));
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, ParseErrc::Overlap);
  EXPECT_EQ(p.error().field, "regions[1].guest_phys_addr");
  EXPECT_NE(p.error().message().find("regions[0]"), std::string::npos) << p.error().message();
}

TEST(VhostUserMem, OverlapInUserAddress) {
  std::vector<vu::MemoryRegion> rs = {region(0, 0x2000, 0x100000), region(0x10000, 0x1000, 0x101000)};
  auto p = vu::parse_mem_table(vu::encode_mem_table(rs));
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, ParseErrc::Overlap);
  EXPECT_EQ(p.error().field, "regions[1].userspace_addr");
}

TEST(VhostUserMem, AdjacentRegionsDoNotOverlap) {
  std::vector<vu::MemoryRegion> rs = {region(0, 0x1000, 0x100000), region(0x1000, 0x1000, 0x101000)};
  EXPECT_TRUE(vu::parse_mem_table(vu::encode_mem_table(rs)));
}

TEST(VhostUserMem, SingleRegion) {
  auto r = region(0x100000, 0x200000, 0x7f0000000000, 0x100000);
  auto b = vu::encode_single_region(r);
  ASSERT_EQ(b.size(), 40u);
  auto p = vu::parse_single_region(b);
  ASSERT_TRUE(p);
  EXPECT_TRUE(same(*p, r));
  auto bad = vu::parse_single_region(vu::encode_single_region(region(0, 0, 0)));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().field, "region.memory_size");
  EXPECT_FALSE(vu::parse_single_region(std::vector<uint8_t>(32)));
  EXPECT_FALSE(vu::parse_single_region(std::vector<uint8_t>(48)));
}

// ---- fd counts ----

TEST(VhostUserFds, ExpectedCounts) {
  using R = vu::Request;
  auto req = [](R r) { return static_cast<uint32_t>(r); };
  std::vector<vu::MemoryRegion> rs = {region(0, 4096, 0x10000), region(0x10000, 4096, 0x20000),
                                      region(0x20000, 4096, 0x30000)};
  auto table = vu::encode_mem_table(rs);
  EXPECT_EQ(*vu::expected_fds(req(R::SetMemTable), table), 3u);
  EXPECT_EQ(*vu::expected_fds(req(R::AddMemReg), {}), 1u);
  EXPECT_EQ(*vu::expected_fds(req(R::RemMemReg), {}), 0u);
  EXPECT_EQ(*vu::expected_fds(req(R::SetVringKick), vu::encode_u64(1)), 1u);
  EXPECT_EQ(*vu::expected_fds(req(R::SetVringCall), vu::encode_u64(0x101)), 0u);
  EXPECT_EQ(*vu::expected_fds(req(R::SetVringErr), vu::encode_u64(0)), 1u);
  for (R r : {R::SetLogBase, R::SetLogFd, R::SetBackendReqFd, R::SetDeviceStateFd,
              R::SetInflightFd}) {
    EXPECT_EQ(*vu::expected_fds(req(r), {}), 1u) << vu::request_name(req(r));
  }
  for (R r : {R::GetFeatures, R::SetFeatures, R::SetOwner, R::SetVringNum, R::SetVringAddr,
              R::GetVringBase, R::GetConfig, R::SetConfig, R::SetStatus, R::CheckDeviceState}) {
    EXPECT_EQ(*vu::expected_fds(req(r), {}), 0u) << vu::request_name(req(r));
  }
  EXPECT_EQ(*vu::expected_fds(1000, {}), 0u);
}

TEST(VhostUserFds, PayloadErrorsPropagate) {
  auto t = vu::expected_fds(static_cast<uint32_t>(vu::Request::SetMemTable), std::vector<uint8_t>(3));
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code, ParseErrc::Truncated);
  auto k = vu::expected_fds(static_cast<uint32_t>(vu::Request::SetVringKick), vu::encode_u64(0x400));
  ASSERT_FALSE(k);
  EXPECT_EQ(k.error().code, ParseErrc::BadFlags);
}

TEST(VhostUserFds, CheckFds) {
  const uint32_t rem = static_cast<uint32_t>(vu::Request::RemMemReg);
  EXPECT_TRUE(vu::check_fds(rem, {}, 0));
  EXPECT_TRUE(vu::check_fds(rem, {}, 1));
  auto two = vu::check_fds(rem, {}, 2);
  ASSERT_FALSE(two);
  EXPECT_EQ(two.error().code, ParseErrc::BadFdCount);
  EXPECT_EQ(two.error().field, "REM_MEM_REG.fds");
  EXPECT_NE(two.error().detail.find("0..1"), std::string::npos);

  const uint32_t add = static_cast<uint32_t>(vu::Request::AddMemReg);
  EXPECT_TRUE(vu::check_fds(add, {}, 1));
  auto none = vu::check_fds(add, {}, 0);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().field, "ADD_MEM_REG.fds");
  EXPECT_FALSE(vu::check_fds(static_cast<uint32_t>(vu::Request::GetFeatures), {}, 1));
}

// ---- names ----

TEST(VhostUserNames, AllKnownIds) {
  EXPECT_EQ(vu::request_name(1), "GET_FEATURES");
  EXPECT_EQ(vu::request_name(5), "SET_MEM_TABLE");
  EXPECT_EQ(vu::request_name(21), "SET_BACKEND_REQ_FD");
  EXPECT_EQ(vu::request_name(37), "ADD_MEM_REG");
  EXPECT_EQ(vu::request_name(38), "REM_MEM_REG");
  EXPECT_EQ(vu::request_name(42), "SET_DEVICE_STATE_FD");
  EXPECT_EQ(vu::request_name(43), "CHECK_DEVICE_STATE");
  for (uint32_t i = 1; i <= vu::kMaxRequest; ++i) {
    const auto n = vu::request_name(i);
    EXPECT_FALSE(n.empty()) << i;
    EXPECT_EQ(n.find("UNKNOWN"), std::string::npos) << i;
  }
  EXPECT_EQ(vu::request_name(0), "UNKNOWN(0)");
  EXPECT_EQ(vu::request_name(44), "UNKNOWN(44)");
  EXPECT_EQ(vu::request_name(0xffffffffu), "UNKNOWN(4294967295)");
}

TEST(ParseErrorText, MessageNamesFieldAndDetail) {
  fph::proto::ParseError e{ParseErrc::Overflow, "regions[2].memory_size", "gpa + size overflows"};
  EXPECT_EQ(e.message(), "regions[2].memory_size: gpa + size overflows");
  EXPECT_EQ(fph::proto::to_string(ParseErrc::Overlap), "overlap");
}

TEST(VhostUserReplies, WhichRequestsAlwaysReplyAndTheirErrorForms) {
  using R = vu::Request;
  auto id = [](R r) { return static_cast<uint32_t>(r); };
  for (R r : {R::GetFeatures, R::GetProtocolFeatures, R::GetVringBase, R::SetLogBase, R::GetConfig,
              R::GetQueueNum, R::GetMaxMemSlots, R::GetStatus, R::SetDeviceStateFd,
              R::CheckDeviceState, R::GetInflightFd, R::PostcopyAdvise})
    EXPECT_TRUE(vu::always_replies(id(r))) << vu::request_name(id(r));
  for (R r : {R::SetFeatures, R::SetOwner, R::SetMemTable, R::SetVringNum, R::SetVringKick,
              R::SetConfig, R::SetStatus, R::AddMemReg})
    EXPECT_FALSE(vu::always_replies(id(r))) << vu::request_name(id(r));
  EXPECT_FALSE(vu::always_replies(0));
  EXPECT_FALSE(vu::always_replies(999));
  // Error forms: GET_CONFIG's empty config (offset 0, size 0), u64 1, 0x101.
  auto cfg = vu::error_reply(id(R::GetConfig));
  ASSERT_TRUE(cfg);
  EXPECT_EQ(*cfg, std::vector<uint8_t>(12, 0));
  EXPECT_EQ(vu::error_reply(id(R::SetLogBase)), vu::encode_u64(1));
  EXPECT_EQ(vu::error_reply(id(R::CheckDeviceState)), vu::encode_u64(1));
  EXPECT_EQ(vu::error_reply(id(R::SetDeviceStateFd)), vu::encode_u64(0x101));
  // No error form: the session must close instead.
  for (R r : {R::GetFeatures, R::GetProtocolFeatures, R::GetVringBase, R::GetQueueNum, R::GetStatus})
    EXPECT_FALSE(vu::error_reply(id(r))) << vu::request_name(id(r));
  EXPECT_FALSE(vu::error_reply(id(R::SetOwner)));
}
