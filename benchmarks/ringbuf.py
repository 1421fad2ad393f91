#!/usr/bin/env python3
"""Ring-buffer events through the core path: how many events per second one producer can push
without loss, where the cost sits, and what the drop counter says when the consumer is too slow.

Producer: benchmarks/loadgen.c making getpid calls at a paced rate (or flat out), pinned to CPU 0;
consumers run on CPU 1. Specs (events of other processes' getpid calls count too):
  - benchmarks/specs/ring_getpid.yaml: one event at every getpid span end (`when: duration >= 0ns`,
    always true), 4 MiB ring: the brief's shape; the span itself limits one producer.
  - benchmarks/specs/ring_tp.yaml: one event at every sys_enter_getpid, no span, 4 MiB ring: the
    cheapest producer, to offer 1M events/s and more.
  - benchmarks/specs/ring_big.yaml: as ring_tp with a 64 MiB ring (a backlog for consumer capacity).
  - benchmarks/specs/ring_small.yaml: as ring_getpid with a 16 KiB ring (drops on purpose).

Measured:
  (1) `probec run --events FILE` (FILE on tmpfs) as a user runs it, on ring_getpid, per offered rate:
      events made, lines written, probec_events_lost_total.
  (2) ring_tp loaded here through runtime/libbpf/; RingBuffer with a callback that only counts
      (poll + consume, as CoreRunner drains): the ceiling of a per-record ctypes callback.
  (3) the same with the runtime's bulk reader (runtime/libbpf RingReader: the ring's pages mapped
      into this process, records copied out in blocks, no call per record), counting only, as
      `probec run` reads the ring before it decodes.
  Consumer capacity: each in-process consumer draining a 1M-event backlog, no producer running.
  Producer cost: loadgen's CPU per call, paced and flat out, under each consumer and wakeup policy,
      including the generated C with a patched wakeup helper (compiled by the core toolchain).
  Drops: ring_small under a flat-out burst, consumed by `probec run`: made vs written vs lost.

    flock /tmp/probec-kernel.lock python benchmarks/ringbuf.py [--quick]
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHM = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path("/tmp")
PRODUCER_CPU, CONSUMER_CPU = "0", 1


def loadgen_run(loadgen: Path, rate: int, count: int) -> dict:
    cmd = [str(loadgen), "getpid", str(rate), str(count)]
    if (os.cpu_count() or 1) > 1:
        cmd = ["taskset", "-c", PRODUCER_CPU] + cmd
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    fields = dict(kv.split("=") for kv in out.split())
    return {"calls": int(fields["calls"]), "rate": float(fields["rate"]), "seconds": float(fields["seconds"]),
            "cpu_ns": int((ru.ru_utime + ru.ru_stime) * 1e9)}


def wait_quiet(fn, settle: float | None = None, limit: float = 60) -> int:
    """Poll fn() until it stops growing for `settle` seconds."""
    if settle is None:
        settle = 0.2 if C.QUICK else 0.5
    last, since, end = fn(), time.monotonic(), time.monotonic() + limit
    while time.monotonic() < end:
        time.sleep(0.05)
        now = fn()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            break
    return last


# --- (1) and (5): probec run ---------------------------------------------------------------------
def through_probec(bundle: Path, event: str, loadgen: Path, rate: int, count: int, scratch: Path, tag: str) -> dict:
    events = SHM / f"probec-bench-{os.getpid()}-{tag}.jsonl"
    snap = scratch / f"{tag}.prom"
    events.unlink(missing_ok=True)
    try:
        run = C.ProbecRun(bundle, events=str(events), snapshot=snap)
        if (os.cpu_count() or 1) > 1:
            run.cmd = ["taskset", "-c", str(CONSUMER_CPU)] + run.cmd
        with run:
            C.settle(0.3)
            gen = loadgen_run(loadgen, rate, count)
            wait_quiet(lambda: events.stat().st_size if events.exists() else 0)
            run.stop()
        text = snap.read_text() if snap.exists() else ""
        written = C.count_lines(events)
    finally:
        events.unlink(missing_ok=True)
    made = C.metric_value(text, "probec_events_total", f'event="{event}"')
    lost = C.metric_value(text, "probec_events_lost_total")
    return {"gen": gen, "made": int(made or 0), "written": written, "lost": int(lost or 0)}


# --- (2), (3), (4): the object loaded here ---------------------------------------------------------
class InProcess:
    """A bundle's object loaded in this process; its ring drained by a counting consumer:
    'callback' (runtime/libbpf RingBuffer: a bytes object per record), 'bulk' (runtime/libbpf
    RingReader: records in blocks, as `probec run` hands them to its decoder), 'bulk-split' (the
    same, each block then split into a bytes object per record, as the callback gets them) or None
    (no consumer)."""

    def __init__(self, bundle: Path, consumer: str | None = "callback", wakeup_bytes: int | None = None):
        from probec.runtime import libbpf as L
        self.manifest = json.loads((bundle / "manifest.json").read_text())
        core = self.manifest["core"]
        self.obj = L.BpfObject.open(bundle / core["object"])
        for s in core["settings"]:
            value = s["value"]
            if s["name"] == "probec_wakeup_bytes" and wakeup_bytes is not None:
                value = wakeup_bytes
            self.obj.set_rodata(s["name"], int(value).to_bytes(s["size"], "little"))
        self.obj.load()
        for p in core["programs"]:
            probe = next(x for x in self.manifest["probes"] if x["id"] == p["probe"])
            self.obj.program(p["program"]).attach_tracepoint(probe["category"], probe["name"])
        self.slots = {(h["kind"], h["name"]): h["slot"] for h in core["health"]}
        self.count = 0
        self.stop = threading.Event()
        self.ring = self.reader = self.thread = None
        self.ring_map = self.obj.map(core["ringbuf"]["map"]) if core.get("ringbuf") else None
        sizes = {e["record"]["size"] for e in self.manifest["events"]}
        self.record_size = sizes.pop() if len(sizes) == 1 else 0     # read in blocks, as probec run does
        self.record_format = f"{(self.record_size + 8 + 7) & ~7}s"      # one record with its ring header
        self.split = False
        if consumer:
            self.start(consumer)

    def start(self, consumer: str, thread: bool = True) -> None:
        from probec.runtime import libbpf as L
        if consumer == "callback":
            self.ring = L.RingBuffer(self.ring_map, self._on)
            target = self._drain_callback
        else:
            self.reader = L.RingReader(self.ring_map)
            self.split = consumer == "bulk-split"
            target = self._drain_bulk
        if thread:
            self.thread = threading.Thread(target=target, daemon=True)
            self.thread.start()

    def _on(self, data: bytes) -> None:
        self.count += 1

    def _drain_callback(self) -> None:
        while not self.stop.is_set():
            self.ring.poll(50)
            self.ring.consume()

    def _drain_bulk(self) -> None:
        while not self.stop.is_set():
            self.reader.wait(50)
            self.read_bulk()

    def read_bulk(self) -> None:
        """Everything the ring holds now, counted (CoreRunner.read_events without the decoding)."""
        while True:
            block, count, others = self.reader.read(self.record_size)
            if not count and not others:
                return
            if self.split and count:
                count = sum(1 for _ in struct.iter_unpack(self.record_format, block))
            self.count += count + len(others)

    def health(self) -> dict:
        items = self.obj.map("probec_health").items_batch()
        totals = {int.from_bytes(k[:4], "little"): sum(int.from_bytes(v[:8], "little") for v in vs) for k, vs in items}
        return {k: totals.get(slot, 0) for k, slot in self.slots.items()}

    def made(self) -> int:
        return sum(v for (kind, _), v in self.health().items() if kind == "event_seen")

    def lost(self) -> int:
        return self.health().get(("events_lost", ""), 0)

    def close(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join(5)
        if self.ring:
            self.ring.consume()
        if self.reader:
            self.reader.close()
        self.obj.close()
        if self.ring:
            self.ring.close()


def in_process(bundle: Path, consumer: str, loadgen: Path, rate: int, count: int) -> dict:
    ip = InProcess(bundle, consumer)
    try:
        C.settle(0.2)
        gen = loadgen_run(loadgen, rate, count)
        got = wait_quiet(lambda: ip.count)
        made, lost = ip.made(), ip.lost()
    finally:
        ip.close()
    return {"gen": gen, "made": made, "written": got, "lost": lost}


def rate_table(title: str, results: list[tuple[str, dict]], what: str) -> tuple[list[str], float]:
    rows = [f"### {title}", "", f"| offered | made by loadgen (calls/s) | events made | events {what} | "
            "probec_events_lost_total | lossless? |", "| --- | --- | --- | --- | --- | --- |"]
    for label, r in results:
        ok = r["lost"] == 0 and r["written"] >= r["made"]
        rows.append(f"| {label} | {r['gen']['rate']:,.0f} | {r['made']:,} | {r['written']:,} | {r['lost']:,} | "
                    f"{'yes' if ok else '**no**'} |")
    best = max((r["gen"]["rate"] for _, r in results if r["lost"] == 0 and r["written"] >= r["made"]), default=0)
    rows += ["", f"Highest lossless rate measured: **{best:,.0f} events/s**."]
    return rows, best


def consumer_capacity(big: Path, loadgen: Path, n: int, rounds: int) -> list[str]:
    """How fast each consumer drains a backlog: n events made with no consumer running (they all
    fit the 64 MiB ring), then the consumer started and timed until it has them all."""
    rows, medians = [], {}
    for consumer, label in (("callback", "runtime/libbpf RingBuffer, callback that only counts "
                                         "(ring_buffer__consume)"),
                            ("bulk", "runtime/libbpf RingReader, bulk reads that only count (records copied "
                                     "out in blocks)"),
                            ("bulk-split", "runtime/libbpf RingReader, each block split into a bytes object per "
                                           "record (as the callback gets them)")):
        rates = []
        for _ in range(rounds):
            ip = InProcess(big, consumer=None)
            try:
                loadgen_run(loadgen, 0, n)
                made = ip.made()
                ip.start(consumer, thread=False)
                t = time.perf_counter()
                while ip.count < made and time.perf_counter() - t < 60:
                    if ip.ring is not None:
                        ip.ring.consume()
                    else:
                        ip.read_bulk()
                rates.append(ip.count / (time.perf_counter() - t))
            finally:
                ip.close()
        medians[consumer] = rate = C.median(rates)
        rows.append(f"| {label} | **{rate / 1e6:.2f} M events/s** | {rate and 1e9 / rate:,.0f} ns | "
                    f"{C.fmt_ratio(rate, medians['callback'])} |")
    return ["### Consumer capacity: draining a backlog", "",
            f"benchmarks/specs/ring_big.yaml (64 MiB ring): {n:,} events made by loadgen with no consumer running, "
            f"then the consumer started on CPU 1 and timed until it has them all (no producer competing); median "
            f"of {rounds}.", "", "| consumer | drain rate | per event | drain rate / callback's |",
            "| --- | --- | --- | --- |"] + rows




def producer_cost(loadgen: Path, ring_bundle: Path, n: int, rounds: int, paced: int) -> list[str]:
    variants = [
        ("no probes", None),
        ("RingReader bulk consumer, generated wakeup batching", lambda: InProcess(ring_bundle, "bulk")),
        ("RingReader bulk consumer, wakeup for every event", lambda: InProcess(ring_bundle, "bulk", wakeup_bytes=0)),
        ("RingReader bulk consumer, never woken (50 ms poll only)",
         lambda: InProcess(ring_bundle, "bulk", wakeup_bytes=1 << 40)),
        ("libbpf callback consumer, generated wakeup batching", lambda: InProcess(ring_bundle, "callback")),
        ("libbpf callback consumer, wakeup for every event",
         lambda: InProcess(ring_bundle, "callback", wakeup_bytes=0)),
    ]
    if C.QUICK:                   # the smoke test: one policy of each kind
        variants = [v for v in variants if v[0] in ("no probes", "RingReader bulk consumer, generated wakeup batching",
                                                    "RingReader bulk consumer, wakeup for every event")]
    stats: dict[str, list[tuple]] = {v[0]: [] for v in variants}
    for r in range(rounds):
        for name, make in variants[r % len(variants):] + variants[:r % len(variants)]:
            row = []
            for rate in (paced, 0):
                ip = make() if make else None
                try:
                    C.settle(0.2)
                    g = loadgen_run(loadgen, rate, n)
                    if ip:
                        wait_quiet(lambda: ip.count)
                    row += [g["cpu_ns"] / n, g["rate"], ip.lost() if ip else 0]
                finally:
                    if ip:
                        ip.close()
            stats[name].append(tuple(row))
    med = {name: [C.median(x[i] for x in s) for i in range(6)] for name, s in stats.items()}
    base_p, base_f = med["no probes"][0], med["no probes"][3]
    rows = ["### What an event costs the producer", "",
            f"loadgen on CPU 0 making N = {n:,} getpid calls, ring_tp.yaml (one event per call, 4 MiB ring), "
            f"paced at {paced:,}/s and flat out, {rounds} alternating rounds, the consumer on CPU 1. 'Generated "
            "wakeup batching' is what the core backend emits (BPF_RB_FORCE_WAKEUP on the record that carries the "
            "waiting data across 1/4 of the ring, BPF_RB_NO_WAKEUP otherwise; the reader also polls every 50 ms); "
            "'every event' sets probec_wakeup_bytes to 0 (flags 0: the kernel wakes the reader when it has caught "
            "up); 'never woken' sets it above the ring size. "
            "Producer CPU = loadgen's user+sys per call.", "",
            f"| consumer, wakeup policy | paced {paced // 1000}k/s: producer CPU ns/call | added by the event | lost | "
            "flat out: producer CPU ns/call | added by the event | calls/s reached | lost |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, _ in variants:
        m = med[name]
        if name == "no probes":
            rows.append(f"| no probes | {m[0]:,.0f} | - | - | {m[3]:,.0f} | - | {m[4]:,.0f} | - |")
            continue
        rows.append(f"| {name} | {m[0]:,.0f} | **{m[0] - base_p:,.0f}** | {m[2]:,.0f} | {m[3]:,.0f} | "
                    f"**{m[3] - base_f:,.0f}** | {m[4]:,.0f} | {m[5]:,.0f} |")
    return rows


def main() -> int:
    quick = C.quick_flag()
    C.require_root()
    C.check_lock()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {CONSUMER_CPU})      # the in-process consumers run on CPU 1
    scratch = C.scratch("ringbuf-")
    loadgen = C.compile_loadgen()
    ring = C.build_bundle(C.SPECS / "ring_getpid.yaml", "core")
    ring_tp = C.build_bundle(C.SPECS / "ring_tp.yaml", "core")
    small = C.build_bundle(C.SPECS / "ring_small.yaml", "core")
    big = C.build_bundle(C.SPECS / "ring_big.yaml", "core")
    seconds = 0.2 if quick else 3.0
    span_rates = [100_000] if quick else [25_000, 50_000, 100_000, 200_000, 400_000, 0]
    tp_rates = [200_000] if quick else [250_000, 500_000, 1_000_000, 1_500_000, 0]

    lines = C.header("Ring buffer events through the core path", "ringbuf.py", quick)
    m = json.loads((ring / "manifest.json").read_text())
    rb = m["core"]["ringbuf"]
    rec = m["events"][0]["record"]["size"]
    lines += ["", f"Rings: {rb['bytes'] // 1024} KiB, {rec}-byte records (+8 bytes of ring header), generated wakeup "
              f"once {rb['wakeup_bytes'] // 1024} KiB wait (probec_wakeup_bytes); every reader also polls every 50 ms. "
              f"Producer: loadgen on CPU 0; consumers on CPU 1. Each rate runs {seconds:g} s (offered 'max' = loadgen "
              "flat out). Lossless = no event lost and every event made reached the consumer.", "",
              "## Lossless throughput, one producer", ""]
    summary = {}
    for key, title, bundle, event, rates, run in (
            ("probec", "(1) `probec run --events FILE`, ring_getpid.yaml (event at each span end; decode + JSON line "
             "per event)", ring, "getpid_done", span_rates,
             lambda b, ev, rate, count, tag: through_probec(b, ev, loadgen, rate, count, scratch, tag)),
            ("callback", "(2) runtime/libbpf RingBuffer, a callback that only counts, ring_tp.yaml", ring_tp,
             "getpid_called", tp_rates, lambda b, ev, rate, count, tag: in_process(b, "callback", loadgen, rate, count)),
            ("bulk", "(3) runtime/libbpf RingReader, bulk reads that only count (no per-record callback), "
             "ring_tp.yaml", ring_tp, "getpid_called", tp_rates,
             lambda b, ev, rate, count, tag: in_process(b, "bulk", loadgen, rate, count))):
        res = []
        for rate in rates:
            count = int((rate or 1_500_000) * seconds)
            label = f"{rate:,}/s" if rate else "max"
            r = run(bundle, event, rate, count, f"{key}{rate}")
            res.append((label, r))
            C.log(f"{key} {label}: made {r['made']:,} got {r['written']:,} lost {r['lost']:,}")
        rows, best = rate_table(title, res, "received" if key != "probec" else "written to FILE")
        summary[key] = best
        lines += rows + [""]
    lines += consumer_capacity(big, loadgen, 10_000 if quick else 1_000_000, 1 if quick else 3) + [""]
    lines += producer_cost(loadgen, ring_tp, 10_000 if quick else 1_500_000, 1 if quick else 3,
                           100_000 if quick else 500_000)

    count = 20_000 if quick else 500_000
    r = through_probec(small, "getpid_done", loadgen, 0, count, scratch, "small")
    consistent = r["made"] == r["written"] + r["lost"]
    lines += ["", "## A consumer too slow: 16 KiB ring, flat-out burst", "",
              f"`benchmarks/specs/ring_small.yaml` (`limits: {{ringbuf: 16KiB}}`, about 340 records of 48 bytes) "
              f"under `probec run --events FILE`; one burst of {count:,} getpid spans as fast as loadgen goes "
              f"({r['gen']['rate']:,.0f} calls/s).", "",
              "| events made (probec_events_total) | written to FILE | probec_events_lost_total | "
              "made = written + lost? |", "| --- | --- | --- | --- |",
              f"| {r['made']:,} | {r['written']:,} | **{r['lost']:,}** ({100 * r['lost'] / max(1, r['made']):.1f} %) | "
              f"{'yes' if consistent else '**no** (' + str(r['made'] - r['written'] - r['lost']) + ' unaccounted)'} |"]
    C.write_result("ringbuf", lines, quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
