"""Did a guest fit? Pure functions over what the runner observed.

A guest fits when it started, completed its workload (every allocation
satisfied) and was neither OOM-killed nor failed its integrity checks.
"""
import signal

FITS = "fits"


def classify(g):
    """g: dict with
         returncode   None (never exited, e.g. still running when the run stopped) or the
                      subprocess return code (negative = killed by that signal)
         stopped_by_us True if the runner sent SIGTERM/SIGKILL itself
         oom_killed   True if the cgroup's oom_kill counter rose when the guest died
         events       list of the guest's JSON events (dicts)
         failure      optional: a failure the runner observed itself (takes precedence)
       Returns (fits: bool, reason: str)."""
    events = g.get("events") or []
    kinds = {e.get("event") for e in events}
    rc = g.get("returncode")
    by_us = g.get("stopped_by_us", False)
    if g.get("failure"):
        # What the runner saw itself (a UML guest: an OOM victim among its
        # host processes, or it halted before the run stopped it).
        return False, g["failure"]
    if rc is not None and rc < 0 and not by_us:
        sig = -rc
        if sig == signal.SIGKILL and g.get("oom_killed"):
            return False, "oom-killed"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return False, "killed by " + name
    if "ready" not in kinds:
        return False, "did not start (exit %s)" % rc
    for e in events:
        if e.get("event") == "workload_done" and e.get("alloc_shortfall_bytes", 0) > 0:
            return False, "allocation failed (%d MiB short)" % (e["alloc_shortfall_bytes"] >> 20)
    summary = next((e for e in events if e.get("event") == "summary"), None)
    if summary is not None and summary.get("exit_code", 0) == 3:
        return False, "integrity check failed"
    if rc is not None and rc not in (0,) and not (by_us and rc == -signal.SIGTERM):
        if rc == 3:
            return False, "integrity check failed"
        return False, "exit status %d" % rc
    if "workload_done" not in kinds:
        return False, "workload did not finish"
    return True, FITS


def first_failure_time(guests):
    """Earliest time a guest was seen failed (died, or allocation failure), or None."""
    times = [g["failed_at"] for g in guests if g.get("failed_at") is not None]
    return min(times) if times else None


def count_fit(guests):
    """Guests (launched one after another, each after the previous one settled)
    that were running with their workload done before the first failure. A
    failure while launching guest k means k-1 fit, whichever guest the OOM
    killer picked."""
    t_fail = first_failure_time(guests)
    n = 0
    for g in guests:
        s = g.get("settled_at")
        if s is None:
            break
        if t_fail is not None and s >= t_fail:
            break
        n += 1
    return n


def reclaim_latency(samples, t_free, freed_bytes, fraction=0.9):
    """samples: [(t, resident_bytes)] of one guest, time-ordered. Seconds from
    t_free until the guest's resident memory first dropped by `fraction` of
    `freed_bytes` relative to its value at t_free; None if it never did."""
    if freed_bytes <= 0:
        return None
    before = None
    for t, rss in samples:
        if t <= t_free:
            before = rss
        elif before is None:
            before = rss
    if before is None:
        return None
    target = before - fraction * freed_bytes
    for t, rss in samples:
        if t >= t_free and rss <= target:
            return t - t_free
    return None
