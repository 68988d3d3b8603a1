// BuddyAllocator: split/merge, reserved frames, odd sizes, bad frees, and the
// page-reporting hooks (isolate / putback / reported marks).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "fph/guest/buddy.h"

namespace fph::guest {
namespace {

using Layout = std::vector<std::pair<uint64_t, int>>;  // sorted (frame, order)

Layout free_layout(const BuddyAllocator& b) {
  Layout out;
  b.for_each_free_block([&](const Block& blk, bool) { out.emplace_back(blk.frame, blk.order); });
  std::sort(out.begin(), out.end());
  return out;
}

std::set<uint64_t> reported_heads(const BuddyAllocator& b) {
  std::set<uint64_t> out;
  b.for_each_free_block([&](const Block& blk, bool rep) {
    if (rep) out.insert(blk.frame);
  });
  return out;
}

#define EXPECT_INVARIANTS(b)                  \
  do {                                        \
    std::string why_;                         \
    EXPECT_TRUE((b).check_invariants(&why_)) << why_; \
  } while (0)

TEST(Buddy, InitialLayoutPowerOfTwo) {
  BuddyAllocator b(4096);
  EXPECT_EQ(free_layout(b), (Layout{{0, 10}, {1024, 10}, {2048, 10}, {3072, 10}}));
  const BuddyStats s = b.stats();
  EXPECT_EQ(s.total_frames, 4096u);
  EXPECT_EQ(s.free_frames, 4096u);
  EXPECT_EQ(s.free_blocks[kMaxOrder], 4u);
  EXPECT_EQ(s.allocated_frames, 0u);
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, AllocSplitsLikeExpand) {
  BuddyAllocator b(1024);
  auto f = b.alloc(0);
  ASSERT_TRUE(f);
  EXPECT_EQ(*f, 0u);
  // Upper halves 1 (o0), 2 (o1), 4 (o2) ... 512 (o9) are free.
  Layout want;
  for (int o = 0; o < kMaxOrder; ++o) want.emplace_back(uint64_t{1} << o, o);
  EXPECT_EQ(free_layout(b), want);
  for (int o = 0; o < kMaxOrder; ++o) EXPECT_EQ(b.stats().free_blocks[o], 1u) << o;
  EXPECT_EQ(b.stats().free_blocks[kMaxOrder], 0u);
  EXPECT_EQ(b.stats().allocated_frames, 1u);
  EXPECT_EQ(b.frame_state(0), FrameState::Allocated);
  Block blk;
  EXPECT_EQ(b.frame_state(700, &blk), FrameState::Free);
  EXPECT_EQ(blk.frame, 512u);
  EXPECT_EQ(blk.order, 9);
  EXPECT_INVARIANTS(b);

  // The smallest order that has a block is used: order 3 comes from block 8.
  auto g = b.alloc(3);
  ASSERT_TRUE(g);
  EXPECT_EQ(*g, 8u);
  EXPECT_INVARIANTS(b);

  b.free(*g, 3);
  b.free(*f, 0);
  EXPECT_EQ(free_layout(b), (Layout{{0, 10}}));
  EXPECT_EQ(b.stats().bad_frees, 0u);
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, FreeMergedReturnsFinalOrder) {
  BuddyAllocator b(1024);
  auto a = b.alloc(9);
  auto c = b.alloc(9);
  ASSERT_TRUE(a && c);
  EXPECT_EQ(b.free_merged(*a, 9), 9);   // buddy allocated: no merge
  EXPECT_EQ(b.free_merged(*c, 9), 10);  // merges into the 4 MiB block
  EXPECT_EQ(b.free_merged(*c, 9), -1);  // double free
  EXPECT_EQ(b.stats().bad_frees, 1u);
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, FullMemoryAtOrderZeroThenFreeAllMergesBack) {
  const uint64_t n = 3 * 1024 + 512;
  BuddyAllocator b(n);
  const Layout initial = free_layout(b);
  std::vector<uint64_t> frames;
  while (auto f = b.alloc(0)) frames.push_back(*f);
  EXPECT_EQ(frames.size(), n);
  EXPECT_EQ(b.stats().free_frames, 0u);
  EXPECT_FALSE(b.alloc(0));
  std::set<uint64_t> uniq(frames.begin(), frames.end());
  EXPECT_EQ(uniq.size(), n);
  EXPECT_INVARIANTS(b);

  std::mt19937_64 rng(42);
  std::shuffle(frames.begin(), frames.end(), rng);
  for (uint64_t f : frames) b.free(f, 0);
  EXPECT_EQ(free_layout(b), initial);
  EXPECT_EQ(b.stats().free_blocks[kMaxOrder], 3u);
  EXPECT_EQ(b.stats().free_blocks[9], 1u);
  EXPECT_EQ(b.stats().bad_frees, 0u);
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, NonPowerOfTwoWithReservedFrames) {
  BuddyAllocator b(3000, 5);
  // Largest aligned blocks that fit, after the 5 reserved frames.
  const Layout want{{5, 0},     {6, 1},     {8, 3},     {16, 4},    {32, 5},    {64, 6},
                    {128, 7},   {256, 8},   {512, 9},   {1024, 10}, {2048, 9},  {2560, 8},
                    {2816, 7},  {2944, 5},  {2976, 4},  {2992, 3}};
  EXPECT_EQ(free_layout(b), want);
  EXPECT_EQ(b.stats().free_frames, 2995u);
  EXPECT_EQ(b.stats().reserved_frames, 5u);
  for (uint64_t f = 0; f < 5; ++f) EXPECT_EQ(b.frame_state(f), FrameState::Reserved);
  EXPECT_EQ(b.frame_state(3000), FrameState::OutOfRange);
  EXPECT_INVARIANTS(b);

  // Deterministic: lowest-addressed block of the smallest usable order.
  EXPECT_EQ(b.alloc(0), 5u);
  EXPECT_EQ(b.alloc(1), 6u);
  b.free(5, 0);
  b.free(6, 1);

  // Reserved frames can never be freed (nor merged with).
  b.free(0, 0);
  b.free(4, 0);
  EXPECT_EQ(b.stats().bad_frees, 2u);

  // Allocate everything at mixed orders, free all: same layout again.
  std::vector<std::pair<uint64_t, int>> got;
  for (int o = kMaxOrder; o >= 0; --o) {
    while (auto f = b.alloc(o)) got.emplace_back(*f, o);
  }
  EXPECT_EQ(b.stats().free_frames, 0u);
  EXPECT_EQ(b.stats().allocated_frames, 2995u);
  for (auto [f, o] : got) EXPECT_GE(f, 5u);
  EXPECT_INVARIANTS(b);
  for (auto [f, o] : got) b.free(f, o);
  EXPECT_EQ(free_layout(b), want);
  EXPECT_EQ(b.stats().bad_frees, 2u);
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, AllReservedAndEmpty) {
  BuddyAllocator all(16, 16);
  EXPECT_FALSE(all.alloc(0));
  EXPECT_INVARIANTS(all);
  BuddyAllocator none(0);
  EXPECT_FALSE(none.alloc(0));
  none.free(0, 0);
  EXPECT_EQ(none.stats().bad_frees, 1u);
  EXPECT_INVARIANTS(none);
  EXPECT_THROW(BuddyAllocator(4, 5), std::invalid_argument);
}

TEST(Buddy, BadFreesAreCountedAndHarmless) {
  BuddyAllocator b(2048);
  auto a = b.alloc(2);  // frames 0..3
  ASSERT_EQ(a, 0u);
  const Layout before = free_layout(b);
  b.free(1, 2);     // misaligned
  b.free(2, 1);     // inside an allocated block, not its head
  b.free(0, 1);     // wrong order
  b.free(0, 3);     // wrong order
  b.free(4, 2);     // a free block
  b.free(1024, 10); // a free block
  b.free(5000, 0);  // out of range
  b.free(0, -1);    // bad order
  b.free(0, 11);    // bad order
  EXPECT_EQ(b.stats().bad_frees, 9u);
  EXPECT_EQ(free_layout(b), before);
  EXPECT_EQ(b.stats().allocated_frames, 4u);
  EXPECT_INVARIANTS(b);

  b.free(0, 2);
  b.free(0, 2);  // double free
  EXPECT_EQ(b.stats().bad_frees, 10u);
  EXPECT_EQ(free_layout(b), (Layout{{0, 10}, {1024, 10}}));

  // Freeing an isolated block is a bad free too.
  auto iso = b.isolate(10, 1);
  ASSERT_EQ(iso.size(), 1u);
  b.free(iso[0].frame, 10);
  EXPECT_EQ(b.stats().bad_frees, 11u);
  EXPECT_EQ(b.frame_state(iso[0].frame), FrameState::Isolated);
  // And a putback of something not isolated is ignored.
  b.putback({Block{1024, 10}}, true);
  b.putback({Block{iso[0].frame, 9}}, true);
  EXPECT_EQ(b.stats().bad_putbacks, 2u);
  b.putback(iso, true);
  b.putback(iso, true);  // twice
  EXPECT_EQ(b.stats().bad_putbacks, 3u);
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, SplitAllocationAllowsOrderZeroFrees) {
  BuddyAllocator b(1024);
  auto a = b.alloc(3);
  ASSERT_EQ(a, 0u);
  EXPECT_FALSE(b.split_allocation(0, 2));
  EXPECT_TRUE(b.split_allocation(0, 3));
  EXPECT_INVARIANTS(b);
  b.free(0, 3);  // no longer an order-3 block
  EXPECT_EQ(b.stats().bad_frees, 1u);
  for (uint64_t f = 0; f < 8; ++f) b.free(f, 0);
  EXPECT_EQ(free_layout(b), (Layout{{0, 10}}));
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, IsolateRespectsOrderAndCapacityAndMixesOrders) {
  // 64 max-order blocks plus one order-9 block and small stuff.
  BuddyAllocator b(64 * 1024 + 512 + 7);
  EXPECT_EQ(b.unreported_candidate_blocks(9), 65u);
  EXPECT_EQ(b.unreported_candidate_frames(9), 64u * 1024 + 512);
  EXPECT_EQ(b.unreported_candidate_blocks(0), 65u + 3);  // + o2, o1, o0

  auto r1 = b.isolate(9, 32);
  ASSERT_EQ(r1.size(), 32u);
  // Orders walked from min_order up: the order-9 block first, then order 10.
  EXPECT_EQ(r1[0].order, 9);
  EXPECT_EQ(r1[0].frame, 64u * 1024);
  for (size_t i = 1; i < r1.size(); ++i) EXPECT_EQ(r1[i].order, 10);
  for (const Block& blk : r1) {
    EXPECT_EQ(b.frame_state(blk.frame), FrameState::Isolated);
    EXPECT_EQ(blk.bytes(), kFrameSize << blk.order);
  }
  EXPECT_EQ(b.stats().isolated_frames, 512u + 31 * 1024);
  auto r2 = b.isolate(9, 32);
  EXPECT_EQ(r2.size(), 32u);
  auto r3 = b.isolate(9, 32);
  EXPECT_EQ(r3.size(), 1u);  // leftover
  EXPECT_TRUE(b.isolate(9, 32).empty());
  EXPECT_EQ(b.unreported_candidate_blocks(9), 0u);
  // Smaller orders were not touched.
  EXPECT_EQ(b.stats().free_frames, 7u);
  EXPECT_TRUE(b.isolate(11, 32).empty());
  EXPECT_TRUE(b.isolate(0, 0).empty());
  // Nothing isolated can be allocated.
  EXPECT_FALSE(b.alloc(3));
  EXPECT_INVARIANTS(b);

  b.putback(r1, true);
  b.putback(r2, true);
  b.putback(r3, true);
  EXPECT_EQ(b.stats().isolated_frames, 0u);
  EXPECT_EQ(b.stats().reported_frames, 64u * 1024 + 512);
  // Reported blocks are skipped.
  EXPECT_TRUE(b.isolate(9, 32).empty());
  EXPECT_EQ(b.unreported_candidate_frames(9), 0u);
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, IsolatedBlocksDoNotMergeUntilPutBack) {
  BuddyAllocator b(2048);
  std::vector<uint64_t> a;
  for (int i = 0; i < 4; ++i) a.push_back(*b.alloc(9));
  EXPECT_EQ(a, (std::vector<uint64_t>{0, 512, 1024, 1536}));
  b.free(0, 9);
  b.free(1024, 9);
  auto iso = b.isolate(9, 32);
  ASSERT_EQ(iso.size(), 2u);
  EXPECT_FALSE(b.alloc(9));
  EXPECT_FALSE(b.alloc(0));

  // Free the buddy of an isolated block: no merge while isolated.
  EXPECT_EQ(b.free_merged(512, 9), 9);
  EXPECT_EQ(b.stats().free_blocks[9], 1u);
  EXPECT_EQ(b.stats().free_blocks[10], 0u);
  EXPECT_INVARIANTS(b);

  // Put back as reported: block 0 merges with 512 and so is NOT marked;
  // block 1024's buddy is allocated, so it stays order 9 and is marked.
  b.putback(iso, true);
  EXPECT_EQ(free_layout(b), (Layout{{0, 10}, {1024, 9}}));
  EXPECT_FALSE(b.is_reported(0));
  EXPECT_FALSE(b.is_reported(512));
  EXPECT_TRUE(b.is_reported(1024));
  EXPECT_EQ(b.stats().reported_frames, 512u);
  EXPECT_EQ(b.unreported_candidate_blocks(9), 1u);  // the merged block
  EXPECT_INVARIANTS(b);

  // Merging clears the mark: free 1536, it merges with reported 1024.
  b.free(1536, 9);
  EXPECT_EQ(free_layout(b), (Layout{{0, 10}, {1024, 10}}));
  EXPECT_EQ(b.stats().reported_frames, 0u);
  EXPECT_EQ(b.unreported_candidate_blocks(9), 2u);
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, ReportedBlockIsReReportedOnlyAfterReallocation) {
  BuddyAllocator b(1024);
  auto iso = b.isolate(9, 32);
  ASSERT_EQ(iso.size(), 1u);
  b.putback(iso, true);
  EXPECT_TRUE(b.is_reported(0));
  EXPECT_TRUE(b.isolate(9, 32).empty());
  EXPECT_TRUE(b.isolate(0, 32).empty());

  // Allocate it (clears the mark) and free it anew: a candidate again.
  auto a = b.alloc(10);
  ASSERT_EQ(a, 0u);
  EXPECT_FALSE(b.is_reported(0));
  EXPECT_EQ(b.frame_state(0), FrameState::Allocated);
  b.free(0, 10);
  EXPECT_FALSE(b.is_reported(0));
  auto again = b.isolate(9, 32);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].frame, 0u);
  // A failed report returns it unmarked.
  b.putback(again, false);
  EXPECT_FALSE(b.is_reported(0));
  EXPECT_EQ(b.isolate(9, 32).size(), 1u);
}

