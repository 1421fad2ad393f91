"""Lints and budgets of a lowered program: Prometheus naming, label cardinality and map sizes, the
BPF stack each probe needs, and spans that nothing uses.
"""

from __future__ import annotations

import os

from ..kinds import METRIC_KINDS
from ..spec.limits import BPFTRACE_PRINTF_HEADER, BPFTRACE_STACK_BYTES, MAX_MAPS_PER_PROGRAM, MAX_PROBES, STACK_BUDGET
from ..spec.model import MetricSpec, SpanEndRef, SpanOpenRef
from .nodes import (ActiveSpan, Context, EmitEvent, Event, Label, Metric, MetricUpdate, Probe, SpanBegin, SpanEnd,
                    SpanTotal, TracepointField, Within, accumulator_maps, walk)


class LoweringLints:
    """Lowering's lints: a part of Lowering (lowering.py), sharing its state."""

    def naming(self, m: MetricSpec, unit: str) -> None:
        suffix = METRIC_KINDS[m.kind].suffix
        if suffix and not m.name.endswith(suffix):
            self.d.warning("W401", f"{m.kind} '{m.name}' should end in '{suffix}' (Prometheus convention)", m.span)
        base = m.name[:-6] if m.name.endswith("_total") else m.name
        if unit and not base.endswith("_" + unit):
            self.d.warning("W402", f"metric '{m.name}' is in {unit}; Prometheus names end in '_{unit}'", m.span,
                           f"e.g. '{base}_{unit}{suffix}'")

    # Labels that take a value per thread, process, argument or address: fine for a few, a series
    # explosion on a busy host.
    UNBOUNDED_LABELS = ("pid", "tid", "cgroup", "uid")
    MAP_BYTES_WARNING = 64 << 20

    def cardinality(self, m: MetricSpec, labels: list[Label], n_edges: int) -> None:
        series = self.spec.limits.series
        for lab, spec_label in zip(labels, m.labels):
            e = lab.expr
            unbounded = (isinstance(e, Context) and e.name in self.UNBOUNDED_LABELS) or \
                type(e).__name__ in ("Arg", "Retval", "SpanTotal", "FdSocket") or \
                (type(e).__name__ == "TracepointField" and e.type.kind == "int" and e.type.render != "ipv4"
                 and e.name.endswith(("pid", "addr", "ino", "len", "size", "count", "bytes")))
            if unbounded:
                self.d.warning("W403", f"metric '{m.name}': label '{lab.name}' can take a new value per "
                               f"{'thread or process' if isinstance(e, Context) else 'event'}; past "
                               f"limits.series ({series}) label sets fold into '__overflow__'", spec_label.span,
                               "label by something with few values (comm, a state), or raise limits.series "
                               "knowingly")
        if labels:
            slots = series * (n_edges + 2 if METRIC_KINDS[m.kind].buckets else 1)
            cpus = os.cpu_count() or 1
            key_bytes = 8 * len(labels) + 16 * sum(1 for lab in labels if lab.expr.type.kind == "str") + 8
            approx = slots * (key_bytes + 8 * cpus + 64)
            if approx > self.MAP_BYTES_WARNING:
                self.d.warning("W404", f"metric '{m.name}': its map holds {slots:,} entries "
                               f"(limits.series {series} x {n_edges + 2} slots), about {approx >> 20} MiB of "
                               f"kernel memory on {cpus} CPUs", m.span,
                               "lower limits.series or use fewer buckets")

    def check_budgets(self, probes: list[Probe], metrics: list[Metric], events: list[Event]) -> None:
        """What clang and bpftrace would refuse for size, found here with the spec's places: the BPF
        stack a probe's program needs in either backend, and the number of probes."""
        if len(probes) > MAX_PROBES:
            self.d.error("E350", f"the spec needs {len(probes)} probes; bpftrace attaches at most {MAX_PROBES}",
                         self.spec.span, "split it into several specs")
        by_metric = {m.name: m for m in metrics}
        by_event = {e.name: e for e in events}
        for p in probes:
            nodes = list(walk(p.actions))
            updates = [n for n in nodes if isinstance(n, MetricUpdate)]
            emits = [n for n in nodes if isinstance(n, EmitEvent)]
            maps = self.maps_used(nodes, by_metric, by_event)
            if len(maps) > MAX_MAPS_PER_PROGRAM:
                self.d.error("E352", f"the program at {p.spec_text or p.id} would use {len(maps)} BPF maps; the kernel "
                             f"loads a program with at most {MAX_MAPS_PER_PROGRAM}", p.span,
                             "update fewer metrics from one probe, or label fewer of them (a labelled metric "
                             "uses 3 maps, a labelled histogram 4)")
            # core: strings read from the tracepoint, comm, and the largest map key (probe.bpf.c.j2)
            strings = sum({n.name: n.size for n in nodes if isinstance(n, TracepointField) and n.type.kind == "str"}
                          .values())
            comm = 16 if any(isinstance(n, Context) and n.name == "comm" for n in nodes) else 0
            # bpftrace: each map key and each printf record on the stack, one at a time
            needs: list[tuple[int, int, str, object]] = []    # (core bytes, bpftrace bytes, what, span)
            for upd in updates:
                m = by_metric[upd.metric]
                if not m.labels:
                    continue
                key = sum(8 if lab.expr.type.kind != "str" else lab.expr.type.length for lab in m.labels)
                needs.append((strings + comm + m.map.key.size, key + (8 if METRIC_KINDS[m.kind].buckets else 0),
                              f"metric '{m.name}'", self.spec.metrics[m.name].span))
            for emit in emits:
                ev = by_event[emit.event]
                record = BPFTRACE_PRINTF_HEADER + sum(
                    BPFTRACE_STACK_BYTES if f.stack else f.expr.type.length if f.is_string else 8 for f in ev.fields)
                needs.append((strings + comm, record, f"event '{ev.name}'", self.spec.events[ev.name].span))
            for core, bpftrace, what, span in needs:
                worst = max(core, bpftrace)
                if worst > STACK_BUDGET:
                    self.d.error("E351", f"{what} needs about {worst} bytes of BPF stack at {p.spec_text or p.id} "
                                 f"({'bpftrace' if bpftrace >= core else 'core'}); at most {STACK_BUDGET} are "
                                 "available", span, "use fewer or shorter string labels and event fields "
                                 "(comm is 16 bytes, a number 8)")
                    break

    @staticmethod
    def maps_used(nodes: list, by_metric: dict[str, Metric], by_event: dict[str, Event]) -> set[str]:
        """The maps one probe's program uses in the core and bcc backends (the most of any
        backend): the health array, each metric's maps, each span's begin map and the totals it
        keeps or reads, the event ring, the stack map, and bcc's two per-event state arrays."""
        maps = {"probec_health"}
        for n in nodes:
            if isinstance(n, MetricUpdate):
                m = by_metric[n.metric]
                maps.update(mp.name for mp in (m.map, m.overflow_map, m.folded_map, m.sets_map) if mp is not None)
                if n.accumulate_into is not None:
                    maps.add(accumulator_maps(n.metric)[1])
            elif isinstance(n, (SpanBegin, SpanEnd, Within)):
                maps.add(f"span:{n.span}")
                for inner in getattr(n, "resets", ()) + getattr(n, "clears", ()):
                    maps.update(accumulator_maps(inner))
                if isinstance(n, SpanEnd) and n.accumulate_into is not None:
                    maps.update(accumulator_maps(n.span))
            elif isinstance(n, ActiveSpan):
                maps.update(f"span:{s}" for s in n.spans)
            elif isinstance(n, SpanTotal):
                maps.update(accumulator_maps(n.span))
            elif isinstance(n, EmitEvent):
                maps.update(("ring", "probec_sampled", "probec_rates"))
                if any(f.stack for f in by_event[n.event].fields):
                    maps.add("stacks")
        return maps

    def unused_spans(self) -> None:
        used = set()
        for m in self.spec.metrics.values():
            if isinstance(m.on, (SpanEndRef, SpanOpenRef)):
                used.add(m.on.span_name)
            if m.within:
                used.add(m.within.name)
        for e in self.spec.events.values():
            if isinstance(e.on, SpanEndRef):
                used.add(e.on.span_name)
        for s in self.spec.spans.values():
            if s.within:
                used.add(s.within.name)
        used |= self.types.totals_used | self.types.active_used
        for name, s in self.spec.spans.items():
            if name not in used:
                self.d.warning("W320", f"span '{name}' is measured but no metric or event uses it", s.span,
                               f"add e.g. 'histogram: {name}.duration' to a metric")
