"""Parity of a prototype (bpftrace) and a production collector (core) over one window.

Pure data in, a verdict out: the snapshots each collector's store showed at the two edges of the
window, and what the compiler knows about each metric (which probes the prototype had to place
at a function's entry). No kernel, no runner: the unit tests feed it recorded snapshots.

An edge is three readings. The prototype's is one whole bpftrace dump, which stands for every
update up to the instant it froze its epoch (T). The core collector is read once before T and
once after it (`core_before`, `core_after`). A series that did not move between those two reads
was quiet at the edge: its count at T is known exactly. One that moved is known to lie between
them, so over the window core's count lies in [before(end) - after(start), after(end) -
before(start)], and the prototype's must fall in that bracket (a point when both edges are quiet).

Tolerances, per metric:
- counters and histogram counts: exact (inside the bracket);
- gauges (spans open now): their values at the window's end, exact (inside the bracket);
- histogram buckets: the k-th smallest observation of one collector and the k-th smallest of the
  other may sit one bucket apart, not further (but for 1 in STRAGGLERS, at least one). Running
  side by side, each collector's clock reads at a probe come before or after the other's
  program there, so a microsecond-scale span in one includes the other's program time (a few
  microseconds of bpftrace's), and a prototype's uprobe may sit at the entry where core's sits
  past `endbr64`;
- quantiles p50, p95, p99 of the window: in the same bucket or the next one.
A metric with an `__overflow__` series is compared by its total over all series: which label
sets each collector kept below limits.series may differ (bpftrace's runtime keeps the heaviest
of its first read, core's kernel side the first seen), the sum may not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OVERFLOW = "__overflow__"
QUANTILES = (0.5, 0.95, 0.99)
# 1 observation in this many (at least one) may lie further than one bucket away: running side by
# side, each collector's clock reads at a probe come before or after the other's program there,
# and an interrupt or a slow map update in that program moves one observation anywhere.
STRAGGLERS = 100


@dataclass
class Hist:
    """One histogram series: non-cumulative bucket counts (the last is +Inf) and the raw sum."""
    buckets: list[int]
    sum: int = 0

    @property
    def count(self) -> int:
        return sum(self.buckets)


# metric -> label values (as exported, text) -> count | Hist
Snapshot = dict[str, dict[tuple[str, ...], object]]


@dataclass
class Edge:
    prototype: Snapshot
    core_before: Snapshot
    core_after: Snapshot
    health: dict[str, dict] = field(default_factory=dict)   # backend -> health counters (health_record)
    paused: bool = False            # the traced process was stopped across the edge
    flipped_ns: int = 0             # the instant the prototype's dump stands for
    core_read_ns: tuple[int, int] = (0, 0)   # when the two core reads ended / began (before, after)


@dataclass(frozen=True)
class MetricFacts:
    """What the compiler knows about one metric, for the reasons a report gives."""
    name: str
    kind: str                       # counter | histogram | gauge
    labels: tuple[str, ...] = ()
    edges: tuple[str, ...] = ()     # the `le` of each bucket as exported, +Inf left out
    map: str = ""                   # the metric's map (bpftrace: the same name)
    at_entry: tuple[str, ...] = ()  # probes the prototype places at the entry, core past endbr64
    spans: tuple[str, ...] = ()     # spans whose ends update it (begin overflows lose its updates)


@dataclass
class SeriesResult:
    labels: dict[str, str]
    prototype: int
    core: int                       # core over the window as read before each edge's instant
    low: int                        # the bracket core's count at the prototype's instants lies in
    high: int
    buckets: list[dict] = field(default_factory=list)       # histograms: le, prototype, core, low, high
    moved: int = 0                  # observations in another bucket in the other collector
    far: int = 0                    # of them, more than one bucket away (stragglers)
    quantiles: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class MetricResult:
    name: str
    kind: str
    series: list[SeriesResult] = field(default_factory=list)
    compared_by_total: bool = False
    why: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.series)

    @property
    def verdict(self) -> str:
        if not self.ok:
            return "differs"
        if any(s.moved or s.low != s.high for s in self.series):
            return "within tolerance"
        return "exact"


@dataclass
class Parity:
    metrics: list[MetricResult]
    notes: list[str] = field(default_factory=list)
    window_s: float = 0.0
    events: dict[str, dict] = field(default_factory=dict)    # event -> {prototype, core} seen

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.metrics)


# --- reading the snapshots ---------------------------------------------------------------------
def _zero(like) -> object:
    return Hist([0] * len(like.buckets)) if isinstance(like, Hist) else 0


def _minus(a, b):
    if isinstance(a, Hist) or isinstance(b, Hist):
        a = a if isinstance(a, Hist) else _zero(b)
        b = b if isinstance(b, Hist) else _zero(a)
        return Hist([x - y for x, y in zip(a.buckets, b.buckets)], a.sum - b.sum)
    return int(a) - int(b)


def _total(series: dict) -> object:
    values = list(series.values())
    if not values:
        return 0
    if isinstance(values[0], Hist):
        out = Hist([0] * len(values[0].buckets))
        for v in values:
            out.buckets = [x + y for x, y in zip(out.buckets, v.buckets)]
            out.sum += v.sum
        return out
    return sum(int(v) for v in values)


def _counts(value) -> list[int]:
    return list(value.buckets) if isinstance(value, Hist) else [int(value)]


def bucket_distances(have: list[int], want: list[int]) -> dict[int, int] | None:
    """Pair the k-th smallest observation of `have` with the k-th smallest of `want` (same total)
    and count the pairs by how many buckets apart they are; None when the totals differ. On a
    line this pairing is the one that keeps the largest distance smallest."""
    if sum(have) != sum(want) or len(have) != len(want):
        return None
    out: dict[int, int] = {}
    i = j = 0
    left_h, left_w = (have[0] if have else 0), (want[0] if want else 0)
    while i < len(have) and j < len(want):
        if left_h == 0:
            i += 1
            left_h = have[i] if i < len(have) else 0
            continue
        if left_w == 0:
            j += 1
            left_w = want[j] if j < len(want) else 0
            continue
        n = min(left_h, left_w)
        out[abs(i - j)] = out.get(abs(i - j), 0) + n
        left_h -= n
        left_w -= n
    return out


def one_bucket_moves(have: list[int], want: list[int]) -> int | None:
    """How many observations sit one bucket apart in `have` and `want`; None when one must sit
    further (or the totals differ)."""
    distances = bucket_distances(have, want)
    if distances is None or any(d > 1 for d in distances):
        return None
    return distances.get(1, 0)


def stragglers_allowed(count: int) -> int:
    """Observations that may sit further than one bucket away: 1 in STRAGGLERS, at least one."""
    return max(1, count // STRAGGLERS)


def quantile_bucket(q: float, buckets: list[int]) -> int | None:
    """The index of the bucket holding the q-quantile (where the cumulative count reaches q x total)."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank, cumulative = q * total, 0
    for i, n in enumerate(buckets):
        cumulative += n
        if n > 0 and cumulative >= rank:
            return i
    return len(buckets) - 1


