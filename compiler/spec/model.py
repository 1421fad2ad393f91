"""The typed spec: what a user wrote, validated for shape, with a source span on everything.

Nothing here knows about YAML; `loader.py` builds these from YAML nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..diagnostics import SourceSpan
from ..expr.ast import Expr
from ..kinds import PROBE_KINDS as PROBE_KIND_REGISTRY

# Probe address kinds as written in a spec (compiler/kinds.py).
PROBE_KINDS = tuple(PROBE_KIND_REGISTRY)


@dataclass(frozen=True)
class ProbeAddress:
    """`uprobe:model:Inference::Forward` split into its parts.

    kind: one of PROBE_KINDS. For tracepoint: target=category, name=event. syscall*: name.
    uprobe/uretprobe: target=binary (alias or path), name=symbol, offset. usdt: target=binary,
    provider, name. kprobe/kernel/...: name=function. profile: rate in Hz. interval: period_ns.
    """
    kind: str
    text: str
    span: SourceSpan
    target: str = ""
    name: str = ""
    provider: str = ""
    offset: int | None = None     # uprobe: bytes past the symbol as written (`+0` too); None: not written
    rate: int = 0


@dataclass(frozen=True)
class SpanEndRef:
    """`inference.end`: the moment a span completes (its end probe, with `duration` known)."""
    span_name: str
    span: SourceSpan


@dataclass(frozen=True)
class SpanOpenRef:
    """`request.open`: the spans of that name open now (a gauge)."""
    span_name: str
    span: SourceSpan


@dataclass(frozen=True)
class SpanSide:
    probe: ProbeAddress
    key: Expr | None          # None: the thread id


@dataclass(frozen=True)
class WithinRef:
    """`within: request`, or `within: {span: request, key: args.skaddr}` where the outer span has
    a key of its own: the key is computed where the inner span or metric runs, and must equal the
    outer span's key for the same request."""
    name: str
    span: SourceSpan
    key: Expr | None = None   # None: the current thread
    end_key: Expr | None = None   # spans: the key where the inner span ends, if not `key`


@dataclass(frozen=True)
class SpanSpec:
    name: str
    span: SourceSpan
    begin: SpanSide
    end: SpanSide
    filter: Expr | None = None
    within: WithinRef | None = None
    fallback: tuple[SpanSide, SpanSide] | None = None
    description: str = ""
    restart: bool = True      # a begin while the span is open restarts it; False keeps the first


@dataclass(frozen=True)
class Buckets:
    kind: str                 # exp2 | linear | explicit
    edges: tuple[int, ...]    # upper edges in base units (ns, bytes or plain numbers), ascending
    dimension: str            # time | size | none
    span: SourceSpan


@dataclass(frozen=True)
class LabelSpec:
    name: str
    expr: Expr
    span: SourceSpan


@dataclass(frozen=True)
class AlertSpec:
    """`alert: p99 > 50ms for 5m` on a histogram: its quantile above a threshold for a while; or
    `alert: p99 > 3x baseline`: above a multiple of the quantile's median over the last day."""
    quantile: float                       # 0.99 for p99
    threshold: int                        # in the metric's base units (ns, bytes or plain numbers)
    dimension: str                        # time | size | none, as the threshold was written
    for_seconds: int                      # 0: fire at the first evaluation above it
    span: SourceSpan
    multiple: float = 0.0                 # > 1: a multiple of the baseline instead of a threshold


@dataclass(frozen=True)
class MetricSpec:
    name: str
    span: SourceSpan
    kind: str                             # a metric kind of compiler/kinds.py: counter | histogram | gauge
    help: str
    on: ProbeAddress | SpanEndRef | SpanOpenRef   # where the metric is updated
    value: Expr | None                     # None: count events
    filter: Expr | None
    labels: tuple[LabelSpec, ...]
    buckets: Buckets | None
    within: WithinRef | None
    unit: str = ""                         # seconds | bytes | "" (derived when not given)
    parts: tuple[tuple[str, Expr, SourceSpan], ...] = ()   # `parts:` histograms: (part, value, where)
    alert: AlertSpec | None = None         # histograms: `alert: p99 > 50ms for 5m` (probec rules)
    otel_name: str = ""                    # named the OpenTelemetry way (`name` is then Prometheus's)


@dataclass(frozen=True)
class EventField:
    name: str
    expr: Expr | None                      # None for the stacks
    stack: str = ""                        # "user" | "kernel" | ""
    span: SourceSpan | None = None


@dataclass(frozen=True)
class EventSpec:
    name: str
    span: SourceSpan
    on: ProbeAddress | SpanEndRef
    when: Expr | None
    sample_every: int                      # 1 = every event
    max_per_second: int                    # 0 = no limit
    fields: tuple[EventField, ...]


@dataclass(frozen=True)
class Limits:
    concurrency: int = 10_000
    series: int = 1_000
    ringbuf_bytes: int = 1 << 20
    span: SourceSpan | None = None


@dataclass(frozen=True)
class Binary:
    alias: str
    path: str
    span: SourceSpan
    optional: bool = False                 # a missing file is a warning, not an error


@dataclass(frozen=True)
class Spec:
    file: str
    name: str
    description: str
    binaries: dict[str, Binary] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    spans: dict[str, SpanSpec] = field(default_factory=dict)
    metrics: dict[str, MetricSpec] = field(default_factory=dict)
    events: dict[str, EventSpec] = field(default_factory=dict)
    span: SourceSpan | None = None
