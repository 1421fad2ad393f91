"""Soak: the core collector for a long time (an hour by default) against a busy workload.

    flock /tmp/probec-kernel.lock python3 benchmarks/soak.py     (or `make soak`)
    SOAK_SECONDS=300 SOAK_SAMPLE_SECONDS=30 ...                    (a shorter run)
    python3 benchmarks/soak.py --quick                            (8 s, for the smoke test)

`probec run` (core) on benchmarks/specs/soak.yaml. The workload is `loadgen nop RATE COUNT
libpwork.so`, run as `soakload` (a link, so its comm label is the soak's own), in batches of
SOAK_BATCH_SECONDS, one new process per batch (so the collector also sees processes come and go),
at SOAK_RATE calls per second. Every SOAK_SAMPLE_SECONDS the collector's RSS, open file descriptors
and CPU time are read from /proc and /metrics is scraped. At the end the counts must be exact:
every call the loadgen processes report, in the counter and in the histogram.
Writes benchmarks/results/soak.md (a run shorter than an hour says so at the top). Exit 1 when a
count is off, the collector died, or its RSS or fds kept growing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (SPECS, WORKLOADS, ProbecRun, build_bundle, build_dir, check_lock, compile_loadgen,  # noqa: E402
                     ensure_workloads, free_port, header, log, metric_value, metrics_text, quick_flag, require_root,
                     write_result)

QUICK = quick_flag()
SECONDS = 8.0 if QUICK else float(os.environ.get("SOAK_SECONDS", 3600))
SAMPLE_S = 2.0 if QUICK else float(os.environ.get("SOAK_SAMPLE_SECONDS", 60))
RATE = 50_000 if QUICK else int(os.environ.get("SOAK_RATE", 100_000))
BATCH_S = 2.0 if QUICK else float(os.environ.get("SOAK_BATCH_SECONDS", 10))
COMM = "soakload"
LABELS = f'comm="{COMM}"'


def proc_state(pid: int) -> tuple[float, int, float]:
    """RSS in MiB, open fds, CPU seconds (user + system) of a live process."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, fds, cpu


class Workload:
    """Batches of loadgen, one after the other; the calls of the batches finished."""

    def __init__(self, loadgen, library):
        self.argv = [str(loadgen), "nop", str(RATE), str(int(RATE * BATCH_S)), str(library)]
        self.calls = 0
        self.batches = 0
        self.proc: subprocess.Popen | None = None

    def start_batch(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)

    def finish_batch(self) -> None:
        out, _ = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"loadgen exited {self.proc.returncode}")
        self.calls += int(out.split()[0].split("=")[1])
        self.batches += 1
        self.proc = None


def main() -> int:
    require_root()
    check_lock()
    ensure_workloads()
    loadgen = build_dir() / COMM
    target = compile_loadgen()
    if not loadgen.is_symlink():
        loadgen.symlink_to(target)
    bundle = build_bundle(SPECS / "soak.yaml", "core")
    title = header("Soak: the core collector under a busy workload", "soak.py", QUICK)   # the tree that runs
    port = free_port()
    samples = []
    work = Workload(loadgen, WORKLOADS / "libpwork.so")
    log(f"soak: {SECONDS:.0f}s at {RATE:,} calls/s, a sample every {SAMPLE_S:.0f}s")
    with ProbecRun(bundle, port=port, interval=1.0) as run:
        started = time.monotonic()
        next_sample = started
        while True:
            now = time.monotonic()
            if work.proc is not None and work.proc.poll() is not None:
                work.finish_batch()
            if now >= next_sample:
                rss, fds, cpu = proc_state(run.pid)      # before the scrape: its socket is not counted
                text = metrics_text(port)
                samples.append((now - started, rss, fds, cpu, work.calls,
                                metric_value(text, "soak_nop_calls_total", LABELS) or 0))
                log(f"t={now - started:.0f}s rss={rss:.1f}MiB fds={fds} cpu={cpu:.2f}s calls={work.calls:,}")
                next_sample += SAMPLE_S
            if run.proc.poll() is not None:
                raise RuntimeError("probec run died:\n" + "\n".join(run.stderr[-20:]))
            if now - started >= SECONDS and work.proc is None:
                break
            if work.proc is None and now - started < SECONDS:
                work.start_batch()
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        time.sleep(2.5)                              # two reads after the last batch
        rss, fds, cpu = proc_state(run.pid)
        text = metrics_text(port)
        samples.append((elapsed, rss, fds, cpu, work.calls, metric_value(text, "soak_nop_calls_total", LABELS) or 0))
    counted = metric_value(text, "soak_nop_calls_total", LABELS) or 0
    in_histogram = metric_value(text, "soak_nop_duration_seconds_count", LABELS) or 0
    missed = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                 if line.startswith("probec_program_missed_total{"))
    return report(title, samples, work, counted, in_histogram, missed)


def report(title, samples, work, counted, in_histogram, missed) -> int:
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    rss_growth = last[1] - first[1]
    # a scrape holds a socket open for a moment; a leak raises the floor: the fewest fds in each half
    half = max(1, len(samples) // 2)
    fds_growth = min(s[2] for s in samples[half:]) - min(s[2] for s in samples[:half])
    exact = counted == work.calls == in_histogram
    cpu_share = 100 * (last[3] - samples[0][3]) / max(last[0], 1e-9)
    lines = list(title)
    if SECONDS < 3600 and not QUICK:
        lines.insert(2, f"**A {SECONDS / 60:.3g}-minute run** (SOAK_SECONDS={SECONDS:g}), not the hour "
                        "`make soak` runs by default.\n")
    lines += ["", f"`probec run` (core) on `benchmarks/specs/soak.yaml`, `--interval 1`. Workload: "
              f"`loadgen nop {RATE} {int(RATE * BATCH_S)} libpwork.so` (as `{COMM}`) again and again "
              f"({work.batches} processes, {BATCH_S:g} s each, paced at {RATE:,} calls/s); a sample every "
              f"{SAMPLE_S:g} s.", "",
              "## Counts", "",
              "| calls made (loadgen) | counter `soak_nop_calls_total` | histogram count | exact | "
              "program runs skipped (probec_program_missed_total) |",
              "| --- | --- | --- | --- | --- |",
              f"| {work.calls:,} | {counted:,.0f} | {in_histogram:,.0f} | **{'yes' if exact else 'NO'}** "
              f"| {missed:,.0f} |",
              "", "## The collector over time", "",
              "| t (s) | RSS (MiB) | open fds | CPU (s, cumulative) | calls made | counter |",
              "| --- | --- | --- | --- | --- | --- |"]
    for t, rss, fds, cpu, calls, metric in samples:
        lines.append(f"| {t:,.0f} | {rss:.1f} | {fds} | {cpu:.2f} | {calls:,} | {metric:,.0f} |")
    ok = exact and fds_growth <= 0 and rss_growth < 16
    lines += ["", f"RSS from the first sample after start to the end: {rss_growth:+.1f} MiB; fewest open fds, "
              f"second half of the run against the first: {fds_growth:+d}; collector CPU: {cpu_share:.2f} % of "
              "one core on average.",
              "(The counter in a row lags the calls made by the batch in progress and up to one read.)", "",
              f"Verdict: **{'pass' if ok else 'FAIL'}** (exact counts, fds not growing, RSS grown by less than "
              "16 MiB)."]
    write_result("soak", lines, QUICK)
    if not ok:
        log("soak FAILED: " + ("counts differ; " if not exact else "")
            + f"rss {rss_growth:+.1f} MiB, fds {fds_growth:+d}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
