#!/usr/bin/env python3
"""How fast is `probec check`, as a pre-commit hook runs it?

Measures, side by side in one run: the whole CLI over every spec in the repo (a process start
included, which is what a hook pays), the same with --no-host (no tracefs, ELF or kernel reads),
and the in-process check of each spec. Medians of several rounds; results go to
benchmarks/results/check_speed.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 7


def specs() -> list[Path]:
    found = sorted(ROOT.glob("specs/*.yaml")) + sorted(ROOT.glob("examples/*/spec.yaml"))
    return [p for p in found if p.is_file()]


# A real install has compiled bytecode; this sandbox sets PYTHONDONTWRITEBYTECODE, which would
# make every run recompile every module. Measure what users get.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def time_cli(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "probec", "check", *args], capture_output=True, cwd=ROOT, env=ENV)
    return time.perf_counter() - t


def main() -> None:
    files = [str(p.relative_to(ROOT)) for p in specs()]
    for _ in range(2):   # write bytecode caches first
        time_cli(["--no-host", *files])
    rows = []
    baseline = [time_cli(["--help"]) for _ in range(ROUNDS)]
    rows.append(("`probec check --help` (process start and imports only)", statistics.median(baseline)))
    full = [time_cli(files) for _ in range(ROUNDS)]
    rows.append((f"`probec check` all {len(files)} specs", statistics.median(full)))
    nohost = [time_cli(["--no-host", *files]) for _ in range(ROUNDS)]
    rows.append((f"`probec check --no-host` all {len(files)} specs", statistics.median(nohost)))
    one = [time_cli([files[0]]) for _ in range(ROUNDS)]
    rows.append((f"`probec check {files[0]}`", statistics.median(one)))

    sys.path.insert(0, str(ROOT))
    from probec.compiler.driver import check_file
    from probec.compiler.ir.host import HostInfo
    host = HostInfo()
    per_spec = []
    for f in files:
        check_file(str(ROOT / f), host)            # warm the host caches, as one CLI run does
        samples = []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            check_file(str(ROOT / f), host)
            samples.append(time.perf_counter() - t)
        per_spec.append((f, statistics.median(samples)))

    lines = ["# `probec check` speed", "",
             f"Machine: {platform.node()} ({platform.machine()}, kernel {platform.release()}), "
             f"Python {platform.python_version()}. Medians of {ROUNDS} rounds, measured in one run by "
             "`benchmarks/check_speed.py`.", "",
             "| what | median |", "| --- | --- |"]
    lines += [f"| {what} | {secs * 1000:.0f} ms |" for what, secs in rows]
    lines += ["", "In-process, host facts cached (what each further spec of one CLI call costs):", "",
              "| spec | median |", "| --- | --- |"]
    lines += [f"| {f} | {secs * 1000:.1f} ms |" for f, secs in per_spec]
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "check_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
