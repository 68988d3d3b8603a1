// Split virtqueue: a DriverRing and a DeviceRing over the same real memory (a
// memfd mapped twice, one view per side), plus hand-crafted malicious rings.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "fph/common/checked.h"
#include "fph/common/unique_fd.h"
#include "fph/proto/virtqueue.h"

namespace vq = fph::proto::vq;

namespace {

// Guest memory: one memfd, mapped once for the "driver" and once for the
// "device"; gpa = offset into the file.
class MemfdGuest : public vq::GuestMemory {
 public:
  explicit MemfdGuest(size_t size) : size_(size) {
    fd_.reset(::memfd_create("fph-test-guest", MFD_CLOEXEC));
    EXPECT_TRUE(fd_.valid());
    EXPECT_EQ(::ftruncate(fd_.get(), static_cast<off_t>(size)), 0);
    driver_ = map();
    device_ = map();
  }
  ~MemfdGuest() override {
    ::munmap(driver_, size_);
    ::munmap(device_, size_);
  }
  uint8_t* translate(uint64_t gpa, uint64_t len) const override {
    return fph::range_within(gpa, len, 0, size_) ? device_ + gpa : nullptr;
  }
  uint8_t* drv(uint64_t gpa) const { return driver_ + gpa; }
  uint8_t* dev(uint64_t gpa) const { return device_ + gpa; }
  size_t size() const { return size_; }

 private:
  uint8_t* map() {
    void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
    EXPECT_NE(p, MAP_FAILED);
    return static_cast<uint8_t*>(p);
  }
  size_t size_;
  fph::UniqueFd fd_;
  uint8_t* driver_ = nullptr;
  uint8_t* device_ = nullptr;
};

constexpr uint64_t kDescGpa = 0x10000;
constexpr uint64_t kAvailGpa = 0x20000;
constexpr uint64_t kUsedGpa = 0x30000;
constexpr uint64_t kIndirectGpa = 0x40000;
constexpr size_t kMemSize = 1 << 20;

template <class T>
void put(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}
template <class T>
T get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

void put_desc(uint8_t* table, uint32_t i, uint64_t addr, uint32_t len, uint16_t flags,
              uint16_t next) {
  uint8_t* p = table + 16 * size_t{i};
  put(p, addr);
  put(p + 8, len);
  put(p + 12, flags);
  put(p + 14, next);
}

// A device-side fixture whose rings are written by hand (the malicious
// driver).
struct HandRing {
  MemfdGuest mem{kMemSize};
  uint16_t num;
  uint8_t* desc = mem.dev(kDescGpa);
  uint8_t* avail = mem.dev(kAvailGpa);
  uint8_t* used = mem.dev(kUsedGpa);

  explicit HandRing(uint16_t n) : num(n) {}

  vq::DeviceRing device(bool indirect = false, bool event_idx = false) const {
    return vq::DeviceRing(num, desc, avail, used, 0, indirect, event_idx);
  }
  void d(uint32_t i, uint64_t addr, uint32_t len, uint16_t flags = 0, uint16_t next = 0) {
    put_desc(desc, i, addr, len, flags, next);
  }
  void post(uint16_t slot, uint16_t head) { put<uint16_t>(avail + 4 + 2 * size_t{slot}, head); }
  void set_avail_idx(uint16_t idx) { put<uint16_t>(avail + 2, idx); }
  void set_avail_flags(uint16_t f) { put<uint16_t>(avail, f); }
  void set_used_event(uint16_t v) { put<uint16_t>(avail + 4 + 2 * size_t{num}, v); }
  uint16_t avail_event() const { return get<uint16_t>(used + 4 + 8 * size_t{num}); }

