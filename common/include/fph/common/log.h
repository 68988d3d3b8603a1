// One line per event that matters: "<time> <level> [<component>] message".
// Lines go to stderr (journald picks them up under systemd). Thread safe.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

namespace fph::log {

enum class Level { Debug = 0, Info = 1, Warn = 2, Error = 3 };

void set_level(Level l);
Level level();
bool parse_level(std::string_view s, Level* out);
void write(Level l, std::string_view component, std::string_view msg);

template <class... A>
void debug(std::string_view c, fmt::format_string<A...> f, A&&... a) {
  if (level() <= Level::Debug) write(Level::Debug, c, fmt::format(f, std::forward<A>(a)...));
}
template <class... A>
void info(std::string_view c, fmt::format_string<A...> f, A&&... a) {
  if (level() <= Level::Info) write(Level::Info, c, fmt::format(f, std::forward<A>(a)...));
}
template <class... A>
void warn(std::string_view c, fmt::format_string<A...> f, A&&... a) {
  if (level() <= Level::Warn) write(Level::Warn, c, fmt::format(f, std::forward<A>(a)...));
}
template <class... A>
void error(std::string_view c, fmt::format_string<A...> f, A&&... a) {
  write(Level::Error, c, fmt::format(f, std::forward<A>(a)...));
}

// A budget of log lines for one source that the daemon does not control (one
// VM's front end): a front end that sends a malformed message in a loop must
// not flood the log. The flood would fill the disk, and journald rate-limits
// per service, so it would also drop the lines of every other VM. The first
// `burst` lines pass, then one line per `interval`; the lines held back are
// counted (the metrics still count every event) and the next line written
// says how many there were. Thread safe.
class LineBudget {
 public:
  using Clock = std::chrono::steady_clock;
  explicit LineBudget(uint32_t burst = 20, Clock::duration interval = std::chrono::seconds(1))
      : burst_(burst), interval_(interval), tokens_(burst) {}

  // nullopt: hold this line back. Otherwise the line may be written, and the
  // value is how many lines were held back since the last one written.
  std::optional<uint64_t> take(Clock::time_point now = Clock::now());
  uint64_t held_back_total() const;

 private:
  mutable std::mutex mu_;
  const uint32_t burst_;
  const Clock::duration interval_;
  uint32_t tokens_;
  Clock::time_point refilled_{};
  uint64_t held_ = 0, held_total_ = 0;
};

// Logging under a budget: a held-back line is not even formatted; the next
// written one ends with "(N lines held back before this one)".
std::string with_held_back(std::string msg, uint64_t held);

template <class... A>
void write(LineBudget& b, Level l, std::string_view c, fmt::format_string<A...> f, A&&... a) {
  if (level() > l) return;
  if (auto held = b.take()) write(l, c, with_held_back(fmt::format(f, std::forward<A>(a)...), *held));
}
template <class... A>
void info(LineBudget& b, std::string_view c, fmt::format_string<A...> f, A&&... a) {
  write(b, Level::Info, c, f, std::forward<A>(a)...);
}
template <class... A>
void warn(LineBudget& b, std::string_view c, fmt::format_string<A...> f, A&&... a) {
  write(b, Level::Warn, c, f, std::forward<A>(a)...);
}
template <class... A>
void error(LineBudget& b, std::string_view c, fmt::format_string<A...> f, A&&... a) {
  write(b, Level::Error, c, f, std::forward<A>(a)...);
}

}  // namespace fph::log
