#include "fph/guest/workload.h"

#include <sys/resource.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <charconv>
#include <cstring>
#include <map>
#include <thread>

#include "fph/common/checked.h"
#include "fph/common/log.h"

namespace fph::guest {

namespace {

constexpr size_t kWordsPerFrame = kFrameSize / sizeof(uint64_t);

constexpr uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Bytes that differ between two words.
inline uint64_t diff_bytes(uint64_t a, uint64_t b) {
  uint64_t x = a ^ b;
  uint64_t n = 0;
  while (x) {
    if (x & 0xff) ++n;
    x >>= 8;
  }
  return n;
}

// Guest RAM is a page-aligned mapping of raw bytes that only this process
// types as 64-bit words, so viewing a frame as uint64_t[512] is aligned and
// does not alias objects of another type.
inline uint64_t* words(uint8_t* p) { return reinterpret_cast<uint64_t*>(p); }

Unexpected<std::string> err(std::string s) { return Unexpected<std::string>{std::move(s)}; }

// Minor page faults of the whole process so far (the kernel's count).
uint64_t minor_faults() {
  rusage ru{};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return static_cast<uint64_t>(ru.ru_minflt);
}

}  // namespace

Expected<WorkloadSpec, std::string> parse_workload(std::string_view s) {
  WorkloadSpec w;
  w.text = std::string(s);
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (true) {
    const size_t c = s.find(':', start);
    parts.push_back(s.substr(start, c == std::string_view::npos ? s.npos : c - start));
    if (c == std::string_view::npos) break;
    start = c + 1;
  }
  auto num = [](std::string_view t, double* out) {
    // from_chars for double is in libstdc++ 11+.
    auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), *out);
    return ec == std::errc() && p == t.data() + t.size() && *out >= 0;
  };
  if (parts[0] == "none" || s.empty()) {
    if (parts.size() > 1) return err("'none' takes no arguments");
    return w;
  }
  if (parts[0] == "alloc-free") {
    if (parts.size() < 2 || parts.size() > 3)
      return err(fmt::format("bad workload '{}': want alloc-free:SIZE[:HOLD_MS]", s));
    auto sz = parse_size(parts[1]);
    if (!sz) return err(sz.error());
    w.kind = WorkloadSpec::Kind::AllocFree;
    w.bytes = *sz;
    if (parts.size() == 3) {
      double ms = 0;
      if (!num(parts[2], &ms)) return err(fmt::format("bad HOLD_MS in '{}'", s));
      w.hold = std::chrono::milliseconds(static_cast<int64_t>(ms));
    }
    if (w.bytes == 0) return err("alloc-free SIZE must be > 0");
    return w;
  }
  if (parts[0] == "churn") {
    if (parts.size() != 3) return err(fmt::format("bad workload '{}': want churn:SIZE:SECONDS", s));
    auto sz = parse_size(parts[1]);
    if (!sz) return err(sz.error());
    double sec = 0;
    if (!num(parts[2], &sec)) return err(fmt::format("bad SECONDS in '{}'", s));
    w.kind = WorkloadSpec::Kind::Churn;
    w.bytes = *sz;
    w.duration = std::chrono::milliseconds(static_cast<int64_t>(sec * 1000));
    if (w.bytes == 0) return err("churn SIZE must be > 0");
    return w;
  }
  if (parts[0] == "trace") {
    const std::string_view file = s.size() > 6 ? s.substr(6) : std::string_view{};
    if (file.empty()) return err("bad workload 'trace:': want trace:FILE");
    auto t = load_trace(std::string(file));
    if (!t) return err(t.error());
    w.kind = WorkloadSpec::Kind::Trace;
    w.trace = std::make_shared<const Trace>(std::move(*t));
    return w;
  }
  return err(fmt::format("unknown workload '{}' (none, alloc-free:SIZE[:HOLD_MS], "
                         "churn:SIZE:SECONDS, trace:FILE)", s));
}

// ---------------------------------------------------------------- checker