  vq::ChainErrc walk_error(uint16_t head, bool indirect = false) const {
    auto ring = device(indirect);
    auto c = ring.walk(head, mem);
    EXPECT_FALSE(c) << "walk unexpectedly succeeded";
    return c ? vq::ChainErrc::TooLong : c.error().code;
  }
};

// Both sides over the same memory, through different mappings.
struct Pair {
  MemfdGuest mem{kMemSize};
  vq::DriverRing drv;
  vq::DeviceRing dev;
  explicit Pair(uint16_t num, bool event_idx = false)
      : drv(num, mem.drv(kDescGpa), mem.drv(kAvailGpa), mem.drv(kUsedGpa)),
        dev(num, mem.dev(kDescGpa), mem.dev(kAvailGpa), mem.dev(kUsedGpa), 0, true, event_idx) {}
};

}  // namespace

TEST(Virtqueue, SizesAndValidity) {
  EXPECT_EQ(vq::desc_table_bytes(256), 4096u);
  EXPECT_EQ(vq::avail_ring_bytes(256), 518u);
  EXPECT_EQ(vq::used_ring_bytes(256), 2054u);
  for (uint32_t ok : {1u, 2u, 32u, 256u, 32768u}) EXPECT_TRUE(vq::valid_queue_size(ok)) << ok;
  for (uint32_t bad : {0u, 3u, 100u, 65536u, 32769u}) EXPECT_FALSE(vq::valid_queue_size(bad)) << bad;
}

TEST(Virtqueue, DriverToDeviceRoundTrip) {
  Pair p(16);
  EXPECT_EQ(p.drv.free_count(), 16);
  const vq::Buffer bufs[] = {{0x1000, 100, false}, {0x2000, 200, false}, {0x3000, 4096, true}};
  auto head = p.drv.add_chain(bufs);
  ASSERT_TRUE(head);
  EXPECT_EQ(p.drv.free_count(), 13);
  EXPECT_EQ(p.dev.avail_idx(), 1);

  auto popped = p.dev.pop_avail();
  ASSERT_TRUE(popped);
  ASSERT_TRUE(popped->has_value());
  EXPECT_EQ(**popped, *head);
  auto none = p.dev.pop_avail();
  ASSERT_TRUE(none);
  EXPECT_FALSE(none->has_value());

  auto chain = p.dev.walk(**popped, p.mem);
  ASSERT_TRUE(chain) << chain.error().message();
  EXPECT_EQ(chain->head, *head);
  EXPECT_FALSE(chain->indirect);
  ASSERT_EQ(chain->buffers.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(chain->buffers[i].gpa, bufs[i].gpa);
    EXPECT_EQ(chain->buffers[i].len, bufs[i].len);
    EXPECT_EQ(chain->buffers[i].device_writable, bufs[i].device_writable);
  }
  EXPECT_EQ(chain->total_len, 4396u);

  EXPECT_FALSE(p.drv.pop_used());
  const uint16_t old = p.dev.used_idx();
  EXPECT_EQ(p.dev.push_used(*head, 7), 4u);  // first used element at offset 4
  EXPECT_EQ(p.dev.used_idx(), old + 1);
  EXPECT_TRUE(p.dev.should_notify(old));
  auto u = p.drv.pop_used();
  ASSERT_TRUE(u);
  EXPECT_EQ(u->id, *head);
  EXPECT_EQ(u->len, 7u);
  EXPECT_EQ(p.drv.free_count(), 16);
  EXPECT_FALSE(p.drv.pop_used());
}

TEST(Virtqueue, AddChainLimits) {
  Pair p(4);
  EXPECT_FALSE(p.drv.add_chain({}));
  std::vector<vq::Buffer> five(5, vq::Buffer{0x1000, 8, true});
  EXPECT_FALSE(p.drv.add_chain(five));
  ASSERT_TRUE(p.drv.add_chain(std::span(five).first(3)));
  EXPECT_FALSE(p.drv.add_chain(std::span(five).first(2)));
  ASSERT_TRUE(p.drv.add_chain(std::span(five).first(1)));
  EXPECT_EQ(p.drv.free_count(), 0);
  EXPECT_FALSE(p.drv.add_chain(std::span(five).first(1)));
}

