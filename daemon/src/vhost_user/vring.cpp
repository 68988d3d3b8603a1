// The ring rules of vring.h: where a ring may be, and what a refused
// configuration takes away.
#include "fph/daemon/vring.h"

#include <fmt/format.h>

#include "fph/common/checked.h"

namespace fph::daemon {

namespace vq = proto::vq;

Expected<RingParts, std::string> locate_ring(const proto::vu::VringAddr& a, uint32_t num,
                                             const MemoryTable& table) {
  if (!is_aligned(a.desc_user_addr, vq::kDescAlign) || !is_aligned(a.avail_user_addr, vq::kAvailAlign) ||
      !is_aligned(a.used_user_addr, vq::kUsedAlign))
    return unexpected(fmt::format("vring_addr: misaligned ring (desc 0x{:x} needs {}, avail 0x{:x} "
                                  "needs {}, used 0x{:x} needs {})",
                                  a.desc_user_addr, vq::kDescAlign, a.avail_user_addr, vq::kAvailAlign,
                                  a.used_user_addr, vq::kUsedAlign));
  if (table.regions().empty())
    return unexpected(std::string("vring_addr: the memory table is empty (no region set yet, or all removed)"));
  const uint32_t n = num ? num : 1;
  RingParts p;
  p.desc = table.translate_user(a.desc_user_addr, vq::desc_table_bytes(n));
  p.avail = table.translate_user(a.avail_user_addr, vq::avail_ring_bytes(n));
  p.used = table.translate_user(a.used_user_addr, vq::used_ring_bytes(n));
  auto missing = [&](const char* part, uint64_t addr, uint64_t bytes) {
    return unexpected(fmt::format("vring_addr.{}: [0x{:x}, +0x{:x}) for {} entries is not inside one "
                                  "region of the memory table ({} regions)",
                                  part, addr, bytes, n, table.regions().size()));
  };
  if (!p.desc) return missing("desc_user_addr", a.desc_user_addr, vq::desc_table_bytes(n));
  if (!p.avail) return missing("avail_user_addr", a.avail_user_addr, vq::avail_ring_bytes(n));
  if (!p.used) return missing("used_user_addr", a.used_user_addr, vq::used_ring_bytes(n));
  return p;
}

void Vring::unconfigure(Field f) {
  switch (f) {
    case Field::Num: num = 0; break;
    case Field::Addr: addr_set = false; break;
    case Field::Base: base_set = false; break;
    case Field::Kick: kick.reset(); break;
  }
}

const char* Vring::field_name(Field f) {
  switch (f) {
    case Field::Num: return "size";
    case Field::Addr: return "addresses";
    case Field::Base: return "base";
    case Field::Kick: return "kick fd";
  }
  return "?";
}

}  // namespace fph::daemon
