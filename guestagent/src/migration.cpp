#include "fph/guest/migration.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <span>
#include <thread>
#include <cerrno>
#include <cstring>
#include <vector>

#include "fph/common/log.h"
#include "fph/guest/dirty_log.h"

namespace fph::guest {

using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kPage = 4096;  // the dirty log's and the tracker's granule

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

std::string errno_text(const char* what) {
  return fmt::format("{}: {}", what, std::strerror(errno));
}

// A set of guest pages, numbered from the start of guest RAM.
class PageSet {
 public:
  explicit PageSet(uint64_t pages) : words_((pages + 63) / 64, 0), pages_(pages) {}
  void set(uint64_t p) { words_[p / 64] |= uint64_t{1} << (p % 64); }
  bool test(uint64_t p) const { return words_[p / 64] >> (p % 64) & 1; }
  void merge(const PageSet& o) {
    for (size_t i = 0; i < words_.size(); ++i) words_[i] |= o.words_[i];
  }
  uint64_t count() const {
    uint64_t n = 0;
    for (uint64_t w : words_) n += static_cast<uint64_t>(std::popcount(w));
    return n;
  }
  template <class F>
  void for_each(F&& f) const {
    for (size_t i = 0; i < words_.size(); ++i)
      for (uint64_t w = words_[i]; w; w &= w - 1) f(i * 64 + static_cast<uint64_t>(std::countr_zero(w)));
  }
  uint64_t size() const { return pages_; }

 private:
  std::vector<uint64_t> words_;
  uint64_t pages_;
};

// --- the kernel's dirty tracking of the guest's own writes ---------------
//
// linux/userfaultfd.h and linux/fs.h of Debian 12 predate these (6.7).
constexpr uint64_t kUffdFeatureWpHugetlbfsShmem = 1u << 12;
constexpr uint64_t kUffdFeatureWpUnpopulated = 1u << 13;
constexpr uint64_t kUffdFeatureWpAsync = 1u << 15;
constexpr uint64_t kPageIsWritten = 1u << 1;
constexpr uint64_t kPmScanWpMatching = 1u << 0;
constexpr uint64_t kPmScanCheckWpasync = 1u << 1;
struct PageRegion {
  uint64_t start, end, categories;
};
struct PmScanArg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted,
      category_mask, category_anyof_mask, return_mask;
};
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);

