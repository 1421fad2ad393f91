"""The kernel matrix suite's pytest plugin (`-p matrix_plugin`): tests/kernels/matrix_*.py are what
`make kernel-matrix` (tests/kernels/run_matrix.py) runs on every kernel, this machine's and Debian
12's 6.1 under qemu, against core bundles built once on the host with `--kernel any`
(PROBEC_BUNDLES). Each test declares the rows of the results table it decides (construct x
backend) and what it found; a failed test marks its rows failed. The results go to the JSON file
named by PROBEC_MATRIX_OUT, from which tests/kernels/write_table.py writes docs/kernel-matrix.md.

The files are named matrix_*.py, so `pytest tests` does not collect them: they need the prebuilt
bundles, and the examples' tests run on this kernel in tests/test_examples.py already."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

OUT = os.environ.get("PROBEC_MATRIX_OUT")


@dataclass
class Row:
    """One cell of the table: a construct under a backend on this kernel."""
    construct: str
    backend: str
    result: str = ""              # "works", "falls back to X", "not available", "not run"
    detail: str = ""
    measured: dict = field(default_factory=dict)
    test: str = ""
    outcome: str = "not reached"  # the test's: passed, failed
    message: str = ""
    seconds: float = 0.0


_rows: list[Row] = []


class Matrix:
    def __init__(self, item):
        self.item = item

    def row(self, construct: str, backend: str) -> Row:
        r = Row(construct, backend, test=self.item.nodeid)
        _rows.append(r)
        return r


@pytest.fixture
def matrix(request) -> Matrix:
    return Matrix(request.node)


def bundles() -> Path:
    path = os.environ.get("PROBEC_BUNDLES")
    assert path and Path(path).is_dir(), "PROBEC_BUNDLES must name the folder of bundles run_matrix.py built"
    return Path(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    mine = [r for r in _rows if r.test == item.nodeid]
    if report.when == "call" or (report.when == "setup" and not report.passed):
        for r in mine:
            r.outcome = "known failure" if hasattr(report, "wasxfail") and report.skipped else report.outcome
            if r.outcome == "known failure":
                r.result, r.detail = "", report.wasxfail
            r.seconds = round(report.duration, 1)
            if not report.passed:
                text = str(report.longrepr)
                lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
                r.message = " ".join(ln[1:].strip() for ln in lines[:3])[:400] or text[-400:]


def _write(exitstatus: int | None) -> None:
    if not OUT:
        return
    Path(OUT).parent.mkdir(parents=True, exist_ok=True)
    Path(OUT).write_text(json.dumps({"kernel": platform.release(), "exitstatus": exitstatus,
                                     "rows": [asdict(r) for r in _rows]}, indent=1) + "\n")


def pytest_runtest_logfinish(nodeid, location):
    """After every test, so a run killed at its time limit still tells what it found."""
    _write(None)


def pytest_sessionfinish(session, exitstatus):
    _write(int(exitstatus))
