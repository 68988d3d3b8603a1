// fph-migration-bench: fphd's share of live-migration downtime, and what
// dirty logging costs reclaim, measured against two real fphd processes.
//
// METHODOLOGY (docs/bench-migration.md has the results and the caveats)
//
// Two fphd processes (source and destination; --listen on a Unix socket in a
// temporary directory, --metrics off, --stats-interval 0, --threads-per-node
// T) and one guest: this process, as a vhost-user front end built from
// fph::guest (Frontend for negotiation and the stop sequence, GuestMemory
// for one memfd region mapped MAP_SHARED, DriverRing for the reporting
// queue). Both fphd map the same memfd, as if source and destination shared
// the guest's RAM; the VM migrates back and forth between them, so its
// device state really travels: the epoch grows by one per migration and the
// reporting ring continues on the destination at the index the source
// returned (SET_VRING_BASE = GET_VRING_BASE's answer, same ring memory).
//
// Per migration (--migrations=N, default 20), on the current source:
//   1. Precopy: SET_LOG_BASE with a fresh memfd log (one bit per 4 KiB page
//      from GPA 0), SET_FEATURES(+LOG_ALL), SET_VRING_ADDR with
//      VHOST_VRING_F_LOG and log_guest_addr = the used ring's GPA (QEMU's
//      vhost_dev_set_log).
//   2. Drain with requests in flight: K requests (--requests, default 4),
//      each B max-order 4 MiB blocks (--blocks, default 32 = Linux's
//      capacity), every page of them written first (so the discards free
//      real memory). Post and kick each, then at once SET_VRING_ENABLE 0 +
//      GET_VRING_BASE. drain = from sending SET_VRING_ENABLE 0 to the
//      GET_VRING_BASE reply (what the VMM waits for). Also kept: the
//      requests still unreturned when the stop was sent (the used index read
//      just before it), and the time from the first kick to the reply.
//      Checked: the base equals the avail index we published; all K chains
//      are in the used ring when the reply arrives (no waiting), with the
//      heads we posted; the memfd's st_blocks fell by K*B*4 MiB (the
//      kernel's word); every discarded page and the used ring's page are set
//      in the dirty log.
//   3. Raw reference: the same K*B blocks written again the same way, then
//      fallocate(PUNCH_HOLE|KEEP_SIZE) of each 4 MiB block on the same memfd
//      by T threads taking blocks from one counter (T = fphd's discard
//      threads); wall time from release to the last thread. This is the
//      kernel work that had to finish before any back end could answer;
//      drain / raw is fphd's drain in units of it (per migration, then
//      p50/p99).
//   4. SAVE: SET_DEVICE_STATE_FD(SAVE, STOPPED, pipe write end) -> 0x100, our
//      write end closed, the blob read to EOF, CHECK_DEVICE_STATE -> 0. Timed
//      from the request to CHECK's reply. The blob must decode
//      (proto::devstate) and carry the epoch this VM has.
//   5. LOAD on the destination: a fresh session (same features, protocol
//      features and memory table, status FEATURES_OK, no ring started),
//      SET_DEVICE_STATE_FD(LOAD, STOPPED, pipe read end) -> 0x100, the blob
//      written, our end closed, CHECK_DEVICE_STATE -> 0. Timed the same way.
//      GET_CONFIG must then show the epoch plus one. The destination then
//      starts the reporting ring at the source's base and DRIVER_OK; the
//      source connection is closed (the source VM is gone).
//   downtime share = drain + SAVE + LOAD, per migration.
// Percentiles are nearest-rank over the N migrations (with N < 100, p99 is
// the slowest migration).
//
// Reclaim throughput, logging off vs on (after the migrations, on the device
// the last migration left running, so its resumed ring is used too): P pairs
// (--pairs, default 5) of runs over the same S bytes (--throughput, default
// 1 GiB) of the same memory, same requests (B blocks of 4 MiB, at most I in
// flight, --inflight, default 1 like Linux's page reporting), alternating
// which of the two goes first. "on" = SET_FEATURES(+LOG_ALL) and the ring's
// address with the log flag, on a log attached with SET_LOG_BASE; "off" =
// both without. A run writes every page of the S bytes, then posts requests
// and waits for them; window = first kick to last used element;
// throughput = st_blocks(before) - st_blocks(after) / window. Checked: the
// kernel-measured reclaim is exactly S; after "on" every page of the S bytes
// and the used ring's page are set in the log, after "off" no bit is set.
// Ratio on/off per pair, median over the pairs.
//
// Exit status: 0 if every check passed, 1 if any check, nack, refusal or
// mismatch failed (or fphd did not exit 0 on SIGTERM), 2 for bad usage.
// Nothing is ever judged on time.
//
// Usage: fph-migration-bench [--migrations=N] [--requests=K] [--blocks=B]
//          [--throughput=SIZE] [--pairs=P] [--inflight=I] [--threads=T]
//          [--quick] [--json] [--fphd=PATH] [--keep-logs]
// FPH_BENCH_FPHD overrides the fphd binary.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "percentile.h"
#include "fph/common/log.h"
#include "fph/common/unique_fd.h"
#include "fph/guest/buddy.h"
#include "fph/guest/dirty_log.h"
#include "fph/guest/frontend.h"
#include "fph/guest/workload.h"
#include "fph/guest/guest_memory.h"
#include "fph/proto/balloon.h"
#include "fph/proto/channel.h"
#include "fph/proto/device_state.h"
#include "fph/proto/vhost_user.h"
#include "fph/proto/virtqueue.h"

