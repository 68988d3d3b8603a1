#include "fph/daemon/server.h"

#include <pthread.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <system_error>
#include <fstream>
#include <sstream>

#include "fph/common/log.h"

namespace fph::daemon {

namespace {

std::string first_field(const std::string& v) {
  // QEMU: "-name guest=foo,debug-threads=on" or "-name foo,process=bar".
  std::string s = v;
  if (s.rfind("guest=", 0) == 0) s = s.substr(6);
  return s.substr(0, s.find(','));
}

bool valid_name(const std::string& n) {
  if (n.empty() || n.size() > 64) return false;
  for (char c : n)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) return false;
  return true;
}


Expected<UniqueFd, std::string> connect_to(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) return unexpected("socket path too long: " + path);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    return unexpected("connect " + path + ": " + std::strerror(errno));
  return fd;
}

}  // namespace

std::string name_from_cmdline(const std::vector<std::string>& argv) {
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    std::string v;
    if ((a == "-name" || a == "--name") && i + 1 < argv.size()) v = argv[i + 1];
    else if (a.rfind("--name=", 0) == 0) v = a.substr(7);
    else if (a.rfind("-name=", 0) == 0) v = a.substr(6);
    else continue;
    v = first_field(v);
    if (valid_name(v)) return v;
  }
  return {};
}

std::string name_from_peer(int sock, uint64_t conn_no) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.pid <= 0)
    return "conn-" + std::to_string(conn_no);
  std::ifstream in("/proc/" + std::to_string(cred.pid) + "/cmdline", std::ios::binary);
  std::vector<std::string> argv;
  for (std::string arg; std::getline(in, arg, '\0');) argv.push_back(arg);
  if (auto n = name_from_cmdline(argv); !n.empty()) return n;
  std::ifstream comm("/proc/" + std::to_string(cred.pid) + "/comm");
  std::string c;
  std::getline(comm, c);
  if (!valid_name(c)) c = "pid";
  return c + "-" + std::to_string(cred.pid);
}

Server::Server(DaemonContext& ctx, ServerConfig cfg)
    : ctx_(ctx), cfg_(std::move(cfg)), stop_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
      reap_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

Server::~Server() { stop(); }

Expected<void, std::string> Server::start() {
  for (auto& in : cfg_.inherited) {
    UniqueFd fd(in.fd);
    in.fd = -1;
    if (!in.fixed_name.empty() && !valid_name(in.fixed_name))
      return unexpected("invalid VM name '" + in.fixed_name + "'");
    listeners_.push_back({std::move(fd), in.path, in.fixed_name, false});
  }
  for (const auto& p : cfg_.listen) {
    auto fd = listen_unix(p, cfg_.socket_mode);
    if (!fd) return unexpected(fd.error());
    listeners_.push_back({std::move(*fd), p, "", true});
  }
  for (const auto& v : cfg_.vm_sockets) {
    if (!valid_name(v.name)) return unexpected("invalid VM name '" + v.name + "'");
    auto fd = listen_unix(v.path, cfg_.socket_mode);
    if (!fd) return unexpected(fd.error());
    listeners_.push_back({std::move(*fd), v.path, v.name, true});
  }
  for (const auto& a : cfg_.attach)
    if (!valid_name(a.name)) return unexpected("invalid VM name '" + a.name + "'");
  if (!listeners_.empty())
    accept_thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "fph-accept");
      accept_loop();
    });
  for (const auto& a : cfg_.attach) {
    auto t = std::make_shared<AttachTarget>();
    t->target = a;
    start_attach(std::move(t));
  }
  return {};
}

std::vector<std::string> Server::socket_paths() const {
  std::vector<std::string> v;
  for (const auto& l : listeners_) v.push_back(l.path);
  return v;
}

std::string Server::unique_name(const std::string& base) {
  // Called with mu_ held.
  if (!sessions_.count(base)) return base;
  for (int i = 2;; ++i) {
    std::string n = base + "-" + std::to_string(i);
    if (!sessions_.count(n)) return n;
  }
}

