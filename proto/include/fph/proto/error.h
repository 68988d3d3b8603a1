// Parse errors carry the message and the field that was wrong, so the daemon
// can log "SET_MEM_TABLE: regions[2].memory_size: gpa + size overflows".
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "fph/common/expected.h"

namespace fph::proto {

enum class ParseErrc : uint8_t {
  Truncated,       // fewer bytes than the layout needs
  BadSize,         // size field disagrees with the layout or the payload
  BadVersion,      // header version bits are not 1
  BadFlags,        // reserved bits set
  UnknownRequest,  // request id we do not know
  BadFdCount,      // wrong number of file descriptors for the message
  Overflow,        // address arithmetic overflows 64 bits
  OutOfRange,      // a value outside its allowed range (index, count, size)
  Overlap,         // memory regions overlap
  BadValue,        // any other invalid value
};

std::string_view to_string(ParseErrc c);

struct ParseError {
  ParseErrc code = ParseErrc::BadValue;
  std::string field;   // e.g. "header.size", "regions[1].memory_size"
  std::string detail;  // human readable, includes the offending value
  std::string message() const;  // "<field>: <detail>"
};

template <class T>
using ParseResult = Expected<T, ParseError>;

[[nodiscard]] inline Unexpected<ParseError> parse_error(ParseErrc c, std::string field,
                                                        std::string detail) {
  return Unexpected<ParseError>{ParseError{c, std::move(field), std::move(detail)}};
}

}  // namespace fph::proto
