// vhost-user framing and payload parsers/encoders (qemu docs/interop/vhost-user.rst;
// shared/reference/virtio-balloon-vhost-user.md section 4).
//
// Every parser is total over untrusted bytes: it checks the exact payload size
// before reading, reads fields with memcpy (no alignment assumptions) and
// reports the failing field and the offending value.
#include "fph/proto/vhost_user.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cstring>

#include "fph/common/checked.h"

namespace fph::proto::vu {

// Fields are in native byte order (reference 4.1). We only build for
// little-endian hosts, where native == virtio's little-endian.
static_assert(std::endian::native == std::endian::little, "fph::proto assumes a little-endian host");

namespace {

template <class T>
T load(std::span<const uint8_t> b, size_t off) {
  T v;
  std::memcpy(&v, b.data() + off, sizeof(T));
  return v;
}

template <class T>
void store(std::vector<uint8_t>& out, T v) {
  const size_t off = out.size();
  out.resize(off + sizeof(T));
  std::memcpy(out.data() + off, &v, sizeof(T));
}

// Exact size check shared by the fixed-size payloads.
ParseResult<std::monostate> expect_size(std::span<const uint8_t> p, size_t want,
                                        std::string_view what) {
  if (p.size() < want) {
    return parse_error(ParseErrc::Truncated, std::string(what),
                       fmt::format("payload is {} bytes, need {}", p.size(), want));
  }
  if (p.size() != want) {
    return parse_error(ParseErrc::BadSize, std::string(what),
                       fmt::format("payload is {} bytes, expected exactly {}", p.size(), want));
  }
  return std::monostate{};
}

constexpr size_t kRegionSize = 32;
constexpr size_t kMemTableHeader = 8;
constexpr size_t kSingleRegionSize = 8 + kRegionSize;
constexpr size_t kConfigHeader = 12;

MemoryRegion load_region(std::span<const uint8_t> p, size_t off) {
  MemoryRegion r;
  r.guest_phys_addr = load<uint64_t>(p, off + 0);
  r.memory_size = load<uint64_t>(p, off + 8);
  r.userspace_addr = load<uint64_t>(p, off + 16);
  r.mmap_offset = load<uint64_t>(p, off + 24);
  return r;
}

void store_region(std::vector<uint8_t>& out, const MemoryRegion& r) {
  store<uint64_t>(out, r.guest_phys_addr);
  store<uint64_t>(out, r.memory_size);
  store<uint64_t>(out, r.userspace_addr);
  store<uint64_t>(out, r.mmap_offset);
}

// Half-open [a, a+alen) and [b, b+blen) intersect. Callers have checked that
// neither end overflows.
bool intersects(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
  return a < b + blen && b < a + alen;
}

constexpr std::array<std::string_view, kMaxRequest + 1> kRequestNames = {
    "",  // 0 is not a request
    "GET_FEATURES",
    "SET_FEATURES",
    "SET_OWNER",
    "RESET_OWNER",
    "SET_MEM_TABLE",
    "SET_LOG_BASE",
    "SET_LOG_FD",
    "SET_VRING_NUM",
    "SET_VRING_ADDR",
    "SET_VRING_BASE",
    "GET_VRING_BASE",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
    "SET_VRING_ERR",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "SET_VRING_ENABLE",
    "SEND_RARP",
    "NET_SET_MTU",
    "SET_BACKEND_REQ_FD",
    "IOTLB_MSG",
    "SET_VRING_ENDIAN",
    "GET_CONFIG",
    "SET_CONFIG",
    "CREATE_CRYPTO_SESSION",
    "CLOSE_CRYPTO_SESSION",
    "POSTCOPY_ADVISE",
    "POSTCOPY_LISTEN",
    "POSTCOPY_END",
    "GET_INFLIGHT_FD",
    "SET_INFLIGHT_FD",
    "GPU_SET_SOCKET",
    "RESET_DEVICE",
    "VRING_KICK",
    "GET_MAX_MEM_SLOTS",
    "ADD_MEM_REG",
    "REM_MEM_REG",
    "SET_STATUS",
    "GET_STATUS",
    "GET_SHARED_OBJECT",
    "SET_DEVICE_STATE_FD",
    "CHECK_DEVICE_STATE",
};

}  // namespace

std::string request_name(uint32_t request) {
  if (request >= 1 && request <= kMaxRequest) return std::string(kRequestNames[request]);
  return fmt::format("UNKNOWN({})", request);
}

std::string backend_request_name(uint32_t request) {
  switch (static_cast<BackendRequest>(request)) {
    case BackendRequest::IotlbMsg: return "IOTLB_MSG";
    case BackendRequest::ConfigChangeMsg: return "CONFIG_CHANGE_MSG";
    case BackendRequest::VringHostNotifierMsg: return "VRING_HOST_NOTIFIER_MSG";
    case BackendRequest::SharedObjectAdd: return "SHARED_OBJECT_ADD";
    case BackendRequest::SharedObjectRemove: return "SHARED_OBJECT_REMOVE";
    case BackendRequest::SharedObjectLookup: return "SHARED_OBJECT_LOOKUP";
  }
  return fmt::format("UNKNOWN({})", request);
}

// ---- header (reference 4.1) ----

ParseResult<Header> parse_header(std::span<const uint8_t> bytes) {
  if (bytes.size() < kHeaderSize) {
    return parse_error(ParseErrc::Truncated, "header",
                       fmt::format("{} bytes, need {}", bytes.size(), kHeaderSize));
  }
  if (bytes.size() != kHeaderSize) {
    return parse_error(ParseErrc::BadSize, "header",
                       fmt::format("{} bytes, expected exactly {}", bytes.size(), kHeaderSize));
  }
  Header h;
  h.request = load<uint32_t>(bytes, 0);
  h.flags = load<uint32_t>(bytes, 4);
  h.size = load<uint32_t>(bytes, 8);
  if ((h.flags & kVersionMask) != kVersion) {
    return parse_error(ParseErrc::BadVersion, "header.flags",
                       fmt::format("version {} (flags {:#x}), expected {}", h.flags & kVersionMask,
                                   h.flags, kVersion));
  }
  constexpr uint32_t kKnown = kVersionMask | kFlagReply | kFlagNeedReply;
  if (h.flags & ~kKnown) {
    return parse_error(ParseErrc::BadFlags, "header.flags",
                       fmt::format("reserved bits {:#x} set (flags {:#x})", h.flags & ~kKnown,
                                   h.flags));
  }
  if (h.size > kMaxPayload) {
    return parse_error(ParseErrc::BadSize, "header.size",
                       fmt::format("{} bytes exceeds the maximum payload {}", h.size, kMaxPayload));
  }
  return h;
}

std::array<uint8_t, kHeaderSize> encode_header(const Header& h) {
  std::array<uint8_t, kHeaderSize> out{};
  std::memcpy(out.data() + 0, &h.request, 4);
  std::memcpy(out.data() + 4, &h.flags, 4);
  std::memcpy(out.data() + 8, &h.size, 4);
  return out;
}

// ---- payloads (reference 4.2) ----

ParseResult<uint64_t> parse_u64(std::span<const uint8_t> payload, std::string_view what) {
  if (auto ok = expect_size(payload, 8, what); !ok) return unexpected(ok.error());
  return load<uint64_t>(payload, 0);
}

ParseResult<VringState> parse_vring_state(std::span<const uint8_t> payload) {
  if (auto ok = expect_size(payload, 8, "vring_state"); !ok) return unexpected(ok.error());
  return VringState{load<uint32_t>(payload, 0), load<uint32_t>(payload, 4)};
}

ParseResult<VringAddr> parse_vring_addr(std::span<const uint8_t> payload) {
  if (auto ok = expect_size(payload, 40, "vring_addr"); !ok) return unexpected(ok.error());
  VringAddr a;
  a.index = load<uint32_t>(payload, 0);
  a.flags = load<uint32_t>(payload, 4);
  a.desc_user_addr = load<uint64_t>(payload, 8);
  a.used_user_addr = load<uint64_t>(payload, 16);
  a.avail_user_addr = load<uint64_t>(payload, 24);
  a.log_guest_addr = load<uint64_t>(payload, 32);
  if (a.flags & ~kVringFlagLog) {
    return parse_error(ParseErrc::BadFlags, "vring_addr.flags",
                       fmt::format("reserved bits {:#x} set (flags {:#x})", a.flags & ~kVringFlagLog,
                                   a.flags));
  }
  // Split-ring part alignments (virtio 1.2 2.7: desc 16, avail 2, used 4),
  // as rust-vmm's VhostUserVringAddr::is_valid checks them.
  if (!is_aligned(a.desc_user_addr, 16)) {
    return parse_error(ParseErrc::BadValue, "vring_addr.desc_user_addr",
                       fmt::format("{:#x} is not 16-byte aligned", a.desc_user_addr));
  }
  if (!is_aligned(a.avail_user_addr, 2)) {
    return parse_error(ParseErrc::BadValue, "vring_addr.avail_user_addr",
                       fmt::format("{:#x} is not 2-byte aligned", a.avail_user_addr));
  }
  if (!is_aligned(a.used_user_addr, 4)) {
    return parse_error(ParseErrc::BadValue, "vring_addr.used_user_addr",
                       fmt::format("{:#x} is not 4-byte aligned", a.used_user_addr));
  }
  return a;
}

ParseResult<VringFdParam> parse_vring_fd(std::span<const uint8_t> payload) {
  if (auto ok = expect_size(payload, 8, "vring_fd"); !ok) return unexpected(ok.error());
  const uint64_t v = load<uint64_t>(payload, 0);
  constexpr uint64_t kKnown = 0xff | kVringNoFdMask;
  if (v & ~kKnown) {
    return parse_error(ParseErrc::BadFlags, "vring_fd",
                       fmt::format("reserved bits {:#x} set (value {:#x})", v & ~kKnown, v));
  }
  return VringFdParam{static_cast<uint32_t>(v & 0xff), (v & kVringNoFdMask) != 0};
}

ParseResult<MemoryRegion> check_region(const MemoryRegion& r, std::string_view field) {
  const std::string f(field);
  if (r.memory_size == 0) {
    return parse_error(ParseErrc::OutOfRange, f + ".memory_size", "is 0");
  }
  if (!checked_add(r.guest_phys_addr, r.memory_size)) {
    return parse_error(ParseErrc::Overflow, f + ".memory_size",
                       fmt::format("guest_phys_addr {:#x} + memory_size {:#x} overflows",
                                   r.guest_phys_addr, r.memory_size));
  }
  if (!checked_add(r.userspace_addr, r.memory_size)) {
    return parse_error(ParseErrc::Overflow, f + ".memory_size",
                       fmt::format("userspace_addr {:#x} + memory_size {:#x} overflows",
                                   r.userspace_addr, r.memory_size));
  }
  if (!checked_add(r.mmap_offset, r.memory_size)) {
    return parse_error(ParseErrc::Overflow, f + ".memory_size",
                       fmt::format("mmap_offset {:#x} + memory_size {:#x} overflows", r.mmap_offset,
                                   r.memory_size));
  }
  return r;
}

// SET_MEM_TABLE: u32 nregions, u32 padding, region[nregions], then optional
// spare room. nregions must be 1..8: QEMU never sends an empty table (with no
// memory the device cannot work, and an empty table is indistinguishable from
// a bug), and 8 is VHOST_MEMORY_BASELINE_NREGIONS. The padding word is ignored.
//
// Spare room: QEMU sends exactly 8 + 32 * nregions bytes, but Linux's
// virtio_uml sends its whole fixed-size table (room for two regions, 72
// bytes) with nregions = 1 (docs/protocol.md, "Front ends seen in practice").
// The payload may therefore be longer than the announced regions, as long as
// it is made of whole region slots and has no more than 8 of them; the
// unannounced slots are never read and carry no fds.
ParseResult<std::vector<MemoryRegion>> parse_mem_table(std::span<const uint8_t> payload) {
  if (payload.size() < kMemTableHeader) {
    return parse_error(ParseErrc::Truncated, "mem_table",
                       fmt::format("payload is {} bytes, need at least {}", payload.size(),
                                   kMemTableHeader));
  }
  const uint32_t n = load<uint32_t>(payload, 0);
  if (n == 0 || n > kMaxMemTableRegions) {
    return parse_error(ParseErrc::OutOfRange, "mem_table.nregions",
                       fmt::format("{} regions, allowed 1..{}", n, kMaxMemTableRegions));
  }
  const size_t want = kMemTableHeader + kRegionSize * n;
  if (payload.size() < want) {
    return parse_error(ParseErrc::Truncated, "mem_table",
                       fmt::format("payload is {} bytes, {} regions need at least {}",
                                   payload.size(), n, want));
  }
  constexpr size_t kLargest = kMemTableHeader + kRegionSize * kMaxMemTableRegions;
  if (payload.size() > kLargest || (payload.size() - kMemTableHeader) % kRegionSize != 0) {
    return parse_error(ParseErrc::BadSize, "mem_table",
                       fmt::format("payload is {} bytes: not a header plus whole region slots "
                                   "({} + {} * k, k <= {})",
                                   payload.size(), kMemTableHeader, kRegionSize,
                                   kMaxMemTableRegions));
  }
  std::vector<MemoryRegion> regions;
  regions.reserve(n);
  for (uint32_t i = 0; i < n; ++i) {
    auto r = check_region(load_region(payload, kMemTableHeader + kRegionSize * i),
                          fmt::format("regions[{}]", i));
    if (!r) return unexpected(r.error());
    regions.push_back(*r);
  }
  for (uint32_t i = 0; i < n; ++i) {
    for (uint32_t j = 0; j < i; ++j) {
      const MemoryRegion& a = regions[i];
      const MemoryRegion& b = regions[j];
      if (intersects(a.guest_phys_addr, a.memory_size, b.guest_phys_addr, b.memory_size)) {
        return parse_error(
            ParseErrc::Overlap, fmt::format("regions[{}].guest_phys_addr", i),
            fmt::format("[{:#x}, {:#x}) overlaps regions[{}] [{:#x}, {:#x})", a.guest_phys_addr,
                        a.guest_phys_addr + a.memory_size, j, b.guest_phys_addr,
                        b.guest_phys_addr + b.memory_size));
      }
      if (intersects(a.userspace_addr, a.memory_size, b.userspace_addr, b.memory_size)) {
        return parse_error(
            ParseErrc::Overlap, fmt::format("regions[{}].userspace_addr", i),
            fmt::format("[{:#x}, {:#x}) overlaps regions[{}] [{:#x}, {:#x})", a.userspace_addr,
                        a.userspace_addr + a.memory_size, j, b.userspace_addr,
                        b.userspace_addr + b.memory_size));
      }
    }
  }
  return regions;
}

// ADD_MEM_REG / REM_MEM_REG: u64 padding, region. (The XEN_MMAP variant with
// 8 more bytes is not supported: we never offer XEN_MMAP.)
ParseResult<MemoryRegion> parse_single_region(std::span<const uint8_t> payload) {
  if (auto ok = expect_size(payload, kSingleRegionSize, "region"); !ok) {
    return unexpected(ok.error());
  }
  return check_region(load_region(payload, 8), "region");
}

ParseResult<LogParams> parse_log(std::span<const uint8_t> payload) {
  if (auto ok = expect_size(payload, 16, "log"); !ok) return unexpected(ok.error());
  LogParams l{load<uint64_t>(payload, 0), load<uint64_t>(payload, 8)};
  if (l.mmap_size == 0) return parse_error(ParseErrc::OutOfRange, "log.mmap_size", "is 0");
  if (!checked_add(l.mmap_offset, l.mmap_size)) {
    return parse_error(ParseErrc::Overflow, "log.mmap_size",
                       fmt::format("mmap_offset {:#x} + mmap_size {:#x} overflows", l.mmap_offset,
                                   l.mmap_size));
  }
  return l;
}

// GET/SET_CONFIG: u32 offset, u32 size, u32 flags, u8 data[size]. The size
// must account for the whole rest of the payload, must not be 0 (a zero-size
// access is meaningless; vu-doc uses an empty reply to signal an error), and
// [offset, offset+size) must lie inside the 256-byte config space.
ParseResult<ConfigPayload> parse_config(std::span<const uint8_t> payload) {
  if (payload.size() < kConfigHeader) {
    return parse_error(ParseErrc::Truncated, "config",
                       fmt::format("payload is {} bytes, need at least {}", payload.size(),
                                   kConfigHeader));
  }
  ConfigPayload c;
  c.offset = load<uint32_t>(payload, 0);
  c.size = load<uint32_t>(payload, 4);
  c.flags = load<uint32_t>(payload, 8);
  if (c.size != payload.size() - kConfigHeader) {
    return parse_error(ParseErrc::BadSize, "config.size",
                       fmt::format("{} but the payload carries {} data bytes", c.size,
                                   payload.size() - kConfigHeader));
  }
  if (c.size == 0) return parse_error(ParseErrc::OutOfRange, "config.size", "is 0");
  const auto end = checked_add(c.offset, c.size);
  if (!end || *end > kMaxConfigSize) {
    return parse_error(ParseErrc::OutOfRange, "config.offset",
                       fmt::format("offset {} + size {} exceeds the {}-byte config space", c.offset,
                                   c.size, kMaxConfigSize));
  }
  if (c.flags > 1) {
    return parse_error(ParseErrc::BadFlags, "config.flags",
                       fmt::format("{:#x}, expected 0 (front end) or 1 (migration)", c.flags));
  }
  c.data.assign(payload.begin() + kConfigHeader, payload.end());
  return c;
}

ParseResult<DeviceStateParams> parse_device_state(std::span<const uint8_t> payload) {
  if (auto ok = expect_size(payload, 8, "device_state"); !ok) return unexpected(ok.error());
  DeviceStateParams p{load<uint32_t>(payload, 0), load<uint32_t>(payload, 4)};
  if (p.direction > 1) {
    return parse_error(ParseErrc::OutOfRange, "device_state.direction",
                       fmt::format("{}, expected 0 (SAVE) or 1 (LOAD)", p.direction));
  }
  if (p.phase != 0) {
    return parse_error(ParseErrc::OutOfRange, "device_state.phase",
                       fmt::format("{}, expected 0 (STOPPED)", p.phase));
  }
  return p;
}

// ---- file descriptor counts ----

ParseResult<FdCountRange> expected_fds_range(uint32_t request, std::span<const uint8_t> payload) {
  auto exactly = [](size_t n) { return FdCountRange{n, n}; };
  switch (static_cast<Request>(request)) {
    case Request::SetMemTable: {
      auto t = parse_mem_table(payload);
      if (!t) return unexpected(t.error());
      return exactly(t->size());  // one fd per region
    }
    case Request::AddMemReg:
      return exactly(1);
    case Request::RemMemReg:
      return FdCountRange{0, 1};
    case Request::SetVringKick:
    case Request::SetVringCall:
    case Request::SetVringErr: {
      auto p = parse_vring_fd(payload);
      if (!p) return unexpected(p.error());
      return exactly(p->no_fd ? 0 : 1);
    }
    case Request::SetLogBase:
    case Request::SetLogFd:
    case Request::SetBackendReqFd:
    case Request::SetInflightFd:
    case Request::GpuSetSocket:
    case Request::SetDeviceStateFd:
      return exactly(1);
    default:
      return exactly(0);
  }
}

ParseResult<size_t> expected_fds(uint32_t request, std::span<const uint8_t> payload) {
  auto r = expected_fds_range(request, payload);
  if (!r) return unexpected(r.error());
  return r->min;
}

ParseResult<size_t> check_fds(uint32_t request, std::span<const uint8_t> payload,
                              size_t received) {
  auto r = expected_fds_range(request, payload);
  if (!r) return unexpected(r.error());
  if (!r->allows(received)) {
    const std::string want =
        r->min == r->max ? fmt::format("{}", r->min) : fmt::format("{}..{}", r->min, r->max);
    return parse_error(ParseErrc::BadFdCount, request_name(request) + ".fds",
                       fmt::format("received {} file descriptors, expected {}", received, want));
  }
  return received;
}

// ---- replies ----

bool always_replies(uint32_t request) {
  switch (static_cast<Request>(request)) {
    case Request::GetFeatures:
    case Request::GetProtocolFeatures:
    case Request::GetVringBase:
    case Request::SetLogBase:
    case Request::GetInflightFd:
    case Request::GetConfig:
    case Request::GetQueueNum:
    case Request::GetMaxMemSlots:
    case Request::GetStatus:
    case Request::SetDeviceStateFd:
    case Request::CheckDeviceState:
    case Request::PostcopyAdvise:
    case Request::PostcopyEnd:
    case Request::CreateCryptoSession:
    case Request::GetSharedObject:
      return true;
    default:
      return false;
  }
}

std::optional<std::vector<uint8_t>> error_reply(uint32_t request) {
  switch (static_cast<Request>(request)) {
    case Request::GetConfig:
      // vu-doc: "zero length of payload" signals the error. A 12-byte
      // header with size 0 rather than no payload at all: QEMU rejects both
      // (the reply size must be 12 + the size asked for), and Linux's
      // virtio_uml, which reuses its request buffer, would take a bare
      // header as success with its own offset and size still in the buffer.
      return encode_config(ConfigPayload{});
    case Request::SetLogBase:
    case Request::CheckDeviceState:
      return encode_u64(1);
    case Request::SetDeviceStateFd:
      return encode_u64(0x101);  // bits 0-7: error, bit 8: no fd returned
    default:
      return std::nullopt;
  }
}

// ---- encoders ----

std::vector<uint8_t> encode_u64(uint64_t v) {
  std::vector<uint8_t> out;
  store<uint64_t>(out, v);
  return out;
}

std::vector<uint8_t> encode_vring_state(const VringState& s) {
  std::vector<uint8_t> out;
  store<uint32_t>(out, s.index);
  store<uint32_t>(out, s.num);
  return out;
}

std::vector<uint8_t> encode_vring_addr(const VringAddr& a) {
  std::vector<uint8_t> out;
  store<uint32_t>(out, a.index);
  store<uint32_t>(out, a.flags);
  store<uint64_t>(out, a.desc_user_addr);
  store<uint64_t>(out, a.used_user_addr);
  store<uint64_t>(out, a.avail_user_addr);
  store<uint64_t>(out, a.log_guest_addr);
  return out;
}

std::vector<uint8_t> encode_mem_table(std::span<const MemoryRegion> regions) {
  std::vector<uint8_t> out;
  out.reserve(kMemTableHeader + kRegionSize * regions.size());
  store<uint32_t>(out, static_cast<uint32_t>(regions.size()));
  store<uint32_t>(out, 0);
  for (const auto& r : regions) store_region(out, r);
  return out;
}

std::vector<uint8_t> encode_single_region(const MemoryRegion& r) {
  std::vector<uint8_t> out;
  store<uint64_t>(out, 0);
  store_region(out, r);
  return out;
}

std::vector<uint8_t> encode_log(const LogParams& l) {
  std::vector<uint8_t> out;
  store<uint64_t>(out, l.mmap_size);
  store<uint64_t>(out, l.mmap_offset);
  return out;
}

// Writes c.size data bytes: c.data zero-padded or cut to c.size, so a
// GET_CONFIG request can be built from {offset, size, flags} alone.
std::vector<uint8_t> encode_config(const ConfigPayload& c) {
  std::vector<uint8_t> out;
  out.reserve(kConfigHeader + c.size);
  store<uint32_t>(out, c.offset);
  store<uint32_t>(out, c.size);
  store<uint32_t>(out, c.flags);
  const size_t n = std::min<size_t>(c.size, c.data.size());
  out.insert(out.end(), c.data.begin(), c.data.begin() + static_cast<ptrdiff_t>(n));
  out.resize(kConfigHeader + size_t{c.size}, 0);
  return out;
}

std::vector<uint8_t> encode_device_state(const DeviceStateParams& p) {
  std::vector<uint8_t> out;
  store<uint32_t>(out, p.direction);
  store<uint32_t>(out, p.phase);
  return out;
}

}  // namespace fph::proto::vu
