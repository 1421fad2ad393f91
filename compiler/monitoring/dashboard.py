"""`probec dashboard SPEC`: a Grafana dashboard (JSON) for a spec's collector.

A row for the spec's metrics: each histogram as a heatmap of its buckets and p50/p95/p99 lines, a
`parts:` histogram's mean per part stacked, each counter as a rate; then a row for the
collector's own health (only the series this spec's collector has: no event panel without
events). Queries read the Prometheus data source chosen in the `datasource`
variable and select the scrape job `job`.
"""

from __future__ import annotations

import json

from ..ir.nodes import Metric, Program
from .promql import HEALTH, QUANTILES, by, counter_name, label_names, number, quantile_expr, selector

RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_UNITS = {"seconds": "s", "bytes": "bytes"}
WIDTH, HEIGHT = 12, 8          # half of Grafana's 24-column grid


class DashboardLayout:
    """Panels in reading order, two to a row of the grid, with ids counted from 1."""

    def __init__(self):
        self.panels: list[dict] = []
        self.y = 0
        self.column = 0

    def row(self, title: str) -> None:
        if self.column:
            self.y += HEIGHT
            self.column = 0
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def panel(self, kind: str, title: str, description: str, targets: list[dict], **extra) -> None:
        refs = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        self.panels.append({
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": DATASOURCE,
            "gridPos": {"h": HEIGHT, "w": WIDTH, "x": self.column * WIDTH, "y": self.y},
            "targets": [{"refId": refs[i], "datasource": DATASOURCE, **t} for i, t in enumerate(targets)],
            **extra})
        self.column = 1 - self.column
        if not self.column:
            self.y += HEIGHT


def target(expr: str, legend: str, **extra) -> dict:
    return {"expr": expr, "legendFormat": legend, **extra}


def timeseries(unit: str, stacked: bool = False) -> dict:
    custom = {"stacking": {"mode": "normal" if stacked else "none", "group": "A"},
              "fillOpacity": 30 if stacked else 0}
    return {"fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi", "sort": "none"}}}


def legend(labels: tuple[str, ...]) -> str:
    return " ".join(f"{{{{{name}}}}}" for name in labels)


def histogram_panels(layout: DashboardLayout, metric: Metric, job: str) -> None:
    unit = GRAFANA_UNITS.get(metric.unit, "short")
    labels = label_names(metric)
    bucket = selector(metric.name + "_bucket", job)
    layout.panel("heatmap", f"{metric.name}: distribution", metric.help,
                 [target(f"sum {by('le')} (increase({bucket}[{RATE}]))", "{{le}}", format="heatmap")],
                 options={"calculate": False, "yAxis": {"unit": unit},
                          "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges"}},
                 fieldConfig={"defaults": {}, "overrides": []})
    layout.panel("timeseries", f"{metric.name}: p50, p95, p99", metric.help,
                 [target(quantile_expr(q, metric, job, RATE, ()), f"p{number(q * 100)}") for q in QUANTILES],
                 **timeseries(unit))
    if labels:
        layout.panel("timeseries", f"{metric.name}: p99 by {', '.join(labels)}", metric.help,
                     [target(quantile_expr(0.99, metric, job, RATE, labels), legend(labels))], **timeseries(unit))
    if "part" in labels:
        sums = f"sum {by('part')} (rate({selector(metric.name + '_sum', job)}[{RATE}]))"
        counts = f"sum {by('part')} (rate({selector(metric.name + '_count', job)}[{RATE}]))"
        layout.panel("timeseries", f"{metric.name}: mean by part (stacked)",
                     f"{metric.help} The parts' means stacked: together, the mean of the whole.",
                     [target(f"{sums} / {counts}", "{{part}}")], **timeseries(unit, stacked=True))


