// fph-guest pieces above the allocator model: guest memory, workload
// patterns and checks, and the vhost-user front end + balloon driver against
// a minimal in-test device side (a test double for fphd built from proto:
// socketpair, a thread answering messages with proto's parsers, a DeviceRing
// consuming reporting chains and punching holes like a real back end).
// Nothing here asserts on elapsed time: waits are for conditions, with a
// generous cap only so that a bug fails the test instead of hanging it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "fph/common/checked.h"
#include "fph/guest/agent.h"
#include "fph/guest/balloon_driver.h"
#include "fph/guest/frontend.h"
#include "fph/guest/guest_memory.h"
#include "fph/guest/page_reporting.h"
#include "fph/guest/workload.h"
#include "fph/proto/balloon.h"
#include "fph/proto/balloon_stats.h"
#include "fph/proto/channel.h"
#include "fph/proto/vhost_user.h"
#include "fph/proto/virtqueue.h"

namespace fph::guest {
namespace {

namespace vu = proto::vu;
namespace vq = proto::vq;
namespace bal = proto::balloon;
using namespace std::chrono_literals;

// Polls `cond` until true; the cap only turns a hang into a failure.
bool wait_for(const std::function<bool()>& cond, std::chrono::seconds cap = 60s) {
  const auto end = std::chrono::steady_clock::now() + cap;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

GuestMemoryOptions small_mem(uint64_t bytes = 16ull << 20, uint32_t regions = 1) {
  GuestMemoryOptions o;
  o.bytes = bytes;
  o.regions = regions;
  o.ring_sizes = {kInflateQueueSize, kDeflateQueueSize, reporting_queue_size(32, 1)};
  return o;
}

// ------------------------------------------------------------ guest memory

TEST(GuestMemory, RegionsAreContiguousAndTranslate) {
  auto o = small_mem(20ull << 20, 3);  // rounds up to 3 x 8 MiB
  o.gpa_base = 4ull << 20;
  auto m = GuestMemory::create(o);
  ASSERT_TRUE(m) << m.error();
  GuestMemory& mem = **m;
  ASSERT_EQ(mem.regions().size(), 3u);
  EXPECT_EQ(mem.size(), 24ull << 20);
  EXPECT_EQ(mem.frames(), (24ull << 20) / kFrameSize);
  uint64_t gpa = o.gpa_base;
  for (const auto& r : mem.regions()) {
    EXPECT_EQ(r.gpa, gpa);
    EXPECT_EQ(r.size % kRegionAlign, 0u);
    EXPECT_TRUE(r.fd.valid());
    gpa += r.size;
  }
  // Inside a region: the region's mapping; across a boundary or outside: null.
  const auto& r1 = mem.regions()[1];
  EXPECT_EQ(mem.translate(r1.gpa, 4096), r1.host);
  EXPECT_EQ(mem.translate(r1.gpa + r1.size - 8, 8), r1.host + r1.size - 8);
  EXPECT_EQ(mem.translate(r1.gpa + r1.size - 8, 16), nullptr);
  EXPECT_EQ(mem.translate(o.gpa_base - 1, 1), nullptr);
  EXPECT_EQ(mem.translate(gpa, 1), nullptr);
  EXPECT_EQ(mem.translate(UINT64_MAX - 4, 8), nullptr);
  // Frame numbers start at gpa_base.
  const uint64_t f = (r1.gpa - o.gpa_base) / kFrameSize + 3;
  EXPECT_EQ(mem.frame_ptr(f), r1.host + 3 * kFrameSize);
  EXPECT_EQ(mem.frame_gpa(f), r1.gpa + 3 * kFrameSize);
  // Writes through the mapping land in the memfd (what the back end maps).
  std::memset(mem.frame_ptr(f), 0x5a, kFrameSize);
  uint8_t byte = 0;
  ASSERT_EQ(pread(r1.fd.get(), &byte, 1, static_cast<off_t>(3 * kFrameSize)), 1);
  EXPECT_EQ(byte, 0x5a);
  EXPECT_GE(mem.backing_bytes(), kFrameSize);
}

TEST(GuestMemory, RingAreaIsReservedAndAligned) {
  auto m = GuestMemory::create(small_mem());
  ASSERT_TRUE(m) << m.error();
  GuestMemory& mem = **m;
  ASSERT_EQ(mem.ring_count(), 3u);
  uint64_t prev_end = mem.gpa_base();
  for (size_t q = 0; q < mem.ring_count(); ++q) {
    const RingArea& r = mem.ring(q);
    EXPECT_TRUE(vq::valid_queue_size(r.num));
    EXPECT_EQ(r.desc_gpa % vq::kDescAlign, 0u);
    EXPECT_EQ(r.avail_gpa % vq::kAvailAlign, 0u);
    EXPECT_EQ(r.used_gpa % vq::kUsedAlign, 0u);
    EXPECT_GE(r.desc_gpa, prev_end);
    EXPECT_GE(r.avail_gpa, r.desc_gpa + vq::desc_table_bytes(r.num));
    EXPECT_GE(r.used_gpa, r.avail_gpa + vq::avail_ring_bytes(r.num));
    prev_end = r.used_gpa + vq::used_ring_bytes(r.num);
    EXPECT_NE(mem.translate(r.desc_gpa, prev_end - r.desc_gpa), nullptr);
  }
  // Everything up to the last ring's end is inside the reserved frames.
  EXPECT_LE(prev_end, mem.gpa_base() + mem.reserved_frames() * kFrameSize);
  EXPECT_EQ(mem.ring(0).num, kInflateQueueSize);
  EXPECT_EQ(mem.ring(2).num, 32);
  // The buddy never hands reserved frames out.
  BuddyAllocator b(mem.frames(), mem.reserved_frames());
  for (;;) {
    auto f = b.alloc(0);
    if (!f) break;
    EXPECT_GE(*f, mem.reserved_frames());
  }
}

TEST(GuestMemory, RejectsBadLayouts) {
  auto o = small_mem();
  o.gpa_base = 4096;
  EXPECT_FALSE(GuestMemory::create(o));
  o = small_mem();
  o.regions = 0;
  EXPECT_FALSE(GuestMemory::create(o));
  o = small_mem();
  o.mmap_offset = 100;
  EXPECT_FALSE(GuestMemory::create(o));
}

TEST(GuestMemory, MmapOffsetPlacesRegionInsideTheFile) {
  auto o = small_mem(8ull << 20);
  o.mmap_offset = 1ull << 20;
  auto m = GuestMemory::create(o);
  ASSERT_TRUE(m) << m.error();
  const auto& r = (*m)->regions()[0];
  EXPECT_EQ(r.mmap_offset, 1ull << 20);
  r.host[0] = 0x77;
  uint8_t byte = 0;
  ASSERT_EQ(pread(r.fd.get(), &byte, 1, static_cast<off_t>(r.mmap_offset)), 1);
  EXPECT_EQ(byte, 0x77);
}

TEST(Reporting, QueueSizeCoversCapacityTimesInflight) {
  EXPECT_EQ(reporting_queue_size(32, 1), 32);
  EXPECT_EQ(reporting_queue_size(8, 1), 32);
  EXPECT_EQ(reporting_queue_size(32, 3), 128);
  EXPECT_EQ(reporting_queue_size(1024, 4), 1024);
}

// ------------------------------------------------------------ parsing

TEST(Parse, Sizes) {
  EXPECT_EQ(*parse_size("4096"), 4096u);
  EXPECT_EQ(*parse_size("64K"), 64u << 10);
  EXPECT_EQ(*parse_size("512M"), 512ull << 20);
  EXPECT_EQ(*parse_size("1G"), 1ull << 30);
  EXPECT_EQ(*parse_size("2GiB"), 2ull << 30);
  EXPECT_EQ(*parse_size("3m"), 3ull << 20);
  EXPECT_FALSE(parse_size(""));
  EXPECT_FALSE(parse_size("M"));
  EXPECT_FALSE(parse_size("12X"));
  EXPECT_FALSE(parse_size("1Gx"));
  EXPECT_FALSE(parse_size("99999999999999T"));
}

TEST(Parse, Workloads) {
  auto a = parse_workload("alloc-free:64M:250");
  ASSERT_TRUE(a) << a.error();
  EXPECT_EQ(a->kind, WorkloadSpec::Kind::AllocFree);
  EXPECT_EQ(a->bytes, 64ull << 20);
  EXPECT_EQ(a->hold, 250ms);
  auto b = parse_workload("alloc-free:1G");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->hold, 0ms);
  auto c = parse_workload("churn:128M:1.5");
  ASSERT_TRUE(c) << c.error();
  EXPECT_EQ(c->kind, WorkloadSpec::Kind::Churn);
  EXPECT_EQ(c->duration, 1500ms);
  EXPECT_EQ(parse_workload("none")->kind, WorkloadSpec::Kind::None);
  EXPECT_FALSE(parse_workload("churn:128M"));
  EXPECT_FALSE(parse_workload("alloc-free"));
  EXPECT_FALSE(parse_workload("alloc-free:0"));
  EXPECT_FALSE(parse_workload("alloc-free:1M:-3"));
  EXPECT_FALSE(parse_workload("bogus:1M"));
}

TEST(Parse, ConfigValidation) {
  Config c;
  EXPECT_FALSE(validate(c));  // neither --connect nor --listen
  c.connect_path = "/tmp/x";
  ASSERT_TRUE(validate(c));
  EXPECT_FALSE(c.name.empty());
  Config d = c;
  d.listen_path = "/tmp/y";
  EXPECT_FALSE(validate(d));
  d = c;
  d.reporting_order = 11;
  EXPECT_FALSE(validate(d));
  d = c;
  d.resident = d.memory;
  EXPECT_FALSE(validate(d));
  d = c;
  d.capacity = 512;
  d.max_inflight = 4;
  EXPECT_FALSE(validate(d));
}

// ------------------------------------------------------------ checker / workload

TEST(Checker, PatternDependsOnFrameAndGeneration) {
  EXPECT_NE(MemoryChecker::pattern_word(1, 1, 0), MemoryChecker::pattern_word(2, 1, 0));
  EXPECT_NE(MemoryChecker::pattern_word(1, 1, 0), MemoryChecker::pattern_word(1, 2, 0));
  EXPECT_NE(MemoryChecker::pattern_word(1, 1, 0), MemoryChecker::pattern_word(1, 1, 1));
}

TEST(Checker, FillVerifyCountsDifferingBytes) {
  auto m = GuestMemory::create(small_mem(8ull << 20));
  ASSERT_TRUE(m);
  GuestMemory& mem = **m;
  MemoryChecker ck(mem, std::nullopt);
  ck.fill(512, 2, 7);
  EXPECT_EQ(ck.verify(512, 2, 7), 0u);
  // Another generation differs almost everywhere (a byte matches by chance
  // with probability 1/256).
  EXPECT_GT(ck.verify(512, 2, 8), 3u * kFrameSize);
  mem.frame_ptr(515)[100] ^= 0xff;
  mem.frame_ptr(512)[0] ^= 0x01;
  EXPECT_EQ(ck.verify(512, 2, 7), 2u);
}

TEST(Checker, ReportedFramesMustReadAsFreeValue) {
  auto m = GuestMemory::create(small_mem(8ull << 20));
  ASSERT_TRUE(m);
  GuestMemory& mem = **m;
  MemoryChecker ck(mem, std::nullopt);
  // Unmarked frames are not checked at all.
  mem.frame_ptr(600)[5] = 1;
  EXPECT_EQ(ck.check_allocated(600, 0), (std::pair<uint64_t, uint64_t>{0, 0}));
  // Marked, zero: checked, clean; the mark is consumed.
  ck.mark_reported(1024, 1);
  EXPECT_EQ(ck.check_allocated(1024, 1), (std::pair<uint64_t, uint64_t>{2 * kFrameSize, 0}));
  EXPECT_EQ(ck.check_allocated(1024, 1).first, 0u);
  // Marked, with leftovers: the host did not drop the backing.
  ck.mark_reported(1500, 0);
  mem.frame_ptr(1500)[10] = 0xaa;
  mem.frame_ptr(1500)[11] = 0xbb;
  EXPECT_EQ(ck.check_allocated(1500, 0).second, 2u);
  // Out of range marks are ignored, not written.
  ck.mark_reported(mem.frames(), 0);
  EXPECT_EQ(ck.check_allocated(mem.frames() - 1, 0).first, 0u);
}

TEST(Checker, PoisonIsTheFreeValue) {
  auto m = GuestMemory::create(small_mem(8ull << 20));
  ASSERT_TRUE(m);
  GuestMemory& mem = **m;
  MemoryChecker ck(mem, 0xaaaaaaaau);
  EXPECT_EQ(ck.free_word(), 0xaaaaaaaaaaaaaaaaull);
  ck.poison_all(mem.reserved_frames());
  EXPECT_EQ(mem.frame_ptr(mem.frames() - 1)[kFrameSize - 1], 0xaa);
  ck.mark_reported(1024, 0);
  EXPECT_EQ(ck.check_allocated(1024, 0).second, 0u);
  ck.mark_reported(1025, 0);
  std::memset(mem.frame_ptr(1025), 0, kFrameSize);  // a discard would break poison
  EXPECT_EQ(ck.check_allocated(1025, 0).second, kFrameSize);
}

TEST(Workload, AllocFreeRoundTripAndCorruptionCount) {
  auto m = GuestMemory::create(small_mem(16ull << 20));
  ASSERT_TRUE(m);
  GuestMemory& mem = **m;
  BuddyAllocator buddy(mem.frames(), mem.reserved_frames());
  std::mutex zone;
  MemoryChecker ck(mem, std::nullopt);
  IntegrityCounters cnt;
  std::vector<int> notified;
  std::vector<uint64_t> freed;
  WorkloadHooks hooks{[&](int o) { notified.push_back(o); }, [&](uint64_t b) { freed.push_back(b); }};
  Workload w(buddy, zone, ck, cnt, hooks, 42);

  auto held = w.alloc_bytes(9ull << 20);  // 2 x 4 MiB + 1 MiB (order 8)
  uint64_t bytes = 0;
  for (const auto& h : held) {
    bytes += h.bytes();
    EXPECT_EQ(ck.verify(h.frame, h.order, h.gen), 0u);
  }
  EXPECT_EQ(bytes, 9ull << 20);
  EXPECT_EQ(held.front().order, kMaxOrder);
  EXPECT_EQ(w.verify_all(held), 0u);
  // Scribble on one block: found at verify, counted as corruption.
  mem.frame_ptr(held[1].frame + 5)[17] ^= 0x40;
  w.free_all(held);
  EXPECT_EQ(cnt.corrupted_bytes.load(), 1u);
  EXPECT_FALSE(notified.empty());
  std::string why;
  EXPECT_TRUE(buddy.check_invariants(&why)) << why;
  EXPECT_EQ(buddy.stats().allocated_frames, 0u);

  // More than fits: returns what it could, falls back to lower orders.
  auto all = w.alloc_bytes(64ull << 20);
  uint64_t got = 0;
  for (const auto& h : all) got += h.bytes();
  EXPECT_EQ(got, mem.size() - mem.reserved_frames() * kFrameSize);
  w.free_all(all);

  std::atomic<bool> stop{false};
  w.run(*parse_workload("alloc-free:4M:1"), stop);
  w.run(*parse_workload("churn:6M:0.05"), stop);
  ASSERT_EQ(freed.size(), 2u);
  EXPECT_EQ(freed[0], 4ull << 20);
  EXPECT_EQ(cnt.corrupted_bytes.load(), 1u);
  EXPECT_EQ(buddy.stats().allocated_frames, 0u);
}

// ------------------------------------------------------------ test device

struct DeviceOptions {
  uint64_t features = bal::kFVersion1 | bal::kFReporting | bal::kFPagePoison |
                      vu::feature::kProtocolFeatures | bal::kFStatsVq;
  uint64_t protocol = vu::protocol::bit(vu::protocol::kReplyAck) |
                      vu::protocol::bit(vu::protocol::kConfig) |
                      vu::protocol::bit(vu::protocol::kConfigureMemSlots) |
                      vu::protocol::bit(vu::protocol::kStatus) |
                      vu::protocol::bit(vu::protocol::kMq);
  uint32_t nack_request = 0;        // answer this request with ack 1
  bool complete_reports = true;     // false: hold chains (never used)
  bool spurious_call = false;       // signal call as soon as it is set
  // A broken back end: with every chain, also punch this range (outside
  // anything reported) -- the guest must notice.
  uint64_t extra_punch_gpa = 0;
  uint64_t extra_punch_len = 0;
  // fph's migration epoch at config offset 16 (offered with bal::kFFphEpoch
  // in `features`). serve_epoch false: refuse reads past the standard 16
  // bytes with an empty reply, like an fphd from before the epoch was
  // published.
  uint32_t epoch = 0;
  bool serve_epoch = true;
  uint64_t bump_epoch_at_read = 0;  // > 0: the epoch goes up by one at this epoch read
};

// The device side of one connection. One thread: control messages and
// kicks, like a single-threaded vhost-user back end.
class TestDevice {
 public:
  TestDevice(UniqueFd sock, DeviceOptions o) : sock_(std::move(sock)), o_(o) {
    thread_ = std::thread([this] { run(); });
  }
  ~TestDevice() {
    stop_ = true;
    thread_.join();
  }
  // Simulates the back end dying: shut the socket down.
  void kill() { ::shutdown(sock_.get(), SHUT_RDWR); }
  // Releases held chains (complete_reports == false).
  void release() { release_ = true; }

