"""Real Linux guests (user-mode Linux, scripts/linux-guest.sh) for the
capacity runner: console markers -> the runner's events, the guest's RAM
backing measured from the kernel, and a UML guest process the runner drives
like an fph-guest.

A UML guest is many host processes (the kernel's main process, its helpers,
one process per guest address space), all in one process group started by
the script (which execs UML, so the group id is the pid we started). Its RAM
is a file UML creates and unlinks in $TMPDIR (a directory on /dev/shm), mapped
shared; fphd punches holes in it. Every process of the guest is in the
experiment's memory cgroup, so the shmem pages they fault in are charged to it.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

MIB = 1 << 20
MODES = ("none", "daemon")


def parse_marker(line):
    """'FPH event k=v ... text=rest' -> {"event": ..., k: v (str)}, None if not a marker.
    A text= word is always last and takes the rest of the line."""
    line = line.rstrip("\r\n")
    i = line.find("FPH ")
    if i < 0:
        return None
    words = line[i + 4:].split(" ")
    if not words or not words[0]:
        return None
    ev = {"event": words[0]}
    for k, w in enumerate(words[1:], 1):
        if w.startswith("text="):
            ev["text"] = " ".join(words[k:])[5:]
            break
        if "=" in w:
            key, val = w.split("=", 1)
            ev[key] = val
    return ev


def _int(v, default=0):
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def runner_events(marker):
    """The runner's events (fph-guest's vocabulary, see fit.classify) for one
    console marker; [] if it means nothing to the runner.
      start                        -> ready
      freed bytes=N                -> workload_freed (bytes)
      waiting phase=reallocated    -> workload_done (burst done, the guest idles)
      error                        -> workload_done with a shortfall (the workload could not allocate)
      verify corrupted_pages=N>0   -> summary exit_code 3 (integrity check failed)
      workload exit=N              -> summary exit_code N (3 if the workload saw corruption)
      balloon loaded=.. bound=..   -> balloon (kept for the record)"""
    e = marker.get("event")
    if e == "start":
        return [{"event": "ready"}]
    if e == "freed":
        return [{"event": "workload_freed", "bytes": _int(marker.get("bytes"))}]
    if e == "waiting" and marker.get("phase") == "reallocated":
        return [{"event": "workload_done", "alloc_shortfall_bytes": 0}]
    if e == "error":
        return [{"event": "workload_done", "alloc_shortfall_bytes": 1, "error": marker.get("text", "")}]
    if e == "verify" and _int(marker.get("corrupted_pages")) > 0:
        return [{"event": "summary", "exit_code": 3, "phase": marker.get("phase")}]
    if e == "workload":
        rc = _int(marker.get("exit"), -1)
        # fph-linux-workload exits 1 on corruption, 2 on a system error.
        return [{"event": "summary", "exit_code": 3 if rc == 1 else rc}]
    if e == "balloon":
        return [{"event": "balloon", "loaded": marker.get("loaded"), "bound": marker.get("bound")}]
    return []


def boot_argv(script, socket, rootdir, mem, tmpdir, balloon, workload_args, kernel_args=()):
    """scripts/linux-guest.sh boot command line for one guest. With --tmpdir and
    --rootdir the script execs UML: the pid we start is UML's main process."""
    argv = ["/bin/bash", script, "boot", "--socket", socket, "--rootdir", rootdir, "--mem", mem,
            "--tmpdir", tmpdir]
    if not balloon:
        argv.append("--no-balloon")
    for k in kernel_args:
        argv += ["--kernel-arg", k]
    return argv + ["--"] + list(workload_args)


def workload_args(total_mib, keep_mib, realloc_mib, seed):
    """fph-linux-workload arguments: write total, keep `keep`, free the rest,
    write `realloc` more, then idle (wait point "reallocated") until the runner
    releases it at the end; the final verify checks every page it owns.
    --wait-stdin: the runner drives the wait points (allocated, freed, reallocated)."""
    if keep_mib > total_mib or total_mib <= 0:
        raise ValueError("linux workload: need 0 < keep (%d) <= total (%d)" % (keep_mib, total_mib))
    return ["--total=%d" % total_mib, "--keep=%d" % keep_mib, "--realloc=%d" % realloc_mib,
            "--seed=%d" % seed, "--wait-stdin"]


def parse_workload(spec):
    """'linux:TOTAL:KEEP:REALLOC' (MiB) -> (total, keep, realloc)."""
    parts = spec.split(":")
    if len(parts) != 4 or parts[0] != "linux":
        raise ValueError("--workload for linux guests is linux:TOTAL:KEEP:REALLOC (MiB), got %r" % spec)
    vals = []
    for p in parts[1:]:
        p = p.strip().upper()
        if p.endswith("M"):
            p = p[:-1]
        if not p.isdigit():
            raise ValueError("--workload %r: %r is not a size in MiB" % (spec, p))
        vals.append(int(p))
    if vals[1] > vals[0] or vals[0] == 0:
        raise ValueError("--workload %r: need 0 < KEEP <= TOTAL" % spec)
    return tuple(vals)


