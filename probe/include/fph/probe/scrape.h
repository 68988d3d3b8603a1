// Reading fphd's Prometheus endpoint from a test or a benchmark.
#pragma once

#include <map>
#include <string>

namespace fph::probe {

// GET http://ADDRESS:PORT/path over a plain IPv4 socket (HTTP/1.0, 10 s per
// read). The body, or empty on any failure.
std::string http_get(const std::string& url);

// Sum of the samples of metric `name` in Prometheus text `exposition` whose
// labels include every pair of `labels` (none: all of its samples).
double metric_sum(const std::string& exposition, const std::string& name,
                  const std::map<std::string, std::string>& labels = {});

}  // namespace fph::probe
