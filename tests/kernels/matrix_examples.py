"""Every example on this kernel: the core bundle built once on the host with --kernel any
(PROBEC_BUNDLES), and the bpftrace backend built here, against the examples' workloads, checked
with the same numbers as tests/test_examples.py (whose tests these call)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

import test_examples as ex
from conftest import ROOT, probec
from harness import Run, build, value
from matrix_plugin import bundles
from prometheus_server import free_port

pytestmark = pytest.mark.kernel
BACKENDS = ["core", "bpftrace"]
TESTS_WORK = ROOT / "tests" / "workloads" / "build"

CONSTRUCTS = {
    "send_latency": "send_latency: span kernel:tcp_sendmsg, fallback syscall:sendto",
    "runqueue": "runqueue: tracepoint span keyed by fields (sched_wakeup to sched_switch)",
    "retransmits": "retransmits: span keyed by socket(fd), within by args.skaddr, tcp_retransmit_skb",
    "correlation": "correlation: uprobe span, within, off-CPU from sched_switch, parts, sampled events",
    "inference": "inference: C++ uprobe span by demangled name, counter within, sum of arg1, events",
    "gpu": "gpu: CUDA uprobes (optional libraries) and a syscall span",
    "torch_serving": "torch_serving: PyTorch server, syscall span and libtorch uprobes",
}


@pytest.fixture(autouse=True)
def prebuilt(monkeypatch):
    """test_examples runs the core bundles built on the host; bpftrace builds its script here."""
    monkeypatch.setattr(ex, "PREBUILT", str(bundles()))
    for path in (ex.WORK / "sendlat", ex.WORK / "rtx_drop.bpf.o", TESTS_WORK / "inference"):
        assert path.exists(), f"{path} is missing: run_matrix.py builds the workloads on the host"


def mechanism(tmp_path: Path, backend: str, group: str) -> str:
    """Which variant of a `kernel:` span group ran: the core runtime says when it fell back; a
    bpftrace script holds only the variant its build chose for this kernel."""
    if backend == "core":
        manifest = json.loads((bundles() / "send_latency.core" / "manifest.json").read_text())
        labels = manifest["groups"][group]
        stderr = (tmp_path / "run.stderr").read_text()
        used = next((label for label in labels if f"{group}: using {label} on this kernel" in stderr), labels[0])
        return used
    script = next((tmp_path / "bundle").glob("*.bt")).read_text()
    if "kfunc:tcp_sendmsg" in script:
        return "fentry:tcp_sendmsg"
    if "kprobe:tcp_sendmsg" in script:
        return "kprobe:tcp_sendmsg"
    assert "sys_enter_sendto" in script, script
    return "syscall:sendto"


def expected_mechanism(backend: str) -> str:
    """The first variant this kernel can attach, as `probec doctor` finds it; a bpftrace script
    takes fentry only where bpftrace itself attaches kfunc probes (0.17 does not on 5.10)."""
    from probec.host.features import bpftrace_kfunc, kprobes_available, probe_fentry
    if probe_fentry() and (backend != "bpftrace" or bpftrace_kfunc() is not False):
        return "fentry:tcp_sendmsg"
    return "kprobe:tcp_sendmsg" if kprobes_available() else "syscall:sendto"


@functools.lru_cache(maxsize=None)
def kernel_features() -> dict:
    """What this kernel's BPF has, as bpftool finds it (its own probes, not probec's)."""
    out = subprocess.run(["bpftool", "feature", "probe", "kernel", "-j"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# manifest program kinds -> bpftool's program type names (core_mechanisms._PROG_TYPES)
BPFTOOL_TYPES = {"tracepoint": "tracepoint", "uprobe": "kprobe", "uretprobe": "kprobe", "usdt": "kprobe",
                 "kprobe": "kprobe", "kretprobe": "kprobe", "profile": "perf_event", "interval": "perf_event"}


def check_mechanisms(tmp_path: Path, name: str, row) -> None:
    """The core bundle's start line names the mechanisms this kernel has: ring buffer else perf
    buffer, task storage else hash, get_current_task_btf else get_current_task. On a kernel
    without them (5.10: no task storage, 5.4: no ring buffer) the fallbacks really ran, and the
    row says which."""
    manifest = json.loads((bundles() / f"{name}.core" / "manifest.json").read_text())
    feats = kernel_features()
    kinds = {BPFTOOL_TYPES[p["kind"]] for p in manifest["core"]["programs"] if p["kind"] in BPFTOOL_TYPES}
    has = lambda helper: all(f"bpf_{helper}" in feats["helpers"][f"{t}_available_helpers"] for t in kinds or {"kprobe"})
    task_btf = has("get_current_task_btf")
    expected = {"current_task": "get_current_task_btf" if task_btf else "get_current_task"}
    if manifest["core"].get("ringbuf"):
        expected["events"] = "ring_buffer" if feats["map_types"]["have_ringbuf_map_type"] and has("ringbuf_reserve") \
            else "perf_buffer"
    if any(s.get("task_map") for s in manifest["spans"]):
        expected["span_begin_times"] = "task_storage" if task_btf and has("task_storage_get") and \
            feats["map_types"]["have_task_storage_map_type"] else "hash"
    start = next(line for line in (tmp_path / "run.stderr").read_text().splitlines() if "attached (core)" in line)
    for feature, mechanism in expected.items():
        assert f"{feature}: {mechanism}" in start, (expected, start)
    if any(s["name"] == "probec_use_atomic_fetch" for s in manifest["core"]["settings"]):
        # bpftool has no probe for atomic fetch (5.12): the row reports what the loader found
        expected["event_counters"] = next(m for m in ("atomic_fetch_add", "add_then_read")
                                          if f"event_counters: {m}" in start)
    fallbacks = [f"{f} {m}" for f, m in sorted(expected.items())
                 if m in ("perf_buffer", "hash", "get_current_task", "add_then_read")]
    if fallbacks:
        row.detail = "; ".join(filter(None, [row.detail, "load-time fallbacks: " + ", ".join(fallbacks)]))


def result_of(used: str, first: str = "fentry:tcp_sendmsg") -> str:
    return f"works ({used})" if used == first else f"falls back to {used}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_send_latency(tmp_path, backend, matrix):
    row = matrix.row(CONSTRUCTS["send_latency"], backend)
    ex.test_send_latency(tmp_path, backend)
    used = mechanism(tmp_path, backend, "span_send")
    # The first variant this kernel can attach, as `probec doctor` finds it, and no other.
    assert used == expected_mechanism(backend), used
    row.result = result_of(used)
    if backend == "core":
        check_mechanisms(tmp_path, "send_latency", row)


def test_send_latency_core_on_kprobe(tmp_path, matrix, monkeypatch):
    """The `kernel:` span of the example's core bundle on its second variant, kprobe: the same
    bundle as above, loaded with PROBEC_PRETEND_MISSING=fentry, so the loader passes over fentry
    as on a kernel that refuses it; without kprobes it falls to the spec's fallback and says so."""
    from probec.host.features import kprobes_available
    row = matrix.row(CONSTRUCTS["send_latency"] + " (kprobe variant forced)", "core")
    monkeypatch.setenv("PROBEC_PRETEND_MISSING", "fentry")
    ex.test_send_latency(tmp_path, "core")
    used = mechanism(tmp_path, "core", "span_send")
    stderr = (tmp_path / "run.stderr").read_text()
    assert "(not fentry:tcp_sendmsg (not tried: PROBEC_PRETEND_MISSING=fentry)" in stderr, stderr
    if not kprobes_available():
        assert used == "syscall:sendto", used
        row.result, row.detail = f"falls back to {used}", "no CONFIG_KPROBES"
        return
    assert used == "kprobe:tcp_sendmsg", used
    row.result = "works (kprobe:tcp_sendmsg)"


