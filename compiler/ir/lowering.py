"""Lowering: the typed spec becomes the IR, resolving every name against the spec and the host."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...runtime.manifest import EVENT_HEADER
from ..diagnostics import Diagnostics, did_you_mean
from ..expr import ast
from ..kinds import METRIC_KINDS, PROBE_KINDS
from ..spec.model import EventSpec, MetricSpec, SpanEndRef, SpanSide, SpanSpec, Spec, WithinRef
from .host import HostInfo
from .layout import struct_layout, u32_key, u64_value
from .lints import LoweringLints
from .nodes import (CGROUP_MAP, CGROUP_MAP_ENTRIES, INT, SINT, ActiveSpan, Cmp, Const, Context, EmitEvent, Event,
                    EventField, Guard, IRExpr, Label, Logic, MapSpec, Metric, MetricUpdate, Program, SpanBegin, SpanEnd,
                    SpanInfo, ValueType, Within)
from .passes import LoweringPasses
from .resolve import ProbeBuild, ProbeResolution
from .typecheck import ProbeContext, TypeChecker

# Label sets folded into __overflow__ that the core backend's kernel side tells apart (and counts)
# per metric; past that many, probec_series_dropped_total stops growing (a lower bound).
FOLDED_TRACKED = 1024


@dataclass
class LoweringOptions:
    host: HostInfo = field(default_factory=HostInfo)
    kernel: str = "host"            # host: mechanisms must exist on this kernel; any: do not check
    placement: str = "auto"         # auto: probe past endbr64; entry: always at the symbol
    backend: str = ""               # the backend built for, where it chooses at build time ("": any)


class Lowering(ProbeResolution, LoweringPasses, LoweringLints):
    """The typed spec to the IR: spans, metrics and events lowered onto the probes that
    resolve.py finds, then passes.py and lints.py over the result."""

    def __init__(self, spec: Spec, diags: Diagnostics, options: LoweringOptions):
        self.spec = spec
        self.d = diags
        self.opt = options
        self.host = options.host
        self.types = TypeChecker(diags)
        self.probes: dict[tuple, ProbeBuild] = {}
        self.used_ids: set[str] = set()
        self.groups: dict[str, tuple[str, ...]] = {}
        self.chosen: dict[str, int] = {}
        self.symbols: dict[tuple, tuple[str, int] | None] = {}
        self.failed_symbols: set[tuple[str, str]] = set()
        self.warned_no_tracefs = False
        self.binaries: dict[str, str | None] = {}
        # What `INNER.total` / `COUNTER.count` may name: spans and counters and the span each is within.
        self.span_within = {n: (s.within.name if s.within else "") for n, s in spec.spans.items()}
        self.counted_within = {n: m.within.name for n, m in spec.metrics.items()
                               if m.kind == "counter" and m.value is None and m.within}
        self.thread_spans = frozenset(n for n, s in spec.spans.items() if s.begin.key is None and s.end.key is None
                                      and (s.fallback is None or (s.fallback[0].key is None and
                                                                  s.fallback[1].key is None)))
        self.left_out_binaries: set[str] = set()   # optional binaries that are missing here
        self.unnameable: set[str] = set()          # resolved paths and symbols reported with E503
        self.span_ends: dict[str, list[tuple]] = {}   # span -> [(probe key, end key expr, ctx)]
        self.span_maps: dict[str, MapSpec] = {}
        self.needs_stacks = False
        self.notes: list[str] = []

    # -- spans ---------------------------------------------------------------------------------
    def span_variants(self, s: SpanSpec) -> list[tuple[tuple[str, str], SpanSide, SpanSide]]:
        """(begin kind, end kind) choices for a span, in order of preference."""
        begin, end = PROBE_KINDS[s.begin.probe.kind], PROBE_KINDS[s.end.probe.kind]
        if not begin.picks and not end.picks:
            return [((begin.name, end.name), s.begin, s.end)]
        out = []
        for choice in range(len(begin.picks or end.picks)):     # kernel:/kernelret: pick a mechanism
            out.append(((begin.picks[choice] if begin.picks else begin.name,
                         end.picks[choice] if end.picks else end.name), s.begin, s.end))
        if s.fallback:
            fb, fe = s.fallback
            out.append(((fb.probe.kind, fe.probe.kind), fb, fe))
        return out

    def why_not(self, kind: str) -> str:
        """Why mechanism_available() said no to a probe kind, for E309."""
        if "kprobe" in kind:
            return "no CONFIG_KPROBES"
        if self.host.has_fentry:
            return "the kernel has them, but bpftrace here attaches no kfunc probes (bpftrace --info)"
        return "BPF function tracing is locked down"

    def lower_span(self, s: SpanSpec) -> None:
        variants = self.span_variants(s)
        available = []
        for (bk, ek), bside, eside in variants:
            ok = [self.mechanism_available(k) for k in (bk, ek)]
            available.append(None if None in ok else all(ok))
        if len(variants) > 1:
            if self.opt.kernel == "host" and self.host.enabled and not any(a for a in available):
                has = "kprobes" if self.host.has_kprobes else "neither kprobes nor fentry"
                self.d.error("E310", f"span '{s.name}': {self.host.which} has {has}, so 'kernel:{s.begin.probe.name}' "
                             "cannot attach here", s.begin.probe.span,
                             "add 'fallback: syscall:NAME' or 'fallback: {begin: tracepoint:..., end: ...}': "
                             f"tracepoints, syscalls, uprobes and USDT work on {self.host.which}")
                return
            group = f"span_{s.name}"
            labels = [f"{bk}:{bside.probe.name}" if bk in ("fentry", "kprobe") else bside.probe.text
                      for (bk, _ek), bside, _eside in variants]
            self.groups[group] = tuple(labels)
            self.chosen[group] = 0
            if self.opt.kernel == "host" and self.host.enabled:
                chosen = next(i for i, a in enumerate(available) if a)
                self.chosen[group] = chosen
                if chosen:
                    self.d.warning("W311", f"span '{s.name}' uses its fallback '{labels[chosen]}' on {self.host.which} "
                                   f"({', '.join(labels[:chosen])} cannot attach here)", s.span)
        else:
            group = ""
            (bk, ek), _, _ = variants[0]
            for kind, side in ((bk, s.begin), (ek, s.end)):
                if self.mechanism_available(kind) is False:
                    alt = "tracepoint:..., syscall:NAME, uprobe: or usdt:"
                    self.d.error("E309", f"{kind} probes are not available on {self.host.which} ({self.why_not(kind)})",
                                 side.probe.span, f"use kernel:{side.probe.name} with a 'fallback', or {alt}; "
                                 "build with --kernel any to target another kernel")
                    return
        begin_map = MapSpec(f"span_{s.name}_begin", "table", None, None, 2 * self.spec.limits.concurrency, "span_begin")
        self.span_maps[s.name] = begin_map
        for i, ((bk, ek), bside, eside) in enumerate(variants):
            b = self.probe(bside.probe, bk, group, i)
            e = self.probe(eside.probe, ek, group, i)
            if b is None or e is None:
                continue
            bctx = self.context_for(b, False)
            bkey = self.key_expr(bside.key, bctx, f"span '{s.name}' begin key")
            ekey = self.key_expr(eside.key, self.context_for(e, False), f"span '{s.name}' end key")
            filt = self.types.condition(s.filter, bctx, f"span '{s.name}' filter") if s.filter else None
            within = self.within(s.within, s.name, bctx)
            if bkey is None or ekey is None or (s.filter is not None and filt is None):
                continue
            if s.within is not None and not within:
                continue
            b.actions.append(SpanBegin(s.name, bkey, Guard(filt, within), restart=s.restart))
            self.span_ends.setdefault(s.name, []).append((e, ekey))

    def key_expr(self, expr: ast.Expr | None, ctx: ProbeContext, what: str):
        if expr is None:
            return Context("tid", INT)
        return self.types.value(expr, ctx, what, allow_address=True)

    def within(self, ref: WithinRef | None, owner: str, ctx: ProbeContext) -> tuple[Within, ...]:
        """The `within` guard where `ctx` runs: the outer span, and its key computed here."""
        if ref is None:
            return ()
        name, span = ref.name, ref.span
        if name not in self.spec.spans:
            self.d.error("E330", f"'within' names unknown span '{name}'", span, did_you_mean(name, self.spec.spans))
            return ()
        if name == owner:
            self.d.error("E330", f"span '{owner}' cannot be within itself", span)
            return ()
        if ref.key is None:
            if name not in self.thread_spans:
                self.d.error("E331", f"'within: {name}' needs the key of '{name}' here: '{name}' is not keyed "
                             "by thread", span, f"write 'within: {{span: {name}, key: EXPR}}' with an expression "
                             f"that gives the same key as span '{name}' (a socket: args.skaddr, say)")
                return ()
            return (Within(name),)
        key = self.key_expr(ref.key, ctx, f"'within: {name}' key")
        return (Within(name, key),) if key is not None else ()

    # -- metrics -------------------------------------------------------------------------------
    def where(self, on, what: str) -> list[tuple[ProbeBuild, object, bool]]:
        """The probes an update runs at: (probe, span end key or None, inside a span end)."""
        if isinstance(on, SpanEndRef):
            if on.span_name not in self.spec.spans:
                self.d.error("E320", f"{what}: unknown span '{on.span_name}'", on.span,
                             did_you_mean(on.span_name, self.spec.spans))
                return []
            return [(b, key, True) for b, key in self.span_ends.get(on.span_name, [])]
        if PROBE_KINDS[on.kind].picks:
            self.d.error("E312", f"{what}: '{on.kind}:' picks a mechanism for spans only", on.span,
                         "use it in a span with a fallback, or name tracepoint:/kprobe:/fentry: directly")
            return []
        if self.mechanism_available(on.kind) is False:
            self.d.error("E309", f"{on.kind} probes are not available on {self.host.which} ({self.why_not(on.kind)})",
                         on.span,
                         f"tracepoints, syscalls, uprobes and USDT work on {self.host.which}; "
                         "build with --kernel any to target another kernel")
            return []
        b = self.probe(on)
        return [(b, None, False)] if b else []

    def lower_metric(self, m: MetricSpec) -> Metric | None:
        what = f"metric '{m.name}'"
        if METRIC_KINDS[m.kind].open_spans:
            return self.lower_gauge(m, what)
        sites = self.where(m.on, what)
        if not sites:
            return None
        labels: list[Label] | None = None
        value_type: ValueType | None = None
        updates = []
        part_type = ValueType("int", render="enum", names=tuple(p[0] for p in m.parts))
        for build, end_key, in_span in sites:
            ctx = self.context_for(build, in_span, m.on.span_name if in_span else "", end_key)
            these = []
            for lab in m.labels:
                ir = self.types.value(lab.expr, ctx, f"label '{lab.name}'", allow_string=True, allow_address=True)
                if ir is not None:
                    these.append(Label(lab.name, ir))
            if len(these) < len(m.labels):
                return None
            if m.parts:
                these.insert(0, Label("part", Const(0, part_type)))
            labels = labels if labels is not None else these
            values: list[tuple[IRExpr | None, tuple[IRExpr, ...]]] = []
            if m.parts:
                for i, (part, expr, _span) in enumerate(m.parts):
                    value = self.types.value(expr, ctx, f"{what} part '{part}'")
                    if value is None:
                        return None
                    if value_type is not None and value.type.dimension != value_type.dimension:
                        self.d.error("E321", f"{what}: part '{part}' is {value.type.describe()} but an earlier "
                                     f"part is {value_type.describe()}", expr.span, "the parts share one histogram")
                        return None
                    value_type = value.type
                    values.append((value, (Const(i, part_type),) + tuple(lab.expr for lab in these[1:])))
            else:
                value = None
                if m.value is not None:
                    value = self.types.value(m.value, ctx, f"{what} value")
                    if value is None:
                        return None
                    value_type = value.type
                values.append((value, tuple(lab.expr for lab in these)))
            filt = self.types.condition(m.filter, ctx, f"{what} filter") if m.filter else None
            if m.filter is not None and filt is None:
                return None
            within = self.within(m.within, "", ctx)
            if m.within is not None and not within:     # reported by within()
                return None
            for value, label_exprs in values:
                updates.append((build, in_span, MetricUpdate(m.name, value, Guard(filt, within), label_exprs)))
        if value_type is not None and value_type.dimension == "none" and m.buckets:
            value_type = ValueType("int", m.buckets.dimension)   # a plain count with byte buckets is bytes
        unit, scale = self.metric_unit(m, value_type)
        edges = m.buckets.edges if m.buckets else ()
        if m.buckets and value_type is not None and "none" not in (m.buckets.dimension, value_type.dimension) \
                and value_type.dimension != m.buckets.dimension:
            self.d.error("E321", f"{what}: buckets are {m.buckets.dimension}s but the value is "
                         f"{value_type.describe()}", m.buckets.span)
            return None
        self.naming(m, unit)
        self.cardinality(m, labels or [], len(edges))
        members = [(f"l_{lab.name}", lab.expr.type if lab.expr.type.kind == "str" else
                    ValueType("int", signed=lab.expr.type.signed), lab.name) for lab in labels or []]
        kind = METRIC_KINDS[m.kind]
        hist, slots = kind.buckets, kind.slots(edges)
        if members:
            key = struct_layout(f"{m.name}_key", members, bucket=hist)
            entries = self.spec.limits.series * slots
            shape = "table"
        else:
            key = u32_key(f"{m.name}_key")
            entries = slots
            shape = "slots"
        mp = MapSpec(f"m_{m.name}", shape, key, u64_value(f"{m.name}_value"), entries, "metric")
        fold: dict[str, MapSpec] = {}
        if members:
            # Past limits.series label sets, updates go to a per-CPU array that is the __overflow__
            # series, and the label set is remembered (up to FOLDED_TRACKED of them) to be counted.
            fold["overflow_map"] = MapSpec(f"m_{m.name}_overflow", "slots", u32_key(f"{m.name}_overflow_key"),
                                           u64_value(f"{m.name}_value"), slots,
                                           "metric_overflow")
            fold["folded_map"] = MapSpec(f"m_{m.name}_folded", "table", key, u64_value(f"{m.name}_value"),
                                         FOLDED_TRACKED, "metric_folded")
            if hist:
                # a histogram's label set takes a slot per bucket used: admit label sets, not slots
                fold["sets_map"] = MapSpec(f"m_{m.name}_sets", "table", key, u64_value(f"{m.name}_value"),
                                           self.spec.limits.series, "metric_sets")
        for build, in_span, upd in updates:
            if in_span:
                self.pending_end.setdefault(id(build), []).append((m.on.span_name, upd))
            else:
                build.actions.append(upd)
        return Metric(m.name, m.kind, m.help or f"{m.kind} from {m.on.span_name + '.end' if isinstance(m.on, SpanEndRef) else m.on.text}",
                      unit, scale, tuple(labels or ()), edges, mp, self.spec.limits.series, **fold,
                      otel_name=m.otel_name)

    def lower_gauge(self, m: MetricSpec, what: str) -> Metric | None:
        """`gauge: SPAN.open`: +1 where the span opens at a key it was not open at, -1 where it
        closes. At each begin the gauge goes up under the begin's own guard if the span is not open
        at the key yet, and back down if it still is not once the begin ran (a full begin map
        refused it); at each end it goes down if the span is open at the end key (run() puts that
        before the end). Ordinary updates of existing IR: a backend needs nothing of its own."""
        span = m.on.span_name
        if span not in self.spec.spans:
            self.d.error("E320", f"{what}: unknown span '{span}'", m.on.span, did_you_mean(span, self.spec.spans))
            return None
        if span not in self.span_maps:      # its probes failed: reported there
            return None
        for build in self.probes.values():
            actions = []
            for a in build.actions:
                if isinstance(a, SpanBegin) and a.span == span:
                    closed = Cmp("==", ActiveSpan((span,), ValueType("int", render="enum", names=("none", span)),
                                                  a.key), Const(0))
                    guard = Guard(Logic("&&", a.guard.filter, closed) if a.guard.filter else closed, a.guard.within)
                    actions += [MetricUpdate(m.name, Const(1), guard), a, MetricUpdate(m.name, Const(-1, SINT), guard)]
                else:
                    actions.append(a)
            build.actions[:] = actions
        self.gauges.setdefault(span, []).append(m.name)
        key = u32_key(f"{m.name}_key")
        mp = MapSpec(f"m_{m.name}", "slots", key, u64_value(f"{m.name}_value"), 1, "metric")
        return Metric(m.name, m.kind, m.help or f"spans '{span}' open now", "", 1.0, (), (), mp,
                      self.spec.limits.series)

    def metric_unit(self, m: MetricSpec, vt: ValueType | None) -> tuple[str, float]:
        dim = vt.dimension if vt is not None else "none"
        if m.unit == "none":
            return "", 1.0
        if dim == "time" or m.unit == "seconds":
            return "seconds", 1e-9
        if dim == "size" or m.unit == "bytes":
            return "bytes", 1.0
        return "", 1.0

    # -- events --------------------------------------------------------------------------------
    def lower_event(self, ev: EventSpec, index: int) -> Event | None:
        what = f"event '{ev.name}'"
        sites = self.where(ev.on, what)
        if not sites:
            return None
        fields: list[EventField] | None = None
        emits = []
        for build, end_key, in_span in sites:
            ctx = self.context_for(build, in_span, ev.on.span_name if in_span else "", end_key)
            these = []
            for f in ev.fields:
                if f.stack:
                    these.append(EventField(f.name, None, f.stack))
                    self.needs_stacks = True
                    continue
                ir = self.types.value(f.expr, ctx, f"field '{f.name}'", allow_string=True, allow_address=True)
                if ir is None:
                    return None
                these.append(EventField(f.name, ir, "", ir.type.kind == "str"))
            fields = fields if fields is not None else these
            when = self.types.condition(ev.when, ctx, f"{what} condition") if ev.when else None
            if ev.when is not None and when is None:
                return None
            emits.append((build, in_span, EmitEvent(ev.name, when, Guard())))
        names = [f.name for f in fields]
        for dup in {n for n in names if names.count(n) > 1}:
            self.d.error("E340", f"{what}: field '{dup}' appears twice", ev.span)
        members = []
        for f in fields:
            if f.stack:
                members.append((f.name, ValueType("int", signed=True), ""))
            else:
                t = f.expr.type
                members.append((f.name, t if t.kind == "str" else ValueType("int", signed=t.signed), ""))
        header = [(f.name, "signed" if f.ctype.startswith("__s") else "unsigned", f.size, f.code) for f in EVENT_HEADER]
        record = struct_layout(f"event_{ev.name}", members, header=header)
        for build, in_span, emit in emits:
            if in_span:
                self.pending_end.setdefault(id(build), []).append((ev.on.span_name, emit))
            else:
                build.actions.append(emit)
        return Event(ev.name, index, tuple(fields), ev.sample_every, ev.max_per_second, record)

    # -- the whole program ---------------------------------------------------------------------
    def run(self) -> Program | None:
        self.pending_end: dict[int, list] = {}
        self.gauges: dict[str, list[str]] = {}     # span -> the gauges that count it open
        for s in self.spec.spans.values():
            self.lower_span(s)
        metrics = [m for m in (self.lower_metric(m) for m in self.spec.metrics.values()) if m]
        events = [e for e in (self.lower_event(e, i) for i, e in enumerate(self.spec.events.values())) if e]
        for span, ends in self.span_ends.items():
            for build, key in ends:
                then = tuple(upd for name, upd in self.pending_end.get(id(build), []) if name == span)
                build.actions += [MetricUpdate(gauge, Const(-1, SINT), Guard(within=(Within(span, key),)))
                                  for gauge in self.gauges.get(span, ())]
                build.actions.append(SpanEnd(span, key, then))
        if self.left_out_binaries and not self.d.has_errors():
            metrics, events = self.leave_out(metrics, events)
        self.check_inside_at_end()
        accumulators = self.accumulate_totals()
        probes = []
        for build in self.probes.values():
            if not build.actions:
                continue
            probes.append(replace(build.probe, actions=tuple(build.actions)))
            if build.ctx.notes and self.host.enabled:     # --no-host: nothing was to be checked
                self.d.warning("W313", f"{build.ctx.description}: tracefs is not readable, so fields "
                               f"{', '.join(sorted({name for name, _ in build.ctx.notes}))} were not checked "
                               "(BTF names tracepoints but not their fields)", build.ctx.notes[0][1],
                               "mount tracefs (mount -t tracefs nodev /sys/kernel/tracing) or run as root")
        self.unused_spans()
        if not self.d.has_errors():
            self.check_budgets(probes, metrics, events)
        if self.d.has_errors():
            return None
        spans = tuple(SpanInfo(n, self.span_maps[n]) for n in self.spec.spans if n in self.span_maps)
        maps = [s.begin_map for s in spans] + accumulators + [m.map for m in metrics]
        maps += [mp for m in metrics for mp in (m.sets_map, m.overflow_map, m.folded_map) if mp is not None]
        if events:
            maps.append(MapSpec("events", "ring", None, None, self.spec.limits.ringbuf_bytes, "event"))
        if self.needs_stacks:
            maps.append(MapSpec("stacks", "stacks", None, None, 1024, "stacks"))
        # the cgroups of `namespace == "serving"` and of `probec run --cgroup PATH`: every bundle
        # has it, filled by the runtime
        maps.append(MapSpec(CGROUP_MAP, "table", None, None, CGROUP_MAP_ENTRIES, "cgroup_sets"))
        return Program(self.spec.name, self.spec.file.rsplit("/", 1)[-1], self.spec.description, tuple(probes),
                       spans, tuple(metrics), tuple(events), tuple(maps), self.spec.limits.ringbuf_bytes,
                       self.needs_stacks, tuple(self.groups.items()), tuple(self.chosen.items()),
                       tuple(self.notes), tuple(self.types.cgroup_sets))


def lower(spec: Spec, diags: Diagnostics, options: LoweringOptions | None = None) -> Program | None:
    return Lowering(spec, diags, options or LoweringOptions()).run()
