#!/usr/bin/env python3
"""Reclaim latency and fphd CPU with real Linux guests (user-mode Linux).

Run through scripts/bench-linux.sh (installs, builds Release, then runs this).
For each guest count and repetition: a fresh fphd, N UML guests booted with
scripts/linux-guest.sh whose fph-linux-workload writes --total MiB, keeps
--keep MiB and frees the rest (munmap). Measured:

  * t50 / t90: seconds from the workload's "FPH freed" marker (as read on the
    console) until the guest's RAM file (st_blocks * 512, through
    /proc/PID/fd, sampled every 50 ms) has dropped from its peak by 50% / 90%
    of the bytes the workload freed;
  * fphd CPU: user+system time of fphd from just before the guests free until
    every guest's backing has been stable for 3 s (reporting passes run every
    2 s), from /proc/PID/stat (utime+stime, all threads including exited ones)
    and the sum of /proc/PID/task/*/schedstat (ns); divided by the GiB the
    kernel-measured backing dropped in the same window.

  * raw punch: after each run, the kernel's own cost of the same work on
    this machine at that moment (a written, shared-mapped 1 GiB tmpfs file
    punched in 16 MiB fallocate calls); "CPU ratio" is fphd's CPU per GiB
    over it, the median of the per-run ratios (a busy machine moves both).

Each guest's own verifier must report corrupted_pages=0 (checked after the
measurement window: the workload reallocates and verifies everything it owns).
Not a test: it prints a table of medians and optionally writes JSON.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "linux-guest.sh")
TICK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20
GIB = 1 << 30


def parse_marker(line):
    at = line.find("FPH ")
    if at < 0:
        return None
    rest = line[at + 4:].rstrip("\r\n")
    head, _, tail = rest.partition(" ")
    m = {"event": head}
    while tail:
        tail = tail.lstrip(" ")
        if tail.startswith("text="):
            m["text"] = tail[5:]
            break
        word, _, tail = tail.partition(" ")
        k, eq, v = word.partition("=")
        if eq:
            m[k] = v
    return m


class Guest:
    def __init__(self, label, sock, root, mem, wargs, workdir):
        self.label = label
        self.tmpdir = tempfile.mkdtemp(prefix="fph-uml-bench-", dir="/dev/shm")
        self.log = open(os.path.join(workdir, label + ".console"), "w")
        cmd = ["/bin/bash", SCRIPT, "boot", "--socket", sock, "--rootdir", root, "--mem", mem,
               "--tmpdir", self.tmpdir, "--"] + wargs
        # Own session/process group: the script execs UML (pid == group), UML
        # forks helpers and ignores SIGTERM; the group is SIGKILLed at the end.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.lines = []
        self.markers = []
        self.cv = threading.Condition()
        self.eof = False
        self.ram_fd_path = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            self.log.write(line)
            self.log.flush()
            m = parse_marker(line)
            with self.cv:
                self.lines.append(line)
                if m:
                    m["_t"] = time.monotonic()
                    self.markers.append(m)
                self.cv.notify_all()
        with self.cv:
            self.eof = True
            self.cv.notify_all()

    def wait_marker(self, event, timeout, **match):
        deadline = time.monotonic() + timeout
        with self.cv:
            i = 0
            while True:
                for m in self.markers[i:]:
                    if m["event"] == event and all(m.get(k) == v for k, v in match.items()):
                        return m
                i = len(self.markers)
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    tail = "".join(self.lines[-40:])
                    raise RuntimeError(f"{self.label}: no 'FPH {event} {match}' within {timeout} s\n{tail}")
                self.cv.wait(left)

    def all_markers(self, event):
        with self.cv:
            return [m for m in self.markers if m["event"] == event]

    def send_line(self):
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def ram_bytes(self):
        """st_blocks * 512 of UML's deleted RAM file in its TMPDIR (-1 if not open)."""
        if self.ram_fd_path is None:
            fds = f"/proc/{self.pid}/fd"
            try:
                names = os.listdir(fds)
            except OSError:
                return -1
            for n in names:
                try:
                    t = os.readlink(f"{fds}/{n}")
                except OSError:
                    continue
                if t.startswith(self.tmpdir + "/") and t.endswith(" (deleted)"):
                    self.ram_fd_path = f"{fds}/{n}"
                    break
            if self.ram_fd_path is None:
                return -1
        try:
            return os.stat(self.ram_fd_path).st_blocks * 512
        except OSError:
            return -1

    def kill(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.reader.join(timeout=5)
        self.log.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def fphd_cpu(pid):
    """(stat seconds, schedstat seconds) of fphd: utime+stime of the whole
    process, and the sum of every live thread's schedstat run time."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    stat_s = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)
    sys_s = int(fields[12]) / TICK
    sched_ns = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                sched_ns += int(f.read().split()[0])
        except OSError:
            pass
    return stat_s, sched_ns / 1e9, sys_s


def discarded_bytes(url):
    """fphd's own count of bytes it discarded (all VMs), for comparison only:
    reclaim is always the kernel-measured drop."""
    import urllib.request
    total = 0.0
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("fphd_discarded_bytes_total"):
                total += float(line.rsplit(" ", 1)[1])
    return total


class Fphd:
    def __init__(self, build, workdir):
        self.sock = os.path.join(workdir, "fphd.sock")
        self.out = open(os.path.join(workdir, "fphd.out"), "w+")
        self.err = open(os.path.join(workdir, "fphd.log"), "w")
        self.proc = subprocess.Popen([os.path.join(build, "daemon", "fphd"), "--listen", self.sock,
                                      "--metrics", "127.0.0.1:0"], stdout=self.out, stderr=self.err)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with open(self.out.name) as f:
                text = f.read()
            if '"event":"ready"' in text:
                self.url = re.search(r'"metrics":"([^"]*)"', text).group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("fphd did not start: " + open(self.err.name).read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        self.err.close()


def one_run(args, n, rep, root, workdir):
    fphd = Fphd(args.build, workdir)
    guests = []
    try:
        freed_mib = args.total - args.keep
        wargs = [f"--total={args.total}", f"--keep={args.keep}", f"--realloc={args.realloc}", "--wait-stdin"]
        for i in range(n):
            guests.append(Guest(f"n{n}-r{rep}-g{i + 1}", fphd.sock, root, args.mem,
                                wargs + [f"--seed={i + 1}"], workdir))
        for g in guests:
            b = g.wait_marker("balloon", 120)
            if b.get("bound") != "1":
                raise RuntimeError(f"{g.label}: virtio_balloon did not bind: {b}")
        for g in guests:
            g.wait_marker("waiting", 600, phase="allocated")
        peak = [g.ram_bytes() for g in guests]
        for _ in range(10):
            time.sleep(0.05)
            peak = [max(p, g.ram_bytes()) for p, g in zip(peak, guests)]

        # fphd's CPU while nothing is freed (its sampler, metrics, stats
        # requests): the baseline the reclaim window is compared with.
        idle0 = fphd_cpu(fphd.proc.pid)
        t_idle0 = time.monotonic()
        time.sleep(args.idle)
        idle1 = fphd_cpu(fphd.proc.pid)
        idle_rate = (idle1[1] - idle0[1]) / (time.monotonic() - t_idle0)

        disc0 = discarded_bytes(fphd.url)
        cpu0 = fphd_cpu(fphd.proc.pid)
        t_cpu0 = time.monotonic()
        for g in guests:
            g.send_line()
        freed = [None] * n
        t_free = [None] * n
        t50 = [None] * n
        t90 = [None] * n
        last = [None] * n
        stable_since = [None] * n
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            now_t = time.monotonic()
            for k, g in enumerate(guests):
                if freed[k] is None:
                    ms = g.all_markers("freed")
                    if ms:
                        freed[k] = int(ms[0]["bytes"])
                        t_free[k] = ms[0]["_t"]
                cur = g.ram_bytes()
                if cur != last[k]:
                    last[k] = cur
                    stable_since[k] = now_t
                if freed[k] is None or cur < 0:
                    continue
                got = peak[k] - cur
                if t50[k] is None and got >= 0.5 * freed[k]:
                    t50[k] = now_t - t_free[k]
                if t90[k] is None and got >= 0.9 * freed[k]:
                    t90[k] = now_t - t_free[k]
            done = all(t is not None for t in t90) and all(now_t - s >= 3.0 for s in stable_since)
            if done:
                break
            time.sleep(0.05)
        cpu1 = fphd_cpu(fphd.proc.pid)
        window = time.monotonic() - t_cpu0
        disc1 = discarded_bytes(fphd.url)
        final = [g.ram_bytes() for g in guests]
        reclaimed = sum(p - f for p, f in zip(peak, final))

        # Let every workload finish: verify what it kept, reallocate, verify all.
        for g in guests:
            g.wait_marker("waiting", 300, phase="freed")
            g.send_line()
        for g in guests:
            g.wait_marker("waiting", 300, phase="reallocated")
            g.send_line()
        corrupted = 0
        for g in guests:
            g.wait_marker("done", 300)
            for v in g.all_markers("verify"):
                corrupted += int(v.get("corrupted_pages", "-1"))
        return {
            "guests": n, "rep": rep, "freed_mib": freed_mib,
            "freed_bytes": freed, "peak_bytes": peak, "final_bytes": final,
            "t50": t50, "t90": t90, "window_s": window,
            "reclaimed_bytes": reclaimed, "discarded_bytes": disc1 - disc0,
            "cpu_stat_s": cpu1[0] - cpu0[0], "cpu_sched_s": cpu1[1] - cpu0[1],
            "idle_cpu_per_s": idle_rate, "cpu_sys_s": cpu1[2] - cpu0[2],
            "corrupted_pages": corrupted,
            "loadavg": open("/proc/loadavg").read().split()[0],
        }
    finally:
        for g in guests:
            g.kill()
        fphd.stop()


def raw_punch_ms_per_gib(size=1 << 30, chunk=16 << 20):
    """The kernel's own cost of what fphd does, on this machine now: a shared
    mapping of a tmpfs file with every page written (like a UML RAM file),
    then fallocate(PUNCH_HOLE) over it in 16 MiB calls (fphd coalesces up to
    16 MiB). CPU ms (user+system of this process) per GiB."""
    import ctypes
    import mmap
    import resource
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    path = tempfile.mktemp(prefix="fph-raw-punch-", dir="/dev/shm")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        for off in range(0, size, 4096):
            m[off] = 1
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for off in range(0, size, chunk):
            if libc.fallocate(fd, 3, off, chunk) != 0:  # PUNCH_HOLE | KEEP_SIZE
                raise OSError(ctypes.get_errno(), "fallocate")
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        m.close()
    finally:
        os.close(fd)
    return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1e3 * (1 << 30) / size


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(REPO, "build", "release"))
    ap.add_argument("--guests", default="1,4", help="guest counts, comma separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mem", default="512M")
    ap.add_argument("--total", type=int, default=288, help="MiB each workload writes")
    ap.add_argument("--keep", type=int, default=32, help="MiB each workload keeps (frees total-keep)")
    ap.add_argument("--realloc", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=60, help="seconds to wait for reclaim after the free")
    ap.add_argument("--idle", type=float, default=3, help="seconds of fphd idle CPU baseline before the free")
    ap.add_argument("--json", help="write every run's raw numbers here")
    args = ap.parse_args()
    args.build = os.path.abspath(args.build)

    work = tempfile.mkdtemp(prefix="fph-bench-linux-")
    root = os.path.join(work, "root")
    subprocess.run(["/bin/bash", SCRIPT, "build", root, "--workload",
                    os.path.join(args.build, "linuxguest", "fph-linux-workload")], check=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    runs = []
    ok = True
    try:
        for n in [int(x) for x in args.guests.split(",")]:
            for rep in range(1, args.reps + 1):
                d = os.path.join(work, f"n{n}-r{rep}")
                os.makedirs(d)
                r = one_run(args, n, rep, root, d)
                # Paired with each run: the raw kernel cost of punching 1 GiB now.
                r["raw_punch_ms_per_gib"] = raw_punch_ms_per_gib()
                runs.append(r)
                t50 = " ".join("-" if t is None else f"{t:.2f}" for t in r["t50"])
                t90 = " ".join("-" if t is None else f"{t:.2f}" for t in r["t90"])
                gib = r["reclaimed_bytes"] / GIB
                print(f"guests={n} rep={rep} t50=[{t50}] t90=[{t90}] reclaimed_mib={r['reclaimed_bytes'] / MIB:.0f}"
                      f" fphd_cpu_ms(stat)={r['cpu_stat_s'] * 1e3:.0f} (system {r['cpu_sys_s'] * 1e3:.0f}) fphd_cpu_ms(schedstat)={r['cpu_sched_s'] * 1e3:.1f}"
                      f" ms/GiB={r['cpu_sched_s'] * 1e3 / gib if gib > 0 else float('nan'):.1f}"
                      f" idle_cpu_ms_per_s={r['idle_cpu_per_s'] * 1e3:.2f}"
                      f" raw_punch_ms_per_gib={r['raw_punch_ms_per_gib']:.0f}"
                      f" fphd_discarded_mib={r['discarded_bytes'] / MIB:.0f}"
                      f" window_s={r['window_s']:.1f} corrupted_pages={r['corrupted_pages']} load1={r['loadavg']}",
                      flush=True)
                if r["corrupted_pages"] != 0 or any(t is None for t in r["t90"]):
                    ok = False
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(runs, f, indent=1)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"medians over {args.reps} repetitions; each guest: {args.mem} RAM, writes {args.total} MiB, "
          f"frees {args.total - args.keep} MiB")
    hdr = ("guests", "t50 s", "t90 s", "t90 s (last guest)", "reclaimed MiB", "fphd CPU ms",
           "CPU ms/GiB", "CPU ms/GiB (stat)", "system %", "idle ms/s", "raw punch ms/GiB", "CPU ratio")
    print("%-7s %8s %8s %19s %14s %12s %11s %18s %9s %10s %17s %10s" % hdr)
    for n in sorted({r["guests"] for r in runs}):
        rs = [r for r in runs if r["guests"] == n]
        all50 = med([med(r["t50"]) for r in rs])
        all90 = med([med(r["t90"]) for r in rs])
        last90 = med([max((t for t in r["t90"] if t is not None), default=None) for r in rs])
        rec = med([r["reclaimed_bytes"] / MIB for r in rs])
        cpu = med([r["cpu_sched_s"] * 1e3 for r in rs])
        per = med([r["cpu_sched_s"] * 1e3 / (r["reclaimed_bytes"] / GIB) for r in rs if r["reclaimed_bytes"] > 0])
        per_stat = med([r["cpu_stat_s"] * 1e3 / (r["reclaimed_bytes"] / GIB) for r in rs if r["reclaimed_bytes"] > 0])
        idle = med([r["idle_cpu_per_s"] * 1e3 for r in rs])
        sysp = med([100 * r["cpu_sys_s"] / r["cpu_stat_s"] for r in rs if r["cpu_stat_s"] > 0])
        raw = med([r["raw_punch_ms_per_gib"] for r in rs])
        ratio = med([r["cpu_sched_s"] * 1e3 / (r["reclaimed_bytes"] / GIB) / r["raw_punch_ms_per_gib"]
                     for r in rs if r["reclaimed_bytes"] > 0 and r["raw_punch_ms_per_gib"] > 0])
        print("%-7d %8.2f %8.2f %19.2f %14.0f %12.1f %11.1f %18.0f %9.0f %10.2f %17.0f %10.2f"
              % (n, all50, all90, last90, rec, cpu, per, per_stat, sysp, idle, raw, ratio))
    print(f"host: {os.cpu_count()} CPUs, load average now {open('/proc/loadavg').read().split()[0]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