  std::vector<uint32_t> requests() {
    std::lock_guard lk(mu_);
    return requests_;
  }
  uint64_t features() { std::lock_guard lk(mu_); return features_; }
  uint64_t protocol() { std::lock_guard lk(mu_); return protocol_; }
  uint32_t poison() { std::lock_guard lk(mu_); return poison_; }
  uint64_t status() { std::lock_guard lk(mu_); return status_; }
  size_t region_count() { std::lock_guard lk(mu_); return regions_.size(); }
  std::map<uint32_t, uint32_t> vring_base_replies() { std::lock_guard lk(mu_); return bases_; }
  uint64_t chains() const { return chains_.load(); }
  // Stats buffers taken on the stats queue, and the last MEMFREE in one.
  uint64_t stats_buffers() const { return stats_buffers_.load(); }
  uint64_t stats_free() const { return stats_free_.load(); }
  uint64_t punched() const { return punched_.load(); }
  bool exited() const { return exited_.load(); }
  void set_epoch(uint32_t e) { epoch_ = e; }
  // GET_CONFIG requests that covered the epoch (answered or refused).
  uint64_t epoch_reads() const { return epoch_reads_.load(); }
  // Balloon: the target (config num_pages), what the driver wrote in
  // actual, and the PFNs it put on the inflate / deflate queues.
  void set_num_pages(uint32_t n) { num_pages_ = n; }
  uint32_t actual() const { return actual_.load(); }
  std::vector<uint32_t> inflated() { std::lock_guard lk(mu_); return inflated_; }
  std::vector<uint32_t> deflated() { std::lock_guard lk(mu_); return deflated_; }

