// SyscallDiscarder against real memory: "reclaimed" means the kernel no longer
// holds it (st_blocks, residency), never "the syscall returned 0"
// (DESIGN section 4).
#include "fph/reclaim/discard.h"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <string>

#include "test_memory.h"

namespace fph::reclaim {
namespace {

using test::first_nonzero;
using test::first_pattern_mismatch;
using test::kMiB;
using test::kPage;
using test::PrivateAnon;
using test::resident_pages;
using test::SharedMemfd;

DiscardTarget shmem_target(const SharedMemfd& m, uint64_t off, uint64_t len) {
  DiscardTarget t;
  t.fd = m.fd();
  t.fd_offset = off;
  t.addr = m.data() + off;
  t.length = len;
  t.backing = Backing::Shmem;
  t.page_size = kPage;
  return t;
}

DiscardTarget anon_target(const PrivateAnon& m, uint64_t off, uint64_t len) {
  DiscardTarget t;
  t.addr = m.data() + off;
  t.length = len;
  t.backing = Backing::PrivateAnon;
  t.page_size = kPage;
  return t;
}

TEST(Discard, PunchHoleOnMemfdFreesBlocksAndKeepsNeighbours) {
  SharedMemfd m(8 * kMiB);
  const int64_t before = allocated_bytes(m.fd());
  ASSERT_GE(before, static_cast<int64_t>(8 * kMiB));

  SyscallDiscarder d;
  const auto o = d.discard(shmem_target(m, 2 * kMiB, 4 * kMiB), Method::PunchHole);
  EXPECT_EQ(o.method, Method::PunchHole);
  EXPECT_EQ(o.discarded_bytes, 4 * kMiB);
  EXPECT_EQ(o.skipped_bytes, 0u);
  EXPECT_EQ(o.skip, SkipReason::None);
  EXPECT_EQ(o.error, 0);
  EXPECT_EQ(o.syscalls, 1u);

  EXPECT_EQ(allocated_bytes(m.fd()), before - static_cast<int64_t>(4 * kMiB));
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, 2 * kMiB), 2 * kMiB);
  EXPECT_EQ(first_nonzero(m.data(), 2 * kMiB, 6 * kMiB), 6 * kMiB);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 6 * kMiB, 8 * kMiB), 8 * kMiB);
  // KEEP_SIZE: the file keeps its size.
  EXPECT_EQ(lseek(m.fd(), 0, SEEK_END), static_cast<off_t>(8 * kMiB));
}

TEST(Discard, PunchHoleNeedsNoMapping) {
  SharedMemfd m(1 * kMiB);
  DiscardTarget t = shmem_target(m, 0, 1 * kMiB);
  t.addr = nullptr;
  const auto o = SyscallDiscarder().discard(t, Method::PunchHole);
  EXPECT_EQ(o.discarded_bytes, 1 * kMiB);
  EXPECT_EQ(allocated_bytes(m.fd()), 0);
}

TEST(Discard, MadvRemoveOnSharedMemfdMappingFreesBlocks) {
  SharedMemfd m(4 * kMiB);
  const int64_t before = allocated_bytes(m.fd());
  ASSERT_GE(before, static_cast<int64_t>(4 * kMiB));

  DiscardTarget t = shmem_target(m, 1 * kMiB, 2 * kMiB);
  t.fd = -1;  // MADV_REMOVE works from the mapping alone
  const auto o = SyscallDiscarder().discard(t, Method::MadvRemove);
  EXPECT_EQ(o.discarded_bytes, 2 * kMiB);
  EXPECT_EQ(o.skip, SkipReason::None);
  EXPECT_EQ(allocated_bytes(m.fd()), before - static_cast<int64_t>(2 * kMiB));
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, 1 * kMiB), 1 * kMiB);
  EXPECT_EQ(first_nonzero(m.data(), 1 * kMiB, 3 * kMiB), 3 * kMiB);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 3 * kMiB, 4 * kMiB), 4 * kMiB);
}

TEST(Discard, MadvDontneedOnPrivateAnonDropsResidencyAndReadsZero) {
  PrivateAnon m(4 * kMiB);
  ASSERT_EQ(resident_pages(m.data(), m.size()), m.size() / kPage);

  const auto o =
      SyscallDiscarder().discard(anon_target(m, 1 * kMiB, 2 * kMiB), Method::MadvDontneed);
  EXPECT_EQ(o.discarded_bytes, 2 * kMiB);
  EXPECT_EQ(o.skip, SkipReason::None);
  EXPECT_EQ(o.syscalls, 1u);

  // The discarded pages are no longer resident; their neighbours still are.
  EXPECT_EQ(resident_pages(m.data() + 1 * kMiB, 2 * kMiB), 0u);
  EXPECT_EQ(resident_pages(m.data(), 1 * kMiB), 1 * kMiB / kPage);
  EXPECT_EQ(resident_pages(m.data() + 3 * kMiB, 1 * kMiB), 1 * kMiB / kPage);
  // Refaults read zero (madvise(2), MADV_DONTNEED on private anonymous memory).
  EXPECT_EQ(first_nonzero(m.data(), 1 * kMiB, 3 * kMiB), 3 * kMiB);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, 1 * kMiB), 1 * kMiB);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 3 * kMiB, 4 * kMiB), 4 * kMiB);
}

