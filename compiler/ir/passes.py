"""Passes over the lowered probes' actions: leaving out what lost its probes to a missing optional
binary, checking a span's `within` again where it ends, and wiring up inner spans' totals.
"""

from __future__ import annotations

from dataclasses import replace

from ..spec.model import WithinRef
from .nodes import (TID, EmitEvent, Event, MapSpec, Metric, MetricUpdate, SpanBegin, SpanEnd, Within,
                    kept_accumulators)
from .resolve import ProbeBuild


class LoweringPasses:
    """Lowering's passes: a part of Lowering (lowering.py), sharing its state."""

    def leave_out(self, metrics: list[Metric], events: list[Event]) -> tuple[list[Metric], list[Event]]:
        """Leave out, with a warning, what lost its probes to a missing optional binary: spans
        that never begin, then whatever is `within` them or runs at their end (repeatedly, since
        a span within a left-out span is left out too), then metrics and events with no update left."""
        missing = ", ".join(sorted(self.left_out_binaries))
        gone: set[str] = set()
        while True:
            begun = {a.span for b in self.probes.values() for a in b.actions if isinstance(a, SpanBegin)}
            newly = set(self.span_maps) - begun - gone
            if not newly:
                break
            gone |= newly
            for build in self.probes.values():
                kept = []
                for a in build.actions:
                    if isinstance(a, SpanEnd):
                        if a.span in gone:
                            continue
                        a = replace(a, then=tuple(t for t in a.then if not {w.span for w in t.guard.within} & gone))
                    elif {w.span for w in a.guard.within} & gone:
                        continue
                    kept.append(a)
                build.actions[:] = kept
        for name in self.spec.spans:
            if name in gone:
                del self.span_maps[name]
                self.d.warning("W304", f"span '{name}' is left out of this build: its probes, or a span it "
                               f"is within, need missing optional binaries ({missing})", self.spec.spans[name].span)
        updated, emitted = set(), set()
        for build in self.probes.values():
            for a in build.actions:
                for x in (a.then if isinstance(a, SpanEnd) else (a,)):
                    if isinstance(x, MetricUpdate):
                        updated.add(x.metric)
                    elif isinstance(x, EmitEvent):
                        emitted.add(x.event)
        for kind, items, active in (("metric", self.spec.metrics, updated), ("event", self.spec.events, emitted)):
            for name, item in items.items():
                if name not in active:
                    self.d.warning("W304", f"{kind} '{name}' is left out of this build: every probe it needs "
                                   f"is on a missing optional binary ({missing})", item.span)
        return [m for m in metrics if m.name in updated], [e for e in events if e.name in emitted]

    def check_inside_at_end(self) -> None:
        """A span `within` S is checked again where it ends: S must still be open there, at the
        end key (`end_key`, else `key`, else the thread ending it). A begin whose end the kernel
        never delivered (a lost sched_switch, say) otherwise ends much later, outside S, and
        lands in the span's metrics though not in S's totals. Where the key cannot be computed at
        the end the check is left out, unless `INNER.total` needs it (then it is an error)."""
        for inner, span in self.spec.spans.items():
            ref = span.within
            if ref is None or ref.name not in self.span_maps:
                continue
            report = inner in self.types.totals_used
            for build in self.probes.values():
                for i, a in enumerate(build.actions):
                    if isinstance(a, SpanEnd) and a.span == inner:
                        build.actions[i] = replace(a, inside=self.inside_at_end(ref, inner, build, a, report))

    def inside_at_end(self, ref: WithinRef, inner: str, build: ProbeBuild, end: SpanEnd,
                      report: bool) -> Within | None:
        outer = ref.name
        if not ref.key and end.key != TID:
            if report:
                self.d.error("E332", f"span '{inner}' ends at another thread's key, so '{inner}.total' "
                             f"cannot be added to the current thread's '{outer}'", ref.span,
                             f"say which thread's '{outer}' it belongs to where '{inner}' begins and "
                             f"where it ends: 'within: {{span: {outer}, key: EXPR, end_key: EXPR}}'")
            return None
        if not ref.key:
            return Within(outer)
        mark = len(self.d.items)
        at_end = self.within(replace(ref, key=ref.end_key or ref.key), inner, self.context_for(build, False))
        if at_end:
            return at_end[0]
        if report:
            self.d.note_last(f"'{inner}.total' and '{inner}.count' add up where span '{inner}' ends, "
                             f"so the key of 'within: {outer}' must be known there too: give it "
                             "as 'end_key' if it is computed otherwise there")
        else:
            del self.d.items[mark:]     # not needed here: the end goes unchecked
        return None

    def accumulate_totals(self) -> list[MapSpec]:
        """Wire up `INNER.total` / `INNER.count`: the outer span's begin resets them, the inner
        span's end adds to them while the outer is open, the outer's end reads then drops them."""
        maps: list[MapSpec] = []
        for inner in sorted(self.types.totals_used):
            is_span = inner in self.spec.spans
            outer = (self.spec.spans[inner] if is_span else self.spec.metrics[inner]).within.name
            if outer not in self.span_maps:
                continue
            for build in self.probes.values():
                new = []
                for a in build.actions:
                    if isinstance(a, SpanBegin) and a.span == outer:
                        a = replace(a, resets=a.resets + (inner,))
                    elif isinstance(a, SpanEnd) and a.span == inner and is_span:
                        if a.inside is None:      # reported by check_inside_at_end
                            continue
                        a = replace(a, accumulate_into=a.inside)
                    elif isinstance(a, MetricUpdate) and a.metric == inner and not is_span:
                        a = replace(a, accumulate_into=a.guard.within[0])
                    elif isinstance(a, SpanEnd) and a.span == outer:
                        a = replace(a, clears=a.clears + (inner,))
                    new.append(a)
                build.actions[:] = new
            capacity = self.span_maps[outer].max_entries
            maps += [MapSpec(name, "table", None, None, capacity, "accumulator")
                     for name in kept_accumulators(inner, is_span)]
        return maps
