// The admin socket's request parsing and dispatch, as pure functions: a line
// in, a reply object out; and query-sessions' per-VM figures, read back from
// the VM's metric series.
#include <gtest/gtest.h>

#include "fph/daemon/admin.h"
#include "fph/daemon/metrics.h"

using namespace fph::daemon;
using nlohmann::json;

namespace {

AdminDispatcher make() {
  AdminDispatcher d;
  d.add("echo", {{{"text", ArgType::String, true}, {"n", ArgType::UnsignedInteger}},
                 [](const json& a) -> AdminResult { return json{{"text", a["text"]}}; }, ""});
  d.add("fail", {{}, [](const json&) -> AdminResult { return fph::unexpected(device_not_found("no VM named 'x'")); }, ""});
  d.add("throw", {{}, [](const json&) -> AdminResult { throw std::runtime_error("boom"); }, ""});
  return d;
}

std::string cls(const json& r) { return r.contains("error") ? r["error"]["class"].get<std::string>() : ""; }

}  // namespace

TEST(Admin, GreetingCarriesVersion) {
  auto g = admin_greeting("1.2.3");
  EXPECT_EQ(g["fph"]["version"], "1.2.3");
  EXPECT_TRUE(g["capabilities"].is_array());
}

TEST(Admin, ReturnCarriesId) {
  auto r = make().handle_line(R"({"execute":"echo","arguments":{"text":"hi"},"id":7})");
  EXPECT_EQ(r["return"]["text"], "hi");
  EXPECT_EQ(r["id"], 7);
  auto r2 = make().handle_line(R"({"execute":"echo","arguments":{"text":"hi"},"id":"abc"})");
  EXPECT_EQ(r2["id"], "abc");
  auto r3 = make().handle_line(R"({"execute":"echo","arguments":{"text":"hi"}})");
  EXPECT_FALSE(r3.contains("id"));
}

TEST(Admin, ErrorClasses) {
  auto d = make();
  EXPECT_EQ(cls(d.handle_line("not json")), "ParseError");
  EXPECT_EQ(cls(d.handle_line("[1,2]")), "ParseError");
  EXPECT_EQ(cls(d.handle_line(R"({"arguments":{}})")), "ParseError");
  EXPECT_EQ(cls(d.handle_line(R"({"execute":5})")), "ParseError");
  auto nf = d.handle_line(R"({"execute":"nope","id":1})");
  EXPECT_EQ(cls(nf), "CommandNotFound");
  EXPECT_EQ(nf["id"], 1);
  EXPECT_NE(nf["error"]["desc"].get<std::string>().find("nope"), std::string::npos);
  EXPECT_EQ(cls(d.handle_line(R"({"execute":"fail"})")), "DeviceNotFound");
  auto th = d.handle_line(R"({"execute":"throw"})");
  EXPECT_EQ(cls(th), "GenericError");
  EXPECT_NE(th["error"]["desc"].get<std::string>().find("boom"), std::string::npos);
  EXPECT_EQ(cls(d.handle_line(R"({"execute":"echo","bogus":1})")), "InvalidParameter");
}

TEST(Admin, ArgumentsAreChecked) {
  auto d = make();
  auto desc = [&](const char* l) { return d.handle_line(l)["error"]["desc"].get<std::string>(); };
  EXPECT_EQ(cls(d.handle_line(R"({"execute":"echo"})")), "InvalidParameter");
  EXPECT_NE(desc(R"({"execute":"echo"})").find("'text'"), std::string::npos);
  EXPECT_NE(desc(R"({"execute":"echo","arguments":{"text":1}})").find("'text' must be a string"),
            std::string::npos);
  EXPECT_NE(desc(R"({"execute":"echo","arguments":{"text":"a","extra":1}})").find("unknown argument 'extra'"),
            std::string::npos);
  EXPECT_NE(desc(R"({"execute":"echo","arguments":{"text":"a","n":-1}})").find("'n'"), std::string::npos);
  EXPECT_EQ(cls(d.handle_line(R"({"execute":"echo","arguments":[1]})")), "InvalidParameter");
  EXPECT_TRUE(d.handle_line(R"({"execute":"echo","arguments":{"text":"a","n":3}})").contains("return"));
}

