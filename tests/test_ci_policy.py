"""Under CI=true no test may skip: every skip, at collection or in a test, becomes a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SKIPPING = '''
import pytest
pytestmark = pytest.mark.skipif(True, reason="module-level skipif")
def test_marked(): pass
'''
SKIPPING_INSIDE = '''
import pytest
def test_inside(): pytest.skip("inside")
@pytest.mark.xfail(reason="known and declared")
def test_xfail(): assert 0
'''


def run_pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          capture_output=True, text=True, env=env, cwd=folder, timeout=120)


def test_skips_fail_only_under_ci(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_a.py").write_text(SKIPPING)
    (tmp_path / "test_b.py").write_text(SKIPPING_INSIDE)
    local = run_pytest(tmp_path, None)
    assert local.returncode == 0 and "2 skipped, 1 xfailed" in local.stdout, local.stdout
    ci = run_pytest(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout
    assert "1 failed, 1 xfailed, 1 error" in ci.stdout, ci.stdout
    assert ci.stdout.count("skipped under CI=true") >= 2
