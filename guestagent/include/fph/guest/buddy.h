// A model of the guest's page allocator: a binary buddy allocator over 4 KiB
// frames, orders 0..10 (4 KiB .. 4 MiB), with the page reporting hooks of
// Linux mm/page_reporting.c (reference section 2):
//
//  - a free block of order >= the reporting order that is not marked
//    reported is a reporting candidate;
//  - isolate() takes candidates off the free lists so nothing can allocate
//    or merge them while the host works on them;
//  - putback() returns them to the TAIL of their free list and marks them
//    reported if the report succeeded (and they did not merge);
//  - the reported mark is cleared when the block is allocated or merges
//    with its buddy, so a block is reported again only after it was
//    allocated and freed anew.
//
// Frames are numbered from 0 (frame = (gpa - base_gpa) / 4096). The model
// only keeps metadata; the memory itself is the guest RAM mapping owned by
// the front end. Not thread safe: the caller holds its zone lock.
//
// Cost: 12 bytes of metadata per frame (1.5 MiB for a 512 MiB guest);
// alloc/free/putback are O(kMaxOrder), isolate is O(kMaxOrder + blocks
// taken), counters O(1). At most 2^32 - 2 frames (16 TiB).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace fph::guest {

inline constexpr uint64_t kFrameSize = 4096;
inline constexpr int kMaxOrder = 10;  // MAX_PAGE_ORDER: 4 MiB blocks

struct Block {
  uint64_t frame = 0;  // first frame, aligned to 1 << order
  int order = 0;
  uint64_t bytes() const { return kFrameSize << order; }
};

struct BuddyStats {
  uint64_t total_frames = 0;
  uint64_t free_frames = 0;       // on free lists (including reported)
  uint64_t reported_frames = 0;   // free and marked reported
  uint64_t isolated_frames = 0;   // off the lists, in flight to the host
  uint64_t free_blocks[kMaxOrder + 1] = {};
  uint64_t reserved_frames = 0;   // the never-free prefix
  uint64_t allocated_frames = 0;  // handed out by alloc()
  // Invariant: reserved + free + allocated + isolated == total_frames.
  uint64_t bad_frees = 0;     // free() of a frame/order that is not an allocated block (ignored)
  uint64_t bad_putbacks = 0;  // putback() of a block that is not isolated (ignored)
};

// What a frame currently belongs to (frame_state()).
enum class FrameState : uint8_t { Reserved, Free, Allocated, Isolated, OutOfRange };

class BuddyAllocator {
 public:
  // Manages `frames` frames; the count need not be a power of two (the tail
  // is split into the largest aligned blocks that fit). `reserved_frames`
  // at the start are never free (e.g. rings and metadata).
  explicit BuddyAllocator(uint64_t frames, uint64_t reserved_frames = 0);

  // alloc() takes the smallest order that has a free block, from the head of
  // its list (unreported blocks before reported ones, see "Free lists"
  // below), and splits it like Linux expand(): the upper halves go to the
  // heads of the lower-order lists, unreported. Deterministic.
  std::optional<uint64_t> alloc(int order);  // first frame, or nullopt
  // free() must name exactly a block returned by alloc() (same frame, same
  // order; or an order-0 piece after split_allocation()). Anything else --
  // double free, a free or isolated or reserved frame, a misaligned frame,
  // a wrong order, out of range -- is ignored and counted in
  // BuddyStats::bad_frees; the allocator is never corrupted.
  void free(uint64_t frame, int order);      // merges with free buddies
  // Same as free(), returning the order of the free block the frame ended up
  // in after merging (what Linux passes to page_reporting_notify_free()), or
  // -1 for a bad free. Typical use:
  //   int o; { std::lock_guard g(zone_lock); o = buddy.free_merged(f, k); }
  //   if (o >= 0) reporting.notify_free(o);
  int free_merged(uint64_t frame, int order);
  // Linux split_page(): turns the allocated block (frame, order) into
  // 1 << order allocated order-0 blocks that can be freed one by one.
  // Returns false (and changes nothing) if (frame, order) is not allocated.
  bool split_allocation(uint64_t frame, int order);

