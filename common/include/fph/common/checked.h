// Overflow-checked arithmetic for values that come from untrusted peers.
#pragma once

#include <cstdint>
#include <optional>

namespace fph {

// a + b, or nullopt on unsigned overflow.
[[nodiscard]] constexpr std::optional<uint64_t> checked_add(uint64_t a, uint64_t b) noexcept {
  uint64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

[[nodiscard]] constexpr std::optional<uint64_t> checked_mul(uint64_t a, uint64_t b) noexcept {
  uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// True if [start, start+len) lies inside [base, base+size), without overflow.
[[nodiscard]] constexpr bool range_within(uint64_t start, uint64_t len, uint64_t base,
                                          uint64_t size) noexcept {
  if (start < base) return false;
  const uint64_t off = start - base;
  return off <= size && len <= size - off;
}

[[nodiscard]] constexpr bool is_power_of_two(uint64_t v) noexcept { return v && !(v & (v - 1)); }
[[nodiscard]] constexpr bool is_aligned(uint64_t v, uint64_t a) noexcept { return (v & (a - 1)) == 0; }

}  // namespace fph
