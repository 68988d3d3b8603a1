// fph::proto parse errors (error.h).
#include "fph/proto/error.h"

namespace fph::proto {

std::string_view to_string(ParseErrc c) {
  switch (c) {
    case ParseErrc::Truncated: return "truncated";
    case ParseErrc::BadSize: return "bad size";
    case ParseErrc::BadVersion: return "bad version";
    case ParseErrc::BadFlags: return "bad flags";
    case ParseErrc::UnknownRequest: return "unknown request";
    case ParseErrc::BadFdCount: return "bad fd count";
    case ParseErrc::Overflow: return "overflow";
    case ParseErrc::OutOfRange: return "out of range";
    case ParseErrc::Overlap: return "overlap";
    case ParseErrc::BadValue: return "bad value";
  }
  return "unknown parse error";
}

std::string ParseError::message() const {
  std::string m = field.empty() ? std::string(to_string(code)) : field;
  m += ": ";
  m += detail.empty() ? std::string(to_string(code)) : detail;
  return m;
}

}  // namespace fph::proto