 private:
  struct Region {
    vu::MemoryRegion r;
    UniqueFd fd;
    uint8_t* map = nullptr;
    ~Region() {
      if (map) munmap(map, r.memory_size);
    }
  };
  struct Ring {
    uint32_t num = 0;
    vu::VringAddr addr;
    UniqueFd kick, call;
    vq::DeviceRing dev;
    bool started = false;
    std::vector<uint16_t> held;
    bool stats = false;  // the stats queue: chains held, returned every 50 ms
    std::chrono::steady_clock::time_point held_since;
  };
  class Mem final : public vq::GuestMemory {
   public:
    explicit Mem(const std::vector<std::unique_ptr<Region>>& r) : r_(r) {}
    uint8_t* translate(uint64_t gpa, uint64_t len) const override {
      for (const auto& x : r_)
        if (range_within(gpa, len, x->r.guest_phys_addr, x->r.memory_size))
          return x->map + (gpa - x->r.guest_phys_addr);
      return nullptr;
    }
    const Region* region(uint64_t gpa) const {
      for (const auto& x : r_)
        if (range_within(gpa, 1, x->r.guest_phys_addr, x->r.memory_size)) return x.get();
      return nullptr;
    }

   private:
    const std::vector<std::unique_ptr<Region>>& r_;
  };

  uint8_t* uva(uint64_t ua, uint64_t len) {
    for (const auto& x : regions_)
      if (range_within(ua, len, x->r.userspace_addr, x->r.memory_size))
        return x->map + (ua - x->r.userspace_addr);
    return nullptr;
  }

  void add_region(const vu::MemoryRegion& r, UniqueFd fd) {
    auto reg = std::make_unique<Region>();
    reg->r = r;
    void* p = mmap(nullptr, r.memory_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(),
                   static_cast<off_t>(r.mmap_offset));
    ASSERT_NE(p, MAP_FAILED);
    reg->map = static_cast<uint8_t*>(p);
    reg->fd = std::move(fd);
    regions_.push_back(std::move(reg));
  }

  void reply(uint32_t req, const std::vector<uint8_t>& payload) {
    ASSERT_TRUE(vu::send_reply(sock_.get(), req, payload));
  }

  void start_ring(uint32_t i) {
    Ring& r = rings_[i];
    if (r.started || r.num == 0) return;
    r.dev = vq::DeviceRing(static_cast<uint16_t>(r.num), uva(r.addr.desc_user_addr, 16),
                           uva(r.addr.avail_user_addr, 6), uva(r.addr.used_user_addr, 6), 0,
                           false, false);
    r.started = r.dev.ready();
  }

  void service(uint32_t i) {
    Ring& r = rings_[i];
    start_ring(i);
    if (!r.started) return;
    Mem mem(regions_);
    bool pushed = false;
    for (;;) {
      auto h = r.dev.pop_avail();
      ASSERT_TRUE(h) << h.error().message();
      if (!*h) break;
      auto chain = r.dev.walk(**h, mem);
      ASSERT_TRUE(chain) << chain.error().message();
      if ((features_ & bal::kFStatsVq) && static_cast<int>(i) == bal::queue_layout(features_).stats) {
        // Like fphd: one device-readable stats buffer, parsed and held until
        // the next stats request.
        r.stats = true;
        for (const auto& b : chain->buffers) {
          EXPECT_FALSE(b.device_writable);
          const uint8_t* sp = mem.translate(b.gpa, b.len);
          ASSERT_NE(sp, nullptr);
          auto st = bal::parse_stats(std::span<const uint8_t>(sp, b.len));
          ASSERT_TRUE(st) << st.error().message();
          if (auto f = st->get(bal::StatTag::MemFree)) stats_free_ = *f;
        }
        stats_buffers_++;
        r.held.push_back(**h);
        r.held_since = std::chrono::steady_clock::now();
        continue;
      }
      if (i <= 1) {
        // Inflate (0) and deflate (1): device-readable le32 PFN arrays; like
        // fphd, the backing of inflated pages is dropped.
        for (const auto& b : chain->buffers) {
          EXPECT_FALSE(b.device_writable);
          EXPECT_EQ(b.len % 4, 0u);
          const uint8_t* a = mem.translate(b.gpa, b.len);
          ASSERT_NE(a, nullptr);
          for (uint32_t k = 0; k < b.len / 4; ++k) {
            uint32_t pfn;
            std::memcpy(&pfn, a + 4 * k, 4);
            const uint64_t gpa = uint64_t{pfn} << 12;
            if (i == 0) {
              const Region* reg = mem.region(gpa);
              ASSERT_NE(reg, nullptr);
              const off_t off = static_cast<off_t>(reg->r.mmap_offset + (gpa - reg->r.guest_phys_addr));
              ASSERT_EQ(fallocate(reg->fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, 4096), 0);
            }
            std::lock_guard lk(mu_);
            (i == 0 ? inflated_ : deflated_).push_back(pfn);
          }
        }
        r.dev.push_used(**h, 0);
        pushed = true;
        continue;
      }
      chains_++;
      for (const auto& b : chain->buffers) {
        EXPECT_TRUE(b.device_writable);
        const Region* reg = mem.region(b.gpa);
        ASSERT_NE(reg, nullptr);
        ASSERT_NE(mem.translate(b.gpa, b.len), nullptr);
        // What fphd does for memfd backing (DESIGN 4): punch the hole.
        const off_t off = static_cast<off_t>(reg->r.mmap_offset + (b.gpa - reg->r.guest_phys_addr));
        if (poison_ == 0) {
          ASSERT_EQ(fallocate(reg->fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, b.len),
                    0);
        }
        punched_ += b.len;
      }
      if (o_.extra_punch_len) {
        const Region* reg = mem.region(o_.extra_punch_gpa);
        ASSERT_NE(reg, nullptr);
        const off_t off =
            static_cast<off_t>(reg->r.mmap_offset + (o_.extra_punch_gpa - reg->r.guest_phys_addr));
        ASSERT_EQ(fallocate(reg->fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off,
                            static_cast<off_t>(o_.extra_punch_len)),
                  0);
      }
      if (o_.complete_reports || release_) {
        r.dev.push_used(**h, 0);
        pushed = true;
      } else {
        r.held.push_back(**h);
      }
    }
    const bool stats_due = r.stats && std::chrono::steady_clock::now() - r.held_since >= 50ms;
    if ((release_ || stats_due) && !r.held.empty()) {
      for (uint16_t h : r.held) r.dev.push_used(h, 0);
      r.held.clear();
      pushed = true;
    }
    if (pushed) {
      const uint64_t one = 1;
      (void)!write(r.call.get(), &one, sizeof one);
    }
  }

