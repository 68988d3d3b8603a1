"""Results a person can look at: CSV, Markdown summary, gnuplot script. Pure."""
import csv
import io

MIB = 1 << 20


def usage_csv(samples, guest_names):
    """samples: [{"t": s, "cgroup": bytes, "alive": n, "rss": {name: bytes}}] -> CSV text.
    Columns: t_s, host_mib (cgroup usage), guests_alive, then one <name>_mib per guest;
    with UML guests (samples carry the cgroup's shmem counter) a last column
    cgroup_shmem_mib."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    shmem = any("shmem" in s for s in samples)
    w.writerow(["t_s", "host_mib", "guests_alive"] + ["%s_mib" % n for n in guest_names]
               + (["cgroup_shmem_mib"] if shmem else []))
    for s in samples:
        row = ["%.2f" % s["t"], "%.1f" % (s["cgroup"] / MIB), s.get("alive", 0)]
        for n in guest_names:
            v = s.get("rss", {}).get(n)
            row.append("" if v is None else "%.1f" % (v / MIB))
        if shmem:
            row.append("" if s.get("shmem") is None else "%.1f" % (s["shmem"] / MIB))
        w.writerow(row)
    return out.getvalue()


def _fmt_mib(v):
    return "-" if v is None else "%d" % round(v / MIB)


def _fmt_s(v):
    return "-" if v is None else "%.2f" % v


def summary_markdown(results, title="Capacity"):
    """results: list of per-mode dicts (see runner.run_capacity) -> Markdown table."""
    lines = [
        "| mode | guests tried | guests fit | first failure | peak host MiB | steady host MiB "
        "| reclaim latency s (median) | discard ms/request (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append("| %s | %d | **%d** | %s | %s | %s | %s | %s |" % (
            r["mode"], r["tried"], r["fit"], r.get("first_failure") or "none",
            _fmt_mib(r.get("peak")), _fmt_mib(r.get("steady")),
            _fmt_s(r.get("reclaim_latency_s")),
            "-" if r.get("discard_ms") is None else "%.2f" % r["discard_ms"]))
    return "\n".join(lines) + "\n"


def compare_markdown(rows):
    """rows: per-method dicts from runner.run_compare -> Markdown table."""
    lines = [
        "| method | host usage after free, no pressure MiB | time until host usage dropped s "
        "| reuse: alloc+write ms | reuse: minor faults | pressure: second guest fits "
        "| first guest resident after pressure MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            r["method"], _fmt_mib(r.get("usage_after_free")),
            _fmt_s(r.get("reclaim_s")) if r.get("reclaim_s") is not None else "never (no pressure)",
            "-" if r.get("reuse_ms") is None else "%.1f" % r["reuse_ms"],
            "-" if r.get("reuse_minflt") is None else "%d" % r["reuse_minflt"],
            {True: "yes", False: "no", None: "-"}[r.get("pressure_fits")],
            _fmt_mib(r.get("resident_after_pressure"))))
    return "\n".join(lines) + "\n"


def gnuplot_script(csv_by_mode, png, limit_bytes, title):
    """csv_by_mode: [(mode, csv_path)]. Host memory (cgroup usage) over time, one line per mode."""
    plots = ['"%s" every ::1 using 1:2 with lines lw 2 title "%s"' % (p, m) for m, p in csv_by_mode]
    plots.append("%f with lines dt 2 lc rgb 'black' title 'cgroup limit'" % (limit_bytes / MIB))
    return "\n".join([
        "set terminal png size 900,500 noenhanced",
        'set output "%s"' % png,
        'set title "%s"' % title,
        "set datafile separator ','",
        "set key below",
        "set xlabel 'time (s)'",
        "set ylabel 'host memory charged to the guests (MiB, cgroup usage)'",
        "set grid",
        "set yrange [0:%f]" % (limit_bytes / MIB * 1.1),
        "plot " + ", \\\n     ".join(plots),
        "",
    ])


def accounting_markdown(results):
    """Per mode, does the cgroup's charge track the guests (runner.accounting_check)?"""
    lines = [
        "| mode | samples | max guests' RAM MiB (sum of RAM files) | max abs(cgroup shmem - guests' RAM) MiB "
        "| cgroup usage - guests' RAM MiB (min / median / max) | guest host processes outside the cgroup |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        a = r.get("accounting")
        if not a:
            continue
        lines.append("| %s | %d | %s | %s | %s / %s / %s | %s |" % (
            r["mode"], a["samples"], _fmt_mib(a["ram_sum_max"]),
            "-" if a.get("max_abs_shmem_minus_ram") is None else "%.1f" % (a["max_abs_shmem_minus_ram"] / MIB),
            _fmt_mib(a["other_min"]), _fmt_mib(a["other_median"]), _fmt_mib(a["other_max"]),
            "-" if a.get("guest_pids") is None else "%d of %d" % (a.get("pids_outside", 0), a["guest_pids"])))
    return "\n".join(lines) + "\n"