MemoryChecker::MemoryChecker(const GuestMemory& mem, std::optional<uint32_t> poison)
    : mem_(mem), reported_(mem.frames(), 0) {
  if (poison) {
    poisoning_ = true;
    free_word_ = (uint64_t{*poison} << 32) | *poison;  // poison_val repeated, little-endian
  }
}

uint64_t MemoryChecker::pattern_word(uint64_t frame, uint64_t gen, size_t word) {
  const uint64_t base = splitmix64(frame * 0x100000001b3ull ^ (gen << 40) ^ gen);
  return base + word * 0x9e3779b97f4a7c15ull;
}

void MemoryChecker::fill(uint64_t frame, int order, uint64_t gen) const {
  const uint64_t n = uint64_t{1} << order;
  for (uint64_t f = frame; f < frame + n; ++f) {
    uint64_t* w = words(mem_.frame_ptr(f));
    const uint64_t base = pattern_word(f, gen, 0);
    for (size_t i = 0; i < kWordsPerFrame; ++i) w[i] = base + i * 0x9e3779b97f4a7c15ull;
  }
}

uint64_t MemoryChecker::verify(uint64_t frame, int order, uint64_t gen) const {
  const uint64_t n = uint64_t{1} << order;
  uint64_t bad = 0;
  for (uint64_t f = frame; f < frame + n; ++f) {
    const uint64_t* w = words(mem_.frame_ptr(f));
    const uint64_t base = pattern_word(f, gen, 0);
    for (size_t i = 0; i < kWordsPerFrame; ++i) {
      const uint64_t want = base + i * 0x9e3779b97f4a7c15ull;
      if (w[i] != want) [[unlikely]] bad += diff_bytes(w[i], want);
    }
  }
  return bad;
}

void MemoryChecker::poison(uint64_t frame, int order) const {
  if (!poisoning_) return;
  const uint64_t n = uint64_t{1} << order;
  for (uint64_t f = frame; f < frame + n; ++f) {
    uint64_t* w = words(mem_.frame_ptr(f));
    std::fill(w, w + kWordsPerFrame, free_word_);
  }
}

void MemoryChecker::poison_all(uint64_t first_frame) const {
  if (!poisoning_ || free_word_ == 0) return;  // fresh memfd pages already read as 0
  for (uint64_t f = first_frame; f < mem_.frames(); ++f) poison(f, 0);
}

namespace {
uint64_t frame_hash(const uint64_t* w) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < kWordsPerFrame; ++i) h = (h ^ w[i]) * 0x100000001b3ull;
  return h;
}
}  // namespace

void MemoryChecker::set_lazy_free(bool on) {
  lazy_ = on;
  snapshot_.assign(on ? reported_.size() : 0, 0);
}

void MemoryChecker::mark_reported(uint64_t frame, int order) {
  const uint64_t n = uint64_t{1} << order;
  if (frame + n > reported_.size()) return;
  if (lazy_) {
    for (uint64_t f = frame; f < frame + n; ++f)
      snapshot_[f] = frame_hash(words(mem_.frame_ptr(f)));
  }
  std::fill(reported_.begin() + static_cast<ptrdiff_t>(frame),
            reported_.begin() + static_cast<ptrdiff_t>(frame + n), uint8_t{1});
}

void MemoryChecker::forget_reported(uint64_t frame, int order) {
  const uint64_t n = uint64_t{1} << order;
  if (frame + n > reported_.size()) return;
  std::fill(reported_.begin() + static_cast<ptrdiff_t>(frame),
            reported_.begin() + static_cast<ptrdiff_t>(frame + n), uint8_t{0});
}