  void handle(vu::Message& m) {
    const uint32_t req = m.header.request;
    {
      std::lock_guard lk(mu_);
      requests_.push_back(req);
    }
    const auto p = std::span<const uint8_t>(m.payload);
    bool acked = false;
    switch (static_cast<vu::Request>(req)) {
      case vu::Request::GetFeatures: reply(req, vu::encode_u64(o_.features)); acked = true; break;
      case vu::Request::GetProtocolFeatures: reply(req, vu::encode_u64(o_.protocol)); acked = true; break;
      case vu::Request::SetFeatures: { std::lock_guard lk(mu_); features_ = *vu::parse_u64(p, "f"); break; }
      case vu::Request::SetProtocolFeatures: {
        std::lock_guard lk(mu_);
        protocol_ = *vu::parse_u64(p, "p");
        // REPLY_ACK applies from the next message on.
        acked = true;
        break;
      }
      case vu::Request::GetMaxMemSlots: reply(req, vu::encode_u64(8)); acked = true; break;
      case vu::Request::AddMemReg: {
        auto r = vu::parse_single_region(p);
        ASSERT_TRUE(r);
        ASSERT_EQ(m.fds.size(), 1u);
        std::lock_guard lk(mu_);
        add_region(*r, std::move(m.fds[0]));
        break;
      }
      case vu::Request::SetMemTable: {
        auto t = vu::parse_mem_table(p);
        ASSERT_TRUE(t);
        ASSERT_EQ(m.fds.size(), t->size());
        std::lock_guard lk(mu_);
        for (size_t i = 0; i < t->size(); ++i) add_region((*t)[i], std::move(m.fds[i]));
        break;
      }
      case vu::Request::GetConfig: {
        auto c = vu::parse_config(p);
        ASSERT_TRUE(c);
        bal::Config cfg;
        cfg.num_pages = num_pages_.load();
        cfg.actual = actual_.load();
        cfg.poison_val = poison_;
        const auto std_bytes = bal::encode_config(cfg);
        std::vector<uint8_t> bytes(std_bytes.begin(), std_bytes.end());
        if (uint64_t{c->offset} + c->size > bal::kOffFphEpoch &&
            ++epoch_reads_ == o_.bump_epoch_at_read)
          epoch_++;
        const uint32_t e = epoch_.load();
        for (int i = 0; i < 4; ++i) bytes.push_back(static_cast<uint8_t>(e >> (8 * i)));
        const uint64_t limit = o_.serve_epoch ? bal::kExtConfigSize : bal::kConfigSize;
        vu::ConfigPayload out = *c;
        if (uint64_t{c->offset} + c->size > limit) {
          out.size = 0;  // what fphd answers for a read it cannot serve
          out.data.clear();
        } else {
          out.data.assign(bytes.begin() + c->offset, bytes.begin() + c->offset + c->size);
        }
        reply(req, vu::encode_config(out));
        acked = true;
        break;
      }
      case vu::Request::SetConfig: {
        auto c = vu::parse_config(p);
        ASSERT_TRUE(c);
        ASSERT_EQ(c->size, 4u);
        if (c->offset == bal::kOffActual) {
          uint32_t a;
          std::memcpy(&a, c->data.data(), 4);
          actual_ = a;
          break;
        }
        EXPECT_EQ(c->offset, bal::kOffPoisonVal);
        std::lock_guard lk(mu_);
        std::memcpy(&poison_, c->data.data(), 4);
        break;
      }
      case vu::Request::SetStatus: { std::lock_guard lk(mu_); status_ = *vu::parse_u64(p, "s"); break; }
      case vu::Request::GetStatus: reply(req, vu::encode_u64(status())); acked = true; break;
      case vu::Request::SetVringNum: { auto s = vu::parse_vring_state(p); rings_[s->index].num = s->num; break; }
      case vu::Request::SetVringBase: { auto s = vu::parse_vring_state(p); EXPECT_EQ(s->num, 0u); break; }
      case vu::Request::SetVringAddr: { auto a = vu::parse_vring_addr(p); ASSERT_TRUE(a); rings_[a->index].addr = *a; break; }
      case vu::Request::SetVringKick: {
        auto f = vu::parse_vring_fd(p);
        ASSERT_EQ(m.fds.size(), 1u);
        rings_[f->index].kick = std::move(m.fds[0]);
        break;
      }
      case vu::Request::SetVringCall: {
        auto f = vu::parse_vring_fd(p);
        ASSERT_EQ(m.fds.size(), 1u);
        rings_[f->index].call = std::move(m.fds[0]);
        if (o_.spurious_call) {
          const uint64_t one = 1;
          (void)!write(rings_[f->index].call.get(), &one, sizeof one);
        }
        break;
      }
      case vu::Request::SetVringEnable: break;
      case vu::Request::GetVringBase: {
        auto s = vu::parse_vring_state(p);
        Ring& r = rings_[s->index];
        // Finish everything before answering (reference 4.5).
        release_ = true;
        if (r.started) service(s->index);
        const uint32_t base = r.started ? r.dev.next_avail() : 0;
        {
          std::lock_guard lk(mu_);
          bases_[s->index] = base;
        }
        reply(req, vu::encode_vring_state({s->index, base}));
        acked = true;
        break;
      }
      default: break;
    }
    if (m.header.need_reply() && !acked) {
      const uint64_t status = (req == o_.nack_request) ? 1 : 0;
      reply(req, vu::encode_u64(status));
    }
  }

  void run() {
    while (!stop_) {
      std::vector<pollfd> p{{sock_.get(), POLLIN, 0}};
      std::vector<uint32_t> idx;
      for (auto& [i, r] : rings_)
        if (r.kick) {
          p.push_back({r.kick.get(), POLLIN, 0});
          idx.push_back(i);
        }
      const int n = ::poll(p.data(), p.size(), 10);
      if (n < 0) break;
      for (size_t k = 1; k < p.size(); ++k)
        if (p[k].revents) {
          uint64_t v;
          (void)!read(p[k].fd, &v, sizeof v);
          service(idx[k - 1]);
        }
      for (auto& [i, r] : rings_)
        if (!r.held.empty() && (release_ || r.stats)) service(i);
      if (p[0].revents) {
        auto m = vu::recv_message(sock_.get());
        if (!m) break;  // front end closed (or we were killed)
        handle(*m);
      }
    }
    exited_ = true;
  }

