"""One collector, several specs: `probec run FOLDER` (or `probec run A B`) on one port, reloaded on
SIGHUP or when the folder changes, without losing the counts of the specs that did not change."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, require_kernel
from harness import Run, value, workload, write_spec

SPEC_A = """
name: fleet_a
metrics:
  fleet_a_getpid_total:
    count: tracepoint:syscalls:sys_enter_getpid
    filter: comm == "fleeta"
"""
SPEC_B = """
name: fleet_b
binaries:
  pwork: $WORK/libpwork.so
metrics:
  fleet_b_records_total:
    count: uprobe:pwork:pwork_record
    filter: comm == "fleetb"
"""
# b changed: it counts the values recorded too (a new spec: its counts start over)
SPEC_B2 = SPEC_B + """
  fleet_b_recorded_values:
    histogram: arg0
    on: uprobe:pwork:pwork_record
    buckets: [1, 10, 100]
"""
# a clash with a: another spec exporting a's metric
SPEC_CLASH = """
name: fleet_c
metrics:
  fleet_a_getpid_total:
    count: tracepoint:syscalls:sys_enter_getpid
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_log(run: Run, text: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while run.stderr().count(text) < count:
        assert run.proc.poll() is None, f"probec run exited {run.proc.returncode}:\n{run.stderr()}"
        assert time.monotonic() < deadline, f"no {text!r} ({count}) in:\n{run.stderr()}"
        time.sleep(0.1)


def scrape_settled(run: Run, port: int, **expected: float) -> dict:
    """Scrape until every metric named reads what is expected (each bpftrace dumps its maps on
    its own clock, every 0.5 s) or 10 s pass; the caller asserts."""
    deadline = time.monotonic() + 10
    while True:
        metrics = run.scrape(port)
        if all(value(metrics, name) == v for name, v in expected.items()) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


@pytest.mark.kernel
@pytest.mark.parametrize("backend_name", ["bpftrace", "core"])
def test_folder_reload_keeps_unchanged_counts(backend_name, workloads, tmp_path):
    require_kernel(need_bpftrace=backend_name == "bpftrace", need_clang=backend_name == "core")
    specs = tmp_path / "specs"
    specs.mkdir()
    write_spec(specs, SPEC_A, "a.yaml")
    write_spec(specs, SPEC_B, "b.yaml")
    port = free_port()
    run = Run(specs, tmp_path, "--backend", backend_name, port=port)
    try:
        wait_for_log(run, "2 spec(s) attached")
        workload("pwork", "--comm", "fleeta", "getpid", "7")
        workload("pwork", "--comm", "fleetb", "record", "1", "2", "3")
        workload("pwork", "--comm", "other", "getpid", "5")
        m = scrape_settled(run, port, fleet_a_getpid_total=7, fleet_b_records_total=3)
        assert value(m, "fleet_a_getpid_total") == 7 and value(m, "fleet_b_records_total") == 3
        assert value(m, "probec_up", bundle="fleet_a", backend=backend_name) == 1
        assert value(m, "probec_source_loaded", source=str(specs / "a.yaml")) == 1

        # b changes on disk: b starts over, a keeps its 7
        write_spec(specs, SPEC_B2, "b.yaml")
        wait_for_log(run, "reloaded:")
        assert "1 started (fleet_b), 1 stopped (fleet_b), 1 unchanged" in run.stderr()
        workload("pwork", "--comm", "fleeta", "getpid", "4")
        workload("pwork", "--comm", "fleetb", "record", "5")
        m = scrape_settled(run, port, fleet_a_getpid_total=11, fleet_b_records_total=1,
                           fleet_b_recorded_values_count=1)
        assert value(m, "fleet_a_getpid_total") == 11
        assert value(m, "fleet_b_records_total") == 1
        assert value(m, "fleet_b_recorded_values_count") == 1
        assert value(m, "fleet_b_recorded_values_bucket", le="10") == 1

        # a clash is refused, said once, counted; a and b keep counting
        write_spec(specs, SPEC_CLASH, "c.yaml")
        wait_for_log(run, "reloaded:", 2)
        log = run.stderr()
        assert log.count("both export fleet_a_getpid_total") == 1, log
        m = run.scrape(port)
        assert value(m, "probec_reload_errors_total") == 1
        assert value(m, "probec_source_loaded", source=str(specs / "c.yaml")) == 0
        (specs / "c.yaml").unlink()

        # SIGHUP with nothing changed: nothing restarts, nothing is lost
        wait_for_log(run, "reloaded:", 3)
        run.proc.send_signal(signal.SIGHUP)
        wait_for_log(run, "reloaded:", 4)
        assert run.stderr().rstrip().endswith("reloaded: 0 started (-), 0 stopped (-), 2 unchanged"), run.stderr()
        workload("pwork", "--comm", "fleeta", "getpid", "2")
        m = scrape_settled(run, port, fleet_a_getpid_total=13)
        assert value(m, "fleet_a_getpid_total") == 13 and value(m, "fleet_b_records_total") == 1
        assert value(m, "probec_reloads_total") == 4
    finally:
        final = run.stop()
    assert value(final, "fleet_a_getpid_total") == 13


def test_clash_at_start_is_one_clear_error(tmp_path):
    """Two specs with one name, or one metric name, do not start; the message names both files."""
    a = write_spec(tmp_path, SPEC_A, "a.yaml")
    clash = write_spec(tmp_path, SPEC_CLASH, "c.yaml")
    same_name = write_spec(tmp_path, SPEC_A.replace("fleet_a_getpid", "other_getpid"), "a2.yaml")
    for second, expected in ((clash, "both export fleet_a_getpid_total"), (same_name, "both named 'fleet_a'")):
        out = subprocess.run([sys.executable, "-m", "probec", "run", str(a), str(second), "--port", "0",
                              "--duration", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 1, out.stderr
        assert expected in out.stderr and str(a) in out.stderr and str(second) in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "attached" not in out.stderr