def _fit(want: list[int], low: list[int], high: list[int]) -> list[int]:
    """Core's buckets as near `want` as the edge brackets allow, with want's total where it can:
    each clamped into its bracket, then the rest of the total placed in the buckets nearest to
    those still short (or taken from those nearest to those still over)."""
    have = [min(max(w, lo), hi) for w, lo, hi in zip(want, low, high)]
    gap = sum(want) - sum(have)
    order = sorted(range(len(have)), key=lambda i: min((abs(i - j) for j in range(len(have))
                                                         if (want[j] - have[j]) * gap > 0), default=0))
    for i in order:
        if gap == 0:
            break
        room = (high[i] - have[i]) if gap > 0 else (low[i] - have[i])
        step = max(min(gap, room), 0) if gap > 0 else min(max(gap, room), 0)
        have[i] += step
        gap -= step
    return have


# --- comparing ---------------------------------------------------------------------------------
def compare(facts: list[MetricFacts], start: Edge, end: Edge) -> Parity:
    results = []
    for m in facts:
        results.append(_compare_metric(m, start, end))
    parity = Parity(results)
    _health_notes(parity, facts, start, end)
    return parity


def _window(m: MetricFacts, start: Edge, end: Edge):
    """Per series: the prototype's window, core's (read before each edge's instant), and the
    bracket core's window at the prototype's instants lies in."""
    names = set()
    snaps = (start.prototype, end.prototype, start.core_before, start.core_after, end.core_before,
             end.core_after)
    for s in snaps:
        names.update(s.get(m.name, {}))
    by_total = any(OVERFLOW in key for key in names)
    out = {}
    keys = [()] if by_total else sorted(names)    # by_total: one row, the metric's total

    def get(snap, key):
        series = snap.get(m.name, {})
        if by_total:
            return _total(series)
        return series.get(key, 0)

    for key in keys:
        values = [get(s, key) for s in snaps]
        like = next((v for v in values if isinstance(v, Hist)), None)
        if like is not None:
            values = [v if isinstance(v, Hist) else _zero(like) for v in values]
        p0, p1, a0, b0, a1, b1 = values
        if m.kind == "gauge":       # a value of now (spans open): compared at the window's end
            out[key] = (int(p1), int(a1), min(int(a1), int(b1)), max(int(a1), int(b1)))
            continue
        proto = _minus(p1, p0)
        core = _minus(a1, a0)
        low = _minus(a1, b0)
        high = _minus(b1, a0)
        out[key] = (proto, core, low, high)
    return out, by_total