  UniqueFd sock_;
  DeviceOptions o_;
  std::mutex mu_;
  std::vector<uint32_t> requests_;
  uint64_t features_ = 0, protocol_ = 0, status_ = 0;
  uint32_t poison_ = 0;
  std::vector<std::unique_ptr<Region>> regions_;
  std::map<uint32_t, Ring> rings_;
  std::map<uint32_t, uint32_t> bases_;
  std::atomic<uint64_t> chains_{0}, punched_{0}, stats_buffers_{0}, stats_free_{0};
  std::atomic<uint32_t> epoch_{o_.epoch};
  std::atomic<uint64_t> epoch_reads_{0};
  std::atomic<uint32_t> num_pages_{0}, actual_{0};
  std::vector<uint32_t> inflated_, deflated_;
  std::atomic<bool> stop_{false}, release_{false}, exited_{false};
  std::thread thread_;
};

std::pair<UniqueFd, UniqueFd> socket_pair() {
  int sv[2];
  EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

uint32_t id(vu::Request r) { return static_cast<uint32_t>(r); }

// ------------------------------------------------------------ front end

TEST(Frontend, ChoosesFeatures) {
  const uint64_t all = bal::kFVersion1 | bal::kFReporting | bal::kFPagePoison |
                       vu::feature::kProtocolFeatures | bal::kFStatsVq | bal::kFFreePageHint;
  FrontendOptions o;
  EXPECT_EQ(choose_features(all, o),
            bal::kFVersion1 | bal::kFReporting | vu::feature::kProtocolFeatures);
  o.reporting = false;
  EXPECT_EQ(choose_features(all, o), bal::kFVersion1 | vu::feature::kProtocolFeatures);
  o.reporting = true;
  o.poison = 0xaa;
  EXPECT_EQ(choose_features(all, o), bal::kFVersion1 | bal::kFReporting | bal::kFPagePoison |
                                         vu::feature::kProtocolFeatures);
  // Poisoning without a device that keeps poison_val: no reporting (lx-bal).
  EXPECT_EQ(choose_features(all & ~bal::kFPagePoison, o),
            bal::kFVersion1 | vu::feature::kProtocolFeatures);
  using namespace vu::protocol;
  EXPECT_EQ(choose_protocol_features(~0ull),
            bit(kReplyAck) | bit(kConfig) | bit(kConfigureMemSlots) | bit(kStatus) |
                bit(kLogShmfd) | bit(kDeviceState));
}

// The migration switch: the twin's memfds replace the guest's RAM at the
// same addresses, so every pointer the guest holds now reads the twin.
TEST(GuestMemory, AdoptBackingMapsTheTwinAtTheSameAddresses) {
  auto src = GuestMemory::create(small_mem(16ull << 20, 2));
  ASSERT_TRUE(src);
  auto twin = GuestMemory::create((*src)->options());
  ASSERT_TRUE(twin);
  (*twin)->announce_addresses_of(**src);
  EXPECT_EQ((*twin)->regions()[1].user_addr,
            reinterpret_cast<uint64_t>((*src)->regions()[1].host));
  uint8_t* p = (*src)->frame_ptr((*src)->frames() - 1);
  *p = 1;
  *(*twin)->frame_ptr((*src)->frames() - 1) = 2;
  const int twin_fd = (*twin)->regions()[1].fd.get();
  ASSERT_TRUE((*src)->adopt_backing(**twin));
  EXPECT_EQ(*p, 2) << "same address, the twin's memory";
  EXPECT_EQ((*src)->regions()[1].fd.get(), twin_fd);
  EXPECT_EQ((*src)->regions()[1].user_addr, 0u);
  EXPECT_TRUE((*twin)->regions().empty());
  // A twin of another layout is refused.
  auto other = GuestMemory::create(small_mem(8ull << 20, 1));
  ASSERT_TRUE(other);
  EXPECT_FALSE((*src)->adopt_backing(**other));
}

TEST(Frontend, HandshakeSequenceWithAddMemReg) {
  auto m = GuestMemory::create(small_mem(16ull << 20, 2));
  ASSERT_TRUE(m);
  auto [a, b] = socket_pair();
  TestDevice dev(std::move(b), {});
  Frontend fe(std::move(a));
  auto n = fe.negotiate(**m, {});
  ASSERT_TRUE(n) << n.error().message;
  EXPECT_TRUE(n->reporting());
  EXPECT_FALSE(n->used_mem_table);
  EXPECT_EQ(n->layout.count, 3);
  EXPECT_EQ(n->layout.reporting, 2);
  std::vector<int> kicks, calls;
  for (int q = 0; q < n->layout.count; ++q) {
    kicks.push_back(eventfd(0, EFD_CLOEXEC));
    calls.push_back(eventfd(0, EFD_CLOEXEC));
    ASSERT_TRUE(fe.setup_queue(q, (*m)->ring(q), **m, kicks.back(), calls.back()));
  }
  ASSERT_TRUE(fe.driver_ok());
  for (int q = 0; q < n->layout.count; ++q) {
    auto base = fe.stop_queue(q);
    ASSERT_TRUE(base) << base.error().message;
    EXPECT_EQ(*base, 0u);
  }
  for (int fd : kicks) close(fd);
  for (int fd : calls) close(fd);

  using R = vu::Request;
  std::vector<uint32_t> want = {id(R::GetFeatures), id(R::SetFeatures),
                                id(R::GetProtocolFeatures), id(R::SetProtocolFeatures),
                                id(R::SetOwner), id(R::GetMaxMemSlots), id(R::AddMemReg),
                                id(R::AddMemReg), id(R::GetConfig), id(R::SetStatus),
                                id(R::GetStatus)};
  for (int q = 0; q < 3; ++q)
    for (R r : {R::SetVringNum, R::SetVringBase, R::SetVringAddr, R::SetVringKick,
                R::SetVringCall, R::SetVringEnable})
      want.push_back(id(r));
  want.push_back(id(R::SetStatus));
  for (int q = 0; q < 3; ++q) {
    want.push_back(id(R::SetVringEnable));
    want.push_back(id(R::GetVringBase));
  }
  EXPECT_EQ(dev.requests(), want);
  EXPECT_EQ(dev.features(), bal::kFVersion1 | bal::kFReporting | vu::feature::kProtocolFeatures);
  using namespace vu::protocol;
  EXPECT_EQ(dev.protocol(),
            bit(kReplyAck) | bit(kConfig) | bit(kConfigureMemSlots) | bit(kStatus));
  EXPECT_EQ(dev.status(), bal::kStatusAcknowledge | bal::kStatusDriver | bal::kStatusFeaturesOk |
                              bal::kStatusDriverOk);
  EXPECT_EQ(dev.region_count(), 2u);
}

TEST(Frontend, MemTablePoisonAndNoReporting) {
  auto m = GuestMemory::create(small_mem(16ull << 20, 2));
  ASSERT_TRUE(m);
  {
    auto [a, b] = socket_pair();
    TestDevice dev(std::move(b), {});
    Frontend fe(std::move(a));
    FrontendOptions o;
    o.force_mem_table = true;
    o.poison = 0x12345678;
    auto n = fe.negotiate(**m, o);
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_TRUE(n->used_mem_table);
    EXPECT_TRUE(n->poison());
    EXPECT_EQ(n->config.poison_val, 0x12345678u);
    // SET_CONFIG(poison_val) lands before any status with DRIVER_OK.
    auto reqs = dev.requests();
    auto set_cfg = std::find(reqs.begin(), reqs.end(), id(vu::Request::SetConfig));
    ASSERT_NE(set_cfg, reqs.end());
    EXPECT_EQ(std::count(reqs.begin(), reqs.end(), id(vu::Request::SetMemTable)), 1);
    EXPECT_EQ(std::count(reqs.begin(), reqs.end(), id(vu::Request::AddMemReg)), 0);
    EXPECT_TRUE(wait_for([&] { return dev.poison() == 0x12345678u; }));
    EXPECT_EQ(dev.region_count(), 2u);
  }
  {
    auto [a, b] = socket_pair();
    TestDevice dev(std::move(b), {});
    Frontend fe(std::move(a));
    FrontendOptions o;
    o.reporting = false;
    auto n = fe.negotiate(**m, o);
    ASSERT_TRUE(n);
    EXPECT_FALSE(n->reporting());
    EXPECT_EQ(n->layout.count, 2);
    EXPECT_EQ(dev.features() & bal::kFReporting, 0u);
  }
}

TEST(Frontend, NackIsAClearError) {
  auto m = GuestMemory::create(small_mem());
  ASSERT_TRUE(m);
  auto [a, b] = socket_pair();
  DeviceOptions d;
  d.nack_request = id(vu::Request::AddMemReg);
  TestDevice dev(std::move(b), d);
  Frontend fe(std::move(a));
  auto n = fe.negotiate(**m, {});
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().code, FrontendErrc::Nack);
  EXPECT_NE(n.error().message.find("ADD_MEM_REG"), std::string::npos) << n.error().message;
  EXPECT_FALSE(n.error().connection_lost());
}

TEST(Frontend, RefusesDeviceWithoutVersion1AndPeerGone) {
  auto m = GuestMemory::create(small_mem());
  ASSERT_TRUE(m);
  {
    auto [a, b] = socket_pair();
    DeviceOptions d;
    d.features = bal::kFReporting | vu::feature::kProtocolFeatures;
    TestDevice dev(std::move(b), d);
    Frontend fe(std::move(a));
    auto n = fe.negotiate(**m, {});
    ASSERT_FALSE(n);
    EXPECT_EQ(n.error().code, FrontendErrc::Unsupported);
  }
  {
    auto [a, b] = socket_pair();
    b.reset();  // nobody home
    Frontend fe(std::move(a));
    auto n = fe.negotiate(**m, {});
    ASSERT_FALSE(n);
    EXPECT_TRUE(n.error().connection_lost()) << n.error().message;
  }
}

TEST(Frontend, ListenAcceptAndConnectRetry) {
  char dir[] = "/tmp/fph-guest-test-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/vu.sock";
  // connect_unix waits for the socket to appear.
  std::optional<UnixListener> l;
  std::thread later([&] {
    std::this_thread::sleep_for(50ms);
    auto x = UnixListener::listen(path);
    ASSERT_TRUE(x) << x.error().message;
    l.emplace(std::move(*x));
  });
  auto c = connect_unix(path, 30s);
  later.join();
  ASSERT_TRUE(c) << c.error().message;
  auto s = l->accept(30s);
  ASSERT_TRUE(s) << s.error().message;
  // A cancelled wait ends promptly with Cancelled.
  std::atomic<bool> cancel{true};
  auto none = l->accept(std::chrono::milliseconds(0), &cancel);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, FrontendErrc::Cancelled);
  auto t = connect_unix(std::string(dir) + "/absent.sock", 0ms);
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code, FrontendErrc::Timeout);
  l.reset();
  EXPECT_NE(access(path.c_str(), F_OK), 0) << "listener removes its socket";
  rmdir(dir);
}

// ------------------------------------------------------------ driver end to end

struct DriverRig {
  std::unique_ptr<GuestMemory> mem;
  std::unique_ptr<BuddyAllocator> buddy;
  std::mutex zone;
  std::unique_ptr<MemoryChecker> checker;
  IntegrityCounters counters;
  std::mutex dev_mu;
  std::vector<std::unique_ptr<TestDevice>> devices;
  std::vector<DeviceOptions> device_opts;  // one per connection, last one repeats
  std::atomic<uint64_t> completed_bytes{0};
  std::atomic<uint64_t> balloon_pages_reported{0};
  std::mutex seen_mu;
  std::vector<Block> completed_blocks;  // every block reported, in completion order
  struct EpochChange {
    uint32_t from, to;
    uint64_t forgotten_bytes;
  };
  std::vector<EpochChange> epoch_changes;
  std::unique_ptr<BalloonDriver> driver;

  explicit DriverRig(DriverOptions o, std::vector<DeviceOptions> dopts = {{}},
                     uint64_t bytes = 32ull << 20) : device_opts(std::move(dopts)) {
    auto mo = small_mem(bytes);
    mo.ring_sizes[2] = reporting_queue_size(o.reporting.capacity, o.reporting.max_inflight);
    if (o.frontend.stats) mo.ring_sizes.push_back(kStatsQueueSize);  // the stats ring slot
    auto m = GuestMemory::create(mo);
    EXPECT_TRUE(m);
    mem = std::move(*m);
    buddy = std::make_unique<BuddyAllocator>(mem->frames(), mem->reserved_frames());
    checker = std::make_unique<MemoryChecker>(*mem, o.frontend.poison);
    Connector conn = [this](const std::atomic<bool>*) -> FeResult<UniqueFd> {
      auto [a, b] = socket_pair();
      std::lock_guard lk(dev_mu);
      const auto& d = device_opts[std::min(devices.size(), device_opts.size() - 1)];
      devices.push_back(std::make_unique<TestDevice>(std::move(b), d));
      return std::move(a);
    };
    DriverHooks h;
    h.before_complete = [this](const ReportRequest& r) {
      for (const auto& blk : r.blocks) checker->mark_reported(blk.frame, blk.order);
      // On the driver thread, like the balloon: a reported page is never a
      // balloon page.
      if (const BalloonTarget* b = driver ? driver->balloon() : nullptr)
        for (const auto& blk : r.blocks)
          for (uint64_t f = blk.frame; f < blk.frame + (uint64_t{1} << blk.order); ++f)
            if (b->contains(f)) balloon_pages_reported++;
    };
    h.after_complete = [this](const ReportRequest& r) {
      std::lock_guard lk(seen_mu);
      for (const auto& blk : r.blocks) {
        completed_bytes += blk.bytes();
        completed_blocks.push_back(blk);
      }
    };
    h.on_epoch_changed = [this](uint32_t from, uint32_t to, uint64_t forgotten) {
      std::lock_guard lk(seen_mu);
      epoch_changes.push_back({from, to, forgotten});
    };
    driver = std::make_unique<BalloonDriver>(*mem, *buddy, zone, o, conn, h);
  }
  TestDevice& device(size_t i) {
    std::lock_guard lk(dev_mu);
    return *devices.at(i);
  }
  size_t device_count() {
    std::lock_guard lk(dev_mu);
    return devices.size();
  }
  Workload workload() {
    WorkloadHooks wh;
    wh.notify_free = [this](int o) { driver->notify_free(o); };
    return Workload(*buddy, zone, *checker, counters, wh, 3);
  }
  uint64_t free_candidates(int order) {
    std::lock_guard lk(zone);
    return buddy->unreported_candidate_frames(order);
  }
  uint64_t reported_frames() {
    std::lock_guard lk(zone);
    return buddy->stats().reported_frames;
  }
  // All free memory of order >= 9 reported and nothing in flight.
  bool settled() {
    std::lock_guard lk(zone);
    return buddy->unreported_candidate_frames(9) == 0 && buddy->stats().isolated_frames == 0 &&
           driver->inflight_requests() == 0;
  }
  std::vector<Block> blocks_completed_since(size_t i) {
    std::lock_guard lk(seen_mu);
    return {completed_blocks.begin() + static_cast<std::ptrdiff_t>(i), completed_blocks.end()};
  }
  size_t blocks_completed() {
    std::lock_guard lk(seen_mu);
    return completed_blocks.size();
  }
  std::vector<EpochChange> epochs() {
    std::lock_guard lk(seen_mu);
    return epoch_changes;
  }
};

