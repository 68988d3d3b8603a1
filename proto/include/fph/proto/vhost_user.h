// vhost-user framing and payloads (qemu docs/interop/vhost-user.rst; numbers in
// shared/reference/virtio-balloon-vhost-user.md section 4). Pure functions over
// untrusted bytes: every parser is total and returns an error value.
// All fields are in native (x86: little-endian) byte order.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "fph/proto/error.h"

namespace fph::proto::vu {

inline constexpr size_t kHeaderSize = 12;
inline constexpr uint32_t kVersion = 0x1;
inline constexpr uint32_t kVersionMask = 0x3;
inline constexpr uint32_t kFlagReply = 0x4;
inline constexpr uint32_t kFlagNeedReply = 0x8;
// Largest payload we accept. The largest message a balloon back end needs is
// SET_MEM_TABLE (8 + 32*8 = 264) or GET/SET_CONFIG (12 + 256).
inline constexpr uint32_t kMaxPayload = 4096;
inline constexpr size_t kMaxFds = 8;          // VHOST_MEMORY_BASELINE_NREGIONS
inline constexpr uint32_t kMaxMemTableRegions = 8;
inline constexpr uint64_t kMaxMemSlots = 509;  // what we answer to GET_MAX_MEM_SLOTS (libvu)
inline constexpr uint32_t kMaxConfigSize = 256;
inline constexpr uint32_t kMaxVringNum = 32768;

// Front end -> back end requests.
enum class Request : uint32_t {
  None = 0,
  GetFeatures = 1,
  SetFeatures = 2,
  SetOwner = 3,
  ResetOwner = 4,
  SetMemTable = 5,
  SetLogBase = 6,
  SetLogFd = 7,
  SetVringNum = 8,
  SetVringAddr = 9,
  SetVringBase = 10,
  GetVringBase = 11,
  SetVringKick = 12,
  SetVringCall = 13,
  SetVringErr = 14,
  GetProtocolFeatures = 15,
  SetProtocolFeatures = 16,
  GetQueueNum = 17,
  SetVringEnable = 18,
  SendRarp = 19,
  NetSetMtu = 20,
  SetBackendReqFd = 21,
  IotlbMsg = 22,
  SetVringEndian = 23,
  GetConfig = 24,
  SetConfig = 25,
  CreateCryptoSession = 26,
  CloseCryptoSession = 27,
  PostcopyAdvise = 28,
  PostcopyListen = 29,
  PostcopyEnd = 30,
  GetInflightFd = 31,
  SetInflightFd = 32,
  GpuSetSocket = 33,
  ResetDevice = 34,
  VringKick = 35,
  GetMaxMemSlots = 36,
  AddMemReg = 37,
  RemMemReg = 38,
  SetStatus = 39,
  GetStatus = 40,
  GetSharedObject = 41,
  SetDeviceStateFd = 42,
  CheckDeviceState = 43,
};
inline constexpr uint32_t kMaxRequest = 43;

// "SET_MEM_TABLE", or "UNKNOWN(99)" style text for ids we do not know.
std::string request_name(uint32_t request);

// Back end -> front end requests, sent on the back-end channel the front end
// hands over with SET_BACKEND_REQ_FD (protocol feature BACKEND_REQ).
enum class BackendRequest : uint32_t {
  IotlbMsg = 1,
  ConfigChangeMsg = 2,
  VringHostNotifierMsg = 3,
  SharedObjectAdd = 6,
  SharedObjectRemove = 7,
  SharedObjectLookup = 8,
};
std::string backend_request_name(uint32_t request);

// Virtio/vhost feature bits carried in GET/SET_FEATURES.
namespace feature {
inline constexpr uint64_t kLogAll = 1ull << 26;            // VHOST_F_LOG_ALL
inline constexpr uint64_t kProtocolFeatures = 1ull << 30;  // VHOST_USER_F_PROTOCOL_FEATURES
}  // namespace feature

// Protocol feature bits (GET/SET_PROTOCOL_FEATURES), by bit number.
namespace protocol {
inline constexpr int kMq = 0;
inline constexpr int kLogShmfd = 1;
inline constexpr int kRarp = 2;
inline constexpr int kReplyAck = 3;
inline constexpr int kMtu = 4;
inline constexpr int kBackendReq = 5;
inline constexpr int kCrossEndian = 6;
inline constexpr int kCryptoSession = 7;
inline constexpr int kPagefault = 8;
inline constexpr int kConfig = 9;
inline constexpr int kBackendSendFd = 10;
inline constexpr int kHostNotifier = 11;
inline constexpr int kInflightShmfd = 12;
inline constexpr int kResetDevice = 13;
inline constexpr int kInbandNotifications = 14;
inline constexpr int kConfigureMemSlots = 15;
inline constexpr int kStatus = 16;
inline constexpr int kXenMmap = 17;
inline constexpr int kSharedObject = 18;
inline constexpr int kDeviceState = 19;
constexpr uint64_t bit(int b) { return 1ull << b; }
}  // namespace protocol

struct Header {
  uint32_t request = 0;
  uint32_t flags = 0;
  uint32_t size = 0;
  bool need_reply() const { return flags & kFlagNeedReply; }
  bool is_reply() const { return flags & kFlagReply; }
};

// Validates version (must be 1), reserved flag bits (must be 0) and size
// (<= kMaxPayload). Does not reject unknown request ids: the session decides.
ParseResult<Header> parse_header(std::span<const uint8_t> bytes);
std::array<uint8_t, kHeaderSize> encode_header(const Header& h);

struct VringState {
  uint32_t index = 0;
  uint32_t num = 0;
};
struct VringAddr {
  uint32_t index = 0;
  uint32_t flags = 0;  // bit 0: VHOST_VRING_F_LOG
  uint64_t desc_user_addr = 0;
  uint64_t used_user_addr = 0;
  uint64_t avail_user_addr = 0;
  uint64_t log_guest_addr = 0;
};
inline constexpr uint32_t kVringFlagLog = 0x1;

struct MemoryRegion {
  uint64_t guest_phys_addr = 0;
  uint64_t memory_size = 0;
  uint64_t userspace_addr = 0;
  uint64_t mmap_offset = 0;
};
struct LogParams {
  uint64_t mmap_size = 0;
  uint64_t mmap_offset = 0;
};
struct ConfigPayload {
  uint32_t offset = 0;
  uint32_t size = 0;
  uint32_t flags = 0;  // 0 = front-end write, 1 = migration
  std::vector<uint8_t> data;
};
struct DeviceStateParams {
  uint32_t direction = 0;  // 0 SAVE, 1 LOAD
  uint32_t phase = 0;      // 0 STOPPED
};
// KICK / CALL / ERR payload: u64, bits 0-7 = vring index, bit 8 = no fd (poll).
struct VringFdParam {
  uint32_t index = 0;
  bool no_fd = false;
};
inline constexpr uint64_t kVringNoFdMask = 0x100;

// Each parser checks the payload size exactly and every field it can check
// without session state. Region parsers check memory_size > 0 and that
// guest_phys_addr + size, userspace_addr + size and mmap_offset + size do not
// overflow; parse_mem_table also checks nregions <= 8 and no two regions
// overlap in guest physical or user address space.
ParseResult<uint64_t> parse_u64(std::span<const uint8_t> payload, std::string_view what);
ParseResult<VringState> parse_vring_state(std::span<const uint8_t> payload);
ParseResult<VringAddr> parse_vring_addr(std::span<const uint8_t> payload);
ParseResult<VringFdParam> parse_vring_fd(std::span<const uint8_t> payload);
ParseResult<std::vector<MemoryRegion>> parse_mem_table(std::span<const uint8_t> payload);
ParseResult<MemoryRegion> parse_single_region(std::span<const uint8_t> payload);  // ADD/REM_MEM_REG
ParseResult<MemoryRegion> check_region(const MemoryRegion& r, std::string_view field);
ParseResult<LogParams> parse_log(std::span<const uint8_t> payload);
ParseResult<ConfigPayload> parse_config(std::span<const uint8_t> payload);  // offset+size <= 256, size == len-12
ParseResult<DeviceStateParams> parse_device_state(std::span<const uint8_t> payload);

// The number of file descriptors a request must carry (given its parsed
// payload where that matters). Returns an error naming the request when the
// count is wrong.
//
// The count is exact for every request except REM_MEM_REG, where the fd is
// optional (older QEMU sent the region's fd, newer QEMU sends none; libvu
// accepts either and closes it): expected_fds returns 0 for it, and callers
// should compare with check_fds, which accepts 0 or 1.
ParseResult<size_t> expected_fds(uint32_t request, std::span<const uint8_t> payload);

// Accepted descriptor counts [min, max] for a request (min == max except for
// REM_MEM_REG: [0, 1]).
struct FdCountRange {
  size_t min = 0;
  size_t max = 0;
  bool allows(size_t n) const { return n >= min && n <= max; }
};
ParseResult<FdCountRange> expected_fds_range(uint32_t request, std::span<const uint8_t> payload);
// expected_fds_range plus the comparison: returns `received` if allowed, else
// a BadFdCount error whose field is the request name ("SET_MEM_TABLE.fds").
ParseResult<size_t> check_fds(uint32_t request, std::span<const uint8_t> payload,
                              size_t received);

// Requests the back end always answers with a reply of their own, whatever
// NEED_REPLY says (vu-doc; reference 4.1): GET_FEATURES,
// GET_PROTOCOL_FEATURES, GET_VRING_BASE, SET_LOG_BASE, GET_INFLIGHT_FD,
// GET_CONFIG, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, GET_STATUS,
// SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE, POSTCOPY_ADVISE, POSTCOPY_END,
// CREATE_CRYPTO_SESSION, GET_SHARED_OBJECT. The front end waits for that
// reply, so a refusal must answer it (or close the connection).
bool always_replies(uint32_t request);
// For a request that always replies: the reply payload that says "failed"
// (GET_CONFIG: offset 0, size 0, no data; SET_LOG_BASE and
// CHECK_DEVICE_STATE: u64 1; SET_DEVICE_STATE_FD: u64 0x101, error and no
// fd), or nullopt if its reply has no error form (GET_FEATURES,
// GET_VRING_BASE, ...: any value would be taken as an answer). nullopt for
// requests that do not always reply, too.
std::optional<std::vector<uint8_t>> error_reply(uint32_t request);

// Encoders (used by the front end and by replies).
std::vector<uint8_t> encode_u64(uint64_t v);
std::vector<uint8_t> encode_vring_state(const VringState& s);
std::vector<uint8_t> encode_vring_addr(const VringAddr& a);
std::vector<uint8_t> encode_mem_table(std::span<const MemoryRegion> regions);
std::vector<uint8_t> encode_single_region(const MemoryRegion& r);
std::vector<uint8_t> encode_log(const LogParams& l);
std::vector<uint8_t> encode_config(const ConfigPayload& c);
std::vector<uint8_t> encode_device_state(const DeviceStateParams& p);

}  // namespace fph::proto::vu
