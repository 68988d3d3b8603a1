// Live migration of an fph-guest VM between two vhost-user back ends: the
// part of the VMM (QEMU's migration/ram.c and hw/virtio/vhost.c) that a test
// of fphd's migration support needs, in one process. The "source" is the
// guest's current RAM and connection; the "destination" is a twin RAM (new
// memfds, same layout) and a new connection to another back end.
//
//  1. Connect to the destination and negotiate with the twin's memory table
//     (no rings yet: the destination gets its state before they start).
//  2. Dirty logging on the source back end (SET_LOG_BASE with a memfd log,
//     SET_FEATURES|LOG_ALL, SET_VRING_ADDR with the log flag), and dirty
//     tracking of the guest's own writes by the kernel: userfaultfd
//     write-protect in async mode, read and re-armed with PAGEMAP_SCAN
//     (Linux 6.7+; what KVM's dirty log is for a real VM).
//  3. Precopy: every page with data is copied (read with pread, which does
//     not populate holes), then pages dirtied since, by the guest or by the
//     back end (used-ring writes, discarded ranges), are copied again, while
//     the workload allocates, frees and reports, until a pass is small and
//     a minimum precopy time has passed. A zero page is skipped when the
//     destination page was never written and written as zeros otherwise
//     (QEMU's ram_handle_zero): that is how the destination comes to hold
//     pages the source has already discarded.
//  4. Stop and copy: the vCPUs (VcpuGate) and the driver stop; every ring is
//     stopped with GET_VRING_BASE (the back end drains its in-flight
//     requests first); the last dirty pages are copied; every page of the
//     twin is compared with the source (`mismatched_pages` must be 0); the
//     device state is SAVEd from the source and LOADed into the destination
//     through pipes (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE).
//  5. Switch: the twin's memfds are mapped over the guest's RAM at the same
//     addresses, the rings start on the destination at the source's
//     indices, the source connection is closed, and the vCPUs resume. The
//     destination's LOAD bumped the epoch; the driver reads it at once.
//
// Failure before the switch leaves the guest on the source: rings restarted
// where they stopped, logging off (QEMU's migration cancel path).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "fph/guest/balloon_driver.h"
#include "fph/guest/frontend.h"
#include "fph/guest/guest_memory.h"
#include "fph/guest/workload.h"

namespace fph::guest {

struct MigrationOptions {
  std::string destination;  // vhost-user socket of the destination back end
  std::chrono::milliseconds connect_timeout{10000};
  // How long the destination may take to answer any request (LOAD and
  // CHECK_DEVICE_STATE included) before the migration gives up and the
  // guest resumes on the source. The vCPUs are paused meanwhile.
  std::chrono::milliseconds destination_reply_timeout{10000};
  // Precopy runs at least this long (so that a test's workload frees and
  // reports during it), then ends at the first pass with at most
  // `converge_pages` dirty pages, or at `max_passes` passes.
  std::chrono::milliseconds min_precopy{0};
  uint64_t converge_pages = 256;
  int max_passes = 50;
  // Negative control for tests: do not resend pages only the back end's
  // dirty log names. The comparison at the switch must then find the pages
  // the back end discarded during precopy (proof that the check can fail).
  bool ignore_device_log = false;
};

struct MigrationReport {
  bool ok = false;
  std::string error;           // what failed, when !ok
  bool rolled_back = false;    // failed after logging began; the guest stayed on the source
  int passes = 0;              // precopy passes after the first full copy
  uint64_t pages_copied = 0;   // pages written to the destination (data or zeros)
  uint64_t zero_pages_skipped = 0;
  uint64_t zero_pages_written = 0;  // zero pages over destination pages that had data
  uint64_t guest_dirty_pages = 0;   // summed over passes, from userfaultfd
  uint64_t device_dirty_pages = 0;  // summed over passes, from the back end's log
  uint64_t final_dirty_pages = 0;   // copied while stopped
  uint64_t mismatched_pages = 0;    // twin vs source at the switch (must be 0)
  uint64_t blob_bytes = 0;
  double precopy_ms = 0;
  double downtime_ms = 0;  // vCPUs paused .. resumed on the destination, minus compare_ms
  double compare_ms = 0;   // the all-pages comparison (a test's check, not migration work)
  double drain_ms = 0;     // GET_VRING_BASE of every ring
  double save_ms = 0;
  double load_ms = 0;
  uint64_t source_backing_bytes = 0;       // at the switch (memfd st_blocks)
  uint64_t destination_backing_bytes = 0;  // at the switch
};

// Runs one migration (blocking; call it from a thread of its own while the
// driver and the workload run). `cancel` aborts precopy (the guest stays on
// the source). `frontend` are the options the guest negotiated with.
MigrationReport migrate(GuestMemory& mem, BalloonDriver& driver, VcpuGate& vcpus,
                        const FrontendOptions& frontend, const MigrationOptions& o,
                        const std::atomic<bool>& cancel);

}  // namespace fph::guest