std::multiset<uint64_t> frames_of(const std::vector<Block>& v) {
  std::multiset<uint64_t> out;
  for (const auto& b : v) out.insert(b.frame);
  return out;
}

DriverOptions fast_options() {
  DriverOptions o;
  o.reporting.delay = 0ms;
  o.reporting.order = 9;
  o.drain_timeout = 30s;
  return o;
}

TEST(BalloonDriver, ReportsFreeMemoryAndDiscardedPagesReadZero) {
  DriverRig rig(fast_options());
  auto n = rig.driver->connect();
  ASSERT_TRUE(n) << n.error().message;
  ASSERT_TRUE(rig.driver->reporting_active());
  // Fill memory with the pattern first, so a missing discard would show.
  Workload w = rig.workload();
  auto all = w.alloc_bytes(rig.mem->size());
  w.free_all(all);
  rig.driver->start();
  // Everything free at order >= 9 ends up reported (initial pass + frees).
  ASSERT_TRUE(wait_for([&] {
    return rig.free_candidates(9) == 0 && rig.driver->inflight_requests() == 0 &&
           rig.completed_bytes.load() > 0;
  }));
  EXPECT_GT(rig.device(0).chains(), 0u);
  EXPECT_EQ(rig.device(0).punched(), rig.driver->reporting()->stats().bytes_reported);
  // Allocating everything again checks every reported page reads zero.
  auto again = w.alloc_bytes(rig.mem->size());
  EXPECT_GT(rig.counters.reported_bytes_checked.load(), 0u);
  EXPECT_EQ(rig.counters.reported_nonzero_bytes.load(), 0u);
  w.free_all(again);
  EXPECT_EQ(rig.counters.corrupted_bytes.load(), 0u);

  rig.driver->request_stop();
  rig.driver->join();
  EXPECT_EQ(rig.driver->exit_state(), BalloonDriver::Exit::Stopped);
  // Stop sequence: every ring stopped, the reporting ring at what we published.
  auto bases = rig.device(0).vring_base_replies();
  EXPECT_EQ(bases.size(), 3u);
  EXPECT_EQ(bases[2], rig.driver->reporting()->stats().requests & 0xffff);
  EXPECT_EQ(rig.device(0).status(), 0u);
  EXPECT_TRUE(wait_for([&] { return rig.device(0).exited(); }));
}

// The balloon over the wire: the driver polls num_pages, puts PFN arrays on
// the inflate queue (the device drops their backing) and writes actual;
// back to 0, the same pages come back on the deflate queue and are free
// again; reporting keeps running meanwhile and never reports a balloon page.
TEST(BalloonDriver, FollowsTheTargetOverTheInflateAndDeflateQueues) {
  DriverOptions o = fast_options();
  o.balloon = true;
  o.balloon_poll = 10ms;
  DriverRig rig(o);
  ASSERT_NE(rig.driver->balloon(), nullptr);
  auto n = rig.driver->connect();
  ASSERT_TRUE(n) << n.error().message;
  Workload w = rig.workload();
  auto all = w.alloc_bytes(rig.mem->size());
  w.free_all(all);
  const uint64_t free0 = [&] { std::lock_guard lk(rig.zone); return rig.buddy->stats().free_frames; }();
  rig.driver->start();
  TestDevice& dev = rig.device(0);
  dev.set_num_pages(1000);
  ASSERT_TRUE(wait_for([&] { return rig.driver->balloon()->actual() == 1000 && dev.actual() == 1000; }));
  const auto pfns = dev.inflated();
  ASSERT_EQ(pfns.size(), 1000u);
  const uint64_t pfn0 = rig.mem->gpa_base() >> 12;
  {
    std::lock_guard lk(rig.zone);
    EXPECT_EQ(rig.buddy->stats().free_frames + rig.buddy->stats().isolated_frames, free0 - 1000);
    for (uint32_t pfn : pfns) {
      EXPECT_EQ(rig.buddy->frame_state(pfn - pfn0), FrameState::Allocated);
      const uint8_t* page = rig.mem->frame_ptr(pfn - pfn0);
      EXPECT_TRUE(std::all_of(page, page + kFrameSize, [](uint8_t b) { return b == 0; }))
          << "pfn " << pfn << " still holds data: not discarded";
    }
  }
  // Reporting settles without ever reporting a balloon page.
  ASSERT_TRUE(wait_for([&] { return rig.settled(); }));
  dev.set_num_pages(0);
  ASSERT_TRUE(wait_for([&] { return rig.driver->balloon()->actual() == 0 && dev.actual() == 0; }));
  auto back = dev.deflated();
  std::sort(back.begin(), back.end());
  auto sorted = pfns;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(back, sorted);
  {
    std::lock_guard lk(rig.zone);
    for (uint32_t pfn : pfns) EXPECT_NE(rig.buddy->frame_state(pfn - pfn0), FrameState::Allocated);
  }
  // All of it can be allocated again, and the reported pages read zero.
  ASSERT_TRUE(wait_for([&] { return rig.settled(); }));
  auto again = w.alloc_bytes(rig.mem->size());
  uint64_t got = 0;
  for (const auto& h : again) got += h.bytes();
  EXPECT_EQ(got, free0 * kFrameSize);
  w.free_all(again);
  EXPECT_EQ(rig.counters.reported_nonzero_bytes.load(), 0u);
  EXPECT_EQ(rig.counters.corrupted_bytes.load(), 0u);
  EXPECT_EQ(rig.balloon_pages_reported.load(), 0u);
  const auto bs = rig.driver->balloon()->stats();
  EXPECT_EQ(bs.inflated_pages, 1000u);
  EXPECT_EQ(bs.deflated_pages, 1000u);
  rig.driver->request_stop();
  rig.driver->join();
  EXPECT_EQ(rig.driver->exit_state(), BalloonDriver::Exit::Stopped);
}

// The stats queue the way Linux drives it: one buffer primed at init, then
// refilled and added again each time the device returns it (the test device,
// like fphd, holds it and returns it every 50 ms). Reporting is unaffected,
// with the reporting queue moved to index 3.
TEST(BalloonDriver, StatsQueueIsPrimedAndRefilledOnEveryRequest) {
  DriverOptions o = fast_options();
  o.frontend.stats = true;
  DriverRig rig(o);
  auto n = rig.driver->connect();
  ASSERT_TRUE(n) << n.error().message;
  EXPECT_TRUE(n->stats());
  EXPECT_EQ(n->layout.stats, 2);
  EXPECT_EQ(n->layout.reporting, 3);
  rig.driver->start();
  ASSERT_TRUE(wait_for([&] { return rig.device(0).stats_buffers() >= 4; }));
  EXPECT_GE(rig.driver->stats_sent(), 4u);
  // What the buffer says follows the model: allocate 8 MiB, free drops.
  Workload w = rig.workload();
  uint64_t before;
  {
    std::lock_guard lk(rig.zone);
    before = rig.buddy->stats().free_frames * kFrameSize;
  }
  auto held = w.alloc_bytes(8ull << 20);
  ASSERT_TRUE(wait_for([&] { return rig.device(0).stats_free() + (8ull << 20) <= before; }));
  w.free_all(held);
  ASSERT_TRUE(wait_for([&] { return rig.device(0).stats_free() + (8ull << 20) > before; }));
  // Reporting still works on queue 3.
  ASSERT_TRUE(wait_for([&] {
    return rig.free_candidates(9) == 0 && rig.driver->inflight_requests() == 0 &&
           rig.completed_bytes.load() > 0;
  }));
  rig.driver->request_stop();
  rig.driver->join();
  auto bases = rig.device(0).vring_base_replies();
  EXPECT_EQ(bases.size(), 4u);
  // The device consumed every stats buffer the driver added.
  EXPECT_EQ(bases[2], rig.driver->stats_sent() & 0xffff);
  EXPECT_EQ(rig.counters.corrupted_bytes.load(), 0u);
}

TEST(BalloonDriver, ToleratesSpuriousCalls) {
  // The device signals the call eventfd as soon as it gets it and holds the
  // chain: the only call the driver sees has no used element behind it.
  DeviceOptions d;
  d.spurious_call = true;
  d.complete_reports = false;
  DriverRig rig(fast_options(), {d});
  ASSERT_TRUE(rig.driver->connect());
  rig.driver->start();
  ASSERT_TRUE(wait_for([&] { return rig.driver->calls() > 0 && rig.device(0).chains() > 0; }));
  EXPECT_EQ(rig.driver->spurious_calls(), rig.driver->calls());
  EXPECT_EQ(rig.driver->inflight_requests(), 1u);
  EXPECT_EQ(rig.completed_bytes.load(), 0u);
  // Real completions still work afterwards.
  rig.device(0).release();
  ASSERT_TRUE(wait_for([&] { return rig.free_candidates(9) == 0 && rig.completed_bytes > 0; }));
  rig.driver->request_stop();
  rig.driver->join();
  EXPECT_EQ(rig.driver->exit_state(), BalloonDriver::Exit::Stopped);
}