#ifndef FPH_FPHD_PATH
#define FPH_FPHD_PATH "fphd"
#endif

extern char** environ;

namespace {

namespace vu = fph::proto::vu;
namespace vq = fph::proto::vq;
namespace bal = fph::proto::balloon;
namespace devstate = fph::proto::devstate;
using fph::UniqueFd;
using fph::guest::Frontend;
using fph::guest::GuestMemory;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using nlohmann::json;

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;
constexpr uint64_t kPage = 4096;                                                   // the log's page
constexpr uint64_t kBlock = fph::guest::kFrameSize << fph::guest::kMaxOrder;        // 4 MiB
constexpr auto kPatience = 60s;         // a bound against hangs, never judged

// Every failed check ends the run with this; main turns it into exit 1.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... A>
void require(bool ok, fmt::format_string<A...> f, A&&... a) {
  if (!ok) throw Failure(fmt::format(f, std::forward<A>(a)...));
}

template <class T>
T must(fph::guest::FeResult<T> r, std::string_view what) {
  if (!r) throw Failure(fmt::format("{}: {}", what, r.error().message));
  if constexpr (!std::is_void_v<T>) return std::move(*r);
}

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// ------------------------------------------------------------------ options

struct Options {
  int migrations = 20;
  uint32_t requests = 4;                 // K: requests in flight at the stop
  uint32_t blocks = bal::kReportingCapacity;  // B: 4 MiB blocks per request
  uint64_t throughput_bytes = 1 * kGiB;  // S
  int pairs = 5;                         // P
  uint32_t inflight = 1;                 // I
  int threads = 0;                       // T; 0 = online CPUs
  bool quick = false;
  bool json = false;
  bool keep_logs = false;
  std::string fphd = FPH_FPHD_PATH;
};

[[noreturn]] void usage(const std::string& err) {
  std::fprintf(stderr,
               "fph-migration-bench: %s\n"
               "usage: fph-migration-bench [--migrations=N] [--requests=K] [--blocks=B]\n"
               "         [--throughput=SIZE] [--pairs=P] [--inflight=I] [--threads=T]\n"
               "         [--quick] [--json] [--fphd=PATH] [--keep-logs]\n",
               err.c_str());
  std::exit(2);
}

// "64M", "1G": fph-guest's size syntax (binary units).
uint64_t parse_size(const std::string& s) {
  auto v = fph::guest::parse_size(s);
  if (!v || *v == 0) throw std::invalid_argument(s);
  return *v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  if (const char* e = std::getenv("FPH_BENCH_FPHD")) o.fphd = e;
  bool set_migrations = false, set_requests = false, set_blocks = false, set_throughput = false,
       set_pairs = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto eq = a.find('=');
    const std::string key = a.substr(0, eq);
    auto value = [&]() -> std::string {
      if (eq != std::string::npos) return a.substr(eq + 1);
      if (i + 1 >= argc) usage(key + " needs a value");
      return argv[++i];
    };
    try {
      if (key == "--help" || key == "-h") usage("help");
      else if (key == "--quick") o.quick = true;
      else if (key == "--json") o.json = true;
      else if (key == "--keep-logs") o.keep_logs = true;
      else if (key == "--migrations") o.migrations = std::stoi(value()), set_migrations = true;
      else if (key == "--requests") o.requests = static_cast<uint32_t>(std::stoul(value())), set_requests = true;
      else if (key == "--blocks") o.blocks = static_cast<uint32_t>(std::stoul(value())), set_blocks = true;
      else if (key == "--throughput") o.throughput_bytes = parse_size(value()), set_throughput = true;
      else if (key == "--pairs") o.pairs = std::stoi(value()), set_pairs = true;
      else if (key == "--inflight") o.inflight = static_cast<uint32_t>(std::stoul(value()));
      else if (key == "--threads") o.threads = std::stoi(value());
      else if (key == "--fphd") o.fphd = value();
      else usage("unknown option " + a);
    } catch (const std::invalid_argument&) {
      usage("bad value in " + a);
    } catch (const std::out_of_range&) {
      usage("bad value in " + a);
    }
  }
  if (o.quick) {  // a smoke test: every step and every check, little time
    if (!set_migrations) o.migrations = 3;
    if (!set_requests) o.requests = 2;
    if (!set_blocks) o.blocks = 8;
    if (!set_throughput) o.throughput_bytes = 64 * kMiB;
    if (!set_pairs) o.pairs = 1;
  }
  if (o.migrations < 1) usage("--migrations must be >= 1");
  if (o.pairs < 1) usage("--pairs must be >= 1");
  if (o.requests < 1 || o.blocks < 1 || o.inflight < 1) usage("--requests, --blocks, --inflight must be >= 1");
  if (static_cast<uint64_t>(std::max(o.requests, o.inflight)) * o.blocks > 32768)
    usage("(--requests or --inflight) x --blocks must fit a 32768-entry ring");
  o.throughput_bytes = (o.throughput_bytes + kBlock - 1) / kBlock * kBlock;
  if (o.threads <= 0) o.threads = std::max(1, static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
  return o;
}

// ------------------------------------------------------------------ statistics

using fph::bench::median;
using fph::bench::percentile;
json summary(const std::vector<double>& v) {
  return {{"p50", percentile(v, 50)},
          {"p99", percentile(v, 99)},
          {"min", v.empty() ? 0.0 : *std::min_element(v.begin(), v.end())},
          {"max", v.empty() ? 0.0 : *std::max_element(v.begin(), v.end())},
          {"n", v.size()}};
}

// ------------------------------------------------------------------ fphd processes

// Children to kill if we are interrupted: a plain array, usable from a
// signal handler.
std::atomic<pid_t> g_children[4];

extern "C" void on_fatal_signal(int sig) {
  for (auto& c : g_children)
    if (const pid_t p = c.load(); p > 0) ::kill(p, SIGKILL);
  ::_exit(128 + sig);
}

struct TempDir {
  std::string path;
  bool keep = false;
  TempDir() {
    char tmpl[] = "/tmp/fph-mbench-XXXXXX";
    if (!::mkdtemp(tmpl)) throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (keep) std::fprintf(stderr, "fph-migration-bench: logs kept in %s\n", path.c_str());
    else std::filesystem::remove_all(path, ec);
  }
};

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One fphd serving a listening socket; stdout (its "ready" line) and stderr
// go to files in `dir`.
class Fphd {
 public:
  Fphd(const Options& o, const std::string& dir, const std::string& name)
      : socket_(dir + "/" + name + ".sock"), out_(dir + "/" + name + ".stdout"), err_(dir + "/" + name + ".stderr") {
    std::vector<std::string> argv{o.fphd,          "--listen",           socket_, "--metrics",
                                  "off",           "--stats-interval",   "0",     "--threads-per-node",
                                  std::to_string(o.threads), "--log-level", "warn"};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, out_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, err_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    const int rc = ::posix_spawn(&pid_, args[0], &fa, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) throw Failure(fmt::format("cannot start {}: {}", o.fphd, std::strerror(rc)));
    for (auto& c : g_children) {
      pid_t none = 0;
      if (c.compare_exchange_strong(none, pid_)) break;
    }
    try {
      wait_ready(name);
    } catch (...) {
      kill_child();  // a constructor that throws gets no destructor: do not leave fphd running
      throw;
    }
  }
  ~Fphd() { kill_child(); }
  Fphd(const Fphd&) = delete;
  Fphd& operator=(const Fphd&) = delete;

