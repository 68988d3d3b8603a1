#!/usr/bin/env python3
"""Structural check of the fphd Grafana dashboard and Prometheus rules:
unique panel ids, schema and variables, every query naming only metrics fphd
exports (the list is generated from daemon/src/ops/metrics.cpp, the one place
families are registered) or recording rules defines, every exported metric
documented in docs/metrics.md, and the committed JSON matching its generator."""
import argparse
import json
import re
import subprocess
import sys

from exprs import (GRAFANA_VARS, dashboard_exprs, dashboard_panels, metric_names, rules_exprs,
                   variables_used)


def exported_metrics(metrics_cpp):
    src = open(metrics_cpp).read()
    families = re.findall(r'Build(Counter|Gauge|Histogram)\(\)\s*\.Name\("([a-z0-9_]+)"\)', src)
    names = set()
    for kind, name in families:
        names.add(name)
        if kind == "Histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
    return names, {n for _, n in families}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--rules", required=True)
    ap.add_argument("--metrics-cpp", required=True)
    ap.add_argument("--docs", required=True)
    ap.add_argument("--generator")
    a = ap.parse_args()
    errors = []
    dash = json.load(open(a.dashboard))

    # Panels: unique ids, a title, targets on every non-row panel, datasource variable.
    ids = [p["id"] for p in dashboard_panels(dash)]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        errors.append(f"duplicate panel ids: {sorted(dup)}")
    for p in dashboard_panels(dash):
        if p["type"] == "row":
            continue
        if not p.get("title"):
            errors.append(f"panel {p['id']} has no title")
        if not p.get("targets"):
            errors.append(f"panel {p['id']} '{p.get('title')}' has no queries")
        if p.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"panel {p['id']} does not use the $datasource variable")
        refs = [t.get("refId") for t in p.get("targets", [])]
        if len(refs) != len(set(refs)):
            errors.append(f"panel {p['id']} has duplicate refIds")
    if dash.get("schemaVersion", 0) < 39:
        errors.append(f"schemaVersion {dash.get('schemaVersion')} < 39")

    # Variables: the required ones exist, every one used is defined.
    defined = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    for need in ("datasource", "instance", "vm", "node"):
        if need not in defined:
            errors.append(f"template variable ${need} is not defined")
    ds = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    if ds and (ds[0].get("type") != "datasource" or ds[0].get("query") != "prometheus"):
        errors.append("$datasource must be a prometheus datasource variable")

    exported, families = exported_metrics(a.metrics_cpp)
    src = open(a.metrics_cpp).read()
    for f in sorted(families):
        if not re.search(r'\.Name\("' + f + r'"\)\s*\.Help\("[^"]{10,}', src):
            errors.append(f"metric {f} has no HELP text in {a.metrics_cpp}")
    rules = rules_exprs(a.rules)
    recorded = {name for _, _, kind, name in rules if kind == "record"}
    known = exported | recorded | {"up"}
    all_exprs = [(w, e) for w, e in dashboard_exprs(a.dashboard)] + [(w, e) for w, e, _, _ in rules]
    used = set()
    for where, expr in all_exprs:
        for v in variables_used(expr):
            if v not in defined and v not in GRAFANA_VARS:
                errors.append(f"{where}: uses undefined variable ${v}")
        names = metric_names(expr)
        if not names:
            errors.append(f"{where}: names no metric: {expr}")
        for n in names - known:
            errors.append(f"{where}: metric {n} is not exported by fphd nor recorded: {expr}")
        used |= names
    # Dashboard variables are in the dashboard only: their metrics too.
    docs = open(a.docs).read()
    for f in sorted(families):
        if f"`{f}`" not in docs:
            errors.append(f"metric {f} is not documented in {a.docs}")
    unused = sorted(f for f in families if not any(u == f or u.startswith(f + "_") for u in used))
    print(f"{len(ids)} panels, {len(all_exprs)} expressions, {len(families)} exported families")
    if unused:
        print("exported but in no panel or rule (documented only):", ", ".join(unused))

    if a.generator:
        gen = subprocess.run([sys.executable, a.generator, "--stdout"], capture_output=True, text=True)
        if gen.returncode != 0:
            errors.append(f"generator failed: {gen.stderr}")
        elif json.loads(gen.stdout) != dash:
            errors.append(f"{a.dashboard} differs from what {a.generator} generates: rerun it")

    for e in errors:
        print("ERROR:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
