// The results of the runs, by scenario (filled by the benchmarks in
// fph_bench.cpp), and the report made of them: the summary table with the
// medians, the per-pair ratios end-to-end/raw and the verdict against the
// targets (>= 0.9 throughput, <= 1.1 CPU per GiB, judged for 4 or more
// guests).
#pragma once

#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "raw_limit.h"
#include "scenarios.h"
#include "wakeup_floor.h"

namespace fph::bench {

// By Scenario::key(), in the order the repetitions ran.
extern std::map<std::string, std::vector<E2EResult>> g_e2e;
extern std::map<std::string, std::vector<RawResult>> g_raw;
extern std::map<std::string, std::vector<FloorResult>> g_floor;
extern std::map<std::string, std::string> g_skipped;  // why the scenario was skipped
extern bool g_failed;                                 // a run failed: exit status 1

// The summary table (after Google Benchmark's own output).
void print_table(FILE* out);

// The result document of a mode (--scale, --backoff): one line on stdout,
// and indented into `path` unless it is empty.
void emit_json(const nlohmann::json& doc, const std::string& path);

}  // namespace fph::bench
