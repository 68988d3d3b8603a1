"""Unit tests of fph-capacity's own logic: fit detection, reclaim latency,
CSV/summary/gnuplot generation, cgroup file parsing, trace generation, and
the UML (real Linux) guests: console markers, OOM victims, RAM measurement.
Run: python3 -m unittest discover -s experiments/tests -t experiments"""
import csv
import io
import os
import signal
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fphcap import cgroup, fit, linux, report, runner  # noqa: E402

MIB = 1 << 20
OK_EVENTS = [{"event": "ready"}, {"event": "workload_done", "alloc_shortfall_bytes": 0},
             {"event": "summary", "exit_code": 0}]


class Classify(unittest.TestCase):
    def test_stopped_by_us_after_workload_fits(self):
        self.assertEqual(fit.classify({"returncode": 0, "stopped_by_us": True, "events": OK_EVENTS}),
                         (True, "fits"))

    def test_sigterm_return_by_us_fits(self):
        g = {"returncode": -signal.SIGTERM, "stopped_by_us": True, "events": OK_EVENTS}
        self.assertTrue(fit.classify(g)[0])

    def test_sigkill_with_oom_event_is_oom_killed(self):
        g = {"returncode": -signal.SIGKILL, "oom_killed": True, "events": OK_EVENTS[:1]}
        self.assertEqual(fit.classify(g), (False, "oom-killed"))

    def test_sigkill_without_oom_event_is_not_called_oom(self):
        g = {"returncode": -signal.SIGKILL, "oom_killed": False, "events": OK_EVENTS}
        self.assertEqual(fit.classify(g), (False, "killed by SIGKILL"))

    def test_allocation_shortfall_does_not_fit(self):
        ev = [{"event": "ready"}, {"event": "workload_done", "alloc_shortfall_bytes": 3 * MIB}]
        self.assertEqual(fit.classify({"returncode": 0, "stopped_by_us": True, "events": ev}),
                         (False, "allocation failed (3 MiB short)"))

    def test_corruption_does_not_fit(self):
        ev = OK_EVENTS[:2] + [{"event": "summary", "exit_code": 3}]
        self.assertEqual(fit.classify({"returncode": 3, "stopped_by_us": True, "events": ev}),
                         (False, "integrity check failed"))

    def test_setup_failure_and_unfinished_workload(self):
        self.assertFalse(fit.classify({"returncode": 1, "events": []})[0])
        g = {"returncode": 0, "stopped_by_us": True, "events": [{"event": "ready"}]}
        self.assertEqual(fit.classify(g), (False, "workload did not finish"))

    def test_count_fit_stops_at_first_failure_whoever_was_killed(self):
        # guest4's launch made the OOM killer kill guest2: 3 fit.
        gs = [{"settled_at": 10, "failed_at": None}, {"settled_at": 20, "failed_at": 41},
              {"settled_at": 30, "failed_at": None}, {"settled_at": None, "failed_at": None}]
        self.assertEqual(fit.count_fit(gs), 3)
        self.assertEqual(fit.first_failure_time(gs), 41)
        self.assertEqual(fit.count_fit([{"settled_at": 1}, {"settled_at": 2}]), 2)
        self.assertEqual(fit.count_fit([]), 0)


class OomAccounting(unittest.TestCase):
    class Group:
        def __init__(self, n):
            self.n = n

        def oom_kills(self):
            return self.n

    def test_sigkills_are_oom_kills_only_if_the_cgroup_counted_them(self):
        # The kernel counts the OOM kill before the victim is reaped, so the
        # counter may already be up when the runner sees the death.
        self.assertTrue(runner.oom_killed(self.Group(1), 0, 1))
        self.assertFalse(runner.oom_killed(self.Group(1), 0, 2))  # 2nd SIGKILL was not the OOM killer
        self.assertFalse(runner.oom_killed(self.Group(3), 3, 1))  # kills before this run do not count


