// BalloonTargets: the balloon targets kept by VM name across reconnects and,
// with a state directory, fphd restarts (a real file in a temp directory).
#include "fph/daemon/balloon_targets.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

using fph::daemon::BalloonTargets;

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/fph-targets-XXXXXX";
    path = mkdtemp(t);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

std::string slurp(const std::string& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

TEST(BalloonTargets, KeptInMemoryWithoutAStateDir) {
  BalloonTargets t;
  EXPECT_EQ(*t.load(), 0u);
  ASSERT_TRUE(t.set("web1", 1024).has_value());
  EXPECT_EQ(t.get("web1"), 1024u);
  EXPECT_FALSE(t.get("web2"));
  ASSERT_TRUE(t.set("web1", 0).has_value());
  EXPECT_FALSE(t.get("web1")) << "0 forgets the target";
}

TEST(BalloonTargets, ANewInstanceReadsWhatTheLastOneWrote) {
  TempDir d;
  const std::string dir = d.path + "/state";  // created on first write
  {
    BalloonTargets t(dir);
    EXPECT_EQ(*t.load(), 0u) << "no file yet is not an error";
    ASSERT_TRUE(t.set("web1", 16384).has_value());
    ASSERT_TRUE(t.set("db", 7).has_value());
  }
  EXPECT_EQ(slurp(dir + "/balloon-targets"), "db 7\nweb1 16384\n");
  BalloonTargets again(dir);
  EXPECT_EQ(*again.load(), 2u);
  EXPECT_EQ(again.get("web1"), 16384u);
  EXPECT_EQ(again.get("db"), 7u);
}

TEST(BalloonTargets, MalformedLinesAreSkippedNotFatal) {
  TempDir d;
  std::ofstream(d.path + "/balloon-targets") << "web1 100\nbroken\nx 0\ny 99999999999\nz 5 extra\nok 3\n";
  BalloonTargets t(d.path);
  EXPECT_EQ(*t.load(), 2u);
  EXPECT_EQ(t.get("web1"), 100u);
  EXPECT_EQ(t.get("ok"), 3u);
  EXPECT_FALSE(t.get("broken"));
  EXPECT_FALSE(t.get("y"));
  EXPECT_FALSE(t.get("z"));
}

TEST(BalloonTargets, AnUnwritableStateDirIsAnErrorButTheTargetIsKept) {
  TempDir d;
  std::ofstream(d.path + "/file") << "not a directory";
  BalloonTargets t(d.path + "/file/state");
  auto r = t.set("web1", 5);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().find("file/state"), std::string::npos) << r.error();
  EXPECT_EQ(t.get("web1"), 5u);
}
