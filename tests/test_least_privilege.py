"""`probec run` with only the capabilities it needs, not as full root: every other capability is
dropped with setpriv (inheritable, ambient and bounding sets), as a Kubernetes pod's
`capabilities: {drop: [ALL], add: [...]}` drops them, and the counts are exact.

What is needed was measured on this kernel and is what host/capabilities.py computes:
- uid 0: CAP_BPF and CAP_PERFMON for tracepoints, both backends;
- uprobes and USDT: CAP_SYS_ADMIN too, on kernels with the fix of CVE-2025-38466 (this one);
- another uid: the core backend with CAP_DAC_READ_SEARCH too (tracefs is root's); bpftrace refuses.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, WORKLOADS, require_kernel
from harness import Run, build, value, workload, write_spec

pytestmark = pytest.mark.kernel

NOBODY = 65534
DEBIAN_PYTHON = "/usr/bin/python3.11"     # readable by every uid (pyenv's lives under /root, mode 0700)

SPEC = """
name: least_{name}
binaries:
  pwork: $WORK/libpwork.so
metrics:
  lp_getpid_total:
    count: tracepoint:syscalls:sys_enter_getpid
    filter: comm == "lpwork"
"""
UPROBE_METRIC = """
  lp_records_total:
    count: uprobe:pwork:pwork_record
    filter: comm == "lpwork"
