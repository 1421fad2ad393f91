"""The bundle manifest: the typed, versioned contract between the compiler and the runtime.

The compiler's backends construct a `Manifest` from the IR and write it as `manifest.json`; the
runtime reads it back with `load_bundle` and never guesses a size, an offset or a map name. What
both sides must agree on beyond the JSON (the header every event record starts with) is defined
here once. This module is a leaf: it imports nothing else of probec, so a host that runs bundles
needs no compiler.

Changing a field here changes the format: raise MANIFEST_VERSION, and a bundle written by another
probec is refused with a message that says to rebuild it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path

MANIFEST_VERSION = 3
SUPPORTED_MANIFEST = MANIFEST_VERSION


class BundleError(Exception):
    """A bundle that cannot be used, with a message a person can act on."""


class ManifestError(BundleError):
    """A manifest.json that does not follow this contract."""


# --- enumerations --------------------------------------------------------------------------------
class MetricKind(StrEnum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    GAUGE = "gauge"            # a value of now (spans open), not a count since the start


class MapPurpose(StrEnum):
    """What a BPF map (or bpftrace map) holds."""
    SPAN_BEGIN = "span_begin"
    ACCUMULATOR = "accumulator"
    METRIC = "metric"
    METRIC_OVERFLOW = "metric_overflow"      # a labelled metric's __overflow__ series
    METRIC_FOLDED = "metric_folded"          # the label sets folded into it
    METRIC_SETS = "metric_sets"              # the label sets a histogram admitted
    EVENT = "event"
    STACKS = "stacks"
    HEALTH = "health"
    CGROUP_SETS = "cgroup_sets"              # cgroup id -> bits of the spec's container/pod matches


class HealthSlot(StrEnum):
    """A count the kernel side keeps besides the metrics: a slot of the core backend's health
    array, or a map of bpftrace's (the same kinds, counted the same way in both)."""
    SPAN_OVERFLOW = "span_overflow"          # span begins dropped: the begin map was full
    SPAN_OUTSIDE = "span_outside"            # span ends dropped: they outlived their `within` span
    EVENTS_LOST = "events_lost"              # ring buffer full
    EVENT_SEEN = "event_seen"                # an event's condition held (before sampling, limits)
    EVENT_RATE_LIMITED = "event_rate_limited"
    METRIC_MAP_FULL = "metric_map_full"
    UNUSED = "unused"                        # the one slot of a program that counts nothing


class MetricMapRole(StrEnum):
    """Which part of a metric a bpftrace map holds."""
    MAIN = "main"                            # counts (a histogram's: by bucket)
    SUM = "sum"                              # a histogram's sum


# --- the event record header ---------------------------------------------------------------------
@dataclass(frozen=True)
class HeaderField:
    name: str
    ctype: str
    size: int
    code: str              # Python struct code


# Every core event record starts with these, in this order; the event index comes first so the
# reader can tell which event a record is before decoding it.
EVENT_HEADER = (HeaderField("event", "__u32", 4, "I"), HeaderField("cpu", "__u32", 4, "I"),
                HeaderField("ts", "__u64", 8, "Q"), HeaderField("pid", "__u32", 4, "I"),
                HeaderField("tid", "__u32", 4, "I"))
EVENT_HEADER_NAMES = tuple(f.name for f in EVENT_HEADER)


# --- the contract --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutField:
    name: str
    ctype: str             # __u64, __s64, __u32, char
    length: int            # array length for char[N]; 0 for scalars
    size: int
    offset: int
    label: str             # the metric label this field carries, if any


@dataclass(frozen=True)
class Layout:
    name: str
    size: int
    format: str            # Python struct format of the whole layout
    fields: tuple[LayoutField, ...]


@dataclass(frozen=True)
class MapInfo:
    name: str
    type: str              # HASH, PERCPU_ARRAY, RINGBUF, TASK_STORAGE, ...
    max_entries: int
    purpose: MapPurpose
    key: Layout | None
    value: Layout | None


@dataclass(frozen=True)
class SpanInfo:
    name: str
    map: str               # the begin map (core: a HASH keyed by the span's key)
    capacity: int
    checked_at_end: bool   # ends dropped for outliving their `within` span are counted
    task_storage: bool     # core: begin times also kept in task-local storage, used where the kernel has it
    task_map: str          # core: that TASK_STORAGE map ("" when none)


@dataclass(frozen=True)
class Label:
    name: str
    type: str              # int | str
    render: str            # "" | ipv4 | enum | ...
    names: tuple[str, ...]   # an enumeration's names, by value