TEST(Virtqueue, ReportingSizedChainOf32) {
  Pair p(32);
  std::vector<vq::Buffer> bufs;
  for (uint64_t i = 0; i < 32; ++i) bufs.push_back({(i + 1) << 21, 1u << 21, true});
  auto head = p.drv.add_chain(bufs);
  ASSERT_TRUE(head);
  EXPECT_EQ(p.drv.free_count(), 0);
  auto h = p.dev.pop_avail();
  ASSERT_TRUE(h && h->has_value());
  auto c = p.dev.walk(**h, p.mem);
  ASSERT_TRUE(c) << c.error().message();
  ASSERT_EQ(c->buffers.size(), 32u);
  EXPECT_EQ(c->total_len, 32ull << 21);
  for (size_t i = 0; i < 32; ++i) EXPECT_EQ(c->buffers[i].gpa, bufs[i].gpa);
  p.dev.push_used(**h, 0);
  ASSERT_TRUE(p.drv.pop_used());
  EXPECT_EQ(p.drv.free_count(), 32);
}

// Many rounds with out-of-order completion, long enough to wrap the 16-bit
// free-running indices several times.
TEST(Virtqueue, WrapAroundAndOutOfOrderCompletion) {
  constexpr uint16_t kNum = 8;
  Pair p(kNum);
  uint32_t completed = 0;
  for (uint32_t round = 0; round < 3 * 65536 / kNum + 5; ++round) {
    std::vector<uint16_t> heads;
    // Mixed chain lengths: 1, 2, 1, 2, ... until the ring is full.
    while (true) {
      const size_t n = heads.size() % 2 + 1;
      std::vector<vq::Buffer> bufs(n, vq::Buffer{0x1000 * (round % 16), 64, true});
      auto h = p.drv.add_chain(bufs);
      if (!h) break;
      heads.push_back(*h);
    }
    ASSERT_GE(heads.size(), 5u);
    std::vector<uint16_t> got;
    while (true) {
      auto h = p.dev.pop_avail();
      ASSERT_TRUE(h) << h.error().message();
      if (!h->has_value()) break;
      auto c = p.dev.walk(**h, p.mem);
      ASSERT_TRUE(c) << c.error().message();
      got.push_back(**h);
    }
    ASSERT_EQ(got, heads);
    for (auto it = got.rbegin(); it != got.rend(); ++it) p.dev.push_used(*it, *it);
    for (auto it = got.rbegin(); it != got.rend(); ++it) {
      auto u = p.drv.pop_used();
      ASSERT_TRUE(u);
      EXPECT_EQ(u->id, *it);
      EXPECT_EQ(u->len, *it);
      ++completed;
    }
    ASSERT_EQ(p.drv.free_count(), kNum);
  }
  EXPECT_GT(completed, 65536u);
  EXPECT_EQ(p.drv.avail_idx(), p.dev.next_avail());
  EXPECT_EQ(p.drv.last_used(), p.dev.used_idx());
}

