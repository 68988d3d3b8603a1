// The admin socket and fphctl against a real fphd, real fph-guest processes
// and real sockets: every command, every error class, fphctl's exit codes,
// and yank of a session whose worker is stuck in a blocking send.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <iterator>

#include "client.h"
#include "fph/common/unique_fd.h"
#include "fph/proto/channel.h"
#include "fph/proto/vhost_user.h"
#include "harness.h"

using namespace fph;
using namespace fph::test;
using nlohmann::json;
namespace vu = proto::vu;

namespace {

constexpr int64_t MiB = 1 << 20;

struct Daemon {
  TempDir dir;
  std::string admin;
  std::unique_ptr<Fphd> fphd;
  explicit Daemon(std::vector<std::string> extra = {}) {
    admin = dir.path + "/admin.sock";
    extra.insert(extra.begin(), {"--admin-socket", admin});
    fphd = std::make_unique<Fphd>(dir, extra);
  }
  ctl::AdminClient client() {
    auto c = ctl::AdminClient::connect(admin);
    if (!c) throw std::runtime_error(c.error());
    return std::move(*c);
  }
};

json ret(ctl::AdminClient& c, const std::string& cmd, const json& args = json::object()) {
  auto r = c.execute(cmd, args);
  EXPECT_TRUE(r) << (r ? "" : r.error());
  if (!r) return {};
  EXPECT_TRUE(r->contains("return")) << cmd << " " << args.dump() << " -> " << r->dump();
  return r->value("return", json());
}

std::string err_class(ctl::AdminClient& c, const std::string& cmd, const json& args = json::object()) {
  auto r = c.execute(cmd, args);
  EXPECT_TRUE(r);
  if (!r || !r->contains("error")) {
    ADD_FAILURE() << cmd << " " << args.dump() << " did not fail: " << (r ? r->dump() : "");
    return "";
  }
  EXPECT_FALSE((*r)["error"]["desc"].get<std::string>().empty());
  return (*r)["error"]["class"].get<std::string>();
}

std::unique_ptr<Process> guest(Daemon& d, const std::string& name, std::vector<std::string> extra = {}) {
  std::vector<std::string> a{guest_path(), "--connect", d.fphd->socket, "--name", name, "--memory", "256M",
                             "--resident", "16M", "--reporting-delay-ms", "200"};
  a.insert(a.end(), extra.begin(), extra.end());
  return std::make_unique<Process>(a, d.dir.path + "/" + name + ".stderr");
}

json find_session(const json& sessions, const std::string& name) {
  for (const auto& s : sessions)
    if (s["name"] == name) return s;
  return {};
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int run_fphctl(const std::vector<std::string>& args, const std::string& dir, json* out = nullptr) {
  std::vector<std::string> argv{FPH_FPHCTL_PATH};
  argv.insert(argv.end(), args.begin(), args.end());
  Process p(argv, dir + "/fphctl.stderr");
  const int rc = p.wait(60s);
  if (out) {
    // The reader thread may still be draining the pipe after exit.
    for (int i = 0; i < 50 && p.events().empty(); ++i) std::this_thread::sleep_for(20ms);
    auto ev = p.events();
    *out = ev.empty() ? json() : ev.back();
  }
  return rc;
}

}  // namespace

TEST(Admin, GreetingStatusAndSocketMode) {
  Daemon d;
  struct stat st {};
  ASSERT_EQ(stat(d.admin.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  auto c = d.client();
  EXPECT_TRUE(c.greeting()["fph"]["version"].is_string());
  EXPECT_TRUE(c.greeting()["capabilities"].is_array());
  auto s = ret(c, "query-status");
  EXPECT_EQ(s["pid"], d.fphd->proc->pid());
  EXPECT_EQ(s["sessions"], 0);
  EXPECT_EQ(s["sockets"][0], d.fphd->socket);
  auto cmds = ret(c, "query-commands");
  EXPECT_GE(cmds.size(), 12u);
  EXPECT_TRUE(ret(c, "qmp_capabilities").is_object());
  EXPECT_EQ(ret(c, "query-version")["version"], c.greeting()["fph"]["version"]);
  auto nodes = ret(c, "query-nodes");
  ASSERT_GE(nodes.size(), 1u);
  EXPECT_GT(nodes[0]["total"].get<uint64_t>(), 0u);
  EXPECT_TRUE(nodes[0]["policy"]["mode"].is_string());
  EXPECT_TRUE(nodes[0]["cpus"].is_array());
  // Raw error classes that only a raw line can produce.
  auto r = c.raw("this is not json");
  ASSERT_TRUE(r);
  EXPECT_EQ((*r)["error"]["class"], "ParseError");
  r = c.raw(R"({"arguments":{}})");
  ASSERT_TRUE(r);
  EXPECT_EQ((*r)["error"]["class"], "ParseError");
  // The connection survives bad requests.
  EXPECT_EQ(ret(c, "query-status")["running"], true);
  d.fphd->proc->signal(SIGTERM);
  EXPECT_EQ(d.fphd->proc->wait(), 0);
  EXPECT_NE(access(d.admin.c_str(), F_OK), 0) << "admin socket left behind";
}

TEST(Admin, SessionsPausePolicyAndErrors) {
  Daemon d({"--synthetic-topology", "node:2 core:1 pu:1"});
  auto g = guest(d, "vm-a");
  ASSERT_TRUE(g->wait_event("ready")) << g->stderr_text();
  auto c = d.client();

  auto s = find_session(ret(c, "query-sessions"), "vm-a");
  ASSERT_FALSE(s.is_null());
  EXPECT_EQ(s["state"], "active");
  EXPECT_GE(s["regions"].get<int>(), 1);
  EXPECT_EQ(s["memory"].get<int64_t>(), 256 * MiB);
  EXPECT_EQ(s["paused"], false);
  EXPECT_NE(std::find(s["feature-names"].begin(), s["feature-names"].end(), "FREE_PAGE_REPORTING"),
            s["feature-names"].end());
  // fph-guest acks DEFLATE_ON_OOM when fphd offers it (balloon target).
  EXPECT_NE(std::find(s["feature-names"].begin(), s["feature-names"].end(), "DEFLATE_ON_OOM"),
            s["feature-names"].end()) << s["feature-names"].dump();
  EXPECT_TRUE(s["protocol-features"].is_string());
  EXPECT_TRUE(s["counters"]["requests"].is_number());
  auto y = ret(c, "query-yank");
  ASSERT_EQ(y.size(), 1u);
  EXPECT_EQ(y[0], (json{{"type", "vm"}, {"name", "vm-a"}}));

  // pause / resume, and set-policy's per-VM form.
  EXPECT_TRUE(ret(c, "pause-reclaim", {{"vm", "vm-a"}}).is_object());
  EXPECT_EQ(find_session(ret(c, "query-sessions"), "vm-a")["paused"], true);
  EXPECT_TRUE(ret(c, "resume-reclaim", {{"vm", "vm-a"}}).is_object());
  EXPECT_EQ(find_session(ret(c, "query-sessions"), "vm-a")["paused"], false);
  EXPECT_TRUE(ret(c, "set-policy", {{"vm", "vm-a"}, {"paused", true}}).is_object());
  EXPECT_EQ(find_session(ret(c, "query-sessions"), "vm-a")["paused"], true);
  ret(c, "set-policy", {{"vm", "vm-a"}, {"paused", false}});

  // Node policy.
  EXPECT_TRUE(ret(c, "set-policy", {{"node", 1}, {"mode", "lazy"}, {"rate-limit", 1 << 20}}).is_object());
  auto nodes = ret(c, "query-nodes");
  ASSERT_EQ(nodes.size(), 2u);
  EXPECT_EQ(nodes[1]["policy"]["mode"], "lazy");
  EXPECT_EQ(nodes[1]["policy"]["rate-limit"], 1 << 20);
  EXPECT_EQ(nodes[0]["policy"]["rate-limit"], 0);

  // Every error class; none of them changes anything.
  const json before = ret(c, "query-nodes");
  EXPECT_EQ(err_class(c, "no-such-command"), "CommandNotFound");
  EXPECT_EQ(err_class(c, "pause-reclaim", {{"vm", "nope"}}), "DeviceNotFound");
  EXPECT_EQ(err_class(c, "resume-reclaim", {{"vm", "nope"}}), "DeviceNotFound");
  EXPECT_EQ(err_class(c, "set-policy", {{"node", 7}, {"mode", "eager"}}), "DeviceNotFound");
  EXPECT_EQ(err_class(c, "set-policy", {{"vm", "nope"}, {"paused", true}}), "DeviceNotFound");
  EXPECT_EQ(err_class(c, "set-policy", {{"node", 0}, {"mode", "turbo"}}), "InvalidParameter");
  EXPECT_EQ(err_class(c, "set-policy", {{"node", 0}, {"mode", "eager"}, {"rate-limit", -5}}), "InvalidParameter");
  EXPECT_EQ(err_class(c, "set-policy", {{"node", 0}, {"vm", "vm-a"}, {"mode", "eager"}}), "InvalidParameter");
  EXPECT_EQ(err_class(c, "pause-reclaim", json::object()), "InvalidParameter");
  EXPECT_EQ(err_class(c, "pause-reclaim", {{"vm", 3}}), "InvalidParameter");
  EXPECT_EQ(err_class(c, "query-status", {{"verbose", true}}), "InvalidParameter");
  EXPECT_EQ(err_class(c, "yank", {{"instances", {{{"type", "vm"}, {"name", "vm-a"}}, {{"type", "chardev"}, {"name", "x"}}}}}),
            "InvalidParameter");
  EXPECT_EQ(err_class(c, "yank", {{"instances", {{{"type", "vm"}, {"name", "vm-a"}}, {{"type", "vm"}, {"name", "nope"}}}}}),
            "DeviceNotFound");
  EXPECT_EQ(err_class(c, "detach", {{"name", "vm-a"}}), "DeviceNotFound");  // not an attach target
  EXPECT_EQ(err_class(c, "attach", {{"name", "x"}, {"path", d.dir.path + "/nothing-here.sock"}}), "GenericError");
  EXPECT_EQ(err_class(c, "attach", {{"name", "bad name!"}, {"path", d.fphd->socket}}), "GenericError");
  EXPECT_EQ(ret(c, "query-nodes")[0]["policy"], before[0]["policy"]);
  EXPECT_EQ(ret(c, "query-nodes")[1]["policy"], before[1]["policy"]);
  // A yank request naming one bad instance yanked nothing.
  ASSERT_FALSE(find_session(ret(c, "query-sessions"), "vm-a").is_null());
  EXPECT_EQ(find_session(ret(c, "query-sessions"), "vm-a")["state"], "active");

  g->signal(SIGTERM);
  EXPECT_EQ(g->wait(), 0) << g->stderr_text();
  d.fphd->proc->signal(SIGTERM);
  EXPECT_EQ(d.fphd->proc->wait(), 0) << d.fphd->proc->stderr_text();
}

TEST(Admin, AttachAndDetach) {
  Daemon d;
  const std::string fe_sock = d.dir.path + "/fe.sock";
  Process fe({guest_path(), "--listen", fe_sock, "--name", "fe", "--memory", "128M", "--resident", "8M",
              "--reconnect"},
             d.dir.path + "/fe.stderr");
  ASSERT_TRUE(fe.wait_event("listening")) << fe.stderr_text();
  auto c = d.client();
  EXPECT_TRUE(ret(c, "attach", {{"name", "att"}, {"path", fe_sock}}).is_object());
  ASSERT_TRUE(fe.wait_event("ready")) << fe.stderr_text();
  ASSERT_TRUE(eventually([&] { return !find_session(ret(c, "query-sessions"), "att").is_null(); }));
  auto st = ret(c, "query-status");
  ASSERT_EQ(st["attach"].size(), 1u);
  EXPECT_EQ(st["attach"][0]["path"], fe_sock);
  EXPECT_EQ(err_class(c, "attach", {{"name", "att"}, {"path", fe_sock}}), "GenericError");  // already attached
  EXPECT_TRUE(ret(c, "detach", {{"name", "att"}}).is_object());
  EXPECT_TRUE(eventually([&] { return find_session(ret(c, "query-sessions"), "att").is_null(); }, 60s));
  EXPECT_TRUE(ret(c, "query-status")["attach"].empty());
  EXPECT_EQ(err_class(c, "detach", {{"name", "att"}}), "DeviceNotFound");
  fe.signal(SIGTERM);
  fe.wait(60s);
  d.fphd->proc->signal(SIGTERM);
  EXPECT_EQ(d.fphd->proc->wait(), 0) << d.fphd->proc->stderr_text();
}

TEST(Admin, FphctlExitCodesAndOutput) {
  Daemon d;
  auto g = guest(d, "vm-c");
  ASSERT_TRUE(g->wait_event("ready")) << g->stderr_text();
  const std::string& dir = d.dir.path;
  json out;
  EXPECT_EQ(run_fphctl({"-s", d.admin, "--json", "status"}, dir, &out), 0);
  EXPECT_EQ(out["sessions"], 1);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "--json", "sessions"}, dir, &out), 0);
  ASSERT_TRUE(out.is_array());
  EXPECT_EQ(out[0]["name"], "vm-c");
  EXPECT_EQ(run_fphctl({"-s", d.admin, "sessions"}, dir), 0);   // table
  EXPECT_EQ(run_fphctl({"-s", d.admin, "nodes"}, dir), 0);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "yankable"}, dir), 0);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "pause", "vm-c"}, dir), 0);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "resume", "vm-c"}, dir), 0);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "set-policy", "--node", "0", "--mode", "eager"}, dir), 0);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "raw", "query-version"}, dir), 0);
  // 1: the daemon refused.
  EXPECT_EQ(run_fphctl({"-s", d.admin, "pause", "nope"}, dir), 1);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "--json", "yank", "nope"}, dir, &out), 1);
  EXPECT_EQ(out["class"], "DeviceNotFound");
  EXPECT_EQ(run_fphctl({"-s", d.admin, "set-policy", "--node", "0", "--mode", "warp"}, dir), 1);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "raw", "no-such-command"}, dir), 1);
  // 2: usage.
  EXPECT_EQ(run_fphctl({"-s", d.admin}, dir), 2);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "frobnicate"}, dir), 2);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "pause"}, dir), 2);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "raw", "query-status", "[1]"}, dir), 2);
  // 3: cannot connect.
  EXPECT_EQ(run_fphctl({"-s", dir + "/missing.sock", "status"}, dir), 3);
  g->signal(SIGTERM);
  g->wait(60s);
  d.fphd->proc->signal(SIGTERM);
  EXPECT_EQ(d.fphd->proc->wait(), 0) << d.fphd->proc->stderr_text();
}