std::pair<uint64_t, uint64_t> MemoryChecker::check_allocated(uint64_t frame, int order) {
  const uint64_t n = uint64_t{1} << order;
  uint64_t checked = 0;
  uint64_t bad = 0;
  for (uint64_t f = frame; f < frame + n && f < reported_.size(); ++f) {
    if (!reported_[f]) continue;
    reported_[f] = 0;
    checked += kFrameSize;
    const uint64_t* w = words(mem_.frame_ptr(f));
    if (lazy_) {
      bool zero = true;
      for (size_t i = 0; i < kWordsPerFrame && zero; ++i) zero = w[i] == 0;
      if (zero) {
        lazy_zero_++;
      } else if (frame_hash(w) == snapshot_[f]) {
        lazy_kept_++;
      } else {
        for (size_t i = 0; i < kWordsPerFrame; ++i) bad += diff_bytes(w[i], 0);
      }
      continue;
    }
    for (size_t i = 0; i < kWordsPerFrame; ++i)
      if (w[i] != free_word_) [[unlikely]] bad += diff_bytes(w[i], free_word_);
  }
  return {checked, bad};
}

// ---------------------------------------------------------------- workload

Workload::Workload(BuddyAllocator& buddy, std::mutex& zone, MemoryChecker& checker,
                   IntegrityCounters& counters, WorkloadHooks hooks, uint64_t seed)
    : buddy_(buddy), zone_(zone), checker_(checker), counters_(counters),
      hooks_(std::move(hooks)), rng_(seed) {}

namespace {
uint64_t ns_since(std::chrono::steady_clock::time_point t0) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}
}  // namespace

WorkloadTotals Workload::totals() const {
  WorkloadTotals t;
  t.runs = runs_.load();
  t.alloc_bytes = alloc_bytes_.load();
  t.ops = ops_.load();
  t.seconds = static_cast<double>(run_ns_.load()) * 1e-9;
  t.alloc_seconds = static_cast<double>(alloc_ns_.load()) * 1e-9;
  return t;
}

std::optional<Held> Workload::alloc_block(int order) {
  std::shared_lock<std::shared_mutex> running;
  if (gate_) running = gate_->enter();
  const auto t0 = std::chrono::steady_clock::now();
  std::optional<uint64_t> f;
  {
    std::lock_guard lk(zone_);
    f = buddy_.alloc(order);
  }
  if (!f) return std::nullopt;
  Held h{*f, order, next_gen_++};
  // Pages that were reported must read as the free value before we write
  // them (the host dropped their backing, or kept poison_val): DESIGN 3.6.
  if (!check_reported_) {
    checker_.forget_reported(h.frame, h.order);
    checker_.fill(h.frame, h.order, h.gen);
    alloc_bytes_ += h.bytes();
    alloc_ns_ += ns_since(t0);
    return h;
  }
  auto [checked, bad] = checker_.check_allocated(h.frame, h.order);
  if (checked) counters_.reported_bytes_checked += checked;
  if (bad) {
    counters_.reported_nonzero_bytes += bad;
    log::warn("workload", "block at frame {} order {}: {} bytes of reported pages do not read "
              "as {:#x}", h.frame, h.order, bad, checker_.free_word());
  }
  checker_.fill(h.frame, h.order, h.gen);
  alloc_bytes_ += h.bytes();
  alloc_ns_ += ns_since(t0);
  return h;
}

