#!/usr/bin/env python3
"""Generates fphd.json, the Grafana dashboard for fphd (schemaVersion 39).

Run `python3 dashboards/gen_dashboard.py` after editing; the generated JSON
is committed so Grafana users can import it directly. Every query is checked
by tests/monitoring (structure, metric names, and evaluation on a real
Prometheus scraping a real fphd).
"""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
VM = SEL + ',vm=~"$vm"'
NODE = SEL + ',node=~"$node"'
RI = "$__rate_interval"

panels = []
_next_id = [1]
_y = [0]
_col = [0]  # 0: next panel goes left, 12: right


def panel(title, targets, kind="timeseries", unit="short", w=12, h=8, desc="", extra=None):
    pid = _next_id[0]
    _next_id[0] += 1
    if w == 24 and _col[0] == 12:
        _y[0] += h
        _col[0] = 0
    x = _col[0]
    p = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": _y[0]},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": e, "legendFormat": l, "range": True}
            for i, (e, l) in enumerate(targets)
        ],
    }
    if extra:
        p.update(extra)
    if w == 24 or x == 12:
        _y[0] += h
        _col[0] = 0
    else:
        _col[0] = 12
    panels.append(p)


def row(title):
    if _col[0] == 12:  # close a half-filled line
        _y[0] += 8
        _col[0] = 0
    pid = _next_id[0]
    _next_id[0] += 1
    panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y[0]}, "panels": []})
    _y[0] += 1


row("Reclaim")
panel("Reclaim rate per node (verified)", [
    (f"sum by (node) (rate(fphd_node_reclaimed_bytes_total{{{NODE}}}[{RI}]))", "reclaimed node {{node}}"),
    (f"sum by (node) (rate(fphd_node_discarded_bytes_total{{{NODE}}}[{RI}]))", "discarded node {{node}}"),
], unit="Bps", desc="Bytes/s the kernel stopped holding (st_blocks measured) and bytes/s discard syscalls accepted, per host NUMA node.")
panel("Reclaim rate per VM (verified)", [
    (f"sum by (vm) (rate(fphd_reclaimed_bytes_total{{{VM}}}[{RI}]))", "{{vm}}"),
], unit="Bps", desc="Bytes/s measured as freed from each VM's memory.")
panel("Reported, discarded and verified reclaimed", [
    (f"sum(rate(fphd_reported_bytes_total{{{VM}}}[{RI}]))", "reported"),
    (f"sum(rate(fphd_discarded_bytes_total{{{VM}}}[{RI}]))", "discarded (syscall accepted)"),
    (f"sum(rate(fphd_reclaimed_bytes_total{{{VM}}}[{RI}]))", "reclaimed (kernel measured)"),
], unit="Bps", desc="Discarded minus reclaimed is memory the syscalls covered but the kernel was not holding (see 'discards that freed nothing').")
panel("Discards that freed nothing", [
    (f"sum by (vm) (rate(fphd_discards_freed_nothing_total{{{VM}}}[{RI}]))", "{{vm}}"),
], unit="ops", desc="Discard syscall groups accepted by the kernel that did not lower the backing's allocated blocks.")
panel("Skipped bytes by reason", [
    (f"sum by (reason) (rate(fphd_skipped_bytes_total{{{VM}}}[{RI}]))", "{{reason}}"),
], unit="Bps", desc="Reported bytes deliberately left alone: poisoned, paused, stopped, invalid, misaligned, failed, unsupported, cancelled, "
   "migrating, small (below the VM's min_block), backoff (the VM refaults what was discarded).")
panel("Refaulted bytes", [
    (f"sum by (vm) (rate(fphd_refaulted_bytes_total{{{VM}}}[{RI}]))", "{{vm}}"),
], unit="Bps", desc="Discarded bytes found resident again within the refault window (mincore sampling): the cost of reclaim to the guest.")

panel("Refault backoff per VM", [
    (f"max by (vm) (fphd_vm_backoff{{{VM}}})", "{{vm}} held"),
    (f"max by (vm) (fphd_vm_refault_share{{{VM}}})", "{{vm}} refault share"),
    (f"sum by (vm) (increase(fphd_vm_backoff_holds_total{{{VM}}}[{RI}]))", "{{vm}} holds started"),
], desc="1 while fphd holds off discarding for a VM that refaults most of what was discarded within the window "
   "(docs/metrics.md#refault-backoff); the refaulted share of the window; holds started. A held VM keeps what it reports.")

