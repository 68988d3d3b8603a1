// One admin command over fphd's admin socket (fphctl's client library), for
// the integration tests: the whole reply ({"return": ...} or {"error": ...}),
// or null if the socket could not be reached (a test failure is recorded).
#pragma once

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "client.h"

namespace fph::test {

inline nlohmann::json admin_reply(const std::string& socket, const std::string& cmd,
                                  const nlohmann::json& args = nlohmann::json::object()) {
  auto c = ctl::AdminClient::connect(socket);
  EXPECT_TRUE(c) << (c ? "" : c.error());
  if (!c) return {};
  auto r = c->execute(cmd, args);
  EXPECT_TRUE(r) << (r ? "" : r.error());
  return r ? *r : nlohmann::json();
}

}  // namespace fph::test
