#include "fph/daemon/queue_service.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "fph/common/checked.h"
#include "fph/common/log.h"
#include "fph/daemon/session.h"

namespace fph::daemon {

namespace vq = proto::vq;
using proto::balloon::QueueRole;
using reclaim::SkipReason;

size_t RequestPlan::targets() const {
  size_t n = 0;
  for (const auto& v : per_node) n += v.size();
  return n;
}

// Metric label for a chain error (the proto text is for humans).
std::string chain_reason(vq::ChainErrc c) {
  switch (c) {
    case vq::ChainErrc::HeadOutOfRange: return "chain_head_out_of_range";
    case vq::ChainErrc::NextOutOfRange: return "chain_next_out_of_range";
    case vq::ChainErrc::TooLong: return "chain_too_long";
    case vq::ChainErrc::IndirectNotNegotiated: return "chain_indirect_not_negotiated";
    case vq::ChainErrc::IndirectBadLength: return "chain_indirect_bad_length";
    case vq::ChainErrc::IndirectNested: return "chain_indirect_nested";
    case vq::ChainErrc::IndirectWithNext: return "chain_indirect_with_next";
    case vq::ChainErrc::IndirectUnmapped: return "chain_indirect_unmapped";
    case vq::ChainErrc::ReadableAfterWritable: return "chain_readable_after_writable";
    case vq::ChainErrc::LengthOverflow: return "chain_length_overflow";
    case vq::ChainErrc::AvailIndexJump: return "chain_avail_index_jump";
    case vq::ChainErrc::HeadInFlight: return "chain_head_in_flight";
  }
  return "chain_invalid";
}

namespace {

constexpr uint64_t kHostPage = 4096;

int node_for(const Translation& t, const reclaim::Topology& topo) {
  if (t.region->node >= 0) return t.region->node;
  if (topo.node_count() <= 1) return 0;
  return topo.node_of_address(t.host, 0);
}

// Adds one guest range to the plan after checking it lies inside one region
// and is aligned to the host page size. Hugetlb ranges are passed on whole:
// the discard engine rounds them inward to huge pages and counts the rest.
void add_range(RequestPlan& plan, uint16_t head, size_t idx, uint64_t gpa, uint64_t len,
               const MemoryTable& table, SkipReason session_skip, const reclaim::Topology& topo,
               uint64_t min_block = 0) {
  if (len == 0) return;
  auto t = table.translate_range(gpa, len);
  if (!t) {
    plan.invalid_bytes += len;
    plan.skipped.push_back({SkipReason::Invalid, len});
    plan.error_reasons.push_back(std::string("range_") + std::string(to_string(t.error())));
    plan.errors.push_back(fmt::format("chain head {} buffer {}: range [0x{:x}, +0x{:x}) {}", head,
                                      idx, gpa, len, to_string(t.error())));
    return;
  }
  const int node = node_for(*t, topo);
  plan.reported_per_node[node] += len;
  if (!is_aligned(gpa, kHostPage) || !is_aligned(len, kHostPage)) {
    plan.skipped.push_back({SkipReason::Misaligned, len});
    return;
  }
  if (session_skip != SkipReason::None) {
    plan.skipped.push_back({session_skip, len});
    return;
  }
  if (len < min_block) {
    plan.skipped.push_back({SkipReason::Small, len});
    return;
  }
  const auto& r = *t->region;
  reclaim::DiscardTarget d;
  d.fd = r.fd.get();
  d.fd_offset = r.desc.mmap_offset + t->region_offset;
  d.addr = t->host;
  d.length = len;
  d.backing = r.backing;
  d.page_size = r.page_size;
  d.node = node;
  plan.per_node[node].push_back(d);
  plan.discard_gpas.emplace_back(gpa, len);
  if (std::find(plan.regions.begin(), plan.regions.end(), t->region) == plan.regions.end())
    plan.regions.push_back(t->region);
}

}  // namespace

RequestPlan plan_request(const vq::Chain& chain, QueueRole role, const MemoryTable& table,
                         SkipReason session_skip, const reclaim::Topology& topo, uint64_t min_block) {
  RequestPlan plan;
  const int nodes = std::max(1, topo.node_count());
  plan.per_node.resize(nodes);
  plan.reported_per_node.assign(nodes, 0);

  for (size_t i = 0; i < chain.buffers.size(); ++i) {
    const auto& b = chain.buffers[i];
    if (role == QueueRole::Reporting) {
      // virtio 1.2 5.5.6.5: each reported range is one device-writable buffer.
      if (!b.device_writable) {
        plan.invalid_bytes += b.len;
        plan.skipped.push_back({SkipReason::Invalid, b.len});
        plan.error_reasons.push_back("reporting_buffer_not_writable");
        plan.errors.push_back(fmt::format(
            "chain head {} buffer {}: reporting buffer [0x{:x}, +0x{:x}) is not device-writable",
            chain.head, i, b.gpa, b.len));
        continue;
      }
      add_range(plan, chain.head, i, b.gpa, b.len, table, session_skip, topo, min_block);
    } else if (role == QueueRole::Inflate) {
      // virtio 1.2 5.5.6: inflate buffers are arrays of le32 page frame
      // numbers (4 KiB units). The guest gave these pages to the host, so
      // their backing may be dropped. The array is copied out once.
      if (b.device_writable || b.len % 4 != 0) {
        plan.error_reasons.push_back("inflate_buffer_invalid");
        plan.errors.push_back(fmt::format("chain head {} buffer {}: inflate buffer of {} bytes{}",
                                          chain.head, i, b.len,
                                          b.device_writable ? " is device-writable" : ""));
        continue;
      }
      const uint8_t* p = table.translate(b.gpa, b.len);
      if (!p) {
        plan.error_reasons.push_back("range_outside_guest_memory");
        plan.errors.push_back(fmt::format("chain head {} buffer {}: pfn array outside guest memory",
                                          chain.head, i));
        continue;
      }
      std::vector<uint32_t> pfns(b.len / 4);
      std::memcpy(pfns.data(), p, b.len);
      // Merge runs of consecutive pfns into one range each.
      size_t j = 0;
      while (j < pfns.size()) {
        size_t k = j + 1;
        while (k < pfns.size() && pfns[k] == pfns[k - 1] + 1) ++k;
        add_range(plan, chain.head, i, uint64_t{pfns[j]} << 12, uint64_t{k - j} << 12, table,
                  session_skip, topo);
        j = k;
      }
    } else if (role == QueueRole::Deflate && !b.device_writable && b.len % 4 == 0) {
      // The pages come back to the guest: nothing for the host to do but
      // count them (docs/metrics.md "Balloon").
      plan.deflated_bytes += uint64_t{b.len / 4} << 12;
    }
    // Stats and free-page-hint buffers need no host action either: the
    // chain is simply returned.
  }
  for (auto& v : plan.per_node) {
    std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) {
      return a.fd != b.fd ? a.fd < b.fd : a.fd_offset < b.fd_offset;
    });
  }
  return plan;
}

