#include "fph/guest/trace.h"

#include <fmt/format.h>

#include <charconv>
#include <fstream>
#include <map>
#include <sstream>

#include "fph/guest/workload.h"

namespace fph::guest {

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (true) {
    const size_t c = s.find(sep, start);
    out.push_back(trim(s.substr(start, c == std::string_view::npos ? s.npos : c - start)));
    if (c == std::string_view::npos) break;
    start = c + 1;
  }
  return out;
}

bool tag_ok(std::string_view t) {
  if (t.empty() || t.size() > 64) return false;
  for (char ch : t) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                    ch == '_' || ch == '.' || ch == '-';
    if (!ok) return false;
  }
  return true;
}

std::string fmt_bytes(uint64_t b) {
  if (b % (1ull << 20) == 0) return fmt::format("{}M", b >> 20);
  if (b % (1ull << 10) == 0) return fmt::format("{}K", b >> 10);
  return fmt::format("{}", b);
}

}  // namespace

Expected<Trace, std::string> parse_trace(std::string_view text, std::string_view name) {
  Trace t;
  t.name = std::string(name);
  std::map<std::string, uint64_t, std::less<>> held;
  uint64_t total = 0;
  int64_t prev_time = 0;
  int lineno = 0;
  bool seen_data = false;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl == std::string_view::npos ? text.npos : nl - pos);
    pos = nl == std::string_view::npos ? text.size() + 1 : nl + 1;
    ++lineno;
    line = trim(line);
    if (line.empty() || line.front() == '#') continue;
    auto fail = [&](std::string_view field, const std::string& msg) {
      return Unexpected<std::string>{fmt::format("{}:{}: field '{}': {}", name, lineno, field, msg)};
    };
    const auto f = split(line, ',');
    if (!seen_data && f.size() >= 3 && f[0] == "time_ms") {
      // Header: exactly the documented names.
      if (f[1] != "op" || f[2] != "size" || (f.size() == 4 && f[3] != "tag") || f.size() > 4)
        return Unexpected<std::string>{fmt::format(
            "{}:{}: bad header '{}' (want time_ms,op,size[,tag])", name, lineno, line)};
      seen_data = true;
      continue;
    }
    seen_data = true;
    if (f.size() < 3 || f.size() > 4)
      return Unexpected<std::string>{fmt::format(
          "{}:{}: {} field(s), want 3 or 4 (time_ms,op,size[,tag]): '{}'", name, lineno, f.size(),
          line)};
    TraceOp op;
    op.line = lineno;
    {
      int64_t v = -1;
      auto [p, ec] = std::from_chars(f[0].data(), f[0].data() + f[0].size(), v);
      if (ec != std::errc() || p != f[0].data() + f[0].size() || v < 0)
        return fail("time_ms", fmt::format("'{}' is not an integer >= 0", f[0]));
      if (v < prev_time)
        return fail("time_ms", fmt::format("{} is earlier than the previous operation's {} "
                                           "(times must not decrease)", v, prev_time));
      op.time_ms = prev_time = v;
    }
    if (f[1] == "alloc") op.op = TraceOp::Kind::Alloc;
    else if (f[1] == "free") op.op = TraceOp::Kind::Free;
    else return fail("op", fmt::format("'{}' is not alloc or free", f[1]));
    if (f.size() == 4) {
      if (!tag_ok(f[3])) return fail("tag", fmt::format("'{}' is not 1-64 of [A-Za-z0-9_.-]", f[3]));
      op.tag = std::string(f[3]);
    }
    if (op.op == TraceOp::Kind::Free && f[2] == "all") {
      op.all = true;
    } else {
      auto sz = parse_size(f[2]);
      if (!sz) return fail("size", sz.error());
      if (*sz == 0) return fail("size", "must be > 0");
      op.bytes = *sz;
    }
    uint64_t& h = held[op.tag];
    if (op.op == TraceOp::Kind::Alloc) {
      if (h + op.bytes < h) return fail("size", "total overflows");
      h += op.bytes;
      total += op.bytes;
      t.peak_bytes = std::max(t.peak_bytes, total);
    } else {
      if (op.all) op.bytes = h;
      if (op.bytes > h)
        return fail("size", fmt::format("frees {} but tag '{}' holds {} at this point",
                                        fmt_bytes(op.bytes), op.tag, fmt_bytes(h)));
      h -= op.bytes;
      total -= op.bytes;
    }
    t.duration_ms = op.time_ms;
    t.ops.push_back(std::move(op));
  }
  if (t.ops.empty())
    return Unexpected<std::string>{fmt::format("{}: no operations (only comments or blank lines)", name)};
  return t;
}

Expected<Trace, std::string> load_trace(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Unexpected<std::string>{fmt::format("{}: cannot open", path)};
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Unexpected<std::string>{fmt::format("{}: read error", path)};
  return parse_trace(ss.str(), path);
}

}  // namespace fph::guest