TEST(BalloonDriver, ConnectionLossWithoutReconnectEnds) {
  DeviceOptions hold;
  hold.complete_reports = false;
  DriverRig rig(fast_options(), {hold});
  ASSERT_TRUE(rig.driver->connect());
  rig.driver->start();
  ASSERT_TRUE(wait_for([&] { return rig.device(0).chains() > 0; }));
  EXPECT_EQ(rig.driver->inflight_requests(), 1u);
  rig.device(0).kill();
  pollfd p{rig.driver->done_fd(), POLLIN, 0};
  ASSERT_EQ(poll(&p, 1, 60000), 1);
  rig.driver->join();
  EXPECT_EQ(rig.driver->exit_state(), BalloonDriver::Exit::ConnectionLost);
  // The in-flight blocks stay isolated: nothing may allocate them.
  std::lock_guard lk(rig.zone);
  EXPECT_GT(rig.buddy->stats().isolated_frames, 0u);
}

TEST(BalloonDriver, ReconnectRepostsInflightRequests) {
  DeviceOptions hold;
  hold.complete_reports = false;
  DriverOptions o = fast_options();
  o.reconnect = true;
  DriverRig rig(o, {hold, DeviceOptions{}});
  ASSERT_TRUE(rig.driver->connect());
  rig.driver->start();
  ASSERT_TRUE(wait_for([&] { return rig.device(0).chains() > 0; }));
  const auto inflight = rig.driver->reporting()->inflight();
  ASSERT_EQ(inflight.size(), 1u);
  rig.device(0).kill();
  ASSERT_TRUE(wait_for([&] { return rig.driver->reconnects() == 1; }));
  ASSERT_EQ(rig.device_count(), 2u);
  // The same request (same id) comes back from the second device.
  ASSERT_TRUE(wait_for([&] {
    return rig.driver->inflight_requests() == 0 && rig.free_candidates(9) == 0 &&
           rig.completed_bytes.load() > 0;
  }));
  const auto st = rig.driver->reporting()->stats();
  EXPECT_EQ(st.requests_failed, 0u);
  EXPECT_GE(st.bytes_reported, inflight[0].blocks.size() * (kFrameSize << 9));
  EXPECT_GE(rig.device(1).chains(), 1u);
  rig.driver->request_stop();
  rig.driver->join();
  EXPECT_EQ(rig.driver->exit_state(), BalloonDriver::Exit::Stopped);
  std::lock_guard lk(rig.zone);
  EXPECT_EQ(rig.buddy->stats().isolated_frames, 0u);
}

TEST(BalloonDriver, StopWaitsForHeldRequestAndGetVringBaseFlushesIt) {
  DeviceOptions hold;
  hold.complete_reports = false;
  DriverOptions o = fast_options();
  o.drain_timeout = 0ms;  // go straight to GET_VRING_BASE
  DriverRig rig(o, {hold});
  ASSERT_TRUE(rig.driver->connect());
  rig.driver->start();
  ASSERT_TRUE(wait_for([&] { return rig.device(0).chains() > 0; }));
  rig.driver->request_stop();
  rig.driver->join();
  // The device finished the chain before answering GET_VRING_BASE; the
  // driver collected it: no isolated memory left behind.
  EXPECT_EQ(rig.driver->inflight_requests(), 0u);
  EXPECT_EQ(rig.device(0).vring_base_replies()[2], 1u);
  std::lock_guard lk(rig.zone);
  EXPECT_EQ(rig.buddy->stats().isolated_frames, 0u);
}

// ------------------------------------------------------------ migration epoch

DeviceOptions epoch_device(uint32_t epoch = 0) {
  DeviceOptions d;
  d.features |= bal::kFFphEpoch;
  d.epoch = epoch;
  return d;
}

DriverOptions epoch_options() {
  DriverOptions o = fast_options();
  o.epoch_poll = 10ms;
  return o;
}

// The driver polls the epoch over the control socket while it runs; a bump
// makes it report every free block again, once, in ordinary requests.
TEST(BalloonDriver, EpochChangeReportsAllFreeMemoryAgain) {
  DriverRig rig(epoch_options(), {epoch_device(0)});
  auto n = rig.driver->connect();
  ASSERT_TRUE(n) << n.error().message;
  EXPECT_TRUE(n->fph_epoch());
  EXPECT_NE(rig.device(0).features() & bal::kFFphEpoch, 0u);
  ASSERT_EQ(n->epoch, std::optional<uint32_t>(0));
  EXPECT_EQ(rig.driver->epoch(), std::optional<uint32_t>(0));
  rig.driver->start();
  ASSERT_TRUE(wait_for([&] { return rig.completed_bytes.load() > 0 && rig.settled(); }));
  const size_t first_blocks = rig.blocks_completed();
  const auto first = frames_of(rig.blocks_completed_since(0));
  const uint64_t reported = rig.reported_frames();
  ASSERT_GT(reported, 0u);
  // Polls with an unchanged epoch change nothing.
  const uint64_t reads = rig.device(0).epoch_reads();
  ASSERT_TRUE(wait_for([&] { return rig.device(0).epoch_reads() >= reads + 3; }));
  EXPECT_EQ(rig.blocks_completed(), first_blocks);
  EXPECT_EQ(rig.driver->epoch_changes(), 0u);

  rig.device(0).set_epoch(1);
  ASSERT_TRUE(wait_for([&] { return rig.driver->epoch_changes() == 1; }));
  EXPECT_EQ(rig.driver->epoch(), std::optional<uint32_t>(1));
  ASSERT_TRUE(wait_for([&] {
    return rig.blocks_completed() >= 2 * first_blocks && rig.settled();
  }));
  // Everything reported before is reported again, each block once; then
  // nothing more while the epoch stays.
  const uint64_t reads2 = rig.device(0).epoch_reads();
  ASSERT_TRUE(wait_for([&] { return rig.device(0).epoch_reads() >= reads2 + 3; }));
  EXPECT_EQ(frames_of(rig.blocks_completed_since(first_blocks)), first);
  EXPECT_EQ(rig.reported_frames(), reported);
  const auto ev = rig.epochs();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].from, 0u);
  EXPECT_EQ(ev[0].to, 1u);
  EXPECT_EQ(ev[0].forgotten_bytes, reported * kFrameSize);
  EXPECT_EQ(rig.device(0).punched(), 2 * reported * kFrameSize);
  EXPECT_EQ(rig.driver->reporting()->stats().requests_failed, 0u);

  rig.driver->request_stop();
  rig.driver->join();
  EXPECT_EQ(rig.driver->exit_state(), BalloonDriver::Exit::Stopped);
  EXPECT_EQ(rig.counters.corrupted_bytes.load(), 0u);
}

// A back end that offers the bit but cannot serve offset 16 yet (empty
// reply): no epoch, no polling, reporting as usual. And with the epoch
// turned off the bit is not acked and offset 16 never read.
TEST(BalloonDriver, EpochUnservedOrNotWantedMeansNoEpoch) {
  {
    DeviceOptions d = epoch_device(5);
    d.serve_epoch = false;
    DriverRig rig(epoch_options(), {d});
    auto n = rig.driver->connect();
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_TRUE(n->fph_epoch());
    EXPECT_FALSE(n->epoch);
    rig.driver->start();
    ASSERT_TRUE(wait_for([&] { return rig.completed_bytes.load() > 0 && rig.settled(); }));
    std::this_thread::sleep_for(50ms);  // several poll periods: still the one setup read
    EXPECT_EQ(rig.device(0).epoch_reads(), 1u);
    EXPECT_FALSE(rig.driver->epoch());
    rig.driver->request_stop();
    rig.driver->join();
    EXPECT_EQ(rig.driver->exit_state(), BalloonDriver::Exit::Stopped);
  }
  {
    DriverOptions o = epoch_options();
    o.frontend.epoch = false;
    DriverRig rig(o, {epoch_device(5)});
    auto n = rig.driver->connect();
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_FALSE(n->fph_epoch());
    EXPECT_EQ(rig.device(0).features() & bal::kFFphEpoch, 0u);
    rig.driver->start();
    ASSERT_TRUE(wait_for([&] { return rig.completed_bytes.load() > 0 && rig.settled(); }));
    std::this_thread::sleep_for(50ms);
    EXPECT_EQ(rig.device(0).epoch_reads(), 0u);
    rig.driver->request_stop();
    rig.driver->join();
  }
}