row("VMs")
panel("Guest memory vs resident", [
    (f"sum by (vm) (fphd_guest_memory_bytes{{{VM}}})", "{{vm}} size"),
    (f"sum by (vm) (fphd_guest_resident_bytes{{{VM}}})", "{{vm}} resident"),
], unit="bytes", desc="Guest RAM size and the bytes the kernel holds for it (allocated blocks of its memory files).")
panel("Reclaim state per VM", [
    (f"max by (vm, state) (fphd_vm_reclaim_state{{{VM}}})", "{{vm}} {{state}}"),
    (f"max by (vm, reason) (fphd_vm_reclaim_disabled{{{VM}}})", "{{vm}} disabled: {{reason}}"),
], kind="state-timeline", desc="1 marks the VM's current state (active, paused, migrating, disabled) and, when disabled, the reason.",
    extra={"options": {"showValue": "never", "mergeValues": True}})
panel("In-flight requests", [
    (f"sum by (vm) (fphd_inflight_requests{{{VM}}})", "{{vm}}"),
], desc="Reporting requests taken from the ring and not yet returned.")
panel("Requests by outcome", [
    (f"sum by (outcome) (rate(fphd_requests_total{{{VM}}}[{RI}]))", "{{outcome}}"),
], unit="reqps")
panel("Negotiated features", [
    (f"max by (vm) (fphd_vm_features{{{VM}}})", "{{vm}}"),
], kind="table", desc="Feature bits each VM's front end acked: bit 1 STATS_VQ, bit 4 PAGE_POISON, bit 5 FREE_PAGE_REPORTING, bit 32 VERSION_1 (as a number).")
panel("Guest free memory and headroom (stats queue)", [
    (f"sum by (vm) (fphd_guest_free_bytes{{{VM}}})", "{{vm}} free (guest says)"),
    (f"sum by (vm) (fphd_guest_available_bytes{{{VM}}})", "{{vm}} available (guest says)"),
    (f"sum by (vm) (fphd_guest_unreported_free_bytes{{{VM}}})", "{{vm}} free but still backed (headroom)"),
], unit="bytes", desc="What each guest reports on the virtio-balloon stats queue, and the headroom: memory the guest calls free whose "
   "host backing is still held, max(0, free - (guest memory - resident)). Alert FphdGuestFreeMemoryNotReturned watches it.")
panel("Guest major faults and swap (stats queue)", [
    (f"sum by (vm) (rate(fphd_guest_major_faults{{{VM}}}[{RI}]))", "{{vm}} major faults/s"),
    (f"sum by (vm) (rate(fphd_guest_swap_in_bytes{{{VM}}}[{RI}]))", "{{vm}} swap in B/s"),
], desc="Guest-side paging as the guest reports it: a guest short of memory (balloon too tight, or too much given back) pages and swaps. "
   "Guest counters are relayed as gauges; rate() treats a guest reboot as a reset.")
panel("Protocol errors", [
    (f"sum by (vm, reason) (increase(fphd_protocol_errors_total{{{SEL}}}[{RI}]))", "{{vm}} {{reason}}"),
], desc="Malformed or refused messages and chains (docs/protocol.md#bad-input).")

row("Latency")
panel("Request latency quantiles", [
    (f"histogram_quantile(0.5, sum by (node, le) (rate(fphd_request_duration_seconds_bucket{{{NODE}}}[{RI}])))", "p50 node {{node}}"),
    (f"histogram_quantile(0.9, sum by (node, le) (rate(fphd_request_duration_seconds_bucket{{{NODE}}}[{RI}])))", "p90 node {{node}}"),
    (f"histogram_quantile(0.99, sum by (node, le) (rate(fphd_request_duration_seconds_bucket{{{NODE}}}[{RI}])))", "p99 node {{node}}"),
], unit="s", desc="From taking a reporting request off the ring to returning it.")
panel("Discard duration quantiles", [
    (f"histogram_quantile(0.5, sum by (node, le) (rate(fphd_discard_duration_seconds_bucket{{{NODE}}}[{RI}])))", "p50 node {{node}}"),
    (f"histogram_quantile(0.99, sum by (node, le) (rate(fphd_discard_duration_seconds_bucket{{{NODE}}}[{RI}])))", "p99 node {{node}}"),
    (f"sum by (node) (rate(fphd_discarded_bytes_total{{{SEL},node=~\"$node\"}}[{RI}])) / sum by (node) (rate(fphd_discard_syscalls_total{{{NODE}}}[{RI}]))", "bytes per syscall node {{node}}"),
], unit="s", desc="Time in discard syscalls per pipeline batch; bytes per syscall is the effective coalesced size.")

