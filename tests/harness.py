"""Run probec as a user does: build a bundle, run it against a real workload, read what it exported."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

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

    def __init__(self, bundle: Path, tmp: Path, *extra: str, port: int = 0):
        self.snapshot = tmp / "snapshot.txt"
        self.events_path = tmp / "events.jsonl"
        self.stderr_path = tmp / "run.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "probec", "run", str(bundle), "--port", str(port), "--interval", "0.5",
             "--snapshot", str(self.snapshot), "--events", str(self.events_path), *extra],
            stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "w"), cwd=ROOT)
        deadline = time.monotonic() + 90
        while "attached" not in self.stderr():
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


def measured_durations(path: Path) -> list[float]:
    """Seconds per call, as `pwork --durations PATH sleep ...` measured them around each call."""
    return [int(line.split()[1]) / 1e9 for line in path.read_text().splitlines()]


# What a uprobe span adds around a call, between the caller's clock reads and the probes' ones:
# the two traps (a few microseconds, far more than ever seen), with room for a short preemption.
PROBE_OVERHEAD = 50e-6


def assert_histogram_matches(cumulative: dict[str, float], total: float, measured: list[float],
                             overhead: float = PROBE_OVERHEAD) -> None:
    """A span's histogram against the durations its caller measured around the same calls.

    Each probe's duration is the caller's minus the traps around it, so it lies in
    [measured - overhead, measured]: for every edge, the calls the caller saw at or below it are
    at or below it in the histogram, and nothing is there that the caller saw above edge +
    overhead. A pause of this VM lengthens both alike, so this holds however noisy the host is."""
    assert cumulative["+Inf"] == len(measured), (cumulative, len(measured))
    for le, count in cumulative.items():
        if le == "+Inf":
            continue
        edge = float(le)
        at_most = sum(1 for d in measured if d <= edge)
        within = sum(1 for d in measured if d <= edge + overhead)
        assert at_most <= count <= within, (le, count, at_most, within, sorted(measured))
    assert sum(measured) - overhead * len(measured) <= total <= sum(measured) + 1e-6, (total, sum(measured))


def workload(*args: str, timeout: float = 120) -> None:
    exe = ROOT / "tests" / "workloads" / "build" / args[0]
    subprocess.run([str(exe), *args[1:]], check=True, timeout=timeout)


def bpf_program_count() -> int:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True)
    return len(json.loads(out.stdout or "[]")) if out.returncode == 0 else -1