TEST(Discard, MadvFreeAcceptedOnPrivateAnonAndNeighboursIntact) {
  PrivateAnon m(2 * kMiB);
  const auto o = SyscallDiscarder().discard(anon_target(m, 64 * kPage, 128 * kPage),
                                            Method::MadvFree);
  EXPECT_EQ(o.method, Method::MadvFree);
  EXPECT_EQ(o.discarded_bytes, 128 * kPage);
  EXPECT_EQ(o.skip, SkipReason::None);
  EXPECT_EQ(o.error, 0);
  // Lazily freed contents are unspecified (old or zero); the rest is not.
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, 64 * kPage), 64 * kPage);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 192 * kPage, m.size()), m.size());
  // A write after MADV_FREE cancels the free for that page: it must stick.
  m.data()[64 * kPage] = 0x5a;
  EXPECT_EQ(m.data()[64 * kPage], 0x5a);
}

TEST(Discard, DontneedAndFreeOnSharedBackingsAreRefusedAndDataIntact) {
  SharedMemfd m(2 * kMiB);
  const int64_t before = allocated_bytes(m.fd());
  SyscallDiscarder d;
  for (const Method meth : {Method::MadvDontneed, Method::MadvFree}) {
    for (const Backing b : {Backing::Shmem, Backing::Hugetlb}) {
      DiscardTarget t = shmem_target(m, 0, m.size());
      t.backing = b;
      const auto o = d.discard(t, meth);
      EXPECT_EQ(o.skip, SkipReason::Unsupported) << to_string(meth) << " " << to_string(b);
      EXPECT_EQ(o.skipped_bytes, m.size());
      EXPECT_EQ(o.discarded_bytes, 0u);
      EXPECT_EQ(o.syscalls, 0u);
    }
  }
  EXPECT_EQ(allocated_bytes(m.fd()), before);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, m.size()), m.size());
}

TEST(Discard, FilePrimitivesOnPrivateAnonAreRefused) {
  PrivateAnon m(1 * kMiB);
  SyscallDiscarder d;
  for (const Method meth : {Method::PunchHole, Method::MadvRemove}) {
    const auto o = d.discard(anon_target(m, 0, m.size()), meth);
    EXPECT_EQ(o.skip, SkipReason::Unsupported) << to_string(meth);
    EXPECT_EQ(o.skipped_bytes, m.size());
    EXPECT_EQ(o.syscalls, 0u);
  }
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, m.size()), m.size());
}

TEST(Discard, MissingFdOrAddressIsUnsupported) {
  SharedMemfd m(1 * kMiB);
  SyscallDiscarder d;
  DiscardTarget no_fd = shmem_target(m, 0, kPage);
  no_fd.fd = -1;
  EXPECT_EQ(d.discard(no_fd, Method::PunchHole).skip, SkipReason::Unsupported);
  DiscardTarget no_addr = shmem_target(m, 0, kPage);
  no_addr.addr = nullptr;
  EXPECT_EQ(d.discard(no_addr, Method::MadvRemove).skip, SkipReason::Unsupported);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, m.size()), m.size());
}

TEST(Discard, MisalignedShmemRangeIsSkippedWholeAndNothingChanges) {
  SharedMemfd m(1 * kMiB);
  const int64_t before = allocated_bytes(m.fd());
  SyscallDiscarder d;
  struct Case {
    uint64_t off, len;
  };
  for (const Case c : {Case{kPage + 100, 4 * kPage}, Case{kPage, 4 * kPage + 1},
                       Case{100, 16 * kPage - 100}}) {
    for (const Method meth : {Method::PunchHole, Method::MadvRemove}) {
      const auto o = d.discard(shmem_target(m, c.off, c.len), meth);
      EXPECT_EQ(o.skip, SkipReason::Misaligned) << c.off << "+" << c.len << " " << to_string(meth);
      EXPECT_EQ(o.skipped_bytes, c.len);
      EXPECT_EQ(o.discarded_bytes, 0u);
      EXPECT_EQ(o.syscalls, 0u);
    }
  }
  EXPECT_EQ(allocated_bytes(m.fd()), before);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, m.size()), m.size());
}

