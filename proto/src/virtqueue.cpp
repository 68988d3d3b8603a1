// The virtio split virtqueue (virtio 1.2 section 2.7; reference section 5).
//
// Layout (offsets in bytes, N = queue size):
//   descriptor table: N x {le64 addr, le32 len, le16 flags, le16 next}
//   available ring:   le16 flags @0, le16 idx @2, le16 ring[N] @4, le16 used_event @4+2N
//   used ring:        le16 flags @0, le16 idx @2, {le32 id, le32 len}[N] @4, le16 avail_event @4+8N
//
// The rings live in memory shared with the peer, which may write them at any
// time. Every access to a peer-written field is a single atomic load of that
// field (so it is read once, never torn, and UB-free); every field we write is
// an atomic store. Descriptors are copied into a local Desc once and only the
// copy is validated and used.
#include "fph/proto/virtqueue.h"

#include <fmt/format.h>

#include <bit>
#include <cstring>

#include "fph/common/checked.h"

namespace fph::proto::vq {

static_assert(std::endian::native == std::endian::little,
              "fph::proto::vq assumes a little-endian host (virtio 1.x rings are little-endian)");

namespace {

// Atomic access to a naturally aligned field. The ring parts must be aligned
// (virtio 1.2 2.7: desc 16, avail 2, used 4; parse_vring_addr checks the
// front end's addresses); should a caller pass a misaligned mapping anyway we
// fall back to memcpy plus a fence rather than perform a misaligned atomic.
template <class T, int Order = __ATOMIC_RELAXED>
T load(const uint8_t* p) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T) == 0) {
    return __atomic_load_n(reinterpret_cast<const T*>(p), Order);
  }
  T v;
  std::memcpy(&v, p, sizeof(T));
  if constexpr (Order != __ATOMIC_RELAXED) __atomic_thread_fence(__ATOMIC_ACQUIRE);
  return v;
}

template <class T, int Order = __ATOMIC_RELAXED>
void store(uint8_t* p, T v) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T) == 0) {
    __atomic_store_n(reinterpret_cast<T*>(p), v, Order);
    return;
  }
  if constexpr (Order != __ATOMIC_RELAXED) __atomic_thread_fence(__ATOMIC_RELEASE);
  std::memcpy(p, &v, sizeof(T));
}

constexpr size_t kAvailFlags = 0;
constexpr size_t kAvailIdx = 2;
constexpr size_t kAvailRing = 4;
constexpr size_t kUsedFlags = 0;
constexpr size_t kUsedIdx = 2;
constexpr size_t kUsedRing = 4;
constexpr size_t kUsedElemSize = 8;

// One descriptor, read field by field exactly once.
Desc read_desc(const uint8_t* table, uint32_t i) {
  const uint8_t* p = table + kDescSize * size_t{i};
  Desc d;
  d.addr = load<uint64_t>(p + 0);
  d.len = load<uint32_t>(p + 8);
  d.flags = load<uint16_t>(p + 12);
  d.next = load<uint16_t>(p + 14);
  return d;
}

// Descriptor from a private copy of an indirect table (any alignment).
Desc decode_desc(const uint8_t* p) {
  Desc d;
  std::memcpy(&d.addr, p + 0, 8);
  std::memcpy(&d.len, p + 8, 4);
  std::memcpy(&d.flags, p + 12, 2);
  std::memcpy(&d.next, p + 14, 2);
  return d;
}

void write_desc(uint8_t* table, uint32_t i, const Desc& d) {
  uint8_t* p = table + kDescSize * size_t{i};
  store<uint64_t>(p + 0, d.addr);
  store<uint32_t>(p + 8, d.len);
  store<uint16_t>(p + 12, d.flags);
  store<uint16_t>(p + 14, d.next);
}

// virtio 1.2 2.7.7.2 / 2.7.10: notify iff new_idx passed event since old.
bool vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
  return static_cast<uint16_t>(new_idx - event - 1) < static_cast<uint16_t>(new_idx - old);
}

// Accumulates validated buffers of one chain.
struct ChainBuilder {
  Chain& chain;
  bool seen_writable = false;

