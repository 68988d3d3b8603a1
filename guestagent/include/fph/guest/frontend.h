// The vhost-user front end of fph-guest: the part QEMU's hw/virtio/vhost-user.c
// plays for a real VM. It owns the control socket and speaks the setup and
// stop sequences of reference section 4.5; it knows nothing of page reporting.
//
// Every request that has no reply payload is sent with NEED_REPLY once
// REPLY_ACK is negotiated, and the u64 ack is checked (reference 4.1): a
// non-zero ack is a Nack error naming the request.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"
#include "fph/guest/guest_memory.h"
#include "fph/proto/balloon.h"
#include "fph/proto/channel.h"
#include "fph/proto/vhost_user.h"

namespace fph::guest {

enum class FrontendErrc : uint8_t {
  Closed,       // the back end closed the socket
  Io,           // socket error
  Timeout,      // connect/accept gave up
  Cancelled,    // stop requested while waiting
  Protocol,     // the back end sent something we cannot accept
  Nack,         // REPLY_ACK with a non-zero status
  Unsupported,  // the back end lacks something we need (VERSION_1, CONFIG for poison)
  Setup,        // a local resource (socket, eventfd) could not be created
};
std::string_view to_string(FrontendErrc c);

struct FrontendError {
  FrontendErrc code = FrontendErrc::Io;
  std::string message;
  // True when the peer is gone (reconnect material), as opposed to a refusal.
  bool connection_lost() const { return code == FrontendErrc::Closed || code == FrontendErrc::Io; }
};
template <class T>
using FeResult = Expected<T, FrontendError>;

// Connects to a listening vhost-user socket, retrying while it does not exist
// or refuses (the daemon may be starting) until `timeout` or `*cancel`.
FeResult<UniqueFd> connect_unix(const std::string& path, std::chrono::milliseconds timeout,
                                const std::atomic<bool>* cancel = nullptr);

// Server mode: fphd attaches to our socket (its "attach" command).
class UnixListener {
 public:
  static FeResult<UnixListener> listen(const std::string& path);
  UnixListener() = default;
  UnixListener(UnixListener&&) noexcept = default;
  UnixListener& operator=(UnixListener&&) noexcept = default;
  ~UnixListener();
  // Waits for one connection; timeout <= 0 waits until `*cancel`.
  FeResult<UniqueFd> accept(std::chrono::milliseconds timeout,
                            const std::atomic<bool>* cancel = nullptr);
  const std::string& path() const { return path_; }

 private:
  UniqueFd fd_;
  std::string path_;
};

struct FrontendOptions {
  bool reporting = true;                // ask for VIRTIO_BALLOON_F_REPORTING
  std::optional<uint32_t> poison;       // ask for PAGE_POISON and write poison_val
  bool force_mem_table = false;         // SET_MEM_TABLE even with CONFIGURE_MEM_SLOTS
  bool stats = false;                   // ask for VIRTIO_BALLOON_F_STATS_VQ (the driver sets it
                                        // when guest memory has a stats ring slot)
  bool epoch = true;                    // ack fph's kFFphEpoch (migration epoch at config 16)
  bool deflate_on_oom = true;           // ack VIRTIO_BALLOON_F_DEFLATE_ON_OOM when offered
};

// What the two sides agreed on.
struct Negotiated {
  uint64_t device_features = 0;
  uint64_t features = 0;
  uint64_t device_protocol = 0;
  uint64_t protocol = 0;
  proto::balloon::QueueLayout layout;
  proto::balloon::Config config;  // as read with GET_CONFIG (zero without CONFIG)
  bool used_mem_table = false;    // SET_MEM_TABLE rather than ADD_MEM_REG
  // A live migration can use this back end: VHOST_F_LOG_ALL offered and the
  // shared-memory log and device state transfer negotiated.
  bool migratable() const {
    return (device_features & proto::vu::feature::kLogAll) &&
           has_protocol(proto::vu::protocol::kLogShmfd) &&
           has_protocol(proto::vu::protocol::kDeviceState);
  }
  // The migration epoch as read at setup; nullopt if fph_epoch() is not
  // negotiated or the back end did not answer the read with 4 bytes.
  std::optional<uint32_t> epoch;
  bool reporting() const { return features & proto::balloon::kFReporting; }
  // The epoch bit is acked and it can be read (GET_CONFIG needs CONFIG).
  bool fph_epoch() const {
    return (features & proto::balloon::kFFphEpoch) && has_protocol(proto::vu::protocol::kConfig);
  }
  bool poison() const { return features & proto::balloon::kFPagePoison; }
  bool stats() const { return features & proto::balloon::kFStatsVq; }
  bool deflate_on_oom() const { return features & proto::balloon::kFDeflateOnOom; }
  bool has_protocol(int bit) const { return protocol & proto::vu::protocol::bit(bit); }
};

// The features we ask for given what the device offers (pure; for tests).
// Mirrors Linux virtballoon_validate: with poisoning wanted but PAGE_POISON
// not offered, REPORTING is dropped too (reference 1.1, 1.5).
uint64_t choose_features(uint64_t offered, const FrontendOptions& o);
uint64_t choose_protocol_features(uint64_t offered);

// How long we wait for any reply: a back end that accepts and then hangs
// must not hang the guest agent (SO_RCVTIMEO on the control socket; the
// driver loop only reads when poll() says the socket is readable).
inline constexpr std::chrono::seconds kReplyTimeout{30};

class Frontend {
 public:
  explicit Frontend(UniqueFd sock, std::chrono::milliseconds reply_timeout = kReplyTimeout);
  int fd() const { return sock_.get(); }
  const Negotiated& negotiated() const { return neg_; }

  // GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, the memory
  // regions, GET_CONFIG, SET_CONFIG(poison_val), SET_STATUS(ACK|DRIVER|
  // FEATURES_OK). The queues come next (setup_queue), then driver_ok().
  FeResult<Negotiated> negotiate(const GuestMemory& mem, const FrontendOptions& o);
  // SET_VRING_NUM, SET_VRING_BASE `base`, SET_VRING_ADDR, SET_VRING_KICK,
  // SET_VRING_CALL, SET_VRING_ENABLE 1 for queue `index` living in `ring`.
  // `base` is 0 for a fresh ring; a migration destination starts at the
  // index the source's GET_VRING_BASE returned.
  FeResult<void> setup_queue(uint32_t index, const RingArea& ring, const GuestMemory& mem,
                             int kick_fd, int call_fd, uint16_t base = 0);
  // Dirty logging for a live migration (QEMU's vhost_dev_set_log): SET_FEATURES
  // with (or without) VHOST_F_LOG_ALL, then SET_VRING_ADDR again for every
  // ring in `rings` with (or without) the log flag and log_guest_addr = its
  // used ring. Needs LOG_ALL offered.
  FeResult<void> set_logging(bool on, std::span<const RingArea> rings, const GuestMemory& mem);
  // SET_LOG_BASE with a shared-memory log (LOG_SHMFD): the back end maps
  // `size` bytes of `fd` at `offset` and answers 0 when it did.
  FeResult<void> set_log_base(int fd, uint64_t size, uint64_t offset = 0);
  // SET_DEVICE_STATE_FD(direction, STOPPED) with `fd`; true when the back end
  // will use it (reply 0x100: the front end keeps only its own end), false
  // when it answered with an fd of its own or refused (0x101 and others are
  // errors). CHECK_DEVICE_STATE: 0 = the transfer succeeded.
  FeResult<void> set_device_state_fd(bool load, int fd);
  FeResult<uint64_t> check_device_state();
  FeResult<void> driver_ok();
  // Stop sequence for one queue (reference 4.5, QEMU's order):
  // SET_VRING_ENABLE 0, then GET_VRING_BASE; returns the back end's next
  // avail index.
  FeResult<uint32_t> stop_queue(uint32_t index);
  // SET_STATUS(0) if STATUS was negotiated (QEMU does it on stop).
  FeResult<void> reset_status();
  // GET_CONFIG(kOffFphEpoch, 4): the migration epoch (little-endian u32).
  // nullopt if the epoch is not negotiated, or if the back end answered
  // with anything but those 4 bytes (an fphd that does not serve offset 16
  // yet replies with an empty payload): "no epoch", the connection is fine.
  // An error only if the request itself failed (peer gone, reply timeout,
  // a message that is not our reply). Synchronous: the caller must be the
  // only user of the socket, with nothing else outstanding.
  FeResult<std::optional<uint32_t>> read_epoch();
  // GET_CONFIG(0, 8): {num_pages, actual}; needs CONFIG. Same rules as
  // read_epoch() (synchronous, sole user of the socket); a reply that does
  // not cover the 8 bytes is a Protocol error.
  FeResult<std::pair<uint32_t, uint32_t>> read_balloon_size();
  // SET_CONFIG(actual): config offset 4, le32.
  FeResult<void> write_actual(uint32_t actual);

  // Sends a request without a reply payload; waits for the ack when
  // REPLY_ACK is negotiated.
  FeResult<void> send(proto::vu::Request r, std::span<const uint8_t> payload,
                      std::span<const int> fds = {});
  // Sends a request that always has a reply and returns the reply payload
  // after checking REPLY flag and request id.
  FeResult<std::vector<uint8_t>> call(proto::vu::Request r, std::span<const uint8_t> payload,
                                      std::span<const int> fds = {});

 private:
  FeResult<proto::vu::VringAddr> vring_addr(uint32_t index, const RingArea& ring,
                                            const GuestMemory& mem) const;
  FeResult<proto::vu::Message> read_reply(proto::vu::Request r);
  FeResult<uint64_t> call_u64(proto::vu::Request r);
  FeResult<void> set_status(uint8_t status);

  UniqueFd sock_;
  Negotiated neg_;
  bool reply_ack_ = false;
  uint8_t status_ = 0;
};

}  // namespace fph::guest
