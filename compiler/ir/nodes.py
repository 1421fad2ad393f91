"""The IR: probes with the actions they run, maps with their layouts, metrics and events.

Plain frozen data. Backends read it; they never look back at the spec. Every name in here is a
safe identifier (validated at load), every string constant is carried as bytes, and every size is
already computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..diagnostics import SourceSpan


# --- types -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValueType:
    kind: str              # int | str | bool
    dimension: str = "none"  # time | size | none (ints only)
    length: int = 0        # strings: bytes including the NUL
    signed: bool = False
    render: str = ""       # how a label shows it: "ipv4" (a __u8[4] address, dotted quad), "enum"
    names: tuple[str, ...] = ()   # enum: the label text of 0, 1, 2, ...

    def describe(self) -> str:
        if self.render == "ipv4":
            return "an IPv4 address"
        if self.kind == "int" and self.dimension != "none":
            return "a duration" if self.dimension == "time" else "a size"
        return {"int": "an integer", "str": "a string", "bool": "a condition"}[self.kind]


INT = ValueType("int")
SINT = ValueType("int", signed=True)
BOOL = ValueType("bool")
TIME = ValueType("int", "time")
COMM = ValueType("str", length=16)


# --- expressions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """pid, tid, comm, cgroup, cpu, uid, now (ktime ns)."""
    name: str
    type: ValueType


@dataclass(frozen=True)
class Arg:
    index: int
    type: ValueType = INT


@dataclass(frozen=True)
class Retval:
    type: ValueType = SINT


@dataclass(frozen=True)
class TracepointField:
    name: str
    offset: int
    size: int
    type: ValueType
    ckind: str = "int"             # what the kernel declares it as: int | ptr | enum (CO-RE matches kinds)


@dataclass(frozen=True)
class Duration:
    type: ValueType = TIME


TID = Context("tid", INT)


@dataclass(frozen=True)
class SpanTotal:
    """At the end of an outer span: the time (`total`) or number (`count`) of an inner span's
    completions while the outer one was open, or (`count`) the updates of a counter `within` it.
    Read from `acc_INNER_{total,count}` at `key`, the outer span's key where it ends."""
    span: str
    field: str             # total | count
    type: ValueType = TIME
    key: "IRExpr" = TID


@dataclass(frozen=True)
class ActiveSpan:
    """`active(a, b)`: 1 + the index of the first of `spans` open on the current thread, else 0;
    a label shows it as that span's name or "none" (type.names). `active_at(KEY, a, b)` asks at
    KEY (computed here) instead of the thread."""
    spans: tuple[str, ...]
    type: ValueType
    key: "IRExpr" = TID


@dataclass(frozen=True)
class Const:
    value: int
    type: ValueType = INT


@dataclass(frozen=True)
class StrConst:
    value: bytes           # without the NUL
    type: ValueType = ValueType("str")


@dataclass(frozen=True)
class BinOp:
    op: str                # + - * / % & |
    left: "IRExpr"
    right: "IRExpr"
    type: ValueType


@dataclass(frozen=True)
class Cmp:
    op: str                # == != < <= > >=
    left: "IRExpr"
    right: "IRExpr"
    type: ValueType = BOOL


@dataclass(frozen=True)
class StrEq:
    """A string value (comm, a char[] field) compared with a constant: == or !=."""
    op: str
    left: "IRExpr"
    right: StrConst
    type: ValueType = BOOL


@dataclass(frozen=True)
class Logic:
    op: str                # && ||
    left: "IRExpr"
    right: "IRExpr"
    type: ValueType = BOOL


@dataclass(frozen=True)
class Not:
    operand: "IRExpr"
    type: ValueType = BOOL


@dataclass(frozen=True)
class Neg:
    operand: "IRExpr"
    type: ValueType = SINT


