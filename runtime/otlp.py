"""`probec run --otlp URL`: the metrics Prometheus shows, and each sampled event as a span, sent
over OTLP/HTTP (protobuf) next to Prometheus.

Metrics go through the OpenTelemetry SDK: what the Prometheus collector yields (exporter.py, so
the same names, labels, buckets and health) becomes the SDK's metric data (cumulative sums,
gauges and explicit-bucket histograms with the spec's edges) and its OTLPMetricExporter sends it
every `--otlp-interval` seconds and once more at the end. Names follow OpenTelemetry: no unit
suffix and no `_total` (the unit goes in the unit field: `s`, `By`), so a receiver that
translates OTLP to Prometheus names (dots to underscores, the unit suffix, `_total` for
counters) arrives at the names /metrics shows; a spec metric named the OpenTelemetry way
(`http.server.request.duration`) keeps that name here.

Spans are encoded here, straight from the batches of rows the runners hand over, into the
protobuf of an ExportTraceServiceRequest, and posted in batches from a thread of their own: the
SDK's span objects cost about 14 us each before any export (benchmarks/otlp_events.py), which no
rate of events worth a bulk reader affords. A span starts at the event's time less its `duration`
field (an event at a span's end) and ends at the event's time, both from the kernel's
CLOCK_MONOTONIC turned to wall time; its attributes are the event's fields as the JSON lines name
them (stacks as arrays of frames), the process and thread ids.

Nothing is lost in silence: a failed export is counted in
`probec_otlp_export_failures_total{signal}`, spans that could not be sent (or queued) in
`probec_events_dropped_total{reason="otlp"}`, and both said once in the log until exports work
again.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import struct
import threading
import time

from .events import EventFormat, Memo, field_key, rendered, text_of
from .manifest import Manifest

MISSING = ("--otlp needs the OpenTelemetry SDK and its OTLP/HTTP exporter: pip install 'probec[otlp]' "
           "(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)")
EXPORT_TIMEOUT_S = 5.0       # one export, retries included; the SDK's default is 10 s
SPAN_BATCH = 4096            # spans per request at most
SPAN_LINGER_S = 0.2          # a batch waits at most this long for more spans
SPAN_QUEUE = 1 << 18         # events waiting to be sent at most (about 30 MB, 1.3 s at 200k/s); past this
                             # they are dropped and counted
SPAN_KIND_INTERNAL = 1
UNITS = {"seconds": ("_seconds", "s"), "bytes": ("_bytes", "By")}


class OtlpError(Exception):
    """--otlp cannot work here (the SDK is missing, the URL is not one)."""


def endpoint(url: str, signal: str) -> str:
    """The URL of one signal: a base URL (`http://collector:4318`) gets `/v1/traces` or
    `/v1/metrics`, as OTEL_EXPORTER_OTLP_ENDPOINT does."""
    if not url.startswith(("http://", "https://")):
        raise OtlpError(f"--otlp takes an http:// or https:// URL (the collector's OTLP/HTTP port, "
                        f"e.g. http://127.0.0.1:4318), not '{url}'")
    return f"{url.rstrip('/')}/v1/{signal}"


def otel_name(name: str, unit: str = "") -> tuple[str, str]:
    """A Prometheus name -> (OpenTelemetry name, unit): `_total` and the unit suffix come off, the
    unit goes in the unit field. A dotted name is an OpenTelemetry name already."""
    symbol = UNITS.get(unit, ("", ""))[1]
    if "." in name:
        return name, symbol
    if name.endswith("_total"):
        name = name[:-len("_total")]
    for unit_name, (suffix, sym) in UNITS.items():
        if name.endswith(suffix) and (not unit or unit == unit_name):
            return name[:-len(suffix)], sym
    return name, symbol


def resource_attributes(bundle: str, backend: str) -> dict[str, str]:
    return {"service.name": os.environ.get("OTEL_SERVICE_NAME") or bundle, "host.name": socket.gethostname(),
            "probec.bundle": bundle, "probec.backend": backend}


def wall_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC now: what turns the kernel's bpf_ktime_get_ns() into wall
    time. The reading whose two monotonic reads are closest wins."""
    best = None
    for _ in range(3):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) // 2)
    return best[1]