// Reconnecting to a back end with another epoch (a migration destination)
// is a change too: the new back end gets all free memory.
TEST(BalloonDriver, EpochComparedAcrossReconnect) {
  DriverOptions o = epoch_options();
  o.reconnect = true;
  o.epoch_poll = 0ms;  // setup reads only
  DriverRig rig(o, {epoch_device(3), epoch_device(4)});
  ASSERT_TRUE(rig.driver->connect());
  rig.driver->start();
  ASSERT_TRUE(wait_for([&] { return rig.completed_bytes.load() > 0 && rig.settled(); }));
  const uint64_t reported = rig.reported_frames();
  const size_t first_blocks = rig.blocks_completed();
  EXPECT_EQ(rig.device(0).epoch_reads(), 1u);  // no polling with epoch_poll 0
  rig.device(0).kill();
  ASSERT_TRUE(wait_for([&] { return rig.driver->reconnects() == 1; }));
  ASSERT_TRUE(wait_for([&] { return rig.blocks_completed() >= 2 * first_blocks && rig.settled(); }));
  EXPECT_EQ(rig.driver->epoch(), std::optional<uint32_t>(4));
  EXPECT_EQ(rig.driver->epoch_changes(), 1u);
  EXPECT_EQ(rig.device(1).punched(), reported * kFrameSize);
  rig.driver->request_stop();
  rig.driver->join();
  EXPECT_EQ(rig.driver->exit_state(), BalloonDriver::Exit::Stopped);
}

// ------------------------------------------------------------ whole agent

struct AgentRun {
  int rc = -1;
  std::vector<nlohmann::json> events;
  const nlohmann::json* find(const std::string& ev) const {
    for (const auto& e : events)
      if (e.value("event", "") == ev) return &e;
    return nullptr;
  }
};

// Runs fph::guest::run() in --listen mode and attaches a TestDevice to it.
AgentRun run_agent(Config c, DeviceOptions d) {
  char dir[] = "/tmp/fph-guest-agent-XXXXXX";
  EXPECT_NE(mkdtemp(dir), nullptr);
  c.listen_path = std::string(dir) + "/guest.sock";
  c.connect_timeout = 60s;
  EXPECT_TRUE(validate(c));
  std::FILE* out = std::tmpfile();
  EventSink sink(out);
  AgentRun r;
  std::thread t([&] { r.rc = run(c, sink); });
  EXPECT_TRUE(wait_for([&] { return access(c.listen_path.c_str(), F_OK) == 0; }));
  auto s = connect_unix(c.listen_path, 60s);
  EXPECT_TRUE(s);
  if (s) {
    TestDevice dev(std::move(*s), d);
    t.join();
  } else {
    t.join();  // run() gives up after its connect timeout
  }
  std::rewind(out);
  char line[4096];
  while (std::fgets(line, sizeof line, out)) r.events.push_back(nlohmann::json::parse(line));
  std::fclose(out);
  rmdir(dir);
  return r;
}

Config agent_config() {
  Config c;
  c.memory = 32ull << 20;
  c.resident = 8ull << 20;
  c.reporting_delay = 0ms;
  c.workload = *parse_workload("alloc-free:8M:0");
  c.repeat = 2;
  c.exit_when_reported = true;
  c.name = "t1";
  return c;
}

TEST(Agent, RunsCleanAgainstAGoodBackEnd) {
  AgentRun r = run_agent(agent_config(), {});
  EXPECT_EQ(r.rc, kExitOk);
  ASSERT_NE(r.find("ready"), nullptr);
  EXPECT_EQ((*r.find("ready"))["name"], "t1");
  EXPECT_EQ((*r.find("ready"))["memory_bytes"], 32ull << 20);
  EXPECT_TRUE((*r.find("ready"))["reporting"].get<bool>());
  ASSERT_NE(r.find("workload_freed"), nullptr);
  EXPECT_EQ((*r.find("workload_freed"))["bytes"], 8ull << 20);
  ASSERT_NE(r.find("report_done"), nullptr);
  const auto* sum = r.find("summary");
  ASSERT_NE(sum, nullptr);
  EXPECT_EQ((*sum)["corrupted_bytes"], 0);
  EXPECT_EQ((*sum)["reported_nonzero_bytes"], 0);
  EXPECT_GT((*sum)["reported_bytes"].get<uint64_t>(), 0u);
  EXPECT_GE((*sum)["resident_checks"].get<uint64_t>(), 2u);
  EXPECT_EQ((*sum)["reason"], "reported");
  EXPECT_EQ((*sum)["exit_code"], 0);
}

// The epoch as the agent shows it: in "ready", an "epoch_changed" event when
// the device bumps it, and in the summary.
TEST(Agent, EmitsEpochChangedWhenTheDeviceBumpsTheEpoch) {
  Config c = agent_config();
  c.exit_when_reported = false;
  c.duration = 1000ms;
  c.epoch_poll = 20ms;
  DeviceOptions d;
  d.features |= bal::kFFphEpoch;
  d.epoch = 7;
  d.bump_epoch_at_read = 3;  // the setup read, then the second poll (~40 ms in)
  AgentRun r = run_agent(c, d);
  EXPECT_EQ(r.rc, kExitOk);
  ASSERT_NE(r.find("ready"), nullptr);
  EXPECT_EQ((*r.find("ready"))["epoch"], 7);
  const auto* ev = r.find("epoch_changed");
  ASSERT_NE(ev, nullptr);
  EXPECT_EQ((*ev)["from"], 7);
  EXPECT_EQ((*ev)["to"], 8);
  EXPECT_TRUE((*ev)["forgotten_bytes"].is_number_unsigned());
  const auto* sum = r.find("summary");
  ASSERT_NE(sum, nullptr);
  EXPECT_EQ((*sum)["epoch"], 8);
  EXPECT_EQ((*sum)["epoch_changes"], 1);
  EXPECT_EQ((*sum)["corrupted_bytes"], 0);
  // --no-epoch: not acked, no event, null in ready and summary.
  c.no_epoch = true;
  AgentRun r2 = run_agent(c, d);
  EXPECT_EQ(r2.rc, kExitOk);
  ASSERT_NE(r2.find("ready"), nullptr);
  EXPECT_TRUE((*r2.find("ready"))["epoch"].is_null());
  EXPECT_EQ(r2.find("epoch_changed"), nullptr);
  EXPECT_EQ((*r2.find("summary"))["epoch_changes"], 0);
}

// fph-bench's mode: say once that everything is reported, keep running
// (here until --duration), and print report_done events in one go with it.
TEST(Agent, AnnouncesReportedOnceAndKeepsRunning) {
  Config c = agent_config();
  c.exit_when_reported = false;
  c.announce_reported = true;
  c.defer_report_events = true;
  c.duration = 8s;  // how long it runs, not a bound on anything
  AgentRun r = run_agent(c, {});
  EXPECT_EQ(r.rc, kExitOk);
  size_t reported_at = 0, reported = 0, last_done = 0, done = 0;
  for (size_t i = 0; i < r.events.size(); ++i) {
    const std::string ev = r.events[i].value("event", "");
    if (ev == "reported") reported_at = i, ++reported;
    if (ev == "report_done") last_done = i, ++done;
  }
  EXPECT_EQ(reported, 1u);
  EXPECT_GT(done, 0u);
  EXPECT_LT(last_done, reported_at);  // every chain came back before the announcement
  ASSERT_NE(r.find("summary"), nullptr);
  EXPECT_EQ((*r.find("summary"))["reason"], "duration");
  EXPECT_EQ((*r.find("summary"))["corrupted_bytes"], 0);
}

TEST(EventSink, DefersReportEventsUntilTheNextOtherEventInOrder) {
  std::FILE* out = std::tmpfile();
  auto lines = [&] {
    std::fflush(out);
    std::vector<std::string> v;
    std::rewind(out);
    char buf[256];
    while (std::fgets(buf, sizeof buf, out)) v.push_back(nlohmann::json::parse(buf).value("event", ""));
    std::fseek(out, 0, SEEK_END);
    return v;
  };
  {
    EventSink sink(out);
    sink.set_deferring(true);
    sink.emit({{"event", "a"}}, /*deferrable=*/true);
    sink.emit({{"event", "b"}}, /*deferrable=*/true);
    EXPECT_TRUE(lines().empty());  // held
    sink.emit({{"event", "c"}});
    EXPECT_EQ(lines(), (std::vector<std::string>{"a", "b", "c"}));
    sink.emit({{"event", "d"}}, /*deferrable=*/true);
  }  // destruction prints what is held
  EXPECT_EQ(lines(), (std::vector<std::string>{"a", "b", "c", "d"}));
  std::fclose(out);
}

TEST(Agent, DetectsABackEndThatDiscardsResidentMemory) {
  // The resident set starts at the first 4 MiB block without rings (GPA
  // 4 MiB); a back end that also punches there corrupts the guest.
  DeviceOptions bad;
  bad.extra_punch_gpa = 4ull << 20;
  bad.extra_punch_len = 64 * 1024;
  AgentRun r = run_agent(agent_config(), bad);
  EXPECT_EQ(r.rc, kExitCorruption);
  const auto* sum = r.find("summary");
  ASSERT_NE(sum, nullptr);
  EXPECT_GT((*sum)["corrupted_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ((*sum)["exit_code"], kExitCorruption);
}

TEST(Agent, NoReportingNegotiatesNoReportingAndExits) {
  Config c = agent_config();
  c.no_reporting = true;
  AgentRun r = run_agent(c, {});
  EXPECT_EQ(r.rc, kExitOk);
  ASSERT_NE(r.find("ready"), nullptr);
  EXPECT_FALSE((*r.find("ready"))["reporting"].get<bool>());
  EXPECT_EQ(r.find("report_done"), nullptr);
  EXPECT_EQ((*r.find("summary"))["reported_bytes"], 0);
}

}  // namespace
}  // namespace fph::guest