def test_send_latency_bpftrace_on_kprobe(tmp_path, matrix, monkeypatch):
    """The `kernel:` span of the example on its second variant, kprobe: built with --target, from
    this kernel's own facts with fentry marked missing, as for a kernel that has kprobes only."""
    row = matrix.row(CONSTRUCTS["send_latency"] + " (kprobe variant forced)", "bpftrace")
    from probec.host.features import kprobes_available
    facts = json.loads(probec("doctor", "--format", "json").stdout)
    facts["mechanisms"]["fentry"] = False
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    out = tmp_path / "prebuilt"
    built = subprocess.run([sys.executable, "-m", "probec", "build", str(ex.EXAMPLES / "send_latency" / "spec.yaml"),
                            "--backend", "bpftrace", "--target", str(tmp_path / "facts.json"),
                            "-o", str(out / "send_latency.bpftrace")], capture_output=True, text=True, timeout=180)
    assert built.returncode == 0, built.stderr
    script = next((out / "send_latency.bpftrace").glob("*.bt")).read_text()
    if not kprobes_available():
        # The record says no kprobes either: the build falls back, and says so.
        assert "W311" in built.stderr and "kprobe:tcp_sendmsg" not in script, built.stderr
        row.result, row.detail = "not available", "no CONFIG_KPROBES"
        return
    assert "kprobe:tcp_sendmsg" in script and "kfunc:" not in script, script
    monkeypatch.setattr(ex, "PREBUILT", str(out))
    ex.test_send_latency(tmp_path, "bpftrace")
    row.result = "works (kprobe:tcp_sendmsg)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_runqueue(tmp_path, backend, matrix):
    row = matrix.row(CONSTRUCTS["runqueue"], backend)
    # Once before, untraced: in a guest the program and its libraries come over 9p, and a first
    # run's page faults wait for the host (blocking, then woken: wake-ups the count bounds leave out).
    ex.work("runq", "2", "1000")
    ex.test_runqueue(tmp_path, backend)
    row.result = "works"
    if backend == "core":
        check_mechanisms(tmp_path, "runqueue", row)


def missing_tracepoints(name: str) -> list[str]:
    """The tracepoints an example's spec names that this kernel does not have."""
    import re
    text = (ex.EXAMPLES / name / "spec.yaml").read_text()
    return sorted({tp for tp in re.findall(r"tracepoint:(\w+:\w+)", text)
                   if not Path("/sys/kernel/tracing/events", *tp.split(":")).is_dir()})