  const std::string& socket() const { return socket_; }
  pid_t pid() const { return pid_; }
  std::string stderr_tail(size_t max = 1500) const {
    std::string s = read_file(err_);
    return s.size() > max ? s.substr(s.size() - max) : s;
  }
  // SIGTERM, as a service manager stops it; its exit status (0 expected).
  int stop() {
    if (exit_code_) return *exit_code_;
    ::kill(pid_, SIGTERM);
    const auto deadline = Clock::now() + 30s;
    int st = 0;
    while (::waitpid(pid_, &st, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &st, 0);
        break;
      }
      std::this_thread::sleep_for(10ms);
    }
    exit_code_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return *exit_code_;
  }

 private:
  void kill_child() {
    if (!exit_code_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      exit_code_ = 128 + SIGKILL;
    }
    for (auto& c : g_children) {
      pid_t mine = pid_;
      c.compare_exchange_strong(mine, 0);
    }
  }
  void wait_ready(const std::string& name) {
    const auto deadline = Clock::now() + 30s;
    while (Clock::now() < deadline) {
      std::istringstream lines(read_file(out_));
      for (std::string l; std::getline(lines, l);) {
        auto j = json::parse(l, nullptr, false);
        if (j.is_object() && j.value("event", "") == "ready") return;
      }
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        exit_code_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        throw Failure(fmt::format("fphd ({}) exited with {} before it was ready: {}", name, *exit_code_,
                                  stderr_tail()));
      }
      std::this_thread::sleep_for(10ms);
    }
    throw Failure(fmt::format("fphd ({}) did not print its ready line within 30 s: {}", name, stderr_tail()));
  }

  std::string socket_, out_, err_;
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
};

// ------------------------------------------------------------------ guest side

// The log the VMM hands to fphd (fph-guest's, dirty_log.h), and the checks
// the bench makes on it.
using fph::guest::DirtyLogBitmap;
DirtyLogBitmap make_log(const GuestMemory& mem) {
  auto l = DirtyLogBitmap::create(mem.gpa_base() + mem.size());
  if (!l) throw Failure(l.error());
  return std::move(*l);
}
uint64_t unmarked_pages(const DirtyLogBitmap& log, uint64_t gpa, uint64_t len) {
  uint64_t n = 0;
  for (uint64_t g = gpa; g < gpa + len; g += kPage) n += !log.test(g);
  return n;
}

// The guest: its RAM (one memfd region) and the driver side of the
// reporting queue. The ring lives in guest memory, so it survives moving
// the device from one fphd to the other.
struct Guest {
  std::unique_ptr<GuestMemory> mem;
  uint32_t reporting_queue = 0;
  fph::guest::RingArea ring_area;
  vq::DriverRing ring;
  uint8_t* used_area = nullptr;
  uint64_t data_gpa = 0;  // first 4 MiB block after the ring slots