std::vector<Held> Workload::alloc_bytes(uint64_t bytes) {
  std::vector<Held> out;
  uint64_t left = bytes / kFrameSize + (bytes % kFrameSize ? 1 : 0);
  int stalls = 0;
  while (left > 0) {
    int order = std::min<int>(kMaxOrder, std::bit_width(left) - 1);
    std::optional<Held> h;
    for (; order >= 0 && !h; --order) h = alloc_block(order);
    if (!h && hooks_.on_oom) {
      // Out of memory: before failing, the OOM notifiers (the balloon's
      // DEFLATE_ON_OOM). Inside the vCPU gate: the deflate writes the PFN
      // array into guest memory.
      uint64_t got = 0;
      {
        std::shared_lock<std::shared_mutex> running;
        if (gate_) running = gate_->enter();
        got = hooks_.on_oom();
      }
      if (got > 0) continue;
    }
    if (!h) {
      // Memory isolated for a report comes back when the host answers:
      // stall like an allocation waiting for memory (bounded, ~5 s), rather
      // than give up because a pass happens to be in flight.
      bool isolated = false;
      {
        std::lock_guard lk(zone_);
        isolated = buddy_.stats().isolated_frames > 0;
      }
      if (isolated && stalls < 5000 && !(stop_ && stop_->load())) {
        ++stalls;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      counters_.alloc_shortfall_bytes += left * kFrameSize;
      if (!warned_oom_)
        log::warn("workload", "guest memory exhausted: allocated {} of {} MiB",
                  (bytes - left * kFrameSize) >> 20, bytes >> 20);
      warned_oom_ = true;
      break;
    }
    left -= std::min<uint64_t>(left, uint64_t{1} << h->order);
    out.push_back(*h);
  }
  return out;
}

void Workload::free_block(const Held& h, bool verify) {
  std::shared_lock<std::shared_mutex> running;
  if (gate_) running = gate_->enter();
  const uint64_t bad = verify ? checker_.verify(h.frame, h.order, h.gen) : 0;
  if (verify) counters_.verified_bytes += h.bytes();
  if (bad) {
    counters_.corrupted_bytes += bad;
    log::error("workload", "CORRUPTION: block at frame {} order {}: {} bytes differ from the "
               "pattern", h.frame, h.order, bad);
  }
  checker_.poison(h.frame, h.order);
  int merged = -1;
  {
    std::lock_guard lk(zone_);
    merged = buddy_.free_merged(h.frame, h.order);
  }
  // Linux page_reporting_notify_free() gets the order after merging: an
  // order-0 free that completes a 2 MiB block must trigger reporting.
  if (merged >= 0 && hooks_.notify_free) hooks_.notify_free(merged);
}

void Workload::free_all(std::vector<Held>& blocks, bool verify) {
  for (const auto& h : blocks) free_block(h, verify);
  blocks.clear();
}

uint64_t Workload::verify_all(const std::vector<Held>& blocks) {
  uint64_t bad = 0;
  for (const auto& h : blocks) {
    const uint64_t b = checker_.verify(h.frame, h.order, h.gen);
    if (b)
      log::error("workload", "CORRUPTION: block at frame {} order {}: {} bytes differ", h.frame,
                 h.order, b);
    bad += b;
    counters_.verified_bytes += h.bytes();
  }
  counters_.corrupted_bytes += bad;
  return bad;
}

void Workload::run(const WorkloadSpec& spec, const std::atomic<bool>& stop) {
  if (spec.kind == WorkloadSpec::Kind::None) return;
  const auto t0 = std::chrono::steady_clock::now();
  run_once(spec, stop);
  run_ns_ += ns_since(t0);
  runs_++;
}

void Workload::run_once(const WorkloadSpec& spec, const std::atomic<bool>& stop) {
  using Clock = std::chrono::steady_clock;
  stop_ = &stop;
  switch (spec.kind) {
    case WorkloadSpec::Kind::None:
      return;
    case WorkloadSpec::Kind::AllocFree: {
      auto blocks = alloc_bytes(spec.bytes);
      uint64_t bytes = 0;
      for (const auto& h : blocks) bytes += h.bytes();
      log::info("workload", "alloc-free: allocated and wrote {} MiB in {} blocks", bytes >> 20,
                blocks.size());
      const auto until = Clock::now() + spec.hold;
      while (!stop.load() && Clock::now() < until)
        std::this_thread::sleep_for(std::min<Clock::duration>(until - Clock::now(),
                                                              std::chrono::milliseconds(20)));
      verify_all(blocks);
      free_all(blocks, /*verify=*/false);
      log::info("workload", "alloc-free: verified and freed {} MiB", bytes >> 20);
      if (hooks_.on_freed) hooks_.on_freed(bytes);
      return;
    }
    case WorkloadSpec::Kind::Churn:
      churn(spec, stop);
      return;
    case WorkloadSpec::Kind::Trace:
      if (spec.trace) replay(*spec.trace, stop);
      return;
  }
}

void Workload::replay(const Trace& trace, const std::atomic<bool>& stop) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  std::map<std::string, std::vector<Held>> held;  // per tag, in allocation order
  std::map<std::string, uint64_t> held_bytes;     // per tag, as the trace counts them
  uint64_t freed_total = 0;
  for (const auto& op : trace.ops) {
    const auto at = start + std::chrono::milliseconds(op.time_ms);
    while (!stop.load() && Clock::now() < at)
      std::this_thread::sleep_for(std::min<Clock::duration>(at - Clock::now(),
                                                            std::chrono::milliseconds(20)));
    if (stop.load()) break;
    auto& blocks = held[op.tag];
    const auto t0 = Clock::now();
    const uint64_t flt0 = minor_faults();
    auto report = [&](uint64_t bytes) {
      if (!hooks_.on_trace_op) return;
      const auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0);
      hooks_.on_trace_op(op, bytes, static_cast<uint64_t>(us.count()), minor_faults() - flt0);
    };
    if (op.op == TraceOp::Kind::Alloc) {
      auto got = alloc_bytes(op.bytes);
      uint64_t bytes = 0;
      for (const auto& h : got) bytes += h.bytes();
      blocks.insert(blocks.end(), got.begin(), got.end());
      held_bytes[op.tag] += op.bytes;
      report(bytes);
      continue;
    }
    // Free: newest blocks of the tag first, whole blocks, until `bytes`
    // are freed (the last block may overshoot by less than one block).
    uint64_t want = op.all ? UINT64_MAX : op.bytes;
    uint64_t freed = 0;
    while (freed < want && !blocks.empty()) {
      const Held h = blocks.back();
      blocks.pop_back();
      free_block(h);
      freed += h.bytes();
    }
    freed_total += freed;
    report(freed);
    held_bytes[op.tag] -= std::min(held_bytes[op.tag], op.all ? held_bytes[op.tag] : op.bytes);
    log::debug("workload", "trace line {}: freed {} KiB of '{}'", op.line, freed >> 10, op.tag);
  }
  // End of the trace (or stop): what is still held is verified and freed.
  uint64_t rest = 0;
  for (auto& [tag, blocks] : held) {
    for (const auto& h : blocks) rest += h.bytes();
    free_all(blocks);
  }
  log::info("workload", "trace {}: {} operations replayed, freed {} MiB during the trace and {} MiB "
            "left at its end", trace.name, trace.ops.size(), freed_total >> 20, rest >> 20);
  if (hooks_.on_freed) hooks_.on_freed(freed_total + rest);
}

