"""Orchestration: fphd, guests launched one after another into a memory
cgroup, sampling of host usage (cgroup) and per-guest resident memory
(/proc/PID/status RssAnon + RssShmem), fit detection, results."""
import json
import os
import re
import signal
import statistics
import subprocess
import threading
import time

from . import cgroup as cg
from . import fit
from . import linux
from . import report

MIB = 1 << 20

MODES = ("none", "daemon", "local-dontneed", "local-free")


def mode_args(mode, socket=None):
    """fph-guest arguments selecting how (and whether) freed memory is reported."""
    if mode == "none":
        # Private anonymous RAM, nothing reported: freed memory stays with the guest.
        return ["--local-reclaim", "dontneed", "--no-reporting"]
    if mode == "daemon":
        if not socket:
            raise ValueError("daemon mode needs fphd's socket")
        return ["--connect", socket]
    if mode == "local-dontneed":
        return ["--local-reclaim", "dontneed"]
    if mode == "local-free":
        return ["--local-reclaim", "free"]
    raise ValueError("unknown mode %r (want one of %s)" % (mode, ", ".join(MODES)))


def parse_size(s):
    s = str(s).strip()
    mul = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1].upper() in mul:
        return int(s[:-1]) * mul[s[-1].upper()]
    return int(s)


def proc_resident(pid):
    """RssAnon + RssShmem of a process in bytes (kernel), None if it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            text = f.read()
    except OSError:
        return None
    total = 0
    for line in text.splitlines():
        if line.startswith("RssAnon:") or line.startswith("RssShmem:"):
            total += int(line.split()[1]) * 1024
    return total


class Proc:
    """A child process whose stdout is JSON lines, each stamped with time.monotonic()."""

    def __init__(self, argv, stderr_path, cgroup_procs=None):
        self.argv = argv
        self.events = []
        self.lock = threading.Lock()
        self.stopped_by_us = False
        err = open(stderr_path, "w")

        def enter_cgroup():
            if cgroup_procs:
                with open(cgroup_procs, "w") as f:
                    f.write(str(os.getpid()))

        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                  preexec_fn=enter_cgroup if cgroup_procs else None)
        err.close()
        self.pid = self.p.pid
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for raw in self.p.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            ev["_t"] = time.monotonic()
            with self.lock:
                self.events.append(ev)

    def find(self, kind):
        with self.lock:
            return [e for e in self.events if e.get("event") == kind]

    def wait_event(self, kind, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.find(kind)
            if got:
                return got[0]
            if self.p.poll() is not None:
                self.t.join(1)
                got = self.find(kind)
                return got[0] if got else None
            time.sleep(0.05)
        return None

    def stop(self, timeout):
        if self.p.poll() is None:
            self.stopped_by_us = True
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.t.join(5)
        return self.p.returncode


class Fphd:
    def __init__(self, fphd, workdir):
        self.socket = os.path.join(workdir, "fphd.sock")
        self.proc = Proc([fphd, "--listen", self.socket, "--metrics", "off"],
                         os.path.join(workdir, "fphd.log"))
        if not self.proc.wait_event("ready", 60):
            self.proc.stop(5)
            raise RuntimeError("fphd did not become ready; see %s/fphd.log" % workdir)

    def stop(self):
        return self.proc.stop(30)


class Sampler:
    """Samples cgroup usage and every guest's resident memory every `interval` s."""

    def __init__(self, group, guests, interval, t0, shmem=False):
        self.group, self.guests, self.interval, self.t0 = group, guests, interval, t0
        self.shmem = shmem
        self.samples = []
        self._stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self):
        rss = {}
        alive = 0
        uml = [g["proc"].pid for g in list(self.guests) if hasattr(g["proc"], "resident")]
        groups = linux.pids_by_group(uml) if uml else {}
        inside = self.group.pids() if uml else set()
        for g in list(self.guests):
            pr = g["proc"]
            if pr.p.poll() is None:
                # fph-guest: RssAnon + RssShmem; a UML guest: its RAM file's blocks.
                v = pr.resident() if hasattr(pr, "resident") else proc_resident(pr.pid)
                if v is not None:
                    rss[g["name"]] = v
                    alive += 1
                if hasattr(pr, "resident"):
                    # The guest's host pids (UML: one process group), kept so
                    # an OOM victim the kernel names can be traced to its guest.
                    now_pids = set(groups.get(pr.pid, ()))
                    g["pids"] = now_pids | g.get("pids", set())
                    # Every host process of the guest must be charged here.
                    # (A process the OOM killer took leaves the cgroup before
                    # it is gone: only what is seen before the first failure counts.)
                    g.setdefault("outside", {})
                    for p in linux.outside_cgroup(now_pids - inside, self.group.rel_path()):
                        g["outside"].setdefault(p, time.monotonic() - self.t0)
        s = {"t": time.monotonic() - self.t0, "cgroup": self.group.usage(), "alive": alive,
             "launched": len(self.guests), "rss": rss}
        if self.shmem:
            st = self.group.stat()
            s["shmem"] = st.get("shmem", st.get("total_shmem"))
        self.samples.append(s)

    def stop(self):
        self._stop.set()
        self.th.join()