  uint16_t used_idx() const {
    return std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(used_area + 2)).load(std::memory_order_acquire);
  }
  // Writes one byte in every 4 KiB page: the kernel allocates each page
  // (shmem), as a guest that used the memory would have made it.
  void populate(uint64_t gpa, uint64_t len) const {
    volatile uint8_t* p = mem->translate(gpa, len);
    require(p != nullptr, "[{:#x}, +{:#x}) is outside guest memory", gpa, len);
    for (uint64_t off = 0; off < len; off += kPage) p[off] = 0x5a;
  }
  int64_t backing() const { return static_cast<int64_t>(mem->backing_bytes()); }
};

// One vhost-user connection: the VM's balloon device on one fphd.
struct Device {
  std::unique_ptr<Frontend> fe;
  UniqueFd kick, call;
  uint64_t features = 0;
};

// The rings' user addresses as fphd translates them (our mapping).
vu::VringAddr ring_addr(const Guest& g, uint32_t index, bool log) {
  auto ua = [&](uint64_t gpa, uint64_t len) { return reinterpret_cast<uint64_t>(g.mem->translate(gpa, len)); };
  const auto& r = g.ring_area;
  vu::VringAddr a;
  a.index = index;
  a.flags = log ? vu::kVringFlagLog : 0;
  a.desc_user_addr = ua(r.desc_gpa, vq::desc_table_bytes(r.num));
  a.avail_user_addr = ua(r.avail_gpa, vq::avail_ring_bytes(r.num));
  a.used_user_addr = ua(r.used_gpa, vq::used_ring_bytes(r.num));
  a.log_guest_addr = r.used_gpa;
  return a;
}

// Connects and negotiates like fph-guest (which acks LOG_SHMFD and
// DEVICE_STATE whenever offered, as QEMU does).
Device connect_device(Guest& g, const std::string& socket) {
  Device d;
  d.fe = std::make_unique<Frontend>(must(fph::guest::connect_unix(socket, 10s), "connect " + socket), 30s);
  fph::guest::FrontendOptions fo;
  fo.reporting = true;
  fo.stats = false;
  fo.epoch = true;
  const auto neg = must(d.fe->negotiate(*g.mem, fo), "negotiate");
  using namespace vu::protocol;
  const uint64_t needed = bit(kReplyAck) | bit(kLogShmfd) | bit(kDeviceState) | bit(kConfig);
  require((neg.device_protocol & needed) == needed,
          "fphd offers protocol features {:#x}, migration needs REPLY_ACK, LOG_SHMFD, DEVICE_STATE and CONFIG",
          neg.device_protocol);
  require(neg.reporting() && (neg.device_features & vu::feature::kLogAll) && neg.fph_epoch(),
          "fphd offers features {:#x}: need REPORTING, LOG_ALL and fph's epoch", neg.device_features);
  require(neg.migratable(), "negotiated protocol features {:#x}: no migration", neg.protocol);
  d.features = neg.features;
  if (g.ring.num() == 0) {
    // First connection: the ring slot of the reporting queue.
    g.reporting_queue = static_cast<uint32_t>(neg.layout.reporting);
    g.ring_area = g.mem->ring(g.reporting_queue);
    const auto& r = g.ring_area;
    g.used_area = g.mem->translate(r.used_gpa, vq::used_ring_bytes(r.num));
    g.ring = vq::DriverRing(r.num, g.mem->translate(r.desc_gpa, vq::desc_table_bytes(r.num)),
                            g.mem->translate(r.avail_gpa, vq::avail_ring_bytes(r.num)), g.used_area);
  }
  require(static_cast<uint32_t>(neg.layout.reporting) == g.reporting_queue,
          "reporting queue {} here, {} on the first fphd", neg.layout.reporting, g.reporting_queue);
  d.kick.reset(::eventfd(0, EFD_CLOEXEC));
  d.call.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  require(d.kick && d.call, "eventfd: {}", std::strerror(errno));
  return d;
}

// Starts the reporting queue at `base` (0 for a new device, the source's
// GET_VRING_BASE answer on a destination) and sets DRIVER_OK.
void start_queue(Device& d, const Guest& g, uint16_t base) {
  must(d.fe->setup_queue(g.reporting_queue, g.ring_area, *g.mem, d.kick.get(), d.call.get(), base),
       "reporting queue setup");
  must(d.fe->driver_ok(), "SET_STATUS(DRIVER_OK)");
}

// Logging on or off on a running device, as QEMU's vhost_dev_set_log does
// it: the features with or without LOG_ALL, then the ring's addresses with
// or without VHOST_VRING_F_LOG.
void set_logging(Device& d, const Guest& g, bool on) {
  must(d.fe->send(vu::Request::SetFeatures, vu::encode_u64(d.features | (on ? vu::feature::kLogAll : 0))),
       on ? "SET_FEATURES(+LOG_ALL)" : "SET_FEATURES(-LOG_ALL)");
  must(d.fe->send(vu::Request::SetVringAddr, vu::encode_vring_addr(ring_addr(g, g.reporting_queue, on))),
       "SET_VRING_ADDR (log flag)");
}

struct Pipe {
  UniqueFd r, w;
  Pipe() {
    int p[2];
    require(::pipe2(p, O_CLOEXEC) == 0, "pipe2: {}", std::strerror(errno));
    r.reset(p[0]);
    w.reset(p[1]);
  }
};