TEST(Virtqueue, DriverIgnoresBogusUsedEntries) {
  Pair p(8);
  const vq::Buffer two[] = {{0x1000, 8, true}, {0x2000, 8, true}};
  auto h1 = p.drv.add_chain(two);
  auto h2 = p.drv.add_chain(two);
  ASSERT_TRUE(h1 && h2);
  EXPECT_EQ(p.drv.free_count(), 4);
  // A buggy device: id out of range, a non-head descriptor, a head never
  // posted, then the real one twice.
  const uint16_t non_head = get<uint16_t>(p.mem.drv(kDescGpa) + 16 * size_t{*h1} + 14);
  for (uint16_t id : {uint16_t{100}, non_head, uint16_t{7}, *h1, *h1}) p.dev.push_used(id, 1);
  auto u = p.drv.pop_used();
  ASSERT_TRUE(u);
  EXPECT_EQ(u->id, *h1);
  EXPECT_EQ(p.drv.free_count(), 6);
  EXPECT_FALSE(p.drv.pop_used());  // the duplicate is skipped
  EXPECT_EQ(p.drv.free_count(), 6);
  // The free list is intact: everything can still be used.
  p.dev.push_used(*h2, 0);
  ASSERT_TRUE(p.drv.pop_used());
  EXPECT_EQ(p.drv.free_count(), 8);
  std::vector<vq::Buffer> eight(8, vq::Buffer{0x1000, 8, false});
  auto all = p.drv.add_chain(eight);
  ASSERT_TRUE(all);
  // Drain the device side past the two chains it never took (the pushes
  // above were bogus, not returns), returning them so that neither head is
  // still in flight when the driver reuses it for the next chain.
  for (int i = 0; i < 2; ++i) {
    auto d = p.dev.pop_avail();
    ASSERT_TRUE(d && d->has_value());
    p.dev.push_used(**d, 0);
  }
  auto h = p.dev.pop_avail();
  ASSERT_TRUE(h && h->has_value());
  auto c = p.dev.walk(**h, p.mem);
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->buffers.size(), 8u);
}

TEST(Virtqueue, DriverIgnoresUsedIndexJump) {
  Pair p(4);
  const vq::Buffer one[] = {{0x1000, 8, true}};
  ASSERT_TRUE(p.drv.add_chain(one));
  put<uint16_t>(p.mem.dev(kUsedGpa) + 2, 100);
  EXPECT_FALSE(p.drv.pop_used());
  EXPECT_EQ(p.drv.free_count(), 3);
}

TEST(Virtqueue, KickSuppression) {
  Pair p(4);
  EXPECT_FALSE(p.drv.kick_suppressed());
  put<uint16_t>(p.mem.dev(kUsedGpa), vq::kUsedFNoNotify);
  EXPECT_TRUE(p.drv.kick_suppressed());
}

TEST(Virtqueue, DeviceStartsFromGivenBaseAndUsedIdx) {
  HandRing r(8);
  put<uint16_t>(r.used + 2, 5);
  vq::DeviceRing ring(8, r.desc, r.avail, r.used, 3, false, false);
  EXPECT_EQ(ring.used_idx(), 5);
  EXPECT_EQ(ring.next_avail(), 3);
  r.d(6, 0x1000, 10);
  r.post(3, 6);
  r.set_avail_idx(4);
  auto h = ring.pop_avail();
  ASSERT_TRUE(h && h->has_value());
  EXPECT_EQ(**h, 6);
  EXPECT_EQ(ring.push_used(6, 0), 4u + 8 * 5);
  EXPECT_EQ(get<uint16_t>(r.used + 2), 6);
  put<uint16_t>(r.used + 2, 9);
  ring.sync_used_idx();
  EXPECT_EQ(ring.used_idx(), 9);
}

TEST(Virtqueue, NotReadyRingIsInert) {
  vq::DeviceRing ring;
  EXPECT_FALSE(ring.ready());
  auto h = ring.pop_avail();
  ASSERT_TRUE(h);
  EXPECT_FALSE(h->has_value());
  MemfdGuest mem(4096);
  EXPECT_FALSE(ring.walk(0, mem));
  vq::DriverRing drv;
  EXPECT_FALSE(drv.pop_used());
}

// ---- malicious rings ----

TEST(VirtqueueMalicious, HeadOutOfRangeConsumesSlot) {
  HandRing r(8);
  auto ring = r.device();
  r.post(0, 8);
  r.d(1, 0x1000, 8);
  r.post(1, 1);
  r.set_avail_idx(2);
  auto bad = ring.pop_avail();
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, vq::ChainErrc::HeadOutOfRange);
  EXPECT_EQ(bad.error().head, 8);
  EXPECT_EQ(ring.next_avail(), 1);
  auto good = ring.pop_avail();
  ASSERT_TRUE(good && good->has_value());
  EXPECT_EQ(**good, 1);
  auto w = ring.walk(8, r.mem);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code, vq::ChainErrc::HeadOutOfRange);
}

