#include "client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace fph::ctl {

using nlohmann::json;

Expected<AdminClient, std::string> AdminClient::connect(const std::string& path,
                                                        std::chrono::milliseconds timeout) {
  AdminClient c;
  c.timeout_ = timeout;
  sockaddr_un a{};
  if (path.size() >= sizeof a.sun_path) return unexpected("socket path too long: " + path);
  c.fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  if (::connect(c.fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
    return unexpected("cannot connect to " + path + ": " + std::strerror(errno));
  auto g = c.read_reply();
  if (!g) return unexpected("no greeting from " + path + ": " + g.error());
  if (!g->contains("fph")) return unexpected("unexpected greeting from " + path + ": " + g->dump());
  c.greeting_ = std::move(*g);
  return c;
}

Expected<json, std::string> AdminClient::read_reply() {
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  for (;;) {
    if (auto pos = buf_.find('\n'); pos != std::string::npos) {
      std::string line = buf_.substr(0, pos);
      buf_.erase(0, pos + 1);
      auto j = json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) return unexpected("bad reply: " + line);
      return j;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return unexpected(std::string("timed out waiting for the daemon"));
    pollfd p{fd_.get(), POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;
    char chunk[65536];
    ssize_t n = ::recv(fd_.get(), chunk, sizeof chunk, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return unexpected(std::string("recv: ") + std::strerror(errno));
    if (n == 0) return unexpected(std::string("the daemon closed the connection"));
    buf_.append(chunk, static_cast<size_t>(n));
  }
}

Expected<json, std::string> AdminClient::raw(const std::string& line) {
  std::string s = line + "\n";
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::send(fd_.get(), s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return unexpected(std::string("send: ") + std::strerror(errno));
    off += static_cast<size_t>(n);
  }
  return read_reply();
}

Expected<json, std::string> AdminClient::execute(const std::string& cmd, const json& args) {
  json req = {{"execute", cmd}, {"id", next_id_++}};
  if (!args.empty()) req["arguments"] = args;
  return raw(req.dump());
}

}  // namespace fph::ctl