// Posts one reporting request of `blocks` 4 MiB blocks from `gpa` and
// kicks, as the Linux driver does for each request.
uint16_t post_request(Guest& g, Device& d, uint64_t gpa, uint32_t blocks) {
  std::vector<vq::Buffer> bufs;
  for (uint32_t i = 0; i < blocks; ++i) bufs.push_back({gpa + i * kBlock, static_cast<uint32_t>(kBlock), true});
  auto head = g.ring.add_chain(bufs);
  require(head.has_value(), "the reporting ring has no room for {} descriptors", blocks);
  const uint64_t one = 1;
  require(::write(d.kick.get(), &one, sizeof one) == sizeof one, "kick: {}", std::strerror(errno));
  return *head;
}

// The next used element, waiting on the call eventfd.
vq::UsedElem wait_used(Guest& g, Device& d) {
  const auto deadline = Clock::now() + kPatience;
  for (;;) {
    if (auto u = g.ring.pop_used()) return *u;
    require(Clock::now() < deadline, "no used element within {} s", kPatience.count());
    pollfd p{d.call.get(), POLLIN, 0};
    ::poll(&p, 1, 100);
    uint64_t v;
    (void)!::read(d.call.get(), &v, sizeof v);
  }
}

// ------------------------------------------------------------------ measurements

// The raw reference: populate [gpa, +bytes) again, then punch every 4 MiB
// block with `threads` threads. Milliseconds from release to the last thread.
double raw_punch_ms(const Guest& g, uint64_t gpa, uint64_t bytes, int threads) {
  g.populate(gpa, bytes);
  const auto& region = g.mem->regions().at(0);
  require(gpa >= region.gpa && gpa + bytes <= region.gpa + region.size, "raw range outside the region");
  const int64_t before = g.backing();
  const uint64_t blocks = bytes / kBlock;
  const off_t base = static_cast<off_t>(gpa - region.gpa + region.mmap_offset);
  std::atomic<uint64_t> next{0};
  std::atomic<bool> go{false};
  std::atomic<int> errors{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      for (uint64_t b; (b = next.fetch_add(1)) < blocks;)
        if (::fallocate(region.fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        base + static_cast<off_t>(b * kBlock), static_cast<off_t>(kBlock)) != 0)
          errors++;
    });
  const auto t0 = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& t : pool) t.join();
  const auto t1 = Clock::now();
  require(errors == 0, "raw fallocate(PUNCH_HOLE) failed {} times", errors.load());
  const int64_t freed = before - g.backing();
  require(freed >= static_cast<int64_t>(bytes), "raw punch freed {} bytes of {}", freed, bytes);
  return ms(t1 - t0);
}

struct MigrationSample {
  double drain_ms = 0, kick_to_reply_ms = 0, raw_ms = 0, save_ms = 0, load_ms = 0;
  uint32_t in_flight_at_stop = 0;
  size_t blob_bytes = 0;
};