TEST(Admin, PolicyChange) {
  auto ok = parse_policy_change({{"node", 1}, {"mode", "eager"}, {"rate-limit", 1048576}});
  ASSERT_TRUE(ok);
  EXPECT_EQ(*ok->node, 1);
  EXPECT_EQ(*ok->mode, fph::reclaim::PrivateMode::Eager);
  EXPECT_EQ(*ok->rate_limit, 1048576u);
  auto vm = parse_policy_change({{"vm", "a"}, {"paused", true}});
  ASSERT_TRUE(vm);
  EXPECT_TRUE(*vm->paused);
  auto bad = [](json j) {
    auto r = parse_policy_change(j);
    EXPECT_FALSE(r) << j.dump();
    return r ? std::string() : r.error().desc;
  };
  EXPECT_NE(bad({{"node", 0}, {"mode", "fast"}}).find("'mode'"), std::string::npos);
  EXPECT_NE(bad({{"mode", "eager"}}).find("exactly one"), std::string::npos);
  EXPECT_NE(bad({{"node", 0}, {"vm", "a"}, {"mode", "eager"}}).find("exactly one"), std::string::npos);
  EXPECT_NE(bad({{"node", 0}}).find("nothing to change"), std::string::npos);
  // A VM takes its own mode, rate limit, minimum block and backoff too.
  auto vm2 = parse_policy_change({{"vm", "a"}, {"mode", "lazy"}, {"rate-limit", 1 << 20},
                                  {"min-block", 4 << 20}, {"backoff", false}});
  ASSERT_TRUE(vm2);
  EXPECT_EQ(*vm2->mode, fph::reclaim::PrivateMode::Lazy);
  EXPECT_EQ(*vm2->min_block, 4u << 20);
  EXPECT_FALSE(*vm2->backoff);
  EXPECT_NE(bad({{"node", 0}, {"paused", true}}).find("per VM"), std::string::npos);
  EXPECT_NE(bad({{"node", 0}, {"min-block", 4096}}).find("per VM"), std::string::npos);
  // A bad setting names the argument and the VM.
  EXPECT_NE(bad({{"vm", "db1"}, {"min-block", 3000}}).find("argument 'min-block' of VM 'db1': 3000 is not a multiple of 4096"),
            std::string::npos);
  EXPECT_NE(bad({{"vm", "db1"}, {"min-block", 4ull << 30}}).find("of VM 'db1'"), std::string::npos);
  EXPECT_NE(bad({{"node", -1}, {"mode", "lazy"}}).find("'node'"), std::string::npos);
  EXPECT_NE(bad({{"node", 0}, {"rate-limit", "fast"}}).find("'rate-limit'"), std::string::npos);
}

// query-sessions' per-VM figures are read back from the VM's own metric
// series: the same numbers /metrics shows, under the documented keys.
namespace {

double series_sum(fph::daemon::Metrics& m, const std::string& family, const std::string& vm) {
  double sum = 0;
  for (const auto& f : m.registry()->Collect()) {
    if (f.name != family) continue;
    for (const auto& mt : f.metric) {
      bool match = false;
      for (const auto& l : mt.label) match |= l.name == "vm" && l.value == vm;
      if (match) sum += f.type == prometheus::MetricType::Counter ? mt.counter.value : mt.gauge.value;
    }
  }
  return sum;
}

}  // namespace

TEST(Admin, VmReclaimFiguresComeFromTheMetrics) {
  constexpr uint64_t MiB = 1 << 20;
  Metrics m("", 2);
  auto v = m.acquire_vm("a");
  auto j = vm_reclaim_json(*v, true);
  for (const char* k : {"reported-bytes", "discarded-bytes", "reclaimed-bytes", "refaulted-bytes"}) {
    ASSERT_TRUE(j.contains(k)) << k;
    EXPECT_EQ(j[k], 0u) << k;
  }
  ASSERT_TRUE(j.contains("headroom-bytes"));
  EXPECT_TRUE(j["headroom-bytes"].is_null());  // no stats yet: null, not 0

  v->reported(0, 12 * MiB);
  v->reported(1, 4 * MiB);
  v->discarded(0, fph::reclaim::Method::PunchHole, 8 * MiB);
  v->discarded(1, fph::reclaim::Method::MadvDontneed, 4 * MiB);
  v->reclaimed(0, 6 * MiB);  // summed over nodes, like the metric
  v->reclaimed(1, 4 * MiB);
  v->refaulted(2 * MiB);
  v->set_unreported_free(300 * MiB);
  j = vm_reclaim_json(*v, true);
  EXPECT_EQ(j["reported-bytes"], 16 * MiB);
  EXPECT_EQ(j["discarded-bytes"], 12 * MiB);
  EXPECT_EQ(j["reclaimed-bytes"], 10 * MiB);
  EXPECT_EQ(j["refaulted-bytes"], 2 * MiB);
  EXPECT_EQ(j["headroom-bytes"], 300 * MiB);
  EXPECT_EQ(j["reported-bytes"].get<double>(), series_sum(m, "fphd_reported_bytes_total", "a"));
  EXPECT_EQ(j["discarded-bytes"].get<double>(), series_sum(m, "fphd_discarded_bytes_total", "a"));
  EXPECT_EQ(j["reclaimed-bytes"].get<double>(), series_sum(m, "fphd_reclaimed_bytes_total", "a"));
  EXPECT_EQ(j["refaulted-bytes"].get<double>(), series_sum(m, "fphd_refaulted_bytes_total", "a"));
  EXPECT_EQ(j["headroom-bytes"].get<double>(), series_sum(m, "fphd_guest_unreported_free_bytes", "a"));
  // A session without stats (the series outlive sessions): no headroom.
  EXPECT_TRUE(vm_reclaim_json(*v, false)["headroom-bytes"].is_null());
  // Another VM's series are not counted.
  auto w = m.acquire_vm("b");
  w->reclaimed(0, 1 * MiB);
  EXPECT_EQ(vm_reclaim_json(*v, true)["reclaimed-bytes"], 10 * MiB);
  EXPECT_EQ(vm_reclaim_json(*w, true)["reclaimed-bytes"], 1 * MiB);
  m.release_vm("b");
  m.release_vm("a");
}