@pytest.mark.parametrize("backend", BACKENDS)
def test_retransmits(tmp_path, backend, matrix):
    row = matrix.row(CONSTRUCTS["retransmits"], backend)
    missing = missing_tracepoints("retransmits")
    if missing:
        # sock:sock_recv_length came in 6.3: the bundle refuses to start, and says which.
        bundle = bundles() / "retransmits.core" if backend == "core" else tmp_path / "bundle"
        cmd = [sys.executable, "-m", "probec", "run", str(bundle), "--port", str(free_port()), "--duration", "5"]
        if backend == "bpftrace":
            cmd = [sys.executable, "-m", "probec", "build", str(ex.EXAMPLES / "retransmits" / "spec.yaml"),
                   "--backend", "bpftrace", "-o", str(bundle)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert all(tp in result.stderr for tp in missing), result.stderr
        row.result, row.detail = "not available", f"no tracepoint {', '.join(missing)} on this kernel"
        return
    ex.test_retransmits(tmp_path, backend, drop=True)
    row.result = "works"
    if backend == "core":
        check_mechanisms(tmp_path, "retransmits", row)


@pytest.mark.parametrize("backend", BACKENDS)
def test_correlation(tmp_path, backend, matrix):
    row = matrix.row(CONSTRUCTS["correlation"], backend)
    ex.test_correlation(tmp_path, backend)
    row.result = "works"
    if backend == "core":
        check_mechanisms(tmp_path, "correlation", row)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference(tmp_path, backend, matrix):
    """examples/inference: 3 slow and 100 fast Forward calls, each making one Allocate(64). The
    fast ones come last, so the process still lives when the slow ones' user stacks are
    symbolised (bpftrace 0.17 can exit on a stack of a process that is gone: W504)."""
    row = matrix.row(CONSTRUCTS["inference"], backend)
    fast, slow = 100, 3
    metrics = ex.run_example(tmp_path, backend, "inference",
                             lambda: subprocess.run([str(TESTS_WORK / "inference"), "--comm", "inf_matrix", "forward",
                                                     str(slow), "60000", str(fast), "1000"],
                                                    check=True, timeout=120))
    assert value(metrics, "model_inference_duration_seconds_count", comm="inf_matrix") == fast + slow
    assert value(metrics, "model_allocations_total") == fast + slow
    assert value(metrics, "model_allocated_bytes_total") == 64 * (fast + slow)
    total = value(metrics, "model_inference_duration_seconds_sum", comm="inf_matrix")
    assert fast * 0.001 + slow * 0.060 <= total < fast * 0.001 + slow * 0.060 + 5.0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    # The slow calls only (over 50 ms), each with its user stack where Forward returns: in main.
    assert len(events) == slow, events
    assert all(e["duration_seconds"] >= 0.060 and e["comm"] == "inf_matrix" for e in events), events
    assert all(e["ustack"][0].startswith("main+") for e in events), events
    row.result = "works"
    if backend == "core":
        check_mechanisms(tmp_path, "inference", row)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_without_cuda(tmp_path, backend, matrix):
    """No CUDA device or library here or in the guest: the build leaves out the probes on the
    missing libraries, and what is left (the request span on syscalls) loads and attaches."""
    row = matrix.row(CONSTRUCTS["gpu"], backend)
    bundle = bundles() / "gpu.core" if backend == "core" else \
        build(ex.EXAMPLES / "gpu" / "spec.yaml", backend, tmp_path / "bundle")
    assert not Path(ex.LIBCUDA).exists(), "a CUDA host: run examples/gpu on its workload instead"
    run = Run(bundle, tmp_path, port=free_port())
    try:
        assert "attached" in run.stderr()
        run.stop()
    finally:
        run.kill()
    row.result, row.detail = "loads only", "CUDA probes left out at build (no libcuda here); its workload needs a GPU"


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_serving(tmp_path, backend, matrix, monkeypatch):
    """The demo's PyTorch CPU server (torch from this machine's Python, which the guest shares),
    run through tests/test_torch_serving.py's test with the bundle built on the host (core) or
    here (bpftrace) while the server imports torch, which this process never does."""
    row = matrix.row(CONSTRUCTS["torch_serving"], backend)
    import test_torch_serving as ts
    monkeypatch.setenv("TORCH_LIB", ts.TORCH_LIB)
    proc = subprocess.Popen([sys.executable, str(ex.EXAMPLES / "torch_serving" / "server.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        bundle = bundles() / "torch_serving.core" if backend == "core" else \
            build(ts.SPEC, backend, tmp_path / "bundle")
        monkeypatch.setattr(ts, "build", lambda spec, backend, out: bundle)
        line = proc.stdout.readline()
        assert line.startswith("READY"), line
        ts.test_requests_and_linear_layers(backend, int(line.split()[1]), tmp_path, monkeypatch)
    finally:
        proc.terminate()
        proc.wait(30)
    row.result = "works"