void Server::run_session(UniqueFd sock, std::string base_name) {
  std::shared_ptr<Session> s;
  {
    std::lock_guard lk(mu_);
    if (stopping_) return;
    const std::string name = unique_name(base_name);
    s = std::make_shared<Session>(ctx_, std::move(sock), name);
    sessions_[name] = s;
    // "vm:NAME" in top -H and perf (the kernel keeps 15 characters).
    pthread_setname_np(pthread_self(), ("vm:" + name).substr(0, 15).c_str());
  }
  s->run();
  std::lock_guard lk(mu_);
  sessions_.erase(s->name());
}

void Server::accept_loop() {
  std::vector<pollfd> fds;
  for (const auto& l : listeners_) fds.push_back({l.fd.get(), POLLIN, 0});
  fds.push_back({reap_fd_.get(), POLLIN, 0});
  fds.push_back({stop_fd_.get(), POLLIN, 0});
  const size_t n_listeners = listeners_.size();
  while (!stopping_) {
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      log::error("server", "poll: {}", std::strerror(errno));
      return;
    }
    if (fds.back().revents) return;
    if (fds[n_listeners].revents) {
      uint64_t v;
      (void)!::read(reap_fd_.get(), &v, sizeof v);
      reap_finished_sessions();
    }
    for (size_t i = 0; i < n_listeners; ++i) {
      if (!(fds[i].revents & POLLIN)) continue;
      UniqueFd c(::accept4(fds[i].fd, nullptr, nullptr, SOCK_CLOEXEC));
      if (!c) {
        log::warn("server", "accept on {}: {}", listeners_[i].path, std::strerror(errno));
        continue;
      }
      const uint64_t n = ++conn_no_;
      std::string name = listeners_[i].fixed_name.empty() ? name_from_peer(c.get(), n)
                                                          : listeners_[i].fixed_name;
      reap_finished_sessions();
      std::lock_guard lk(mu_);
      if (stopping_) return;
      try {
        session_threads_.emplace(n, std::thread([this, n, c = std::move(c), name]() mutable {
          run_session(std::move(c), name);
          std::lock_guard lk(mu_);
          finished_sessions_.push_back(n);
          uint64_t one = 1;
          (void)!::write(reap_fd_.get(), &one, sizeof one);  // the accept thread joins it
        }));
      } catch (const std::system_error& e) {
        // Out of threads or memory: this connection is refused (its fd is
        // closed with the lambda), every running VM keeps being served.
        log::error("server", "connection {} on {}: cannot start its session thread: {}; connection "
                   "closed", n, listeners_[i].path, e.what());
      }
    }
  }
}

void Server::reap_finished_sessions() {
  std::vector<std::thread> done;
  {
    std::lock_guard lk(mu_);
    for (uint64_t n : finished_sessions_) {
      auto it = session_threads_.find(n);
      if (it == session_threads_.end()) continue;
      done.push_back(std::move(it->second));
      session_threads_.erase(it);
    }
    finished_sessions_.clear();
  }
  // Each has returned from run_session and is only unwinding: quick joins.
  for (auto& t : done) t.join();
}

void Server::start_attach(std::shared_ptr<AttachTarget> a) {
  a->wake.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  std::lock_guard lk(mu_);
  if (stopping_) return;  // stop() has already collected the threads to join
  a->thread = std::thread([this, a] {
    pthread_setname_np(pthread_self(), "fph-attach");
    attach_loop(a);
  });
  attach_.push_back(std::move(a));
}

void Server::attach_loop(std::shared_ptr<AttachTarget> a) {
  // Connect out to a front end that listens (QEMU "server=on", fph-guest
  // --listen), and again after it goes away, until fphd stops or the target
  // is detached.
  const NamedPath& target = a->target;
  bool warned = false;
  auto pause = [&] {
    pollfd p[2] = {{stop_fd_.get(), POLLIN, 0}, {a->wake.get(), POLLIN, 0}};
    ::poll(p, 2, 200);
  };
  while (!stopping_ && !a->stop) {
    Expected<UniqueFd, std::string> fd = std::move(a->first);
    if (!*fd) fd = connect_to(target.path);
    if (!fd) {
      if (!warned) log::info("server", "attach {}: {} (retrying)", target.name, fd.error());
      warned = true;
      pause();
      continue;
    }
    warned = false;
    ++conn_no_;
    run_session(std::move(*fd), target.name);
    pause();
  }
}