// Write-protects guest RAM with a userfaultfd in async mode: the first write
// to a page after protection is let through by the kernel and the page is
// marked written; PAGEMAP_SCAN lists the written pages and protects them
// again, atomically. Writes through other mappings (the back end's) are not
// seen here: the back end's own dirty log covers those.
class GuestDirtyTracker {
 public:
  static Expected<GuestDirtyTracker, std::string> start(const GuestMemory& mem) {
    GuestDirtyTracker t;
    t.mem_ = &mem;
    t.uffd_.reset(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
    if (!t.uffd_) return Unexpected<std::string>{errno_text("userfaultfd")};
    uffdio_api api{};
    api.api = UFFD_API;
    // WP_HUGETLBFS_SHMEM: guest RAM is a memfd (shmem or hugetlbfs), not
    // anonymous memory; WP_UNPOPULATED: a page first written after the
    // protection (a hole, or one the back end punched) counts as written.
    api.features = kUffdFeatureWpAsync | kUffdFeatureWpUnpopulated | kUffdFeatureWpHugetlbfsShmem;
    if (::ioctl(t.uffd_.get(), UFFDIO_API, &api) != 0)
      return Unexpected<std::string>{errno_text(
          "UFFDIO_API(WP_ASYNC|WP_UNPOPULATED|WP_HUGETLBFS_SHMEM) (needs Linux 6.7)")};
    t.pagemap_.reset(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    if (!t.pagemap_) return Unexpected<std::string>{errno_text("open /proc/self/pagemap")};
    for (const auto& r : mem.regions()) {
      uffdio_register reg{};
      reg.range.start = reinterpret_cast<uint64_t>(r.host);
      reg.range.len = r.size;
      reg.mode = UFFDIO_REGISTER_MODE_WP;
      if (::ioctl(t.uffd_.get(), UFFDIO_REGISTER, &reg) != 0)
        return Unexpected<std::string>{errno_text("UFFDIO_REGISTER(WP)")};
      uffdio_writeprotect wp{};
      wp.range = reg.range;
      wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
      if (::ioctl(t.uffd_.get(), UFFDIO_WRITEPROTECT, &wp) != 0)
        return Unexpected<std::string>{errno_text("UFFDIO_WRITEPROTECT")};
    }
    return t;
  }

  // Pages written since the last call (or start), protected again.
  Expected<void, std::string> collect(PageSet& out) {
    std::vector<PageRegion> vec(512);
    for (const auto& r : mem_->regions()) {
      const uint64_t base = reinterpret_cast<uint64_t>(r.host);
      const uint64_t first_page = (r.gpa - mem_->gpa_base()) / kPage;
      uint64_t at = base;
      while (at < base + r.size) {
        PmScanArg a{};
        a.size = sizeof a;
        a.flags = kPmScanWpMatching | kPmScanCheckWpasync;
        a.start = at;
        a.end = base + r.size;
        a.vec = reinterpret_cast<uint64_t>(vec.data());
        a.vec_len = vec.size();
        a.category_mask = kPageIsWritten;
        a.return_mask = kPageIsWritten;
        const int n = ::ioctl(pagemap_.get(), kPagemapScan, &a);
        if (n < 0) return Unexpected<std::string>{errno_text("PAGEMAP_SCAN")};
        for (int i = 0; i < n; ++i)
          for (uint64_t p = vec[static_cast<size_t>(i)].start; p < vec[static_cast<size_t>(i)].end;
               p += kPage)
            out.set(first_page + (p - base) / kPage);
        if (a.walk_end <= at) return Unexpected<std::string>{"PAGEMAP_SCAN made no progress"};
        at = a.walk_end;
      }
    }
    return {};
  }

 private:
  const GuestMemory* mem_ = nullptr;
  UniqueFd uffd_;
  UniqueFd pagemap_;
};

// The back end's dirty log, as pages of guest RAM (dirty_log.h).
void take_device_log(DirtyLogBitmap& log, const GuestMemory& mem, PageSet& out) {
  const uint64_t first_gfn = mem.gpa_base() / kPage;
  const uint64_t pages = mem.size() / kPage;
  log.take([&](uint64_t gfn) {
    if (gfn >= first_gfn && gfn - first_gfn < pages) out.set(gfn - first_gfn);
  });
}

// --- RAM transfer ---------------------------------------------------------
//
// Reads the source with pread (a hole reads as zeros without being
// populated, so the copy does not undo the source's reclaim) and writes the
// twin through its mapping (hugetlbfs has no write(2)).
class RamCopier {
 public:
  RamCopier(const GuestMemory& src, GuestMemory& dst, MigrationReport& rep)
      : src_(src), dst_(dst), rep_(rep), populated_(src.size() / kPage) {}

  Expected<void, std::string> copy_all() {
    PageSet all(populated_.size());
    for (uint64_t p = 0; p < all.size(); ++p) all.set(p);
    return copy(all);
  }

  Expected<void, std::string> copy(const PageSet& pages) {
    std::vector<uint8_t> buf(kPage);
    Expected<void, std::string> result;
    pages.for_each([&](uint64_t p) {
      if (!result) return;
      if (auto r = read_source(p, buf.data()); !r) {
        result = r;
        return;
      }
      uint8_t* to = dst_.frame_ptr(p);
      if (is_zero(buf.data())) {
        if (!populated_.test(p)) {
          rep_.zero_pages_skipped++;
          return;
        }
        std::memset(to, 0, kPage);
        rep_.zero_pages_written++;
      } else {
        std::memcpy(to, buf.data(), kPage);
        populated_.set(p);
      }
      rep_.pages_copied++;
    });
    return result;
  }

  // Pages whose twin copy differs from the source (both read with pread).
  Expected<uint64_t, std::string> compare_all() {
    constexpr uint64_t kChunk = 256;  // pages per read
    std::vector<uint8_t> a(kChunk * kPage), b(kChunk * kPage);
    uint64_t mismatched = 0;
    for (size_t ri = 0; ri < src_.regions().size(); ++ri) {
      const MemRegion& s = src_.regions()[ri];
      const MemRegion& d = dst_.regions()[ri];
      for (uint64_t off = 0; off < s.size; off += kChunk * kPage) {
        const uint64_t len = std::min(kChunk * kPage, s.size - off);
        if (!read_full(s.fd.get(), a.data(), len, s.mmap_offset + off) ||
            !read_full(d.fd.get(), b.data(), len, d.mmap_offset + off))
          return Unexpected<std::string>{errno_text("pread(guest ram)")};
        for (uint64_t p = 0; p < len; p += kPage) {
          if (std::memcmp(a.data() + p, b.data() + p, kPage) == 0) continue;
          if (mismatched++ < 8)
            log::error("migration", "MISMATCH: page at gpa {:#x} differs on the destination",
                       s.gpa + off + p);
        }
      }
    }
    return mismatched;
  }

 private:
  static bool is_zero(const uint8_t* p) {
    const auto* w = reinterpret_cast<const uint64_t*>(p);
    for (size_t i = 0; i < kPage / 8; ++i)
      if (w[i]) return false;
    return true;
  }
  static bool read_full(int fd, uint8_t* to, uint64_t len, uint64_t off) {
    while (len > 0) {
      const ssize_t n = ::pread(fd, to, len, static_cast<off_t>(off));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      to += n;
      len -= static_cast<uint64_t>(n);
      off += static_cast<uint64_t>(n);
    }
    return true;
  }
  Expected<void, std::string> read_source(uint64_t page, uint8_t* to) const {
    const uint64_t region_pages = src_.regions()[0].size / kPage;
    const MemRegion& r = src_.regions()[page / region_pages];
    const uint64_t off = r.mmap_offset + (page % region_pages) * kPage;
    if (!read_full(r.fd.get(), to, kPage, off))
      return Unexpected<std::string>{errno_text("pread(source ram)")};
    return {};
  }

  const GuestMemory& src_;
  GuestMemory& dst_;
  MigrationReport& rep_;
  PageSet populated_;  // twin pages we have written
};

// SAVE: reads the blob the back end writes into our pipe, to EOF, bounded
// in size and time (a back end that never closes must not hang the VM).
Expected<std::vector<uint8_t>, std::string> read_blob(int fd) {
  constexpr size_t kMaxBlob = 1 << 20;
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  std::vector<uint8_t> blob;
  uint8_t buf[4096];
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return Unexpected<std::string>{"SAVE: no EOF from the source within 10 s"};
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) return Unexpected<std::string>{errno_text("SAVE: read")};
    if (n == 0) return blob;
    blob.insert(blob.end(), buf, buf + n);
    if (blob.size() > kMaxBlob) return Unexpected<std::string>{"SAVE: blob larger than 1 MiB"};
  }
}