def _compare_metric(m: MetricFacts, start: Edge, end: Edge) -> MetricResult:
    result = MetricResult(m.name, m.kind)
    window, result.compared_by_total = _window(m, start, end)
    for key, (proto, core, low, high) in window.items():
        labels = {} if result.compared_by_total else dict(zip(m.labels, key))
        p, c, lo, hi = (_counts(v) for v in (proto, core, low, high))
        s = SeriesResult(labels, sum(p), sum(c), sum(lo), sum(hi))
        if not s.low <= s.prototype <= s.high:
            seen = f"{s.core}" if s.low == s.high else f"{s.low}..{s.high} (window edges not quiet)"
            s.problems.append(f"count: prototype {s.prototype}, core {seen}")
        if isinstance(proto, Hist):
            _compare_buckets(m, s, p, lo, hi, c)
        result.series.append(s)
    for side, snap in (("prototype", start.prototype), ("core", start.core_before)):
        if m.name not in snap:
            result.why.append(f"{side}: the collector does not export this metric")
    if m.kind == "gauge" and not result.ok:
        result.why.append("a gauge counts the spans open at the window's end: one begun after the prototype "
                          "attached but before core did, and still open, is the prototype's alone")
    if result.compared_by_total:
        result.why.append(f"label sets past limits.series folded into '{OVERFLOW}': compared by the total over "
                          "all series (which label sets each collector kept may differ)")
    return result


def _le_names(m: MetricFacts, n: int) -> list[str]:
    names = list(m.edges) + ["+Inf"]
    return names if len(names) == n else [f"#{i}" for i in range(n - 1)] + ["+Inf"]


def _compare_buckets(m: MetricFacts, s: SeriesResult, p: list[int], lo: list[int], hi: list[int],
                     c: list[int]) -> None:
    names = _le_names(m, len(p))
    fitted = _fit(p, lo, hi)
    s.buckets = [{"le": names[i], "prototype": p[i], "core": c[i], "low": lo[i], "high": hi[i]}
                 for i in range(len(p)) if p[i] or c[i] or lo[i] or hi[i]]
    if s.problems:           # the counts differ: every bucket that differs is the evidence
        bad = [names[i] for i in range(len(p)) if not lo[i] <= p[i] <= hi[i]]
        s.problems.append("buckets: " + ", ".join(f"le={le}" for le in bad))
        return
    distances = bucket_distances(fitted, p)
    far = sum(n for d, n in distances.items() if d > 1)
    if far > stragglers_allowed(sum(p)):
        bad = [names[i] for i in range(len(p)) if fitted[i] != p[i]]
        s.problems.append("buckets: " + ", ".join(f"le={le}" for le in bad)
                          + f" ({far} observation(s) more than one bucket apart)")
        return
    s.moved = distances.get(1, 0) + far
    s.far = far
    for q in QUANTILES:
        qp, qc = quantile_bucket(q, p), quantile_bucket(q, fitted)
        entry = {"quantile": q, "prototype_le": names[qp] if qp is not None else None,
                 "core_le": names[qc] if qc is not None else None}
        s.quantiles.append(entry)
        if qp is not None and qc is not None and abs(qp - qc) > 1:
            s.problems.append(f"p{round(q * 100)}: prototype in le={names[qp]}, core in le={names[qc]}")


