#include "fph/common/log.h"

#include <algorithm>
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

std::optional<uint64_t> LineBudget::take(Clock::time_point now) {
  std::lock_guard lk(mu_);
  if (refilled_ == Clock::time_point{}) refilled_ = now;
  if (tokens_ < burst_ && now > refilled_ && interval_.count() > 0) {
    const auto earned = static_cast<uint64_t>((now - refilled_) / interval_);
    if (earned) {
      tokens_ = static_cast<uint32_t>(std::min<uint64_t>(burst_, tokens_ + earned));
      refilled_ += interval_ * static_cast<int64_t>(earned);
    }
  }
  if (tokens_ == burst_) refilled_ = now;  // a full bucket earns nothing while it waits
  if (tokens_ == 0) {
    held_++;
    held_total_++;
    return std::nullopt;
  }
  tokens_--;
  const uint64_t held = held_;
  held_ = 0;
  return held;
}

std::string with_held_back(std::string msg, uint64_t held) {
  if (held) msg += fmt::format(" ({} lines held back before this one)", held);
  return msg;
}

uint64_t LineBudget::held_back_total() const {
  std::lock_guard lk(mu_);
  return held_total_;
}

}  // namespace fph::log
