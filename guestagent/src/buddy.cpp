// Binary buddy allocator model with Linux page reporting hooks. See buddy.h.
#include "fph/guest/buddy.h"

#include <algorithm>
#include <iterator>
#include <stdexcept>
#include <string>

namespace fph::guest {

namespace {

constexpr uint64_t frames_of(int order) { return uint64_t{1} << order; }
constexpr bool valid_order(int order) { return order >= 0 && order <= kMaxOrder; }

}  // namespace

BuddyAllocator::BuddyAllocator(uint64_t frames, uint64_t reserved_frames) {
  if (frames >= kNil) throw std::invalid_argument("BuddyAllocator: too many frames");
  if (reserved_frames > frames) throw std::invalid_argument("BuddyAllocator: reserved > frames");
  total_frames_ = frames;
  meta_.assign(frames, FrameMeta{});
  for (auto& h : list_head_) h[0] = h[1] = kNil;
  for (auto& t : list_tail_) t[0] = t[1] = kNil;
  stats_.total_frames = frames;
  stats_.reserved_frames = reserved_frames;

  for (uint64_t f = 0; f < reserved_frames; ++f) {
    meta_[f].state = kReserved;
    meta_[f].order = 0;
  }
  // Cover [reserved, frames) with the largest aligned blocks that fit. This
  // is the unique fully merged layout, so freeing everything returns to it.
  uint64_t f = reserved_frames;
  while (f < frames) {
    int o = kMaxOrder;
    while (o > 0 && ((f & (frames_of(o) - 1)) != 0 || f + frames_of(o) > frames)) --o;
    push_free(f, o, /*tail=*/true, /*reported=*/false);  // ascending addresses
    f += frames_of(o);
  }
}

void BuddyAllocator::push_free(uint64_t frame, int order, bool tail, bool reported) {
  FrameMeta& m = meta_[frame];
  const int l = reported ? 1 : 0;
  const auto fr = static_cast<uint32_t>(frame);
  m.state = kFree;
  m.order = static_cast<int8_t>(order);
  m.reported = reported ? 1 : 0;
  uint32_t& head = list_head_[order][l];
  uint32_t& tl = list_tail_[order][l];
  if (head == kNil) {
    m.next = m.prev = kNil;
    head = tl = fr;
  } else if (tail) {
    m.prev = tl;
    m.next = kNil;
    meta_[tl].next = fr;
    tl = fr;
  } else {
    m.prev = kNil;
    m.next = head;
    meta_[head].prev = fr;
    head = fr;
  }
  ++list_len_[order][l];
  ++stats_.free_blocks[order];
  stats_.free_frames += frames_of(order);
  if (reported) stats_.reported_frames += frames_of(order);
}

void BuddyAllocator::remove_free(uint64_t frame) {
  FrameMeta& m = meta_[frame];
  const int order = m.order;
  const int l = m.reported ? 1 : 0;
  if (m.prev != kNil) meta_[m.prev].next = m.next;
  else list_head_[order][l] = m.next;
  if (m.next != kNil) meta_[m.next].prev = m.prev;
  else list_tail_[order][l] = m.prev;
  --list_len_[order][l];
  --stats_.free_blocks[order];
  stats_.free_frames -= frames_of(order);
  if (m.reported) stats_.reported_frames -= frames_of(order);
  // Linux del_page_from_free_list(): clears PageReported.
  m.next = m.prev = kNil;
  m.reported = 0;
  m.state = kInterior;
  m.order = -1;
}

int BuddyAllocator::merge_and_push(uint64_t frame, int order, bool tail, bool reported) {
  const int start = order;
  while (order < kMaxOrder) {
    const uint64_t buddy = frame ^ frames_of(order);
    if (buddy >= total_frames_) break;
    const FrameMeta& bm = meta_[buddy];
    if (bm.state != kFree || bm.order != order) break;  // allocated, isolated, split or reserved
    remove_free(buddy);  // clears the buddy's reported mark
    meta_[frame].state = kInterior;
    meta_[frame].order = -1;
    frame = std::min(frame, buddy);
    ++order;
  }
  // __putback_isolated_page: set PageReported only if PageBuddy &&
  // buddy_order == order, i.e. the block did not merge.
  push_free(frame, order, tail, reported && order == start);
  return order;
}

std::optional<uint64_t> BuddyAllocator::alloc(int order) {
  if (!valid_order(order)) return std::nullopt;
  for (int o = order; o <= kMaxOrder; ++o) {
    for (int l = 0; l < 2; ++l) {
      const uint32_t f = list_head_[o][l];
      if (f == kNil) continue;
      remove_free(f);
      // Linux expand(): keep the lower half, free the upper halves.
      for (int high = o; high > order;) {
        --high;
        push_free(f + frames_of(high), high, /*tail=*/false, /*reported=*/false);
      }
      meta_[f].state = kAllocated;
      meta_[f].order = static_cast<int8_t>(order);
      stats_.allocated_frames += frames_of(order);
      return f;
    }
  }
  return std::nullopt;
}

void BuddyAllocator::free(uint64_t frame, int order) { (void)free_merged(frame, order); }

int BuddyAllocator::free_merged(uint64_t frame, int order) {
  if (!valid_order(order) || frame >= total_frames_ || (frame & (frames_of(order) - 1)) != 0 ||
      meta_[frame].state != kAllocated || meta_[frame].order != order) {
    ++stats_.bad_frees;
    return -1;
  }
  meta_[frame].state = kInterior;
  meta_[frame].order = -1;
  stats_.allocated_frames -= frames_of(order);
  return merge_and_push(frame, order, /*tail=*/false, /*reported=*/false);
}

bool BuddyAllocator::split_allocation(uint64_t frame, int order) {
  if (!valid_order(order) || frame >= total_frames_ || (frame & (frames_of(order) - 1)) != 0 ||
      meta_[frame].state != kAllocated || meta_[frame].order != order) {
    return false;
  }
  for (uint64_t f = frame; f < frame + frames_of(order); ++f) {
    meta_[f].state = kAllocated;
    meta_[f].order = 0;
  }
  return true;
}

std::vector<Block> BuddyAllocator::isolate(int min_order, size_t capacity) {
  std::vector<Block> out;
  if (capacity == 0) return out;
  for (int o = std::max(min_order, 0); o <= kMaxOrder && out.size() < capacity; ++o) {
    while (out.size() < capacity && list_head_[o][0] != kNil) {
      const uint32_t f = list_head_[o][0];
      remove_free(f);  // __isolate_free_page: off the list, cannot be allocated or merged
      meta_[f].state = kIsolated;
      meta_[f].order = static_cast<int8_t>(o);
      stats_.isolated_frames += frames_of(o);
      out.push_back(Block{f, o});
    }
  }
  return out;
}

void BuddyAllocator::putback(const std::vector<Block>& blocks, bool reported) {
  for (const Block& b : blocks) {
    if (!valid_order(b.order) || b.frame >= total_frames_ ||
        (b.frame & (frames_of(b.order) - 1)) != 0 || meta_[b.frame].state != kIsolated ||
        meta_[b.frame].order != b.order) {
      ++stats_.bad_putbacks;
      continue;
    }
    meta_[b.frame].state = kInterior;
    meta_[b.frame].order = -1;
    stats_.isolated_frames -= frames_of(b.order);
    merge_and_push(b.frame, b.order, /*tail=*/true, reported);
  }
}

uint64_t BuddyAllocator::unreported_candidate_frames(int min_order) const {
  uint64_t n = 0;
  for (size_t o = min_order < 0 ? 0 : static_cast<size_t>(min_order); o < std::size(list_len_); ++o)
    n += list_len_[o][0] << o;
  return n;
}

uint64_t BuddyAllocator::unreported_candidate_blocks(int min_order) const {
  uint64_t n = 0;
  for (size_t o = min_order < 0 ? 0 : static_cast<size_t>(min_order); o < std::size(list_len_); ++o)
    n += list_len_[o][0];
  return n;
}

bool BuddyAllocator::is_reported(uint64_t frame) const {
  return frame < total_frames_ && meta_[frame].state == kFree && meta_[frame].reported != 0;
}

BuddyStats BuddyAllocator::stats() const { return stats_; }

uint64_t BuddyAllocator::forget_reported() {
  const uint64_t forgotten = stats_.reported_frames;
  for (int o = 0; o <= kMaxOrder; ++o) {
    const uint32_t rh = list_head_[o][1];
    if (rh == kNil) continue;
    for (uint32_t f = rh; f != kNil; f = meta_[f].next) meta_[f].reported = 0;
    // Splice the reported list after the unreported one.
    const uint32_t ut = list_tail_[o][0];
    if (ut == kNil) {
      list_head_[o][0] = rh;
    } else {
      meta_[ut].next = rh;
      meta_[rh].prev = ut;
    }
    list_tail_[o][0] = list_tail_[o][1];
    list_len_[o][0] += list_len_[o][1];
    list_head_[o][1] = list_tail_[o][1] = kNil;
    list_len_[o][1] = 0;
  }
  stats_.reported_frames = 0;
  return forgotten;
}

FrameState BuddyAllocator::frame_state(uint64_t frame, Block* block) const {
  if (frame >= total_frames_) return FrameState::OutOfRange;
  for (int o = 0; o <= kMaxOrder; ++o) {
    const uint64_t h = frame & ~(frames_of(o) - 1);
    const FrameMeta& m = meta_[h];
    if (m.state == kInterior || m.order != o) continue;
    if (block) *block = Block{h, o};
    switch (m.state) {
      case kReserved: return FrameState::Reserved;
      case kFree: return FrameState::Free;
      case kAllocated: return FrameState::Allocated;
      default: return FrameState::Isolated;
    }
  }
  return FrameState::OutOfRange;  // unreachable while the invariants hold
}

void BuddyAllocator::for_each_free_block(
    const std::function<void(const Block&, bool reported)>& fn) const {
  for (int o = 0; o <= kMaxOrder; ++o) {
    for (int l = 0; l < 2; ++l) {
      for (uint32_t f = list_head_[o][l]; f != kNil; f = meta_[f].next) fn(Block{f, o}, l == 1);
    }
  }
}

bool BuddyAllocator::check_invariants(std::string* why) const {
  auto fail = [&](const std::string& msg) {
    if (why) *why = msg;
    return false;
  };
  uint64_t n_reserved = 0, n_free = 0, n_reported = 0, n_alloc = 0, n_iso = 0;
  uint64_t blocks[kMaxOrder + 1][2] = {};
  for (uint64_t f = 0; f < total_frames_;) {
    const FrameMeta& m = meta_[f];
    if (m.state == kInterior) return fail("frame " + std::to_string(f) + " is not covered by a block");
    if (!valid_order(m.order)) return fail("frame " + std::to_string(f) + " has a bad order");
    const uint64_t n = frames_of(m.order);
    if ((f & (n - 1)) != 0) return fail("block " + std::to_string(f) + " is misaligned");
    if (f + n > total_frames_) return fail("block " + std::to_string(f) + " runs past the end");
    if (m.state == kReserved && m.order != 0) return fail("reserved frame with order > 0");
    if (m.reported && m.state != kFree) return fail("non-free block " + std::to_string(f) + " marked reported");
    if (m.state != kFree && (m.next != kNil || m.prev != kNil))
      return fail("non-free block " + std::to_string(f) + " has list links");
    // Allocated frames after split_allocation() are order-0 heads; every
    // other head owns its whole block.
    for (uint64_t i = f + 1; i < f + n; ++i) {
      if (meta_[i].state != kInterior)
        return fail("block " + std::to_string(f) + " overlaps block " + std::to_string(i));
    }
    switch (m.state) {
      case kReserved: n_reserved += n; break;
      case kAllocated: n_alloc += n; break;
      case kIsolated: n_iso += n; break;
      case kFree: {
        n_free += n;
        if (m.reported) n_reported += n;
        ++blocks[m.order][m.reported ? 1 : 0];
        if (m.order < kMaxOrder) {
          const uint64_t b = f ^ n;
          if (b < total_frames_ && meta_[b].state == kFree && meta_[b].order == m.order)
            return fail("free buddies " + std::to_string(f) + "/" + std::to_string(b) + " not merged");
        }
        break;
      }
      default: return fail("bad state at frame " + std::to_string(f));
    }
    f += n;
  }
  for (int o = 0; o <= kMaxOrder; ++o) {
    uint64_t per_order = 0;
    for (int l = 0; l < 2; ++l) {
      uint64_t len = 0;
      uint32_t prev = kNil;
      for (uint32_t f = list_head_[o][l]; f != kNil; f = meta_[f].next) {
        if (f >= total_frames_) return fail("list link out of range");
        const FrameMeta& m = meta_[f];
        if (m.state != kFree || m.order != o || m.reported != l)
          return fail("list " + std::to_string(o) + "/" + std::to_string(l) + " holds a wrong block " +
                      std::to_string(f));
        if (m.prev != prev) return fail("broken prev link at " + std::to_string(f));
        prev = f;
        if (++len > total_frames_) return fail("list loop");
      }
      if (list_tail_[o][l] != prev) return fail("stale list tail");
      if (len != list_len_[o][l] || len != blocks[o][l]) return fail("list length mismatch");
      per_order += len;
    }
    if (per_order != stats_.free_blocks[o]) return fail("free_blocks counter mismatch");
  }
  if (n_reserved != stats_.reserved_frames) return fail("reserved_frames mismatch");
  if (n_free != stats_.free_frames) return fail("free_frames mismatch");
  if (n_reported != stats_.reported_frames) return fail("reported_frames mismatch");
  if (n_alloc != stats_.allocated_frames) return fail("allocated_frames mismatch");
  if (n_iso != stats_.isolated_frames) return fail("isolated_frames mismatch");
  if (n_reserved + n_free + n_alloc + n_iso != total_frames_) return fail("frames do not add up");
  return true;
}

}  // namespace fph::guest