// One migration of the VM from `src` (running, on fphd A) to a new session
// on fphd B; returns the destination, running.
Device migrate(Guest& g, Device& src, const std::string& dst_socket, const Options& o, uint64_t epoch,
               MigrationSample& s) {
  const uint32_t q = g.reporting_queue;
  const uint64_t request_bytes = o.blocks * kBlock;
  const uint64_t drain_bytes = o.requests * request_bytes;

  // 1. Precopy with the dirty log.
  DirtyLogBitmap log = make_log(*g.mem);
  must(src.fe->set_log_base(log.fd(), log.bytes()), "SET_LOG_BASE");
  set_logging(src, g, true);

  // 2. Requests in flight at the stop.
  g.populate(g.data_gpa, drain_bytes);
  const int64_t backing_before = g.backing();
  const uint16_t used_before = g.used_idx();
  std::set<uint16_t> posted;
  const auto t_kick = Clock::now();
  for (uint32_t r = 0; r < o.requests; ++r)
    posted.insert(post_request(g, src, g.data_gpa + r * request_bytes, o.blocks));
  const uint16_t returned_before_stop = static_cast<uint16_t>(g.used_idx() - used_before);
  const auto t_stop = Clock::now();
  const uint32_t base = must(src.fe->stop_queue(q), "stop (SET_VRING_ENABLE 0 + GET_VRING_BASE)");
  const auto t_reply = Clock::now();
  s.drain_ms = ms(t_reply - t_stop);
  s.kick_to_reply_ms = ms(t_reply - t_kick);
  s.in_flight_at_stop = o.requests - returned_before_stop;

  require(base == g.ring.avail_idx(), "GET_VRING_BASE returned {}, we published avail index {}", base,
          g.ring.avail_idx());
  for (uint32_t r = 0; r < o.requests; ++r) {
    auto u = g.ring.pop_used();
    require(u.has_value(), "GET_VRING_BASE replied with {} of {} requests not in the used ring", o.requests - r,
            o.requests);
    require(posted.erase(static_cast<uint16_t>(u->id)) == 1, "used element {} is not a head we posted", u->id);
  }
  const int64_t freed = backing_before - g.backing();
  require(freed >= static_cast<int64_t>(drain_bytes),
          "the drained requests freed {} bytes of the memfd (st_blocks), {} were reported", freed, drain_bytes);
  const uint64_t unmarked = unmarked_pages(log, g.data_gpa, drain_bytes);
  require(unmarked == 0, "{} discarded pages are not marked in the dirty log", unmarked);
  require(log.test(g.ring_area.used_gpa), "the used ring's page is not marked in the dirty log");

  // 3. The kernel work that had to finish anyway.
  s.raw_ms = raw_punch_ms(g, g.data_gpa, drain_bytes, o.threads);

  // 4. SAVE.
  std::vector<uint8_t> blob;
  {
    Pipe p;
    const auto t0 = Clock::now();
    must(src.fe->set_device_state_fd(/*load=*/false, p.w.get()), "SET_DEVICE_STATE_FD(SAVE)");
    p.w.reset();  // fphd holds its own copy; EOF comes when it closes it
    uint8_t buf[4096];
    for (ssize_t n; (n = ::read(p.r.get(), buf, sizeof buf)) != 0;) {
      require(n > 0 || errno == EINTR, "reading the saved state: {}", std::strerror(errno));
      if (n > 0) blob.insert(blob.end(), buf, buf + n);
      require(blob.size() <= devstate::kMaxBlobBytes, "saved state longer than {} bytes", devstate::kMaxBlobBytes);
    }
    const uint64_t check = must(src.fe->check_device_state(), "CHECK_DEVICE_STATE");
    s.save_ms = ms(Clock::now() - t0);
    require(check == 0, "CHECK_DEVICE_STATE after SAVE replied {}", check);
  }
  s.blob_bytes = blob.size();
  auto state = devstate::decode(blob);
  if (!state) throw Failure("the saved state does not decode: " + state.error().message());
  require(state->epoch == epoch, "the saved state has epoch {}, the VM is at epoch {}", state->epoch, epoch);

  // 5. LOAD into a fresh session on the destination.
  Device dst = connect_device(g, dst_socket);
  {
    Pipe p;
    const auto t0 = Clock::now();
    must(dst.fe->set_device_state_fd(/*load=*/true, p.r.get()), "SET_DEVICE_STATE_FD(LOAD)");
    p.r.reset();
    for (size_t off = 0; off < blob.size();) {
      const ssize_t n = ::write(p.w.get(), blob.data() + off, blob.size() - off);
      require(n > 0 || errno == EINTR, "writing the state to the destination: {}", std::strerror(errno));
      if (n > 0) off += static_cast<size_t>(n);
    }
    p.w.reset();
    const uint64_t check = must(dst.fe->check_device_state(), "CHECK_DEVICE_STATE");
    s.load_ms = ms(Clock::now() - t0);
    require(check == 0, "CHECK_DEVICE_STATE after LOAD replied {}", check);
  }
  const auto loaded_epoch = must(dst.fe->read_epoch(), "GET_CONFIG(epoch)");
  require(loaded_epoch && *loaded_epoch == epoch + 1, "the destination's epoch is {}, expected {}",
          loaded_epoch ? std::to_string(*loaded_epoch) : "unreadable", epoch + 1);
  start_queue(dst, g, static_cast<uint16_t>(base));
  return dst;
}

struct ThroughputRun {
  bool logging = false;
  double gib_per_s = 0;
  double window_ms = 0;
  uint64_t pages_logged = 0;
};

// Reclaims the S bytes from data_gpa through `dev`, logging on or off.
ThroughputRun reclaim_run(Guest& g, Device& dev, DirtyLogBitmap& log, const Options& o, bool logging) {
  ThroughputRun run;
  run.logging = logging;
  const uint64_t bytes = o.throughput_bytes;
  const uint64_t request_bytes = o.blocks * kBlock;
  log.clear();
  set_logging(dev, g, logging);
  g.populate(g.data_gpa, bytes);
  const int64_t before = g.backing();

  uint64_t next = 0;  // next byte offset to report
  uint32_t outstanding = 0;
  const auto t0 = Clock::now();
  while (next < bytes || outstanding > 0) {
    while (next < bytes && outstanding < o.inflight) {
      const uint64_t len = std::min(request_bytes, bytes - next);
      post_request(g, dev, g.data_gpa + next, static_cast<uint32_t>(len / kBlock));
      next += len;
      outstanding++;
    }
    wait_used(g, dev);
    outstanding--;
  }
  const auto t1 = Clock::now();
  const int64_t freed = before - g.backing();
  require(freed == static_cast<int64_t>(bytes), "logging {}: the memfd's st_blocks fell by {} bytes, {} were reported",
          logging ? "on" : "off", freed, bytes);
  run.window_ms = ms(t1 - t0);
  run.gib_per_s = static_cast<double>(freed) / static_cast<double>(kGiB) / (run.window_ms / 1e3);
  run.pages_logged = log.count();
  if (logging) {
    const uint64_t unmarked = unmarked_pages(log, g.data_gpa, bytes);
    require(unmarked == 0, "logging on: {} discarded pages not marked in the dirty log", unmarked);
    require(log.test(g.ring_area.used_gpa), "logging on: the used ring's page is not marked");
  } else {
    require(run.pages_logged == 0, "logging off: {} pages marked in the dirty log", run.pages_logged);
  }
  if (logging) set_logging(dev, g, false);
  return run;
}

// ------------------------------------------------------------------ report

std::string fmt_ms(double v) { return std::isnan(v) ? "-" : fmt::format("{:.2f} ms", v); }