"""


def dropped(*caps: str, uid: int | None = None) -> tuple[str, ...]:
    """setpriv keeping only `caps` (names like "bpf") in every set, optionally as another uid."""
    keep = ",".join(["-all", *(f"+{c}" for c in caps)])
    ids = (f"--reuid={uid}", f"--regid={uid}", "--clear-groups") if uid is not None else ()
    return ("setpriv", *ids, f"--inh-caps={keep}", f"--ambient-caps={keep}", f"--bounding-set={keep}")


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A folder every uid can read and write (pytest's tmp_path sits under a 0700 folder)."""
    folder = Path("/tmp") / f"probec-least-privilege-{os.getpid()}-{tmp_path.name}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def bundle(shared: Path, backend: str, uprobes: bool) -> Path:
    name = f"{backend}_{'uprobe' if uprobes else 'tp'}"
    spec = write_spec(shared, SPEC.format(name=name) + (UPROBE_METRIC if uprobes else ""), f"{name}.yaml")
    out = build(spec, backend, shared / name)
    for path in [out, *out.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    return out


def counted(run: Run, uprobes: bool) -> dict:
    workload("pwork", "--comm", "lpwork", "getpid", "7")
    workload("pwork", "--comm", "lpwork", "record", "1", "2", "3")
    workload("pwork", "--comm", "other", "getpid", "5")
    return run.stop()


def doctor(prefix: tuple[str, ...], python: str = sys.executable, env: dict | None = None) -> dict:
    out = subprocess.run([*prefix, python, "-m", "probec", "doctor", "--format", "json"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["privileges"]


def refused(prefix: tuple[str, ...], target: Path, python: str = sys.executable, env: dict | None = None) -> str:
    out = subprocess.run([*prefix, python, "-m", "probec", "run", str(target), "--port", "0", "--duration", "1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    return out.stderr


def uprobes_need_sys_admin() -> bool:
    from probec.host.capabilities import uprobes_need_sys_admin as probe
    found = probe()
    assert found is not None, "running as root, the kernel's answer is known"
    return found


@pytest.mark.parametrize("backend", ["bpftrace", "core"])
def test_tracepoints_with_cap_bpf_and_cap_perfmon_only(backend, workloads, shared):
    require_kernel(need_bpftrace=backend == "bpftrace", need_clang=backend == "core")
    prefix = dropped("bpf", "perfmon")
    privileges = doctor(prefix)
    assert privileges["uid"] == 0 and privileges["capabilities"] == ["CAP_BPF", "CAP_PERFMON"]
    metrics = counted(Run(bundle(shared, backend, uprobes=False), shared, prefix=prefix), uprobes=False)
    assert value(metrics, "lp_getpid_total") == 7


@pytest.mark.parametrize("backend", ["bpftrace", "core"])
def test_uprobes_and_what_they_need_on_this_kernel(backend, workloads, shared):
    """On a kernel with the CVE-2025-38466 fix, uprobes need CAP_SYS_ADMIN: without it, `probec run`
    says so before loading anything; with it, the counts are exact. On a kernel without the fix,
    CAP_BPF and CAP_PERFMON count them."""
    require_kernel(need_bpftrace=backend == "bpftrace", need_clang=backend == "core")
    target = bundle(shared, backend, uprobes=True)
    minimal = dropped("bpf", "perfmon")
    if uprobes_need_sys_admin():
        assert doctor(minimal)["missing"] == ["CAP_SYS_ADMIN"]
        message = refused(minimal, target)
        assert "lacks CAP_SYS_ADMIN" in message and "CVE-2025-38466" in message, message
        minimal = dropped("bpf", "perfmon", "sys_admin")
    metrics = counted(Run(target, shared, prefix=minimal), uprobes=True)
    assert value(metrics, "lp_getpid_total") == 7
    assert value(metrics, "lp_records_total") == 3


@pytest.fixture
def runtime_only(shared: Path) -> dict:
    """The environment of a uid that cannot read /root: Debian's Python 3.11, the checkout, and a
    copy of prometheus_client (the runtime's only dependency)."""
    if not os.path.exists(DEBIAN_PYTHON):
        pytest.fail(f"{DEBIAN_PYTHON} is missing: the non-root test runs the runtime with Debian's Python")
    import prometheus_client
    site = shared / "site"
    shutil.copytree(Path(prometheus_client.__file__).parent, site / "prometheus_client")
    for path in [site, *site.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{site}"}


def test_core_as_another_uid(workloads, shared, runtime_only):
    require_kernel(need_clang=True)
    target = bundle(shared, "core", uprobes=False)
    caps = ("bpf", "perfmon", "dac_read_search")
    prefix = dropped(*caps, uid=NOBODY)
    privileges = doctor(prefix, DEBIAN_PYTHON, runtime_only)
    assert privileges["uid"] == NOBODY
    assert privileges["missing"] == (["CAP_SYS_ADMIN"] if uprobes_need_sys_admin() else [])   # uprobes only
    assert privileges["capabilities"] == ["CAP_BPF", "CAP_DAC_READ_SEARCH", "CAP_PERFMON"]
    metrics = counted(Run(target, shared, prefix=prefix, python=DEBIAN_PYTHON, env=runtime_only), uprobes=False)
    assert value(metrics, "lp_getpid_total") == 7

    # without CAP_DAC_READ_SEARCH it cannot read tracefs: doctor names it, run says so before loading anything
    text = subprocess.run([*dropped("bpf", "perfmon", uid=NOBODY), DEBIAN_PYTHON, "-m", "probec", "doctor"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=runtime_only)
    assert text.returncode == 0 and "Traceback" not in text.stderr, text.stderr
    lacking = next(line for line in text.stdout.splitlines() if line.startswith("capabilities lacking"))
    assert "CAP_DAC_READ_SEARCH" in lacking and "not readable by this process" in text.stdout
    message = refused(dropped("bpf", "perfmon", uid=NOBODY), target, DEBIAN_PYTHON, runtime_only)
    assert "lacks CAP_DAC_READ_SEARCH" in message and "tracefs" in message, message

    # bpftrace refuses every uid but 0: probec says so instead of bpftrace's own line
    message = refused(prefix, bundle(shared, "bpftrace", uprobes=False), DEBIAN_PYTHON, runtime_only)
    assert "runs only as uid 0" in message and "--backend core" in message, message


def test_kernels_before_cap_bpf_need_cap_sys_admin():
    """Kernels before 5.8 (cap_last_cap 37: Ubuntu 20.04's 5.4) have no CAP_BPF or CAP_PERFMON:
    root's CAP_SYS_ADMIN loads and attaches there, and `probec run` must not refuse it for lacking
    capabilities that kernel does not have (it did, seen in the 5.4 guest of the kernel matrix)."""
    from probec.host.capabilities import CAPABILITIES, run_privileges
    root_on_5_4 = set(CAPABILITIES) - {"CAP_BPF", "CAP_PERFMON"}
    old = run_privileges({"tracepoint"}, uid=0, have=root_on_5_4, last_cap=37)
    assert old.error("core") is None and "CAP_SYS_ADMIN" in old.needed and "CAP_BPF" not in old.needed
    assert "CAP_SYS_ADMIN" in run_privileges({"tracepoint"}, uid=0, have=set(), last_cap=37).error("core")
    new = run_privileges({"tracepoint"}, uid=0, have={"CAP_SYS_ADMIN"}, last_cap=40)
    assert new.missing[:2] == ("CAP_BPF", "CAP_PERFMON"), new