TEST(VirtqueueMalicious, AvailIndexJump) {
  HandRing r(8);
  auto ring = r.device();
  r.set_avail_idx(9);
  auto j = ring.pop_avail();
  ASSERT_FALSE(j);
  EXPECT_EQ(j.error().code, vq::ChainErrc::AvailIndexJump);
  EXPECT_EQ(ring.next_avail(), 0);  // not advanced
  EXPECT_NE(j.error().message().find("avail idx 9"), std::string::npos) << j.error().message();
  r.set_avail_idx(0xffff);  // "behind" us is a jump too
  EXPECT_FALSE(ring.pop_avail());
  // Exactly num ahead is legal.
  for (uint16_t i = 0; i < 8; ++i) {
    r.d(i, 0x1000, 8);
    r.post(i, i);
  }
  r.set_avail_idx(8);
  for (uint16_t i = 0; i < 8; ++i) {
    auto h = ring.pop_avail();
    ASSERT_TRUE(h && h->has_value());
    EXPECT_EQ(**h, i);
  }
}

// The driver offers a head the device has not returned yet: an error that
// ends the ring (the caller stops serving it), the slot is consumed, and the
// head is still in flight exactly once: returning it frees it for a later
// offer. Heads that were returned can be offered again as usual.
TEST(VirtqueueMalicious, HeadStillInFlightOfferedAgain) {
  HandRing r(8);
  auto ring = r.device();
  r.d(3, 0x1000, 8);
  r.d(4, 0x2000, 8);
  r.post(0, 3);
  r.post(1, 4);
  r.post(2, 3);  // 3 again, still in flight
  r.set_avail_idx(3);
  auto a = ring.pop_avail();
  ASSERT_TRUE(a && a->has_value());
  EXPECT_EQ(**a, 3);
  EXPECT_TRUE(ring.in_flight(3));
  auto b = ring.pop_avail();
  ASSERT_TRUE(b && b->has_value());
  EXPECT_EQ(**b, 4);
  auto dup = ring.pop_avail();
  ASSERT_FALSE(dup);
  EXPECT_EQ(dup.error().code, vq::ChainErrc::HeadInFlight);
  EXPECT_EQ(dup.error().head, 3);
  EXPECT_TRUE(vq::ends_ring(dup.error().code));
  EXPECT_EQ(dup.error().message(), "head offered again while still in flight (head 3)");
  EXPECT_EQ(ring.next_avail(), 3);  // consumed
  // Returned once, then it may be offered again.
  ring.push_used(3, 0);
  EXPECT_FALSE(ring.in_flight(3));
  EXPECT_TRUE(ring.in_flight(4));
  r.post(3, 3);
  r.set_avail_idx(4);
  auto again = ring.pop_avail();
  ASSERT_TRUE(again && again->has_value());
  EXPECT_EQ(**again, 3);
  // Only the two ring-ending errors end the ring.
  EXPECT_TRUE(vq::ends_ring(vq::ChainErrc::AvailIndexJump));
  EXPECT_FALSE(vq::ends_ring(vq::ChainErrc::HeadOutOfRange));
  EXPECT_FALSE(vq::ends_ring(vq::ChainErrc::TooLong));
}

