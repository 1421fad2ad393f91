#!/usr/bin/env python3
"""What the bcc backend costs next to core: the time from `probec run` to attached (BCC compiles
the program against the kernel headers at start; core loads a compiled object), and the
nanoseconds a span adds per call, both bundles built from one spec.

How: for each spec (the getpid syscall span and the uprobe+uretprobe span on pwork_nop, as in
span_overhead.py), every round runs the workload with no probes, then under `probec run` of the
core bundle, of the core bundle built with `--begin-map hash` (the begin map bcc has, without
kernel BTF for task storage) and of the bcc bundle (order rotated per round), REPS times each. Per call added =
(median workload CPU time with the bundle - median without) / N (CPU time from wait4: user+sys of
the workload only). Start-up: wall time from spawning `probec run` to its "attached" line, and
for bcc the compile-and-attach time it logs.

    flock /tmp/probec-kernel.lock python benchmarks/bcc_backend.py [--quick]
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PWORK = C.WORKLOADS / "pwork"
COMPILED = re.compile(r"BCC compiled and attached the program in ([0-9.]+) s")


def main() -> int:
    quick = C.quick_flag()
    C.check_lock()
    C.require_root()
    C.ensure_workloads()
    rounds, reps = (2, 1) if quick else (5, 3)
    lines = C.header("bcc backend: start-up and per-call cost next to core", "bcc_backend.py", quick)
    lines += ["Both bundles built from one spec by this checkout. Kernel headers: the Debian 6.1 ones on a 6.18",
              "kernel (no kernel struct is read by these specs, so they run).", ""]
    for name, spec, argv, n in (("getpid span", "span_getpid.yaml", [str(PWORK), "getpid"], 20_000 if quick else 1_000_000),
                                ("pwork_nop uprobe span", "span_nop.yaml", [str(PWORK), "nop"], 20_000 if quick else 500_000)):
        bundles = {"core": C.build_bundle(C.SPECS / spec, "core"),
                   "core, hash begin map": C.build_bundle(C.SPECS / spec, "core", task_storage=False),
                   "bcc": C.build_bundle(C.SPECS / spec, "bcc")}
        starts = {b: [] for b in bundles}
        compiles: list[float] = []
        times: dict[str, list[int]] = {"none": [], **{b: [] for b in bundles}}
        for r in range(rounds):
            order = list(bundles)[r % 3:] + list(bundles)[:r % 3]
            for _ in range(reps):
                times["none"].append(C.time_workload([*argv, str(n)])[1])
            for b in order:
                t0 = time.monotonic()
                with C.ProbecRun(bundles[b]) as run:
                    starts[b].append(time.monotonic() - t0)
                    said = next((m for m in map(COMPILED.search, run.stderr) if m), None)
                    if said:
                        compiles.append(float(said.group(1)))
                    for _ in range(reps):
                        times[b].append(C.time_workload([*argv, str(n)])[1])
        base = C.median(times["none"])
        lines += [f"## {name} (`benchmarks/specs/{spec}`, {n} calls, {rounds} rounds x {reps})", "",
                  "| | per call added (CPU) | spread | probec run to attached |", "| --- | --- | --- | --- |"]
        for b in bundles:
            per = [(t - base) / n for t in times[b]]
            lines.append(f"| {b} | {C.fmt_ns(C.median(per))} | {C.spread(per)} | {C.median(starts[b]):.2f} s |")
        per_call = {b: (C.median(times[b]) - base) / n for b in bundles}
        lines += ["", f"- bcc / core per call: {C.fmt_ratio(per_call['bcc'], per_call['core'])}; bcc / core with the "
                  f"same HASH begin map: {C.fmt_ratio(per_call['bcc'], per_call['core, hash begin map'])}",
                  f"- BCC compile and attach at start (its own log line): median {C.median(compiles):.2f} s", ""]
    C.write_result("bcc_backend", lines, quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
