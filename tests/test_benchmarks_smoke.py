"""Smoke test of the kernel benchmarks: each script's --quick mode runs and prints its table.

Not a timing assertion: quick runs are far too short to quote. The scripts run at the same
time (about 10 s together instead of 25 s one after another); each loads its own programs, so they
do not interfere beyond the noise that --quick ignores. Like every kernel test, run it under the
project's kernel lock (`flock /tmp/probec-kernel.lock python -m pytest ...`); it never takes the
lock itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, require_kernel

BENCHMARKS = {
    "span_overhead": ["## syscall span", "(a) probec core", "(b) hand-written libbpf", "(a) / (b)"],
    "uprobe_placement": ["probec automatic placement", "forced entry (+0)", "## Is an explicit `+0` honoured?"],
    "collector": ["## Collector CPU and memory", "100k spans/s", "## One scrape of /metrics",
                  "one batch lookup (Map.items_batch)"],
    "ringbuf": ["## Lossless throughput, one producer", "probec_events_lost_total", "RingReader, bulk reads",
                "A consumer too slow: 16 KiB ring"],
    "event_cost": ["## busy 200 us calls", "core (CO-RE C): span + an event per call", "bpftrace 0.17: span",
                   "Event per call, bpftrace / core"],
    "soak": ["## Counts", "**yes**", "## The collector over time"],
    "containers": ["## At every read (user space)", "core: + namespace == \"serving\"", "bpftrace: count"],
    "bcc_backend": ["## getpid span", "| bcc |", "| core, hash begin map |", "bcc / core per call",
                    "BCC compile and attach at start"],
    "otlp_events": ["## Lossless?", "(A) before", "`--events FILE --otlp URL`", "## Cost, medians"],
    "tp_btf": ["## The traced syscall", "classic tracepoints", "tp_btf/sys_{enter,exit}", "## A syscall not traced",
               "getpid: tp_btf / classic", "## Sched spans", "runq: tp_btf / classic", "offcpu: tp_btf / classic"],
}
TIMEOUT = 120


@pytest.fixture(scope="module")
def quick_runs(workloads):
    require_kernel(need_clang=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for name in BENCHMARKS}
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[name] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_quick_mode_prints_its_table(quick_runs, name):
    rc, stdout, stderr = quick_runs[name]
    assert rc == 0, f"benchmarks/{name}.py --quick exited {rc}:\n{stderr[-3000:]}"
    assert stdout.startswith("# "), stdout[:500]
    assert "| --- |" in stdout, f"no table in the output of {name}:\n{stdout[:2000]}"
    for needle in BENCHMARKS[name]:
        assert needle in stdout, f"{name} --quick output lacks {needle!r}:\n{stdout[:3000]}"
    assert "--quick (smoke run" in stdout
    # a quick run never overwrites the committed results
    assert (ROOT / "benchmarks" / "build" / f"{name}.quick.md").exists()