Expected<void, std::string> Server::attach(const std::string& name, const std::string& path) {
  if (!valid_name(name)) return unexpected("invalid VM name '" + name + "'");
  {
    std::lock_guard lk(mu_);
    if (stopping_) return unexpected(std::string("fphd is stopping"));
    for (const auto& a : attach_)
      if (a->target.name == name && !a->stop)
        return unexpected("already attached to '" + name + "' (" + a->target.path + ")");
  }
  auto fd = connect_to(path);
  if (!fd) return unexpected(fd.error());
  auto t = std::make_shared<AttachTarget>();
  t->target = {name, path};
  t->first = std::move(*fd);
  log::info("server", "attach {}: connected to {}", name, path);
  start_attach(std::move(t));
  return {};
}

bool Server::detach(const std::string& name) {
  std::shared_ptr<AttachTarget> t;
  {
    std::lock_guard lk(mu_);
    for (auto it = attach_.begin(); it != attach_.end(); ++it) {
      if ((*it)->target.name == name && !(*it)->stop) {
        t = *it;
        break;
      }
    }
    if (!t) return false;
    t->stop = true;
    uint64_t one = 1;
    (void)!::write(t->wake.get(), &one, sizeof one);
    if (auto s = sessions_.find(name); s != sessions_.end()) s->second->request_stop();
  }
  log::info("server", "detach {}", name);
  // The thread is joined by stop(); it exits as soon as its session ends.
  return true;
}

std::vector<NamedPath> Server::attach_targets() const {
  std::lock_guard lk(mu_);
  std::vector<NamedPath> v;
  for (const auto& a : attach_)
    if (!a->stop) v.push_back(a->target);
  return v;
}

std::shared_ptr<Session> Server::find(const std::string& name) const {
  std::lock_guard lk(mu_);
  auto it = sessions_.find(name);
  return it == sessions_.end() ? nullptr : it->second;
}

bool Server::yank(const std::string& name) {
  auto s = find(name);
  if (!s) return false;
  s->yank();
  return true;
}

void Server::stop() {
  if (stopping_.exchange(true)) return;
  uint64_t one = 1;
  (void)!::write(stop_fd_.get(), &one, sizeof one);
  // Sessions first: an attach thread is inside run_session() until its
  // session ends.
  {
    std::lock_guard lk(mu_);
    for (auto& [n, s] : sessions_) s->request_stop();
  }
  if (accept_thread_.joinable()) accept_thread_.join();
  std::vector<std::shared_ptr<AttachTarget>> attach;
  {
    std::lock_guard lk(mu_);
    attach = attach_;  // no new ones: attach() refuses once stopping_
  }
  for (auto& a : attach)
    if (a->thread.joinable()) a->thread.join();
  std::vector<std::thread> threads;
  {
    std::lock_guard lk(mu_);
    for (auto& [n, s] : sessions_) s->request_stop();
    for (auto& [n, t] : session_threads_) threads.push_back(std::move(t));
    session_threads_.clear();
    finished_sessions_.clear();
  }
  for (auto& t : threads)
    if (t.joinable()) t.join();
  for (const auto& l : listeners_)
    if (l.unlink) ::unlink(l.path.c_str());
}

std::vector<std::shared_ptr<Session>> Server::sessions() const {
  std::lock_guard lk(mu_);
  std::vector<std::shared_ptr<Session>> v;
  for (const auto& [n, s] : sessions_) v.push_back(s);
  return v;
}

Expected<UniqueFd, std::string> listen_unix(const std::string& path, unsigned mode) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) return unexpected("socket path too long: " + path);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return unexpected(std::string("socket: ") + std::strerror(errno));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  // Created with the final permissions: never briefly more accessible.
  const mode_t old = ::umask(0777 & ~mode);
  const int rc = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  const int err = errno;
  ::umask(old);
  if (rc != 0) return unexpected("bind " + path + ": " + std::strerror(err));
  if (::listen(fd.get(), 64) != 0) return unexpected("listen " + path + ": " + std::strerror(errno));
  return fd;
}

}  // namespace fph::daemon
