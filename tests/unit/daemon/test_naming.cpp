#include <gtest/gtest.h>

#include "fph/daemon/server.h"

using fph::daemon::name_from_cmdline;

TEST(Naming, QemuGuestEquals) {
  EXPECT_EQ(name_from_cmdline({"qemu-system-x86_64", "-m", "4G", "-name", "guest=web01,debug-threads=on"}),
            "web01");
}
TEST(Naming, QemuPlain) {
  EXPECT_EQ(name_from_cmdline({"qemu", "-name", "db-7,process=qemu-db"}), "db-7");
}
TEST(Naming, FphGuestLongOption) {
  EXPECT_EQ(name_from_cmdline({"fph-guest", "--name", "g1"}), "g1");
  EXPECT_EQ(name_from_cmdline({"fph-guest", "--name=g2"}), "g2");
}
TEST(Naming, NoneOrUnsafe) {
  EXPECT_EQ(name_from_cmdline({"qemu", "-m", "1G"}), "");
  EXPECT_EQ(name_from_cmdline({"qemu", "-name"}), "");  // missing value
  EXPECT_EQ(name_from_cmdline({"x", "--name", "a b"}), "");  // would break log lines and labels
  EXPECT_EQ(name_from_cmdline({"x", "--name", std::string(100, 'a')}), "");
}
