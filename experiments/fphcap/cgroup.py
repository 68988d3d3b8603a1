"""Memory cgroups, v1 (/sys/fs/cgroup/memory) or v2 (/sys/fs/cgroup with cgroup.controllers).

Usage and OOM kills are read from the kernel's files; nothing is assumed.
"""
import os
import time

ROOT = "/sys/fs/cgroup"


def detect(root=ROOT):
    """Returns ("v2", path) or ("v1", path) for the memory hierarchy, or raises."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        with open(os.path.join(root, "cgroup.controllers")) as f:
            if "memory" not in f.read().split():
                raise RuntimeError("cgroup v2 without the memory controller at " + root)
        return "v2", root
    v1 = os.path.join(root, "memory")
    if os.path.exists(os.path.join(v1, "memory.limit_in_bytes")):
        return "v1", v1
    raise RuntimeError("no memory cgroup found under " + root)


def parse_kv(text):
    """'key value' lines (memory.events, memory.oom_control, memory.stat) -> dict of ints."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


class MemoryCgroup:
    """A memory cgroup created for one experiment run; remove() rmdirs it."""

    def __init__(self, name, limit_bytes, root=ROOT):
        self.version, base = detect(root)
        self.path = os.path.join(base, name)
        if self.version == "v2":
            # The parent must delegate the memory controller to its children.
            ctl = os.path.join(base, "cgroup.subtree_control")
            try:
                with open(ctl) as f:
                    enabled = f.read().split()
                if "memory" not in enabled:
                    with open(ctl, "w") as f:
                        f.write("+memory")
            except OSError:
                pass
        if os.path.exists(self.path):
            remove_dir(self.path, self.version)
        os.mkdir(self.path)
        self.limit = limit_bytes
        try:
            if self.version == "v1":
                self._write("memory.limit_in_bytes", str(limit_bytes))
                # No swap here; memsw (if present) gets the same limit so a
                # swap-enabled host behaves the same.
                if os.path.exists(os.path.join(self.path, "memory.memsw.limit_in_bytes")):
                    try:
                        self._write("memory.memsw.limit_in_bytes", str(limit_bytes))
                    except OSError:
                        pass
            else:
                self._write("memory.max", str(limit_bytes))
                if os.path.exists(os.path.join(self.path, "memory.swap.max")):
                    self._write("memory.swap.max", "0")
        except Exception:
            self.remove()
            raise

    def _write(self, f, v):
        with open(os.path.join(self.path, f), "w") as fh:
            fh.write(v)

    def _read(self, f):
        with open(os.path.join(self.path, f)) as fh:
            return fh.read()

    def procs_file(self):
        return os.path.join(self.path, "cgroup.procs")

    def rel_path(self):
        """The cgroup's path as /proc/PID/cgroup shows it ('/name')."""
        return "/" + os.path.basename(self.path)

    def pids(self):
        """Pids in the cgroup now (v1: tasks, i.e. every thread; v2: cgroup.procs)."""
        f = "tasks" if self.version == "v1" else "cgroup.procs"
        try:
            return {int(x) for x in self._read(f).split()}
        except (OSError, ValueError):
            return set()

    def usage(self):
        """Bytes charged to the cgroup now (kernel)."""
        f = "memory.usage_in_bytes" if self.version == "v1" else "memory.current"
        return int(self._read(f).strip())

    def peak(self):
        f = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        try:
            return int(self._read(f).strip())
        except (OSError, ValueError):
            return None

    def oom_kills(self):
        """OOM kills in this cgroup so far (kernel counter)."""
        try:
            if self.version == "v1":
                return parse_kv(self._read("memory.oom_control")).get("oom_kill", 0)
            return parse_kv(self._read("memory.events")).get("oom_kill", 0)
        except OSError:
            return 0

    def stat(self):
        try:
            return parse_kv(self._read("memory.stat"))
        except OSError:
            return {}

    def remove(self):
        remove_dir(self.path, self.version)


def remove_dir(path, version):
    """rmdir a cgroup, first moving any process left in it to the parent (bounded)."""
    parent = os.path.dirname(path)
    for _ in range(50):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [p for p in f.read().split() if p]
        except OSError:
            pids = []
        for p in pids:
            try:
                with open(os.path.join(parent, "cgroup.procs"), "w") as f:
                    f.write(p)
            except OSError:
                pass
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.1)
    return False