TEST(Discard, MisalignedPrivateAnonRangeIsSkippedWhole) {
  PrivateAnon m(1 * kMiB);
  const auto o = SyscallDiscarder().discard(anon_target(m, 100, 8 * kPage), Method::MadvDontneed);
  EXPECT_EQ(o.skip, SkipReason::Misaligned);
  EXPECT_EQ(o.skipped_bytes, 8 * kPage);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, m.size()), m.size());
}

TEST(Discard, OnePageInTheMiddleTouchesNoNeighbourByte) {
  SharedMemfd m(16 * kPage);
  const auto o = SyscallDiscarder().discard(shmem_target(m, 7 * kPage, kPage), Method::PunchHole);
  EXPECT_EQ(o.discarded_bytes, kPage);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 0, 7 * kPage), 7 * kPage);
  EXPECT_EQ(first_nonzero(m.data(), 7 * kPage, 8 * kPage), 8 * kPage);
  EXPECT_EQ(first_pattern_mismatch(m.data(), 8 * kPage, m.size()), m.size());
}

TEST(Discard, SyscallErrorIsReportedAsFailedWithErrno) {
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  DiscardTarget t;
  t.fd = p[1];  // the write end: fallocate(2) on a pipe is ESPIPE
  t.length = kPage;
  const auto o = SyscallDiscarder().discard(t, Method::PunchHole);
  close(p[0]);
  close(p[1]);
  EXPECT_EQ(o.skip, SkipReason::Failed);
  EXPECT_EQ(o.error, ESPIPE);
  EXPECT_EQ(o.skipped_bytes, kPage);
  EXPECT_EQ(o.discarded_bytes, 0u);
  EXPECT_EQ(o.syscalls, 1u);  // not retried: only EINTR/EAGAIN are
}

TEST(Discard, OverflowingRangeIsInvalidWithoutSyscall) {
  DiscardTarget t;
  t.fd = 0;
  t.fd_offset = ~0ull - kPage + 1;
  t.length = 2 * kPage;
  const auto o = SyscallDiscarder().discard(t, Method::PunchHole);
  EXPECT_EQ(o.skip, SkipReason::Invalid);
  EXPECT_EQ(o.syscalls, 0u);
}

TEST(Discard, EmptyRangeDoesNothing) {
  DiscardTarget t;
  t.fd = 0;
  const auto o = SyscallDiscarder().discard(t, Method::PunchHole);
  EXPECT_EQ(o.discarded_bytes, 0u);
  EXPECT_EQ(o.skipped_bytes, 0u);
  EXPECT_EQ(o.syscalls, 0u);
}

TEST(Discard, AllocatedBytesOfBadFdIsMinusOne) { EXPECT_EQ(allocated_bytes(-1), -1); }

TEST(Discard, MethodFor) {
  EXPECT_EQ(method_for(Backing::Shmem, false), Method::PunchHole);
  EXPECT_EQ(method_for(Backing::Shmem, true), Method::PunchHole);
  EXPECT_EQ(method_for(Backing::Shmem, true, true), Method::MadvRemove);
  EXPECT_EQ(method_for(Backing::Hugetlb, true), Method::PunchHole);
  EXPECT_EQ(method_for(Backing::Hugetlb, false, true), Method::PunchHole);
  EXPECT_EQ(method_for(Backing::PrivateAnon, false), Method::MadvDontneed);
  EXPECT_EQ(method_for(Backing::PrivateAnon, true), Method::MadvFree);
  EXPECT_EQ(method_for(Backing::PrivateAnon, true, true), Method::MadvFree);
}

TEST(Discard, ToStringNamesEveryValue) {
  EXPECT_EQ(to_string(Backing::Hugetlb), "hugetlb");
  EXPECT_EQ(to_string(Method::MadvDontneed), "madv_dontneed");
  EXPECT_EQ(to_string(SkipReason::Misaligned), "misaligned");
  for (int i = 0; i <= static_cast<int>(SkipReason::Cancelled); ++i) {
    EXPECT_NE(to_string(static_cast<SkipReason>(i)), "unknown") << i;
  }
  for (int i = 0; i <= static_cast<int>(Method::MadvFree); ++i) {
    EXPECT_NE(to_string(static_cast<Method>(i)), "unknown") << i;
  }
}

// Reserves huge pages for the test through /proc/sys/vm/nr_hugepages and gives
// them back afterwards.
class HugetlbDiscard : public ::testing::Test {
 protected:
  static constexpr const char* kKnob = "/proc/sys/vm/nr_hugepages";

