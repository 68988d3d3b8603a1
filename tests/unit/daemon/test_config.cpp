// The TOML configuration: defaults, every section, and errors that name the
// key and the line.
#include <gtest/gtest.h>

#include <fstream>

#include "fph/daemon/config.h"

using namespace fph::daemon;
using fph::reclaim::PrivateMode;

namespace {

std::string error_of(const std::string& text) {
  auto r = parse_config(text, "t.toml");
  EXPECT_FALSE(r) << text;
  return r ? std::string() : r.error();
}

bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

}  // namespace

TEST(Config, EmptyIsDefaults) {
  auto c = parse_config("", "t.toml");
  ASSERT_TRUE(c);
  EXPECT_TRUE(c->listen.empty());
  EXPECT_EQ(c->socket_mode, 0660u);
  EXPECT_EQ(c->metrics, "127.0.0.1:9477");
  EXPECT_EQ(c->policy.defaults.mode, PrivateMode::Auto);
  EXPECT_EQ(c->policy.defaults.rate_limit_bytes_per_sec, 0u);
}

TEST(Config, ShippedFileParses) {
  auto c = load_config_file(FPH_SOURCE_DIR "/etc/fphd.toml");
  ASSERT_TRUE(c) << c.error();
  EXPECT_EQ(c->listen, std::vector<std::string>{"/run/fphd/fphd.sock"});
  EXPECT_EQ(c->admin_socket, "/run/fphd/admin.sock");
  EXPECT_EQ(c->policy.defaults.mode, PrivateMode::Auto);
  EXPECT_DOUBLE_EQ(c->policy.defaults.pressure_free_fraction, 0.10);
}

TEST(Config, EverySection) {
  auto c = parse_config(R"(
[daemon]
listen = ["/a.sock", "/b.sock"]
admin_socket = "/adm.sock"
socket_mode = "0600"
metrics = "off"
log_level = "debug"
threads_per_node = 2
stall_limit_seconds = 30
[[vm]]
name = "web"
path = "/web.sock"
[[attach]]
name = "db"
path = "/db.sock"
[policy]
mode = "lazy"
rate_limit = 1048576
prefer_madvise = true
pressure_free_fraction = 0.25
[policy.node.1]
mode = "eager"
)", "t.toml");
  ASSERT_TRUE(c) << c.error();
  EXPECT_EQ(c->listen.size(), 2u);
  EXPECT_EQ(c->socket_mode, 0600u);
  EXPECT_EQ(c->vms.at(0).name, "web");
  EXPECT_EQ(c->attach.at(0).path, "/db.sock");
  EXPECT_EQ(c->threads_per_node, 2);
  EXPECT_EQ(c->stall_limit_seconds, 30);
  EXPECT_EQ(c->policy.for_node(0).mode, PrivateMode::Lazy);
  EXPECT_EQ(c->policy.for_node(1).mode, PrivateMode::Eager);
  EXPECT_EQ(c->policy.for_node(1).rate_limit_bytes_per_sec, 1048576u);  // inherited
  EXPECT_TRUE(c->policy.for_node(1).prefer_madvise);
}

TEST(Config, ErrorsNameKeyAndLine) {
  EXPECT_TRUE(has(error_of("[policy]\nmode = \"fast\"\n"), "t.toml:2: policy.mode: 'fast' is not one of"));
  EXPECT_TRUE(has(error_of("[policy]\n\nrate_limit = -1\n"), "t.toml:3: policy.rate_limit"));
  EXPECT_TRUE(has(error_of("[daemon]\nstall_limit_seconds = -5\n"), "t.toml:2: daemon.stall_limit_seconds"));
  EXPECT_TRUE(has(error_of("[policy]\nrate_limit = \"1G\"\n"), "policy.rate_limit: must be an integer"));
  EXPECT_TRUE(has(error_of("[policy]\nmoed = \"eager\"\n"), "t.toml:2: policy.moed: unknown key"));
  EXPECT_TRUE(has(error_of("[deamon]\n"), "deamon: unknown key"));
  EXPECT_TRUE(has(error_of("[daemon]\nsocket_mode = \"rw\"\n"), "daemon.socket_mode"));
  EXPECT_TRUE(has(error_of("[daemon]\nsocket_mode = 660\n"), "daemon.socket_mode: must be a string"));
  EXPECT_TRUE(has(error_of("[daemon]\nlog_level = \"loud\"\n"), "daemon.log_level"));
  EXPECT_TRUE(has(error_of("[daemon]\nlisten = \"/a.sock\"\n"), "daemon.listen: must be an array"));
  EXPECT_TRUE(has(error_of("[daemon]\nlisten = [1]\n"), "daemon.listen[0]: must be a string"));
  EXPECT_TRUE(has(error_of("[[vm]]\nname = \"a\"\n"), "vm[0].path: missing"));
  EXPECT_TRUE(has(error_of("[[vm]]\nname = \"a\"\npath = \"/p\"\nsize = 3\n"), "t.toml:4: vm[0].size: unknown key"));
  EXPECT_TRUE(has(error_of("[policy.node.x]\nmode = \"eager\"\n"), "policy.node.x"));
  EXPECT_TRUE(has(error_of("[policy.node.0]\nprefer_madvise = true\n"), "policy.node.0.prefer_madvise: unknown key"));
  EXPECT_TRUE(has(error_of("[policy]\npressure_free_fraction = 2.0\n"), "out of range"));
  // TOML syntax errors carry the line too.
  EXPECT_TRUE(has(error_of("[daemon]\nlisten = [\"/a\"\n\n"), "t.toml:"));
  EXPECT_TRUE(has(error_of("a = = 1\n"), "t.toml:1:"));
}

TEST(Config, MissingFile) {
  auto r = load_config_file("/nonexistent/fphd.toml");
  ASSERT_FALSE(r);
  EXPECT_TRUE(has(r.error(), "/nonexistent/fphd.toml"));
}