  // virtio 1.2 2.7.4: readable descriptors before writable ones; the whole
  // chain at most 2^32 bytes (2.7.5.2 "total length ... MUST NOT exceed").
  std::optional<ChainErrc> add(const Desc& d) {
    const bool writable = (d.flags & kDescFWrite) != 0;
    if (!writable && seen_writable) return ChainErrc::ReadableAfterWritable;
    seen_writable = seen_writable || writable;
    chain.total_len += d.len;  // <= 2^32 + 2^32 - 1: cannot overflow 64 bits
    if (chain.total_len > (uint64_t{1} << 32)) return ChainErrc::LengthOverflow;
    chain.buffers.push_back(Buffer{d.addr, d.len, writable});
    return std::nullopt;
  }
};

}  // namespace

bool valid_queue_size(uint32_t num) { return num >= 1 && num <= kMaxQueueSize && is_power_of_two(num); }

std::string_view to_string(ChainErrc c) {
  switch (c) {
    case ChainErrc::HeadOutOfRange: return "head index out of range";
    case ChainErrc::NextOutOfRange: return "next index out of range";
    case ChainErrc::TooLong: return "chain longer than the queue (loop?)";
    case ChainErrc::IndirectNotNegotiated: return "indirect descriptor without INDIRECT_DESC";
    case ChainErrc::IndirectBadLength: return "indirect table length invalid";
    case ChainErrc::IndirectNested: return "nested indirect descriptor";
    case ChainErrc::IndirectWithNext: return "indirect descriptor with NEXT";
    case ChainErrc::IndirectUnmapped: return "indirect table outside guest memory";
    case ChainErrc::ReadableAfterWritable: return "readable descriptor after a writable one";
    case ChainErrc::LengthOverflow: return "chain length over 4 GiB";
    case ChainErrc::AvailIndexJump: return "avail index moved more than the queue size";
    case ChainErrc::HeadInFlight: return "head offered again while still in flight";
  }
  return "unknown chain error";
}

bool ends_ring(ChainErrc c) { return c == ChainErrc::AvailIndexJump || c == ChainErrc::HeadInFlight; }

std::string ChainError::message() const {
  if (code == ChainErrc::AvailIndexJump) {
    return fmt::format("{} (avail idx {})", to_string(code), desc_index);
  }
  if (code == ChainErrc::HeadInFlight) return fmt::format("{} (head {})", to_string(code), head);
  return fmt::format("{} (head {}, descriptor {})", to_string(code), head, desc_index);
}

// ---------------------------------------------------------------- device side

DeviceRing::DeviceRing(uint16_t num, uint8_t* desc, uint8_t* avail, uint8_t* used,
                       uint16_t next_avail, bool indirect_allowed, bool event_idx)
    : num_(num),
      desc_(desc),
      avail_(avail),
      used_(used),
      next_avail_(next_avail),
      indirect_allowed_(indirect_allowed),
      event_idx_(event_idx) {
  if (desc_ == nullptr || avail_ == nullptr || used_ == nullptr) num_ = 0;
  in_flight_.assign(num_, 0);
  sync_used_idx();
}

bool DeviceRing::in_flight(uint16_t head) const { return head < num_ && in_flight_[head] != 0; }

void DeviceRing::inherit_in_flight(const DeviceRing& old) {
  if (old.num_ == num_) in_flight_ = old.in_flight_;
}

uint16_t DeviceRing::avail_idx() const {
  if (num_ == 0) return next_avail_;
  return load<uint16_t, __ATOMIC_ACQUIRE>(avail_ + kAvailIdx);
}

void DeviceRing::sync_used_idx() {
  if (num_ != 0) used_idx_ = load<uint16_t>(used_ + kUsedIdx);
}

Expected<std::optional<uint16_t>, ChainError> DeviceRing::pop_avail() {
  if (num_ == 0) return std::optional<uint16_t>{};
  uint16_t idx = avail_idx();
  if (idx == next_avail_ && event_idx_) {
    // virtio 1.2 2.7.10: ask to be kicked when the driver adds past
    // next_avail (avail_event), then look again: the driver may have added
    // an entry before it could see the new avail_event.
    store<uint16_t>(used_ + kUsedRing + kUsedElemSize * num_, next_avail_);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    idx = avail_idx();
  }
  const uint16_t pending = static_cast<uint16_t>(idx - next_avail_);
  if (pending > num_) {
    // desc_index carries the offending avail->idx value.
    return unexpected(ChainError{ChainErrc::AvailIndexJump, 0, idx});
  }
  if (pending == 0) return std::optional<uint16_t>{};
  // Ordered after the acquire load of avail->idx (virtio 1.2 2.7.13.3).
  const uint16_t head =
      load<uint16_t>(avail_ + kAvailRing + 2 * static_cast<size_t>(next_avail_ % num_));
  ++next_avail_;
  if (event_idx_) store<uint16_t>(used_ + kUsedRing + kUsedElemSize * num_, next_avail_);
  if (head >= num_) return unexpected(ChainError{ChainErrc::HeadOutOfRange, head, head});
  if (in_flight_[head]) return unexpected(ChainError{ChainErrc::HeadInFlight, head, head});
  in_flight_[head] = 1;
  return std::optional<uint16_t>{head};
}

