"""The production bundle promote writes, and what the compiler tells parity about each metric.

Production defaults, concretely:
- sized maps: the core bundle sizes every map from the spec's `limits` (begin maps 2 x
  concurrency, or task-local storage where the kernel has it; metric maps limits.series label
  sets, the rest folded into __overflow__ and counted), where the prototype gives every map
  bpftrace's BPFTRACE_MAP_KEYS_MAX. Promote checks the window's peak against those sizes: a map
  more than half full at the window's end is named in the report with the limit to raise.
- sampled events: an event with no `at most N/s` gets `at most 100/s` (--events-rate), so a burst
  of slow requests cannot flood the ring buffer or the events file; a `sample: 1/N` and a rate
  limit the spec writes stay as written. The prototype runs the spec as written.
- health on: the bundle carries `rules.yml` (what `probec rules` writes: p99 recording rules and
  the collector's health alerts: events lost or rate-limited, maps near capacity, series
  overflow, span begin overflow, probes detached, collector down) and the parity report it was
  promoted with (parity.txt, parity.json).
"""

from __future__ import annotations

from dataclasses import replace

from ..diagnostics import Diagnostics
from ..driver import CheckResult
from ..ir.host import HostInfo
from ..ir.lowering import LoweringOptions, lower
from ..ir.nodes import MetricUpdate, Program, SpanBegin, SpanEnd, walk
from ..spec.model import Spec
from .parity import MetricFacts

EVENTS_RATE = 100          # events a second an event may emit in production when its spec sets no limit
FULL_SHARE = 0.5           # a map fuller than this at the window's end is named in the report


def production_spec(spec: Spec, events_rate: int = EVENTS_RATE) -> tuple[Spec, list[str]]:
    """The spec with production defaults, and a sentence for each default applied."""
    said = []
    events = dict(spec.events)
    if events_rate > 0:
        for name, event in spec.events.items():
            if event.max_per_second == 0:
                events[name] = replace(event, max_per_second=events_rate)
                said.append(f"event {name}: at most {events_rate}/s (the spec sets no limit)")
    return replace(spec, events=events), said


def production_check(result: CheckResult, events_rate: int, kernel: str = "host") -> tuple[CheckResult, list[str]]:
    """The spec of `result` with production defaults, lowered again."""
    spec, said = production_spec(result.spec, events_rate)
    diags = Diagnostics()
    program = lower(spec, diags, LoweringOptions(host=HostInfo(), kernel=kernel))
    out = CheckResult(result.path, diags, result.source, spec, program, dict(result.sources))
    return out, said


def metric_facts(program: Program, prototype_manifest, format_edge) -> list[MetricFacts]:
    """Per metric: its exported buckets, the prototype's map for it, the probes the prototype puts
    at a function's entry where core puts them past endbr64, and the spans that feed it."""
    main_map = {}
    if prototype_manifest.bpftrace is not None:
        for mm in prototype_manifest.bpftrace.metric_maps:
            if mm.role == "main":
                main_map[mm.metric] = mm.map.lstrip("@")
    facts = []
    for m in program.metrics:
        spans: set[str] = set()
        direct = []
        for probe in program.probes:
            for node in walk(probe.actions):
                if isinstance(node, SpanEnd) and any(isinstance(u, MetricUpdate) and u.metric == m.name
                                                     for u in walk(node.then)):
                    spans.add(node.span)
                if isinstance(node, MetricUpdate) and node.metric == m.name:
                    direct.append(probe)
                    spans.update(w.span for w in node.guard.within)
        related = {p.id: p for p in direct}
        for probe in program.probes:
            if any(isinstance(n, (SpanBegin, SpanEnd)) and n.span in spans for n in walk(probe.actions)):
                related[probe.id] = probe
        at_entry = sorted({p.spec_text or p.id for p in related.values() if p.past_endbr64})
        edges = tuple(format_edge(e * m.scale) for e in m.edges) if m.kind == "histogram" else ()
        facts.append(MetricFacts(m.name, m.kind, tuple(lab.name for lab in m.labels), edges,
                                 main_map.get(m.name, ""), tuple(at_entry), tuple(sorted(spans))))
    return facts


def map_use(health: dict, program: Program) -> list[str]:
    """Begin and metric maps of the core collector more than FULL_SHARE full at the window's end,
    with the limit that sizes them."""
    out = []
    entries, capacity = health.get("map_entries", {}), health.get("map_capacity", {})
    limits = {"span_begin": "limits.concurrency", "metric": "limits.series"}
    for m in program.maps:
        cap, used = capacity.get(m.name, 0), entries.get(m.name, 0)
        if m.purpose in limits and m.shape == "table" and cap and used > FULL_SHARE * cap:   # slots are always full
            out.append(f"core map {m.name} is {used}/{cap} full at the window's end: raise {limits[m.purpose]}")
    return out
