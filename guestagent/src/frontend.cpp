#include "fph/guest/frontend.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "fph/common/log.h"

namespace fph::guest {

namespace vu = proto::vu;
namespace bal = proto::balloon;
using Clock = std::chrono::steady_clock;

namespace {

Unexpected<FrontendError> fe_error(FrontendErrc c, std::string msg) {
  return Unexpected<FrontendError>{FrontendError{c, std::move(msg)}};
}

FrontendError from_channel(const vu::ChannelError& e, std::string_view during) {
  FrontendErrc c = FrontendErrc::Protocol;
  if (e.code == vu::ChannelErrc::Closed) c = FrontendErrc::Closed;
  else if (e.code == vu::ChannelErrc::Io) c = FrontendErrc::Io;
  return FrontendError{c, fmt::format("{}: {}", during, e.message())};
}

FeResult<sockaddr_un> make_addr(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(a.sun_path))
    return fe_error(FrontendErrc::Setup, fmt::format("socket path '{}' is empty or too long", path));
  std::memcpy(a.sun_path, path.data(), path.size());
  return a;
}

std::string rname(vu::Request r) { return vu::request_name(static_cast<uint32_t>(r)); }

}  // namespace

std::string_view to_string(FrontendErrc c) {
  switch (c) {
    case FrontendErrc::Closed: return "closed";
    case FrontendErrc::Io: return "io";
    case FrontendErrc::Timeout: return "timeout";
    case FrontendErrc::Cancelled: return "cancelled";
    case FrontendErrc::Protocol: return "protocol";
    case FrontendErrc::Nack: return "nack";
    case FrontendErrc::Unsupported: return "unsupported";
    case FrontendErrc::Setup: return "setup";
  }
  return "?";
}

FeResult<UniqueFd> connect_unix(const std::string& path, std::chrono::milliseconds timeout,
                                const std::atomic<bool>* cancel) {
  auto addr = make_addr(path);
  if (!addr) return Unexpected<FrontendError>{addr.error()};
  const auto deadline = Clock::now() + timeout;
  bool said_waiting = false;
  for (;;) {
    UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!s) return fe_error(FrontendErrc::Setup, fmt::format("socket: {}", std::strerror(errno)));
    if (::connect(s.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(sockaddr_un)) == 0)
      return s;
    const int err = errno;
    // ENOENT: the daemon has not created its socket yet; ECONNREFUSED: a
    // stale socket file or a daemon restarting; EAGAIN: backlog full.
    if (err != ENOENT && err != ECONNREFUSED && err != EAGAIN && err != EINTR)
      return fe_error(FrontendErrc::Io, fmt::format("connect({}): {}", path, std::strerror(err)));
    if (Clock::now() >= deadline)
      return fe_error(FrontendErrc::Timeout,
                      fmt::format("connect({}): {} (gave up after {} ms)", path,
                                  std::strerror(err), timeout.count()));
    if (cancel && cancel->load()) return fe_error(FrontendErrc::Cancelled, "connect cancelled");
    if (!said_waiting) {
      log::info("frontend", "waiting for {} ({})", path, std::strerror(err));
      said_waiting = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

FeResult<UnixListener> UnixListener::listen(const std::string& path) {
  auto addr = make_addr(path);
  if (!addr) return Unexpected<FrontendError>{addr.error()};
  UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s) return fe_error(FrontendErrc::Setup, fmt::format("socket: {}", std::strerror(errno)));
  // Remove a stale socket file left by an earlier run, but never a regular file.
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  if (::bind(s.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(sockaddr_un)) != 0)
    return fe_error(FrontendErrc::Setup, fmt::format("bind({}): {}", path, std::strerror(errno)));
  if (::listen(s.get(), 1) != 0)
    return fe_error(FrontendErrc::Setup, fmt::format("listen({}): {}", path, std::strerror(errno)));
  UnixListener l;
  l.fd_ = std::move(s);
  l.path_ = path;
  return l;
}

UnixListener::~UnixListener() {
  if (fd_) ::unlink(path_.c_str());
}

FeResult<UniqueFd> UnixListener::accept(std::chrono::milliseconds timeout,
                                        const std::atomic<bool>* cancel) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (cancel && cancel->load()) return fe_error(FrontendErrc::Cancelled, "accept cancelled");
    if (timeout.count() > 0 && Clock::now() >= deadline)
      return fe_error(FrontendErrc::Timeout,
                      fmt::format("no back end attached to {} within {} ms", path_, timeout.count()));
    pollfd p{fd_.get(), POLLIN, 0};
    const int n = ::poll(&p, 1, 100);
    if (n < 0 && errno != EINTR)
      return fe_error(FrontendErrc::Io, fmt::format("poll({}): {}", path_, std::strerror(errno)));
    if (n <= 0) continue;
    UniqueFd c(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (c) return c;
    if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
      return fe_error(FrontendErrc::Io, fmt::format("accept({}): {}", path_, std::strerror(errno)));
  }
}

