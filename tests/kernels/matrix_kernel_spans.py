"""`kernel:` spans on each mechanism, on the same sends: tcp_sendmsg on fentry/fexit and on
kprobe/kretprobe, and the sendto syscall around it (the fallback), all three at once in one
bundle (tests/kernels/specs/send_mechanisms.yaml). Where the kernel lacks a mechanism, a bundle
that needs it must refuse to load, naming the probe and what works instead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import test_examples as ex
from harness import Run, Timed, assert_histogram_matches, build, buckets, per_bucket, value
from matrix_plugin import bundles
from prometheus_server import free_port

pytestmark = pytest.mark.kernel
SPECS = Path(__file__).parent / "specs"
MECHANISMS = {"fentry": "fentry/fexit", "kprobe": "kprobe/kretprobe"}
N, SIZE, M, PAUSE_MS = 200, 1000, 3, 20


def available(backend: str = "core") -> dict[str, bool]:
    from probec.host.features import kprobes_available, probe_fentry
    return {"fentry": bool(probe_fentry()) and (backend != "bpftrace" or bpftrace_kfunc()),
            "kprobe": kprobes_available()}


def bpftrace_kfunc() -> bool:
    """Whether bpftrace itself takes kfunc probes here: 0.17 says no on Debian 11's 5.10, whose
    fentry programs load and attach (`bpftrace --info`: "kfunc: no")."""
    info = subprocess.run(["bpftrace", "--info"], capture_output=True, text=True, timeout=120)
    return "kfunc: yes" in info.stdout + info.stderr


def bundle_for(name: str, backend: str, tmp_path: Path) -> Path:
    """The core bundle built on the host (--kernel any); a bpftrace script built here."""
    if backend == "core":
        return bundles() / f"{name}.core"
    return build(SPECS / f"{name}.yaml", backend, tmp_path / f"{name}.bpftrace", "--kernel", "any")


def assert_sum_within_buckets(cumulative: dict[str, float], total: float) -> None:
    """A histogram's sum lies between what its buckets allow: each observation above the edge
    below its bucket and at most its own edge. (On 6.1, bpf_get_current_comm leaves the bytes
    after the name's NUL as they were: a comm label read into an uninitialised buffer made many
    kernel keys for one series, and the sum kept only one of them.)"""
    edges = sorted((float(le), n) for le, n in per_bucket(cumulative).items())
    low = high = 0.0
    previous = 0.0
    for edge, n in edges:
        if n:
            low += n * previous
            high += n * edge
        previous = edge
    assert low - 1e-9 <= total <= high + 1e-9, (low, total, high, cumulative)


def refusal(bundle: Path, tmp_path: Path) -> str:
    """`probec run` of a bundle this kernel cannot attach: its error, which must say why."""
    result = subprocess.run([sys.executable, "-m", "probec", "run", str(bundle), "--port", str(free_port()),
                             "--duration", "5"], capture_output=True, text=True, timeout=180)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.mark.parametrize("backend", ["core", "bpftrace"])
def test_tcp_sendmsg_on_each_mechanism(tmp_path, backend, matrix):
    have = available(backend)
    rows = {m: matrix.row(f"kernel: span on {what} (tcp_sendmsg)", backend) for m, what in MECHANISMS.items()}
    fallback = matrix.row("kernel: span fallback syscall:sendto, on the same sends", backend)
    for m, ok in have.items():
        if ok:
            continue
        err = refusal(bundle_for(f"send_{m}", backend, tmp_path / m), tmp_path)
        if backend == "core":
            # The runtime names the probe that failed and what attaches on this kernel.
            assert f"{m}:tcp_sendmsg" in err and "what attaches on this kernel" in err, err
        else:
            assert "tcp_sendmsg" in err or "kfunc" in err, err
        why = {"kprobe": "no CONFIG_KPROBES", "fentry": "BPF function tracing refused"}[m]
        if m == "fentry" and available()["fentry"]:
            why = "the kernel loads fentry programs, but bpftrace says 'kfunc: no' here (--info)"
        rows[m].result, rows[m].detail = "not available", why
    if not all(have.values()):
        fallback.result, fallback.detail = "not compared", "needs both mechanisms on this kernel"
        return

    out: list[str] = []
    run = Run(bundle_for("send_mechanisms", backend, tmp_path), tmp_path, port=free_port())
    try:
        out.append(ex.work("sendlat", str(N), str(SIZE), str(M), str(PAUSE_MS)))
        metrics = run.stop()
    finally:
        run.kill()
    measured = Timed([int(line) / 1e9 for line in out[0].split()])
    assert len(measured.outer) == N + M
    names = {"fentry": "send_fentry_seconds", "kprobe": "send_kprobe_seconds", "syscall": "send_syscall_seconds"}
    for how, name in names.items():
        # Every send() is one sendto and one tcp_sendmsg: exact counts on every mechanism.
        assert value(metrics, f"{name}_count", comm="sl_client") == N + M, how
        assert value(metrics, f"{name}_count", comm="sl_server") == M, how
        # Each inside the caller's own clock around send().
        assert_histogram_matches(buckets(metrics, name, comm="sl_client"),
                                 value(metrics, f"{name}_sum", comm="sl_client"), measured)
        for comm in ("sl_client", "sl_server"):
            assert_sum_within_buckets(buckets(metrics, name, comm=comm), value(metrics, f"{name}_sum", comm=comm))
        # The M 4 MiB sends wait out the server's pause inside tcp_sendmsg.
        client = per_bucket(buckets(metrics, name, comm="sl_client"))
        assert sum(n for le, n in client.items() if le == "+Inf" or float(le) > 0.016384) >= M, how
    # tcp_sendmsg runs inside sendto, call by call: at every edge the kernel spans hold at least
    # as many sends as the syscall span, and their total is smaller.
    syscall = buckets(metrics, names["syscall"], comm="sl_client")
    total = {how: value(metrics, f"{name}_sum", comm="sl_client") for how, name in names.items()}
    for how in MECHANISMS:
        inner = buckets(metrics, names[how], comm="sl_client")
        assert all(inner[le] >= syscall[le] for le in syscall), (how, inner, syscall)
        assert total[how] < total["syscall"], (how, total)
        rows[how].result = "works"
        rows[how].measured = {"mean_us": round(total[how] / (N + M) * 1e6, 2)}
    fallback.result = "works"
    fallback.measured = {"mean_us": round(total["syscall"] / (N + M) * 1e6, 2),
                         "above_fentry_us": round((total["syscall"] - total["fentry"]) / (N + M) * 1e6, 2),
                         "above_kprobe_us": round((total["syscall"] - total["kprobe"]) / (N + M) * 1e6, 2)}
    fallback.detail = f"{N} sends of {SIZE} B and {M} of 4 MiB"
