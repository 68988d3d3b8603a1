// Sample statistics shared by the benchmarks (header-only).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace fph::bench {

// Nearest-rank percentile (p99 of fewer than 100 samples is the largest);
// NaN for no samples.
inline double percentile(std::vector<double> v, double p) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  rank = std::clamp<size_t>(rank, 1, v.size());
  return v[rank - 1];
}

inline double median(std::vector<double> v) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace fph::bench
