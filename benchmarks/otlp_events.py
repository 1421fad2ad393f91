#!/usr/bin/env python3
"""Events out of `probec run` at high rates: to the JSON-lines file and as spans over OTLP/HTTP.

One producer (benchmarks/loadgen.c, getpid calls at a paced rate, pinned to CPU 0) and
benchmarks/specs/ring_getpid.yaml (an event at every getpid span end, 4 MiB ring), consumed by
`probec run` pinned to CPU 1, as a user runs it:

  (A) the runtime before this change (a checkout of BASE: one ctypes callback, decode, dict and
      json.dumps per event), `--events FILE`;
  (B) this runtime, `--events FILE` (bulk ring reads, batch decoding, JSON lines by batch);
  (C) this runtime, `--events FILE --otlp URL` (both: JSON lines and spans);
  (D) this runtime, `--otlp URL` alone.

The OTLP receiver is tests/otlp_receiver.py in a process of its own on CPU 0 (with the
producer): it decodes every request with opentelemetry-proto's classes and counts the spans.
Each rate runs RUN_S seconds per variant; ROUNDS rounds, variants in a rotated order each round.
A run is lossless when the kernel lost nothing (probec_events_lost_total 0) and every event made
(probec_events_total) reached the file and the receiver. Also measured from the same runs: the
producer's CPU per call (loadgen's user+sys from wait4) and `probec run`'s CPU per event (its
/proc stat from just before the load to the last event out).

    flock /tmp/probec-kernel.lock python benchmarks/otlp_events.py [--quick]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from ringbuf import SHM, loadgen_run, wait_quiet  # noqa: E402

BASE = "95cc7f4"                 # main before the bulk reader: the callback consumer
PRODUCER_CPU, CONSUMER_CPU = "0", "1"
RECEIVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from otlp_receiver import OtlpReceiver
r = OtlpReceiver(count_only=True)
print(r.url, flush=True)
for line in sys.stdin:
    print(r.span_count, len(r.bad), flush=True)
"""


class Receiver:
    """tests/otlp_receiver.py in its own process; count() asks it how many spans arrived."""

    def __init__(self):
        cmd = [sys.executable, "-c", RECEIVER, str(C.ROOT / "tests")]
        if (os.cpu_count() or 1) > 1:
            cmd = ["taskset", "-c", PRODUCER_CPU] + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=C.ENV)
        self.url = self.proc.stdout.readline().strip()
        self.base = 0

    def count(self) -> int:
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        spans, bad = map(int, self.proc.stdout.readline().split())
        assert bad == 0, "the receiver got requests it could not decode"
        return spans - self.base

    def reset(self) -> None:
        self.base += self.count()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def base_checkout(scratch: Path) -> Path:
    """The runtime of BASE, to run side by side (git archive: no worktree left behind)."""
    out = scratch / "base"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(C.ROOT), "archive", BASE], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def base_bundle(base: Path, spec: Path, scratch: Path) -> Path:
    """The spec built by BASE's own compiler: its runtime reads only the manifests of its time."""
    out = scratch / "base-bundle"
    subprocess.run([sys.executable, "-m", "probec", "build", str(spec), "--backend", "core", "-o", str(out)],
                   cwd=base, env={**os.environ, "PYTHONPATH": str(base)}, check=True, capture_output=True)
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(variant: str, bundle: Path, base: Path, base_built: Path, receiver: Receiver, loadgen: Path, rate: int,
            count: int, scratch: Path) -> dict:
    events = SHM / f"probec-otlp-bench-{os.getpid()}.jsonl"
    snap = scratch / "snap.prom"
    events.unlink(missing_ok=True)
    snap.unlink(missing_ok=True)
    receiver.reset()
    run = C.ProbecRun(base_built if variant == "A" else bundle, snapshot=snap, events=str(events) if variant != "D" else None)
    if variant in ("C", "D"):
        run.cmd += ["--otlp", receiver.url, "--otlp-interval", "60"]
    if variant == "A":
        run.cmd[0:0] = ["env", "-C", str(base), f"PYTHONPATH={base}"]   # `-m probec` imports from the cwd first
    if (os.cpu_count() or 1) > 1:
        run.cmd = ["taskset", "-c", CONSUMER_CPU] + run.cmd
    try:
        with run:
            C.settle(0.3)
            pid = run.pid                  # taskset and env exec the python process: the same pid
            cpu0 = cpu_seconds(pid)
            gen = loadgen_run(loadgen, rate, count)
            if variant != "D":
                wait_quiet(lambda: events.stat().st_size if events.exists() else 0)
            if variant in ("C", "D"):
                # getpid calls of other processes trickle in too: the counts compared are the ones after stop
                wait_quiet(receiver.count, settle=0.3 if C.QUICK else 1.0)
            cpu = cpu_seconds(pid) - cpu0
            run.stop()
        text = snap.read_text() if snap.exists() else ""
        written = C.count_lines(events) if variant != "D" else None
        spans = receiver.count() if variant in ("C", "D") else None
    finally:
        events.unlink(missing_ok=True)
    made = int(C.metric_value(text, "probec_events_total", 'event="getpid_done"') or 0)
    lost = int(C.metric_value(text, "probec_events_lost_total") or 0)
    out = [n for n in (written, spans) if n is not None]
    return {"gen": gen, "made": made, "lost": lost, "written": written, "spans": spans,
            "lossless": lost == 0 and made >= count and all(n == made for n in out), "cpu": cpu}


