// A small client for fphd's admin socket (daemon/include/fph/daemon/admin.h):
// connect, read the greeting, run commands. Used by fphctl and the tests.
#pragma once

#include <chrono>
#include <nlohmann/json.hpp>
#include <string>

#include "fph/common/expected.h"
#include "fph/common/unique_fd.h"

namespace fph::ctl {

class AdminClient {
 public:
  // Connects and reads the greeting. Error: a description (cannot connect,
  // no greeting).
  static Expected<AdminClient, std::string> connect(const std::string& path,
                                                    std::chrono::milliseconds timeout = std::chrono::seconds(30));
  const nlohmann::json& greeting() const { return greeting_; }
  // Sends {"execute":cmd,"arguments":args,"id":n} and returns the daemon's
  // reply object ({"return":...} or {"error":...}). Error: transport failure.
  Expected<nlohmann::json, std::string> execute(const std::string& cmd,
                                                const nlohmann::json& args = nlohmann::json::object());
  // Sends a raw line, returns the reply object.
  Expected<nlohmann::json, std::string> raw(const std::string& line);

 private:
  Expected<nlohmann::json, std::string> read_reply();
  UniqueFd fd_;
  std::string buf_;
  nlohmann::json greeting_;
  std::chrono::milliseconds timeout_{30000};
  int next_id_ = 1;
};

}  // namespace fph::ctl
