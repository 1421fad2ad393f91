"""Faults a collector must survive without losing data in silence: the bpftrace child killed under
load, `probec run` itself killed, and a full disk under `--events`. Real probes, real workloads."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, require_kernel
from harness import Run, bpf_program_count, build, children, value, write_spec

pytestmark = pytest.mark.kernel
PWORK = ROOT / "tests" / "workloads" / "build" / "pwork"

NOP_SPEC = """
name: nops
binaries:
  pwork: $WORK/libpwork.so
spans:
  nop:
    function: pwork:pwork_nop
metrics:
  nop_calls_total:
    count: nop.end
  nop_duration_seconds:
    histogram: nop.duration
    buckets: exp2(1us, 1s)
"""


def alive(pid: int) -> bool:
    """Running and not a zombie (a killed orphan may wait a moment for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_bpftrace_killed_under_load_reports_the_gap_and_stays_consistent(tmp_path, workloads):
    require_kernel(need_bpftrace=True)
    bundle = build(write_spec(tmp_path, NOP_SPEC), "bpftrace", tmp_path / "bundle")
    run = Run(bundle, tmp_path)
    calls = 3_000_000
    try:
        (child,) = children(run.proc.pid)
        load = subprocess.Popen([str(PWORK), "nop", str(calls)])
        time.sleep(1.0)                                   # several dumps into the workload
        assert load.poll() is None, "the workload ended before the kill: make it longer"
        os.kill(child, signal.SIGKILL)
        assert wait_for(lambda: "restarted" in run.stderr(), 60), run.stderr()
        assert load.wait(120) == 0
        metrics = run.stop()
    finally:
        run.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    counted = value(metrics, "nop_calls_total")
    assert value(metrics, "probec_backend_restarts_total") == 1
    gap = value(metrics, "probec_backend_gap_seconds_total")
    assert gap > 0                                        # the loss is reported ...
    assert 0 < calls - counted < calls                    # ... and there was one
    # Counter and histogram come from the same dumps, before and after the restart.
    assert value(metrics, "nop_duration_seconds_count") == counted
    assert run.stderr().count("nothing was counted for") == 1


def test_bpftrace_child_dies_with_a_killed_probec_run(tmp_path, workloads):
    """SIGKILL cannot be caught, so `probec run` cannot stop bpftrace itself: the child must get
    the signal from the kernel (PR_SET_PDEATHSIG), not linger until its next print fails."""
    require_kernel(need_bpftrace=True)
    before = bpf_program_count()
    bundle = build(write_spec(tmp_path, NOP_SPEC), "bpftrace", tmp_path / "bundle")
    run = Run(bundle, tmp_path, "--interval", "10")
    try:
        (child,) = children(run.proc.pid)
        assert alive(child) and bpf_program_count() > before
        run.proc.kill()
        run.proc.wait()
        assert wait_for(lambda: not alive(child), 1.0), "bpftrace outlived probec run"
        assert wait_for(lambda: bpf_program_count() == before, 2.0), "programs left attached"
    finally:
        run.kill()
        if alive(child):
            os.kill(child, signal.SIGKILL)


RECORD_SPEC = """
name: recorded
binaries:
  pwork: $WORK/libpwork.so
spans:
  rec:
    function: pwork:pwork_record
metrics:
  record_calls_total:
    count: rec.end
events:
  recorded:
    on: rec.end
    fields: [comm, retval]
"""


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def scrape_until(run: Run, port: int, condition, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        metrics = run.scrape(port)
        if condition(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


@pytest.mark.parametrize("backend", ["bpftrace", "core"])
def test_full_disk_drops_whole_events_counts_them_and_resumes(tmp_path, small_tmpfs, workloads, backend):
    require_kernel(need_bpftrace=backend == "bpftrace", need_clang=backend == "core")
    import json
    import socket
    bundle = build(write_spec(tmp_path, RECORD_SPEC), backend, tmp_path / "bundle")
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"x" * (56 << 10))                # 8 KiB left: about 80 events
    events = small_tmpfs / "events.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = Run(bundle, tmp_path, "--events", str(events), port=port)
    try:
        first = [str(v) for v in range(1, 1501)]
        subprocess.run([str(PWORK), "record", *first], check=True, timeout=60)
        # The disk is full and metrics are still served, and right.
        metrics = scrape_until(run, port, lambda m: value(m, "probec_events_dropped_total", reason="write") > 0
                               and value(m, "record_calls_total") == 1500)
        assert value(metrics, "record_calls_total") == 1500
        assert value(metrics, "probec_events_dropped_total", reason="write") > 0
        written_while_full = len(events.read_text().splitlines())
        filler.unlink()                                       # space comes back
        subprocess.run([str(PWORK), "record", *[str(v) for v in range(1, 101)]], check=True, timeout=60)
        metrics = scrape_until(run, port, lambda m: value(m, "record_calls_total") == 1600)
        time.sleep(1.5)                                       # a flush after the last events
        metrics = run.stop()
    finally:
        run.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    lines = events.read_text().split("\n")
    assert lines[-1] == ""                                    # ends with a whole line
    records = [json.loads(line) for line in lines[:-1]]       # every line is whole JSON
    assert all(r["event"] == "recorded" for r in records)
    dropped = value(metrics, "probec_events_dropped_total", reason="write")
    lost = value(metrics, "probec_events_lost_total")
    assert value(metrics, "record_calls_total") == 1600
    assert value(metrics, "probec_events_total", event="recorded") == 1600
    assert dropped > 0 and len(records) + dropped + lost == 1600, (len(records), dropped, lost)
    assert len(records) > written_while_full                   # writing resumed
    assert run.stderr().count("cannot write to") == 1 and run.stderr().count("again") == 1


@pytest.mark.parametrize("where", ["missing", "read-only"])
def test_events_in_a_folder_that_cannot_take_them_is_a_clear_error(tmp_path, workloads, where):
    require_kernel(need_bpftrace=True)
    from conftest import probec
    bundle = build(write_spec(tmp_path, RECORD_SPEC), "bpftrace", tmp_path / "bundle")
    folder = tmp_path / "ro"
    folder.mkdir()
    if where == "read-only":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(folder)], check=True)
    try:
        target = folder / ("absent" if where == "missing" else "") / "events.jsonl"
        result = probec("run", str(bundle), "--port", "0", "--events", str(target), "--duration", "5", timeout=60)
    finally:
        if where == "read-only":
            subprocess.run(["umount", "-l", str(folder)], check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    why = "No such file or directory" if where == "missing" else "Read-only file system"
    assert f"error: cannot write events to {target}: {why}" in result.stderr