def deleted_files_bytes(pid, tmpdir, proc="/proc"):
    """Bytes the host kernel holds for the deleted files under `tmpdir` that
    process `pid` has open (UML's RAM file): st_blocks * 512, each inode once.
    None if the process is gone or has no such file."""
    fd_dir = os.path.join(proc, str(pid), "fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    prefix = tmpdir.rstrip("/") + "/"
    seen, total = set(), 0
    for fd in fds:
        p = os.path.join(fd_dir, fd)
        try:
            target = os.readlink(p)
            if not (target.startswith(prefix) and target.endswith(" (deleted)")):
                continue
            st = os.stat(p)
        except OSError:
            continue
        if st.st_ino in seen:
            continue
        seen.add(st.st_ino)
        total += st.st_blocks * 512
    return total if seen else None


def pids_in_group(pgid, proc="/proc"):
    """Host pids whose process group is pgid (a UML guest's processes)."""
    return pids_by_group([pgid], proc).get(pgid, [])


def pids_by_group(pgids, proc="/proc"):
    """{pgid: [pids]} for the given process groups, one pass over /proc."""
    want = set(pgids)
    out = {}
    for d in os.listdir(proc):
        if not d.isdigit():
            continue
        try:
            with open(os.path.join(proc, d, "stat")) as f:
                s = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, split after ')'.
        rest = s[s.rfind(")") + 2:].split()
        # rest[0] is the state: zombies (Z, X) have left their cgroup already.
        if len(rest) > 2 and int(rest[2]) in want and rest[0] not in ("Z", "X"):
            out.setdefault(int(rest[2]), []).append(int(d))
    return out


def memory_cgroup_of(text):
    """/proc/PID/cgroup text -> the process's memory cgroup path ('/name'):
    the v1 'N:...memory...:/path' line, else the v2 '0::/path' line; None."""
    v2 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            return parts[2]
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    return v2


def outside_cgroup(pids, cgroup_path, proc="/proc"):
    """Of `pids`, those that are alive (not zombies) and whose memory cgroup
    (/proc/PID/cgroup) is not `cgroup_path`. Processes that exit meanwhile
    (a guest forks short-lived ones while it boots) are not counted."""
    out = []
    for pid in pids:
        try:
            with open(os.path.join(proc, str(pid), "cgroup")) as f:
                cg = memory_cgroup_of(f.read())
            with open(os.path.join(proc, str(pid), "stat")) as f:
                st = f.read()
        except OSError:
            continue
        state = st[st.rfind(")") + 2:].split()[:1]
        if state and state[0] in ("Z", "X"):
            continue
        if cg is not None and cg != cgroup_path:
            out.append(pid)
    return out


class UmlGuest:
    """One UML guest driven like the runner's Proc: .p, .pid, .events, find(),
    wait_event(), stop(), stopped_by_us, resident() (RAM backing, kernel)."""

    def __init__(self, argv, log_path, tmpdir, cgroup_procs=None, hold_allocated=1.0):
        self.argv, self.tmpdir = argv, tmpdir
        self.events, self.markers = [], []
        self.lock = threading.Lock()
        self.stopped_by_us = False
        self.hold_allocated = hold_allocated
        self.log = open(log_path, "w")

        def pre():
            os.setsid()  # own process group: UML and its helpers go down together
            if cgroup_procs:
                with open(cgroup_procs, "w") as f:
                    f.write(str(os.getpid()))

        env = dict(os.environ, TMPDIR=tmpdir)
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, preexec_fn=pre, env=env)
        self.pid = self.p.pid
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def send_line(self):
        try:
            self.p.stdin.write(b"\n")
            self.p.stdin.flush()
        except (OSError, ValueError):
            pass

    def _read(self):
        for raw in self.p.stdout:
            line = raw.decode("utf-8", "replace")
            now = time.monotonic()
            self.log.write("%.3f %s" % (now, line if line.endswith("\n") else line + "\n"))
            self.log.flush()
            m = parse_marker(line)
            if not m:
                continue
            m["_t"] = now
            with self.lock:
                self.markers.append(m)
                for ev in runner_events(m):
                    ev["_t"] = now
                    self.events.append(ev)
            if m["event"] == "waiting":
                phase = m.get("phase")
                if phase == "allocated":
                    # The peak: hold it briefly, then let the workload free.
                    threading.Timer(self.hold_allocated, self.send_line).start()
                elif phase == "freed" or phase == "unpinned":
                    self.send_line()
                # "reallocated": idle until stop() releases it.

    def find(self, kind):
        with self.lock:
            return [e for e in self.events if e.get("event") == kind]

    def marker(self, kind):
        with self.lock:
            return [m for m in self.markers if m.get("event") == kind]

    def wait_event(self, kind, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.find(kind)
            if got or self.p.poll() is not None:
                return got[0] if got else None
            time.sleep(0.05)
        return None

    def resident(self):
        """Host memory behind the guest's RAM (st_blocks of its RAM file)."""
        return deleted_files_bytes(self.pid, self.tmpdir)

    def stop(self, timeout):
        """Release the idle workload (final verify), let the guest halt; UML
        ignores SIGTERM, so whatever is left gets SIGKILL on its group."""
        if self.p.poll() is None:
            self.stopped_by_us = True
            self.send_line()
            end = time.monotonic() + min(timeout, 60)
            while time.monotonic() < end and self.p.poll() is None:
                time.sleep(0.1)
        self.kill()
        self.t.join(5)
        return self.p.returncode

    def kill(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        if self.p.poll() is None:
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            self.p.stdin.close()
        except (OSError, ValueError):
            pass

    def cleanup(self):
        self.kill()
        self.t.join(5)
        self.log.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def make_tmpdir(base="/dev/shm"):
    """A new directory on tmpfs for one guest's RAM file."""
    return tempfile.mkdtemp(prefix="fph-cap-uml-", dir=base)


def build_root(script, rootdir, workload):
    subprocess.run(["/bin/bash", script, "build", rootdir, "--workload", workload], check=True,
                   stdout=subprocess.DEVNULL)
