#include "fph/common/size.h"

#include <fmt/format.h>

#include <cctype>
#include <charconv>

#include "fph/common/checked.h"

namespace fph {

Expected<uint64_t, std::string> parse_size(std::string_view s) {
  const std::string_view orig = s;
  auto err = [](std::string m) { return unexpected(std::move(m)); };
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p == s.data()) return err(fmt::format("bad size '{}'", orig));
  s.remove_prefix(static_cast<size_t>(p - s.data()));
  uint64_t mul = 1;
  if (!s.empty()) {
    switch (std::toupper(static_cast<unsigned char>(s[0]))) {
      case 'K': mul = 1ull << 10; break;
      case 'M': mul = 1ull << 20; break;
      case 'G': mul = 1ull << 30; break;
      case 'T': mul = 1ull << 40; break;
      case 'B': mul = 1; break;
      default: return err(fmt::format("bad size suffix in '{}' (use K, M, G, T)", orig));
    }
    s.remove_prefix(1);
    if (s == "iB" || s == "ib" || s == "B" || s == "b") s = {};
    if (!s.empty()) return err(fmt::format("bad size '{}'", orig));
  }
  auto r = checked_mul(v, mul);
  if (!r) return err(fmt::format("size '{}' overflows", orig));
  return *r;
}

}  // namespace fph
