// fph-bench's options: parsing of the command line and the environment
// (FPH_BENCH_FPHD, FPH_BENCH_GUEST, FPH_BENCH_PATIENCE_S, FPH_BENCH_ARGS).
#include "options.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

namespace fph::bench {

Options g_opt;

uint64_t parse_size(const std::string& s) {
  size_t pos = 0;
  const double v = std::stod(s, &pos);
  uint64_t mul = 1;
  if (pos < s.size()) {
    switch (std::toupper(static_cast<unsigned char>(s[pos]))) {
      case 'K': mul = kKiB; break;
      case 'M': mul = kMiB; break;
      case 'G': mul = kGiB; break;
      case 'T': mul = kGiB * 1024; break;
      default: throw std::invalid_argument("bad size " + s);
    }
  }
  if (v <= 0) throw std::invalid_argument("bad size " + s);
  return static_cast<uint64_t>(v * static_cast<double>(mul));
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, sep);)
    if (!x.empty()) out.push_back(x);
  return out;
}

[[noreturn]] void usage(const std::string& err) {
  std::fprintf(stderr,
               "fph-bench: %s\n"
               "usage: fph-bench [--total=SIZE] [--quick] [--guests=1,4,16] "
               "[--backing=shmem,hugetlb]\n"
               "                 [--threads=N] [--repetitions=N] [--raw-block=SIZE] "
               "[--hold-ms=MS]\n"
               "                 [--fphd=PATH] [--guest=PATH] [--keep-logs] [--no-floor] [--thread-cpu] "
               "[--benchmark_* flags]\n"
               "       fph-bench --scale=1,64,256,1024 [--scale-*]\n"
               "       fph-bench --backoff [--backoff-seconds=60] [--backoff-period-s=15]\n"
               "                 [--backoff-reporting-delay-ms=100] [--backoff-json=PATH]\n",
               err.c_str());
  std::exit(2);
}

// Takes our own flags out of argv; the rest goes to Google Benchmark.
std::vector<char*> parse_args(int argc, char** argv, std::vector<std::string>& storage) {
  if (const char* e = std::getenv("FPH_BENCH_FPHD")) g_opt.fphd = e;
  if (const char* e = std::getenv("FPH_BENCH_GUEST")) g_opt.guest = e;
  if (const char* e = std::getenv("FPH_BENCH_PATIENCE_S")) g_opt.patience = std::chrono::seconds(std::atoi(e));
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  if (const char* e = std::getenv("FPH_BENCH_ARGS")) {
    auto pre = split(e, ' ');
    args.insert(args.begin(), pre.begin(), pre.end());
  }
  bool total_set = false;
  storage.clear();
  storage.push_back(argv[0]);
  for (size_t i = 0; i < args.size(); ++i) {
    std::string a = args[i];
    if (a.rfind("--benchmark_", 0) == 0 || a.rfind("--v=", 0) == 0) {
      if (a == "--benchmark_format=json" || a == "--benchmark_format=csv") g_opt.table_to_stderr = true;
      storage.push_back(a);
      continue;
    }
    std::string key = a, val;
    const bool has_eq = a.find('=') != std::string::npos;
    if (has_eq) {
      key = a.substr(0, a.find('='));
      val = a.substr(a.find('=') + 1);
    }
    auto value = [&]() -> std::string {
      if (has_eq) return val;
      if (i + 1 >= args.size()) usage(key + " needs a value");
      return args[++i];
    };
    try {
      if (key == "--help" || key == "-h") usage("help");
      else if (key == "--quick") g_opt.quick = true;
      else if (key == "--keep-logs") g_opt.keep_logs = true;
      else if (key == "--thread-cpu") g_opt.thread_cpu = true;
      else if (key == "--no-floor") g_opt.floor = false;
      else if (key == "--scale") {
        g_opt.scale.clear();
        for (auto& x : split(value(), ',')) g_opt.scale.push_back(std::stoi(x));
        for (int v : g_opt.scale)
          if (v < 1 || v > 4096) usage("--scale: counts must be 1..4096");
      } else if (key == "--scale-memory") g_opt.scale_memory = parse_size(value());
      else if (key == "--scale-idle-s") g_opt.scale_idle_s = std::stoi(value());
      else if (key == "--scale-stats-interval") g_opt.scale_stats_interval = std::stoi(value());
      else if (key == "--scale-epoch-poll-ms") g_opt.scale_epoch_poll_ms = std::stoi(value());
      else if (key == "--scale-json") g_opt.scale_json = value();
      else if (key == "--backoff") g_opt.backoff = true;
      else if (key == "--backoff-seconds") g_opt.backoff_seconds = std::stoi(value());
      else if (key == "--backoff-period-s") g_opt.backoff_period_s = std::stoi(value());
      else if (key == "--backoff-reporting-delay-ms") g_opt.backoff_reporting_delay_ms = std::stoi(value());
      else if (key == "--backoff-json") g_opt.backoff_json = value();
      else if (key == "--total") g_opt.total = parse_size(value()), total_set = true;
      else if (key == "--threads") g_opt.threads = std::stoi(value());
      else if (key == "--repetitions") g_opt.repetitions = std::stoi(value());
      else if (key == "--raw-block") g_opt.raw_block = parse_size(value());
      else if (key == "--hold-ms") g_opt.hold_ms = std::stoi(value());
      else if (key == "--fphd") g_opt.fphd = value();
      else if (key == "--guest") g_opt.guest = value();
      else if (key == "--guests") {
        g_opt.guests.clear();
        for (auto& x : split(value(), ',')) g_opt.guests.push_back(std::stoi(x));
      } else if (key == "--backing") {
        g_opt.backings = split(value(), ',');
        for (auto& b : g_opt.backings)
          if (b != "shmem" && b != "hugetlb") usage("--backing takes shmem and/or hugetlb");
      } else {
        usage("unknown option " + a);
      }
    } catch (const std::invalid_argument&) {
      usage("bad value in " + a);
    } catch (const std::out_of_range&) {
      usage("bad value in " + a);
    }
  }
  if (g_opt.quick && !total_set) g_opt.total = 256 * kMiB;
  if (g_opt.repetitions < 1) usage("--repetitions must be >= 1");
  if (g_opt.backoff && !g_opt.scale.empty()) usage("--backoff and --scale are separate modes");
  if (g_opt.backoff_seconds < 1) usage("--backoff-seconds must be >= 1");
  if (g_opt.backoff_period_s < 1) usage("--backoff-period-s must be >= 1");
  if (g_opt.backoff_reporting_delay_ms < 0) usage("--backoff-reporting-delay-ms must be >= 0");
  if (g_opt.threads <= 0) g_opt.threads = std::max(1, static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
  for (int g : g_opt.guests) {
    if (g < 1 || g > 256) usage("--guests: counts must be 1..256");
    if (g_opt.total / static_cast<uint64_t>(g) < 16 * kMiB)
      usage("--total / guests must be at least 16 MiB per guest");
  }
  std::vector<char*> out;
  for (auto& s : storage) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace fph::bench