// A ring rebuilt over the same memory while running (new kick fd or new
// addresses) keeps its in-flight heads.
TEST(VirtqueueMalicious, InFlightHeadsSurviveARebuiltRing) {
  HandRing r(8);
  auto ring = r.device();
  r.d(5, 0x1000, 8);
  r.post(0, 5);
  r.set_avail_idx(1);
  ASSERT_TRUE(ring.pop_avail());
  vq::DeviceRing rebuilt(8, r.desc, r.avail, r.used, ring.next_avail(), false, false);
  EXPECT_FALSE(rebuilt.in_flight(5));
  rebuilt.inherit_in_flight(ring);
  EXPECT_TRUE(rebuilt.in_flight(5));
  r.post(1, 5);
  r.set_avail_idx(2);
  auto dup = rebuilt.pop_avail();
  ASSERT_FALSE(dup);
  EXPECT_EQ(dup.error().code, vq::ChainErrc::HeadInFlight);
  // A ring of another size inherits nothing.
  vq::DeviceRing other(4, r.desc, r.avail, r.used, 0, false, false);
  other.inherit_in_flight(ring);
  EXPECT_FALSE(other.in_flight(5));
}

TEST(VirtqueueMalicious, NextOutOfRange) {
  HandRing r(8);
  r.d(0, 0x1000, 8, vq::kDescFNext, 1);
  r.d(1, 0x2000, 8, vq::kDescFNext, 8);
  auto ring = r.device();
  auto w = ring.walk(0, r.mem);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code, vq::ChainErrc::NextOutOfRange);
  EXPECT_EQ(w.error().head, 0);
  EXPECT_EQ(w.error().desc_index, 1u);
}

TEST(VirtqueueMalicious, LoopIsTooLong) {
  HandRing r(8);
  r.d(0, 0x1000, 8, vq::kDescFNext, 1);
  r.d(1, 0x2000, 8, vq::kDescFNext, 0);  // a -> b -> a
  EXPECT_EQ(r.walk_error(0), vq::ChainErrc::TooLong);
  r.d(3, 0x1000, 8, vq::kDescFNext, 3);  // self loop
  EXPECT_EQ(r.walk_error(3), vq::ChainErrc::TooLong);
}

TEST(VirtqueueMalicious, FullLengthChainIsAllowed) {
  HandRing r(8);
  for (uint16_t i = 0; i < 8; ++i) {
    r.d(i, 0x1000 * i, 8, i < 7 ? vq::kDescFNext : 0, static_cast<uint16_t>(i + 1));
  }
  auto c = r.device().walk(0, r.mem);
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->buffers.size(), 8u);
}

TEST(VirtqueueMalicious, IndirectNotNegotiated) {
  HandRing r(8);
  r.d(0, kIndirectGpa, 32, vq::kDescFIndirect);
  EXPECT_EQ(r.walk_error(0, /*indirect=*/false), vq::ChainErrc::IndirectNotNegotiated);
}

TEST(VirtqueueMalicious, IndirectHappyPath) {
  HandRing r(8);
  uint8_t* t = r.mem.dev(kIndirectGpa);
  put_desc(t, 0, 0x5000, 16, vq::kDescFNext, 2);
  put_desc(t, 2, 0x6000, 32, vq::kDescFNext | vq::kDescFWrite, 1);
  put_desc(t, 1, 0x7000, 64, vq::kDescFWrite, 0);
  r.d(0, 0x1000, 4, vq::kDescFNext, 1);  // one direct descriptor first
  r.d(1, kIndirectGpa, 48, vq::kDescFIndirect | vq::kDescFWrite /* ignored */);
  auto c = r.device(true).walk(0, r.mem);
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_TRUE(c->indirect);
  ASSERT_EQ(c->buffers.size(), 4u);
  EXPECT_EQ(c->buffers[0].gpa, 0x1000u);
  EXPECT_EQ(c->buffers[1].gpa, 0x5000u);
  EXPECT_EQ(c->buffers[2].gpa, 0x6000u);
  EXPECT_EQ(c->buffers[3].gpa, 0x7000u);
  EXPECT_FALSE(c->buffers[1].device_writable);
  EXPECT_TRUE(c->buffers[3].device_writable);
  EXPECT_EQ(c->total_len, 4u + 16 + 32 + 64);
}