row("Migration")
panel("Migration state per VM", [
    (f"max by (vm, state) (fphd_vm_migration_state{{{VM}}})", "{{vm}} {{state}}"),
], kind="state-timeline", desc="none, logging (precopy: dirty log on), stopped (rings stopped while logging), saving/saved "
   "(device state sent), loaded (received on the destination; epoch bumped), failed (the last transfer failed: fphctl migration).",
    extra={"options": {"showValue": "never", "mergeValues": True}})
panel("Dirty-log pages and device-state transfers", [
    (f"sum by (vm) (rate(fphd_dirty_log_pages_total{{{VM}}}[{RI}]))", "{{vm}} pages marked/s"),
    (f"sum by (vm, direction, outcome) (increase(fphd_device_state_transfers_total{{{VM}}}[{RI}]))", "{{vm}} {{direction}} {{outcome}}"),
    (f"sum by (vm, direction) (increase(fphd_device_state_bytes_total{{{VM}}}[{RI}]))", "{{vm}} {{direction}} bytes"),
], desc="Pages fphd marked in the VMM's dirty log (used-ring writes and discarded ranges, which the VMM then sends again), "
   "and device-state transfers by outcome.")

row("Host")
panel("Node free memory", [
    (f"sum by (node) (fphd_node_memory_free_bytes{{{NODE}}})", "free node {{node}}"),
    (f"sum by (node) (fphd_node_memory_total_bytes{{{NODE}}})", "total node {{node}}"),
], unit="bytes")
panel("Node pressure", [
    (f"max by (node) (fphd_node_pressure{{{NODE}}})", "PSI some avg10 node {{node}}"),
    (f"max by (node) (fphd_node_under_pressure{{{NODE}}})", "policy: under pressure node {{node}}"),
], unit="percentunit")
panel("Sessions", [
    (f"sum(fphd_sessions{{{SEL}}})", "live"),
    (f"sum(rate(fphd_sessions_opened_total{{{SEL}}}[{RI}]))", "opened/s"),
], kind="stat")
panel("fphd up and version", [
    (f"up{{job=\"fphd\",{SEL}}}", "{{instance}} up"),
    (f"count by (version) (fphd_build_info{{{SEL}}})", "{{version}}"),
], kind="stat")


def var(name, label, query, multi=True):
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query, "query": {"query": query, "refId": f"{name}-var"},
        "refresh": 2, "includeAll": True, "multi": multi, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1,
    }


dashboard = {
    "uid": "fphd-overview",
    "title": "fphd: free page reclaim",
    "description": "Host-side memory reclaim for virtio free page reporting (fphd). See docs/metrics.md.",
    "tags": ["fph", "fphd", "memory"],
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "time": {"from": "now-1h", "to": "now"},
    "refresh": "30s",
    "timezone": "",
    "annotations": {"list": []},
    "links": [],
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "refresh": 1, "hide": 0},
        var("instance", "Instance", "label_values(fphd_build_info, instance)"),
        var("vm", "VM", 'label_values(fphd_guest_memory_bytes{instance=~"$instance"}, vm)'),
        var("node", "Node", 'label_values(fphd_node_memory_total_bytes{instance=~"$instance"}, node)'),
    ]},
    "panels": panels,
}

if __name__ == "__main__":
    import sys
    if "--stdout" in sys.argv:
        json.dump(dashboard, sys.stdout, indent=2)
        sys.exit(0)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fphd.json")
    with open(out, "w") as f:
        json.dump(dashboard, f, indent=2)
        f.write("\n")
    print(out)