def quiet_sdk_logs() -> None:
    """The SDK logs every failed export; probec says it once itself (and counts them)."""
    for name in ("opentelemetry.exporter.otlp.proto.http", "opentelemetry.exporter.http",
                 "opentelemetry.sdk.metrics", "opentelemetry.exporter"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


class FailureLog:
    """Counts failed exports of one signal and says so once, and once more when they work again."""

    def __init__(self, health, signal: str, log):
        self.health = health
        self.signal = signal
        self.log = log
        self.failing = False
        health.otlp_failures.setdefault(signal, 0)

    def failed(self, why: str) -> None:
        self.health.otlp_failures[self.signal] += 1
        if not self.failing:
            self.failing = True
            self.log(f"otlp: cannot export {self.signal} ({why}); retried at every export, counted in "
                     f'probec_otlp_export_failures_total{{signal="{self.signal}"}}'
                     + ('; spans not sent in probec_events_dropped_total{reason="otlp"}'
                        if self.signal == "traces" else ""))

    def worked(self) -> None:
        if self.failing:
            self.failing = False
            self.log(f"otlp: exporting {self.signal} again ({self.health.otlp_failures[self.signal]} failed "
                     "exports in all)")


# --- metrics -------------------------------------------------------------------------------------
class MetricsExport:
    """The Prometheus collector's families -> the SDK's MetricsData -> OTLPMetricExporter."""

    def __init__(self, url: str, collector, manifest: Manifest, resource: dict, health, log):
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import MetricExportResult
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        except ImportError:
            raise OtlpError(MISSING) from None
        quiet_sdk_logs()
        self.collector = collector
        self.url = endpoint(url, "metrics")
        self.exporter = OTLPMetricExporter(endpoint=self.url, timeout=EXPORT_TIMEOUT_S)
        self.success = MetricExportResult.SUCCESS
        self.resource = Resource.create(resource)
        self.scope = InstrumentationScope("probec", _version())
        self.metas = {}
        for m in manifest.metrics:       # the family name the collector yields -> the spec's metric
            self.metas[m.name[:-len("_total")] if not m.histogram and m.name.endswith("_total") else m.name] = m
        self.start_ns = time.time_ns()
        self.failures = FailureLog(health, "metrics", log)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, interval: float) -> None:
        """Export every `interval` seconds from a thread of its own (an export may wait on the
        network for EXPORT_TIMEOUT_S)."""
        def every_interval():
            while not self.stopping.wait(interval):
                self.export()
        self.thread = threading.Thread(target=every_interval, name="probec-otlp-metrics", daemon=True)
        self.thread.start()

    def data(self):
        from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
                                                      Metric, MetricsData, NumberDataPoint, ResourceMetrics,
                                                      ScopeMetrics, Sum)
        now, start = time.time_ns(), self.start_ns
        cumulative = AggregationTemporality.CUMULATIVE
        metrics = []
        for family in self.collector.collect():
            meta = self.metas.get(family.name)
            kind = family.type
            if kind == "summary":        # the window quantiles: a Prometheus convenience
                continue
            name, unit = otel_name(meta.otel_name or family.name if meta else family.name, meta.unit if meta else "")
            if kind == "histogram":
                points = []
                for labels, (buckets, total) in _histograms(family).items():
                    bounds = [le for le, _ in buckets if le != float("inf")]
                    counts, before = [], 0
                    for _, cumulative_count in buckets:
                        counts.append(int(cumulative_count) - before)
                        before = int(cumulative_count)
                    points.append(HistogramDataPoint(dict(labels), start, now, before, total, counts, bounds,
                                                     None, None))
                data = Histogram(points, cumulative)
            else:
                points = [NumberDataPoint(dict(s.labels), start, now, _number(s.value)) for s in family.samples
                          if not s.name.endswith("_created")]
                data = Sum(points, cumulative, True) if kind == "counter" else Gauge(points)
            metrics.append(Metric(name, family.documentation, unit, data))
        return MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(self.scope, metrics, "")], "")])

    def export(self) -> bool:
        with self.lock:                  # the interval's export and the last one never overlap
            try:
                result = self.exporter.export(self.data(), timeout_millis=EXPORT_TIMEOUT_S * 1000)
            except Exception as exc:     # the SDK raises on some transport errors
                self.failures.failed(f"{type(exc).__name__}: {exc}")
                return False
            if result != self.success:
                self.failures.failed(f"{self.url} did not take them")
                return False
            self.failures.worked()
            return True

    def close(self) -> None:
        """The last export (after the runner's last read), then shut the exporter."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(EXPORT_TIMEOUT_S * 2)
        self.export()
        try:
            self.exporter.shutdown()
        except Exception:
            pass


def _number(value: float):
    return int(value) if float(value).is_integer() and abs(value) < 1 << 63 else float(value)


def _histograms(family) -> dict[tuple, tuple[list[tuple[float, float]], float]]:
    """A Prometheus histogram family's samples -> {labels: ([(le, cumulative count)...], sum)}."""
    out: dict[tuple, list] = {}
    for s in family.samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        entry = out.setdefault(labels, [[], 0.0])
        if s.name.endswith("_bucket"):
            entry[0].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_sum"):
            entry[1] = s.value
    return {k: (sorted(b), total) for k, (b, total) in out.items()}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("probec")
    except Exception:
        return ""