class Latency(unittest.TestCase):
    def test_first_time_resident_dropped_by_90_percent_of_freed(self):
        s = [(0, 500 * MIB), (1, 500 * MIB), (2, 500 * MIB), (3, 300 * MIB), (4, 60 * MIB), (5, 60 * MIB)]
        self.assertEqual(fit.reclaim_latency(s, 1.0, 440 * MIB), 3.0)

    def test_never_dropped_is_none(self):
        s = [(0, 500 * MIB), (1, 500 * MIB), (9, 499 * MIB)]
        self.assertIsNone(fit.reclaim_latency(s, 1.0, 440 * MIB))
        self.assertIsNone(fit.reclaim_latency(s, 1.0, 0))
        self.assertIsNone(fit.reclaim_latency([], 1.0, MIB))


class Reports(unittest.TestCase):
    def test_usage_csv(self):
        samples = [{"t": 0.0, "cgroup": 100 * MIB, "alive": 1, "rss": {"g1": 50 * MIB}},
                   {"t": 0.2, "cgroup": 200 * MIB, "alive": 2, "rss": {"g1": 60 * MIB, "g2": 1 * MIB}}]
        rows = list(csv.reader(io.StringIO(report.usage_csv(samples, ["g1", "g2"]))))
        self.assertEqual(rows[0], ["t_s", "host_mib", "guests_alive", "g1_mib", "g2_mib"])
        self.assertEqual(rows[1], ["0.00", "100.0", "1", "50.0", ""])
        self.assertEqual(rows[2], ["0.20", "200.0", "2", "60.0", "1.0"])
        # UML guests: the cgroup's shmem counter as a last column.
        samples[0]["shmem"] = 40 * MIB
        rows = list(csv.reader(io.StringIO(report.usage_csv(samples, ["g1", "g2"]))))
        self.assertEqual(rows[0][-1], "cgroup_shmem_mib")
        self.assertEqual(rows[1][-1], "40.0")
        self.assertEqual(rows[2][-1], "")

    def test_summary_markdown(self):
        md = report.summary_markdown([
            {"mode": "none", "tried": 4, "fit": 3, "first_failure": "guest4 oom-killed",
             "peak": 6144 * MIB, "steady": 5800 * MIB, "reclaim_latency_s": None, "discard_ms": None},
            {"mode": "local-dontneed", "tried": 6, "fit": 6, "first_failure": None,
             "peak": 2100 * MIB, "steady": 700 * MIB, "reclaim_latency_s": 2.4, "discard_ms": 1.234}])
        lines = md.strip().splitlines()
        self.assertEqual(len(lines), 4)
        self.assertIn("| none | 4 | **3** | guest4 oom-killed | 6144 | 5800 | - | - |", md)
        self.assertIn("| local-dontneed | 6 | **6** | none | 2100 | 700 | 2.40 | 1.23 |", md)

    def test_compare_markdown(self):
        md = report.compare_markdown([
            {"method": "MADV_FREE", "usage_after_free": 600 * MIB, "reclaim_s": None,
             "reuse_ms": 12.5, "reuse_minflt": 3, "pressure_fits": True,
             "resident_after_pressure": 40 * MIB}])
        self.assertIn("| MADV_FREE | 600 | never (no pressure) | 12.5 | 3 | yes | 40 |", md)

    def test_gnuplot_script(self):
        s = report.gnuplot_script([("none", "/o/usage-none.csv"), ("daemon", "/o/usage-daemon.csv")],
                                  "/o/p.png", 6 << 30, "t")
        self.assertIn('set output "/o/p.png"', s)
        self.assertIn('"/o/usage-none.csv" every ::1 using 1:2 with lines lw 2 title "none"', s)
        self.assertIn("6144.000000 with lines", s)


class CgroupFiles(unittest.TestCase):
    def test_parse_kv_v1_oom_control_and_v2_events(self):
        self.assertEqual(cgroup.parse_kv("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")["oom_kill"], 2)
        self.assertEqual(cgroup.parse_kv("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n")["oom_kill"], 1)

    def test_detect_v2_and_v1_layouts(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "cgroup.controllers"), "w") as f:
                f.write("cpu io memory pids\n")
            self.assertEqual(cgroup.detect(d), ("v2", d))
        with tempfile.TemporaryDirectory() as d:
            os.mkdir(os.path.join(d, "memory"))
            open(os.path.join(d, "memory", "memory.limit_in_bytes"), "w").close()
            self.assertEqual(cgroup.detect(d), ("v1", os.path.join(d, "memory")))
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(RuntimeError):
                cgroup.detect(d)