namespace {

using Clock = std::chrono::steady_clock;

// One chain taken off the ring, waiting for its node batches.
struct PendingRequest {
  std::shared_ptr<Session> session;
  uint32_t queue = 0;
  uint16_t head = 0;
  Clock::time_point taken;
  int first_node = 0;
  std::atomic<int> batches_left{0};
  std::atomic<uint64_t> discarded{0};
  std::atomic<uint64_t> skipped{0};
  std::atomic<bool> cancelled{false};
  uint64_t reported = 0;
  std::vector<std::shared_ptr<MappedRegion>> regions;  // keep mappings alive
  std::vector<std::pair<uint64_t, uint64_t>> discard_gpas;
};

// Verified reclaim (the discarder measured the backing's allocated blocks
// around the syscall) and the refault sampler's record of what was discarded.
void account_verified(PendingRequest& req, int node, const reclaim::RangeResult& rr) {
  const auto& o = rr.outcome;
  if (o.discarded_bytes == 0) return;
  auto& vm = req.session->metrics();
  if (o.freed_bytes > 0) {
    vm.reclaimed(node, static_cast<uint64_t>(o.freed_bytes));
    req.session->backoff().discarded(static_cast<uint64_t>(o.freed_bytes));
  }
  else if (o.freed_bytes == 0) vm.freed_nothing(node);
  const auto& t = rr.target;
  // Only what really freed memory can refault: a discard of never-populated
  // pages (a guest reporting its untouched RAM at boot) freed nothing, and
  // the guest's first touch of it is not a cost fph caused.
  if (!t.addr || o.freed_bytes == 0) return;
  // What the syscall covered: hugetlb ranges are rounded inward to whole pages.
  uint64_t skip = 0;
  uint64_t len = t.length;
  if (t.backing == reclaim::Backing::Hugetlb && t.page_size > kHostPage) {
    skip = (t.page_size - t.fd_offset % t.page_size) % t.page_size;
    len = skip < len ? (len - skip) / t.page_size * t.page_size : 0;
  }
  for (const auto& region : req.regions) {
    if (t.addr >= region->map_base && t.addr + t.length <= region->map_base + region->map_len) {
      req.session->refaults().discarded(region, t.addr + skip, len, RefaultTracker::Clock::now(), o.freed_bytes);
      return;
    }
  }
}

void finish(PendingRequest& r) {
  auto& m = r.session->metrics();
  RequestOutcome o;
  if (r.cancelled) o = RequestOutcome::Cancelled;
  else if (r.discarded == 0) o = RequestOutcome::Skipped;
  else if (r.skipped == 0) o = RequestOutcome::Discarded;
  else o = RequestOutcome::Partial;
  m.request_done(o);
  const double secs = std::chrono::duration<double>(Clock::now() - r.taken).count();
  r.session->context().metrics.observe_request_latency(r.first_node, secs);
  // The discards are over: a VMM migrating the VM must send these pages
  // again (marked in the dirty log by return_chain while logging is on).
  r.session->return_chain(r.queue, r.head, r.discard_gpas);
  // Nothing needs the session or the mappings any more: drop them now, not
  // whenever the last copy of the completion callback happens to go away.
  r.session.reset();
  r.regions.clear();
}

}  // namespace