@dataclass(frozen=True)
class MetricInfo:
    name: str
    kind: MetricKind
    help: str
    unit: str
    scale: float
    labels: tuple[Label, ...]
    edges: tuple[int, ...]
    sum_slot: int | None   # histograms: the bucket index that carries the sum
    map: str
    series_limit: int
    overflow_map: str | None
    folded_map: str | None
    otel_name: str = ""    # named the OpenTelemetry way in the spec (`name` is the Prometheus name)

    @property
    def histogram(self) -> bool:
        return self.kind == MetricKind.HISTOGRAM

    @property
    def cumulative(self) -> bool:
        """Counts since the start, which a restart of the tracing engine carries over; a gauge
        is a value of now, which starts again with the engine (its open spans are gone)."""
        return self.kind != MetricKind.GAUGE


@dataclass(frozen=True)
class EventField:
    name: str
    kind: str              # int | str | userstack | kernelstack
    unit: str              # the value's dimension: time, none, ...
    render: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class EventInfo:
    name: str
    index: int
    sample_every: int
    max_per_second: int
    record: Layout         # core: the ring buffer record, EVENT_HEADER first
    fields: tuple[EventField, ...]


@dataclass(frozen=True)
class ProbeInfo:
    id: str
    kind: str
    category: str
    name: str
    binary: str
    symbol: str
    offset: int
    provider: str
    rate: int
    group: str
    variant: int
    address: str           # as the spec wrote it
    container: str = ""          # uprobes: also every process of containers so named (core) ...
    path_in_container: str = ""  # ... in this file, as they see it (/proc/PID/root/PATH)


@dataclass(frozen=True)
class CoreProgram:
    probe: str
    program: str
    section: str
    kind: str


@dataclass(frozen=True)
class CoreSetting:
    name: str              # a const volatile global, set before load
    size: int
    value: int


@dataclass(frozen=True)
class HealthMap:
    name: str
    slots: int


@dataclass(frozen=True)
class HealthSlotInfo:
    slot: int
    kind: HealthSlot
    name: str              # the span, event or metric it counts for ("" for all)


@dataclass(frozen=True)
class TracepointCheck:
    """A tracepoint field a core program reads: through its BTF record type (`btf_type`, member
    `member`: a CO-RE relocation that libbpf resolves at load), or, where BTF did not tell at
    build time (btf_type ""), at `offset`, checked against this kernel's tracefs before load."""
    probe: str
    tracepoint: str        # category:name
    field: str
    offset: int            # on the build host
    size: int
    btf_type: str          # trace_event_raw_..., or "" (read at the offset)
    member: str            # the member read ("args[2]", "pid"), or ""


@dataclass(frozen=True)
class RingBufferInfo:
    map: str
    bytes: int
    wakeup_bytes: int
    perf_map: str          # the PERF_EVENT_ARRAY used instead where the kernel has no ring buffer
    scratch_map: str       # a per-CPU record the perf path fills before bpf_perf_event_output


# Mechanisms chosen at load time: `const volatile` settings of every core object (1: use it). The
# runtime probes the kernel and clears a setting (and retypes the maps it leaves unused) before load.
USE_RINGBUF = "probec_use_ringbuf"              # ring buffer, else perf buffer (kernels before 5.8)
USE_TASK_STORAGE = "probec_use_task_storage"    # task-local storage, else the HASH (before 5.11)
USE_TASK_BTF = "probec_use_task_btf"            # bpf_get_current_task_btf, else bpf_get_current_task
USE_ATOMIC_FETCH = "probec_use_atomic_fetch"    # atomic fetch-and-add, else add then read (before 5.12)


@dataclass(frozen=True)
class CoreSection:
    object: str | None
    programs: tuple[CoreProgram, ...]
    settings: tuple[CoreSetting, ...]
    health_map: HealthMap
    health: tuple[HealthSlotInfo, ...]
    tracepoint_fields: tuple[TracepointCheck, ...]
    ringbuf: RingBufferInfo | None
    stack_map: str | None
    stack_depth: int
    value_signed: dict[str, bool]


@dataclass(frozen=True)
class BpftraceMetricMap:
    map: str               # as bpftrace prints it: @m_NAME
    metric: str
    role: MetricMapRole


@dataclass(frozen=True)
class BpftraceCounter:
    map: str               # a bpftrace map holding one health count
    kind: HealthSlot
    name: str


@dataclass(frozen=True)
class BpftraceSection:
    version: str
    interval_ms: int
    map_keys_max: int
    metric_maps: tuple[BpftraceMetricMap, ...]
    epoch_maps: tuple[str, ...]          # keyed by the dump epoch first
    counters: tuple[BpftraceCounter, ...]
    ready_map: str                       # set once the probes are attached; not a metric
    separator: str
    event_mark: str
    ready_mark: str
    dump_mark: str
    probes: tuple[str, ...]              # the probes the script attaches (one variant per group)