void print_table(FILE* out, const Options& o, const json& r) {
  auto row = [&](const char* what, const json& s, const char* note) {
    std::fprintf(out, "%-36s %12s %12s   %s\n", what, fmt_ms(s["p50"].get<double>()).c_str(),
                 fmt_ms(s["p99"].get<double>()).c_str(), note);
  };
  const auto& m = r["migration"];
  std::fprintf(out, "\nfph-migration-bench: %d migrations, %u requests x %u x 4 MiB in flight at the stop "
                    "(%llu MiB), fphd %d discard thread(s)/node\n\n",
               o.migrations, o.requests, o.blocks,
               static_cast<unsigned long long>(o.requests * o.blocks * kBlock / kMiB), o.threads);
  std::fprintf(out, "%-36s %12s %12s\n", "per migration", "p50", "p99");
  row("GET_VRING_BASE drain", m["drain_ms"], "SET_VRING_ENABLE 0 sent -> GET_VRING_BASE reply");
  row("  first kick -> reply", m["kick_to_reply_ms"], "");
  row("  raw punch-hole, same bytes", m["raw_punch_ms"], "T threads, fallocate per 4 MiB block");
  std::fprintf(out, "%-36s %12.2f %12.2f   %s\n", "  drain / raw", m["drain_over_raw"]["p50"].get<double>(),
               m["drain_over_raw"]["p99"].get<double>(), "per migration");
  std::fprintf(out, "%-36s %12.0f %12.0f   %s\n", "  requests in flight at the stop",
               m["in_flight_at_stop"]["p50"].get<double>(), m["in_flight_at_stop"]["min"].get<double>(),
               "(p50, min) of K");
  row("SAVE", m["save_ms"], "SET_DEVICE_STATE_FD -> EOF -> CHECK_DEVICE_STATE");
  row("LOAD", m["load_ms"], "SET_DEVICE_STATE_FD -> write, close -> CHECK_DEVICE_STATE");
  std::fprintf(out, "%-36s %12.0f %12.0f   %s\n", "state blob (bytes)", m["blob_bytes"]["min"].get<double>(),
               m["blob_bytes"]["max"].get<double>(), "(min, max)");
  row("fphd's downtime share", m["downtime_share_ms"], "drain + SAVE + LOAD");
  const auto& t = r["throughput"];
  std::fprintf(out, "\nreclaim throughput, %llu MiB per run, %u x 4 MiB per request, %u in flight, %d pair(s)\n",
               static_cast<unsigned long long>(o.throughput_bytes / kMiB), o.blocks, o.inflight, o.pairs);
  std::fprintf(out, "%-36s %10.2f GiB/s\n", "logging off (median)", t["off_gib_per_s"]["p50"].get<double>());
  std::fprintf(out, "%-36s %10.2f GiB/s\n", "logging on (median)", t["on_gib_per_s"]["p50"].get<double>());
  std::fprintf(out, "%-36s %10.3f        (pairs: min %.3f, max %.3f)\n", "on / off (median of pairs)",
               t["on_over_off"]["median"].get<double>(), t["on_over_off"]["min"].get<double>(),
               t["on_over_off"]["max"].get<double>());
  std::fprintf(out, "%-36s %10llu pages   (every discarded page and the used ring)\n", "marked per logging-on run",
               static_cast<unsigned long long>(t["pages_logged_on"].get<uint64_t>()));
}

