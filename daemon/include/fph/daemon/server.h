// Accepts and attaches vhost-user connections and runs one Session per VM.
//
// VM names (DESIGN section 7). A connection carries no VM name, so fphd
// derives one, stable for the life of the connection, in this order:
//   1. the name configured for the socket: `--vm NAME=PATH` (a listening
//      socket dedicated to one VM) or `--attach NAME=PATH` (fphd connects to
//      the front end's server socket);
//   2. on a shared `--listen PATH` socket, the peer process found with
//      SO_PEERCRED: QEMU's `-name guest=NAME,...` / `-name NAME`, or
//      fph-guest's `--name NAME`, from /proc/PID/cmdline;
//   3. otherwise "<comm>-<pid>", or "conn-<n>" when not even the pid is known.
// A name already in use by a live session gets "-2", "-3", ... appended.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"
#include "fph/daemon/session.h"

namespace fph::daemon {

struct NamedPath {
  std::string name;
  std::string path;
};

// A listening socket made by someone else (socket activation). The server
// owns the fd from start() on and never unlinks its path.
struct InheritedListener {
  int fd = -1;
  std::string path;        // for logs and socket_paths()
  std::string fixed_name;  // empty: a shared socket, names from the peer
};

struct ServerConfig {
  std::vector<std::string> listen;   // shared listening sockets
  std::vector<InheritedListener> inherited;
  std::vector<NamedPath> vm_sockets; // one listening socket per VM
  std::vector<NamedPath> attach;     // connect out to a front end's server socket
  unsigned socket_mode = 0660;       // permissions of the sockets we create
};

// The VM name in a process's argv (QEMU -name, fph-guest --name), or "".
std::string name_from_cmdline(const std::vector<std::string>& argv);
// Steps 2 and 3 above for a connected socket.
std::string name_from_peer(int sock, uint64_t conn_no);

// A listening Unix stream socket at `path`, created with permissions `mode`
// (the umask is narrowed around bind, so it is never briefly more
// accessible); a stale socket file there is replaced. Shared by the VM
// sockets and the admin socket.
Expected<UniqueFd, std::string> listen_unix(const std::string& path, unsigned mode);

class Server {
 public:
  Server(DaemonContext& ctx, ServerConfig cfg);
  ~Server();

  // Creates the listening sockets (removing stale socket files first).
  Expected<void, std::string> start();
  // Paths of all listening sockets.
  std::vector<std::string> socket_paths() const;
  // Stops accepting, stops every session (each drains its in-flight
  // requests), joins all threads.
  void stop();

  std::vector<std::shared_ptr<Session>> sessions() const;
  std::shared_ptr<Session> find(const std::string& name) const;

  // Admin commands. Never wait on a session.
  // Yank: false if no session has that name.
  bool yank(const std::string& name);
  // Connects to `path` now (error if that fails), serves it as VM `name`
  // and reconnects after it goes away, like --attach.
  Expected<void, std::string> attach(const std::string& name, const std::string& path);
  // Stops reconnecting to an attach target and ends its session. False if
  // there is no attach target of that name.
  bool detach(const std::string& name);
  std::vector<NamedPath> attach_targets() const;

 private:
  struct AttachTarget {
    NamedPath target;
    std::atomic<bool> stop{false};
    UniqueFd wake;
    UniqueFd first;  // already connected (admin attach)
    std::thread thread;
  };
  void accept_loop();
  void attach_loop(std::shared_ptr<AttachTarget> a);
  void start_attach(std::shared_ptr<AttachTarget> a);
  void run_session(UniqueFd sock, std::string base_name);
  std::string unique_name(const std::string& base);

  DaemonContext& ctx_;
  ServerConfig cfg_;
  struct Listener {
    UniqueFd fd;
    std::string path;
    std::string fixed_name;  // empty: derive from the peer
    bool unlink = true;      // ours to remove at stop()
  };
  std::vector<Listener> listeners_;
  UniqueFd stop_fd_;
  UniqueFd reap_fd_;  // a session thread ended: the accept thread joins it
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> conn_no_{0};
  std::thread accept_thread_;
  std::vector<std::shared_ptr<AttachTarget>> attach_;  // guarded by mu_

  // Joins the threads of sessions that have ended (the accept thread, woken
  // by reap_fd_, and before each new connection): a finished thread's stack and mappings are released only when
  // it is joined, and a front end that reconnects all day must not pile
  // them up (each keeps ~12 KiB resident and two mappings; at the kernel's
  // 65530 mappings fphd could no longer start a thread).
  void reap_finished_sessions();

  mutable std::mutex mu_;  // sessions_ and the session threads; never on the data path
  std::map<std::string, std::shared_ptr<Session>> sessions_;
  std::map<uint64_t, std::thread> session_threads_;  // by connection number
  std::vector<uint64_t> finished_sessions_;          // their run_session returned
};

}  // namespace fph::daemon