class Modes(unittest.TestCase):
    def test_mode_args(self):
        self.assertEqual(runner.mode_args("none"), ["--local-reclaim", "dontneed", "--no-reporting"])
        self.assertEqual(runner.mode_args("daemon", "/s"), ["--connect", "/s"])
        self.assertEqual(runner.mode_args("local-free"), ["--local-reclaim", "free"])
        with self.assertRaises(ValueError):
            runner.mode_args("daemon")
        with self.assertRaises(ValueError):
            runner.mode_args("bogus")

    def test_parse_size_and_trace_text(self):
        self.assertEqual(runner.parse_size("2G"), 2 << 30)
        self.assertEqual(runner.parse_size("640M"), 640 << 20)
        self.assertEqual(runner.trace_text([(0, "alloc", "8M", "a")]), "time_ms,op,size,tag\n0,alloc,8M,a\n")

    def test_stable(self):
        self.assertTrue(runner._stable([(0, 10), (3, 12), (6, 11)], 5, 4))
        self.assertFalse(runner._stable([(0, 10), (3, 12)], 5, 4))
        self.assertFalse(runner._stable([(0, 10), (3, 100), (6, 11)], 5, 4))


class LinuxGuests(unittest.TestCase):
    """fph-capacity run --guest-kind linux: UML console markers -> runner events."""

    def events(self, lines):
        out = []
        for l in lines:
            m = linux.parse_marker(l)
            if m:
                out += linux.runner_events(m)
        return out

    def test_parse_marker(self):
        m = linux.parse_marker("FPH freed bytes=176160768 mem_free_kib=437528\r\n")
        self.assertEqual(m, {"event": "freed", "bytes": "176160768", "mem_free_kib": "437528"})
        m = linux.parse_marker("FPH dmesg_problem text=WARNING: at foo.c:1 a=b c")
        self.assertEqual(m, {"event": "dmesg_problem", "text": "WARNING: at foo.c:1 a=b c"})
        # Kernel output may share the line before the marker.
        self.assertEqual(linux.parse_marker("[ 1.2] x FPH halt")["event"], "halt")
        self.assertIsNone(linux.parse_marker("Linux version 6.1"))
        self.assertIsNone(linux.parse_marker("FPH "))

    def test_a_clean_guest_fits(self):
        ev = self.events([
            "FPH init kernel=6.1 balloon=1", "FPH start total_bytes=1 keep_bytes=1",
            "FPH allocated bytes=1", "FPH waiting phase=allocated", "FPH freed bytes=4096",
            "FPH waiting phase=freed", "FPH verify phase=freed corrupted_pages=0 checked_pages=8",
            "FPH waiting phase=reallocated",
            "FPH verify phase=final corrupted_pages=0 checked_pages=9", "FPH done status=ok",
            "FPH workload exit=0", "FPH halt"])
        self.assertEqual([e["event"] for e in ev],
                         ["ready", "workload_freed", "workload_done", "summary"])
        self.assertEqual(ev[1]["bytes"], 4096)
        g = {"returncode": 0, "stopped_by_us": True, "events": ev}
        self.assertEqual(fit.classify(g), (True, "fits"))

    def test_corruption_and_workload_errors_do_not_fit(self):
        ev = self.events(["FPH start", "FPH waiting phase=reallocated",
                          "FPH verify phase=final corrupted_pages=3 checked_pages=9",
                          "FPH workload exit=1"])
        self.assertEqual(fit.classify({"returncode": 0, "stopped_by_us": True, "events": ev}),
                         (False, "integrity check failed"))
        ev = self.events(["FPH start", "FPH error what=mmap errno=12 text=Cannot allocate memory"])
        self.assertFalse(fit.classify({"returncode": 0, "stopped_by_us": True, "events": ev})[0])
        # The guest's own OOM killer took the workload before its burst was done.
        ev = self.events(["FPH start", "FPH workload exit=137"])
        self.assertEqual(fit.classify({"returncode": 0, "stopped_by_us": True, "events": ev}),
                         (False, "workload did not finish"))

    def test_failure_seen_by_the_runner_takes_precedence(self):
        ev = self.events(["FPH start", "FPH waiting phase=reallocated"])
        g = {"returncode": 0, "stopped_by_us": False, "events": ev, "failure": "oom-killed"}
        self.assertEqual(fit.classify(g), (False, "oom-killed"))

    def test_oom_victims_from_the_kernel_log(self):
        log = ("[ 10.0] oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,"
               "mems_allowed=0,oom_memcg=/fph-capacity-1,task_memcg=/fph-capacity-1,"
               "task=linux.uml,pid=4242,uid=0\n"
               "[ 10.0] Memory cgroup out of memory: Killed process 4242 (linux.uml) "
               "total-vm:1kB, anon-rss:0kB\n"
               "[ 20.0] Out of memory: Killed process 77 (x) total-vm:1kB\n")
        self.assertEqual(runner.oom_victims(log), [4242, 77])
        self.assertEqual(runner.oom_victims("nothing here"), [])

    def test_attribute_oom_to_the_guest_owning_the_pid(self):
        gs = [{"name": "g1", "pids": {10, 11}}, {"name": "g2", "pids": {20, 21, 22}}, {"name": "g3"}]
        self.assertEqual([g["name"] for g in runner.attribute_oom(gs, [21])], ["g2"])
        self.assertEqual(runner.attribute_oom(gs, [99]), [])

    def test_workload_spec_and_boot_argv(self):
        self.assertEqual(linux.parse_workload("linux:400:160:16M"), (400, 160, 16))
        for bad in ("alloc-free:1G:0", "linux:100:200:0", "linux:0:0:0", "linux:1:x:0", "linux:1:1"):
            with self.assertRaises(ValueError):
                linux.parse_workload(bad)
        w = linux.workload_args(400, 160, 16, 2)
        self.assertEqual(w, ["--total=400", "--keep=160", "--realloc=16", "--seed=2", "--wait-stdin"])
        a = linux.boot_argv("/s.sh", "/f.sock", "/root", "512M", "/dev/shm/x", False, w)
        self.assertEqual(a[:11], ["/bin/bash", "/s.sh", "boot", "--socket", "/f.sock", "--rootdir",
                                  "/root", "--mem", "512M", "--tmpdir", "/dev/shm/x"])
        self.assertIn("--no-balloon", a)
        self.assertEqual(a[a.index("--") + 1:], w)
        self.assertNotIn("--no-balloon", linux.boot_argv("/s", "/f", "/r", "1G", "/t", True, w))

    def test_ram_backing_is_blocks_of_deleted_files_under_tmpdir(self):
        # A fake /proc: fd links to a deleted RAM file under tmpdir (counted
        # once even if open twice), a file elsewhere (not counted).
        with tempfile.TemporaryDirectory() as d:
            tmpdir = os.path.join(d, "shm")
            os.mkdir(tmpdir)
            ram = os.path.join(tmpdir, "vm_file-1")
            with open(ram, "wb") as f:
                f.write(b"x" * (64 << 10))
            other = os.path.join(d, "other")
            with open(other, "wb") as f:
                f.write(b"y" * 4096)
            fd = os.path.join(d, "proc", "7", "fd")
            os.makedirs(fd)
            # readlink gives '<path> (deleted)' for an unlinked file; emulate
            # with a target literally named so, a hard link to the real data.
            deleted = ram + " (deleted)"
            os.link(ram, deleted)
            os.symlink(deleted, os.path.join(fd, "3"))
            os.symlink(deleted, os.path.join(fd, "4"))
            os.symlink(other, os.path.join(fd, "5"))
            got = linux.deleted_files_bytes(7, tmpdir, proc=os.path.join(d, "proc"))
            self.assertEqual(got, os.stat(ram).st_blocks * 512)
            self.assertGreaterEqual(got, 64 << 10)
            self.assertIsNone(linux.deleted_files_bytes(8, tmpdir, proc=os.path.join(d, "proc")))
            self.assertIsNone(linux.deleted_files_bytes(7, os.path.join(d, "none"),
                                                        proc=os.path.join(d, "proc")))

    def test_pids_by_group_from_proc_stat(self):
        with tempfile.TemporaryDirectory() as d:
            for pid, comm, st, pgrp in ((10, "linux.uml", "S", 10), (11, "linux (x) uml", "R", 10),
                                        (12, "sh", "S", 3), (13, "linux.uml", "Z", 10)):
                os.mkdir(os.path.join(d, str(pid)))
                with open(os.path.join(d, str(pid), "stat"), "w") as f:
                    f.write("%d (%s) %s 1 %d %d 0 -1\n" % (pid, comm, st, pgrp, pgrp))
            os.mkdir(os.path.join(d, "self"))
            got = linux.pids_by_group([10, 3], proc=d)
            self.assertEqual({k: sorted(v) for k, v in got.items()}, {10: [10, 11], 3: [12]})
            self.assertEqual(sorted(linux.pids_in_group(10, proc=d)), [10, 11])
            self.assertEqual(linux.pids_in_group(99, proc=d), [])

    def test_processes_outside_the_cgroup(self):
        v1 = "12:pids:/x\n4:memory:/fph-capacity-1\n1:name=systemd:/\n"
        self.assertEqual(linux.memory_cgroup_of(v1), "/fph-capacity-1")
        self.assertEqual(linux.memory_cgroup_of("0::/fph-capacity-2\n"), "/fph-capacity-2")
        self.assertIsNone(linux.memory_cgroup_of(""))
        with tempfile.TemporaryDirectory() as d:
            for pid, cg, st in ((1, "/fph-capacity-1", "S"), (2, "/", "S"), (3, "/", "Z")):
                os.mkdir(os.path.join(d, str(pid)))
                with open(os.path.join(d, str(pid), "cgroup"), "w") as f:
                    f.write("4:memory:%s\n" % cg)
                with open(os.path.join(d, str(pid), "stat"), "w") as f:
                    f.write("%d (linux.uml) %s 1 1 1\n" % (pid, st))
            # 4 exited meanwhile, 3 is a zombie: neither counts.
            self.assertEqual(linux.outside_cgroup([1, 2, 3, 4], "/fph-capacity-1", proc=d), [2])

    def test_accounting_check_and_markdown(self):
        samples = [{"cgroup": 110 * MIB, "shmem": 100 * MIB, "rss": {"g1": 100 * MIB}},
                   {"cgroup": 330 * MIB, "shmem": 301 * MIB, "rss": {"g1": 100 * MIB, "g2": 200 * MIB}},
                   {"cgroup": 5 * MIB, "shmem": 0, "rss": {}}]
        a = runner.accounting_check(samples)
        self.assertEqual(a["samples"], 2)
        self.assertEqual(a["max_abs_shmem_minus_ram"], 1 * MIB)
        self.assertEqual((a["other_min"], a["other_max"]), (10 * MIB, 30 * MIB))
        self.assertEqual(a["ram_sum_max"], 300 * MIB)
        self.assertIsNone(runner.accounting_check([]))
        # Only before the first failure when asked (OOM kills distort the rest).
        timed = [dict(x, t=i) for i, x in enumerate(samples)]
        timed[1]["cgroup"] = 900 * MIB
        self.assertEqual(runner.accounting_check(timed, until=1)["samples"], 1)
        self.assertEqual(runner.accounting_check(timed, until=1)["other_max"], 10 * MIB)
        # A sample where a launched guest could not be measured is left out.
        timed[1]["launched"] = 3
        self.assertEqual(runner.accounting_check(timed)["samples"], 1)
        md = report.accounting_markdown([{"mode": "none", "accounting": a}, {"mode": "x"}])
        self.assertIn("| none | 2 | 300 | 1.0 | 10 / 20 / 30 | - |", md)
        a.update(guest_pids=12, pids_outside=0)
        self.assertIn("| 10 / 20 / 30 | 0 of 12 |", report.accounting_markdown([{"mode": "d", "accounting": a}]))
        self.assertEqual(len(md.strip().splitlines()), 3)


class Traces(unittest.TestCase):
    def test_shipped_traces_are_what_the_script_generates(self):
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, os.path.join(here, "make_traces.py"), "--out", d],
                           check=True, stdout=subprocess.DEVNULL)
            for name in sorted(os.listdir(d)):
                with open(os.path.join(d, name)) as a, open(os.path.join(here, "traces", name)) as b:
                    self.assertEqual(a.read(), b.read(), name + " is stale: run make_traces.py")


if __name__ == "__main__":
    unittest.main()