TEST(Buddy, SplittingAReportedBlockLeavesUnreportedHalves) {
  BuddyAllocator b(1024);
  b.putback(b.isolate(10, 1), true);
  ASSERT_TRUE(b.is_reported(0));
  auto a = b.alloc(0);
  ASSERT_EQ(a, 0u);
  EXPECT_EQ(b.stats().reported_frames, 0u);
  EXPECT_EQ(b.unreported_candidate_blocks(9), 1u);  // the upper half, 512
  EXPECT_INVARIANTS(b);
}

TEST(Buddy, AllocPrefersUnreportedBlocks) {
  BuddyAllocator b(2048);
  auto iso = b.isolate(10, 1);
  ASSERT_EQ(iso.size(), 1u);
  ASSERT_EQ(iso[0].frame, 0u);
  b.putback(iso, true);  // block 0 reported, at the tail
  EXPECT_EQ(b.alloc(10), 1024u);  // unreported first
  EXPECT_EQ(b.alloc(10), 0u);     // then the reported one
  EXPECT_FALSE(b.is_reported(0));
}

TEST(Buddy, PutbackGoesToTheTail) {
  BuddyAllocator b(4096);
  auto iso = b.isolate(10, 1);  // block 0
  ASSERT_EQ(iso[0].frame, 0u);
  b.putback(iso, false);  // unreported, to the tail: allocated last
  EXPECT_EQ(b.alloc(10), 1024u);
  EXPECT_EQ(b.alloc(10), 2048u);
  EXPECT_EQ(b.alloc(10), 3072u);
  EXPECT_EQ(b.alloc(10), 0u);
}