# --- protobuf, as much of it as spans need --------------------------------------------------------
def varint(value: int) -> bytes:
    value &= (1 << 64) - 1               # int64 as two's complement, as protobuf does
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (tag = field number << 3 | 2)."""
    return bytes((tag,)) + varint(len(payload)) + payload


def string_value(text: str) -> bytes:                    # AnyValue.string_value = 1
    return field(0x0A, text.encode("utf-8", "replace"))


def any_value(value) -> bytes:
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")  # bool_value = 2
    if isinstance(value, int):
        return b"\x18" + varint(value)                    # int_value = 3
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)         # double_value = 4
    if isinstance(value, (list, tuple)):                  # array_value = 5: ArrayValue.values = 1
        return field(0x2A, b"".join(field(0x0A, any_value(v)) for v in value))
    return string_value(str(value))


def attribute(key: str, value) -> bytes:
    """A KeyValue (key = 1, value = 2) as a repeated `attributes` field of number 9 (Span) or 1
    (Resource); the caller adds the tag."""
    return field(0x0A, key.encode()) + field(0x12, any_value(value))


def resource(attributes: dict) -> bytes:
    return b"".join(field(0x0A, attribute(k, v)) for k, v in attributes.items())


class SpanEncoder:
    """One event's rows -> encoded Span messages (each with its tag and length, ready to join).

    Everything loops in C over the batch's columns (`map` over struct packers and dict lookups):
    the parts that repeat are encoded once (the name and kind, every attribute key, each distinct
    value of a field whose values repeat: pid, comm, a stack), times and ids are packed at fixed
    width."""

    IDS = struct.Struct("16s8s")
    # trace_id = 1, span_id = 2 (bytes); start_time_unix_nano = 7, end_time_unix_nano = 8 (fixed64)
    FIXED = struct.Struct("<2s16s2s8sBQBQ")

    def __init__(self, fmt: EventFormat):
        self.format = fmt
        self.duration_at = fmt.duration_at
        self.head = field(0x2A, fmt.name.encode()) + bytes((0x30, SPAN_KIND_INTERNAL))   # name = 5, kind = 6
        self.attributes = [(1, self.column("process.pid", None)), (2, self.column("thread.id", None)),
                           (3, self.column("cpu.logical_number", None))]
        self.attributes += [(at, self.column(field_key(f), f)) for at, f in enumerate(fmt.fields, start=4)]
        self.lengths = Memo(varint)

    @staticmethod
    def column(key: str, f):
        """A column of field `f`'s values -> their encoded attributes (Span.attributes = 9)."""
        if f is not None and f.unit == "time" and not f.render:
            # a double: the same length every time, so one prefix before 8 packed bytes
            prefix = field(0x4A, attribute(key, 0.0))[:-8]
            pack = struct.Struct(f"<{len(prefix)}sd").pack
            return lambda ns: map(pack, itertools.repeat(prefix), map((1e9).__rtruediv__, ns))
        if f is not None and f.kind.endswith("stack"):
            memo = Memo(lambda frames: field(0x4A, attribute(key, list(frames))))
            return lambda stacks: map(memo.__getitem__, map(tuple, stacks))
        if f is not None and f.kind == "str":
            memo = Memo(lambda raw: field(0x4A, attribute(key, text_of(raw))))
        elif f is not None and f.render:
            memo = Memo(lambda raw: field(0x4A, attribute(key, rendered(raw, f))))
        else:
            memo = Memo(lambda value: field(0x4A, attribute(key, value)))
        return lambda values: map(memo.__getitem__, values)

    def spans(self, rows: list[tuple], offset_ns: int) -> list[bytes]:
        n = len(rows)
        if not n:
            return []
        repeat = itertools.repeat
        cols = list(zip(*rows))
        ends = list(map(offset_ns.__add__, cols[0]))
        starts = ends if self.duration_at is None else list(map(int.__sub__, ends, cols[self.duration_at]))
        trace_ids, span_ids = zip(*self.IDS.iter_unpack(os.urandom(24 * n)))
        fixed = map(self.FIXED.pack, repeat(b"\x0a\x10", n), trace_ids, repeat(b"\x12\x08", n), span_ids,
                    repeat(0x39, n), starts, repeat(0x41, n), ends)
        parts = [fixed, repeat(self.head, n)] + [encode(cols[at]) for at, encode in self.attributes]
        bodies = list(map(b"".join, zip(*parts)))
        heads = map(b"\x12".__add__, map(self.lengths.__getitem__, map(len, bodies)))   # ScopeSpans.spans = 2
        return list(map(bytes.__add__, heads, bodies))


