// Verified reclaim: a Discarder decorator that measures what the kernel
// really stopped holding. For a range with a backing fd it reads the file's
// allocated blocks (fstat st_blocks) right before and right after the
// discard and reports the drop in DiscardOutcome::freed_bytes: "reclaimed"
// is measured, never assumed from a return code (DESIGN section 4).
//
// Cost: two fstat calls per discard syscall group (a coalesced range of up to
// 16 MiB on shmem, 256 MiB on hugetlbfs), nothing per page. Concurrent
// discards of the same file would blur each other's before/after, so the
// measured section is serialised per fd (256 striped locks, by fd number).
// The kernel already serialises hole punches on one inode (shmem and
// hugetlbfs take the inode lock), so this costs no parallelism for one VM;
// two VMs whose fds share a stripe (1 in 256) serialise their discards with
// each other.
// A guest faulting pages into the same file during the syscall can only make
// the drop look smaller: the measurement errs on the side of "freed less".
#pragma once

#include <array>
#include <mutex>

#include "fph/reclaim/discard.h"

namespace fph::reclaim {

class VerifyingDiscarder final : public Discarder {
 public:
  explicit VerifyingDiscarder(Discarder& inner) : inner_(inner) {}
  DiscardOutcome discard(const DiscardTarget& t, Method m) override;

 private:
  Discarder& inner_;
  std::array<std::mutex, 256> stripes_;
};

}  // namespace fph::reclaim
