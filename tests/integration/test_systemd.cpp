// fphd under a service manager, without systemd: a datagram socket stands in
// for NOTIFY_SOCKET (READY, STATUS, WATCHDOG, STOPPING), and listening
// sockets are passed as fd 3, 4 with LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES
// to a forked and exec'ed fphd, as systemd does.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "client.h"
#include "fph/common/unique_fd.h"
#include "harness.h"

using namespace fph;
using namespace fph::test;
using nlohmann::json;

namespace {

sockaddr_un unix_addr(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  return a;
}

UniqueFd listening(const std::string& path) {
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  auto a = unix_addr(path);
  EXPECT_EQ(bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  EXPECT_EQ(listen(fd.get(), 16), 0);
  return fd;
}

// fork + exec fphd with `env` added and `fds` as 3, 4, ... Only
// async-signal-safe calls after fork (the test process has threads): the
// environment is built before, and LISTEN_PID, which only the child knows,
// is set by a shell that then execs fphd under the same pid.
pid_t spawn(const std::vector<std::string>& argv, std::vector<std::string> env,
            const std::vector<int>& fds, const std::string& fdnames, const std::string& log) {
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  if (!fds.empty()) {
    env.push_back("LISTEN_FDS=" + std::to_string(fds.size()));
    env.push_back("LISTEN_FDNAMES=" + fdnames);
  }
  std::vector<std::string> sh{"/bin/sh", "-c",
                              fds.empty() ? "exec \"$0\" \"$@\"" : "LISTEN_PID=$$ exec \"$0\" \"$@\""};
  sh.insert(sh.end(), argv.begin(), argv.end());
  std::vector<char*> args, envp;
  for (auto& a : sh) args.push_back(a.data());
  args.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  const int out = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  pid_t pid = fork();
  if (pid != 0) {
    close(out);
    return pid;
  }
  dup2(out, 1);
  dup2(out, 2);
  int high[8];
  for (size_t i = 0; i < fds.size() && i < 8; ++i) high[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 100);
  for (size_t i = 0; i < fds.size() && i < 8; ++i) dup2(high[i], 3 + static_cast<int>(i));
  execve(args[0], args.data(), envp.data());
  _exit(127);
}

int wait_exit(pid_t pid, std::chrono::seconds timeout = std::chrono::duration_cast<std::chrono::seconds>(kPatience)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int st = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    std::this_thread::sleep_for(50ms);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &st, 0);
  return -1;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Reads notify datagrams until one contains `what`; returns all seen.
bool wait_notify(int fd, const std::string& what, std::vector<std::string>* seen) {
  const auto deadline = std::chrono::steady_clock::now() + kPatience;
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;
    char buf[4096];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) continue;
    seen->emplace_back(buf, static_cast<size_t>(n));
    if (seen->back().find(what) != std::string::npos) return true;
  }
  return false;
}

}  // namespace

TEST(Systemd, NotifyReadyStatusWatchdogStopping) {
  TempDir dir;
  const std::string ns = dir.path + "/notify";
  UniqueFd nfd(socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  auto a = unix_addr(ns);
  ASSERT_EQ(bind(nfd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  const std::string log = dir.path + "/fphd.log";
  pid_t pid = spawn({fphd_path(), "--listen", dir.path + "/s.sock", "--metrics", "off"},
                    {"NOTIFY_SOCKET=" + ns, "WATCHDOG_USEC=400000"}, {}, "", log);
  std::vector<std::string> seen;
  ASSERT_TRUE(wait_notify(nfd.get(), "READY=1", &seen)) << slurp(log);
  EXPECT_NE(seen.back().find("STATUS=serving 1 socket(s)"), std::string::npos) << seen.back();
  // Pings at half of WATCHDOG_USEC: a few must come (no rate asserted).
  int pings = 0;
  for (int i = 0; i < 3; ++i) {
    std::vector<std::string> more;
    ASSERT_TRUE(wait_notify(nfd.get(), "WATCHDOG=1", &more)) << slurp(log);
    ++pings;
  }
  EXPECT_EQ(pings, 3);
  kill(pid, SIGTERM);
  ASSERT_TRUE(wait_notify(nfd.get(), "STOPPING=1", &seen)) << slurp(log);
  EXPECT_EQ(wait_exit(pid), 0) << slurp(log);
}

TEST(Systemd, SocketActivationAndRestartOnTheSameSockets) {
  TempDir dir;
  const std::string vsock = dir.path + "/act.sock";
  const std::string asock = dir.path + "/adm.sock";
  UniqueFd v = listening(vsock);
  UniqueFd ad = listening(asock);
  const std::string log = dir.path + "/fphd.log";
  // No --listen, no --admin-socket: both come from the "manager".
  pid_t pid = spawn({fphd_path(), "--metrics", "off"}, {}, {v.get(), ad.get()}, "vhost-user:admin", log);
  auto c = ctl::AdminClient::connect(asock);
  ASSERT_TRUE(c) << c.error() << slurp(log);
  auto st = c->execute("query-status");
  ASSERT_TRUE(st);
  EXPECT_EQ((*st)["return"]["sockets"], json::array({vsock})) << st->dump();

  Process g({guest_path(), "--connect", vsock, "--name", "act", "--memory", "128M", "--resident", "8M",
             "--reconnect"},
            dir.path + "/g.stderr");
  ASSERT_TRUE(g.wait_event("ready")) << g.stderr_text() << slurp(log);
  auto ss = c->execute("query-sessions");
  ASSERT_TRUE(ss);
  ASSERT_EQ((*ss)["return"].size(), 1u);
  EXPECT_EQ((*ss)["return"][0]["name"], "act");

  kill(pid, SIGTERM);
  EXPECT_EQ(wait_exit(pid), 0) << slurp(log);
  // The manager's socket files are not fphd's to remove.
  EXPECT_EQ(access(vsock.c_str(), F_OK), 0);
  EXPECT_EQ(access(asock.c_str(), F_OK), 0);

  // A new fphd on the same inherited sockets: the guest reconnects.
  pid = spawn({fphd_path(), "--metrics", "off"}, {}, {v.get(), ad.get()}, "vhost-user:admin", log + "2");
  ASSERT_TRUE(g.wait_event("reconnected")) << g.stderr_text() << slurp(log + "2");
  auto c2 = ctl::AdminClient::connect(asock);
  ASSERT_TRUE(c2) << c2.error();
  EXPECT_TRUE(eventually([&] {
    auto r = c2->execute("query-sessions");
    return r && (*r)["return"].size() == 1;
  }, 60s));
  g.signal(SIGTERM);
  EXPECT_EQ(g.wait(), 0) << g.stderr_text();
  kill(pid, SIGTERM);
  EXPECT_EQ(wait_exit(pid), 0) << slurp(log + "2");
}