# --- reasons -----------------------------------------------------------------------------------
def _delta(end: dict, start: dict, key: str) -> dict:
    a, b = end.get(key) or {}, start.get(key) or {}
    if isinstance(a, dict):
        return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}
    return a - (b or 0)


def _health_notes(parity: Parity, facts: list[MetricFacts], start: Edge, end: Edge) -> None:
    """What the health counters say about the window, attached to the metrics it concerns."""
    by_name = {r.name: r for r in parity.metrics}
    for backend, label in (("bpftrace", "prototype"), ("core", "core")):
        h1, h0 = end.health.get(backend, {}), start.health.get(backend, {})
        lost = _delta(h1, h0, "events_lost")
        if lost:
            parity.notes.append(f"{label}: {lost} event(s) lost in the window (ring/perf buffer full)")
        restarts = _delta(h1, h0, "backend_restarts")
        if restarts:
            parity.notes.append(f"{label}: bpftrace restarted {restarts} time(s) in the window; "
                                f"{_delta(h1, h0, 'backend_gap_seconds'):.2f}s counted nowhere")
        missed = _delta(h1, h0, "program_missed")
        if missed:
            parity.notes.append(f"{label}: the kernel skipped {sum(missed.values())} run(s) of its programs "
                                f"({', '.join(sorted(missed))}): another BPF program ran on that CPU")
        overflows = _delta(h1, h0, "span_overflows")
        for m in facts:
            r = by_name[m.name]
            spans = [s for s in m.spans if overflows.get(s)]
            if spans:
                r.why.append(f"{label}: begin map full, {sum(overflows[s] for s in spans)} begin(s) of "
                             f"{', '.join(spans)} lost (probec_span_begin_overflow_total)")
            if missed and m.spans and not r.ok:
                r.why.append(f"{label}: the kernel skipped program runs, a span can lose its begin or end")
            entries, capacity = h1.get("map_entries", {}), h1.get("map_capacity", {})
            if backend == "bpftrace" and m.map and capacity.get(m.map) and \
                    entries.get(m.map, 0) >= capacity[m.map]:
                r.why.append(f"prototype: bpftrace map @{m.map} is full ({entries[m.map]} keys): bpftrace drops "
                             "updates to new label sets without counting them")
        if backend == "core":
            folded = _delta(h1, h0, "series_dropped")
            for name, n in (folded or {}).items():
                if name in by_name and not by_name[name].compared_by_total:
                    by_name[name].why.append(f"core: {n} label set(s) folded into '{OVERFLOW}'")
    for m in facts:
        r = by_name[m.name]
        if m.at_entry and (not r.ok or any(s.moved for s in r.series)):
            r.why.append(f"prototype: {', '.join(m.at_entry)} at the function's entry (bpftrace 0.17 cannot probe "
                         "at an offset), core 4 bytes in, past endbr64: a call that enters past the endbr64 "
                         "is seen by core only, and durations differ by the endbr64 step")
        if any(s.low != s.high for s in r.series):
            r.why.append("the window's edges were not quiet for this metric (it was updated while the edges "
                         "were read): compared within what moved there" + (
                             "" if start.paused or end.paused else "; --pid pauses the process at the edges"))
    for name in sorted(set(end.health.get("bpftrace", {}).get("events_emitted", {}))
                       | set(end.health.get("core", {}).get("events_emitted", {}))):
        parity.events[name] = {
            label: (end.health.get(b, {}).get("events_emitted", {}).get(name, 0)
                    - start.health.get(b, {}).get("events_emitted", {}).get(name, 0))
            for b, label in (("bpftrace", "prototype"), ("core", "core"))}