// A front end that keeps sending GET_FEATURES and never reads the replies:
// fphd's session thread ends up blocked in send() on a full socket. Yank must
// tear that session down anyway, within a generous bound, while another
// guest keeps reclaiming.
TEST(Admin, YankTearsDownASessionStuckInSend) {
  Daemon d;
  auto c = d.client();
  // The hung front end connects to the shared socket; fphd names it after
  // this test process.
  UniqueFd hung(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, d.fphd->socket.c_str(), sizeof a.sun_path - 1);
  ASSERT_EQ(connect(hung.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  int small = 4096;
  setsockopt(hung.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  std::string hung_name;
  ASSERT_TRUE(eventually([&] {
    auto ss = ret(c, "query-sessions");
    if (ss.size() != 1) return false;
    hung_name = ss[0]["name"];
    return true;
  }));
  // Flood until our sends have stayed blocked for two seconds: fphd stopped
  // reading because it is itself blocked writing replies nobody reads.
  const vu::Header h{static_cast<uint32_t>(vu::Request::GetFeatures), vu::kVersion, 0};
  const auto bytes = vu::encode_header(h);
  auto last_progress = std::chrono::steady_clock::now();
  uint64_t sent = 0;
  while (std::chrono::steady_clock::now() - last_progress < 2s) {
    ssize_t n = send(hung.get(), bytes.data(), bytes.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(bytes.size())) {
      ++sent;
      last_progress = std::chrono::steady_clock::now();
    } else {
      ASSERT_TRUE(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) << strerror(errno);
      std::this_thread::sleep_for(50ms);
    }
    ASSERT_LT(std::chrono::steady_clock::now() - last_progress, kPatience);
  }
  EXPECT_GT(sent, 100u);

  // Meanwhile, another guest is served and reclaimed in full.
  auto g = guest(d, "healthy", {"--workload", "alloc-free:128M:1000"});
  ASSERT_TRUE(g->wait_event("ready")) << g->stderr_text();
  int64_t peak = 0;
  ASSERT_TRUE(wait_event_sampling_peak(*g, "workload_freed", &peak)) << g->stderr_text();
  EXPECT_GE(peak, 128 * MiB);
  EXPECT_TRUE(eventually([&] { return peak - memfd_allocated_bytes(g->pid()) >= 120 * MiB; }))
      << g->stderr_text() << d.fphd->proc->stderr_text();

  // The hung session is listed as yankable; yank it.
  auto y = ret(c, "query-yank");
  ASSERT_EQ(y.size(), 2u);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(ret(c, "yank", {{"instances", {{{"type", "vm"}, {"name", hung_name}}}}}).is_object());
  EXPECT_TRUE(eventually([&] { return find_session(ret(c, "query-sessions"), hung_name).is_null(); }, 30s))
      << d.fphd->proc->stderr_text();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);
  // The peer sees its connection end.
  char buf[4096];
  bool eof = eventually([&] {
    ssize_t n = recv(hung.get(), buf, sizeof buf, MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR);
  }, 30s);
  EXPECT_TRUE(eof);
  // The healthy guest is still there and still served: a second wave.
  auto s = find_session(ret(c, "query-sessions"), "healthy");
  ASSERT_FALSE(s.is_null());
  EXPECT_EQ(s["state"], "active");
  EXPECT_NE(d.fphd->proc->stderr_text().find("yanked"), std::string::npos);

  g->signal(SIGTERM);
  auto sum = g->wait_event("summary");
  ASSERT_TRUE(sum) << g->stderr_text();
  EXPECT_EQ((*sum)["corrupted_bytes"], 0);
  EXPECT_EQ(g->wait(), 0) << g->stderr_text();
  d.fphd->proc->signal(SIGTERM);
  EXPECT_EQ(d.fphd->proc->wait(), 0) << d.fphd->proc->stderr_text();
}

// The other hang: the session thread blocked in GET_VRING_BASE, which waits
// for the ring's in-flight requests, while the only in-flight request sits
// behind a rate limit the test controls (8 KiB/s: hours for its megabytes).
// fph-guest on SIGTERM waits 5 s for its requests, then sends GET_VRING_BASE
// and waits for the reply. Yank must end that session at once; afterwards
// the limit is lifted and a new guest is reclaimed in full.
TEST(Admin, YankTearsDownASessionStuckInGetVringBase) {
  Daemon d({"--rate-limit", "8192"});
  auto c = d.client();
  auto stuck = guest(d, "stuck", {"--workload", "alloc-free:64M:200"});
  ASSERT_TRUE(stuck->wait_event("ready")) << stuck->stderr_text();
  ASSERT_TRUE(stuck->wait_event("workload_freed")) << stuck->stderr_text();
  ASSERT_TRUE(eventually([&] {
    auto s = find_session(ret(c, "query-sessions"), "stuck");
    return !s.is_null() && s["counters"]["inflight"].get<int>() > 0;
  })) << d.fphd->proc->stderr_text();
  stuck->signal(SIGTERM);
  // The guest gave up waiting and sent GET_VRING_BASE.
  ASSERT_TRUE(eventually([&] {
    return stuck->stderr_text().find("stopping the rings anyway") != std::string::npos;
  })) << stuck->stderr_text();
  std::this_thread::sleep_for(1s);
  // Still there, still stuck: nothing but a yank ends it now.
  auto s = find_session(ret(c, "query-sessions"), "stuck");
  ASSERT_FALSE(s.is_null());
  EXPECT_GT(s["counters"]["inflight"].get<int>(), 0);
  EXPECT_TRUE(stuck->running());

  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(ret(c, "yank", {{"instances", {{{"type", "vm"}, {"name", "stuck"}}}}}).is_object());
  EXPECT_TRUE(eventually([&] { return find_session(ret(c, "query-sessions"), "stuck").is_null(); }, 30s))
      << d.fphd->proc->stderr_text();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);
  // The guest's GET_VRING_BASE fails (connection closed): it exits.
  EXPECT_NE(stuck->wait(60s), 128 + SIGKILL) << stuck->stderr_text();

  // The daemon is fine: lift the limit, a new guest is reclaimed.
  EXPECT_TRUE(ret(c, "set-policy", {{"node", 0}, {"rate-limit", 0}}).is_object());
  auto g = guest(d, "after", {"--workload", "alloc-free:64M:1000"});
  ASSERT_TRUE(g->wait_event("ready")) << g->stderr_text();
  int64_t peak = 0;
  ASSERT_TRUE(wait_event_sampling_peak(*g, "workload_freed", &peak)) << g->stderr_text();
  EXPECT_GE(peak, 64 * MiB);
  EXPECT_TRUE(eventually([&] { return peak - memfd_allocated_bytes(g->pid()) >= 60 * MiB; }))
      << g->stderr_text();
  g->signal(SIGTERM);
  EXPECT_EQ(g->wait(), 0) << g->stderr_text();
  d.fphd->proc->signal(SIGTERM);
  EXPECT_EQ(d.fphd->proc->wait(), 0) << d.fphd->proc->stderr_text();
}

// Pausing a VM's reclaim through fphctl: while paused, what the guest
// reports is skipped (reason "paused") and nothing of it is discarded, and
// the reclaim state says so; after resume, discarding continues.
TEST(Admin, PauseThroughFphctlSkipsReclaimAndResumeRestoresIt) {
  Daemon d({"--backoff", "off"});  // only "paused" may skip here (backoff: test_policy.cpp)
  Process g({guest_path(), "--connect", d.fphd->socket, "--name", "pz", "--memory", "256M",
             "--workload", "churn:128M:600", "--reporting-delay-ms", "100"},
            d.dir.path + "/pz.stderr");
  ASSERT_TRUE(g.wait_event("ready")) << g.stderr_text();
  auto fphctl = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {FPH_FPHCTL_PATH, "--socket", d.admin});
    Process p(args, d.dir.path + "/fphctl.stderr");
    return p.wait();
  };
  auto discarded = [&] { return metric_sum(d.fphd->scrape(), "fphd_discarded_bytes_total", {{"vm", "pz"}}); };
  auto paused_skips = [&] {
    return metric_sum(d.fphd->scrape(), "fphd_skipped_bytes_total", {{"vm", "pz"}, {"reason", "paused"}});
  };
  ASSERT_TRUE(eventually([&] { return discarded() > 0; })) << g.stderr_text();
  ASSERT_EQ(fphctl({"pause", "pz"}), 0);
  // Once one request taken after the pause has come back skipped, every
  // later one is taken after it too (one request in flight, like Linux).
  ASSERT_TRUE(eventually([&] { return paused_skips() > 0; })) << d.fphd->scrape();
  const double d0 = discarded();
  const double s0 = paused_skips();
  ASSERT_TRUE(eventually([&] { return paused_skips() >= s0 + 16.0 * MiB; })) << d.fphd->scrape();
  EXPECT_EQ(discarded(), d0) << "discarded while paused";
  EXPECT_TRUE(eventually([&] {  // the state gauge is sampled once a second
    return metric_sum(d.fphd->scrape(), "fphd_vm_reclaim_state", {{"vm", "pz"}, {"state", "paused"}}) == 1;
  }));
  EXPECT_EQ(discarded(), d0) << "discarded while paused";
  ASSERT_EQ(fphctl({"resume", "pz"}), 0);
  ASSERT_TRUE(eventually([&] { return discarded() >= d0 + 16.0 * MiB; })) << d.fphd->scrape();
  ASSERT_TRUE(eventually([&] {
    return metric_sum(d.fphd->scrape(), "fphd_vm_reclaim_state", {{"vm", "pz"}, {"state", "active"}}) == 1;
  }));
  g.signal(SIGTERM);
  auto s = g.wait_event("summary");
  ASSERT_TRUE(s);
  EXPECT_EQ((*s)["corrupted_bytes"].get<int64_t>(), 0);
}