def counter_panel(layout: DashboardLayout, metric: Metric, job: str) -> None:
    labels = label_names(metric)
    expr = f"sum {by(*labels)} (rate({selector(counter_name(metric), job)}[{RATE}]))" if labels else \
        f"sum (rate({selector(counter_name(metric), job)}[{RATE}]))"
    unit = {"seconds": "s", "bytes": "Bps"}.get(metric.unit, "ops")
    layout.panel("timeseries", f"{counter_name(metric)}: rate", metric.help,
                 [target(expr, legend(labels) or counter_name(metric))], **timeseries(unit))


def gauge_panel(layout: DashboardLayout, metric: Metric, job: str) -> None:
    """The value itself, summed over the collectors (spans open on every host of the job)."""
    layout.panel("timeseries", f"{metric.name}: now", metric.help,
                 [target(f"sum ({selector(metric.name, job)})", metric.name)], **timeseries("short"))


def health_panels(layout: DashboardLayout, program: Program, job: str) -> None:
    def rate(name: str, keep: str = "") -> str:
        inner = f"rate({selector(HEALTH[name], job)}[{RATE}])"
        return f"sum by ({keep}) ({inner})" if keep else f"sum ({inner})"

    layout.row("Collector health")
    layout.panel("timeseries", "Collector up and probes attached",
                 "probec_up: 1 while the probes are attached and read; probes attached, by probe.",
                 [target(selector(HEALTH["up"], job), "up {{instance}}"),
                  target(f"sum ({selector(HEALTH['probe_attached'], job)})", "probes attached")],
                 **timeseries("short"))
    layout.panel("timeseries", "BPF maps: share full", "Entries over max_entries, by map: a full map drops new keys.",
                 [target(f"{selector(HEALTH['map_entries'], job)} / {selector(HEALTH['map_capacity'], job)}",
                         "{{map}}")], **timeseries("percentunit"))
    if program.events:
        targets = [target(rate("events", "event"), "{{event}}"), target(rate("events_lost"), "lost")]
        if any(e.max_per_second for e in program.events):
            targets.append(target(rate("events_rate_limited", "event"), "rate-limited {{event}}"))
        layout.panel("timeseries", "Events: seen, lost, held back",
                     "Events whose condition held, lost by the kernel, held back by the spec's rate limit.",
                     targets, **timeseries("ops"))
    dropped = []
    if any(m.labels for m in program.metrics):
        dropped.append(target(f"sum by (metric) (increase({selector(HEALTH['series_dropped'], job)}[{RATE}]))",
                              "series {{metric}}"))
    if program.spans:
        dropped.append(target(f"sum by (span) (increase({selector(HEALTH['span_begin_overflow'], job)}[{RATE}]))",
                              "begins {{span}}"))
    if dropped:
        layout.panel("timeseries", "Dropped: label sets and span begins",
                     "Label sets folded into __overflow__ by limits.series; span begins dropped by a full begin map.",
                     dropped, **timeseries("short"))
    layout.panel("timeseries", "Map read time and engine restarts",
                 "How long the last read of the maps took; restarts of the tracing engine.",
                 [target(selector(HEALTH["last_read"], job), "read {{instance}}"),
                  target(f"increase({selector(HEALTH['backend_restarts'], job)}[{RATE}])", "restarts {{instance}}")],
                 **timeseries("s"))


# The panels of each metric kind (compiler/kinds.py).
PANELS = {"counter": counter_panel, "histogram": histogram_panels, "gauge": gauge_panel}


def dashboard_document(program: Program, job: str) -> dict:
    layout = DashboardLayout()
    layout.row("Metrics")
    for metric in program.metrics:
        PANELS[metric.kind](layout, metric, job)
    health_panels(layout, program, job)
    return {
        "title": f"probec: {program.name}",
        "uid": f"probec-{program.name}"[:40],
        "description": f"Generated by `probec dashboard` from {program.source}: do not edit. "
                       f"{program.description}".strip(),
        "tags": ["probec"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "annotations": {"list": []},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "panels": layout.panels,
    }


def render_dashboard(program: Program, job: str) -> str:
    return json.dumps(dashboard_document(program, job), indent=2, sort_keys=True) + "\n"
