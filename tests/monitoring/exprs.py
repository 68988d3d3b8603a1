"""PromQL expressions of the fphd dashboard and rules, extracted from the files
themselves (never copied by hand), and made concrete for a plain Prometheus."""
import json
import re

import yaml  # python3-yaml

GRAFANA_VARS = {"datasource", "instance", "vm", "node", "__rate_interval", "__interval",
                "__range", "__all"}


def dashboard_panels(dash):
    for p in dash.get("panels", []):
        yield p
        for q in p.get("panels", []):  # collapsed rows
            yield q


def dashboard_exprs(path):
    """[(where, expr)] for every panel target and every query variable."""
    dash = json.load(open(path))
    out = []
    for p in dashboard_panels(dash):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"panel {p['id']} '{p['title']}' {t.get('refId')}", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query")
            out.append((f"variable ${v['name']}", q))
    return out


def rules_exprs(path):
    """[(where, expr, kind, name)] for every rule; kind is 'record' or 'alert'."""
    doc = yaml.safe_load(open(path))
    out = []
    for g in doc["groups"]:
        for r in g["rules"]:
            kind = "record" if "record" in r else "alert"
            out.append((f"{kind} {r[kind]}", r["expr"].strip(), kind, r[kind]))
    return out


def concrete(expr):
    """What Grafana would send with every variable on 'All'. label_values(m, l)
    becomes the selector m (what Grafana asks Prometheus for)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", expr, re.S)
    if m:
        expr = m.group(1)
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "5m")
    expr = re.sub(r'=~"\$\w+"', '=~".*"', expr)
    return expr


def variables_used(expr):
    return set(re.findall(r"\$\{?(\w+)\}?", expr))


# Metric names in an expression: identifiers followed by { or [ or space/paren
# that start with fphd_ (recording rules are fphd_xxx:..., names with ':').
def metric_names(expr):
    expr = re.sub(r'"[^"]*"', '""', expr)  # not inside label values
    return set(re.findall(r"\b(fphd[a-z0-9_]*(?::[a-z0-9_]+)*)\b", expr)) | \
        ({"up"} if re.search(r"\bup\{", expr) else set())