// What each VM got back, through fphctl: `sessions --json` carries the
// kernel-verified reclaimed bytes (the very counter /metrics shows), the
// refaulted bytes and the headroom; `top` prints the VM, a table per refresh.
TEST(Admin, FphctlShowsWhatEachVmGotBack) {
  Daemon d({"--stats-interval", "1"});
  Process g({guest_path(), "--connect", d.fphd->socket, "--name", "back", "--memory", "256M", "--workload",
             "alloc-free:128M:500", "--reporting-delay-ms", "100"},
            d.dir.path + "/back.stderr");
  ASSERT_TRUE(g.wait_event("ready")) << g.stderr_text();
  ASSERT_TRUE(g.wait_event("workload_freed")) << g.stderr_text();
  auto reclaimed = [&] { return metric_sum(d.fphd->scrape(), "fphd_reclaimed_bytes_total", {{"vm", "back"}}); };
  ASSERT_TRUE(eventually([&] { return reclaimed() >= 64.0 * MiB; })) << d.fphd->scrape();
  // The counter may still move between a scrape and fphctl: wait until the
  // scrape before, fphctl's figure and the scrape after agree.
  json s;
  double before = -1, after = -2;
  ASSERT_TRUE(eventually([&] {
    before = reclaimed();
    json out;
    if (run_fphctl({"-s", d.admin, "--json", "sessions"}, d.dir.path, &out) != 0) return false;
    s = find_session(out, "back");
    after = reclaimed();
    return !s.is_null() && s["headroom-bytes"].is_number() && before == after &&
           s["reclaimed-bytes"].get<double>() == after;
  })) << s.dump() << " before " << before << " after " << after;
  EXPECT_GT(s["reclaimed-bytes"].get<uint64_t>(), 0u);
  EXPECT_TRUE(s["refaulted-bytes"].is_number_unsigned()) << s.dump();
  EXPECT_GE(s["reported-bytes"].get<uint64_t>(), s["discarded-bytes"].get<uint64_t>());
  EXPECT_GE(s["discarded-bytes"].get<uint64_t>(), s["reclaimed-bytes"].get<uint64_t>());
  EXPECT_LT(s["headroom-bytes"].get<uint64_t>(), 256u * MiB);
  EXPECT_EQ(run_fphctl({"-s", d.admin, "sessions"}, d.dir.path), 0);  // the table

  // top: not a terminal, so one table per refresh and no escape codes.
  const std::string top_out = d.dir.path + "/top.out";
  Process top({"/bin/sh", "-c",
               std::string("exec ") + FPH_FPHCTL_PATH + " -s " + d.admin + " top --count 2 --interval 1 > " + top_out},
              d.dir.path + "/top.stderr");
  EXPECT_EQ(top.wait(30s), 0) << top.stderr_text();
  std::ifstream f(top_out);
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("back"), std::string::npos) << text;
  EXPECT_NE(text.find("RECLAIM/S"), std::string::npos) << text;
  EXPECT_EQ(text.find('\x1b'), std::string::npos) << "escape codes in a pipe: " << text;
  size_t tables = 0;
  for (size_t p = 0; (p = text.find("fphctl top", p)) != std::string::npos; ++p) ++tables;
  EXPECT_EQ(tables, 2u) << text;
  // SIGINT ends an open-ended top with exit code 0.
  Process top2({FPH_FPHCTL_PATH, "-s", d.admin, "top", "--interval", "0.2"}, d.dir.path + "/top2.stderr");
  std::this_thread::sleep_for(1s);
  top2.signal(SIGINT);
  EXPECT_EQ(top2.wait(10s), 0) << top2.stderr_text();

  g.signal(SIGTERM);
  auto sum = g.wait_event("summary");
  ASSERT_TRUE(sum);
  EXPECT_EQ((*sum)["corrupted_bytes"].get<int64_t>(), 0);
}