  // Reporting hooks. isolate() walks orders from `min_order` up to kMaxOrder
  // and takes up to `capacity` free, unreported blocks, from the head of the
  // lists (Linux walks each list and skips reported pages).
  std::vector<Block> isolate(int min_order, size_t capacity);
  // Returns isolated blocks; marks each reported if `reported` and it did not
  // merge on return.
  void putback(const std::vector<Block>& blocks, bool reported);

  // Free, unreported blocks of order >= min_order (how much work is pending).
  uint64_t unreported_candidate_frames(int min_order) const;
  uint64_t unreported_candidate_blocks(int min_order) const;  // same, in blocks
  bool is_reported(uint64_t frame) const;  // frame heads a free reported block
  BuddyStats stats() const;
  uint64_t total_frames() const { return total_frames_; }

  // Clears the reported mark of every free block (PageReporting::
  // reset_reported_marks, on a migration epoch change) and returns the
  // frames it un-marked. Isolated blocks are not on the free lists and keep
  // whatever putback() gives them. The blocks keep their list order: the
  // formerly reported ones follow the unreported ones, so alloc() still
  // takes never-reported memory first. A second call returns 0.
  // O(reported blocks).
  uint64_t forget_reported();
  void clear_reported_marks() { (void)forget_reported(); }
  // Which kind of block covers `frame`; if `block` is given it receives that
  // block (frame, order). Reserved frames are reported as order-0 blocks.
  // O(kMaxOrder). Useful to check that a range handed to the host is
  // isolated before discarding it.
  FrameState frame_state(uint64_t frame, Block* block = nullptr) const;
  // Calls fn(block, reported) for every free block, order by order, each in
  // list order (the order alloc() would take them).
  void for_each_free_block(const std::function<void(const Block&, bool reported)>& fn) const;
  // O(frames) consistency check (tests, debug builds): every frame covered
  // by exactly one aligned block, lists well linked and matching the
  // per-frame metadata, no two free buddies of equal order left unmerged,
  // counters equal to a recount. Returns false and describes the first
  // violation in *why.
  bool check_invariants(std::string* why = nullptr) const;

 private:
  // Free lists: each order has two intrusive doubly linked lists, the
  // unreported blocks and the reported blocks. Together they model one Linux
  // free list whose reported blocks sit at the tail (putback() returns them
  // there): alloc() drains the unreported list first, isolate() only looks at
  // the unreported list, so both are O(1) per block instead of Linux's walk
  // that skips reported pages. (Deviation: an unreported block put back
  // after a failed report goes to the tail of the unreported list, i.e.
  // before the reported blocks rather than after them.)
  static constexpr uint32_t kNil = UINT32_MAX;
  enum : uint8_t { kInterior = 0, kReserved, kFree, kAllocated, kIsolated };
  struct FrameMeta {       // 12 bytes per frame
    uint32_t next = kNil;  // free-list links (valid while state == kFree)
    uint32_t prev = kNil;
    int8_t order = -1;     // order of the block this frame heads
    uint8_t state = kInterior;  // kInterior: inside a block headed elsewhere
    uint8_t reported = 0;       // free block marked reported (PageReported)
  };
  void push_free(uint64_t frame, int order, bool tail, bool reported);
  void remove_free(uint64_t frame);
  // Frees the (already detached) block (frame, order), merging with free
  // buddies; the result goes to the head or tail of its list, reported only
  // if `reported` and no merge happened. Returns the final order.
  int merge_and_push(uint64_t frame, int order, bool tail, bool reported);

  uint64_t total_frames_ = 0;
  std::vector<FrameMeta> meta_;
  uint32_t list_head_[kMaxOrder + 1][2];  // [order][reported]
  uint32_t list_tail_[kMaxOrder + 1][2];
  uint64_t list_len_[kMaxOrder + 1][2] = {};
  BuddyStats stats_{};
};

}  // namespace fph::guest
