"""Run probec as a user does: build a bundle, run it against a real workload, read what it exported."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT


def write_spec(tmp: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp / name
    path.write_text(text.replace("$WORK", str(ROOT / "tests" / "workloads" / "build")))
    return path


def build(spec: Path, backend: str, out: Path, *extra: str) -> Path:
    result = subprocess.run([sys.executable, "-m", "probec", "build", str(spec), "--backend", backend,
                             "-o", str(out), *extra], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"build failed:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return out


class Run:
    """`probec run BUNDLE` in the background; stop() sends a signal and returns the final scrape."""

    def __init__(self, bundle: Path | list[Path], tmp: Path, *extra: str, port: int = 0,
                 prefix: tuple[str, ...] = (), python: str = sys.executable, env: dict | None = None):
        """`prefix` goes before the command (setpriv, to drop capabilities); `python` and `env`
        choose the interpreter that runs probec."""
        self.snapshot = tmp / "snapshot.txt"
        self.events_path = tmp / "events.jsonl"
        self.stderr_path = tmp / "run.stderr"
        targets = [str(b) for b in bundle] if isinstance(bundle, list) else [str(bundle)]
        self.proc = subprocess.Popen(
            [*prefix, python, "-m", "probec", "run", *targets, "--port", str(port), "--interval", "0.5",
             "--snapshot", str(self.snapshot), "--events", str(self.events_path), *extra],
            stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "w"), cwd=ROOT, env=env)
        # in a kernel-matrix guest (software emulation) BCC's compile alone took over 90 s on 5.4
        deadline = time.monotonic() + (300 if os.environ.get("PROBEC_MATRIX_GUEST") == "1" else 90)
        # attached, and serving: bcc says "BCC compiled and attached" before its first read and the
        # endpoint; a collector of several specs says each spec's line before it listens
        while "attached" not in self.stderr() or not _listening(port):
            if self.proc.poll() is not None:
                raise AssertionError(f"probec run exited {self.proc.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"probec run did not attach:\n{self.stderr()}")
            time.sleep(0.1)

    def scrape(self, port: int) -> dict:
        """GET /metrics over HTTP, as Prometheus does."""
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def stop(self, sig: int = signal.SIGINT) -> dict:
        self.proc.send_signal(sig)
        rc = self.proc.wait(60)
        assert rc == 0, f"probec run exited {rc}:\n{self.stderr()}"
        assert "Traceback" not in self.stderr()
        return parse_metrics(self.snapshot.read_text())

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def parse_metrics(text: str) -> dict:
    """{sample name: {frozenset(labels.items()): value}}"""
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    series = metrics.get(name, {})
    return series.get(frozenset({k: str(v) for k, v in labels.items()}.items()), 0.0)


def buckets(metrics: dict, name: str, **labels) -> dict[str, float]:
    """Cumulative bucket counts of one histogram series, by `le`."""
    out = {}
    for key, v in metrics.get(f"{name}_bucket", {}).items():
        d = dict(key)
        le = d.pop("le")
        if d == {k: str(v) for k, v in labels.items()}:
            out[le] = v
    return out


def per_bucket(cumulative: dict[str, float]) -> dict[str, float]:
    """Non-cumulative counts from cumulative ones, keeping `le` labels."""
    order = sorted(cumulative, key=lambda le: float("inf") if le == "+Inf" else float(le))
    out, previous = {}, 0.0
    for le in order:
        out[le] = cumulative[le] - previous
        previous = cumulative[le]
    return out


class Timed(NamedTuple):
    """Durations of a workload's calls, in seconds, as the workload measured them itself."""
    outer: list[float]                 # the caller's clock around each call: any probe is inside
    inner: list[float] | None = None   # the body's own clock, where it has one: inside any probe


def measured_durations(*paths: Path) -> Timed:
    """What `pwork --durations PATH sleep ...` runs wrote: one "US OUTER_NS INNER_NS" line per call."""
    rows = [line.split() for path in paths for line in path.read_text().splitlines()]
    return Timed([int(r[1]) / 1e9 for r in rows], [int(r[2]) / 1e9 for r in rows])


