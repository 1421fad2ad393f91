"""Error cases are data: tests/errors/CASE.yaml and CASE.expected, the lines `probec check` must
print (headlines and help lines; the repository root written as $ROOT). Regenerate with
`pytest --update-golden` and read the diff before committing it.

The goldens are checked against recorded host facts (tests/hosts/), so they hold on any kernel;
a second pass checks the same cases against the real host and must agree with the recording
wherever the real host's facts are the recorded ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, probec

CASES = sorted((ROOT / "tests" / "errors").glob("*.yaml"))
RECORDED = ROOT / "tests" / "hosts" / "firecracker-6.18.json"


def essential_lines(output: str) -> list[str]:
    keep = []
    for line in output.splitlines():
        if line.startswith("tests/errors/") or line.startswith("  help:"):
            keep.append(line.replace(str(ROOT), "$ROOT"))
    return keep


def check_case(case: Path, *target: str) -> list[str]:
    result = probec("check", *target, str(case.relative_to(ROOT)), timeout=30)   # bad input never hangs
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    got = essential_lines(result.stderr)
    # Every error names its file, line and column, and a stable code.
    assert all(":" in line and "[E" in line or "[W" in line for line in got if not line.startswith("  help:"))
    return got


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_error_case(case: Path, workloads, request):
    got = check_case(case, "--target", str(RECORDED))
    expected_file = case.with_suffix(".expected")
    if request.config.getoption("--update-golden"):
        expected_file.write_text("\n".join(got) + "\n")
    assert got == expected_file.read_text().splitlines()


@pytest.fixture(scope="module")
def live_facts_match_recording() -> bool:
    """Whether this machine's kernel is the recorded one: same mechanisms, same tracepoints."""
    live = json.loads(probec("doctor", "--format", "json", check=True).stdout)
    recorded = json.loads(RECORDED.read_text())
    return all(live[k] == recorded[k] for k in ("mechanisms", "tracepoints"))


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_error_case_on_this_host(case: Path, workloads, live_facts_match_recording):
    """Against the real host, the kernel is named 'this kernel' instead of the target's release;
    otherwise the diagnostics are the recorded ones wherever this host is the recorded machine."""
    got = check_case(case)
    if not live_facts_match_recording:
        return
    recorded = json.loads(RECORDED.read_text())
    target = f"the target kernel ({recorded['kernel']})"
    expected = [line.replace(target, "this kernel") for line in case.with_suffix(".expected").read_text().splitlines()]
    assert got == expected
