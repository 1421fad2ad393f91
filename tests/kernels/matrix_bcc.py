"""The bcc backend on this kernel: BCC compiles each bundle here, at start, against this kernel's
headers. On Debian's 6.1 (the guest) the installed headers (linux-headers-6.1.0-57) are the running
kernel's, so constructs that read kernel structs through them (`socket(fd)`) really run there; on
a host whose headers are another kernel's they are refused (W530, E501) and the table says why.
The examples run through tests/test_examples.py's tests, as for the other backends; bcc builds
its bundles here (a bcc bundle is compiled where it runs), not on the host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import matrix_examples as mx
import test_bcc_backend as tb
import test_examples as ex
import test_target_changes as tt
from conftest import WORKLOADS, bcc_headers_match, probec, require_bcc_kernel
from harness import Run, build, buckets, per_bucket, value
from matrix_plugin import bundles
from prometheus_server import free_port

pytestmark = pytest.mark.kernel
SPECS = Path(__file__).parent / "specs"
HEADERS = "kernel headers of another kernel than this one (W530): socket(fd) refused (E501)"
SOCKET = "socket(fd): span keyed by the socket of a syscall's fd (task, files, file, socket)"


@pytest.fixture(autouse=True)
def bcc_here(tmp_path_factory, monkeypatch):
    """BCC and headers here; the header tree the runtime joins for BCC goes to a writable folder
    (the guest sees this machine's /var/cache read-only). run_matrix.py built the workloads."""
    require_bcc_kernel()
    monkeypatch.setenv("PROBEC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def headers_detail() -> str:
    from probec.host.headers import find_kernel_headers
    h = find_kernel_headers()
    return f"headers {h.release}, kernel {h.running}" if h is not None else "no kernel headers"


@pytest.mark.parametrize("backend", ["core", "bcc"])
def test_socket_fd(tmp_path, matrix, backend):
    """A request span keyed by socket(args.fd), from the client's first send to its recv of the
    answer on the same socket (tests/workloads/handoff.py): every request is one span of at least
    the client's pause between its two sends. A wrong key (0, or bytes of another struct) would pair
    the client's send with the server thread's recv that follows at once, and the spans would be
    short. Core (through BTF, bundle built on the host) beside bcc (through the headers)."""
    row = matrix.row(SOCKET, backend)
    spec = SPECS / "socket_fd.yaml"
    if backend == "bcc" and not bcc_headers_match():
        refused = probec("build", str(spec), "--backend", "bcc", "-o", str(tmp_path / "bundle"))
        assert refused.returncode == 1, refused.stderr
        assert "warning[W530]" in refused.stderr and "cannot do socket(fd) with these kernel headers" in refused.stderr
        row.result, row.detail = "not available", f"{HEADERS}; {headers_detail()}"
        return
    rounds, pause_us, work_us = 10, 10000, 2000
    bundle = bundles() / "socket_fd.core" if backend == "core" else build(spec, "bcc", tmp_path / "bundle")
    run = Run(bundle, tmp_path, port=free_port())
    try:
        subprocess.run([sys.executable, str(WORKLOADS.parent / "handoff.py"), str(rounds), str(pause_us),
                        str(work_us)], check=True, timeout=120)
        metrics = run.stop()
    finally:
        run.kill()
    assert value(metrics, "request_seconds_count") == rounds
    hist = per_bucket(buckets(metrics, "request_seconds"))
    assert hist["0.005"] == 0, hist          # each at least the 10 ms pause
    assert value(metrics, "request_seconds_sum") >= rounds * pause_us / 1e6
    row.result, row.detail = "works", headers_detail() if backend == "bcc" else ""
    row.measured = {"mean_request_ms": round(value(metrics, "request_seconds_sum") / rounds * 1000, 2)}


def test_send_latency(tmp_path, matrix):
    """The `kernel:` span under bcc: no fentry (BTF), so kprobe where the kernel has kprobes, else
    the syscall fallback; the runtime says which it used."""
    row = matrix.row(mx.CONSTRUCTS["send_latency"], "bcc")
    from probec.host.features import kprobes_available
    ex.test_send_latency(tmp_path, "bcc")
    stderr = (tmp_path / "run.stderr").read_text()
    used = next((label for label in ("kprobe:tcp_sendmsg", "syscall:sendto")
                 if f"span_send: using {label} on this kernel" in stderr), None)
    assert used == ("kprobe:tcp_sendmsg" if kprobes_available() else "syscall:sendto"), stderr
    assert "fentry:tcp_sendmsg (needs kernel BTF" in stderr, stderr
    row.result = mx.result_of(used)


def test_runqueue(tmp_path, matrix):
    row = matrix.row(mx.CONSTRUCTS["runqueue"], "bcc")
    ex.work("runq", "2", "1000")
    ex.test_runqueue(tmp_path, "bcc")
    row.result = "works"


def test_retransmits(tmp_path, matrix):
    """Keyed by socket(fd) (the headers must be this kernel's) and on sock:sock_recv_length (6.3)."""
    row = matrix.row(mx.CONSTRUCTS["retransmits"], "bcc")
    missing = mx.missing_tracepoints("retransmits")
    if missing or not bcc_headers_match():
        refused = probec("build", str(ex.EXAMPLES / "retransmits" / "spec.yaml"), "--backend", "bcc",
                         "-o", str(tmp_path / "bundle"))
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert all(tp in refused.stderr for tp in missing), refused.stderr
        why = [f"no tracepoint {', '.join(missing)} on this kernel"] if missing else []
        if not bcc_headers_match():
            assert "cannot do socket(fd) with these kernel headers" in refused.stderr, refused.stderr
            why.append(f"{HEADERS}; {headers_detail()}")
        row.result, row.detail = "not available", "; ".join(why)
        return
    ex.test_retransmits(tmp_path, "bcc", drop=True)
    row.result = "works"


def test_inference(tmp_path, matrix):
    mx.test_inference(tmp_path, "bcc", matrix)


@pytest.mark.parametrize("missing", ["", "ring_buffer"], ids=["ring_buffer", "perf_buffer"])
def test_events_mechanism(tmp_path, matrix, monkeypatch, missing):
    """Events through the ring buffer, and through the perf buffer BCC compiles for kernels before
    5.8 (forced with PROBEC_PRETEND_MISSING): every event written or counted lost."""
    row = matrix.row("events: ring buffer, else perf buffer (kernels before 5.8)"
                     + (" (perf buffer forced)" if missing else ""), "bcc")
    tb.test_events_and_drops_are_counted_as_core_counts_them(tmp_path, WORKLOADS, monkeypatch, missing)
    row.result = "works (perf_buffer)" if missing else "works (ring_buffer)"


def test_pid_file(tmp_path, matrix):
    """--pid-file: the target restarts with a new pid, which the runtime writes into the program's
    target map (nothing compiled again); every call of both processes and no other is counted."""
    row = matrix.row("--pid-file: follows a restarted target process", "bcc")
    tt.test_pid_file_follows_a_restarted_target(tmp_path, "bcc")
    row.result = "works"
