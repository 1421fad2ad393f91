"""Shared fixtures. Kernel tests need root, tracefs and the tools; under CI=true a missing
prerequisite fails the test instead of skipping it, so CI can never pass without running them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ROOT / "tests" / "workloads" / "build"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files from current output")


def _fail_skip_under_ci(report) -> None:
    """CI installs everything the tests need (scripts/setup.sh), so a skip there can only hide a
    missing feature or a broken set-up: under CI=true every skip, wherever it is raised, fails."""
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where nothing may be skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_under_ci(outcome.get_result())


def kernel_unavailable(need_bpftrace: bool = False, need_clang: bool = False) -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not os.path.isdir("/sys/kernel/tracing/events/sched"):
        try:
            subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=True,
                           capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return "tracefs is not mounted and cannot be mounted"
    if need_bpftrace and shutil.which("bpftrace") is None:
        return "bpftrace is not installed"
    if need_clang and shutil.which("clang") is None:
        return "clang is not installed"
    return None


def require_kernel(need_bpftrace: bool = False, need_clang: bool = False) -> None:
    reason = kernel_unavailable(need_bpftrace, need_clang)
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"kernel test cannot run under CI: {reason}")
    pytest.skip(reason)


def require_core_kernel() -> None:
    """Kernel tests of the core backend: clang, and bpftool once for vmlinux.h."""
    require_kernel(need_clang=True)
    if shutil.which("bpftool") is None and not os.environ.get("PROBEC_VMLINUX_H"):
        reason = "bpftool is not installed (needed once to generate vmlinux.h)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def bcc_unavailable() -> str | None:
    """Why the bcc backend cannot run here: BCC's Python module and kernel headers (the runtime's
    own look-ups, so a test and `probec run` agree)."""
    from probec.host.headers import find_kernel_headers
    from probec.runtime.bcc_runner import import_bcc
    from probec.runtime.manifest import BundleError
    try:
        import_bcc()
    except BundleError as exc:
        return str(exc)
    if find_kernel_headers() is None:
        return "no kernel headers for BCC to compile against"
    return None


def bcc_headers_match() -> bool:
    """Whether the kernel headers BCC finds here are the running kernel's."""
    from probec.host.headers import find_kernel_headers
    headers = find_kernel_headers()
    return headers is not None and headers.matches


def require_bcc_kernel() -> None:
    require_kernel(need_clang=True)
    reason = bcc_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"bcc kernel test cannot run under CI: {reason}")
    pytest.skip(reason)


def require_backend(name: str) -> None:
    if name == "bcc":
        require_bcc_kernel()
    else:
        require_kernel(need_bpftrace=name == "bpftrace", need_clang=name == "core")


@pytest.fixture(params=["bpftrace", "core", "bcc"])
def backend(request, workloads):
    """Each backend in turn, for kernel tests that must hold under the prototype, production and
    BCC paths alike (a module may define its own, as test_examples does)."""
    require_backend(request.param)
    return request.param


@pytest.fixture(scope="session")
def workloads() -> Path:
    """Build the test workloads once per session."""
    result = subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "workloads")], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"building tests/workloads failed:\n{result.stderr}")
    return WORKLOADS


@pytest.fixture
def bpftrace_kernel():
    require_kernel(need_bpftrace=True)


def probec(*args: str, timeout: float = 120, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the probec CLI as a user would."""
    return subprocess.run([sys.executable, "-m", "probec", *args], capture_output=True, text=True,
                          timeout=timeout, check=check, cwd=kw.pop("cwd", ROOT), **kw)
