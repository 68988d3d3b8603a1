// Stateful fuzz target: a REAL fph::daemon::Session driven in-process by a
// program of vhost-user messages and guest-side ring writes (docs/fuzzing.md).
//
// Per input: a socketpair (Session::run() on its own thread), three memfds as
// guest RAM (mem0 2 MiB at gpa 0, mem1 1 MiB at gpa 4 MiB, mem2 a 64 KiB file
// at gpa 8 MiB that regions may announce larger than it is), eventfds for
// kick/call. Shared and built once: Topology, Metrics, PolicyTable and the
// real NodePipelines over a recording Discarder that checks every discard
// against the model before doing the real hole punch.
//
// The input is a program: one opcode byte per step, operands read on demand
// (missing bytes read as 0). See `Op` below and make_corpus.py (seeds).
//
// Invariants, checked after every step (abort with a message when broken):
//   * no crash (ASan/UBSan);
//   * every discard lies inside the file ranges of buffers of chains the
//     program offered (written to the avail ring) and that are not yet seen
//     returned, as those buffers' gpas were mapped by the session's memory
//     table at offer time or while the offer was pending (a chain taken while
//     the table mapped it may be discarded after the table changed). Checked
//     synchronously in the discarder, under the model's lock;
//   * the session's memory table only holds regions the program sent (same
//     description, same memfd) and no two overlap;
//   * every head comes back through the used ring at most as often as it was
//     offered at that ring location (offers count again when SET_VRING_BASE or
//     a device reset rewinds the ring: the front end asked for it).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/registry.h>

#include "fph/common/log.h"
#include "fph/daemon/session.h"
#include "fph/proto/balloon.h"
#include "fph/proto/channel.h"
#include "fph/proto/vhost_user.h"
#include "fph/reclaim/discard.h"
#include "fph/reclaim/node_pipeline.h"
#include "fph/reclaim/policy.h"
#include "fph/reclaim/topology.h"