def assert_histogram_matches(cumulative: dict[str, float], total: float, timed: Timed) -> None:
    """A span's histogram and sum against the durations the workload measured for the same calls.

    A span's clock reads sit between the caller's and the body's: inner <= span <= outer, call by
    call, however late a loaded VM runs the thread (a pause lands inside both, or outside the
    span and inside the caller's view, as a preemption on the way back from a syscall or a trap
    does). So for every edge, each call the caller saw at or below it is at or below it in the
    histogram, and, where the body timed itself, no call is there that the body saw above it."""
    n = len(timed.outer)
    assert cumulative["+Inf"] == n, (cumulative, n)
    assert total <= sum(timed.outer) + 1e-6, (total, sum(timed.outer))
    if timed.inner is not None:
        assert total >= sum(timed.inner) - 1e-6, (total, sum(timed.inner))
    for le, count in cumulative.items():
        if le == "+Inf":
            continue
        edge = float(le)
        at_least = sum(1 for d in timed.outer if d <= edge)
        at_most = n if timed.inner is None else sum(1 for d in timed.inner if d <= edge)
        assert at_least <= count <= at_most, (le, count, at_least, at_most)


def workload(*args: str, timeout: float = 120) -> None:
    exe = ROOT / "tests" / "workloads" / "build" / args[0]
    subprocess.run([str(exe), *args[1:]], check=True, timeout=timeout)


def children(pid: int) -> list[int]:
    """The processes `pid` started (`probec run`'s bpftrace), from every thread of it."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def bpf_program_count() -> int:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True)
    return len(json.loads(out.stdout or "[]")) if out.returncode == 0 else -1


def bcc_verify(program_text: str, manifest: dict, cflags: tuple[str, ...] = ()) -> set[str]:
    """Compile a bcc program's C with BCC against this host's kernel headers (joined as the runtime
    joins them), with `cflags` as the runtime passes them (-Dprobec_use_ringbuf=0: the perf buffer;
    -Dprobec_target_pid=0: no target), and have the verifier take every function as the program
    type its probe attaches as; nothing is attached. Returns the probe kinds loaded. Needs root and
    the kernel lock."""
    import os
    from probec.host.headers import find_kernel_headers, joined_tree
    from probec.runtime.bcc_runner import HEADER_TREES, import_bcc
    bcc = import_bcc()
    headers = find_kernel_headers()
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env is None and not headers.found_by_bcc:
        os.environ["BCC_KERNEL_SOURCE"] = str(joined_tree(headers, HEADER_TREES))
    probes = {p["id"]: p for p in manifest["probes"]}
    usdt = []
    for p in manifest["core"]["programs"]:
        probe = probes[p["probe"]]
        if probe["kind"] == "usdt":
            context = bcc.USDT(path=probe["binary"])        # USDT takes str, the rest of BCC bytes
            context.enable_probe(probe=f"{probe['provider']}:{probe['name']}", fn_name=p["program"])
            usdt.append(context)
    try:
        b = bcc.BPF(text=program_text.encode(), cflags=list(cflags), usdt_contexts=usdt)
    finally:
        if env is None:
            os.environ.pop("BCC_KERNEL_SOURCE", None)
    types = {"tracepoint": bcc.BPF.TRACEPOINT, "profile": bcc.BPF.PERF_EVENT, "interval": bcc.BPF.PERF_EVENT}
    kinds = set()
    try:
        for p in manifest["core"]["programs"]:
            kind = probes[p["probe"]]["kind"]
            assert b.load_func(p["program"].encode(), types.get(kind, bcc.BPF.KPROBE)).fd >= 0, p["program"]
            kinds.add(kind)
    finally:
        b.cleanup()
    return kinds


def _listening(port: int) -> bool:
    if not port:
        return True
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
