#include "fph/probe/scrape.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sstream>

namespace fph::probe {

std::string http_get(const std::string& url) {
  const std::string pfx = "http://";
  if (url.rfind(pfx, 0) != 0) return {};
  const auto hostport_end = url.find('/', pfx.size());
  const std::string hostport = url.substr(pfx.size(), hostport_end - pfx.size());
  const std::string path = hostport_end == std::string::npos ? "/" : url.substr(hostport_end);
  const auto colon = hostport.rfind(':');
  if (colon == std::string::npos) return {};
  sockaddr_in a{};
  a.sin_family = AF_INET;
  try {
    a.sin_port = htons(static_cast<uint16_t>(std::stoi(hostport.substr(colon + 1))));
  } catch (...) {
    return {};
  }
  if (inet_pton(AF_INET, hostport.substr(0, colon).c_str(), &a.sin_addr) != 1) return {};
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return {};
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return {};
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: " + hostport + "\r\n\r\n";
  (void)!::write(fd, req.data(), req.size());
  std::string resp;
  char buf[65536];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 10000) <= 0) break;
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    resp.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  const auto body = resp.find("\r\n\r\n");
  return body == std::string::npos ? std::string{} : resp.substr(body + 4);
}

double metric_sum(const std::string& exposition, const std::string& name,
                  const std::map<std::string, std::string>& labels) {
  double sum = 0;
  std::istringstream in(exposition);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    const auto sp = line.rfind(' ');
    if (sp == std::string::npos) continue;
    const auto brace = line.find('{');
    if (line.substr(0, brace == std::string::npos ? sp : brace) != name) continue;
    bool match = true;
    for (const auto& [k, v] : labels)
      if (line.find(k + "=\"" + v + "\"") == std::string::npos) match = false;
    if (!match) continue;
    try {
      sum += std::stod(line.substr(sp + 1));
    } catch (...) {
    }
  }
  return sum;
}

}  // namespace fph::probe