@dataclass(frozen=True)
class FdSocket:
    """`socket(fd)`: the kernel address of the socket (`struct sock`) behind file descriptor `fd`
    of the current process, 0 if `fd` is not a socket. The same number as the `skaddr`/`sk` fields
    of the tcp and sock tracepoints, so one request can be followed by its socket."""
    fd: "IRExpr"
    type: ValueType = INT


IRExpr = Union[Context, Arg, Retval, TracepointField, Duration, SpanTotal, ActiveSpan, FdSocket, Const,
               StrConst, BinOp, Cmp, StrEq, Logic, Not, Neg]


# --- layouts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """One member of a key or value struct: its type, size, offset and Python struct code agree;
    a backend spells the type (the core backend's C: __u64, __s64, __u32, char[N])."""
    name: str
    kind: str              # unsigned | signed (integers of `size` bytes) | bytes (a string, or padding)
    length: int            # number of bytes for bytes; 0 for integers
    size: int
    offset: int
    pyformat: str          # struct format of this field alone (Q, q, I, 16s, 4x)
    label: str = ""        # the label this field carries, if any


@dataclass(frozen=True)
class Layout:
    name: str              # C struct name
    fields: tuple[Field, ...]
    size: int

    @property
    def pyformat(self) -> str:
        return "<" + "".join(f.pyformat for f in self.fields)


# --- maps, metrics, events ---------------------------------------------------------------------
@dataclass(frozen=True)
class MapSpec:
    """A logical map; each backend chooses what holds it (the core backend: a BPF map type)."""
    name: str              # C identifier and bpftrace @name stem
    shape: str             # slots (indexed 0..max_entries-1) | table (by key) | ring (event records) | stacks
    key: Layout | None
    value: Layout | None
    max_entries: int
    purpose: str           # span_begin | metric | event | stacks | health


@dataclass(frozen=True)
class Label:
    name: str
    expr: IRExpr


@dataclass(frozen=True)
class Metric:
    name: str                      # the Prometheus name
    kind: str                      # counter | histogram
    help: str
    unit: str                      # seconds | bytes | ""
    scale: float                   # export value = raw * scale (ns -> s: 1e-9)
    labels: tuple[Label, ...]
    edges: tuple[int, ...]         # histogram upper edges in raw units; le=+Inf is index len(edges)
    map: MapSpec
    series_limit: int
    # Labelled metrics only (core): what keeps the kernel from losing an update past the series
    # limit. `overflow_map` holds the __overflow__ series (slots as an unlabelled metric's map),
    # `folded_map` the label sets folded into it (their number is probec_series_dropped_total),
    # `sets_map` the label sets a histogram admitted (its main map holds a slot per bucket).
    overflow_map: MapSpec | None = None
    folded_map: MapSpec | None = None
    sets_map: MapSpec | None = None
    otel_name: str = ""            # the spec named it the OpenTelemetry way (OTLP export keeps it)


@dataclass(frozen=True)
class EventField:
    name: str
    expr: IRExpr | None
    stack: str = ""                # user | kernel
    is_string: bool = False


@dataclass(frozen=True)
class Event:
    name: str
    index: int
    fields: tuple[EventField, ...]
    sample_every: int
    max_per_second: int
    record: Layout                 # ring buffer record, header included


@dataclass(frozen=True)
class SpanInfo:
    name: str
    begin_map: MapSpec


def walk(node):
    """Every IR object reachable from `node` (an expression, action or probe), parents first."""
    yield node
    if isinstance(node, (tuple, list)):
        for item in node:
            yield from walk(item)
    elif hasattr(node, "__dataclass_fields__"):
        for name in node.__dataclass_fields__:
            yield from walk(getattr(node, name))


def accumulator_maps(inner: str) -> tuple[str, str]:
    """Names of the per-thread total and count maps of an inner span."""
    return f"acc_{inner}_total", f"acc_{inner}_count"


def kept_accumulators(inner: str, is_span: bool) -> tuple[str, ...]:
    """The accumulator maps `inner` really has: total and count for a span, count alone for a
    counter (COUNTER.count is all it offers)."""
    total, count = accumulator_maps(inner)
    return (total, count) if is_span else (count,)


# --- actions -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Within:
    """The outer span `span` is open at `key` (computed here; the current thread by default)."""
    span: str
    key: IRExpr = TID


@dataclass(frozen=True)
class Guard:
    """Conditions every action may carry: a filter and `within` other open spans."""
    filter: IRExpr | None = None
    within: tuple[Within, ...] = ()


@dataclass(frozen=True)
class SpanBegin:
    span: str
    key: IRExpr
    guard: Guard
    resets: tuple[str, ...] = ()   # inner spans whose totals restart when this span begins
    restart: bool = True           # False: a begin while the span is open keeps the first one


@dataclass(frozen=True)
class MetricUpdate:
    metric: str
    value: IRExpr | None           # None: count 1
    guard: Guard
    labels: tuple[IRExpr, ...] = ()   # one per Metric.labels, typed where this update runs
    accumulate_into: Within | None = None   # a counter `within` a span that reads METRIC.count at its end


@dataclass(frozen=True)
class EmitEvent:
    event: str
    when: IRExpr | None
    guard: Guard


@dataclass(frozen=True)
class SpanEnd:
    span: str
    key: IRExpr
    then: tuple[Union[MetricUpdate, EmitEvent], ...]   # run with `duration` bound
    # The span's `within`, checked again where it ends: a span that outlived its outer one is
    # dropped there (counted as outside) instead of reaching `then` and the totals.
    inside: Within | None = None
    accumulate_into: Within | None = None   # the outer span whose totals this span's duration adds to
    clears: tuple[str, ...] = ()   # inner spans whose totals are dropped after `then`


Action = Union[SpanBegin, SpanEnd, MetricUpdate, EmitEvent]


@dataclass(frozen=True)
class Probe:
    id: str                        # unique identifier, safe for C and bpftrace
    kind: str                      # tracepoint uprobe uretprobe usdt kprobe kretprobe fentry fexit profile interval
    category: str = ""             # tracepoint category
    name: str = ""                 # tracepoint, function or USDT name
    binary: str = ""               # absolute path
    symbol: str = ""               # ELF symbol (mangled)
    offset: int = 0                # bytes past the symbol start
    provider: str = ""             # USDT provider
    rate: int = 0                  # profile: Hz; interval: period in ns
    actions: tuple[Action, ...] = ()
    group: str = ""                # alternatives: the loader attaches the first variant that works
    variant: int = 0
    spec_text: str = ""            # the address as the user wrote it (for messages)
    past_endbr64: bool = False     # `offset` is probec's placement past endbr64, not the spec's
    record_type: str = ""          # tracepoint: its BTF record type (fields read by CO-RE); "": at offsets
    span: SourceSpan | None = field(default=None, compare=False)   # where the address is written


@dataclass(frozen=True)
class Program:
    name: str
    source: str                    # the spec file's base name, for generated headers
    description: str
    probes: tuple[Probe, ...]
    spans: tuple[SpanInfo, ...]
    metrics: tuple[Metric, ...]
    events: tuple[Event, ...]
    maps: tuple[MapSpec, ...]
    ringbuf_bytes: int
    needs_stacks: bool = False
    variant_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()   # group -> variant descriptions
    host_variants: tuple[tuple[str, int], ...] = ()                # group -> variant that works here
    notes: tuple[str, ...] = field(default=())

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.name == name)

    def event(self, name: str) -> Event:
        return next(e for e in self.events if e.name == name)

    def accumulators(self, inner: str) -> tuple[str, ...]:
        """The maps kept per key of the outer span for `inner` (see kept_accumulators)."""
        return kept_accumulators(inner, any(s.name == inner for s in self.spans))

    def checked_at_end(self) -> list[str]:
        """Spans whose ends check their `within` span again (and count those that outlived it)."""
        return sorted({n.span for n in walk(self.probes) if isinstance(n, SpanEnd) and n.inside})
