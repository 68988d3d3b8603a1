// Sizes as people write them: "4096", "64K", "512M", "1G", "2GiB", "3m"
// (binary units: K = 1024). Used by fph-guest's options and workloads and
// by fphctl (set-balloon).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "fph/common/expected.h"

namespace fph {

Expected<uint64_t, std::string> parse_size(std::string_view s);

}  // namespace fph
