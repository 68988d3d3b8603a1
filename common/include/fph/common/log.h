// One line per event that matters: "<time> <level> [<component>] message".
// Lines go to stderr (journald picks them up under systemd). Thread safe.
#pragma once

#include <fmt/format.h>

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

}  // namespace fph::log