@dataclass(frozen=True)
class CgroupMatchInfo:
    bit: int               # of the cgroup map's value
    attribute: str         # container_id | pod_uid | pod | namespace | container
    value: str


@dataclass(frozen=True)
class CgroupSection:
    """The map the runtime fills with the cgroups a spec's `namespace == "serving"` comparisons
    match (bit `bit` of each cgroup's entry), and those under `probec run --cgroup PATH` (bit
    `path_bit`). The kernel side tests bits; it never sees a name."""
    map: str               # core: the BPF map's name; bpftrace: the map as the script writes it (@name)
    path_bit: int
    matches: tuple[CgroupMatchInfo, ...]


@dataclass(frozen=True)
class BccSection:
    """The bcc backend's: its C and attachments are the `core` section's, compiled at load time."""
    program: str                         # the Python program that holds the C (its PROGRAM string)
    kernel_struct_reads: tuple[str, ...]  # probes that read kernel structs through the headers (socket(fd)):
                                         # refused where the headers are not the running kernel's


@dataclass(frozen=True)
class Manifest:
    probec_manifest: int
    name: str
    spec: str
    description: str
    backend: str
    files: dict[str, str]                # role (script, source, object, ...) -> file name
    maps: tuple[MapInfo, ...]
    spans: tuple[SpanInfo, ...]
    metrics: tuple[MetricInfo, ...]
    events: tuple[EventInfo, ...]
    probes: tuple[ProbeInfo, ...]
    groups: dict[str, tuple[str, ...]]   # variant group -> its variants' labels
    core: CoreSection | None = None
    bpftrace: BpftraceSection | None = None
    cgroups: CgroupSection | None = None
    bcc: BccSection | None = None

    def to_dict(self) -> dict:
        return _encode(self)

    @classmethod
    def from_dict(cls, data, where: str = "manifest") -> "Manifest":
        """The manifest in `data` (parsed JSON), checked against this contract: a missing key, a
        value of the wrong type or an unknown enumeration value raises ManifestError naming it."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where} is not a JSON object")
        check_version(data.get("probec_manifest"), where)
        try:
            return _decode(cls, data, where)
        except ManifestError as exc:
            raise ManifestError(f"{exc}: the bundle is damaged or was not written by this probec; "
                                "rebuild it with this probec") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def map(self, name: str) -> MapInfo:
        for m in self.maps:
            if m.name == name:
                return m
        raise BundleError(f"manifest names map '{name}' but does not describe it")

    def metric(self, name: str) -> MetricInfo:
        return next(m for m in self.metrics if m.name == name)


def check_version(version, where: str = "manifest") -> None:
    if version != MANIFEST_VERSION:
        raise ManifestError(f"{where} has manifest version {version}, and this probec reads version "
                            f"{MANIFEST_VERSION}: the bundle was built by another probec; rebuild it with this probec")


# --- JSON <-> dataclasses ------------------------------------------------------------------------
def _encode(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _decode(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        return _decode(options[0], value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ManifestError(f"{where} should be a list, not {type(value).__name__}")
        item = typing.get_args(tp)[0]
        return tuple(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where} should be an object, not {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {str(k): _decode(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ManifestError(f"{where} should be an object, not {type(value).__name__}")
        hints, values = _hints(tp), {}
        for f in dataclasses.fields(tp):
            if f.name not in value:
                if f.default is not dataclasses.MISSING:
                    continue
                raise ManifestError(f"{where} has no '{f.name}'")
            values[f.name] = _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
        return tp(**values)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            known = ", ".join(m.value for m in tp)
            raise ManifestError(f"{where} is '{value}', not one of {known}") from None
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ManifestError(f"{where} should be {_type_name(tp)}, not {type(value).__name__} ({value!r:.40})")
    return value


# --- bundles -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def backend(self) -> str:
        return self.manifest.backend

    def file(self, role: str) -> Path:
        name = self.manifest.files.get(role)
        if not name:
            raise BundleError(f"bundle {self.path} has no {role} file in its manifest")
        p = self.path / name
        if not p.exists():
            raise BundleError(f"bundle {self.path} is missing {name}; rebuild it with probec build")
        return p

    def map(self, name: str) -> MapInfo:
        return self.manifest.map(name)


def load_bundle(path: str | Path) -> Bundle:
    p = Path(path)
    mf = p / "manifest.json" if p.is_dir() else p
    if not mf.exists():
        raise BundleError(f"'{path}' is not a probec bundle (no manifest.json); build one with "
                          "'probec build SPEC --backend core -o DIR'")
    try:
        data = json.loads(mf.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {mf}: {exc}") from None
    return Bundle(mf.parent, Manifest.from_dict(data, str(mf)))
