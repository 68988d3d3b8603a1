#!/usr/bin/env python3
"""End to end: a real fphd serving fph-guest agents that free memory, a real
Prometheus (Debian's `prometheus` package; installed by scripts/install-deps.sh,
never by this test) scraping fphd every second with the fphd rules loaded, and
EVERY PromQL expression of the dashboard and of the rules evaluated through
Prometheus's HTTP API (/api/v1/query).

  * dashboard panel and variable queries, and recording rules: must return data;
  * alert expressions: must be valid and evaluate; the ones a healthy run keeps
    empty (HEALTHY_EMPTY) are additionally checked to be empty only because of
    their condition: every metric they name has series;
  * FphdProtocolErrors and FphdReportingButNothingReclaimed must return data:
    the test sends malformed messages and runs a guest with page poisoning
    (reports skipped, nothing reclaimed).

No wall-clock thresholds: waits are bounded only to turn a hang into a failure
(FPH_TEST_PATIENCE_S, default 300 s)."""
import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from exprs import concrete, dashboard_exprs, metric_names, rules_exprs

PATIENCE = float(os.environ.get("FPH_TEST_PATIENCE_S", "300"))
# Alerts that a healthy run (daemon up, every VM reclaimed, nothing paused,
# no pressure, fast requests) keeps empty.
# FphdGuestFreeMemoryNotReturned needs 10 minutes of held free memory; the
# run is shorter, so only its expression and inputs are checked.
HEALTHY_EMPTY = {"FphdDown", "FphdHighRequestLatency", "FphdNodePressureWhileReclaimPaused",
                 "FphdGuestFreeMemoryNotReturned"}
# Made to return data by the scenario: a malformed message, a poisoned guest.
# Alert -> the vm label values it must return.
MUST_FIRE = {"FphdProtocolErrors": None, "FphdReportingButNothingReclaimed": {"prom-poison"}}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_json(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, argv, log, stdout=subprocess.DEVNULL):
        p = subprocess.Popen(argv, stdout=stdout, stderr=open(log, "w"), start_new_session=True)
        self.procs.append((p, log))
        return p

    def stop_all(self):
        for p, _ in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in reversed(self.procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fphd", required=True)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--prometheus", default="/usr/bin/prometheus")
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--rules", required=True)
    a = ap.parse_args()
    if not os.access(a.prometheus, os.X_OK):
        print(f"FAIL: {a.prometheus} not found: install Debian's prometheus package "
              "(scripts/install-deps.sh)")
        return 1

    tmp = tempfile.mkdtemp(prefix="fph-prom-")
    procs = Procs()
    failures = []
    try:
        # fphd, metrics on a free port (it prints the URL in its ready line).
        sock = os.path.join(tmp, "fphd.sock")
        fphd = procs.start([a.fphd, "--listen", sock, "--metrics", "127.0.0.1:0"],
                           os.path.join(tmp, "fphd.stderr"), stdout=subprocess.PIPE)
        ready = json.loads(fphd.stdout.readline())
        metrics_url = ready["metrics"]
        target = urllib.parse.urlparse(metrics_url).netloc
        # Guests freeing memory: one allocates and frees repeatedly, one churns
        # (reallocates reported blocks: refaults).
        procs.start([a.guest, "--connect", sock, "--name", "prom-alloc", "--memory", "256M",
                     "--workload", "alloc-free:150M:300", "--repeat", "1000000",
                     "--reporting-delay-ms", "200"], os.path.join(tmp, "guest1.stderr"))
        procs.start([a.guest, "--connect", sock, "--name", "prom-churn", "--memory", "256M",
                     "--workload", "churn:128M:3600", "--reporting-delay-ms", "200"],
                    os.path.join(tmp, "guest2.stderr"))
        # A guest with page poisoning: its reports are skipped (reason poisoned),
        # its state is disabled (poison), and it is the VM the "reporting but
        # nothing reclaimed" alert is about. Churn, so that it keeps reporting
        # (an alloc-free loop reallocates its unreported blocks first and
        # reports only once).
        procs.start([a.guest, "--connect", sock, "--name", "prom-poison", "--memory", "128M",
                     "--poison", "aaaaaaaa", "--workload", "churn:64M:3600",
                     "--reporting-delay-ms", "200"], os.path.join(tmp, "guest3.stderr"))
        # Prometheus: own config, own storage, loopback port, our rules.
        port = free_port()
        rules_copy = os.path.join(tmp, "fphd-rules.yml")
        shutil.copy(a.rules, rules_copy)
        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules_copy}