def oom_killed(group, base, sigkilled):
    """True if the cgroup's OOM kill counter (kernel) accounts for `sigkilled` SIGKILLs."""
    return group.oom_kills() - base >= sigkilled


def guest_rss_series(samples, name):
    return [(s["t"], s["rss"][name]) for s in samples if name in s["rss"]]


def _stable(series, window, tolerance):
    """True if the series covers `window` seconds and moved less than `tolerance` bytes in it."""
    if not series:
        return False
    t_end = series[-1][0]
    if t_end - series[0][0] < window:
        return False
    vals = [v for t, v in series if t >= t_end - window]
    return max(vals) - min(vals) <= tolerance


def run_guests(cfg, mode, specs, workdir, log=print):
    """Launches `specs` (list of dicts: name, args) one after another into a fresh
    memory cgroup limited to cfg["limit"], each after the previous one settled.
    Stops launching at the first failure. Returns (result dict, samples, guests)."""
    os.makedirs(workdir, exist_ok=True)
    group = cg.MemoryCgroup(cfg.get("cgroup_name", "fph-capacity-%d" % os.getpid()), cfg["limit"])
    fphd = None
    guests = []
    sampler = None
    patience = cfg.get("patience", 300)
    kind = cfg.get("kind", "fph-guest")
    try:
        if mode == "daemon" or kind == "linux":
            # fphd runs outside the limited cgroup: the memfd pages are charged
            # to the guest that first touches them, hole punching uncharges them.
            # A UML guest needs a back end to boot even without its balloon
            # driver (mode none: the driver is not loaded, nothing is reported).
            fphd = Fphd(cfg["fphd"], workdir)
        t0 = time.monotonic()
        sampler = Sampler(group, guests, cfg.get("interval", 0.2), t0, shmem=(kind == "linux"))
        oom_base = group.oom_kills()
        oom_seen = oom_base
        victims_base = set(oom_victims(read_kernel_log())) if kind == "linux" else set()
        sigkilled = 0
        for spec in specs:
            g = {"name": spec["name"], "launched_at": time.monotonic() - t0, "failed_at": None,
                 "settled_at": None, "oom_killed": False, "_t_base": t0}
            logf = os.path.join(workdir, "%s.log" % spec["name"])
            if kind == "linux":
                tmp = linux.make_tmpdir(cfg.get("shm", "/dev/shm"))
                argv = linux.boot_argv(cfg["script"], fphd.socket, cfg["rootdir"], spec["mem"], tmp,
                                       spec.get("mode", mode) == "daemon", spec["workload"],
                                       spec.get("kernel_args", ()))
                log("[%s] launching %s: %s" % (mode, spec["name"], " ".join(argv[1:])))
                g["proc"] = linux.UmlGuest(argv, logf, tmp, group.procs_file(),
                                           cfg.get("hold_allocated", 1.0))
            else:
                argv = [cfg["guest"], "--name", spec["name"]] + mode_args(
                    spec.get("mode", mode), fphd.socket if fphd else None) + spec["args"]
                log("[%s] launching %s: %s" % (mode, spec["name"], " ".join(argv[1:])))
                g["proc"] = Proc(argv, logf, group.procs_file())
            guests.append(g)
            deadline = time.monotonic() + patience
            settle = cfg.get("settle_s", 5.0)
            while time.monotonic() < deadline:
                time.sleep(0.1)
                now = time.monotonic() - t0
                if kind == "linux" and group.oom_kills() > oom_seen:
                    # A UML guest is many host processes: the kernel names
                    # its victim, the pids sampled so far say whose it was.
                    oom_seen = group.oom_kills()
                    victims = set(oom_victims(read_kernel_log())) - victims_base
                    hit = attribute_oom(guests, victims)
                    for x in hit:
                        if x["failed_at"] is None:
                            x["failed_at"] = now
                            x["oom_killed"] = True
                            x["failure"] = "oom-killed"
                    if not hit:
                        log("[%s] the cgroup counted an OOM kill not traced to a guest (victims %s)"
                            % (mode, sorted(victims)))
                # Failures of any guest so far (the OOM killer picks the biggest).
                for x in guests:
                    rc = x["proc"].p.poll()
                    if rc is not None and x["failed_at"] is None:
                        x["failed_at"] = now
                        if kind == "linux":
                            # Exited before the run stopped it: a guest that
                            # halts on its own did not keep running.
                            x["failure"] = "guest exited early (status %s)" % rc
                        if rc == -signal.SIGKILL:
                            # The kernel counts the kill before the process
                            # is reaped: a SIGKILLed guest was OOM-killed if
                            # the cgroup counted at least as many OOM kills
                            # as guests died of SIGKILL so far.
                            sigkilled += 1
                            x["oom_killed"] = oom_killed(group, oom_base, sigkilled)
                    for e in x["proc"].find("workload_done"):
                        if e.get("alloc_shortfall_bytes", 0) > 0 and x["failed_at"] is None:
                            x["failed_at"] = e["_t"] - t0
                if any(x["failed_at"] is not None for x in guests):
                    break
                if not g["proc"].find("workload_done"):
                    continue
                reports = g["proc"].find("report_done")
                quiet = not reports or (time.monotonic() - reports[-1]["_t"]) >= settle
                series = guest_rss_series(sampler.samples, g["name"])
                if quiet and _stable(series, settle, cfg.get("tolerance", 8 * MIB)):
                    g["settled_at"] = now
                    log("[%s] %s settled at %.1f s: resident %d MiB, host %d MiB" % (
                        mode, g["name"], now, series[-1][1] // MIB, group.usage() // MIB))
                    break
            if g["settled_at"] is None:
                first = next((x for x in guests if x["failed_at"] is not None), None)
                log("[%s] stopping at %s: %s" % (mode, g["name"],
                    "%s failed" % first["name"] if first else "did not settle in %d s" % patience))
                break
            if cfg.get("between") and spec is not specs[-1]:
                cfg["between"](group, guests)
        # Steady state with everything that fitted still running.
        steady_from = time.monotonic() - t0
        time.sleep(cfg.get("steady_s", 3.0))
        steady_to = time.monotonic() - t0
        sampler.stop()
        sampler.sample()
        if kind == "linux":
            # Release every idle workload at once: each runs its final verify
            # (every page it owns) and the guest halts.
            for g in guests:
                if g["proc"].p.poll() is None:
                    g["proc"].stopped_by_us = True
                    g["proc"].send_line()
        for g in guests:
            g["returncode"] = g["proc"].stop(patience)
            if g["failed_at"] is None and not g["proc"].stopped_by_us:
                g["failed_at"] = steady_to
                if g["returncode"] == -signal.SIGKILL:
                    sigkilled += 1
                    g["oom_killed"] = oom_killed(group, oom_base, sigkilled)
        samples = sampler.samples
        peak_file = group.peak()
        oom_total = group.oom_kills()
    finally:
        if sampler:
            sampler.stop()
        for g in guests:
            if hasattr(g["proc"], "cleanup"):
                g["proc"].cleanup()  # SIGKILL to the UML process group, RAM directory removed
            elif g["proc"].p.poll() is None:
                g["proc"].p.kill()
                g["proc"].p.wait()
        if fphd:
            fphd.stop()
        group.remove()

    res = summarize(mode, guests, samples, steady_from, steady_to, peak_file)
    res["oom_kills"] = oom_total - oom_base
    if kind == "linux":
        res["guest_pids"] = sum(len(g.get("pids", ())) for g in guests)
        t_fail = fit.first_failure_time(guests)
        res["guest_pids_outside_cgroup"] = sorted(
            p for g in guests for p, t in g.get("outside", {}).items() if t_fail is None or t < t_fail)
        # Before the first failure: every launched guest alive, none being
        # OOM-killed (a killed UML process leaves its RAM file to the others).
        res["accounting"] = accounting_check(samples, fit.first_failure_time(guests))
        if res["accounting"]:
            res["accounting"]["guest_pids"] = res["guest_pids"]
            res["accounting"]["pids_outside"] = len(res["guest_pids_outside_cgroup"])
    return res, samples, guests


def read_kernel_log():
    """The kernel log (dmesg), '' if it cannot be read."""
    try:
        return subprocess.run(["dmesg"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=10).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return ""


_VICTIM = re.compile(r"(?:Killed process (\d+) |oom-kill:.*[,:]pid=(\d+),)")


def oom_victims(log_text):
    """Pids the OOM killer killed, from kernel log text ('Killed process N (comm)'
    and 'oom-kill:...,pid=N,' lines), in order, each once."""
    out = []
    for m in _VICTIM.finditer(log_text):
        pid = int(m.group(1) or m.group(2))
        if pid not in out:
            out.append(pid)
    return out


def attribute_oom(guests, victims):
    """Guests whose host pids (g["pids"], sampled while they ran) include a victim."""
    return [g for g in guests if g.get("pids") and set(g["pids"]) & set(victims)]


def accounting_check(samples, until=None):
    """Does the cgroup's charge track the guests? Over the samples: the sum of
    the guests' RAM backing (their RAM files' st_blocks) against the cgroup
    usage and its shmem counter (memory.stat), in bytes. `other` is what the
    cgroup holds beyond the guests' RAM (UML's own anonymous memory, page
    tables, kernel memory). Only samples before `until` (s) if given, and in
    which every guest launched so far was alive (a guest whose main process
    the OOM killer took can no longer be measured, but its RAM file stays
    charged while its other processes map it)."""
    rows = [(s["cgroup"], s.get("shmem"), sum(s["rss"].values())) for s in samples
            if s["rss"] and (until is None or s.get("t", 0) < until)
            and len(s["rss"]) >= s.get("launched", 0)]
    if not rows:
        return None
    shm = [abs(sh - ram) for _, sh, ram in rows if sh is not None]
    other = [u - ram for u, _, ram in rows]
    return {"samples": len(rows),
            "max_abs_shmem_minus_ram": max(shm) if shm else None,
            "other_min": min(other), "other_max": max(other),
            "other_median": statistics.median(other),
            "ram_sum_max": max(ram for _, _, ram in rows)}


def summarize(mode, guests, samples, steady_from, steady_to, peak_file=None):
    """Per-mode result from what was observed (pure apart from the inputs)."""
    for g in guests:
        ev = g["proc"].events if "proc" in g else g.get("events", [])
        g["events"] = ev
        g["stopped_by_us"] = g["proc"].stopped_by_us if "proc" in g else g.get("stopped_by_us")
        g["fits"], g["reason"] = fit.classify(g)
    first = None
    t_fail = fit.first_failure_time(guests)
    if t_fail is not None:
        f = min((g for g in guests if g.get("failed_at") is not None), key=lambda g: g["failed_at"])
        first = "%s %s" % (f["name"], f["reason"] if not f["fits"] else "failed")
    steady = [s["cgroup"] for s in samples if steady_from <= s["t"] <= steady_to]
    lat = []
    discard = []
    for g in guests:
        freed = [e for e in g["events"] if e.get("event") == "workload_freed"]
        # Only guests that fit: a guest being OOM-killed also "drops" its memory.
        if freed and samples and g["fits"]:
            rel = freed[0]["_t"] - g.get("_t_base", 0)
            l = fit.reclaim_latency(guest_rss_series(samples, g["name"]), rel, freed[0]["bytes"])
            if l is not None:
                lat.append(l)
        discard += [e["latency_us"] / 1000.0 for e in g["events"]
                    if e.get("event") == "report_done" and "latency_us" in e]
    peak = max([s["cgroup"] for s in samples] + ([peak_file] if peak_file else []), default=None)
    return {
        "mode": mode,
        "tried": len(guests),
        "fit": fit.count_fit(guests),
        "first_failure": first,
        "peak": peak,
        "steady": statistics.mean(steady) if steady else None,
        "reclaim_latency_s": statistics.median(lat) if lat else None,
        "discard_ms": statistics.median(discard) if discard else None,
        "guests": [{k: g.get(k) for k in ("name", "fits", "reason", "returncode", "launched_at",
                                           "settled_at", "failed_at", "oom_killed")}
                   for g in guests],
    }


def trace_text(ops):
    """[(time_ms, op, size, tag)] -> trace CSV (docs/experiments.md)."""
    return "time_ms,op,size,tag\n" + "".join("%d,%s,%s,%s\n" % o for o in ops)


COMPARE_METHODS = (("hole punch (fphd)", "daemon"), ("MADV_DONTNEED", "local-dontneed"),
                   ("MADV_FREE", "local-free"), ("no reporting", "none"))


def run_compare(cfg, workdir, methods=COMPARE_METHODS, log=print):
    """MADV_FREE vs MADV_DONTNEED vs hole punching, one guest of cfg["size"]:
    A) reuse: allocate+write, free, wait for the report, reallocate+write
       (refault cost), in a cgroup with room to spare (no pressure);
    B) pressure: the guest frees and is reported, then a second guest (no
       reporting) allocates what only fits if the host gets that memory back."""
    size = cfg["size"]
    delay = cfg.get("delay_ms", 2000)
    wait = delay + 3000
    s = "%dM" % (size // MIB)
    rows = []
    for label, mode in methods:
        wd = os.path.join(workdir, mode)
        os.makedirs(wd, exist_ok=True)
        trace = os.path.join(wd, "reuse.csv")
        with open(trace, "w") as f:
            # The guest has `size` + 32 MiB of RAM, 32 MiB resident: the trace
            # allocates all but 4 MiB of the rest, so the second allocation
            # reuses (nearly) only memory that was reported.
            r = "%dM" % (size // MIB - 4)
            f.write(trace_text([(0, "alloc", r, "a"), (500, "free", "all", "a"),
                                (500 + wait, "alloc", r, "a"), (1000 + wait, "free", "all", "a")]))
        common = ["--reporting-delay-ms", str(delay), "--resident", "32M"]
        a_cfg = dict(cfg, limit=2 * size + 256 * MIB, cgroup_name="fph-compare-%d" % os.getpid())
        res, samples, guests = run_guests(a_cfg, mode, [
            {"name": "reuse", "args": ["--memory", "%dM" % (size // MIB + 32), "--workload",
                                       "trace:" + trace, "--no-check-reported"] + common}],
            wd, log)
        with open(os.path.join(wd, "reuse-usage.csv"), "w") as f:
            f.write(report.usage_csv(samples, ["reuse"]))
        g = guests[0]
        ops = [e for e in g["events"] if e.get("event") == "trace_op"]
        row = {"method": label, "mode": mode}
        t_base = g["_t_base"]
        free_ev = next((e for e in ops if e["op"] == "free"), None)
        realloc = [e for e in ops if e["op"] == "alloc"]
        if free_ev and len(realloc) >= 2:
            t_free = free_ev["_t"] - t_base
            t_re = realloc[1]["_t"] - t_base - realloc[1]["us"] / 1e6
            host = [(x["t"], x["cgroup"]) for x in samples]
            before = [v for t, v in host if t <= t_free]
            row["usage_after_free"] = max([v for t, v in host if t < t_re][-3:] or [0])
            row["reclaim_s"] = fit.reclaim_latency(
                [(t, v) for t, v in host if t < t_re], t_free, size) if before else None
            row["reuse_ms"] = realloc[1]["us"] / 1000.0
            row["reuse_minflt"] = realloc[1]["minflt"]
            row["first_ms"] = realloc[0]["us"] / 1000.0
            row["first_minflt"] = realloc[0]["minflt"]
        row["reuse_fits"] = g.get("fits")
        row["reuse_reason"] = g.get("reason")
        # B) pressure
        # The limit leaves room for the second guest's `size` only if the
        # first guest's freed `size` is really given back: 1.5 x size + 64 MiB
        # (the first guest keeps 32 MiB resident plus its own overhead).
        pressure_limit = size + size // 2 + 64 * MIB
        b_cfg = dict(cfg, limit=pressure_limit, cgroup_name="fph-compare-%d" % os.getpid())
        pres, psamples, pguests = run_guests(b_cfg, mode, [
            {"name": "freer", "args": ["--memory", "%dM" % (size // MIB + 64), "--workload",
                                       "alloc-free:%s:0" % s] + common},
            {"name": "pressure", "mode": "none",
             "args": ["--memory", "%dM" % (size // MIB + 64), "--workload",
                      "alloc-free:%s:0" % s]}], wd + "/pressure", log)
        freer = next(x for x in pguests if x["name"] == "freer")
        press = next((x for x in pguests if x["name"] == "pressure"), None)
        row["pressure_fits"] = bool(press and press.get("fits") and freer.get("fits"))
        rs = [x["rss"].get("freer") for x in psamples if "freer" in x["rss"]]
        row["resident_after_pressure"] = rs[-1] if rs and freer.get("fits") else None
        row["pressure_detail"] = pres["guests"]
        rows.append(row)
        log("[compare] %s: %s" % (label, {k: v for k, v in row.items() if k != "pressure_detail"}))
    return rows
