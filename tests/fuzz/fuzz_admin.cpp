// Fuzz target: the admin socket's request handling (AdminDispatcher), the
// bytes a local client of the 0660 socket sends. Each input line is one
// request, as AdminServer splits them.
//
// The command table has the argument specs of fphd's own commands, with
// handlers that only run the pure parsers (parse_policy_change,
// parse_private_mode): no daemon behind it.
//
// Invariants checked on every reply:
//   - handle_line never throws and returns an object with exactly one of
//     "return" and "error";
//   - an error has a string "class" from the documented set and a string
//     "desc";
//   - the reply serialises (AdminServer writes reply.dump(); a throw there
//     would end the admin thread), and reparses to the same value.
#include <cstdint>
#include <set>
#include <string>
#include <string_view>

#include "fph/daemon/admin.h"

namespace d = fph::daemon;
using nlohmann::json;

namespace {

void check(bool ok) {
  if (!ok) __builtin_trap();
}

d::AdminDispatcher make_dispatcher() {
  d::AdminDispatcher disp;
  auto echo = [](const json& args) -> d::AdminResult { return args; };
  disp.add("query-status", {{}, echo, "status"});
  disp.add("pause-reclaim", {{{"vm", d::ArgType::String, true}}, echo, "pause"});
  disp.add("attach", {{{"name", d::ArgType::String, true}, {"path", d::ArgType::String, true}}, echo, "attach"});
  disp.add("yank", {{{"vm", d::ArgType::String, false}, {"all", d::ArgType::Boolean, false}}, echo, "yank"});
  disp.add("set-policy",
           {{{"node", d::ArgType::UnsignedInteger},
             {"vm", d::ArgType::String},
             {"mode", d::ArgType::String},
             {"rate-limit", d::ArgType::UnsignedInteger},
             {"paused", d::ArgType::Boolean}},
            [](const json& args) -> d::AdminResult {
              auto c = d::parse_policy_change(args);
              if (!c) return fph::unexpected(c.error());
              json out = json::object();
              if (c->mode) out["mode"] = std::string(d::to_string(*c->mode));
              if (c->rate_limit) out["rate-limit"] = *c->rate_limit;
              return out;
            },
            "policy"});
  disp.add("types", {{{"s", d::ArgType::String},
                      {"i", d::ArgType::Integer},
                      {"u", d::ArgType::UnsignedInteger},
                      {"b", d::ArgType::Boolean},
                      {"a", d::ArgType::Array},
                      {"o", d::ArgType::Object}},
                     echo, "every argument type"});
  disp.add("throws", {{}, [](const json&) -> d::AdminResult { throw std::runtime_error("boom"); }, "throws"});
  return disp;
}

void check_reply(const json& r) {
  check(r.is_object());
  const bool has_ret = r.contains("return"), has_err = r.contains("error");
  check(has_ret != has_err);
  if (has_err) {
    static const std::set<std::string> classes = {"GenericError", "CommandNotFound", "DeviceNotFound",
                                                  "InvalidParameter", "ParseError"};
    const json& e = r["error"];
    check(e.is_object() && e.contains("class") && e["class"].is_string() && e.contains("desc") &&
          e["desc"].is_string());
    check(classes.count(e["class"].get<std::string>()) == 1);
  }
  std::string text;
  try {
    text = r.dump();
  } catch (...) {
    check(false);
  }
  const json back = json::parse(text, nullptr, false);
  check(!back.is_discarded() && back == r);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const d::AdminDispatcher disp = make_dispatcher();
  std::string_view in(reinterpret_cast<const char*>(data), size);
  while (!in.empty()) {
    const size_t nl = in.find('\n');
    const std::string_view line = in.substr(0, nl);
    json reply;
    try {
      reply = disp.handle_line(line);
    } catch (...) {
      check(false);
    }
    check_reply(reply);
    if (nl == std::string_view::npos) break;
    in.remove_prefix(nl + 1);
  }
  return 0;
}