Expected<Chain, ChainError> DeviceRing::walk(uint16_t head, const GuestMemory& mem) const {
  auto fail = [head](ChainErrc c, uint32_t at) {
    return unexpected(ChainError{c, head, at});
  };
  if (num_ == 0 || head >= num_) return fail(ChainErrc::HeadOutOfRange, head);

  Chain chain;
  chain.head = head;
  ChainBuilder b{chain};
  uint32_t idx = head;
  // virtio 1.2 2.7.5.2: a chain has at most num descriptors; more means a
  // loop (or a driver bug), either way we stop.
  for (uint32_t steps = 1;; ++steps) {
    if (steps > num_) return fail(ChainErrc::TooLong, idx);
    const Desc d = read_desc(desc_, idx);

    if (d.flags & kDescFIndirect) {
      // virtio 1.2 2.7.5.3.1: only with INDIRECT_DESC, never with NEXT (so
      // it ends the chain), table of len/16 descriptors, no nesting. The
      // device ignores WRITE on the indirect descriptor itself.
      if (!indirect_allowed_) return fail(ChainErrc::IndirectNotNegotiated, idx);
      if (d.flags & kDescFNext) return fail(ChainErrc::IndirectWithNext, idx);
      if (d.len == 0 || d.len % kDescSize != 0 || d.len > kMaxQueueSize * kDescSize) {
        return fail(ChainErrc::IndirectBadLength, idx);
      }
      const uint8_t* table = mem.translate(d.addr, d.len);
      if (table == nullptr) return fail(ChainErrc::IndirectUnmapped, idx);
      // Copy the table out once; only the copy is read from here on.
      std::vector<uint8_t> copy(d.len);
      std::memcpy(copy.data(), table, d.len);
      const uint32_t entries = d.len / kDescSize;
      chain.indirect = true;
      uint32_t i = 0;
      for (uint32_t isteps = 1;; ++isteps) {
        if (isteps > entries) return fail(ChainErrc::TooLong, i);
        const Desc e = decode_desc(copy.data() + kDescSize * i);
        if (e.flags & kDescFIndirect) return fail(ChainErrc::IndirectNested, i);
        if (auto err = b.add(e)) return fail(*err, i);
        if (!(e.flags & kDescFNext)) break;
        if (e.next >= entries) return fail(ChainErrc::NextOutOfRange, i);
        i = e.next;
      }
      break;
    }

    if (auto err = b.add(d)) return fail(*err, idx);
    if (!(d.flags & kDescFNext)) break;
    if (d.next >= num_) return fail(ChainErrc::NextOutOfRange, idx);
    idx = d.next;
  }
  return chain;
}

size_t DeviceRing::push_used(uint16_t head, uint32_t len) {
  if (num_ == 0) return 0;
  const size_t off = kUsedRing + kUsedElemSize * static_cast<size_t>(used_idx_ % num_);
  store<uint32_t>(used_ + off, head);
  store<uint32_t>(used_ + off + 4, len);
  if (head < num_) in_flight_[head] = 0;
  ++used_idx_;
  // virtio 1.2 2.7.8: the element is visible before the index that covers it.
  store<uint16_t, __ATOMIC_RELEASE>(used_ + kUsedIdx, used_idx_);
  return off;
}

bool DeviceRing::should_notify(uint16_t old_used_idx) const {
  if (num_ == 0) return false;
  // Our used->idx store must be globally visible before we read the driver's
  // suppression fields (store-load ordering, as libvhost-user's smp_mb()).
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (!event_idx_) {
    return (load<uint16_t>(avail_ + kAvailFlags) & kAvailFNoInterrupt) == 0;
  }
  const uint16_t used_event = load<uint16_t>(avail_ + kAvailRing + 2 * size_t{num_});
  return vring_need_event(used_event, used_idx_, old_used_idx);
}

// ---------------------------------------------------------------- driver side

