#!/usr/bin/env python3
"""What a span and an event at its end add to each call, as the traced program sees it: the
prototype (bpftrace) and production (core) backends on the same spec, side by side in one run.

The cost that matters to a model server is latency added to its requests, wherever it comes
from: the traps, the BPF programs, and the collector waking up to read events and taking the CPU
from the traced thread (two CPUs here). So the workload times itself: `pwork --durations FILE
sleep N US` writes, for every call of pwork_sleep_us, the time its caller measured around the
call (OUTER) and the time the function measured inside its own body (INNER). OUTER - INNER is
what the call paid for being traced, call by call; without probes it is the cost of the call
and two clock reads.

Specs: benchmarks/specs/span_sleep.yaml (a uprobe+uretprobe span, one histogram) and
benchmarks/specs/event_sleep.yaml (the same, plus one event with its duration at every end,
4 MiB ring; bpftrace prints it through its perf buffer). Two call shapes: 200 us busy-waits
(the thread stays on the CPU, so a collector woken for an event competes with it) and 1 ms
nanosleeps (off the CPU, so the collector can run meanwhile).

Every round attaches each variant in turn (order rotated per round), runs both shapes once,
checks every call was counted (and every event written), detaches.

    flock /tmp/probec-kernel.lock python benchmarks/event_cost.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PWORK = C.WORKLOADS / "pwork"
METRIC = "bench_sleep_duration_seconds"
SHAPES = {"busy 200 us": 200, "sleep 1 ms": 1000}


class Variant:
    def __init__(self, name: str, label: str, bundle: Path | None, events: bool):
        self.name, self.label, self.bundle, self.events = name, label, bundle, events
        self.added: dict[str, list[int]] = {shape: [] for shape in SHAPES}   # OUTER - INNER, ns per call
        self.checks: list[str] = []


def durations(path: Path) -> list[int]:
    """OUTER - INNER of each call pwork wrote ("US OUTER INNER")."""
    out = []
    for line in path.read_text().splitlines():
        _, outer, inner = line.split()
        out.append(int(outer) - int(inner))
    return out


def one_round(v: Variant, calls: dict[str, int], scratch: Path, r: int) -> None:
    snap, events = scratch / f"{v.name}.{r}.prom", scratch / f"{v.name}.{r}.jsonl"
    run = None
    if v.bundle is not None:
        run = C.ProbecRun(v.bundle, snapshot=snap, events=str(events) if v.events else None).__enter__()
    try:
        C.settle(0.3)
        for shape, us in SHAPES.items():
            out = scratch / f"{v.name}.{r}.{us}.txt"
            C.time_workload([str(PWORK), "--durations", str(out), "sleep", str(calls[shape]), str(us)])
            v.added[shape] += durations(out)
        C.settle(1.2 if v.name.startswith("bpftrace") else 0.2)     # bpftrace prints its maps once a second
    finally:
        if run is not None:
            run.stop()
    if run is not None:
        made = sum(calls.values())
        counted = C.metric_value(snap.read_text() if snap.exists() else "", f"{METRIC}_count")
        v.checks.append(f"{int(counted or 0):,}/{made:,} counted" +
                        (f", {C.count_lines(events):,} events" if v.events else ""))


def main() -> None:
    quick = C.quick_flag()
    C.require_root()
    C.check_lock()
    C.ensure_workloads()
    calls = {"busy 200 us": 200, "sleep 1 ms": 50} if quick else {"busy 200 us": 2000, "sleep 1 ms": 500}
    rounds = 1 if quick else 5
    specs = {"span": C.SPECS / "span_sleep.yaml", "event": C.SPECS / "event_sleep.yaml"}
    variants = [Variant("baseline", "no probes", None, False)]
    for backend, label in (("core", "core (CO-RE C)"), ("bpftrace", "bpftrace 0.17")):
        for kind, spec in specs.items():
            bundle = C.build_bundle(spec, backend)
            what = "span" if kind == "span" else "span + an event per call"
            variants.append(Variant(f"{backend}_{kind}", f"{label}: {what}", bundle, kind == "event"))
    scratch = C.scratch("event_cost")
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            one_round(v, calls, scratch, r)
        base = {s: C.median(variants[0].added[s]) for s in SHAPES}
        C.log(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{v.name} {C.median(v.added['busy 200 us']) - base['busy 200 us']:+.0f}" for v in variants[1:])
            + " ns/call (busy 200 us, median)")

    lines = C.header("What a span and an event add to each call, as the caller sees it", "event_cost.py", quick)
    lines += ["", f"{rounds} rounds; per round and variant: {calls['busy 200 us']:,} busy-wait calls of 200 us and "
              f"{calls['sleep 1 ms']:,} nanosleep calls of 1 ms. Per call: the caller's time around it minus the "
              "function's own time inside it (pwork --durations), so everything tracing adds to the call, "
              "including the collector taking the CPU. 'added' subtracts the median without probes.", ""]
    base = {s: C.median(variants[0].added[s]) for s in SHAPES}
    for shape in SHAPES:
        lines += [f"## {shape} calls", "",
                  "| variant | added per call, median | p90 | p99 | mean | checks (per round) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for v in variants:
            xs = sorted(v.added[shape])
            if not xs:
                continue
            p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]   # noqa: E731
            mean = sum(xs) / len(xs)
            if v.name == "baseline":
                lines.append(f"| no probes (call + two clock reads) | {C.fmt_ns(C.median(xs))} | {C.fmt_ns(p(0.9))} | "
                             f"{C.fmt_ns(p(0.99))} | {C.fmt_ns(mean)} | - |")
                continue
            b = base[shape]
            lines.append(f"| {v.label} | **{C.fmt_ns(C.median(xs) - b)}** | {C.fmt_ns(p(0.9) - b)} | "
                         f"{C.fmt_ns(p(0.99) - b)} | {C.fmt_ns(mean - b)} | {'; '.join(v.checks[:2])}"
                         f"{' ...' if len(v.checks) > 2 else ''} |")
        lines.append("")
        med = {v.name: C.median(v.added[shape]) - base[shape] for v in variants[1:] if v.added[shape]}
        if med.get("core_event") and med.get("bpftrace_event"):
            lines.append(f"Event per call, bpftrace / core (median added): "
                         f"{C.fmt_ratio(med['bpftrace_event'], med['core_event'])}; "
                         f"the event alone (event - span): core {C.fmt_ns(med['core_event'] - med['core_span'])}, "
                         f"bpftrace {C.fmt_ns(med['bpftrace_event'] - med['bpftrace_span'])}.")
            lines.append("")
    C.write_result("event_cost", lines, quick)


if __name__ == "__main__":
    main()
