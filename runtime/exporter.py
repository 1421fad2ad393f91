"""Prometheus exposition of a MetricStore: the spec's metrics, window quantiles, and health."""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .events import rendered
from .manifest import Label, MetricInfo, MetricKind
from .store import HistogramSeries, MetricStore, quantile, quantile_labels

QUANTILES = (0.5, 0.95, 0.99)
LISTEN_BACKLOG = 128        # connections the kernel queues before accept(); Python's default is 5,
                            # and past it a scraper's connection waits a second for its SYN again


def format_edge(value: float) -> str:
    text = repr(float(f"{value:.12g}"))
    return text[:-2] if text.endswith(".0") else text


def label_text(value, spec: Label) -> str:
    """A label value as text (addresses and enumerations rendered, see events.rendered)."""
    return str(rendered(value, spec))


class StoreCollector:
    def __init__(self, store: MetricStore, bundle_name: str, backend: str):
        self.store = store
        self.bundle = bundle_name
        self.backend = backend

    def collect(self):
        snap = self.store.snapshot()
        for name, state in snap.items():
            yield from self.FAMILIES[state.meta.kind](self, name, state.meta, state.series)
        yield from self.health(snap)

    def histogram(self, name: str, meta: MetricInfo, series_by_labels: dict):
        edges = [e * meta.scale for e in meta.edges]
        fam = HistogramMetricFamily(name, meta.help, labels=[lab.name for lab in meta.labels])
        for key, series in sorted(series_by_labels.items(), key=lambda kv: str(kv[0])):
            assert isinstance(series, HistogramSeries)
            cumulative, out = 0, []
            for edge, count in zip(edges + [float("inf")], series.buckets):
                cumulative += count
                out.append((format_edge(edge) if edge != float("inf") else "+Inf", cumulative))
            fam.add_metric([label_text(k, s) for k, s in zip(key, meta.labels)], out, series.sum * meta.scale)
        yield fam
        yield self.window(name, meta, edges)

    def counter(self, name: str, meta: MetricInfo, series_by_labels: dict):
        base = name[:-6] if name.endswith("_total") else name
        fam = CounterMetricFamily(base, meta.help, labels=[lab.name for lab in meta.labels])
        for key, value in sorted(series_by_labels.items(), key=lambda kv: str(kv[0])):
            fam.add_metric([label_text(k, s) for k, s in zip(key, meta.labels)],
                           value * meta.scale if meta.scale != 1 else value)
        yield fam

    def gauge(self, name: str, meta: MetricInfo, series_by_labels: dict):
        """A value of now: 0 is a value too (the readers keep only series that are not 0)."""
        fam = GaugeMetricFamily(name, meta.help, labels=[lab.name for lab in meta.labels])
        for key, value in sorted((series_by_labels or ({(): 0} if not meta.labels else {})).items(),
                                 key=lambda kv: str(kv[0])):
            fam.add_metric([label_text(k, s) for k, s in zip(key, meta.labels)], value * meta.scale)
        yield fam

    # How each metric kind is exported.
    FAMILIES = {MetricKind.HISTOGRAM: histogram, MetricKind.COUNTER: counter, MetricKind.GAUGE: gauge}

    def window(self, name: str, meta: MetricInfo, edges: list[float]) -> Metric:
        """The histogram's quantiles over the last `--window` seconds, as a summary family
        NAME_window{quantile=...}: Prometheus reserves the `quantile` label for summaries. It
        carries quantiles only; the counts and sums are the histogram's own."""
        by = quantile_labels(meta)
        fam = Metric(f"{name}_window", f"{meta.help} (quantiles over the last {self.store.window_s:g}s, "
                     "interpolated within buckets)", "summary")
        for group, window in sorted(self.store.window_buckets(name).items(), key=lambda kv: str(kv[0])):
            labels = {lab.name: label_text(v, lab) for v, (_, lab) in zip(group, by)}
            for q in QUANTILES:
                v = quantile(q, edges, window)
                if v is not None:
                    fam.add_sample(fam.name, {**labels, "quantile": format_edge(q)}, v)
        return fam

    def health(self, snap):
        h = self.store.health
        up = GaugeMetricFamily("probec_up", "1 while the probes are attached and being read.",
                               labels=["bundle", "backend"])
        up.add_metric([self.bundle, self.backend], h.up)
        yield up

        def counter(name, help_text, label=None, values=None, value=None):
            fam = CounterMetricFamily(name, help_text, labels=[label] if label else [])
            if label:
                for k, v in sorted((values or {}).items()):
                    fam.add_metric([k], v)
            else:
                fam.add_metric([], value)
            return fam

        def gauge(name, help_text, label, values):
            fam = GaugeMetricFamily(name, help_text, labels=[label])
            for k, v in sorted(values.items()):
                fam.add_metric([k], v)
            return fam

        yield counter("probec_events_lost", "Events the kernel could not hand to user space.", value=h.events_lost)
        yield counter("probec_events", "Events whose condition held, before sampling and rate limits.", "event", h.events_emitted)
        yield counter("probec_events_rate_limited", "Events held back by the spec's rate limit.", "event",
                      h.events_rate_limited)
        yield counter("probec_backend_restarts", "Times the tracing engine was restarted.", value=h.backend_restarts)
        yield counter("probec_backend_gap_seconds", "Seconds in which nothing was counted because the tracing "
                      "engine was restarting: from the last whole map dump of the engine that died to the "
                      "attachment of the next. Events in them are in no metric.", value=h.backend_gap_seconds)
        dropped = CounterMetricFamily("probec_events_dropped", "Events decoded but not kept, by reason: "
                                      "write = the --events file could not be written (disk full); otlp = "
                                      "not sent as spans over --otlp (the receiver failed or fell behind).",
                                      labels=["reason"])
        dropped.add_metric(["write"], h.events_unwritten)
        if h.otlp_failures:
            dropped.add_metric(["otlp"], h.events_unsent)
        yield dropped
        if h.otlp_failures:
            yield counter("probec_otlp_export_failures", "OTLP exports (--otlp) that failed, by signal: metrics or "
                          "traces; what failed is sent again at the next export (metrics) or dropped and "
                          'counted in probec_events_dropped_total{reason="otlp"} (spans).', "signal",
                          h.otlp_failures)
        yield counter("probec_backend_errors", "Error lines or failures from the tracing engine.",
                      value=h.backend_errors)
        yield counter("probec_decode_errors", "Map entries or events that could not be decoded.",
                      value=h.decode_errors)
        yield counter("probec_span_begin_overflow", "Span begins dropped because the begin map was full.",
                      "span", h.span_overflows)
        if h.span_outside:
            yield counter("probec_span_outside", "Span ends dropped because the span's `within` span had closed "
                          "before them: the end of an earlier stretch was never delivered (a lost event), "
                          "so this one would cover time outside it.", "span", h.span_outside)
        yield counter("probec_series_dropped", "Label sets folded into __overflow__ by the series limit.",
                      "metric", {n: s.dropped_series for n, s in snap.items() if s.meta.labels})
        expired = {n: len(s.expired) for n, s in snap.items() if s.meta.labels}
        if self.store.cgroups is not None:
            yield counter("probec_series_expired", "Label sets dropped because their container's cgroup was gone "
                          "for longer than the grace period (--cgroup-grace).", "metric", expired)
        if h.kubelet_up is not None:
            yield GaugeMetricFamily("probec_kubelet_up", "1 while the kubelet's pod list (--kubelet) answers; 0: "
                                    "pod, namespace and container labels of new pods stay empty.", value=h.kubelet_up)
            yield counter("probec_kubelet_errors", "Reads of the kubelet's pod list that failed.",
                          value=h.kubelet_errors)
        if h.container_files:
            yield counter("probec_container_files_attached", "Files inside containers the probes were attached "
                          "to after start (a container of that name started with a file not seen before).",
                          "container", h.container_files)
        if h.cgroups_marked is not None:
            yield GaugeMetricFamily("probec_cgroups_marked", "Cgroups marked in the kernel's cgroup map for the "
                                    "spec's container and pod filters and --cgroup.", value=h.cgroups_marked)
        yield gauge("probec_map_entries", "Entries in each BPF map at the last read.", "map", h.map_entries)
        yield gauge("probec_map_capacity", "Capacity (max_entries) of each BPF map.", "map", h.map_capacity)
        yield gauge("probec_probe_attached", "1 for each probe attached.", "probe", h.attached)
        if h.probe_reattached:
            yield counter("probec_probe_reattached", "Times a probe was attached again because its binary was "
                          "replaced on disk (a new file at its path).", "probe", h.probe_reattached)
            yield counter("probec_binary_rewritten", "Times a traced binary was changed in place (same inode): "
                          "running processes may crash and probes may count wrong; replace files instead.",
                          "binary", h.binary_rewritten)
        if h.target_pid is not None:
            yield GaugeMetricFamily("probec_target_up", "1 while the traced process (--pid, --pid-file) runs.",
                                    value=h.target_up)
            yield GaugeMetricFamily("probec_target_pid", "The process id traced (--pid, --pid-file).",
                                    value=h.target_pid)
            yield counter("probec_target_exits", "Times the traced process exited.", value=h.target_exits)
        if h.program_missed:
            yield counter("probec_program_missed", "Runs of each BPF program the kernel skipped because another "
                          "BPF program was running on that CPU: spans may have lost a begin or an end.", "probe",
                          h.program_missed)
        if h.program_runs:
            yield counter("probec_program_runs", "Runs of each BPF program (kernel BPF stats).", "probe",
                          h.program_runs)
            yield counter("probec_program_run_seconds", "Time spent in each BPF program (kernel BPF stats).",
                          "probe", {k: v / 1e9 for k, v in h.program_run_ns.items()})
        if h.mechanisms:
            mech = GaugeMetricFamily("probec_mechanism", "1 for the mechanism each feature uses on this kernel, "
                                     "chosen at load (core: events ring_buffer or perf_buffer, span_begin_times "
                                     "task_storage or hash, tracepoint_fields btf or offsets, current_task, event_counters "
                                     "atomic_fetch_add or add_then_read; span_NAME: the variant of a kernel: span).",
                                     labels=["feature", "mechanism"])
            for feature, mechanism in sorted(h.mechanisms.items()):
                mech.add_metric([feature, mechanism], 1)
            yield mech
        yield GaugeMetricFamily("probec_last_read_seconds", "How long the last map read took.",
                                value=h.last_read_seconds)


class MetricsServer(ThreadingMixIn, WSGIServer):
    """/metrics over HTTP: a thread per request, and a listen backlog that takes a burst of
    scrapers at once."""
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):   # a scrape is not news
        pass


class Exporter:
    def __init__(self, store: MetricStore | None = None, bundle_name: str = "", backend: str = "", collector=None):
        """One bundle's store, or any `collector` (runtime/collector.py's, for several)."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = collector or StoreCollector(store, bundle_name, backend)
        self.registry.register(self.collector)
        self.server: MetricsServer | None = None

    def serve(self, address: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port (useful with port 0)."""
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (MetricsServer,), {"address_family": family})
        self.server = make_server(address, port, make_wsgi_app(self.registry), server_class,
                                  handler_class=QuietHandler)
        threading.Thread(target=self.server.serve_forever, name="probec-http", daemon=True).start()
        return self.server.server_address[1]

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