DriverRing::DriverRing(uint16_t num, uint8_t* desc, uint8_t* avail, uint8_t* used)
    : num_(num), desc_(desc), avail_(avail), used_(used) {
  if (desc_ == nullptr || avail_ == nullptr || used_ == nullptr) num_ = 0;
  if (num_ == 0) return;
  std::memset(desc_, 0, desc_table_bytes(num_));
  std::memset(avail_, 0, avail_ring_bytes(num_));
  std::memset(used_, 0, used_ring_bytes(num_));
  // Free list threaded through desc.next (as Linux's virtio_ring does).
  for (uint32_t i = 0; i + 1 < num_; ++i) {
    write_desc(desc_, i, Desc{0, 0, 0, static_cast<uint16_t>(i + 1)});
  }
  free_head_ = 0;
  free_count_ = num_;
  chain_len_.assign(num_, 0);
}

std::optional<uint16_t> DriverRing::add_chain(std::span<const Buffer> buffers) {
  if (num_ == 0 || buffers.empty() || buffers.size() > free_count_) return std::nullopt;
  const uint16_t head = free_head_;
  uint16_t cur = head;
  for (size_t i = 0; i < buffers.size(); ++i) {
    const bool last = i + 1 == buffers.size();
    // Our own descriptor; the device never writes the table (2.7.5).
    const uint16_t next_free = load<uint16_t>(desc_ + kDescSize * cur + 14);
    Desc d;
    d.addr = buffers[i].gpa;
    d.len = buffers[i].len;
    d.flags = static_cast<uint16_t>((buffers[i].device_writable ? kDescFWrite : 0) |
                                    (last ? 0 : kDescFNext));
    d.next = next_free;
    write_desc(desc_, cur, d);
    if (last) {
      free_head_ = next_free;
    } else {
      cur = next_free;
    }
  }
  free_count_ = static_cast<uint16_t>(free_count_ - buffers.size());
  chain_len_[head] = static_cast<uint16_t>(buffers.size());

  store<uint16_t>(avail_ + kAvailRing + 2 * static_cast<size_t>(avail_idx_ % num_), head);
  ++avail_idx_;
  // virtio 1.2 2.7.13.3: ring entry before the index (release).
  store<uint16_t, __ATOMIC_RELEASE>(avail_ + kAvailIdx, avail_idx_);
  return head;
}

std::optional<UsedElem> DriverRing::pop_used() {
  if (num_ == 0) return std::nullopt;
  const uint16_t used_idx = load<uint16_t, __ATOMIC_ACQUIRE>(used_ + kUsedIdx);
  // A device that moved used->idx more than num ahead is broken; consume
  // nothing rather than free chains on the strength of stale entries.
  if (static_cast<uint16_t>(used_idx - last_used_) > num_) return std::nullopt;
  while (last_used_ != used_idx) {
    const size_t off = kUsedRing + kUsedElemSize * static_cast<size_t>(last_used_ % num_);
    const uint32_t id = load<uint32_t>(used_ + off);
    const uint32_t len = load<uint32_t>(used_ + off + 4);
    ++last_used_;
    // Skip ids that are not heads we posted: a buggy device must not make
    // us free descriptors twice or free ones still in use.
    if (id >= num_ || chain_len_[id] == 0) continue;
    const uint16_t n = chain_len_[id];
    chain_len_[id] = 0;
    // Find the chain's tail by following our own next links, then splice
    // the whole chain onto the free list.
    uint16_t tail = static_cast<uint16_t>(id);
    bool ok = true;
    for (uint16_t i = 1; i < n; ++i) {
      const uint16_t nx = load<uint16_t>(desc_ + kDescSize * tail + 14);
      if (nx >= num_) {
        ok = false;  // only if something scribbled on our table: leak the chain
        break;
      }
      tail = nx;
    }
    if (ok) {
      const Desc t = read_desc(desc_, tail);
      write_desc(desc_, tail, Desc{t.addr, t.len, 0, free_head_});
      free_head_ = static_cast<uint16_t>(id);
      free_count_ = static_cast<uint16_t>(free_count_ + n);
    }
    return UsedElem{id, len};
  }
  return std::nullopt;
}

bool DriverRing::kick_suppressed() const {
  if (num_ == 0) return true;
  // Our avail->idx store before the device's flags load (store-load).
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  return (load<uint16_t>(used_ + kUsedFlags) & kUsedFNoNotify) != 0;
}

}  // namespace fph::proto::vq