TEST(VirtqueueMalicious, IndirectNested) {
  HandRing r(8);
  uint8_t* t = r.mem.dev(kIndirectGpa);
  put_desc(t, 0, 0x5000, 16, vq::kDescFNext, 1);
  put_desc(t, 1, kIndirectGpa, 32, vq::kDescFIndirect, 0);
  r.d(0, kIndirectGpa, 32, vq::kDescFIndirect);
  auto w = r.device(true).walk(0, r.mem);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code, vq::ChainErrc::IndirectNested);
  EXPECT_EQ(w.error().desc_index, 1u);
}

TEST(VirtqueueMalicious, IndirectWithNext) {
  HandRing r(8);
  put_desc(r.mem.dev(kIndirectGpa), 0, 0x5000, 16, 0, 0);
  r.d(0, kIndirectGpa, 16, vq::kDescFIndirect | vq::kDescFNext, 1);
  r.d(1, 0x1000, 8);
  EXPECT_EQ(r.walk_error(0, true), vq::ChainErrc::IndirectWithNext);
}

TEST(VirtqueueMalicious, IndirectBadLength) {
  HandRing r(8);
  for (uint32_t len : {0u, 8u, 15u, 17u, 40u, (vq::kMaxQueueSize + 1) * 16u, 0xfffffff0u}) {
    r.d(0, kIndirectGpa, len, vq::kDescFIndirect);
    EXPECT_EQ(r.walk_error(0, true), vq::ChainErrc::IndirectBadLength) << len;
  }
}

TEST(VirtqueueMalicious, IndirectUnmapped) {
  HandRing r(8);
  r.d(0, kMemSize - 16, 32, vq::kDescFIndirect);  // straddles the end
  EXPECT_EQ(r.walk_error(0, true), vq::ChainErrc::IndirectUnmapped);
  r.d(0, ~0ull - 15, 32, vq::kDescFIndirect);  // gpa + len overflows
  EXPECT_EQ(r.walk_error(0, true), vq::ChainErrc::IndirectUnmapped);
}

TEST(VirtqueueMalicious, IndirectTableLoopAndNextOutOfRange) {
  HandRing r(8);
  uint8_t* t = r.mem.dev(kIndirectGpa);
  put_desc(t, 0, 0x5000, 16, vq::kDescFNext, 1);
  put_desc(t, 1, 0x6000, 16, vq::kDescFNext, 0);
  r.d(0, kIndirectGpa, 32, vq::kDescFIndirect);
  EXPECT_EQ(r.walk_error(0, true), vq::ChainErrc::TooLong);
  put_desc(t, 1, 0x6000, 16, vq::kDescFNext, 2);  // table has 2 entries
  auto w = r.device(true).walk(0, r.mem);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code, vq::ChainErrc::NextOutOfRange);
  EXPECT_EQ(w.error().desc_index, 1u);
}

TEST(VirtqueueMalicious, ReadableAfterWritable) {
  HandRing r(8);
  r.d(0, 0x1000, 8, vq::kDescFNext | vq::kDescFWrite, 1);
  r.d(1, 0x2000, 8, 0);
  EXPECT_EQ(r.walk_error(0), vq::ChainErrc::ReadableAfterWritable);
  // Also across the indirect boundary.
  put_desc(r.mem.dev(kIndirectGpa), 0, 0x5000, 16, 0, 0);
  r.d(1, kIndirectGpa, 16, vq::kDescFIndirect);
  EXPECT_EQ(r.walk_error(0, true), vq::ChainErrc::ReadableAfterWritable);
}