int run(const Options& o) {
  TempDir dir;
  dir.keep = o.keep_logs;
  const uint64_t drain_bytes = static_cast<uint64_t>(o.requests) * o.blocks * kBlock;
  const uint32_t ring_num =
      static_cast<uint32_t>(std::bit_ceil(std::max<uint64_t>(32, static_cast<uint64_t>(std::max(o.requests, o.inflight)) * o.blocks)));
  std::vector<MigrationSample> samples;
  std::vector<ThroughputRun> off_runs, on_runs;
  std::vector<double> pair_ratios;
  std::string failure;
  int fphd_exit[2] = {0, 0};
  std::string fphd_stderr[2];
  {
    Fphd a(o, dir.path, "fphd-a"), b(o, dir.path, "fphd-b");
    Fphd* hosts[2] = {&a, &b};
    try {
      Guest g;
      fph::guest::GuestMemoryOptions mo;
      // Ring slots first (one per queue index; only the reporting one is
      // used), then 4 MiB-aligned data.
      mo.ring_sizes.assign(4, static_cast<uint16_t>(ring_num));
      uint64_t ring_bytes = 0;
      fph::guest::layout_rings(0, mo.ring_sizes, &ring_bytes);
      g.data_gpa = (ring_bytes + kBlock - 1) / kBlock * kBlock;
      mo.bytes = g.data_gpa + std::max(drain_bytes, o.throughput_bytes);
      auto mem = GuestMemory::create(mo);
      if (!mem) throw Failure("guest memory: " + mem.error());
      g.mem = std::move(*mem);

      Device dev = connect_device(g, a.socket());
      start_queue(dev, g, 0);
      uint64_t epoch = 0;
      for (int i = 0; i < o.migrations; ++i) {
        MigrationSample s;
        Device dst = migrate(g, dev, hosts[(i + 1) % 2]->socket(), o, epoch, s);
        dev = std::move(dst);  // closes the source's connection: that VM is gone
        epoch++;
        samples.push_back(s);
        std::fprintf(stderr, "migration %d/%d: drain %.2f ms (raw %.2f ms, %u in flight), save %.2f ms, "
                             "load %.2f ms, blob %zu bytes\n",
                     i + 1, o.migrations, s.drain_ms, s.raw_ms, s.in_flight_at_stop, s.save_ms, s.load_ms,
                     s.blob_bytes);
      }

      // Throughput with logging off vs on on the device the last migration
      // left running.
      DirtyLogBitmap log = make_log(*g.mem);
      must(dev.fe->set_log_base(log.fd(), log.bytes()), "SET_LOG_BASE");
      for (int p = 0; p < o.pairs; ++p) {
        ThroughputRun off, on;
        if (p % 2 == 0) {
          off = reclaim_run(g, dev, log, o, false);
          on = reclaim_run(g, dev, log, o, true);
        } else {
          on = reclaim_run(g, dev, log, o, true);
          off = reclaim_run(g, dev, log, o, false);
        }
        off_runs.push_back(off);
        on_runs.push_back(on);
        pair_ratios.push_back(on.gib_per_s / off.gib_per_s);
        std::fprintf(stderr, "throughput pair %d/%d: off %.2f GiB/s, on %.2f GiB/s\n", p + 1, o.pairs,
                     off.gib_per_s, on.gib_per_s);
      }
    } catch (const Failure& e) {
      failure = e.what();
    }
    for (int h = 0; h < 2; ++h) {
      fphd_exit[h] = hosts[h]->stop();
      fphd_stderr[h] = hosts[h]->stderr_tail();
    }
  }
  for (int h = 0; h < 2; ++h)
    if (fphd_exit[h] != 0 && failure.empty())
      failure = fmt::format("fphd-{} exited with {} on SIGTERM: {}", h ? 'b' : 'a', fphd_exit[h], fphd_stderr[h]);
  if (!failure.empty()) {
    dir.keep = true;
    std::fprintf(stderr, "fph-migration-bench: FAILED: %s\n", failure.c_str());
    for (int h = 0; h < 2; ++h)
      if (!fphd_stderr[h].empty())
        std::fprintf(stderr, "--- fphd-%c stderr (tail) ---\n%s\n", h ? 'b' : 'a', fphd_stderr[h].c_str());
    if (o.json) std::printf("%s\n", json{{"bench", "fph-migration"}, {"ok", false}, {"error", failure}}.dump().c_str());
    return 1;
  }

  auto col = [&](auto field) {
    std::vector<double> v;
    for (const auto& s : samples) v.push_back(static_cast<double>(field(s)));
    return v;
  };
  std::vector<double> off_t, on_t;
  for (const auto& r : off_runs) off_t.push_back(r.gib_per_s);
  for (const auto& r : on_runs) on_t.push_back(r.gib_per_s);
  json result = {
      {"bench", "fph-migration"},
      {"ok", true},
      {"migrations", o.migrations},
      {"requests_in_flight", o.requests},
      {"blocks_per_request", o.blocks},
      {"block_bytes", kBlock},
      {"drain_bytes", drain_bytes},
      {"threads_per_node", o.threads},
      {"migration",
       {{"drain_ms", summary(col([](const MigrationSample& s) { return s.drain_ms; }))},
        {"kick_to_reply_ms", summary(col([](const MigrationSample& s) { return s.kick_to_reply_ms; }))},
        {"raw_punch_ms", summary(col([](const MigrationSample& s) { return s.raw_ms; }))},
        {"drain_over_raw", summary(col([](const MigrationSample& s) { return s.drain_ms / s.raw_ms; }))},
        {"in_flight_at_stop", summary(col([](const MigrationSample& s) { return s.in_flight_at_stop; }))},
        {"save_ms", summary(col([](const MigrationSample& s) { return s.save_ms; }))},
        {"load_ms", summary(col([](const MigrationSample& s) { return s.load_ms; }))},
        {"blob_bytes", summary(col([](const MigrationSample& s) { return s.blob_bytes; }))},
        {"downtime_share_ms",
         summary(col([](const MigrationSample& s) { return s.drain_ms + s.save_ms + s.load_ms; }))}}},
      {"throughput",
       {{"bytes_per_run", o.throughput_bytes},
        {"pairs", o.pairs},
        {"inflight", o.inflight},
        {"off_gib_per_s", summary(off_t)},
        {"on_gib_per_s", summary(on_t)},
        {"on_over_off",
         {{"median", median(pair_ratios)},
          {"min", *std::min_element(pair_ratios.begin(), pair_ratios.end())},
          {"max", *std::max_element(pair_ratios.begin(), pair_ratios.end())},
          {"per_pair", pair_ratios}}},
        {"pages_logged_on", on_runs.front().pages_logged}}},
  };
  print_table(o.json ? stderr : stdout, o, result);
  if (o.json) std::printf("%s\n", result.dump().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  for (int s : {SIGINT, SIGTERM, SIGHUP}) ::signal(s, on_fatal_signal);
  ::signal(SIGPIPE, SIG_IGN);  // a back end that closes a state pipe early is an error, not a kill
  fph::log::set_level(fph::log::Level::Warn);
  if (::access(o.fphd.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "fph-migration-bench: %s is not executable (use --fphd or FPH_BENCH_FPHD)\n",
                 o.fphd.c_str());
    return 2;
  }
  try {
    return run(o);
  } catch (const std::exception& e) {  // setup failures outside a migration (fphd did not start, ...)
    std::fprintf(stderr, "fph-migration-bench: FAILED: %s\n", e.what());
    return 1;
  }
}