bool service_queue(Session& s, uint32_t queue, QueueRole role, Vring& vr, std::mutex& mu,
                   const std::shared_ptr<const MemoryTable>& table) {
  auto& ctx = s.context();
  auto& vm = s.metrics();
  for (;;) {
    uint16_t head = 0;
    Expected<vq::Chain, vq::ChainError> walked;
    SkipReason session_skip = SkipReason::None;
    uint64_t min_block = 0;
    std::optional<reclaim::PrivateMode> mode;
    uint64_t rate = 0;
    {
      std::lock_guard lk(mu);
      if (!vr.started) return true;
      auto h = vr.ring.pop_avail();
      if (!h) {
        const auto& e = h.error();
        s.protocol_error("queue", chain_reason(e.code), fmt::format("vring {}: {}", queue, e.message()));
        // A jump, or a head still in flight offered again: the ring is
        // stopped here, before anything is planned or discarded for it.
        if (vq::ends_ring(e.code)) return false;
        continue;  // the bad slot was consumed; there is no valid head to return
      }
      if (!*h) return true;
      head = **h;
      // The chain is copied out of guest memory once, here; nothing below
      // reads the descriptor table again.
      walked = vr.ring.walk(head, *table);
      session_skip = s.skip_reason(queue);
      min_block = role == QueueRole::Reporting ? s.min_block_locked() : 0;
      mode = s.private_mode_locked();
      rate = s.rate_limit_locked();
      s.taken_locked(queue);
    }

    if (!walked) {
      // A structurally broken chain: none of its ranges can be trusted, so
      // nothing is discarded, but the head is valid and is returned so the
      // driver does not wait forever.
      s.protocol_error("queue", chain_reason(walked.error().code),
                       fmt::format("vring {}: invalid chain: {}", queue, walked.error().message()));
      vm.request_done(RequestOutcome::Invalid);
      s.return_chain(queue, head);
      continue;
    }

    RequestPlan plan = plan_request(*walked, role, *table, session_skip, ctx.topology, min_block);
    for (size_t i = 0; i < plan.errors.size(); ++i)
      s.protocol_error("queue", plan.error_reasons[i], fmt::format("vring {}: {}", queue, plan.errors[i]));
    if (role == QueueRole::Inflate) {
      // Inflated pages are discarded like reported ones but counted apart:
      // the host asked for them (balloon target), the guest did not offer them.
      uint64_t inflated = 0;
      for (uint64_t bytes : plan.reported_per_node) inflated += bytes;
      if (inflated) vm.balloon_pages("inflate", inflated);
    } else {
      for (size_t n = 0; n < plan.reported_per_node.size(); ++n)
        if (plan.reported_per_node[n]) vm.reported(static_cast<int>(n), plan.reported_per_node[n]);
    }
    if (plan.deflated_bytes) vm.balloon_pages("deflate", plan.deflated_bytes);
    uint64_t pre_skipped = 0;
    for (const auto& sk : plan.skipped) {
      vm.skipped(sk.reason, sk.bytes);
      pre_skipped += sk.bytes;
    }

    auto req = std::make_shared<PendingRequest>();
    req->session = s.shared_from_this();
    req->queue = queue;
    req->head = head;
    req->taken = Clock::now();
    req->skipped = pre_skipped;
    req->regions = std::move(plan.regions);
    req->discard_gpas = std::move(plan.discard_gpas);
    int batches = 0;
    req->first_node = -1;
    for (size_t n = 0; n < plan.per_node.size(); ++n) {
      if (plan.per_node[n].empty()) continue;
      ++batches;
      if (req->first_node < 0) req->first_node = static_cast<int>(n);
    }
    if (req->first_node < 0) req->first_node = 0;
    if (batches == 0) {
      finish(*req);
      continue;
    }
    req->batches_left = batches;
    // The VM's own rate limit (vm_policy.h) schedules the whole request.
    uint64_t request_bytes = 0;
    for (const auto& v : plan.per_node)
      for (const auto& t : v) request_bytes += t.length;
    const auto due = s.rate_reserve(request_bytes, rate);
    for (size_t n = 0; n < plan.per_node.size(); ++n) {
      if (plan.per_node[n].empty()) continue;
      uint64_t batch_bytes = 0;
      for (const auto& t : plan.per_node[n]) batch_bytes += t.length;
      reclaim::Batch b;
      b.node = static_cast<int>(n);
      b.ranges = std::move(plan.per_node[n]);
      b.cancel = s.cancel_token();
      b.on_done = [req, batch_bytes](reclaim::BatchResult&& r) {
        auto& vm = req->session->metrics();
        auto& metrics = req->session->context().metrics;
        if (r.cancelled) {
          req->cancelled = true;
          vm.skipped(SkipReason::Cancelled, batch_bytes);
          req->skipped += batch_bytes;
        } else {
          for (const auto& rr : r.ranges) {
            const auto& o = rr.outcome;
            vm.discarded(r.node, o.method, o.discarded_bytes);
            vm.skipped(o.skip == SkipReason::None ? SkipReason::Failed : o.skip, o.skipped_bytes);
            account_verified(*req, r.node, rr);
            metrics.discard_syscalls(r.node, o.method, o.syscalls);
            if (o.error != 0)
              log::warn("discard", "vm={} node={} {} of {} bytes at offset 0x{:x} failed: {}",
                        req->session->name(), r.node, reclaim::to_string(o.method),
                        rr.target.length, rr.target.fd_offset, std::strerror(o.error));
          }
          req->discarded += r.discarded_bytes;
          req->skipped += r.skipped_bytes;
          metrics.observe_discard_duration(r.node, std::chrono::duration<double>(r.discard_time).count());
        }
        if (req->batches_left.fetch_sub(1) == 1) finish(*req);
      };
      b.mode = mode;
      s.run_batch_at(queue, due, std::move(b));
    }
  }
}

}  // namespace fph::daemon