VARIANTS = {"A": f"before ({BASE}): callback per event, `--events FILE`",
            "B": "bulk reader + batches, `--events FILE`",
            "C": "bulk reader + batches, `--events FILE --otlp URL`",
            "D": "bulk reader + batches, `--otlp URL`"}


def main() -> int:
    quick = C.quick_flag()
    C.require_root()
    C.check_lock()
    scratch = Path(tempfile.mkdtemp(prefix="otlp-bench-", dir=C.build_dir()))
    base = base_checkout(scratch)
    loadgen = C.compile_loadgen()
    bundle = C.build_bundle(C.SPECS / "ring_getpid.yaml", "core")
    base_built = base_bundle(base, C.SPECS / "ring_getpid.yaml", scratch)
    run_s = 0.3 if quick else 5.0
    rates = [100_000] if quick else [200_000, 300_000]
    rounds = 1 if quick else 3
    variants = list(VARIANTS)
    receiver = Receiver()
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        baseline = {}
        for rate in rates:
            count = int(rate * run_s)
            baseline[rate] = C.median(loadgen_run(loadgen, rate, count)["cpu_ns"] / count for _ in range(rounds))
            for r in range(rounds):
                for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                    res = one_run(v, bundle, base, base_built, receiver, loadgen, rate, count, scratch)
                    results.setdefault((v, rate), []).append(res)
                    C.log(f"{v} {rate:,}/s: made {res['made']:,} lost {res['lost']:,} written {res['written']} "
                          f"spans {res['spans']} cpu {res['cpu']:.2f}s")
    finally:
        receiver.close()

    lines = C.header("Events to a JSON-lines file and to OTLP at high rates", "otlp_events.py", quick)
    lines += ["", f"benchmarks/specs/ring_getpid.yaml (an event at every getpid span end: pid, duration; 4 MiB "
              f"ring); loadgen on CPU {PRODUCER_CPU}, `probec run` on CPU {CONSUMER_CPU}, the OTLP receiver "
              f"(tests/otlp_receiver.py, decoding every request) on CPU {PRODUCER_CPU}. Each rate runs "
              f"{run_s:g} s per variant, {rounds} rounds in rotated order; medians, and the worst round for "
              "losses. The ring holds about 87,000 records (0.4 s at 200k/s): a run this long shows what the "
              "consumer sustains, not what the ring absorbs. Spans wait in memory (at most 262,144 events) while "
              "they are encoded and sent, so the ring never waits on the receiver.", ""]
    for key, text in VARIANTS.items():
        lines.append(f"- ({key}) {text}")
    lines += ["", "## Lossless?", "",
              "| offered | " + " | ".join(f"({v}) lost / events out, worst round" for v in variants) + " |",
              "| --- | " + " | ".join("---" for _ in variants) + " |"]
    for rate in rates:
        cells = []
        for v in variants:
            rs = results[(v, rate)]
            worst = max(rs, key=lambda r: (not r["lossless"], r["lost"]))
            out = "/".join(f"{n:,}" for n in (worst["written"], worst["spans"]) if n is not None)
            cells.append(f"{'yes' if all(r['lossless'] for r in rs) else '**no**'}: {worst['lost']:,} lost; "
                         f"{out} of {worst['made']:,}")
        lines.append(f"| {rate:,}/s | " + " | ".join(cells) + " |")
    lines += ["", "## Cost, medians", "",
              "Producer: loadgen's CPU per call with the variant running, less the same paced run with no probes. "
              "Consumer: `probec run`'s CPU per event made (user+sys, from just before the load until the last event "
              "is out); 1 / that is about the rate one core sustains.", "",
              "| offered | no probes: producer ns/call | " +
              " | ".join(f"({v}) producer +ns/call | ({v}) consumer us/event" for v in variants) + " |",
              "| --- | --- | " + " | ".join("--- | ---" for _ in variants) + " |"]
    for rate in rates:
        count = int(rate * run_s)
        cells = []
        for v in variants:
            rs = results[(v, rate)]
            producer = C.median(r["gen"]["cpu_ns"] / count for r in rs) - baseline[rate]
            consumer = C.median(r["cpu"] / max(1, r["made"]) * 1e6 for r in rs)
            cells.append(f"{producer:,.0f} | {consumer:.2f}")
        lines.append(f"| {rate:,}/s | {baseline[rate]:,.0f} | " + " | ".join(cells) + " |")
    C.write_result("otlp_events", lines, quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