TEST(Buddy, ClearReportedMarksMakesEverythingACandidate) {
  BuddyAllocator b(8 * 1024 + 512);
  b.putback(b.isolate(9, 32), true);
  EXPECT_EQ(b.unreported_candidate_blocks(9), 0u);
  EXPECT_EQ(b.stats().reported_frames, 8u * 1024 + 512);
  auto a = b.alloc(10);  // a reported block, mark cleared
  ASSERT_TRUE(a);
  b.clear_reported_marks();
  EXPECT_EQ(b.stats().reported_frames, 0u);
  EXPECT_EQ(b.unreported_candidate_blocks(9), 8u);
  EXPECT_TRUE(reported_heads(b).empty());
  EXPECT_INVARIANTS(b);
  EXPECT_EQ(b.isolate(9, 32).size(), 8u);
}

// Random operations against a shadow model; the allocator's own invariant
// check runs after every operation, a full frame-by-frame cross-check every
// few operations.
TEST(Buddy, RandomizedProperty) {
  for (uint64_t seed : {1u, 2u, 3u}) {
    std::mt19937_64 rng(seed);
    const uint64_t frames = 2500 + seed * 333;
    const uint64_t reserved = seed * 3;
    BuddyAllocator b(frames, reserved);
    const Layout initial = free_layout(b);
    std::map<uint64_t, int> allocated;         // head -> order
    std::vector<std::vector<Block>> isolated;  // batches
    uint64_t expect_bad = 0;

    auto pick = [&](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };

    auto cross_check = [&] {
      // Every frame owned by exactly one of: reserved, free, allocated, isolated.
      std::vector<int> owner(frames, 0);
      for (uint64_t f = 0; f < reserved; ++f) ++owner[f];
      b.for_each_free_block([&](const Block& blk, bool) {
        for (uint64_t f = blk.frame; f < blk.frame + (uint64_t{1} << blk.order); ++f) ++owner[f];
      });
      for (auto [f0, o] : allocated) {
        for (uint64_t f = f0; f < f0 + (uint64_t{1} << o); ++f) {
          ++owner[f];
          ASSERT_EQ(b.frame_state(f), FrameState::Allocated);
        }
      }
      for (const auto& batch : isolated) {
        for (const Block& blk : batch) {
          for (uint64_t f = blk.frame; f < blk.frame + (uint64_t{1} << blk.order); ++f) {
            ++owner[f];
            ASSERT_EQ(b.frame_state(f), FrameState::Isolated);
          }
        }
      }
      for (uint64_t f = 0; f < frames; ++f) ASSERT_EQ(owner[f], 1) << "frame " << f;
      const BuddyStats s = b.stats();
      ASSERT_EQ(s.free_frames + s.allocated_frames + s.isolated_frames + s.reserved_frames, frames);
    };

    for (int step = 0; step < 6000; ++step) {
      const uint64_t op = pick(100);
      if (op < 40) {  // alloc, small orders more likely
        const int order = static_cast<int>(std::min<uint64_t>(pick(4) * pick(4), kMaxOrder));
        const uint64_t free_before = b.stats().free_frames;
        auto f = b.alloc(order);
        if (f) {
          ASSERT_EQ(*f % (uint64_t{1} << order), 0u);
          ASSERT_EQ(allocated.count(*f), 0u);
          Block blk;
          ASSERT_EQ(b.frame_state(*f, &blk), FrameState::Allocated);
          ASSERT_EQ(blk.order, order);
          ASSERT_FALSE(b.is_reported(*f));
          allocated[*f] = order;
          ASSERT_EQ(b.stats().free_frames, free_before - (uint64_t{1} << order));
        } else {
          // Nothing of that order or larger is free.
          for (int o = order; o <= kMaxOrder; ++o) ASSERT_EQ(b.stats().free_blocks[o], 0u);
        }
      } else if (op < 75) {  // free
        if (allocated.empty()) continue;
        auto it = allocated.begin();
        std::advance(it, pick(allocated.size()));
        const int o = b.free_merged(it->first, it->second);
        ASSERT_GE(o, it->second);
        allocated.erase(it);
      } else if (op < 85) {  // isolate
        const int min_order = static_cast<int>(pick(kMaxOrder + 1));
        const size_t cap = 1 + pick(40);
        const std::set<uint64_t> rep = reported_heads(b);
        auto batch = b.isolate(min_order, cap);
        ASSERT_LE(batch.size(), cap);
        for (const Block& blk : batch) {
          ASSERT_GE(blk.order, min_order);
          ASSERT_EQ(rep.count(blk.frame), 0u) << "isolated a reported block";
        }
        if (batch.size() < cap) {
          ASSERT_EQ(b.unreported_candidate_blocks(min_order), 0u);
        }
        if (!batch.empty()) isolated.push_back(std::move(batch));
      } else if (op < 95) {  // putback
        if (isolated.empty()) continue;
        const size_t i = pick(isolated.size());
        const bool ok = pick(2) == 0;
        std::vector<Block> batch = std::move(isolated[i]);
        isolated.erase(isolated.begin() + static_cast<long>(i));
        b.putback(batch, ok);
        for (const Block& blk : batch) {
          // Marked iff successful and unmerged (still heads a block of its order).
          Block cover;
          ASSERT_EQ(b.frame_state(blk.frame, &cover), FrameState::Free);
          const bool unmerged = cover.frame == blk.frame && cover.order == blk.order;
          ASSERT_EQ(b.is_reported(blk.frame), ok && unmerged);
        }
      } else if (op < 98) {  // a bad free
        const uint64_t f = pick(frames + 10);
        const int o = static_cast<int>(pick(kMaxOrder + 1));
        auto it = allocated.find(f);
        if (it != allocated.end() && it->second == o) continue;  // would be valid
        b.free(f, o);
        ++expect_bad;
      } else if (op < 99) {  // split an allocation into order-0 pieces
        if (allocated.empty()) continue;
        auto it = allocated.begin();
        std::advance(it, pick(allocated.size()));
        const auto [f0, o] = *it;
        ASSERT_TRUE(b.split_allocation(f0, o));
        allocated.erase(it);
        for (uint64_t f = f0; f < f0 + (uint64_t{1} << o); ++f) allocated[f] = 0;
      } else {
        b.clear_reported_marks();
        ASSERT_EQ(b.stats().reported_frames, 0u);
      }
      std::string why;
      ASSERT_TRUE(b.check_invariants(&why)) << "seed " << seed << " step " << step << ": " << why;
      if (step % 97 == 0) {
        ASSERT_NO_FATAL_FAILURE(cross_check());
      }
    }
    ASSERT_NO_FATAL_FAILURE(cross_check());
    EXPECT_EQ(b.stats().bad_frees, expect_bad);
    EXPECT_EQ(b.stats().bad_putbacks, 0u);

    // Return everything: the fully merged initial layout comes back.
    for (auto& batch : isolated) b.putback(batch, true);
    for (auto [f, o] : allocated) b.free(f, o);
    EXPECT_EQ(free_layout(b), initial);
    EXPECT_EQ(b.stats().free_frames, frames - reserved);
    std::string why;
    EXPECT_TRUE(b.check_invariants(&why)) << why;
  }
}

TEST(Buddy, LargeGuestMetadataIsLinear) {
  // 512 MiB guest: 131072 frames, 128 max-order blocks.
  BuddyAllocator b(131072, 16);
  EXPECT_EQ(b.stats().free_frames, 131072u - 16);
  std::vector<uint64_t> v;
  while (auto f = b.alloc(0)) v.push_back(*f);
  EXPECT_EQ(v.size(), 131072u - 16);
  for (uint64_t f : v) b.free(f, 0);
  EXPECT_EQ(b.stats().free_blocks[kMaxOrder], 127u);
  std::string why;
  EXPECT_TRUE(b.check_invariants(&why)) << why;
}

}  // namespace
}  // namespace fph::guest