class SpanExport:
    """Rows of events -> spans, encoded and posted in batches from a thread of its own, so the
    ring's reader never waits on the network."""

    def __init__(self, url: str, manifest: Manifest, resource_attrs: dict, health, log):
        try:
            import requests
        except ImportError:
            raise OtlpError(MISSING) from None
        self.url = endpoint(url, "traces")
        self.session = requests.Session()
        self.encoders = {e.index: SpanEncoder(EventFormat(e)) for e in manifest.events}
        self.health = health
        self.failures = FailureLog(health, "traces", log)
        self.resource = field(0x0A, resource(resource_attrs))                 # ResourceSpans.resource = 1
        self.scope = field(0x0A, field(0x0A, b"probec") + field(0x12, _version().encode()))  # ScopeSpans.scope
        self.queue: collections.deque = collections.deque()
        self.queued = 0
        self.sent = 0
        self.dropped = 0
        self.behind = False                # the queue is full: said once per stretch
        self.log = log
        self.wake = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self.run, name="probec-otlp-spans", daemon=True)
        self.thread.start()

    def add(self, index: int, rows: list[tuple]) -> None:
        with self.wake:
            if self.queued + len(rows) > SPAN_QUEUE:
                self.drop(len(rows))
                if not self.behind:
                    self.behind = True
                    self.log(f"otlp: more than {SPAN_QUEUE} events wait to be sent as spans (the receiver is slower "
                             'than the events); dropping the rest, counted in probec_events_dropped_total{reason="otlp"}')
                return
            self.behind = False
            self.queue.append((index, rows))
            self.queued += len(rows)
            if self.queued >= SPAN_BATCH:
                self.wake.notify()

    def drop(self, count: int) -> None:
        self.dropped += count
        self.health.events_unsent = self.dropped

    def run(self) -> None:
        while True:
            with self.wake:
                if not self.closing and self.queued < SPAN_BATCH:
                    self.wake.wait(SPAN_LINGER_S)
                batches, self.queue, self.queued = list(self.queue), collections.deque(), 0
                closing = self.closing
            if batches:
                self.send(batches)
            if closing and not batches:
                return

    def send(self, batches: list[tuple[int, list[tuple]]]) -> None:
        offset = wall_offset_ns()
        spans: list[bytes] = []
        for index, rows in batches:
            encoder = self.encoders.get(index)
            if encoder is not None:
                spans += encoder.spans(rows, offset)
        for i in range(0, len(spans), SPAN_BATCH):
            self.post(spans[i:i + SPAN_BATCH])

    def post(self, spans: list[bytes]) -> None:
        scope_spans = field(0x12, self.scope + b"".join(spans))                # ResourceSpans.scope_spans = 2
        body = field(0x0A, self.resource + scope_spans)                        # request.resource_spans = 1
        why = None
        for attempt in range(2):
            try:
                reply = self.session.post(self.url, data=body, timeout=EXPORT_TIMEOUT_S,
                                          headers={"Content-Type": "application/x-protobuf"})
            except Exception as exc:     # refused, reset, timed out
                why = f"{type(exc).__name__}: {exc}"
            else:
                if reply.status_code < 300:
                    self.sent += len(spans)
                    self.failures.worked()
                    return
                why = f"HTTP {reply.status_code} from {self.url}"
                if reply.status_code not in (429, 502, 503, 504):
                    break
            if attempt == 0:
                time.sleep(0.5)
        self.failures.failed(why)
        self.drop(len(spans))

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued, then stop the thread (waiting at most `timeout`)."""
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join(timeout)
        self.session.close()


def open_otlp(url: str, collector, manifest: Manifest, bundle: str, backend: str, health, log):
    """The two exports of `probec run --otlp URL`: (MetricsExport, SpanExport or None when the
    bundle has no events). Raises OtlpError with what to do when the SDK is missing."""
    endpoint(url, "metrics")
    attrs = resource_attributes(bundle, backend)
    metrics = MetricsExport(url, collector, manifest, attrs, health, log)
    spans = SpanExport(url, manifest, attrs, health, log) if manifest.events else None
    return metrics, spans
