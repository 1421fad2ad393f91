"""Error cases are data: tests/errors/CASE.yaml and CASE.expected, the lines `probec check` must
print (headlines and help lines; the repository root written as $ROOT). Regenerate with
`pytest --update-golden` and read the diff before committing it."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, probec

CASES = sorted((ROOT / "tests" / "errors").glob("*.yaml"))


def essential_lines(output: str) -> list[str]:
    keep = []
    for line in output.splitlines():
        if line.startswith("tests/errors/") or line.startswith("  help:"):
            keep.append(line.replace(str(ROOT), "$ROOT"))
    return keep


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_error_case(case: Path, workloads, request):
    result = probec("check", str(case.relative_to(ROOT)), timeout=30)   # bad input never hangs
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    got = essential_lines(result.stderr)
    expected_file = case.with_suffix(".expected")
    if request.config.getoption("--update-golden"):
        expected_file.write_text("\n".join(got) + "\n")
    expected = expected_file.read_text().splitlines()
    assert got == expected
    # Every error names its file, line and column, and a stable code.
    assert all(":" in line and "[E" in line or "[W" in line for line in got if not line.startswith("  help:"))
