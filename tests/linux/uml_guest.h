// Real Linux guests for the `linux` tests: user-mode Linux booted by
// scripts/linux-guest.sh against a vhost-user socket, its console parsed for
// the "FPH <event> key=value..." markers of /init and fph-linux-workload, and
// its RAM measured from the kernel (st_blocks of the deleted RAM file UML
// keeps open in its TMPDIR, through /proc/PID/fd).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace fph::test {

// One marker line: "FPH allocated bytes=1 seconds=2" -> {"event":"allocated",
// "bytes":"1","seconds":"2"}. A "text=" word takes the rest of the line.
using Marker = std::map<std::string, std::string>;
std::optional<Marker> parse_marker(const std::string& line);

// Bytes the kernel holds (st_blocks * 512, each inode once) for the deleted
// files under `dir` that process `pid` has open. -1 if none is open.
int64_t deleted_files_bytes_under(pid_t pid, const std::string& dir);

std::string linux_guest_script();
std::string linux_workload_path();

// `scripts/linux-guest.sh build ROOTDIR --workload ...`. Empty on success,
// else the reason with the script's output.
std::string build_guest_root(const std::string& rootdir);

struct UmlGuestOptions {
  std::string socket;
  std::string rootdir;
  std::string workdir;  // console log and the guest's TMPDIR live in here / in /dev/shm
  std::string label = "guest";
  std::string mem = "512M";
  bool balloon = true;
  std::vector<std::string> kernel_args;
  std::vector<std::string> workload_args;
};

class UmlGuest {
 public:
  explicit UmlGuest(UmlGuestOptions opts);
  ~UmlGuest();  // SIGKILLs the whole process group if still running, removes TMPDIR
  UmlGuest(const UmlGuest&) = delete;
  UmlGuest& operator=(const UmlGuest&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& label() const { return opts_.label; }
  // The fphd VM name of this guest on a shared socket (comm-pid).
  std::string vm_name() const { return "linux.uml-" + std::to_string(pid_); }

  // First marker with this event whose keys include every pair of `match`;
  // waits for it up to `timeout`. nullopt on timeout or when the console closed.
  std::optional<Marker> wait_marker(const std::string& event, const Marker& match = {},
                                    std::chrono::milliseconds timeout = std::chrono::seconds(120));
  std::optional<Marker> find_marker(const std::string& event, const Marker& match = {}) const;
  // Writes a line on the guest's console (releases a --wait-stdin wait point).
  void send_line();
  // Bytes the host holds for guest RAM, -1 if the RAM file is not (yet) open.
  int64_t ram_bytes() const { return deleted_files_bytes_under(pid_, tmpdir_); }
  std::string console() const;
  // Last `n` console lines, for failure messages.
  std::string console_tail(size_t n = 60) const;
  bool running();
  // Exit status (or 128+signal); SIGKILLs the group after `timeout`.
  int wait_exit(std::chrono::milliseconds timeout);
  // Kernel problems on the console: Oops, BUG, panic, lockup lines ("" if none).
  std::string kernel_problems() const;
  // Kernel WARNING lines on the console ("" if none).
  std::string kernel_warnings() const;
  // Every marker with this event, in console order.
  std::vector<Marker> markers(const std::string& event) const;

 private:
  void reader();
  UmlGuestOptions opts_;
  std::string tmpdir_;
  std::string log_path_;
  pid_t pid_ = -1;
  int in_fd_ = -1;
  int out_fd_ = -1;
  std::thread reader_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> lines_;
  bool eof_ = false;
  std::optional<int> status_;
};

}  // namespace fph::test
