// The back end's view of one virtqueue: the vhost-user ring state machine
// (reference section 4.5: started/stopped and enabled/disabled are
// independent) plus the device ring itself.
//
// The rules, in one place (docs/protocol.md "Ring states"):
//
//   configured  a valid size (SET_VRING_NUM), addresses that were aligned and
//               inside the memory table when they arrived (SET_VRING_ADDR), a
//               base (SET_VRING_BASE, 0 after a reset) and a kick fd. A
//               SET_VRING_* that is refused *unconfigures* what it tried to
//               set: the front end and fphd no longer agree on it, so the
//               ring stays stopped until it is set again correctly (never
//               "keep running with the old value").
//   started     configured, and its three parts located in the *current*
//               memory table (locate_ring). A started ring is located again
//               whenever the table changes (SET_MEM_TABLE, ADD/REM_MEM_REG):
//               it then runs on the new mappings, or, if the table no longer
//               holds it, it is stopped without writing its used ring again
//               (`abandoned`) and its addresses are unconfigured.
//   in flight   a head taken from the avail ring and not yet returned
//               (DeviceRing tracks them): offering it again is a protocol
//               error that closes the session (queue service).
//
// The session (session.cpp) applies these rules under its lock; the checks
// themselves are the functions below.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"
#include "fph/daemon/guest_memory.h"
#include "fph/proto/vhost_user.h"
#include "fph/proto/virtqueue.h"

namespace fph::daemon {

// Where a ring's descriptor table, avail ring and used ring are in fphd's
// mappings of guest memory.
struct RingParts {
  uint8_t* desc = nullptr;
  uint8_t* avail = nullptr;
  uint8_t* used = nullptr;
};

// The ring's addresses checked against `table`: aligned (virtio 1.2 2.7),
// and each part, sized for `num` entries, inside one region. `num` 0 (not
// set yet) checks the smallest ring (1 entry); the full size is checked again
// when the ring starts. The error names the part and its address.
Expected<RingParts, std::string> locate_ring(const proto::vu::VringAddr& a, uint32_t num,
                                             const MemoryTable& table);

struct Vring {
  // What a refused SET_VRING_* leaves unconfigured.
  enum class Field : uint8_t { Num, Addr, Base, Kick };

  uint32_t num = 0;           // 0: not configured
  bool addr_set = false;
  proto::vu::VringAddr addr;
  uint16_t base = 0;          // SET_VRING_BASE: next avail index to process
  bool base_set = true;       // false after a refused SET_VRING_BASE (0 after reset is valid)
  UniqueFd kick;
  UniqueFd call;
  UniqueFd err;
  bool started = false;       // kick fd received and ring located; stops on GET_VRING_BASE
  bool enabled = false;       // SET_VRING_ENABLE
  bool ever_started = false;  // started since the last device reset (reclaim state)
  bool abandoned = false;     // the driver reset the ring behind our back, or its memory is
                              // gone: never write it again
  proto::vq::DeviceRing ring;
  // Keeps the regions holding the ring mapped while the ring is started,
  // even if the front end removes them meanwhile (until the ring is located
  // again in the new table or stopped).
  std::vector<std::shared_ptr<MappedRegion>> ring_regions;
  int inflight = 0;           // requests taken and not yet returned
  uint64_t requests = 0;      // returned since start

  // Everything SET_VRING_* must provide before the ring may start.
  bool configured() const { return num != 0 && addr_set && base_set && kick; }
  // A refused SET_VRING_* for this ring (the ring is stopped first).
  void unconfigure(Field f);
  static const char* field_name(Field f);
};

}  // namespace fph::daemon
