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
#pragma once

#include <cstdint>
#include <optional>
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
};

class BuddyAllocator {
 public:
  // Manages `frames` frames; the count need not be a power of two (the tail
  // is split into the largest aligned blocks that fit). `reserved_frames`
  // at the start are never free (e.g. rings and metadata).
  explicit BuddyAllocator(uint64_t frames, uint64_t reserved_frames = 0);

  std::optional<uint64_t> alloc(int order);  // first frame, or nullopt
  void free(uint64_t frame, int order);      // merges with free buddies

  // Reporting hooks. isolate() walks orders from `min_order` up to kMaxOrder
  // and takes up to `capacity` free, unreported blocks, from the head of the
  // lists (Linux walks each list and skips reported pages).
  std::vector<Block> isolate(int min_order, size_t capacity);
  // Returns isolated blocks; marks each reported if `reported` and it did not
  // merge on return.
  void putback(const std::vector<Block>& blocks, bool reported);

  // Free, unreported blocks of order >= min_order (how much work is pending).
  uint64_t unreported_candidate_frames(int min_order) const;
  bool is_reported(uint64_t frame) const;  // frame heads a free reported block
  BuddyStats stats() const;
  uint64_t total_frames() const { return total_frames_; }

 private:
  struct FrameMeta;
  void push_free(uint64_t frame, int order, bool tail, bool reported);
  void remove_free(uint64_t frame);

  uint64_t total_frames_ = 0;
  // Per frame: order of the free block it heads (-1 if not a free head),
  // reported flag, isolated flag, and intrusive doubly linked free-list links.
  std::vector<int8_t> head_order_;
  std::vector<uint8_t> flags_;
  std::vector<uint64_t> next_;
  std::vector<uint64_t> prev_;
  uint64_t list_head_[kMaxOrder + 1];
  uint64_t list_tail_[kMaxOrder + 1];
  BuddyStats stats_{};
};

}  // namespace fph::guest