Expected<void, std::string> write_blob(int fd, std::span<const uint8_t> blob) {
  size_t done = 0;
  while (done < blob.size()) {
    const ssize_t n = ::write(fd, blob.data() + done, blob.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Unexpected<std::string>{errno_text("LOAD: write")};
    done += static_cast<size_t>(n);
  }
  return {};
}

struct Pipe {
  UniqueFd r, w;
  static Expected<Pipe, std::string> make() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return Unexpected<std::string>{errno_text("pipe2")};
    Pipe p;
    p.r.reset(fds[0]);
    p.w.reset(fds[1]);
    return p;
  }
};

FeResult<void> fe_fail(std::string msg) {
  return Unexpected<FrontendError>{FrontendError{FrontendErrc::Setup, std::move(msg)}};
}

}  // namespace

MigrationReport migrate(GuestMemory& mem, BalloonDriver& driver, VcpuGate& vcpus,
                        const FrontendOptions& frontend, const MigrationOptions& o,
                        const std::atomic<bool>& cancel) {
  MigrationReport rep;
  auto fail = [&](std::string why) {
    rep.ok = false;
    rep.error = std::move(why);
    log::error("migration", "failed: {}", rep.error);
    return rep;
  };
  const auto started = Clock::now();

  // 1. The destination: twin RAM and a connection without rings.
  auto twin = GuestMemory::create(mem.options());
  if (!twin) return fail("destination RAM: " + twin.error());
  (*twin)->announce_addresses_of(mem);
  auto sock = connect_unix(o.destination, o.connect_timeout, &cancel);
  if (!sock) return fail("connect to the destination: " + sock.error().message);
  auto dst = std::make_unique<Frontend>(std::move(*sock), o.destination_reply_timeout);
  auto dneg = dst->negotiate(**twin, frontend);
  if (!dneg) return fail("destination setup: " + dneg.error().message);

  // 2. Logging on the source; the source's negotiation must match.
  auto log = DirtyLogBitmap::create(mem.gpa_base() + mem.size());
  if (!log) return fail(log.error());
  bool logging = false;
  auto on = driver.run_on_driver([&](BalloonDriver::Device& dev) -> FeResult<void> {
    const Negotiated& n = dev.frontend().negotiated();
    if (!n.migratable())
      return fe_fail(fmt::format("the source back end cannot migrate (LOG_ALL offered: {}, "
                                 "protocol {:#x})", (n.device_features & proto::vu::feature::kLogAll) != 0,
                                 n.protocol));
    if (!dneg->migratable()) return fe_fail("the destination back end cannot migrate");
    if (dneg->features != n.features)
      return fe_fail(fmt::format("destination negotiated features {:#x}, the source {:#x}",
                                 dneg->features, n.features));
    if (auto r = dev.frontend().set_log_base(log->fd(), log->bytes()); !r) return r;
    const auto areas = dev.rings();
    if (auto r = dev.frontend().set_logging(true, areas, mem); !r) return r;
    logging = true;
    return {};
  });
  auto logging_off = [&] {
    if (!logging) return;
    (void)driver.run_on_driver([&](BalloonDriver::Device& dev) -> FeResult<void> {
      return dev.frontend().set_logging(false, dev.rings(), mem);
    });
  };
  if (!on) {
    logging_off();
    return fail("source: " + on.error().message);
  }
  log::info("migration", "to {}: logging on ({} byte log), precopy starts", o.destination,
            log->bytes());

  // 3. Precopy.
  auto tracker = GuestDirtyTracker::start(mem);
  if (!tracker) {
    logging_off();
    return fail(tracker.error());
  }
  RamCopier copier(mem, **twin, rep);
  if (auto r = copier.copy_all(); !r) {
    logging_off();
    return fail(r.error());
  }
  const uint64_t pages = mem.size() / kPage;
  for (;;) {
    if (cancel.load()) {
      logging_off();
      rep.rolled_back = true;
      return fail("cancelled during precopy");
    }
    // The destination says nothing until the stop; readable now means it
    // closed the connection (or sent something unasked): give up early,
    // as a VMM does when the migration stream breaks.
    if (pollfd p{dst->fd(), POLLIN, 0}; ::poll(&p, 1, 0) > 0) {
      logging_off();
      rep.rolled_back = true;
      return fail("the destination closed the connection during precopy");
    }
    PageSet guest(pages), device(pages);
    if (auto r = tracker->collect(guest); !r) {
      logging_off();
      return fail(r.error());
    }
    take_device_log(*log, mem, device);
    rep.guest_dirty_pages += guest.count();
    rep.device_dirty_pages += device.count();
    if (!o.ignore_device_log) guest.merge(device);
    const uint64_t dirty = guest.count();
    if (auto r = copier.copy(guest); !r) {
      logging_off();
      return fail(r.error());
    }
    rep.passes++;
    const bool long_enough = Clock::now() - started >= o.min_precopy;
    if (long_enough && (dirty <= o.converge_pages || rep.passes >= o.max_passes)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  rep.precopy_ms = ms_since(started);

  // 4. + 5. Stop and copy, transfer the device state, switch.
  vcpus.pause();
  const auto stopped = Clock::now();
  bool switched = false;
  auto r = driver.run_on_driver([&](BalloonDriver::Device& dev) -> FeResult<void> {
    const auto t_drain = Clock::now();
    auto bases = dev.stop_rings();
    if (!bases) return Unexpected<FrontendError>{bases.error()};
    rep.drain_ms = ms_since(t_drain);
    // From here on, any failure restarts the source where it stopped.
    auto resume_source = [&](std::string why) -> FeResult<void> {
      if (auto s = dev.start_rings(dev.frontend(), *bases); !s)
        why += "; restarting the source rings failed too: " + s.error().message;
      else if (auto l = dev.frontend().set_logging(false, dev.rings(), mem); !l)
        why += "; turning logging off failed: " + l.error().message;
      rep.rolled_back = true;
      return fe_fail(std::move(why));
    };
    PageSet last(pages), device(pages);
    if (auto c = tracker->collect(last); !c) return resume_source(c.error());
    take_device_log(*log, mem, device);
    rep.device_dirty_pages += device.count();
    if (!o.ignore_device_log) last.merge(device);
    rep.final_dirty_pages = last.count();
    if (auto c = copier.copy(last); !c) return resume_source(c.error());
    // The test's check, not a VMM's work: timed apart from the downtime.
    const auto t_compare = Clock::now();
    auto mism = copier.compare_all();
    if (!mism) return resume_source(mism.error());
    rep.mismatched_pages = *mism;
    rep.compare_ms = ms_since(t_compare);

    const auto t_save = Clock::now();
    auto sp = Pipe::make();
    if (!sp) return resume_source(sp.error());
    if (auto s = dev.frontend().set_device_state_fd(false, sp->w.get()); !s)
      return resume_source("SAVE: " + s.error().message);
    sp->w.reset();
    auto blob = read_blob(sp->r.get());
    auto saved = dev.frontend().check_device_state();
    if (!saved) return resume_source("SAVE: CHECK_DEVICE_STATE: " + saved.error().message);
    if (!blob) return resume_source(blob.error());
    if (*saved != 0) return resume_source("SAVE: the source reports failure (CHECK_DEVICE_STATE 1)");
    rep.save_ms = ms_since(t_save);
    rep.blob_bytes = blob->size();

    const auto t_load = Clock::now();
    auto lp = Pipe::make();
    if (!lp) return resume_source(lp.error());
    if (auto s = dst->set_device_state_fd(true, lp->r.get()); !s)
      return resume_source("LOAD: " + s.error().message);
    lp->r.reset();
    if (auto w = write_blob(lp->w.get(), *blob); !w) return resume_source(w.error());
    lp->w.reset();
    auto loaded = dst->check_device_state();
    if (!loaded) return resume_source("LOAD: CHECK_DEVICE_STATE: " + loaded.error().message);
    if (*loaded != 0)
      return resume_source("LOAD: the destination refused the state (CHECK_DEVICE_STATE 1)");
    rep.load_ms = ms_since(t_load);

    rep.source_backing_bytes = mem.backing_bytes();
    rep.destination_backing_bytes = (*twin)->backing_bytes();
    if (auto a = mem.adopt_backing(**twin); !a) return resume_source(a.error());
    switched = true;
    // Past the switch there is no way back: the guest's RAM is the twin.
    if (auto s = dev.start_rings(*dst, *bases); !s) return s;
    const std::string path = o.destination;
    const auto timeout = o.connect_timeout;
    dev.switch_to(std::move(dst), [path, timeout](const std::atomic<bool>* c) {
      return connect_unix(path, timeout, c);
    });
    return {};
  });
  vcpus.resume();
  rep.downtime_ms = ms_since(stopped) - rep.compare_ms;
  if (!r) {
    if (switched) return fail("destination rings: " + r.error().message);
    logging = false;  // resume_source turned it off (or the driver is gone)
    return fail(r.error().message);
  }
  rep.ok = true;
  log::info("migration", "done: {} precopy passes, {} pages copied, {} dirty at the stop, {} "
            "mismatched, downtime {:.1f} ms (drain {:.1f}, save {:.1f}, load {:.1f}), blob {} B",
            rep.passes, rep.pages_copied, rep.final_dirty_pages, rep.mismatched_pages,
            rep.downtime_ms, rep.drain_ms, rep.save_ms, rep.load_ms, rep.blob_bytes);
  return rep;
}

}  // namespace fph::guest
