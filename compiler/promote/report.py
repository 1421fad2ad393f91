"""The parity report, as text for a person and JSON for CI, and the snapshots it was made from.

The JSON holds the edges' raw snapshots and the metric facts, so `compare()` can be run again on
it (tests/recorded/promote/ are such reports, recorded on real runs)."""

from __future__ import annotations

import json

from .parity import Edge, Hist, MetricFacts, Parity, compare

REPORT_VERSION = 1


def _snapshot_json(snap: dict) -> dict:
    out = {}
    for metric, series in sorted(snap.items()):
        rows = []
        for key, value in sorted(series.items()):
            if isinstance(value, Hist):
                rows.append({"labels": list(key), "buckets": value.buckets, "sum": value.sum})
            else:
                rows.append({"labels": list(key), "value": int(value)})
        out[metric] = rows
    return out


def _snapshot_from(data: dict) -> dict:
    out = {}
    for metric, rows in data.items():
        out[metric] = {tuple(r["labels"]): (Hist(list(r["buckets"]), r.get("sum", 0)) if "buckets" in r
                                             else int(r["value"])) for r in rows}
    return out


def edge_json(edge: Edge) -> dict:
    return {"prototype": _snapshot_json(edge.prototype), "core_before": _snapshot_json(edge.core_before),
            "core_after": _snapshot_json(edge.core_after), "health": edge.health, "paused": edge.paused,
            "flipped_ns": edge.flipped_ns, "core_read_ns": list(edge.core_read_ns)}


def edge_from(data: dict) -> Edge:
    return Edge(_snapshot_from(data["prototype"]), _snapshot_from(data["core_before"]),
                _snapshot_from(data["core_after"]), data.get("health", {}), data.get("paused", False),
                data.get("flipped_ns", 0), tuple(data.get("core_read_ns", (0, 0))))


def facts_json(facts: list[MetricFacts]) -> list[dict]:
    return [{"name": f.name, "kind": f.kind, "labels": list(f.labels), "edges": list(f.edges), "map": f.map,
             "at_entry": list(f.at_entry), "spans": list(f.spans)} for f in facts]


def facts_from(data: list[dict]) -> list[MetricFacts]:
    return [MetricFacts(d["name"], d["kind"], tuple(d["labels"]), tuple(d["edges"]), d.get("map", ""),
                        tuple(d.get("at_entry", ())), tuple(d.get("spans", ()))) for d in data]


def recompare(report: dict) -> Parity:
    """compare() again on what a JSON report recorded."""
    parity = compare(facts_from(report["facts"]), edge_from(report["edges"]["start"]),
                     edge_from(report["edges"]["end"]))
    parity.window_s = report.get("window_seconds", 0.0)
    return parity


def report_json(parity: Parity, facts: list[MetricFacts], start: Edge, end: Edge, about: dict) -> str:
    data = {
        "version": REPORT_VERSION,
        **about,
        "window_seconds": round(parity.window_s, 3),
        "verdict": "pass" if parity.ok else "fail",
        "metrics": [{
            "metric": m.name, "kind": m.kind, "verdict": m.verdict, "compared_by_total": m.compared_by_total,
            "why": m.why,
            "series": [{"labels": s.labels, "prototype": s.prototype, "core": s.core, "low": s.low,
                        "high": s.high, "moved": s.moved, "far": s.far, "buckets": s.buckets, "quantiles": s.quantiles,
                        "problems": s.problems} for s in m.series]} for m in parity.metrics],
        "events_seen": parity.events,
        "notes": parity.notes,
        "facts": facts_json(facts),
        "edges": {"start": edge_json(start), "end": edge_json(end)},
    }
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def _labels(labels: dict) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""


def report_text(parity: Parity, about: dict) -> str:
    lines = [f"parity of {about.get('spec', '?')}: prototype (bpftrace) and core, "
             f"{parity.window_s:.1f}s window" + (f", process {about['pid']}" if about.get("pid") else "")
             + (", paused at the edges" if about.get("paused") else "")]
    width = max((len(m.name) for m in parity.metrics), default=10)
    for m in parity.metrics:
        proto = sum(s.prototype for s in m.series)
        core = sum(s.core for s in m.series)
        moved = sum(s.moved for s in m.series)
        far = sum(s.far for s in m.series)
        extra = (f", {moved} observation(s) in another bucket" + (f" ({far} further than the next)" if far else "")
                 if moved else "")
        lines.append(f"  {m.name:<{width}}  {m.verdict:<16} prototype {proto}, core {core}{extra}")
        for s in m.series:
            for problem in s.problems:
                lines.append(f"    {m.name}{_labels(s.labels)}: {problem}")
            if s.problems and s.buckets:
                lines.append("      le              prototype       core")
                for b in s.buckets:
                    mark = "" if b["low"] <= b["prototype"] <= b["high"] else "   <-"
                    core_text = str(b["core"]) if b["low"] == b["high"] else f"{b['low']}..{b['high']}"
                    lines.append(f"      {b['le']:<14}  {b['prototype']:>9}  {core_text:>9}{mark}")
        for why in m.why:
            lines.append(f"    why: {why}")
    for name, seen in sorted(parity.events.items()):
        lines.append(f"  event {name}: prototype saw {seen['prototype']}, core {seen['core']} "
                     "(sampling differs by design: not compared)")
    for note in parity.notes:
        lines.append(f"  note: {note}")
    bad = [m.name for m in parity.metrics if not m.ok]
    lines.append("PASS: every metric agrees" if not bad else f"FAIL: {', '.join(bad)} disagree")
    return "\n".join(lines) + "\n"