  static bool read_knob(long* v) {
    std::ifstream in(kKnob);
    return static_cast<bool>(in >> *v);
  }
  static bool write_knob(long v) {
    std::ofstream out(kKnob);
    out << v << "\n";
    out.flush();
    return static_cast<bool>(out);
  }
  static long free_huge_pages() {
    std::ifstream in("/proc/meminfo");
    std::string key;
    long v = 0;
    while (in >> key) {
      if (key == "HugePages_Free:") {
        in >> v;
        return v;
      }
      in.ignore(1 << 10, '\n');
    }
    return 0;
  }
  static uint64_t huge_page_size() {
    std::ifstream in("/proc/meminfo");
    std::string key;
    uint64_t kb = 0;
    while (in >> key) {
      if (key == "Hugepagesize:") {
        in >> kb;
        return kb * 1024;
      }
      in.ignore(1 << 10, '\n');
    }
    return 2 * kMiB;
  }

  void SetUp() override {
    // ctest runs test cases as parallel processes: serialize the
    // read-modify-restore of the system-wide knob, or two runs would restore
    // each other's values and leak huge pages.
    lock_.reset(open("/tmp/fph-test-nr_hugepages.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!lock_ || flock(lock_.get(), LOCK_EX) != 0) GTEST_SKIP() << "cannot take the hugetlb lock";
    if (!read_knob(&saved_)) GTEST_SKIP() << "cannot read " << kKnob;
    have_saved_ = true;
    if (free_huge_pages() < kNeeded) {
      if (!write_knob(saved_ + kNeeded)) GTEST_SKIP() << "cannot write " << kKnob;
      changed_ = true;
    }
    if (free_huge_pages() < kNeeded) {
      GTEST_SKIP() << "could not reserve " << kNeeded << " huge pages (HugePages_Free="
                   << free_huge_pages() << ")";
    }
    hp_ = huge_page_size();
  }
  void TearDown() override {
    if (changed_ && have_saved_) write_knob(saved_);
    lock_.reset();  // closing the fd releases the flock
  }

  static constexpr long kNeeded = 2;
  UniqueFd lock_;
  long saved_ = 0;
  bool have_saved_ = false;
  bool changed_ = false;
  uint64_t hp_ = 0;
};

TEST_F(HugetlbDiscard, PartialHugePagesRoundInward) {
  // Scope the memfd so its pages are back in the pool before TearDown shrinks it.
  {
    SharedMemfd m(2 * hp_, MFD_HUGETLB, "fph-test-huge");
    const int64_t before = allocated_bytes(m.fd());
    ASSERT_EQ(before, static_cast<int64_t>(2 * hp_));

    DiscardTarget t;
    t.fd = m.fd();
    t.addr = m.data();
    t.backing = Backing::Hugetlb;
    t.page_size = hp_;
    SyscallDiscarder d;

    // Less than one whole huge page, straddling the boundary: nothing to do.
    t.fd_offset = hp_ / 2;
    t.length = hp_;
    auto o = d.discard(t, Method::PunchHole);
    EXPECT_EQ(o.skip, SkipReason::Misaligned);
    EXPECT_EQ(o.discarded_bytes, 0u);
    EXPECT_EQ(o.skipped_bytes, hp_);
    EXPECT_EQ(o.syscalls, 0u);
    EXPECT_EQ(allocated_bytes(m.fd()), before);
    EXPECT_EQ(first_pattern_mismatch(m.data(), 0, m.size()), m.size());

    // Half of page 0 and all of page 1: page 1 goes, page 0 stays intact.
    t.fd_offset = hp_ / 2;
    t.length = hp_ + hp_ / 2;
    o = d.discard(t, Method::PunchHole);
    EXPECT_EQ(o.discarded_bytes, hp_);
    EXPECT_EQ(o.skipped_bytes, hp_ / 2);
    EXPECT_EQ(o.skip, SkipReason::Misaligned);
    EXPECT_EQ(o.syscalls, 1u);
    EXPECT_EQ(allocated_bytes(m.fd()), before - static_cast<int64_t>(hp_));
    EXPECT_EQ(first_pattern_mismatch(m.data(), 0, hp_), hp_);
    EXPECT_EQ(first_nonzero(m.data(), hp_, 2 * hp_), 2 * hp_);
  }
}

TEST_F(HugetlbDiscard, WholeHugePagesViaMadvRemove) {
  {
    SharedMemfd m(2 * hp_, MFD_HUGETLB, "fph-test-huge");
    DiscardTarget t;
    t.fd = -1;
    t.addr = m.data();
    t.length = hp_;
    t.backing = Backing::Hugetlb;
    t.page_size = hp_;
    const auto o = SyscallDiscarder().discard(t, Method::MadvRemove);
    EXPECT_EQ(o.discarded_bytes, hp_);
    EXPECT_EQ(o.skip, SkipReason::None);
    EXPECT_EQ(allocated_bytes(m.fd()), static_cast<int64_t>(hp_));
    EXPECT_EQ(first_pattern_mismatch(m.data(), hp_, 2 * hp_), 2 * hp_);
  }
}

}  // namespace
}  // namespace fph::reclaim
