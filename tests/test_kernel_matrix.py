"""The kernel matrix's table (docs/kernel-matrix.md) is generated from its results
(docs/kernel-matrix.json) by tests/kernels/write_table.py, never edited by hand, and covers every
example. The matrix itself runs in guests (`make kernel-matrix`, called by .ci/run)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

KERNELS = ROOT / "tests" / "kernels"
sys.path.insert(0, str(KERNELS))

import run_matrix  # noqa: E402
import write_table  # noqa: E402


def row(construct: str, backend: str, result: str = "works", outcome: str = "passed", message: str = "") -> dict:
    return {"construct": construct, "backend": backend, "result": result, "detail": "", "measured": {},
            "test": "t", "outcome": outcome, "message": message, "seconds": 1.0}


def test_the_committed_table_is_what_the_committed_results_make(tmp_path):
    out = tmp_path / "kernel-matrix.md"
    result = subprocess.run([sys.executable, str(KERNELS / "write_table.py"), str(ROOT / "docs" / "kernel-matrix.json"),
                             str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == (ROOT / "docs" / "kernel-matrix.md").read_text(), \
        "docs/kernel-matrix.md was edited by hand: run `make kernel-matrix` (or write_table.py) again"


def test_the_committed_results_cover_every_example_on_both_kernels():
    results = json.loads((ROOT / "docs" / "kernel-matrix.json").read_text())
    examples = {p.parent.name for p in (ROOT / "examples").glob("*/spec.yaml")}
    for kernel in ("host", "6.1"):
        constructs = {r["construct"].split(":")[0] for run in results["runs"] if run["kernel"] == kernel
                      for r in run["rows"]}
        assert examples <= constructs, (kernel, examples - constructs)


def test_a_failed_test_and_a_timed_out_guest_show_in_the_table():
    results = {"build_failures": [], "runs": [
        {"kernel": "host", "uname": "6.18.1", "suite": "core", "rc": 1, "seconds": 20, "boot_seconds": 0,
         "rows": [row("runqueue: x", "core", outcome="failed", message="AssertionError: 406 <= 400 | bad"),
                  row("send_latency: y", "core", result="falls back to syscall:sendto")]},
        {"kernel": "6.1", "uname": None, "suite": "core", "rc": 124, "seconds": 360, "boot_seconds": 14, "rows": []}]}
    text = write_table.render(results)
    assert "| runqueue: x | core | **FAILS**: AssertionError: 406 <= 400 \\| bad | not run |" in text
    assert "| send_latency: y | core | falls back to syscall:sendto | not run |" in text
    assert "| 6.1 (qemu, software emulation) | core | timed out | 360 | 14 | not recorded | not recorded |" in text


def test_a_run_of_some_kernels_and_suites_keeps_the_others_in_the_docs():
    """--write-docs replaces the runs of the kernels and suites it ran and keeps the rest, each with
    the commit it tested, in one order whatever order they were run in."""
    def one(kernel, suite, commit):
        return {"kernel": kernel, "uname": None, "suite": suite, "commit": commit, "rc": 0, "seconds": 1,
                "boot_seconds": 0, "rows": [row(f"c: {suite}", "core", result=commit)]}
    kept = {"build_failures": [{"construct": "old"}],
            "runs": [one("host", "spans", "a1"), one("6.1", "spans", "a1"), one("6.1", "core-kernel", "a1")]}
    new = {"build_failures": [], "runs": [one("5.10", "core-kernel", "b2"), one("6.1", "spans", "b2")]}
    merged = run_matrix.merge_runs(kept, new)
    assert [(r["kernel"], r["suite"], r["commit"]) for r in merged["runs"]] == [
        ("host", "spans", "a1"), ("6.1", "core-kernel", "a1"), ("6.1", "spans", "b2"), ("5.10", "core-kernel", "b2")]
    assert merged["build_failures"] == []
    text = write_table.render(merged)
    assert "| c: spans | core | a1 | b2 | not run |" in text, text