scrape_configs:
  - job_name: fphd
    static_configs:
      - targets: ["{target}"]
""")
        procs.start([a.prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/tsdb",
                     f"--web.listen-address=127.0.0.1:{port}"], os.path.join(tmp, "prometheus.stderr"))
        api = f"http://127.0.0.1:{port}/api/v1"

        def query(expr):
            return http_json(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))

        def wait_for(what, pred):
            deadline = time.monotonic() + PATIENCE
            while time.monotonic() < deadline:
                try:
                    if pred():
                        return True
                except OSError:
                    pass
                time.sleep(1)
            failures.append(f"timed out waiting for {what}")
            return False

        def nonempty(expr):
            r = query(expr)
            return r["status"] == "success" and len(r["data"]["result"]) > 0

        ok = wait_for("prometheus ready", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/-/ready", timeout=5).status == 200)
        ok = ok and wait_for("fphd scraped", lambda: nonempty('up{job="fphd"} == 1'))
        # Protocol errors: an unknown request id (the session survives), once
        # Prometheus has seen the series, and again, so that increase() sees it.
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.connect(sock)
        bad.sendall(struct.pack("<III", 99, 1, 0))
        ok = ok and wait_for("a protocol error in Prometheus",
                             lambda: nonempty('fphd_protocol_errors_total{reason="unknown_request"}'))
        bad.sendall(struct.pack("<III", 99, 1, 0))
        ok = ok and wait_for("verified reclaim in Prometheus",
                             lambda: nonempty("sum(fphd_reclaimed_bytes_total) > 0"))
        ok = ok and wait_for("refaults in Prometheus", lambda: nonempty("sum(fphd_refaulted_bytes_total) > 0"))
        ok = ok and wait_for("rules evaluated", lambda: nonempty("fphd_node:reclaimed_bytes:rate1m"))
        if not ok:
            raise RuntimeError("setup")

        checked = 0
        # Dashboard queries and recording rules: data, eventually (rates need
        # two scrapes in their window; refault rates need a refault in it).
        exprs = [(w, concrete(e)) for w, e in dashboard_exprs(a.dashboard)]
        exprs += [(w, e) for w, e, kind, _ in rules_exprs(a.rules) if kind == "record"]
        for where, expr in exprs:
            if wait_for(f"{where} to return data: {expr}", lambda: nonempty(expr)):
                print(f"ok    {where}: {len(query(expr)['data']['result'])} series")
            checked += 1
        # Alerts.
        for where, expr, kind, name in rules_exprs(a.rules):
            if kind != "alert":
                continue
            checked += 1
            r = query(expr)
            if r["status"] != "success":
                failures.append(f"{where}: {r}")
                continue
            n = len(r["data"]["result"])
            if name in MUST_FIRE:
                want = MUST_FIRE[name]

                def fires(expr=expr, want=want):
                    vms = {r["metric"].get("vm") for r in query(expr)["data"]["result"]}
                    return vms == want if want is not None else len(vms) > 0
                if not wait_for(f"{where} to fire for vm {want}", fires):
                    continue
                got = sorted({r["metric"].get("vm") for r in query(expr)["data"]["result"]})
                print(f"ok    {where}: evaluates, fires for vm {got} (expected)")
            elif name in HEALTHY_EMPTY:
                for m in sorted(metric_names(expr)):
                    if not nonempty(m):
                        failures.append(f"{where}: input metric {m} has no series")
                print(f"ok    {where}: evaluates, {n} series (expected empty in a healthy run; inputs present)")
            else:
                failures.append(f"{where}: not classified as HEALTHY_EMPTY or MUST_FIRE")
        # Every rule loaded and evaluating without errors.
        for g in http_json(f"{api}/rules")["data"]["groups"]:
            for r in g["rules"]:
                if r.get("health") != "ok":
                    failures.append(f"rule {r['name']}: health {r.get('health')}: {r.get('lastError')}")
        print(f"{checked} expressions checked against Prometheus")
    except Exception as e:  # noqa: BLE001
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        try:
            bad.close()
        except NameError:
            pass
        procs.stop_all()
        if failures:
            for p, log in procs.procs:
                print(f"--- {log} (exit {p.returncode})")
                print(open(log).read()[-3000:])
        if not os.environ.get("FPH_KEEP_TEST_DIRS"):
            shutil.rmtree(tmp, ignore_errors=True)
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