// The balloon target in bytes through fphctl: refused with the VM named when
// larger than the guest, written to the config space as num_pages, shown by
// `fphctl sessions`, and remembered by VM name: the guest's reconnect after
// an fphd restart (same --state-dir) finds the same target in place.
TEST(Admin, BalloonTargetInBytesSurvivesAnFphdRestart) {
  TempDir state_dir;
  const std::string state = state_dir.path + "/fphd";  // created by fphd
  Daemon d({"--state-dir", state});
  auto g = guest(d, "bt1", {"--reconnect"});
  ASSERT_TRUE(g->wait_event("ready")) << g->stderr_text();

  json out;
  EXPECT_EQ(run_fphctl({"-s", d.admin, "set-balloon", "bt1", "1T"}, d.dir.path), 1);
  EXPECT_NE(read_file(d.dir.path + "/fphctl.stderr").find("more than VM 'bt1' has"), std::string::npos)
      << read_file(d.dir.path + "/fphctl.stderr");
  EXPECT_EQ(run_fphctl({"-s", d.admin, "set-balloon", "bt1", "12X"}, d.dir.path), 2);
  ASSERT_EQ(run_fphctl({"-s", d.admin, "--json", "set-balloon", "bt1", "64M"}, d.dir.path, &out), 0);
  EXPECT_EQ(out["target"], 64 * MiB);
  EXPECT_EQ(out["num-pages"], 64 * MiB / 4096);
  EXPECT_EQ(out["remembered"], true) << out.dump();
  auto c = d.client();
  EXPECT_EQ(find_session(ret(c, "query-sessions"), "bt1")["balloon"]["target"], 64 * MiB);
  ASSERT_EQ(run_fphctl({"-s", d.admin, "sessions"}, d.dir.path), 0);

  // Restart fphd: the guest reconnects under its name and its target is back.
  d.fphd->proc->signal(SIGTERM);
  ASSERT_EQ(d.fphd->proc->wait(), 0);
  d.fphd = std::make_unique<Fphd>(d.dir, std::vector<std::string>{"--admin-socket", d.admin, "--state-dir", state});
  ASSERT_TRUE(g->wait_event("reconnected")) << g->stderr_text();
  auto c2 = d.client();
  json s;
  EXPECT_TRUE(eventually([&] {
    s = find_session(ret(c2, "query-sessions"), "bt1");
    return !s.is_null();
  }));
  EXPECT_EQ(s["num-pages"], 64 * MiB / 4096) << s.dump();
  EXPECT_NE(d.fphd->proc->stderr_text().find("balloon target restored"), std::string::npos);

  // 0 forgets it: the next fphd starts without a target for bt1.
  ASSERT_EQ(run_fphctl({"-s", d.admin, "--json", "set-balloon", "bt1", "0"}, d.dir.path, &out), 0);
  EXPECT_EQ(read_file(state + "/balloon-targets"), "");
  g->signal(SIGTERM);
  EXPECT_EQ(g->wait(), 0) << g->stderr_text();
}
