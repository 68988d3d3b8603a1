#include "fph/guest/guest_memory.h"

#include <fcntl.h>
#include <numaif.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "fph/common/checked.h"
#include "fph/common/log.h"

namespace fph::guest {
namespace {

constexpr uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// HugePages_Free and Hugepagesize from /proc/meminfo (0 if unknown).
void hugetlb_info(uint64_t* free_pages, uint64_t* page_bytes) {
  *free_pages = 0;
  *page_bytes = 0;
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("HugePages_Free:", 0) == 0) {
      *free_pages = std::strtoull(line.c_str() + 15, nullptr, 10);
    } else if (line.rfind("Hugepagesize:", 0) == 0) {
      *page_bytes = std::strtoull(line.c_str() + 13, nullptr, 10) * 1024;
    }
  }
}

// MPOL_BIND of [p, p+len) to host node `node` (--numa-node).
Expected<void, std::string> bind_to_node(void* p, uint64_t len, int node) {
  if (node < 0 || node >= 1024) return unexpected(std::string("--numa-node out of range"));
  unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {};
  mask[node / (8 * sizeof(unsigned long))] |= 1ul << (node % (8 * sizeof(unsigned long)));
  if (mbind(p, len, MPOL_BIND, mask, 1024, 0) != 0)
    return unexpected(fmt::format("mbind(MPOL_BIND, node {}): {}", node, std::strerror(errno)));
  return {};
}

}  // namespace

std::vector<RingArea> layout_rings(uint64_t gpa_base, const std::vector<uint16_t>& sizes,
                                   uint64_t* reserved_bytes) {
  std::vector<RingArea> out;
  uint64_t off = 0;
  for (uint16_t num : sizes) {
    RingArea r;
    r.num = num;
    // Slots are page aligned, which satisfies the 16-byte descriptor table
    // alignment; avail follows the table (2-aligned: 16*num is even) and
    // used is rounded up to 4 (virtio 1.2 section 2.7, table of alignments).
    r.desc_gpa = gpa_base + off;
    r.avail_gpa = r.desc_gpa + proto::vq::desc_table_bytes(num);
    r.used_gpa = round_up(r.avail_gpa + proto::vq::avail_ring_bytes(num), proto::vq::kUsedAlign);
    const uint64_t end = r.used_gpa + proto::vq::used_ring_bytes(num);
    off = round_up(end - gpa_base, kFrameSize);
    out.push_back(r);
  }
  *reserved_bytes = off;
  return out;
}

Expected<std::unique_ptr<GuestMemory>, std::string> GuestMemory::create(
    const GuestMemoryOptions& o) {
  if (o.regions == 0 || o.regions > 64) return unexpected(std::string("--regions must be 1..64"));
  if (!is_aligned(o.gpa_base, kRegionAlign))
    return unexpected(std::string("--gpa-base must be a multiple of 4 MiB"));
  if (o.bytes == 0) return unexpected(std::string("--memory must be > 0"));
  const uint64_t region_size = round_up((o.bytes + o.regions - 1) / o.regions, kRegionAlign);
  const auto total = checked_mul(region_size, o.regions);
  if (!total || !checked_add(o.gpa_base, *total))
    return unexpected(std::string("guest memory size overflows"));

  uint64_t hp_size = 0;
  if (o.hugetlb) {
    uint64_t hp_free = 0;
    hugetlb_info(&hp_free, &hp_size);
    if (hp_size == 0) hp_size = 2ull << 20;
    const uint64_t need = (*total + o.mmap_offset * o.regions) / hp_size;
    if (hp_free == 0) {
      return unexpected(std::string(
          "--hugetlb: no huge pages are reserved (HugePages_Free is 0); reserve them first, "
          "e.g. echo N > /proc/sys/vm/nr_hugepages (as root)"));
    }
    if (hp_free < need) {
      return unexpected(fmt::format(
          "--hugetlb: {} huge pages of {} KiB needed, only {} free in /proc/meminfo", need,
          hp_size / 1024, hp_free));
    }
    if (region_size % hp_size != 0)
      return unexpected(fmt::format("region size is not a multiple of the huge page size {}",
                                    hp_size));
  }
  const uint64_t off_align = o.hugetlb ? hp_size : kFrameSize;
  if (!is_aligned(o.mmap_offset, off_align))
    return unexpected(fmt::format("--mmap-offset must be a multiple of {}", off_align));

  std::unique_ptr<GuestMemory> m(new GuestMemory());
  m->gpa_base_ = o.gpa_base;
  m->total_ = *total;
  m->region_size_ = region_size;
  m->hugetlb_ = o.hugetlb;
  m->options_ = o;

  uint64_t reserved_bytes = 0;
  m->rings_ = layout_rings(o.gpa_base, o.ring_sizes, &reserved_bytes);
  m->reserved_frames_ = reserved_bytes / kFrameSize;
  if (reserved_bytes >= region_size)
    return unexpected(std::string("ring area does not fit in the first region"));

  m->private_anon_ = o.private_anon;
  if (o.private_anon && (o.hugetlb || o.mmap_offset))
    return unexpected(std::string("private anonymous RAM takes no --hugetlb or --mmap-offset"));
  for (uint32_t i = 0; i < o.regions; ++i) {
    if (o.private_anon) {
      void* p = mmap(nullptr, region_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) return unexpected(errno_text("mmap(private anonymous guest ram)"));
      MemRegion r;
      r.gpa = o.gpa_base + i * region_size;
      r.size = region_size;
      r.host = static_cast<uint8_t*>(p);
      m->regions_.push_back(std::move(r));
      if (o.numa_node)
        if (auto b = bind_to_node(p, region_size, *o.numa_node); !b) return unexpected(b.error());
      continue;
    }
    const unsigned flags = MFD_CLOEXEC | (o.hugetlb ? MFD_HUGETLB : 0u);
    UniqueFd fd(memfd_create("fph-guest-ram", flags));
    if (!fd) return unexpected(errno_text("memfd_create(fph-guest-ram)"));
    const uint64_t file_size = region_size + o.mmap_offset;
    if (ftruncate(fd.get(), static_cast<off_t>(file_size)) != 0)
      return unexpected(errno_text("ftruncate(guest ram memfd)"));
    void* p = mmap(nullptr, region_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(),
                   static_cast<off_t>(o.mmap_offset));
    if (p == MAP_FAILED) {
      if (o.hugetlb && errno == ENOMEM)
        return unexpected(std::string("mmap of hugetlb memfd failed (ENOMEM): not enough "
                                      "huge pages reserved in /proc/sys/vm/nr_hugepages"));
      return unexpected(errno_text("mmap(guest ram)"));
    }
    MemRegion r;
    r.gpa = o.gpa_base + i * region_size;
    r.size = region_size;
    r.host = static_cast<uint8_t*>(p);
    r.mmap_offset = o.mmap_offset;
    r.fd = std::move(fd);
    m->regions_.push_back(std::move(r));
    // Bind before first touch: on a shared mapping mbind sets the shmem
    // object's policy, so pages faulted later (by us or by the back end)
    // come from that node.
    if (o.numa_node)
      if (auto b = bind_to_node(p, region_size, *o.numa_node); !b) return unexpected(b.error());
  }
  log::info("mem", "guest RAM {} MiB in {} {} region(s) of {} MiB at gpa {:#x}{}{}",
            m->total_ >> 20, o.regions, o.private_anon ? "private anonymous" : "memfd",
            region_size >> 20, o.gpa_base,
            o.hugetlb ? ", hugetlb" : "",
            o.numa_node ? fmt::format(", bound to node {}", *o.numa_node) : std::string());
  return m;
}

