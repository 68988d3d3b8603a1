// Fuzz target: the device side of a split ring over a guest-controlled
// descriptor table and available ring, and the driver side over a
// device-controlled used ring.
//
// Input layout:
//   byte 0      queue size = 1 << (byte & 7)   (1..128)
//   byte 1      bit 0: INDIRECT_DESC negotiated, bit 1: EVENT_IDX,
//               bit 2: hold every chain (return none), so a head offered
//               twice is still in flight the second time
//   bytes 2..3  next_avail to start from (as after SET_VRING_BASE)
//   bytes 4..   image of guest memory from gpa 0 (at most kMem bytes)
// Guest memory layout: descriptor table at 0, available ring at kAvail, used
// ring at kUsed; indirect tables may point anywhere (gpa taken modulo kMem).
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include "fph/proto/virtqueue.h"

namespace vq = fph::proto::vq;

namespace {

constexpr size_t kMem = 8192;
constexpr size_t kAvail = 0x800;
constexpr size_t kUsed = 0xa00;

void check(bool ok) {
  if (!ok) __builtin_trap();
}

// gpa -> buffer offset gpa % kMem (an aliasing but honest mapping: every
// returned range lies inside the buffer), so random 64-bit addresses still
// reach the indirect-table code.
class BufferMemory : public vq::GuestMemory {
 public:
  explicit BufferMemory(uint8_t* base) : base_(base) {}
  uint8_t* translate(uint64_t gpa, uint64_t len) const override {
    const uint64_t off = gpa % kMem;
    if (len > kMem - off) return nullptr;
    return base_ + off;
  }

 private:
  uint8_t* base_;
};

void device_side(uint16_t num, uint8_t flags, uint16_t next_avail, uint8_t* mem) {
  BufferMemory gm(mem);
  vq::DeviceRing ring(num, mem, mem + kAvail, mem + kUsed, next_avail, flags & 1, flags & 2);
  const bool hold = flags & 4;
  // Invariant: a head is taken at most once until it is returned.
  std::vector<bool> taken(num, false);
  for (uint32_t i = 0; i < 2u * num + 2; ++i) {
    auto popped = ring.pop_avail();
    if (!popped) {
      const auto& e = popped.error();
      check(!e.message().empty());
      if (e.code == vq::ChainErrc::HeadInFlight) check(e.head < num && taken[e.head] && ring.in_flight(e.head));
      if (vq::ends_ring(e.code)) break;
      continue;
    }
    if (!popped->has_value()) break;
    const uint16_t head = **popped;
    check(head < num);
    check(!taken[head]);
    check(ring.in_flight(head));
    taken[head] = true;
    auto chain = ring.walk(head, gm);
    uint32_t len = 0;
    if (chain) {
      check(chain->head == head);
      check(!chain->buffers.empty());
      check(chain->total_len <= (uint64_t{1} << 32));
      if (!chain->indirect) check(chain->buffers.size() <= num);
      check(chain->buffers.size() <= num + vq::kMaxQueueSize);
      bool seen_w = false;
      uint64_t total = 0;
      for (const auto& b : chain->buffers) {
        check(!(seen_w && !b.device_writable));
        seen_w = seen_w || b.device_writable;
        total += b.len;
      }
      check(total == chain->total_len);
      len = static_cast<uint32_t>(chain->total_len & 0xffff);
    } else {
      check(!chain.error().message().empty());
    }
    if (hold) continue;
    const uint16_t old = ring.used_idx();
    const size_t off = ring.push_used(head, len);
    check(off + 8 <= vq::used_ring_bytes(num));
    check(ring.used_idx() == static_cast<uint16_t>(old + 1));
    check(!ring.in_flight(head));
    taken[head] = false;
    (void)ring.should_notify(old);
  }
  // Every head directly, and one past the end.
  for (uint32_t h = 0; h <= num; ++h) {
    auto c = ring.walk(static_cast<uint16_t>(h), gm);
    if (h == num) check(!c && c.error().code == vq::ChainErrc::HeadOutOfRange);
  }
}

// The driver posts chains, then a hostile device rewrites the used ring from
// the fuzz bytes. The free list must stay consistent.
void driver_side(uint16_t num, std::span<const uint8_t> used_bytes) {
  auto mem = std::make_unique<uint8_t[]>(kMem);
  uint8_t* desc = mem.get();
  uint8_t* avail = mem.get() + kAvail;
  uint8_t* used = mem.get() + kUsed;
  vq::DriverRing drv(num, desc, avail, used);
  const vq::Buffer two[] = {{0x1000, 8, false}, {0x2000, 8, true}};
  while (drv.add_chain(std::span(two).first(drv.free_count() >= 2 ? 2 : 1))) {
  }
  check(drv.free_count() == 0);
  std::memcpy(used, used_bytes.data(), std::min(used_bytes.size(), vq::used_ring_bytes(num)));
  for (uint32_t i = 0; i < 2u * num + 2; ++i) {
    auto u = drv.pop_used();
    if (!u) break;
    check(u->id < num);
    check(drv.free_count() <= num);
  }
  // Whatever is free must form a valid chain the device can walk.
  const uint16_t n = drv.free_count();
  if (n == 0) return;
  std::vector<vq::Buffer> bufs(n, vq::Buffer{0x3000, 16, true});
  auto head = drv.add_chain(bufs);
  check(head.has_value());
  BufferMemory gm(mem.get());
  vq::DeviceRing dev(num, desc, avail, used, 0, false, false);
  auto c = dev.walk(*head, gm);
  check(c.has_value() && c->buffers.size() == n);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  const uint16_t num = static_cast<uint16_t>(1u << (data[0] & 7));
  const uint8_t flags = data[1];
  uint16_t next_avail;
  std::memcpy(&next_avail, data + 2, 2);
  std::span<const uint8_t> image(data + 4, std::min(size - 4, kMem));

  // Exactly kMem bytes on the heap, so any overrun hits an ASan redzone.
  auto mem = std::make_unique<uint8_t[]>(kMem);
  std::memset(mem.get(), 0, kMem);
  std::memcpy(mem.get(), image.data(), image.size());
  device_side(num, flags, next_avail, mem.get());

  std::vector<uint8_t> used_bytes(kMem - kUsed, 0);
  if (image.size() > kUsed) std::memcpy(used_bytes.data(), image.data() + kUsed, image.size() - kUsed);
  driver_side(num, used_bytes);
  return 0;
}
