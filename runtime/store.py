"""The runtime's view of the kernel's aggregates: one snapshot per metric, replaced on every read.

Both backends feed the same store, so both export the same names, labels and buckets.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from .manifest import Label, Manifest, MetricInfo

OVERFLOW = "__overflow__"
MERGE_S = 0.25      # history points closer than this are one read


@dataclass
class HistogramSeries:
    buckets: list[int]        # non-cumulative counts, len(edges) + 1 (the last is +Inf)
    sum: int = 0

    @property
    def count(self) -> int:
        return sum(self.buckets)


@dataclass
class MetricState:
    meta: MetricInfo
    series: dict[tuple, object] = field(default_factory=dict)   # labels -> int | HistogramSeries
    dropped_series: int = 0
    kept: set = field(default_factory=set)        # the label sets within limits.series, once in, kept
    folded: set = field(default_factory=set)      # the label sets past it that the runtime folded


@dataclass
class Health:
    """Self-metrics: what a person needs to trust the numbers."""
    events_lost: int = 0
    events_emitted: dict[str, int] = field(default_factory=collections.Counter)
    events_rate_limited: dict[str, int] = field(default_factory=collections.Counter)
    events_written: int = 0
    backend_restarts: int = 0
    backend_gap_seconds: float = 0.0    # time nothing was counted: engine restarts
    events_unwritten: int = 0           # events decoded but not written to --events
    events_unsent: int = 0              # events not sent as spans over --otlp
    otlp_failures: dict[str, int] = field(default_factory=dict)   # failed OTLP exports, by signal
    backend_errors: int = 0
    decode_errors: int = 0
    map_entries: dict[str, int] = field(default_factory=dict)
    map_capacity: dict[str, int] = field(default_factory=dict)
    span_overflows: dict[str, int] = field(default_factory=dict)
    span_outside: dict[str, int] = field(default_factory=dict)   # ends dropped: outlived their `within`
    attached: dict[str, int] = field(default_factory=dict)
    probe_reattached: dict[str, int] = field(default_factory=dict)   # to a new file at the binary's path
    binary_rewritten: dict[str, int] = field(default_factory=dict)   # changed in place (same inode)
    target_pid: int | None = None       # --pid / --pid-file: the process traced (None: every process)
    target_up: int = 0
    target_exits: int = 0
    program_run_ns: dict[str, int] = field(default_factory=dict)
    program_runs: dict[str, int] = field(default_factory=dict)
    program_missed: dict[str, int] = field(default_factory=dict)
    mechanisms: dict[str, str] = field(default_factory=dict)   # core: feature -> what it uses on this kernel
    last_read_seconds: float = 0.0
    reads: int = 0
    up: int = 0


class MetricStore:
    def __init__(self, manifest: Manifest, window_s: float = 60.0, log=None):
        self.lock = threading.Lock()
        self.log = log
        self.metrics = {m.name: MetricState(m) for m in manifest.metrics}
        self.health = Health()
        self.window_s = window_s
        # Starts with an empty baseline, so a window shorter than the run so far covers everything.
        self.history: collections.deque = collections.deque([(time.monotonic(), {})])

    def replace(self, name: str, series: dict[tuple, object], overflow=None, folded: int = 0) -> None:
        """Install a full snapshot of one metric, holding it to limits.series label sets.

        The first label sets seen stay (those first seen in one read, heaviest first); the later
        ones fold into one series labelled __overflow__, and their number is dropped_series. The
        core backend's kernel side does the same before the runtime sees them: it hands over its
        `overflow` series and the number of label sets it `folded`.
        """
        state = self.metrics[name]
        limit = state.meta.series_limit
        if state.meta.labels:
            overflow_key = tuple(OVERFLOW for _ in state.meta.labels)
            kept = state.kept
            series = dict(series)
            rest = [series.pop(overflow_key)] if overflow_key in series else []   # carried over a restart
            fresh = sorted((k for k in series if k not in kept), key=lambda k: (-_weight(series[k]), str(k)))
            kept.update(fresh[: max(0, limit - len(kept))])
            rest += [v for k, v in series.items() if k not in kept]
            if overflow is not None:
                rest.append(overflow)
            # ever folded, not folded now: a restarted bpftrace shows a label set again only when it
            # comes back, and the count must not go down meanwhile
            state.folded.update(k for k in series if k not in kept)
            folded += len(state.folded)
            series = {k: v for k, v in series.items() if k in kept}
            if rest:
                series[overflow_key] = _merge(rest)
            if folded and not state.dropped_series and self.log is not None:
                self.log(f"metric {name}: more than limits.series ({limit}) label sets; the rest fold into "
                         f"'{OVERFLOW}' (counted in probec_series_dropped_total)")
            state.dropped_series = folded
        with self.lock:
            state.series = series

    def snapshot(self) -> dict[str, MetricState]:
        with self.lock:
            return {n: MetricState(s.meta, dict(s.series), s.dropped_series, s.kept, s.folded) for n, s in self.metrics.items()}

    def remember(self, now: float | None = None) -> None:
        """Keep histogram totals over time, for quantiles over a window: one per value of the
        metric's enumeration labels (`part`, an `active(...)` label), all other labels merged."""
        now = time.monotonic() if now is None else now
        totals = {}
        with self.lock:
            for name, state in self.metrics.items():
                if state.meta.histogram and state.series:
                    groups: dict[tuple, list] = {}
                    by = quantile_labels(state.meta)
                    for key, series in state.series.items():
                        groups.setdefault(tuple(key[i] for i, _ in by), []).append(series)
                    totals[name] = {g: _merge(v).buckets[:] for g, v in groups.items()}
            if len(self.history) > 1 and now - self.history[-1][0] < MERGE_S:
                self.history[-1] = (now, totals)     # one dump arrives as several map messages
            else:
                self.history.append((now, totals))
            while len(self.history) > 2 and now - self.history[1][0] >= self.window_s:
                self.history.popleft()

    def window_buckets(self, name: str) -> dict[tuple, list[int]]:
        """Bucket counts over the window, by the values of the metric's quantile labels."""
        with self.lock:
            if not self.history:
                return {}
            newest = self.history[-1][1].get(name) or {}
            oldest = (self.history[0][1].get(name) if len(self.history) > 1 else None) or {}
        out = {}
        for group, buckets in newest.items():
            before = oldest.get(group)
            out[group] = buckets if before is None else [a - b for a, b in zip(buckets, before)]
        return out


def quantile_labels(meta: MetricInfo) -> list[tuple[int, Label]]:
    """The labels window quantiles are kept apart by: (index, label) of each enumeration label.
    Quantiles merged over the parts of a request would mean nothing; over threads or hosts they do."""
    return [(i, lab) for i, lab in enumerate(meta.labels) if lab.render == "enum"]


def _weight(value) -> int:
    return value.count if isinstance(value, HistogramSeries) else int(value)


def _merge(values: list):
    if values and isinstance(values[0], HistogramSeries):
        out = HistogramSeries([0] * len(values[0].buckets))
        for v in values:
            out.buckets = [a + b for a, b in zip(out.buckets, v.buckets)]
            out.sum += v.sum
        return out
    return sum(int(v) for v in values)


def quantile(q: float, edges: list[float], buckets: list[int]) -> float | None:
    """Estimate a quantile from non-cumulative bucket counts, interpolating inside the bucket
    as Prometheus's histogram_quantile does. None when there are no observations."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for i, count in enumerate(buckets):
        if cumulative + count >= rank and count > 0:
            if i >= len(edges):
                return edges[-1] if edges else None
            lower = edges[i - 1] if i > 0 else min(0.0, edges[0])
            upper = edges[i]
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return edges[-1] if edges else None
