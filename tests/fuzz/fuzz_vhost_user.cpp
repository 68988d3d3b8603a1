// Fuzz target: every vhost-user parser over the same untrusted bytes.
//
// Input: a 12-byte header followed by a payload (the wire format). The header
// parser sees the first 12 bytes, every payload parser sees the rest, and
// then also the whole input. Whatever parses must re-encode to the same bytes
// (modulo padding words the parsers ignore), else we trap.
#include <cstdint>
#include <cstring>
#include <span>

#include "fph/proto/balloon.h"
#include "fph/proto/vhost_user.h"

namespace vu = fph::proto::vu;
namespace balloon = fph::proto::balloon;

namespace {

void check(bool ok) {
  if (!ok) __builtin_trap();
}

template <class R>
void touch_error(const R& r) {
  if (!r) check(!r.error().message().empty());
}

bool equal(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

// The config-space rule (GET/SET_CONFIG against the space fphd exposes):
// whatever is allowed lies inside the space, writes inside the standard 16
// bytes, plain writes inside one driver-writable field.
void config_access(uint32_t offset, uint32_t size) {
  using balloon::ConfigAccess;
  for (uint32_t space : {balloon::kConfigSize, balloon::kExtConfigSize}) {
    const uint64_t end = uint64_t{offset} + size;
    auto rd = balloon::check_config_access(offset, size, space, ConfigAccess::Read);
    check(rd.has_value() == (size > 0 && end <= space));
    touch_error(rd);
    auto mw = balloon::check_config_access(offset, size, space, ConfigAccess::MigrationWrite);
    if (mw) check(rd && end <= balloon::kConfigSize);
    touch_error(mw);
    auto w = balloon::check_config_access(offset, size, space, ConfigAccess::Write);
    if (w) check(mw && balloon::driver_writable(offset, size));
    touch_error(w);
  }
}

// Every request that always replies is answered on refusal: with its error
// form, or the session closes. GET_CONFIG's error form is an empty config.
void replies(uint32_t request) {
  auto e = vu::error_reply(request);
  if (e) check(vu::always_replies(request) && !e->empty());
  if (request == static_cast<uint32_t>(vu::Request::GetConfig)) {
    check(e.has_value());
    auto c = vu::parse_config(*e);
    check(!c && c.error().field == "config.size");  // size 0: the spec's error
  }
}

void all_payload_parsers(std::span<const uint8_t> p) {
  if (auto r = vu::parse_u64(p, "u64")) check(equal(vu::encode_u64(*r), p));
  else touch_error(r);

  if (auto r = vu::parse_vring_state(p)) check(equal(vu::encode_vring_state(*r), p));
  else touch_error(r);

  if (auto r = vu::parse_vring_addr(p)) check(equal(vu::encode_vring_addr(*r), p));
  else touch_error(r);

  if (auto r = vu::parse_vring_fd(p)) {
    check(r->index <= 0xff);
    uint64_t v = r->index | (r->no_fd ? vu::kVringNoFdMask : 0);
    check(equal(vu::encode_u64(v), p));
  } else {
    touch_error(r);
  }

  if (auto r = vu::parse_mem_table(p)) {
    check(!r->empty() && r->size() <= vu::kMaxMemTableRegions);
    auto enc = vu::encode_mem_table(*r);
    // The padding word (bytes 4..8) is ignored by the parser, and so are
    // unannounced spare region slots after the announced ones (virtio_uml),
    // which must still be whole slots, 8 at most in all.
    check(enc.size() == 8 + 32 * r->size());
    check(enc.size() <= p.size() && p.size() <= 8 + 32 * vu::kMaxMemTableRegions);
    check((p.size() - 8) % 32 == 0);
    check(std::memcmp(enc.data(), p.data(), 4) == 0);
    check(std::memcmp(enc.data() + 8, p.data() + 8, enc.size() - 8) == 0);
    for (size_t i = 0; i < r->size(); ++i) {
      const auto& a = (*r)[i];
      check(a.memory_size > 0);
      check(a.guest_phys_addr + a.memory_size > a.guest_phys_addr);
      for (size_t j = 0; j < i; ++j) {
        const auto& b = (*r)[j];
        check(a.guest_phys_addr >= b.guest_phys_addr + b.memory_size ||
              b.guest_phys_addr >= a.guest_phys_addr + a.memory_size);
      }
    }
  } else {
    touch_error(r);
  }

  if (auto r = vu::parse_single_region(p)) {
    auto enc = vu::encode_single_region(*r);
    check(enc.size() == p.size() && std::memcmp(enc.data() + 8, p.data() + 8, 32) == 0);
    check(vu::check_region(*r, "r").has_value());
  } else {
    touch_error(r);
  }

  if (auto r = vu::parse_log(p)) check(equal(vu::encode_log(*r), p));
  else touch_error(r);

  if (auto r = vu::parse_config(p)) {
    check(r->size == r->data.size());
    check(uint64_t{r->offset} + r->size <= vu::kMaxConfigSize);
    check(equal(vu::encode_config(*r), p));
    config_access(r->offset, r->size);
  } else {
    touch_error(r);
  }

  if (auto r = vu::parse_device_state(p)) check(equal(vu::encode_device_state(*r), p));
  else touch_error(r);
}

void fd_counts(uint32_t request, std::span<const uint8_t> p, size_t received) {
  auto e = vu::expected_fds(request, p);
  auto r = vu::expected_fds_range(request, p);
  check(e.has_value() == r.has_value());
  if (e) {
    check(*e == r->min && r->min <= r->max && r->max <= vu::kMaxFds);
    auto c = vu::check_fds(request, p, received);
    check(c.has_value() == r->allows(received));
    touch_error(c);
  } else {
    touch_error(e);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> in(data, size);
  uint32_t request = 0;
  std::span<const uint8_t> payload = in;

  if (auto h = vu::parse_header(in)) check(size == vu::kHeaderSize);
  if (size >= vu::kHeaderSize) {
    auto head = in.first(vu::kHeaderSize);
    if (auto h = vu::parse_header(head)) {
      check(equal(vu::encode_header(*h), head));
      check(h->size <= vu::kMaxPayload);
      check((h->flags & vu::kVersionMask) == vu::kVersion);
    } else {
      touch_error(h);
    }
    std::memcpy(&request, data, 4);
    payload = in.subspan(vu::kHeaderSize);
  }
  (void)vu::request_name(request);
  replies(request);
  if (payload.size() >= 8) {
    uint32_t off, sz;
    std::memcpy(&off, payload.data(), 4);
    std::memcpy(&sz, payload.data() + 4, 4);
    config_access(off, sz);
  }

  all_payload_parsers(payload);
  if (payload.size() != size) all_payload_parsers(in);

  fd_counts(request, payload, size % (vu::kMaxFds + 2));
  // The requests whose fd count depends on the payload, on the same bytes.
  for (auto r : {vu::Request::SetMemTable, vu::Request::SetVringKick, vu::Request::SetVringCall,
                 vu::Request::SetVringErr, vu::Request::RemMemReg}) {
    fd_counts(static_cast<uint32_t>(r), payload, size % 3);
  }
  return 0;
}