GuestMemory::~GuestMemory() {
  for (auto& r : regions_)
    if (r.host) munmap(r.host, r.size);
}

Expected<void, std::string> GuestMemory::adopt_backing(GuestMemory& twin) {
  if (private_anon_ || twin.private_anon_ || twin.regions_.size() != regions_.size() ||
      twin.total_ != total_ || twin.gpa_base_ != gpa_base_)
    return unexpected(std::string("the destination RAM does not have the source's layout"));
  for (size_t i = 0; i < regions_.size(); ++i) {
    MemRegion& r = regions_[i];
    MemRegion& t = twin.regions_[i];
    if (t.size != r.size || !t.fd)
      return unexpected(fmt::format("region {}: destination size {} differs", i, t.size));
    // Replaces the old mapping atomically: no thread can see a hole here.
    void* p = mmap(r.host, r.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, t.fd.get(),
                   static_cast<off_t>(t.mmap_offset));
    if (p == MAP_FAILED) return unexpected(errno_text("mmap(MAP_FIXED, destination ram)"));
    munmap(t.host, t.size);
    t.host = nullptr;
    r.fd = std::move(t.fd);
    r.mmap_offset = t.mmap_offset;
    r.user_addr = 0;
  }
  twin.regions_.clear();
  return {};
}

void GuestMemory::announce_addresses_of(const GuestMemory& other) {
  for (size_t i = 0; i < regions_.size() && i < other.regions_.size(); ++i)
    regions_[i].user_addr = reinterpret_cast<uint64_t>(other.regions_[i].host);
}

uint8_t* GuestMemory::translate(uint64_t gpa, uint64_t len) const {
  if (gpa < gpa_base_ || region_size_ == 0) return nullptr;
  const uint64_t idx = (gpa - gpa_base_) / region_size_;
  if (idx >= regions_.size()) return nullptr;
  const auto& r = regions_[idx];
  if (!range_within(gpa, len, r.gpa, r.size)) return nullptr;
  return r.host + (gpa - r.gpa);
}

uint8_t* GuestMemory::frame_ptr(uint64_t frame) const {
  const uint64_t per_region = region_size_ / kFrameSize;
  const uint64_t idx = frame / per_region;
  if (idx >= regions_.size()) return nullptr;
  return regions_[idx].host + (frame % per_region) * kFrameSize;
}

uint64_t GuestMemory::backing_bytes() const {
  uint64_t sum = 0;
  if (private_anon_) {
    const long page = sysconf(_SC_PAGESIZE);
    for (const auto& r : regions_) {
      std::vector<unsigned char> vec((r.size + page - 1) / page);
      if (mincore(r.host, r.size, vec.data()) != 0) continue;
      for (unsigned char v : vec) sum += (v & 1) ? static_cast<uint64_t>(page) : 0;
    }
    return sum;
  }
  for (const auto& r : regions_) {
    struct stat st {};
    if (fstat(r.fd.get(), &st) == 0) sum += static_cast<uint64_t>(st.st_blocks) * 512;
  }
  return sum;
}

}  // namespace fph::guest
