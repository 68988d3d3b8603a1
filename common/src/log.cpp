#include "fph/common/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace fph::log {
namespace {
std::atomic<Level> g_level{Level::Info};
std::mutex g_mu;
const char* name(Level l) {
  switch (l) {
    case Level::Debug: return "debug";
    case Level::Info: return "info";
    case Level::Warn: return "warn";
    case Level::Error: return "error";
  }
  return "?";
}
}  // namespace

void set_level(Level l) { g_level.store(l, std::memory_order_relaxed); }
Level level() { return g_level.load(std::memory_order_relaxed); }

bool parse_level(std::string_view s, Level* out) {
  if (s == "debug") *out = Level::Debug;
  else if (s == "info") *out = Level::Info;
  else if (s == "warn") *out = Level::Warn;
  else if (s == "error") *out = Level::Error;
  else return false;
  return true;
}

void write(Level l, std::string_view component, std::string_view msg) {
  using namespace std::chrono;
  const auto now = system_clock::now();
  const auto ms = duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000;
  std::time_t t = system_clock::to_time_t(now);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  std::lock_guard lk(g_mu);
  std::fprintf(stderr, "%s.%03dZ %-5s [%.*s] %.*s\n", ts, static_cast<int>(ms), name(l),
               static_cast<int>(component.size()), component.data(), static_cast<int>(msg.size()),
               msg.data());
}

}  // namespace fph::log
