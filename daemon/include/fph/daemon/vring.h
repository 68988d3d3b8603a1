// The back end's view of one virtqueue: the vhost-user ring state machine
// (reference section 4.5: started/stopped and enabled/disabled are
// independent) plus the device ring itself.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "fph/common/unique_fd.h"
#include "fph/daemon/guest_memory.h"
#include "fph/proto/vhost_user.h"
#include "fph/proto/virtqueue.h"

namespace fph::daemon {

struct Vring {
  uint32_t num = 0;
  bool addr_set = false;
  proto::vu::VringAddr addr;
  uint16_t base = 0;          // SET_VRING_BASE: next avail index to process
  UniqueFd kick;
  UniqueFd call;
  UniqueFd err;
  bool started = false;       // kick fd received and ring translated; stops on GET_VRING_BASE
  bool enabled = false;       // SET_VRING_ENABLE
  bool ever_started = false;  // started since the last device reset (reclaim state)
  bool abandoned = false;     // the driver reset the ring behind our back: never write it again
  proto::vq::DeviceRing ring;
  // Keeps the regions holding the ring mapped while the ring is started,
  // even if the front end removes them meanwhile.
  std::vector<std::shared_ptr<MappedRegion>> ring_regions;
  int inflight = 0;           // requests taken and not yet returned
  uint64_t requests = 0;      // returned since start
};

}  // namespace fph::daemon