TEST(VirtqueueMalicious, LengthOverflow) {
  HandRing r(8);
  r.d(0, 0x1000, 0xffffffffu, vq::kDescFNext, 1);
  r.d(1, 0x2000, 1, vq::kDescFNext, 2);  // exactly 2^32 so far: allowed
  r.d(2, 0x3000, 0, 0);
  auto ok = r.device().walk(0, r.mem);
  ASSERT_TRUE(ok) << ok.error().message();
  EXPECT_EQ(ok->total_len, 1ull << 32);
  r.d(2, 0x3000, 1, 0);
  EXPECT_EQ(r.walk_error(0), vq::ChainErrc::LengthOverflow);
}

TEST(VirtqueueMalicious, DescriptorReadOnceSnapshot) {
  // walk() works on its copy: changing the ring after walking does not change
  // the returned chain.
  HandRing r(4);
  r.d(0, 0x1000, 8);
  auto c = r.device().walk(0, r.mem);
  ASSERT_TRUE(c);
  r.d(0, 0xdead000, 99);
  EXPECT_EQ(c->buffers[0].gpa, 0x1000u);
  EXPECT_EQ(c->buffers[0].len, 8u);
}

// ---- notifications ----

TEST(VirtqueueNotify, WithoutEventIdx) {
  HandRing r(8);
  auto ring = r.device(false, false);
  uint16_t old = ring.used_idx();
  ring.push_used(0, 0);
  EXPECT_TRUE(ring.should_notify(old));
  r.set_avail_flags(vq::kAvailFNoInterrupt);
  EXPECT_FALSE(ring.should_notify(old));
}

TEST(VirtqueueNotify, WithEventIdx) {
  HandRing r(8);
  auto ring = r.device(false, true);
  r.set_avail_flags(vq::kAvailFNoInterrupt);  // ignored with EVENT_IDX
  r.set_used_event(0);
  ring.push_used(0, 0);  // used idx 0 -> 1
  EXPECT_TRUE(ring.should_notify(0));
  r.set_used_event(5);
  EXPECT_FALSE(ring.should_notify(0));
  ring.push_used(1, 0);
  ring.push_used(2, 0);  // 1 -> 3
  r.set_used_event(1);
  EXPECT_TRUE(ring.should_notify(1));  // crossed event 1
  r.set_used_event(2);
  EXPECT_TRUE(ring.should_notify(1));
  r.set_used_event(3);
  EXPECT_FALSE(ring.should_notify(1));  // not yet reached
  r.set_used_event(0);
  EXPECT_FALSE(ring.should_notify(1));  // already passed before old
}

TEST(VirtqueueNotify, EventIdxWrapsAround) {
  HandRing r(8);
  put<uint16_t>(r.used + 2, 0xffff);
  auto ring = r.device(false, true);
  ring.push_used(0, 0);  // 0xffff -> 0
  r.set_used_event(0xffff);
  EXPECT_TRUE(ring.should_notify(0xffff));
  r.set_used_event(0);
  EXPECT_FALSE(ring.should_notify(0xffff));
}

TEST(VirtqueueNotify, PopAvailPublishesAvailEvent) {
  HandRing r(8);
  auto ring = r.device(false, true);
  auto none = ring.pop_avail();
  ASSERT_TRUE(none && !none->has_value());
  EXPECT_EQ(r.avail_event(), 0);
  r.d(0, 0x1000, 8);
  r.d(1, 0x1000, 8);
  r.post(0, 0);
  r.post(1, 1);
  r.set_avail_idx(2);
  ASSERT_TRUE(ring.pop_avail());
  EXPECT_EQ(r.avail_event(), 1);
  ASSERT_TRUE(ring.pop_avail());
  EXPECT_EQ(r.avail_event(), 2);
}

TEST(VirtqueueErrors, Text) {
  vq::ChainError e{vq::ChainErrc::NextOutOfRange, 3, 5};
  EXPECT_EQ(e.message(), "next index out of range (head 3, descriptor 5)");
  EXPECT_EQ(vq::to_string(vq::ChainErrc::IndirectNested), "nested indirect descriptor");
}