namespace {

using namespace fph;
namespace vu = proto::vu;
namespace balloon = proto::balloon;
using Clock = std::chrono::steady_clock;

constexpr uint64_t KiB = 1024, MiB = 1024 * 1024;
constexpr uint64_t kUbase = 0x7e0000000000ull;  // front-end "virtual address" of gpa 0
constexpr int kMems = 3;
constexpr uint64_t kMemGpa[kMems] = {0, 4 * MiB, 8 * MiB};
constexpr uint64_t kMemSize[kMems] = {2 * MiB, 1 * MiB, 64 * KiB};
// Ring areas (64 KiB each): desc at +0 (num <= 1024), avail at +0x4000, used
// at +0x5000, PFN arrays at +0x8000 (4 slots of 2 KiB), indirect tables at
// +0xA000 (12 slots of 2 KiB = 128 descriptors).
constexpr int kLocs = 4;
constexpr uint64_t kLocGpa[kLocs] = {0, 0x10000, 4 * MiB, 0x40000000};  // the last is unmapped
constexpr uint64_t kAvailOff = 0x4000, kUsedOff = 0x5000, kPfnOff = 0x8000, kIndOff = 0xA000;
constexpr uint32_t kModelMaxNum = 1024;
// Data areas where reported buffers live (never a ring area).
constexpr uint64_t kDataGpa[2] = {0x20000, 4 * MiB + 0x10000};
constexpr uint64_t kDataPages[2] = {(2 * MiB - 0x20000) / 4096, (1 * MiB - 0x10000) / 4096};
constexpr int kMaxSteps = 96;
constexpr int kReplyWaitMs = 1000;  // a reply that takes longer ends the program

// The running input, written to FPH_FUZZ_CRASH_FILE (default
// fuzz_session.crash) when an invariant breaks: the standalone driver does
// not save inputs (libFuzzer does, as crash-<sha1>).
const uint8_t* g_input = nullptr;
size_t g_input_size = 0;

[[noreturn]] void bug(const std::string& what) {
  if (g_input) {
    const char* path = std::getenv("FPH_FUZZ_CRASH_FILE");
    if (!path) path = "fuzz_session.crash";
    if (FILE* f = std::fopen(path, "wb")) {
      std::fwrite(g_input, 1, g_input_size, f);
      std::fclose(f);
      std::fprintf(stderr, "\nfuzz_session: input (%zu bytes) written to %s\n", g_input_size, path);
    }
  }
  std::fprintf(stderr, "\nfuzz_session: INVARIANT BROKEN: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// ---------------------------------------------------------------- the model

struct FileRange {
  uint64_t ino, off, len;
};

struct Buf {
  uint64_t gpa, len;
  bool writable;
};

struct Offer {
  int loc;                             // ring area whose descriptor table it uses
  int q;                               // ring it was offered on
  uint16_t head;
  std::vector<uint16_t> descs;         // descriptor indices it occupies
  std::vector<Buf> bufs;               // as described (plus PFN ranges of readable buffers)
  std::vector<FileRange> legal;        // file ranges under every table seen while pending

  // Is [off, off + len) of file `ino` inside this offer's own legal ranges?
  // A discard nearly always is (it comes from one buffer of one chain).
  bool covers(uint64_t ino, uint64_t off, uint64_t len) {
    if (sorted_from_ != legal.size()) {  // `legal` grew: sort and join again
      std::vector<std::tuple<uint64_t, uint64_t, uint64_t>> iv;
      for (const auto& r : legal)
        if (r.len) iv.emplace_back(r.ino, r.off, r.off + r.len);
      std::sort(iv.begin(), iv.end());
      sorted_.clear();
      for (const auto& [i, a, b] : iv) {
        if (!sorted_.empty() && std::get<0>(sorted_.back()) == i && a <= std::get<2>(sorted_.back()))
          std::get<2>(sorted_.back()) = std::max(std::get<2>(sorted_.back()), b);
        else sorted_.emplace_back(i, a, b);
      }
      sorted_from_ = legal.size();
    }
    auto it = std::upper_bound(sorted_.begin(), sorted_.end(), std::make_tuple(ino, off, ~0ull));
    if (it == sorted_.begin()) return false;
    --it;
    return std::get<0>(*it) == ino && std::get<2>(*it) >= off + len;
  }
  // covers()'s cache (aggregate initialisation leaves them empty).
  std::vector<std::tuple<uint64_t, uint64_t, uint64_t>> sorted_;  // (ino, begin, end), joined
  size_t sorted_from_ = ~size_t{0};                                // legal.size() it was built from
};

struct Model {
  std::mutex mu;  // the discarder (pipeline threads) and the program thread
  bool active = false;
  std::deque<Offer> pending;
  uint64_t discards = 0, discard_bytes = 0;
  std::vector<std::pair<uint64_t, FileRange>> ring_files;  // (ino, file range) of ring areas
  bool ring_clobbered = false;  // a (legal) discard hit a ring area: used rings unreliable
  std::string suspects;         // known work-in-progress cases seen in this program
  // Bumped (under mu) by every change of `pending` or of an offer's `legal`:
  // covered() rebuilds its merged view only then, not per discard (an
  // inflate of 256 PFNs is up to 256 discards; sorting every legal range per
  // discard was most of this target's CPU).
  uint64_t gen = 0;
  void changed() { ++gen; }

  // Is [off, off + len) of file `ino` inside the union of the legal ranges
  // of the pending offers?
  bool covered(uint64_t ino, uint64_t off, uint64_t len) {
    // First the offers one by one (no rebuild); the union only for a
    // discard that spans the buffers of several offers.
    bool fast = len == 0 || std::any_of(pending.begin(), pending.end(),
                                        [&](Offer& o) { return o.covers(ino, off, len); });
    if (!fast) {
      if (merged_gen_ != gen) rebuild();
      fast = covered_merged(ino, off, len);
    }
    if (check_cover_) {
      const bool slow = covered_by_sorting(ino, off, len);
      if (fast != slow) {
        std::fprintf(stderr, "fuzz_session: covered() merged view says %d, a full sort %d\n", fast, slow);
        std::abort();
      }
    }
    return fast;
  }

 private:
  bool covered_merged(uint64_t ino, uint64_t off, uint64_t len) const {
    if (len == 0) return true;
    auto m = merged_.find(ino);
    if (m == merged_.end()) return false;
    const auto& iv = m->second;  // sorted, disjoint, touching ones joined
    auto it = std::upper_bound(iv.begin(), iv.end(), off,
                               [](uint64_t x, const std::pair<uint64_t, uint64_t>& r) { return x < r.first; });
    if (it == iv.begin()) return false;
    --it;
    return it->second >= off + len;
  }
  bool covered_by_sorting(uint64_t ino, uint64_t off, uint64_t len) const {
    std::vector<std::pair<uint64_t, uint64_t>> iv;
    for (const auto& o : pending)
      for (const auto& r : o.legal)
        if (r.ino == ino && r.len) iv.emplace_back(r.off, r.off + r.len);
    std::sort(iv.begin(), iv.end());
    uint64_t at = off;
    const uint64_t end = off + len;
    for (const auto& [a, b] : iv) {
      if (a > at) break;
      if (b > at) at = b;
      if (at >= end) return true;
    }
    return at >= end;
  }
  void rebuild() {
    std::map<uint64_t, std::vector<std::pair<uint64_t, uint64_t>>> all;
    for (const auto& o : pending)
      for (const auto& r : o.legal)
        if (r.len) all[r.ino].emplace_back(r.off, r.off + r.len);
    merged_.clear();
    for (auto& [ino, iv] : all) {
      std::sort(iv.begin(), iv.end());
      auto& out = merged_[ino];
      for (const auto& [a, b] : iv) {
        if (!out.empty() && a <= out.back().second) out.back().second = std::max(out.back().second, b);
        else out.emplace_back(a, b);
      }
    }
    merged_gen_ = gen;
  }
  std::map<uint64_t, std::vector<std::pair<uint64_t, uint64_t>>> merged_;
  uint64_t merged_gen_ = ~0ull;
  // FPH_FUZZ_CHECK_COVER=1: every answer checked against a full sort.
  const bool check_cover_ = std::getenv("FPH_FUZZ_CHECK_COVER") != nullptr;
};

Model* g_model = nullptr;
// Where the time goes (FPH_FUZZ_STATS=1 prints them at exit).
std::atomic<uint64_t> g_reply_timeouts{0}, g_idle_timeouts{0}, g_programs{0}, g_closed{0};
// The session of the running program (for the discarder's fallback below).
std::shared_ptr<daemon::Session> g_session;

// Adds to `o.legal` the file ranges its buffers map to under `table`.
void add_legal(Offer& o, const std::vector<std::pair<proto::vu::MemoryRegion, uint64_t>>& table) {
  for (const auto& b : o.bufs) {
    const uint64_t bend = b.gpa + b.len < b.gpa ? ~0ull : b.gpa + b.len;
    for (const auto& [d, ino] : table) {
      const uint64_t lo = std::max(b.gpa, d.guest_phys_addr);
      const uint64_t hi = std::min(bend, d.guest_phys_addr + d.memory_size);
      if (lo >= hi) continue;
      o.legal.push_back({ino, d.mmap_offset + (lo - d.guest_phys_addr), hi - lo});
    }
  }
}

std::vector<std::pair<proto::vu::MemoryRegion, uint64_t>> table_of(const daemon::MemoryTable& t) {
  std::vector<std::pair<proto::vu::MemoryRegion, uint64_t>> out;
  for (const auto& r : t.regions()) {
    struct stat st {};
    if (::fstat(r->fd.get(), &st) != 0) bug("a region of the session's table has no usable fd");
    out.emplace_back(r->desc, st.st_ino);
  }
  return out;
}

class RecordingDiscarder final : public reclaim::Discarder {
 public:
  reclaim::DiscardOutcome discard(const reclaim::DiscardTarget& t, reclaim::Method m) override {
    struct stat st {};
    if (t.fd < 0 || ::fstat(t.fd, &st) != 0)
      bug(fmt::format("discard without a usable fd (fd {}, offset 0x{:x}, length 0x{:x})", t.fd,
                      t.fd_offset, t.length));
    {
      std::lock_guard lk(g_model->mu);
      if (!g_model->active) bug("discard while no program runs");
      if (!g_model->covered(st.st_ino, t.fd_offset, t.length) && g_session) {
        // The program folds every table it sees into the pending offers after
        // each step; a chain taken under a table the program has not looked
        // at yet (the session took it while handling the step) is legal too.
        const auto now = table_of(*g_session->table());
        for (auto& o : g_model->pending) add_legal(o, now);
        g_model->changed();
      }
      if (!g_model->covered(st.st_ino, t.fd_offset, t.length)) {
        std::string offers;
        for (const auto& o : g_model->pending) {
          offers += fmt::format("\n  pending ring {} head {}:", o.q, o.head);
          for (const auto& r : o.legal) offers += fmt::format(" ino {} [0x{:x},+0x{:x})", r.ino, r.off, r.len);
        }
        bug(fmt::format("discard of ino {} [0x{:x}, +0x{:x}) ({}) is not inside a buffer of a chain the "
                        "front end offered and that is not yet returned{}{}",
                        st.st_ino, t.fd_offset, t.length, reclaim::to_string(m),
                        g_model->suspects.empty() ? "" : "\n  known work-in-progress cases seen: " + g_model->suspects,
                        offers));
      }
      for (const auto& [ino, r] : g_model->ring_files)
        if (ino == static_cast<uint64_t>(st.st_ino) && t.fd_offset < r.off + r.len && r.off < t.fd_offset + t.length)
          g_model->ring_clobbered = true;
      g_model->discards++;
      g_model->discard_bytes += t.length;
    }
    return real_.discard(t, m);
  }

 private:
  reclaim::SyscallDiscarder real_;
};

// Built once per process: everything sessions share.
struct Shared {
  reclaim::Topology topo = reclaim::Topology::from_system();
  RecordingDiscarder discarder;
  reclaim::PolicyTable policy{topo.node_count()};
  struct Probe final : reclaim::NodeMemoryProbe {
    reclaim::NodeMemory read(int) override { return {}; }
  } probe;
  daemon::Metrics metrics{"", topo.node_count()};
  reclaim::NodePipelines pipelines{topo, discarder, policy, probe,
                                   reclaim::PipelineOptions{0, 1, true, 16ull << 20}};
  daemon::DaemonContext ctx{topo, pipelines, metrics};
  Model model;
  Shared() {
    ctx.stats_interval = std::chrono::milliseconds(20);
    // SET_DEVICE_STATE_FD from a raw message: a transfer over an eventfd
    // must not hold CHECK_DEVICE_STATE or the teardown for 10 s.
    ctx.state_transfer_timeout = std::chrono::milliseconds(50);
    g_model = &model;
  }
};

Shared& shared() {
  static Shared* s = [] {
    ::signal(SIGPIPE, SIG_IGN);
    if (std::getenv("FPH_FUZZ_STATS"))
      std::atexit([] {
        std::fprintf(stderr, "fuzz_session: %llu programs, %llu ended by a closed connection, %llu reply "
                     "timeouts, %llu in-flight wait timeouts\n",
                     static_cast<unsigned long long>(g_programs.load()),
                     static_cast<unsigned long long>(g_closed.load()),
                     static_cast<unsigned long long>(g_reply_timeouts.load()),
                     static_cast<unsigned long long>(g_idle_timeouts.load()));
      });
    if (!std::getenv("FPH_FUZZ_LOG")) log::set_level(log::Level::Error);
    return new Shared();
  }();
  return *s;
}

// Counter value of fphd_protocol_errors_total{vm="fuzz",reason}. The family
// is looked up by registering it again (the registry merges a family of the
// same name and type) and the series by Add (returns the existing one): a
// whole Registry::Collect per question was half of the target's CPU.
double protocol_errors(const std::string& reason) {
  static prometheus::Family<prometheus::Counter>& fam =
      prometheus::BuildCounter().Name("fphd_protocol_errors_total").Register(*shared().metrics.registry());
  return fam.Add({{"vm", "fuzz"}, {"reason", reason}}).Value();
}

// ---------------------------------------------------------------- input

struct Input {
  const uint8_t* p;
  size_t n, at = 0;
  bool more() const { return at < n; }
  uint8_t u8() { return at < n ? p[at++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(u8() | (u8() << 8)); }
  uint32_t u32() { return u16() | (static_cast<uint32_t>(u16()) << 16); }
  uint64_t u64() { return u32() | (static_cast<uint64_t>(u32()) << 32); }
};

// ---------------------------------------------------------------- one program

struct Mem {
  int fd = -1;
  uint8_t* map = nullptr;
  uint64_t size = 0, cur = 0;
  uint64_t ino = 0;
};

struct Loc {
  uint16_t avail_idx = 0;   // driver's next avail index
  uint16_t last_used = 0;   // used index read last
  bool used_synced = false;
  std::vector<uint16_t> hist;                 // head written at absolute avail index i
  std::map<uint16_t, std::vector<Buf>> chain; // head -> buffers it describes now
  std::set<uint16_t> busy;                    // descriptor indices of pending chains
  std::map<uint16_t, std::vector<uint16_t>> chain_descs;  // head -> its descriptor indices
  int ind_slot = 0, pfn_slot = 0;
  uint32_t num = 0;  // the num the driver uses here (0: none)
  int owner = -1;    // ring (queue index) using this area now
};

struct RingModel {
  int loc = -1;
  uint32_t num = 0;   // last num the back end accepted, as far as we know
  int kick = -1, call = -1;
  std::map<uint16_t, uint64_t> offered, used;  // per head
};

class Program {
 public:
  explicit Program(Shared& sh) : sh_(sh) {}
  ~Program() { teardown(); }
  void run(Input& in);

 private:
  // Guest memory (the front end's view: fixed layout).
  uint8_t* guest(uint64_t gpa, uint64_t len) {
    for (int k = 0; k < kMems; ++k) {
      if (gpa >= kMemGpa[k] && gpa - kMemGpa[k] + len <= mem_[k].cur && len <= mem_[k].cur)
        return mem_[k].map + (gpa - kMemGpa[k]);
    }
    return nullptr;
  }
  void put16(uint64_t gpa, uint16_t v) {
    if (uint8_t* p = guest(gpa, 2)) __atomic_store_n(reinterpret_cast<uint16_t*>(p), v, __ATOMIC_RELEASE);
  }
  void put_desc(uint64_t gpa, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    if (uint8_t* p = guest(gpa, 16)) {
      std::memcpy(p, &addr, 8);
      std::memcpy(p + 8, &len, 4);
      std::memcpy(p + 12, &flags, 2);
      std::memcpy(p + 14, &next, 2);
    }
  }

  bool send(uint32_t req, uint32_t flags, std::span<const uint8_t> payload, std::vector<int> fds = {}) {
    if (closed_) return false;
    vu::Header h{req, flags, static_cast<uint32_t>(payload.size())};
    if (!vu::send_message(fe_, h, payload, fds)) {
      closed_ = true;
      return false;
    }
    return true;
  }
  // Sends one message and a GET_FEATURES barrier; reads every reply up to
  // the barrier's (messages are handled in order on the session thread).
  // Returns the u64 replies to the message itself (REPLY_ACK, GET_*).
  std::vector<uint64_t> message(uint32_t req, uint8_t fl, std::span<const uint8_t> payload,
                                std::vector<int> fds = {}, uint32_t raw_flags = 0);
  bool barrier_read(int expect_get_features, std::vector<uint64_t>* replies);
  void after_step();
  void check_table();
  void check_used();
  void wait_idle();
  void rewind(int loc, uint16_t base);
  int reporting_index() const {
    return balloon::queue_layout(features_).reporting;
  }
  uint32_t ring_index(uint8_t b) const {
    const uint32_t q = b % 8;
    if (q >= 5) {
      const int r = reporting_index();
      return r >= 0 && r < 5 ? static_cast<uint32_t>(r) : 2;
    }
    return q;
  }
  vu::MemoryRegion region_spec(uint8_t spec, Input& in, int* mem);
  int eventfd_for(int* slot, bool fresh);
  // Ring q uses ring area `loc` from now on.
  void set_loc(uint32_t q, int loc) {
    for (int o = 0; o < 5; ++o)
      if (o != static_cast<int>(q) && rings_[o].loc == loc)
        used_unreliable_ = true;  // two rings in one area: whose used entries are these?
    if (rings_[q].loc >= 0 && locs_[rings_[q].loc].owner == static_cast<int>(q)) locs_[rings_[q].loc].owner = -1;
    rings_[q].loc = loc;
    locs_[loc].num = rings_[q].num;
    locs_[loc].owner = static_cast<int>(q);
  }
  void set_num(uint32_t q, uint32_t num, uint8_t fl) {
    const double busy = protocol_errors("ring_busy");
    message(8, fl, vu::encode_vring_state({q, num}));
    const bool valid = num && num <= 32768 && (num & (num - 1)) == 0;
    if (protocol_errors("ring_busy") != busy || !valid) {
      sh_.model.suspects += " SET_VRING_NUM-refused";
    } else {
      rings_[q].num = num;
      if (rings_[q].loc >= 0 && locs_[rings_[q].loc].owner == static_cast<int>(q)) locs_[rings_[q].loc].num = num;
    }
  }

  // Steps.
  void handshake(Input& in);
  void offer(Input& in);
  void kick(uint32_t q);
  void truncate(Input& in);

  Shared& sh_;
  Mem mem_[kMems];
  int fe_ = -1;
  std::shared_ptr<daemon::Session> session_;
  std::thread thread_;
  bool closed_ = false;
  uint64_t features_ = 0;  // what the back end accepted, as far as we know
  RingModel rings_[5];
  Loc locs_[kLocs];
  std::vector<int> efds_;
  std::vector<std::pair<vu::MemoryRegion, uint64_t>> sent_regions_;  // (desc, ino) ever sent
  const void* table_seen_ = nullptr;
  std::vector<std::pair<vu::MemoryRegion, uint64_t>> table_;  // the session's table (desc, ino)
  bool used_unreliable_ = false;
  bool torn_down_ = false;
  int spare_fd_ = -1;
  const bool verbose_ = std::getenv("FPH_FUZZ_LOG") != nullptr;

  void teardown();
};

int Program::eventfd_for(int* slot, bool fresh) {
  if (*slot >= 0 && !fresh) return *slot;
  const int e = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (e < 0) bug("eventfd failed");
  efds_.push_back(e);
  *slot = e;
  return e;
}

std::vector<uint64_t> Program::message(uint32_t req, uint8_t fl, std::span<const uint8_t> payload,
                                       std::vector<int> fds, uint32_t raw_flags) {
  std::vector<uint64_t> replies;
  const uint32_t flags = raw_flags ? raw_flags : (vu::kVersion | ((fl & 1) ? vu::kFlagNeedReply : 0u));
  if (!send(req, flags, payload, fds)) return replies;
  if (!send(static_cast<uint32_t>(vu::Request::GetFeatures), vu::kVersion, {})) return replies;
  barrier_read(req == static_cast<uint32_t>(vu::Request::GetFeatures) ? 2 : 1, &replies);
  return replies;
}

bool Program::barrier_read(int expect, std::vector<uint64_t>* replies) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(kReplyWaitMs);
  while (!closed_) {
    pollfd p{fe_, POLLIN, 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      g_reply_timeouts++;
      // No answer in 2 s: the conversation is lost (or fphd hangs: libFuzzer's
      // -timeout reports that). End the program.
      closed_ = true;
      return false;
    }
    if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    auto m = vu::recv_message(fe_);
    if (!m) {
      closed_ = true;
      return false;
    }
    if (!m->header.is_reply()) bug("the back end sent a message without the REPLY flag");
    if (m->header.request == static_cast<uint32_t>(vu::Request::GetFeatures)) {
      if (--expect == 0) return true;
    }
    if (m->payload.size() == 8) {
      uint64_t v;
      std::memcpy(&v, m->payload.data(), 8);
      replies->push_back(v);
    } else {
      replies->push_back(~0ull);
    }
  }
  return false;
}

vu::MemoryRegion Program::region_spec(uint8_t spec, Input& in, int* mem) {
  const int k = spec % 3;
  *mem = k;
  vu::MemoryRegion r{kMemGpa[k], kMemSize[k], kUbase + kMemGpa[k], 0};
  switch ((spec / 3) % 6) {
    case 0: case 1: case 2: break;  // as the guest sees it
    case 3: r.memory_size = kMemSize[k] * 2; break;  // announced larger than the file
    case 4:  // the second half of the file at the region's gpa
      r.memory_size = kMemSize[k] / 2;
      r.mmap_offset = kMemSize[k] / 2;
      break;
    case 5: {  // raw
      r.guest_phys_addr = static_cast<uint64_t>(in.u16()) << 12;
      r.memory_size = static_cast<uint64_t>(in.u8()) << 12;
      r.userspace_addr = kUbase + (static_cast<uint64_t>(in.u16()) << 12);
      r.mmap_offset = static_cast<uint64_t>(in.u8()) << 12;
      used_unreliable_ = true;  // the back end may see rings the guest did not write
      break;
    }
  }
  return r;
}

void Program::rewind(int loc, uint16_t base) {
  if (loc < 0) return;
  Loc& L = locs_[loc];
  const uint16_t dist = static_cast<uint16_t>(L.avail_idx - base);
  if (L.num == 0 || dist > L.num || L.owner < 0) return;
  std::lock_guard lk(sh_.model.mu);
  for (uint16_t i = base; i != L.avail_idx; ++i) {
    // The head the device will read is what the avail slot holds now, not
    // only what this program published there: a slot below an avail index
    // that SET_VRING_BASE moved past was never written and reads as head 0
    // (found by libFuzzer: fphd served such a head 0 twice, legally, and
    // the model had counted one offer). Within `num` entries of avail_idx
    // the slot holds the last value published there, i.e. hist[i].
    const uint8_t* slot = guest(kLocGpa[loc] + kAvailOff + 4 + 2ull * (i % L.num), 2);
    uint16_t h = 0;
    if (slot) std::memcpy(&h, slot, 2);
    else if (i < L.hist.size()) h = L.hist[i];
    else continue;
    if (h >= L.num) continue;
    rings_[L.owner].offered[h]++;
    Offer o{loc, L.owner, h, L.chain_descs[h], L.chain.count(h) ? L.chain[h] : std::vector<Buf>{}, {}};
    add_legal(o, table_);
    sh_.model.pending.push_back(std::move(o));
    sh_.model.changed();
  }
}

void Program::check_table() {
  auto t = session_->table();
  if (t.get() == table_seen_) return;
  table_seen_ = t.get();
  table_.clear();
  for (const auto& [desc, ino] : table_of(*t)) {
    bool sent = false;
    for (const auto& [d, i] : sent_regions_)
      sent = sent || (i == ino && d.guest_phys_addr == desc.guest_phys_addr &&
                      d.memory_size == desc.memory_size && d.userspace_addr == desc.userspace_addr &&
                      d.mmap_offset == desc.mmap_offset);
    if (!sent)
      bug(fmt::format("the session's table holds region gpa=0x{:x} size=0x{:x} of ino {} that the front end "
                      "never sent", desc.guest_phys_addr, desc.memory_size, ino));
    for (const auto& [d, i] : table_)
      if (d.guest_phys_addr < desc.guest_phys_addr + desc.memory_size && desc.guest_phys_addr < d.guest_phys_addr + d.memory_size)
        bug(fmt::format("the session's table has overlapping regions at gpa 0x{:x} and 0x{:x}",
                        d.guest_phys_addr, desc.guest_phys_addr));
    table_.emplace_back(desc, ino);
  }
  // Every pending offer: its buffers under this table are legal to discard.
  std::lock_guard lk(sh_.model.mu);
  for (auto& o : sh_.model.pending) add_legal(o, table_);
  sh_.model.changed();
}

void Program::check_used() {
  for (int l = 0; l < kLocs; ++l) {
    Loc& L = locs_[l];
    if (L.num == 0 || L.owner < 0) continue;
    RingModel& R = rings_[L.owner];
    const uint8_t* p = guest(kLocGpa[l] + kUsedOff, 4 + 8ull * L.num);
    if (!p) continue;
    const uint16_t idx = __atomic_load_n(reinterpret_cast<const uint16_t*>(p + 2), __ATOMIC_ACQUIRE);
    bool unreliable;
    {
      std::lock_guard lk(sh_.model.mu);
      unreliable = used_unreliable_ || sh_.model.ring_clobbered;
    }
    if (!L.used_synced) {
      L.used_synced = true;
      L.last_used = 0;
    }
    const uint16_t n = static_cast<uint16_t>(idx - L.last_used);
    if (n == 0) continue;
    if (n > L.num) {
      if (!unreliable)
        bug(fmt::format("ring at gpa 0x{:x}: used idx moved from {} to {}, more than num {}", kLocGpa[l],
                        L.last_used, idx, L.num));
      L.last_used = idx;
      continue;
    }
    for (uint16_t i = L.last_used; i != idx; ++i) {
      uint32_t id;
      std::memcpy(&id, p + 4 + 8 * (i % L.num), 4);
      if (unreliable) continue;
      if (id > 0xffff)
        bug(fmt::format("ring at gpa 0x{:x}: used entry {} has id {}", kLocGpa[l], i, id));
      const uint16_t h = static_cast<uint16_t>(id);
      const uint64_t u = ++R.used[h];
      if (u > R.offered[h])
        bug(fmt::format("ring {} at gpa 0x{:x}: head {} returned {} times, offered {} times{}", L.owner,
                        kLocGpa[l], h, u, R.offered[h],
                        sh_.model.suspects.empty() ? "" : " (known work-in-progress cases seen: " +
                                                              sh_.model.suspects + ")"));
      std::lock_guard lk(sh_.model.mu);
      auto& pend = sh_.model.pending;
      // The offer made at this area first; a ring moved while the chain was
      // in flight returns it through its new area.
      auto it = std::find_if(pend.begin(), pend.end(),
                             [&](const Offer& o) { return o.q == L.owner && o.head == h && o.loc == l; });
      if (it == pend.end())
        it = std::find_if(pend.begin(), pend.end(), [&](const Offer& o) { return o.q == L.owner && o.head == h; });
      if (it != pend.end()) {
        pend.erase(it);
        sh_.model.changed();
      }
    }
    L.last_used = idx;
  }
  // Descriptors of still pending chains stay busy.
  for (auto& L : locs_) L.busy.clear();
  std::lock_guard lk(sh_.model.mu);
  for (const auto& o : sh_.model.pending)
    for (auto d : o.descs) locs_[o.loc].busy.insert(d);
}

void Program::wait_idle() {
  if (closed_ && !session_) return;
  const auto deadline = Clock::now() + std::chrono::milliseconds(200);
  while (Clock::now() < deadline) {
    if (session_->info().inflight == 0) return;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  g_idle_timeouts++;
}

void Program::after_step() {
  wait_idle();
  check_table();
  check_used();
}

void Program::kick(uint32_t q) {
  if (rings_[q].kick < 0) return;
  uint64_t one = 1;
  (void)!::write(rings_[q].kick, &one, 8);
  // Barrier: the kick was written before the message, so the session thread
  // has serviced it by the time it answers (or the ring is not started).
  std::vector<uint64_t> r;
  if (send(static_cast<uint32_t>(vu::Request::GetFeatures), vu::kVersion, {})) barrier_read(1, &r);
}

void Program::handshake(Input& in) {
  const uint8_t a = in.u8();
  const uint8_t fl = (a & 0x40) ? 1 : 0;
  message(1, 0, {});
  uint64_t f = balloon::kFVersion1 | balloon::kFReporting | vu::feature::kProtocolFeatures;
  if (a & 2) f |= balloon::kFIndirectDesc;
  if (a & 4) f |= balloon::kFStatsVq;
  auto r = message(2, 1 | fl, vu::encode_u64(f));
  (void)r;
  features_ = f;
  message(15, 0, {});
  message(16, fl, vu::encode_u64(daemon::kOfferedProtocolFeatures));
  message(3, fl, {});
  int m0 = 0, m1 = 1;
  const vu::MemoryRegion r0{kMemGpa[0], kMemSize[0], kUbase + kMemGpa[0], 0};
  const vu::MemoryRegion r1{kMemGpa[1], kMemSize[1], kUbase + kMemGpa[1], 0};
  sent_regions_.emplace_back(r0, mem_[m0].ino);
  sent_regions_.emplace_back(r1, mem_[m1].ino);
  if (a & 1) {
    message(37, fl, vu::encode_single_region(r0), {mem_[0].fd});
    message(37, fl, vu::encode_single_region(r1), {mem_[1].fd});
  } else {
    const vu::MemoryRegion both[2] = {r0, r1};
    message(5, fl, vu::encode_mem_table(both), {mem_[0].fd, mem_[1].fd});
  }
  const uint32_t q = static_cast<uint32_t>(reporting_index());
  static constexpr uint32_t kNums[4] = {32, 8, 256, 1};
  const uint32_t num = kNums[(a >> 3) & 3];
  set_num(q, num, fl);
  const int loc = (a & 0x20) ? 2 : 0;
  // SET_VRING_BASE 0 at this area: whatever its avail ring holds is offered
  // again (counted before the messages: more offers only weaken the check).
  const int old_loc = rings_[q].loc;
  set_loc(q, loc);
  rewind(loc, 0);
  if (old_loc >= 0 && old_loc != loc && locs_[old_loc].owner < 0) {
    locs_[old_loc].owner = static_cast<int>(q);
    rewind(old_loc, 0);
    locs_[old_loc].owner = -1;
  }
  message(10, fl, vu::encode_vring_state({q, 0}));
  const uint64_t base = kUbase + kLocGpa[loc];
  message(9, fl, vu::encode_vring_addr({q, 0, base, base + kUsedOff, base + kAvailOff, 0}));
  message(12, fl, vu::encode_u64(q), {eventfd_for(&rings_[q].kick, true)});
  message(13, fl, vu::encode_u64(q), {eventfd_for(&rings_[q].call, true)});
  message(18, fl, vu::encode_vring_state({q, 1}));
  message(39, fl, vu::encode_u64(15));
}

void Program::offer(Input& in) {
  const uint8_t qb = in.u8();
  const uint32_t q = ring_index(qb);
  const int loc = rings_[q].loc;
  const int nchains = 1 + in.u8() % 4;
  if (loc < 0 || locs_[loc].num == 0 || locs_[loc].num > kModelMaxNum) {
    for (int c = 0; c < nchains * 4; ++c) (void)in.u8();
    return;
  }
  Loc& L = locs_[loc];
  const uint32_t num = L.num;
  const uint64_t lg = kLocGpa[loc];
  std::vector<uint16_t> heads;        // avail entries to write
  std::vector<std::vector<Buf>> descr;  // what each describes
  std::vector<std::vector<uint16_t>> dlist;  // descriptor indices of each
  std::vector<uint16_t> last_alloc;
  std::vector<bool> dup;  // an existing head offered again
  auto alloc = [&](uint32_t want) -> std::vector<uint16_t> {
    std::vector<uint16_t> out;
    for (uint32_t i = 0; i < num && out.size() < want; ++i)
      if (!L.busy.count(static_cast<uint16_t>(i))) out.push_back(static_cast<uint16_t>(i));
    if (out.size() < want) out.clear();
    for (auto d : out) L.busy.insert(d);
    last_alloc = out;
    return out;
  };
  auto data_buf = [&](Input& in) -> Buf {
    const int m = in.u8() & 1;
    const uint64_t page = in.u8() % kDataPages[m];
    const uint64_t pages = 1 + in.u8() % 8;
    const uint64_t len = std::min(pages, kDataPages[m] - page) * 4096;
    return Buf{kDataGpa[m] + page * 4096, len, true};
  };
  for (int c = 0; c < nchains; ++c) {
    const uint8_t kind = in.u8();
    switch (kind % 8) {
      case 0: case 1: case 2: case 3: {  // a valid reporting chain
        const uint32_t nb = 1 + in.u8() % 4;
        auto d = alloc(nb);
        if (d.empty()) break;
        std::vector<Buf> bufs;
        for (uint32_t i = 0; i < nb; ++i) {
          Buf b = data_buf(in);
          bufs.push_back(b);
          put_desc(lg + 16ull * d[i], b.gpa, static_cast<uint32_t>(b.len), 2 | (i + 1 < nb ? 1 : 0),
                   i + 1 < nb ? d[i + 1] : 0);
        }
        heads.push_back(d[0]);
        dlist.push_back(d);
        descr.push_back(bufs);
        break;
      }
      case 4: {  // a loop
        auto d = alloc(2);
        if (d.empty()) break;
        Buf a = data_buf(in), b = data_buf(in);
        put_desc(lg + 16ull * d[0], a.gpa, static_cast<uint32_t>(a.len), 3, d[1]);
        put_desc(lg + 16ull * d[1], b.gpa, static_cast<uint32_t>(b.len), 3, d[0]);
        heads.push_back(d[0]);
        dlist.push_back(d);
        descr.push_back({a, b});
        break;
      }
      case 5: {  // next out of range
        auto d = alloc(1);
        if (d.empty()) break;
        Buf a = data_buf(in);
        put_desc(lg + 16ull * d[0], a.gpa, static_cast<uint32_t>(a.len), 3,
                 static_cast<uint16_t>(num + in.u8()));
        heads.push_back(d[0]);
        dlist.push_back(d);
        descr.push_back({a});
        break;
      }
      case 6: {  // indirect table of writable buffers
        auto d = alloc(1);
        if (d.empty()) break;
        const uint32_t nb = 1 + in.u8() % 6;
        const int slot = L.ind_slot++ % 12;
        const uint64_t tgpa = lg + kIndOff + 2048ull * slot;
        std::vector<Buf> bufs;
        for (uint32_t i = 0; i < nb; ++i) {
          Buf b = data_buf(in);
          bufs.push_back(b);
          put_desc(tgpa + 16ull * i, b.gpa, static_cast<uint32_t>(b.len), 2 | (i + 1 < nb ? 1 : 0),
                   static_cast<uint16_t>(i + 1 < nb ? i + 1 : 0));
        }
        const uint8_t bad = in.u8();
        uint32_t tlen = 16 * nb;
        if (bad % 8 == 1) tlen += 8;      // not a multiple of 16
        if (bad % 8 == 2) tlen = 0;       // empty
        put_desc(lg + 16ull * d[0], tgpa, tlen, 4 | (bad % 8 == 3 ? 1 : 0), d[0]);
        heads.push_back(d[0]);
        dlist.push_back(d);
        descr.push_back(bufs);
        break;
      }
      default: {
        const uint8_t sub = in.u8() % 7;
        if (sub == 0) {  // a head offered again (maybe still in flight)
          if (L.chain.empty()) break;
          auto it = L.chain.begin();
          std::advance(it, in.u8() % L.chain.size());
          heads.push_back(it->first);
          dlist.push_back({});
          descr.push_back({});
          dup.resize(heads.size());
          dup.back() = true;  // what the head's descriptors describe is resolved when published
          break;
        }
        if (sub == 6) {  // head out of range
          heads.push_back(static_cast<uint16_t>(num + in.u8()));
          dlist.push_back({});
          descr.push_back({});
          break;
        }
        auto d = alloc(1);
        if (d.empty()) break;
        Buf b = data_buf(in);
        uint16_t flags = 2;
        std::vector<Buf> legal;
        if (sub == 1) {  // a readable buffer: a PFN array (inflate) in a PFN slot
          const int slot = L.pfn_slot++ % 4;
          const uint64_t pgpa = lg + kPfnOff + 2048ull * slot;
          const uint32_t n = 1 + in.u8() % 8;
          const int m = in.u8() & 1;
          const uint64_t first = (kDataGpa[m] >> 12) + in.u8() % kDataPages[m];
          if (uint8_t* p = guest(pgpa, 4ull * n)) {
            for (uint32_t i = 0; i < n; ++i) {
              const uint32_t pfn = static_cast<uint32_t>(std::min(first + i, (kDataGpa[m] >> 12) + kDataPages[m] - 1));
              std::memcpy(p + 4 * i, &pfn, 4);
              legal.push_back({uint64_t{pfn} << 12, 4096, true});
            }
          }
          b = Buf{pgpa, 4ull * n, false};
          flags = 0;
          legal.push_back(b);
        } else if (sub == 2) {  // outside guest memory
          b.gpa = static_cast<uint64_t>(in.u32()) << 12;
          legal.push_back(b);
        } else if (sub == 3) {  // misaligned
          b.gpa += 1 + in.u8();
          b.len = 100;
          legal.push_back(b);
        } else if (sub == 4) {  // length wraps guest memory
          b.len = 0xfffff000u;
          legal.push_back(b);
        } else {  // a plain readable reporting buffer
          flags = 0;
          legal.push_back(b);
        }
        put_desc(lg + 16ull * d[0], b.gpa, static_cast<uint32_t>(b.len), flags, 0);
        heads.push_back(d[0]);
        dlist.push_back(d);
        descr.push_back(legal);
        break;
      }
    }
  }
  // Publish: the avail entries, then the index (release). The offers'
  // legal ranges are computed first, under the table seen now.
  check_table();
  {
    std::lock_guard lk(sh_.model.mu);
    for (size_t i = 0; i < heads.size(); ++i) {
      const uint16_t h = heads[i];
      put16(lg + kAvailOff + 4 + 2ull * (L.avail_idx % num), h);
      if (L.hist.size() <= L.avail_idx) L.hist.resize(L.avail_idx + 1u);
      L.hist[L.avail_idx] = h;
      L.avail_idx++;
      if (h < num) {
        if (i < dup.size() && dup[i]) {
          descr[i] = L.chain[h];
          dlist[i] = L.chain_descs[h];
        }
        L.chain[h] = descr[i];
        L.chain_descs[h] = dlist[i];
        rings_[q].offered[h]++;
        if (verbose_) {
          std::string d;
          for (const auto& x : descr[i]) d += fmt::format(" [0x{:x},+0x{:x}){}", x.gpa, x.len, x.writable ? "w" : "r");
          std::fprintf(stderr, "fuzz_session: offer ring %u area %d avail %u head %u:%s\n", q, loc,
                       static_cast<unsigned>(L.avail_idx - 1), h, d.c_str());
        }
        Offer o{loc, static_cast<int>(q), h, dlist[i], descr[i], {}};
        add_legal(o, table_);
        sh_.model.pending.push_back(std::move(o));
        sh_.model.changed();
      }
    }
    put16(lg + kAvailOff + 2, L.avail_idx);
  }
  if (!(qb & 0x80)) kick(q);
}

void Program::truncate(Input& in) {
  const int k = in.u8() % kMems;
  const uint64_t to = (in.u8() % 4) * (kMemSize[k] / 4);
  if (to >= mem_[k].cur) return;
  if (::ftruncate(mem_[k].fd, static_cast<off_t>(to)) != 0) bug("ftruncate failed");
  mem_[k].cur = to;
  // A poke so the session touches its rings now.
  for (auto& r : rings_)
    if (r.kick >= 0) {
      uint64_t one = 1;
      (void)!::write(r.kick, &one, 8);
    }
  std::vector<uint64_t> rr;
  if (send(static_cast<uint32_t>(vu::Request::GetFeatures), vu::kVersion, {})) barrier_read(1, &rr);
}

void Program::run(Input& in) {
  for (int k = 0; k < kMems; ++k) {
    Mem& m = mem_[k];
    m.fd = ::memfd_create("fuzz-guest", MFD_CLOEXEC);
    if (m.fd < 0 || ::ftruncate(m.fd, static_cast<off_t>(kMemSize[k])) != 0) bug("memfd");
    void* p = ::mmap(nullptr, kMemSize[k], PROT_READ | PROT_WRITE, MAP_SHARED, m.fd, 0);
    if (p == MAP_FAILED) bug("mmap");
    m.map = static_cast<uint8_t*>(p);
    m.size = m.cur = kMemSize[k];
    struct stat st {};
    ::fstat(m.fd, &st);
    m.ino = st.st_ino;
  }
  {
    std::lock_guard lk(sh_.model.mu);
    sh_.model.pending.clear();
    sh_.model.changed();
    sh_.model.ring_files.clear();
    sh_.model.ring_clobbered = false;
    sh_.model.suspects.clear();
    sh_.model.discards = sh_.model.discard_bytes = 0;
    for (int l = 0; l < kLocs; ++l)
      for (int k = 0; k < kMems; ++k)
        if (kLocGpa[l] >= kMemGpa[k] && kLocGpa[l] < kMemGpa[k] + kMemSize[k])
          sh_.model.ring_files.push_back({mem_[k].ino, {mem_[k].ino, kLocGpa[l] - kMemGpa[k], 0x10000}});
    sh_.model.active = true;
  }
  g_session = nullptr;
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) bug("socketpair");
  fe_ = sv[1];
  session_ = std::make_shared<daemon::Session>(sh_.ctx, UniqueFd(sv[0]), "fuzz");
  {
    std::lock_guard lk(sh_.model.mu);
    g_session = session_;
  }
  thread_ = std::thread([s = session_] { s->run(); });

  for (int step = 0; step < kMaxSteps && in.more() && !closed_; ++step) {
    const uint8_t op = in.u8();
    if (verbose_) std::fprintf(stderr, "fuzz_session: step %d op %d at byte %zu\n", step, op % 24, in.at - 1);
    switch (op % 24) {
      case 0: handshake(in); break;
      case 1: {
        const uint8_t fl = in.u8(), b = in.u8();
        uint64_t f = 0;
        if (b & 1) f |= balloon::kFVersion1;
        if (b & 2) f |= balloon::kFReporting;
        if (b & 4) f |= vu::feature::kProtocolFeatures;
        if (b & 8) f |= balloon::kFIndirectDesc;
        if (b & 16) f |= balloon::kFStatsVq;
        if (b & 32) f |= balloon::kFPagePoison;
        if (b & 64) f |= vu::feature::kLogAll;
        if (b & 128) f = in.u64();
        message(2, fl, vu::encode_u64(f));
        if (!daemon::check_acked_features(f, daemon::offered_features(sh_.ctx))) features_ = f;
        break;
      }
      case 2: {
        const uint8_t fl = in.u8(), b = in.u8();
        message(16, fl, vu::encode_u64(b & 1 ? daemon::kOfferedProtocolFeatures : in.u64()));
        break;
      }
      case 3: {
        const uint8_t fl = in.u8();
        const int n = in.u8() % 4;
        std::vector<vu::MemoryRegion> rs;
        std::vector<int> fds;
        for (int i = 0; i < n; ++i) {
          int k;
          rs.push_back(region_spec(in.u8(), in, &k));
          fds.push_back(mem_[k].fd);
        }
        if ((fl & 2) && !fds.empty()) fds.pop_back();
        if (fl & 4) fds.push_back(mem_[2].fd);
        // What the back end may map: region i with the i-th fd sent.
        for (size_t i = 0; i < rs.size() && i < fds.size(); ++i)
          for (const auto& m : mem_)
            if (m.fd == fds[i]) sent_regions_.emplace_back(rs[i], m.ino);
        message(5, fl, vu::encode_mem_table(rs), fds);
        break;
      }
      case 4: case 5: {
        const uint8_t fl = in.u8();
        int k;
        const auto r = region_spec(in.u8(), in, &k);
        std::vector<int> fds;
        if (op % 24 == 4 || (fl & 2)) fds.push_back(mem_[k].fd);
        sent_regions_.emplace_back(r, mem_[k].ino);
        message(op % 24 == 4 ? 37 : 38, fl, vu::encode_single_region(r), fds);
        if (op % 24 == 5)
          for (auto& rm : rings_)
            if (rm.loc >= 0 && kLocGpa[rm.loc] >= r.guest_phys_addr &&
                kLocGpa[rm.loc] < r.guest_phys_addr + r.memory_size)
              sh_.model.suspects += " REM_MEM_REG-of-a-ring's-region";
        break;
      }
      case 6: {
        const uint8_t fl = in.u8();
        const uint32_t q = ring_index(in.u8());
        const uint8_t v = in.u8();
        uint32_t num = v < 0x80 ? 1u << (v % 11) : (v & 0x7f) * 3u;
        if (v == 0xff) num = 32768;
        if (v == 0xfe) num = 0;
        set_num(q, num, fl);
        break;
      }
      case 7: {
        const uint8_t fl = in.u8();
        const uint32_t q = ring_index(in.u8());
        const uint8_t l = in.u8();
        const int loc = l % kLocs;
        const uint64_t base = kUbase + kLocGpa[loc];
        vu::VringAddr a{q, 0, base + ((l & 4) ? 8 : 0), base + kUsedOff, base + kAvailOff, 0};
        if (l & 8) a.flags = vu::kVringFlagLog;
        message(9, fl, vu::encode_vring_addr(a));
        if (!(l & 4)) {
          set_loc(q, loc);
          if (loc == 3) sh_.model.suspects += " SET_VRING_ADDR-outside-the-table";
        }
        break;
      }
      case 8: {
        const uint8_t fl = in.u8();
        const uint32_t q = ring_index(in.u8());
        const uint16_t b = in.u16();
        message(10, fl, vu::encode_vring_state({q, b}));
        rewind(rings_[q].loc, b);
        break;
      }
      case 9: {
        const uint8_t fl = in.u8();
        const uint32_t q = ring_index(in.u8());
        const uint8_t k = in.u8();
        if (k & 1) message(12, fl, vu::encode_u64(q | 0x100));
        else message(12, fl, vu::encode_u64(q), {eventfd_for(&rings_[q].kick, k & 2)});
        break;
      }
      case 10: {
        const uint8_t fl = in.u8();
        const uint32_t q = ring_index(in.u8());
        const uint8_t k = in.u8();
        if (k & 1) message(13, fl, vu::encode_u64(q | 0x100));
        else message(13, fl, vu::encode_u64(q), {eventfd_for(&rings_[q].call, k & 2)});
        break;
      }
      case 11: {
        const uint8_t fl = in.u8();
        const uint32_t q = ring_index(in.u8());
        const uint8_t e = in.u8() % 3;
        message(18, fl, vu::encode_vring_state({q, e == 2 ? 5u : e}));
        break;
      }
      case 12: {
        const uint8_t fl = in.u8();
        const uint32_t q = in.u8() % 7;  // 5, 6: out of range (closes the session)
        message(11, fl, vu::encode_vring_state({q == 6 ? ring_index(5) : q, 0}));
        break;
      }
      case 13: {
        const uint8_t fl = in.u8();
        vu::ConfigPayload c{static_cast<uint32_t>(in.u8() % 24), static_cast<uint32_t>(in.u8() % 24), 0, {}};
        c.data.assign(c.size, 0);
        message(24, fl, vu::encode_config(c));
        break;
      }
      case 14: {
        const uint8_t fl = in.u8();
        vu::ConfigPayload c{static_cast<uint32_t>(in.u8() % 24), static_cast<uint32_t>(in.u8() % 24),
                            static_cast<uint32_t>(in.u8() % 3), {}};
        for (uint32_t i = 0; i < c.size; ++i) c.data.push_back(in.u8());
        message(25, fl, vu::encode_config(c));
        break;
      }
      case 15: {
        const uint8_t fl = in.u8(), v = in.u8();
        message(39, fl, vu::encode_u64(v == 0xfe ? 0x100 : v));
        if (v == 0)
          for (auto& rm : rings_) rewind(rm.loc, 0);
        break;
      }
      case 16: {  // a raw message
        const uint8_t req = in.u8() % 45;
        const uint8_t fb = in.u8();
        const uint32_t flags = (fb & 0x80) ? fb : (vu::kVersion | ((fb & 1) ? vu::kFlagNeedReply : 0u));
        std::vector<uint8_t> payload(in.u8() % 80);
        for (auto& b : payload) b = in.u8();
        std::vector<int> fds;
        for (int i = in.u8() % 3; i > 0; --i) fds.push_back(eventfd_for(&spare_fd_, true));
        message(req, 0, payload, fds, flags);
        if (req == 4 || req == 34 || req == 8 || req == 9 || req == 10 || req == 39 || req == 5 ||
            req == 37 || req == 38)
          used_unreliable_ = true;  // a ring or table change the model did not follow
        break;
      }
      case 17: offer(in); break;
      case 18: kick(ring_index(in.u8())); break;
      case 19: truncate(in); break;
      case 20: std::this_thread::sleep_for(std::chrono::milliseconds(in.u8() % 4)); break;
      case 21: {
        const uint8_t fl = in.u8(), w = in.u8() % 3;
        if (w == 2) message(39, fl, vu::encode_u64(0));
        else message(w == 0 ? 4 : 34, fl, {});
        for (auto& rm : rings_) rewind(rm.loc, 0);
        break;
      }
      case 22: {
        const uint8_t fl = in.u8();
        static constexpr uint32_t kGets[5] = {1, 15, 40, 17, 36};
        message(kGets[in.u8() % 5], fl, {});
        break;
      }
      case 23: {
        const uint8_t fl = in.u8();
        if (in.u8() & 1) {
          int sp[2];
          if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0) bug("socketpair");
          efds_.push_back(sp[0]);
          efds_.push_back(sp[1]);
          message(21, fl, {}, {sp[0]});
        } else {
          message(3, fl, {});
        }
        break;
      }
    }
    if (closed_) break;
    after_step();
  }
  teardown();
}

void Program::teardown() {
  if (torn_down_) return;
  torn_down_ = true;
  g_programs++;
  if (closed_) g_closed++;
  if (session_) {
    if (fe_ >= 0) ::shutdown(fe_, SHUT_RDWR);
    session_->request_stop();
    if (thread_.joinable()) thread_.join();
    // Every taken request is returned now: the last used entries count too.
    check_used();
    if (std::getenv("FPH_FUZZ_LOG")) {
      std::string used;
      for (int q = 0; q < 5; ++q) {
        uint64_t o = 0, u = 0;
        for (const auto& [h, n] : rings_[q].offered) o += n;
        for (const auto& [h, n] : rings_[q].used) u += n;
        if (o || u) used += fmt::format(" ring {}: offered {} returned {};", q, o, u);
      }
      std::lock_guard lk(sh_.model.mu);
      std::fprintf(stderr, "fuzz_session: %llu discards, %llu bytes;%s%s%s\n",
                   static_cast<unsigned long long>(sh_.model.discards),
                   static_cast<unsigned long long>(sh_.model.discard_bytes), used.c_str(),
                   used_unreliable_ || sh_.model.ring_clobbered ? " (used rings not checked)" : "",
                   sh_.model.suspects.c_str());
    }
  }
  {
    std::lock_guard lk(sh_.model.mu);
    g_session.reset();
    session_.reset();
    sh_.model.active = false;
    sh_.model.pending.clear();
    sh_.model.changed();
  }
  if (fe_ >= 0) ::close(fe_);
  for (int e : efds_) ::close(e);
  for (auto& m : mem_) {
    if (m.map) ::munmap(m.map, m.size);
    if (m.fd >= 0) ::close(m.fd);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Shared& sh = shared();
  g_input = data;
  g_input_size = size;
  Input in{data, size};
  Program p(sh);
  p.run(in);
  return 0;
}