void Workload::churn(const WorkloadSpec& spec, const std::atomic<bool>& stop) {
  using Clock = std::chrono::steady_clock;
  const auto until = Clock::now() + spec.duration;
  std::vector<Held> held;
  uint64_t held_bytes = 0;
  uint64_t ops = 0;
  while (!stop.load() && Clock::now() < until) {
    // Check the clock only every few operations: a max-order fill is ~4 MiB
    // of writes, a clock read is noise next to it.
    for (int k = 0; k < 16; ++k) {
      bool do_alloc = held.empty() || (rng_() & 1);
      if (do_alloc) {
        int order = static_cast<int>(rng_() % (kMaxOrder + 1));
        while (order > 0 && held_bytes + (kFrameSize << order) > spec.bytes) --order;
        if (held_bytes + (kFrameSize << order) > spec.bytes) {
          do_alloc = false;
        } else if (auto h = alloc_block(order)) {
          held_bytes += h->bytes();
          held.push_back(*h);
        } else {
          do_alloc = false;  // out of memory (or all isolated): free instead
        }
      }
      if (!do_alloc && !held.empty()) {
        const size_t i = rng_() % held.size();
        const Held h = held[i];
        held[i] = held.back();
        held.pop_back();
        held_bytes -= h.bytes();
        free_block(h);
      }
      ++ops;
    }
  }
  ops_ += ops;
  uint64_t bytes = held_bytes;
  free_all(held);
  log::info("workload", "churn: {} operations, freed the remaining {} MiB", ops, bytes >> 20);
  if (hooks_.on_freed) hooks_.on_freed(bytes);
}

}  // namespace fph::guest