Frontend::Frontend(UniqueFd sock, std::chrono::milliseconds reply_timeout)
    : sock_(std::move(sock)) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(reply_timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((reply_timeout.count() % 1000) * 1000);
  if (sock_ && ::setsockopt(sock_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0)
    log::warn("frontend", "SO_RCVTIMEO: {}", std::strerror(errno));
}

uint64_t choose_features(uint64_t offered, const FrontendOptions& o) {
  uint64_t want = bal::kFVersion1 | vu::feature::kProtocolFeatures;
  if (o.reporting) want |= bal::kFReporting;
  if (o.stats) want |= bal::kFStatsVq;  // Linux always negotiates it when offered
  // fph's extension: Linux never acks it; we read the epoch with GET_CONFIG,
  // so without CONFIG the bit is useless but harmless (fph_epoch() is false).
  if (o.epoch) want |= bal::kFFphEpoch;
  if (o.deflate_on_oom) want |= bal::kFDeflateOnOom;  // Linux: whenever offered
  if (o.poison) {
    want |= bal::kFPagePoison;
    // lx-bal virtballoon_validate: a driver that poisons free pages must
    // not report them unless the device promises to keep poison_val
    // (reference 1.1, 1.5).
    if (!(offered & bal::kFPagePoison)) want &= ~bal::kFReporting;
  }
  return want & offered;
}

uint64_t choose_protocol_features(uint64_t offered) {
  using namespace vu::protocol;
  // LOG_SHMFD and DEVICE_STATE as QEMU does: whenever offered, so that the
  // VM can be migrated later (they cost nothing until used).
  return (bit(kReplyAck) | bit(kConfig) | bit(kConfigureMemSlots) | bit(kStatus) |
          bit(kLogShmfd) | bit(kDeviceState)) &
         offered;
}

FeResult<vu::Message> Frontend::read_reply(vu::Request r) {
  auto m = vu::recv_message(sock_.get());
  if (!m) return Unexpected<FrontendError>{from_channel(m.error(), "reply to " + rname(r))};
  if (!m->header.is_reply() || m->header.request != static_cast<uint32_t>(r))
    return fe_error(FrontendErrc::Protocol,
                    fmt::format("expected a reply to {}, got {} with flags {:#x}", rname(r),
                                vu::request_name(m->header.request), m->header.flags));
  return std::move(*m);
}

FeResult<void> Frontend::send(vu::Request r, std::span<const uint8_t> payload,
                              std::span<const int> fds) {
  vu::Header h;
  h.request = static_cast<uint32_t>(r);
  h.flags = vu::kVersion | (reply_ack_ ? vu::kFlagNeedReply : 0);
  h.size = static_cast<uint32_t>(payload.size());
  if (auto s = vu::send_message(sock_.get(), h, payload, fds); !s)
    return Unexpected<FrontendError>{from_channel(s.error(), "send " + rname(r))};
  if (!reply_ack_) return {};
  auto rep = read_reply(r);
  if (!rep) return Unexpected<FrontendError>{rep.error()};
  auto v = vu::parse_u64(rep->payload, "ack");
  if (!v)
    return fe_error(FrontendErrc::Protocol,
                    fmt::format("ack of {}: {}", rname(r), v.error().message()));
  if (*v != 0)
    return fe_error(FrontendErrc::Nack, fmt::format("back end refused {} (ack {})", rname(r), *v));
  return {};
}

FeResult<std::vector<uint8_t>> Frontend::call(vu::Request r, std::span<const uint8_t> payload,
                                              std::span<const int> fds) {
  vu::Header h;
  h.request = static_cast<uint32_t>(r);
  h.flags = vu::kVersion;  // these always have a reply; NEED_REPLY is not used
  h.size = static_cast<uint32_t>(payload.size());
  if (auto s = vu::send_message(sock_.get(), h, payload, fds); !s)
    return Unexpected<FrontendError>{from_channel(s.error(), "send " + rname(r))};
  auto rep = read_reply(r);
  if (!rep) return Unexpected<FrontendError>{rep.error()};
  return std::move(rep->payload);
}

FeResult<uint64_t> Frontend::call_u64(vu::Request r) {
  auto p = call(r, {});
  if (!p) return Unexpected<FrontendError>{p.error()};
  auto v = vu::parse_u64(*p, rname(r));
  if (!v) return fe_error(FrontendErrc::Protocol, v.error().message());
  return *v;
}

FeResult<void> Frontend::set_status(uint8_t status) {
  if (!neg_.has_protocol(vu::protocol::kStatus)) return {};
  status_ = status;
  return send(vu::Request::SetStatus, vu::encode_u64(status));
}

FeResult<Negotiated> Frontend::negotiate(const GuestMemory& mem, const FrontendOptions& o) {
  using vu::Request;
  neg_ = Negotiated{};
  reply_ack_ = false;
  status_ = 0;

  // Features (reference 1.1): VERSION_1 is mandatory, we only drive modern devices.
  auto dev = call_u64(Request::GetFeatures);
  if (!dev) return Unexpected<FrontendError>{dev.error()};
  neg_.device_features = *dev;
  if (!(*dev & bal::kFVersion1))
    return fe_error(FrontendErrc::Unsupported,
                    fmt::format("device features {:#x} lack VIRTIO_F_VERSION_1", *dev));
  neg_.features = choose_features(*dev, o);
  if (o.reporting && !neg_.reporting())
    log::warn("frontend", "device features {:#x}: REPORTING {}; nothing will be reported", *dev,
              (*dev & bal::kFReporting) ? "dropped (PAGE_POISON wanted but not offered)"
                                        : "not offered");
  if (auto s = send(Request::SetFeatures, vu::encode_u64(neg_.features)); !s)
    return Unexpected<FrontendError>{s.error()};

  // Protocol features: only if the device offered bit 30 (reference 4.3).
  if (neg_.features & vu::feature::kProtocolFeatures) {
    auto p = call_u64(Request::GetProtocolFeatures);
    if (!p) return Unexpected<FrontendError>{p.error()};
    neg_.device_protocol = *p;
    neg_.protocol = choose_protocol_features(*p);
    if (auto s = send(Request::SetProtocolFeatures, vu::encode_u64(neg_.protocol)); !s)
      return Unexpected<FrontendError>{s.error()};
    reply_ack_ = neg_.has_protocol(vu::protocol::kReplyAck);
  }
  if (neg_.poison() && !neg_.has_protocol(vu::protocol::kConfig))
    return fe_error(FrontendErrc::Unsupported,
                    "PAGE_POISON negotiated but the back end lacks the CONFIG protocol feature: "
                    "poison_val cannot be written");

  if (auto s = send(Request::SetOwner, {}); !s) return Unexpected<FrontendError>{s.error()};

  // Memory: userspace_addr is our mapping, the back end maps the fd at
  // mmap_offset (reference 4.2, 7: QEMU 10 uses ADD_MEM_REG when it can).
  const auto& regs = mem.regions();
  auto to_vu = [](const MemRegion& r) {
    vu::MemoryRegion m;
    m.guest_phys_addr = r.gpa;
    m.memory_size = r.size;
    m.userspace_addr = r.user_addr ? r.user_addr : reinterpret_cast<uint64_t>(r.host);
    m.mmap_offset = r.mmap_offset;
    return m;
  };
  if (neg_.has_protocol(vu::protocol::kConfigureMemSlots) && !o.force_mem_table) {
    auto slots = call_u64(Request::GetMaxMemSlots);
    if (!slots) return Unexpected<FrontendError>{slots.error()};
    if (regs.size() > *slots)
      return fe_error(FrontendErrc::Unsupported,
                      fmt::format("{} regions but the back end has {} memory slots", regs.size(),
                                  *slots));
    for (const auto& r : regs) {
      const int fd = r.fd.get();
      if (auto s = send(Request::AddMemReg, vu::encode_single_region(to_vu(r)), {&fd, 1}); !s)
        return Unexpected<FrontendError>{s.error()};
    }
  } else {
    if (regs.size() > vu::kMaxMemTableRegions)
      return fe_error(FrontendErrc::Unsupported,
                      fmt::format("SET_MEM_TABLE carries at most {} regions, we have {}",
                                  vu::kMaxMemTableRegions, regs.size()));
    std::vector<vu::MemoryRegion> table;
    std::vector<int> fds;
    for (const auto& r : regs) {
      table.push_back(to_vu(r));
      fds.push_back(r.fd.get());
    }
    if (auto s = send(Request::SetMemTable, vu::encode_mem_table(table), fds); !s)
      return Unexpected<FrontendError>{s.error()};
    neg_.used_mem_table = true;
  }

  // Config space (reference 1.2): read all 16 bytes; poison_val must be
  // written before DRIVER_OK (reference 1.5).
  if (neg_.has_protocol(vu::protocol::kConfig)) {
    vu::ConfigPayload req;
    req.offset = 0;
    req.size = bal::kConfigSize;
    req.data.assign(bal::kConfigSize, 0);
    auto rep = call(Request::GetConfig, vu::encode_config(req));
    if (!rep) return Unexpected<FrontendError>{rep.error()};
    auto cfg = vu::parse_config(*rep);
    if (!cfg)
      return fe_error(FrontendErrc::Protocol, "GET_CONFIG reply: " + cfg.error().message());
    if (cfg->offset != 0 || cfg->size != bal::kConfigSize || cfg->data.size() != bal::kConfigSize)
      return fe_error(FrontendErrc::Protocol,
                      fmt::format("GET_CONFIG reply covers [{}, +{}), asked [0, +16)", cfg->offset,
                                  cfg->size));
    neg_.config = bal::decode_config(std::span<const uint8_t, bal::kConfigSize>(cfg->data.data(),
                                                                                 bal::kConfigSize));
    if (neg_.poison()) {
      vu::ConfigPayload w;
      w.offset = bal::kOffPoisonVal;
      w.size = 4;
      w.flags = 0;
      const uint32_t v = *o.poison;
      w.data = {static_cast<uint8_t>(v), static_cast<uint8_t>(v >> 8),
                static_cast<uint8_t>(v >> 16), static_cast<uint8_t>(v >> 24)};
      if (auto s = send(Request::SetConfig, vu::encode_config(w)); !s)
        return Unexpected<FrontendError>{s.error()};
      neg_.config.poison_val = v;
    }
    // fph's epoch: read once here, then the driver polls it (no back-end
    // channel for CONFIG_CHANGE_MSG). A back end that cannot serve it yet
    // gives "no epoch", not a failed setup.
    if (neg_.fph_epoch()) {
      auto e = read_epoch();
      if (!e) return Unexpected<FrontendError>{e.error()};
      neg_.epoch = *e;
      if (!*e)
        log::warn("frontend", "epoch negotiated but GET_CONFIG(offset {}, 4) returned no data; "
                  "treating the epoch as unknown", bal::kOffFphEpoch);
    }
  }

  if (auto s = set_status(bal::kStatusAcknowledge | bal::kStatusDriver | bal::kStatusFeaturesOk);
      !s)
    return Unexpected<FrontendError>{s.error()};
  if (neg_.has_protocol(vu::protocol::kStatus)) {
    // virtio 1.2 section 3.1.1 step 6: re-read status; FEATURES_OK cleared
    // means the device refused our feature subset.
    auto st = call_u64(Request::GetStatus);
    if (!st) return Unexpected<FrontendError>{st.error()};
    if (!(*st & bal::kStatusFeaturesOk))
      return fe_error(FrontendErrc::Unsupported,
                      fmt::format("device cleared FEATURES_OK (status {:#x}) for features {:#x}",
                                  *st, neg_.features));
  }
  neg_.layout = bal::queue_layout(neg_.features);
  return neg_;
}

FeResult<vu::VringAddr> Frontend::vring_addr(uint32_t index, const RingArea& ring,
                                             const GuestMemory& mem) const {
  auto ua = [&](uint64_t gpa, uint64_t len) {
    return reinterpret_cast<uint64_t>(mem.translate(gpa, len));
  };
  vu::VringAddr a;
  a.index = index;
  a.desc_user_addr = ua(ring.desc_gpa, proto::vq::desc_table_bytes(ring.num));
  a.avail_user_addr = ua(ring.avail_gpa, proto::vq::avail_ring_bytes(ring.num));
  a.used_user_addr = ua(ring.used_gpa, proto::vq::used_ring_bytes(ring.num));
  if (!a.desc_user_addr || !a.avail_user_addr || !a.used_user_addr)
    return fe_error(FrontendErrc::Setup, fmt::format("ring {} is outside guest memory", index));
  return a;
}

FeResult<void> Frontend::setup_queue(uint32_t index, const RingArea& ring, const GuestMemory& mem,
                                     int kick_fd, int call_fd, uint16_t base) {
  using vu::Request;
  auto a = vring_addr(index, ring, mem);
  if (!a) return Unexpected<FrontendError>{a.error()};

  if (auto s = send(Request::SetVringNum, vu::encode_vring_state({index, ring.num})); !s)
    return Unexpected<FrontendError>{s.error()};
  if (auto s = send(Request::SetVringBase, vu::encode_vring_state({index, base})); !s)
    return Unexpected<FrontendError>{s.error()};
  if (auto s = send(Request::SetVringAddr, vu::encode_vring_addr(*a)); !s)
    return Unexpected<FrontendError>{s.error()};
  if (auto s = send(Request::SetVringKick, vu::encode_u64(index), {&kick_fd, 1}); !s)
    return Unexpected<FrontendError>{s.error()};
  if (auto s = send(Request::SetVringCall, vu::encode_u64(index), {&call_fd, 1}); !s)
    return Unexpected<FrontendError>{s.error()};
  // With bit 30 negotiated rings wait for SET_VRING_ENABLE(1) (reference 4.5).
  if (neg_.features & vu::feature::kProtocolFeatures)
    if (auto s = send(Request::SetVringEnable, vu::encode_vring_state({index, 1})); !s)
      return Unexpected<FrontendError>{s.error()};
  return {};
}

FeResult<void> Frontend::set_logging(bool on, std::span<const RingArea> rings,
                                     const GuestMemory& mem) {
  using vu::Request;
  if (!(neg_.device_features & vu::feature::kLogAll))
    return fe_error(FrontendErrc::Unsupported, "the back end does not offer VHOST_F_LOG_ALL");
  const uint64_t f = on ? neg_.features | vu::feature::kLogAll : neg_.features;
  if (auto s = send(Request::SetFeatures, vu::encode_u64(f)); !s)
    return Unexpected<FrontendError>{s.error()};
  for (uint32_t q = 0; q < rings.size(); ++q) {
    auto a = vring_addr(q, rings[q], mem);
    if (!a) return Unexpected<FrontendError>{a.error()};
    a->flags = on ? vu::kVringFlagLog : 0;
    a->log_guest_addr = on ? rings[q].used_gpa : 0;
    if (auto s = send(Request::SetVringAddr, vu::encode_vring_addr(*a)); !s)
      return Unexpected<FrontendError>{s.error()};
  }
  return {};
}

FeResult<void> Frontend::set_log_base(int fd, uint64_t size, uint64_t offset) {
  auto p = call(vu::Request::SetLogBase, vu::encode_log({size, offset}), {&fd, 1});
  if (!p) return Unexpected<FrontendError>{p.error()};
  auto v = vu::parse_u64(*p, "SET_LOG_BASE reply");
  if (!v) return fe_error(FrontendErrc::Protocol, v.error().message());
  if (*v != 0) return fe_error(FrontendErrc::Nack, fmt::format("SET_LOG_BASE refused ({})", *v));
  return {};
}

FeResult<void> Frontend::set_device_state_fd(bool load, int fd) {
  auto p = call(vu::Request::SetDeviceStateFd,
                vu::encode_device_state({load ? 1u : 0u, 0u}), {&fd, 1});
  if (!p) return Unexpected<FrontendError>{p.error()};
  auto v = vu::parse_u64(*p, "SET_DEVICE_STATE_FD reply");
  if (!v) return fe_error(FrontendErrc::Protocol, v.error().message());
  // Bits 0-7 an error code, bit 8 "no fd of mine: use yours" (the spec's
  // invalid-fd flag). fphd always uses ours.
  if (*v != vu::kVringNoFdMask)
    return fe_error(FrontendErrc::Nack,
                    fmt::format("SET_DEVICE_STATE_FD({}) refused ({:#x})", load ? "LOAD" : "SAVE", *v));
  return {};
}

FeResult<uint64_t> Frontend::check_device_state() {
  return call_u64(vu::Request::CheckDeviceState);
}

FeResult<void> Frontend::driver_ok() {
  return set_status(bal::kStatusAcknowledge | bal::kStatusDriver | bal::kStatusFeaturesOk |
                    bal::kStatusDriverOk);
}

FeResult<uint32_t> Frontend::stop_queue(uint32_t index) {
  using vu::Request;
  if (neg_.features & vu::feature::kProtocolFeatures)
    if (auto s = send(Request::SetVringEnable, vu::encode_vring_state({index, 0})); !s)
      return Unexpected<FrontendError>{s.error()};
  auto rep = call(Request::GetVringBase, vu::encode_vring_state({index, 0}));
  if (!rep) return Unexpected<FrontendError>{rep.error()};
  auto st = vu::parse_vring_state(*rep);
  if (!st) return fe_error(FrontendErrc::Protocol, "GET_VRING_BASE reply: " + st.error().message());
  if (st->index != index)
    return fe_error(FrontendErrc::Protocol,
                    fmt::format("GET_VRING_BASE for ring {} answered for ring {}", index,
                                st->index));
  return st->num;
}

FeResult<void> Frontend::reset_status() { return set_status(0); }

FeResult<std::optional<uint32_t>> Frontend::read_epoch() {
  if (!neg_.fph_epoch()) return std::optional<uint32_t>{};
  vu::ConfigPayload req;
  req.offset = bal::kOffFphEpoch;
  req.size = 4;
  req.data.assign(4, 0);
  auto rep = call(vu::Request::GetConfig, vu::encode_config(req));
  if (!rep) return Unexpected<FrontendError>{rep.error()};
  auto cfg = vu::parse_config(*rep);
  if (!cfg || cfg->offset != bal::kOffFphEpoch || cfg->size != 4 || cfg->data.size() != 4) {
    log::debug("frontend", "GET_CONFIG(offset {}, 4): {}", bal::kOffFphEpoch,
               cfg ? fmt::format("reply covers [{}, +{})", cfg->offset, cfg->size)
                   : cfg.error().message());
    return std::optional<uint32_t>{};
  }
  const auto& d = cfg->data;
  return std::optional<uint32_t>{static_cast<uint32_t>(d[0]) | static_cast<uint32_t>(d[1]) << 8 |
                                 static_cast<uint32_t>(d[2]) << 16 |
                                 static_cast<uint32_t>(d[3]) << 24};
}

FeResult<std::pair<uint32_t, uint32_t>> Frontend::read_balloon_size() {
  if (!neg_.has_protocol(vu::protocol::kConfig))
    return fe_error(FrontendErrc::Unsupported, "GET_CONFIG needs the CONFIG protocol feature");
  vu::ConfigPayload req;
  req.offset = bal::kOffNumPages;
  req.size = 8;
  req.data.assign(8, 0);
  auto rep = call(vu::Request::GetConfig, vu::encode_config(req));
  if (!rep) return Unexpected<FrontendError>{rep.error()};
  auto cfg = vu::parse_config(*rep);
  if (!cfg || cfg->offset != bal::kOffNumPages || cfg->size != 8 || cfg->data.size() != 8)
    return fe_error(FrontendErrc::Protocol, "GET_CONFIG(num_pages, actual): the reply does not "
                                            "cover config bytes 0..8");
  auto le32 = [&](size_t i) {
    const auto& d = cfg->data;
    return static_cast<uint32_t>(d[i]) | static_cast<uint32_t>(d[i + 1]) << 8 |
           static_cast<uint32_t>(d[i + 2]) << 16 | static_cast<uint32_t>(d[i + 3]) << 24;
  };
  return std::pair<uint32_t, uint32_t>{le32(0), le32(4)};
}

FeResult<void> Frontend::write_actual(uint32_t actual) {
  if (!neg_.has_protocol(vu::protocol::kConfig))
    return fe_error(FrontendErrc::Unsupported, "SET_CONFIG needs the CONFIG protocol feature");
  vu::ConfigPayload w;
  w.offset = bal::kOffActual;
  w.size = 4;
  w.data = {static_cast<uint8_t>(actual), static_cast<uint8_t>(actual >> 8),
            static_cast<uint8_t>(actual >> 16), static_cast<uint8_t>(actual >> 24)};
  return send(vu::Request::SetConfig, vu::encode_config(w));
}

}  // namespace fph::guest
