#!/usr/bin/env python3
"""End-to-end capacity run (ctest label "integration"): 3 guests of 256 MiB,
each writing 224 MiB and freeing it, launched one after another into a
640 MiB memory cgroup, in every mode. Checks the direction of the result
only, never a duration: with reporting the host holds less memory once the
guests settle (hole punching, MADV_DONTNEED), at least as many guests fit as
without reporting, and no guest that fit failed an integrity check.
Usage: e2e_capacity.py BUILD_DIR"""
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from fphcap import report, runner  # noqa: E402


def main():
    build = sys.argv[1]
    if os.geteuid() != 0:
        print("SKIP: needs root for memory cgroups")
        return 0
    out = tempfile.mkdtemp(prefix="fph-e2e-capacity-")
    cfg = {"guest": os.path.join(build, "guestagent", "fph-guest"),
           "fphd": os.path.join(build, "daemon", "fphd"), "limit": 640 << 20,
           "patience": float(os.environ.get("FPH_TEST_PATIENCE_S", "300")),
           "settle_s": 1.5, "steady_s": 1.0, "interval": 0.1,
           "cgroup_name": "fph-e2e-%d" % os.getpid()}
    specs = [{"name": "g%d" % i, "args": ["--memory", "256M", "--resident", "16M",
                                          "--workload", "alloc-free:224M:0",
                                          "--reporting-delay-ms", "500", "--seed", str(i)]}
             for i in (1, 2, 3)]
    res = {}
    for m in runner.MODES:
        r, samples, guests = runner.run_guests(cfg, m, specs, os.path.join(out, m))
        res[m] = r
        print(report.summary_markdown([r]))
        for g in r["guests"]:
            print("  ", g)
    ok = True

    def check(cond, msg):
        nonlocal ok
        print(("ok   " if cond else "FAIL ") + msg)
        ok = ok and cond

    none = res["none"]
    for m in ("daemon", "local-dontneed", "local-free"):
        r = res[m]
        check(r["fit"] >= none["fit"], "%s: %d guests fit >= %d without reporting" % (m, r["fit"], none["fit"]))
        bad = [g for g in r["guests"][:r["fit"]] if g["reason"] == "integrity check failed"]
        check(not bad, "%s: no integrity failure among the guests that fit" % m)
    for m in ("daemon", "local-dontneed"):
        r = res[m]
        # Steady usage per guest that fits, against what each guest wrote and
        # freed (224 MiB). Not against the "none" run's steady usage: that is
        # measured after its first failure, and the OOM killer may pick any
        # guest (all of them die with the cgroup at its limit), so it can be 0.
        per = r["steady"] / max(r["fit"], 1)
        check(r["fit"] > 0 and per < (224 << 20) / 2,
              "%s: steady host usage per guest %d MiB < half of the 224 MiB each freed"
              % (m, per // (1 << 20)))
    check(max(res[m]["fit"] for m in ("daemon", "local-dontneed")) > none["fit"] or
          all(res[m]["steady"] < none["steady"] for m in ("daemon", "local-dontneed")),
          "with reporting more guests fit or host usage drops")
    if ok:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print("logs kept in", out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
