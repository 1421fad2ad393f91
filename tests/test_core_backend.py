"""The core backend (IR -> CO-RE C -> BPF object) and its runtime (runtime/core_runner.py).

Kernel tests build real specs, load them with the libbpf binding and attach them to the test
workloads, then assert exact counts and the bucket each known duration or value lands in. They
serialise with every other kernel user through the lock the caller takes:

    flock /tmp/probec-kernel.lock python -m pytest tests/test_core_backend.py
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, WORKLOADS, require_bcc_kernel, require_core_kernel, require_kernel
from harness import assert_histogram_matches, buckets, measured_durations, parse_metrics, per_bucket

from probec.compiler.driver import build_bundle, check_file
from probec.runtime.manifest import BundleError, load_bundle
from probec.runtime.store import MetricStore

SPECS = ROOT / "specs"
US, MS = 1_000, 1_000_000


# --- helpers -------------------------------------------------------------------------------------


def write_spec(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text.replace("@W@", str(WORKLOADS)))
    return path


def build(spec: Path, out: Path, kernel: str = "host", compile: bool = True, task_storage: bool = True) -> Path:
    """Check and build in-process; fail the test with the rendered diagnostics on errors."""
    from probec.compiler.diagnostics import render_text
    result = check_file(str(spec), kernel=kernel)
    assert result.program is not None, render_text(result.diagnostics.sorted(), result.sources)
    bundle = build_bundle(result, "core", compile=compile, task_storage=task_storage)
    assert bundle is not None, render_text(result.diagnostics.sorted(), result.sources)
    bundle.write(out)
    return out


def run_workload(*argv: str, exe: str = "pwork") -> None:
    subprocess.run([str(WORKLOADS / exe), *argv], check=True, timeout=60)


def sample(metrics: dict, name: str, **labels) -> float | None:
    """One sample of a scrape parsed by harness.parse_metrics, or None when it is absent."""
    return metrics.get(name, {}).get(frozenset((k, str(v)) for k, v in labels.items()))


def bpftool_json(*args: str):
    result = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return []
    return json.loads(result.stdout or "[]")


def kernel_names(manifest: dict) -> set[str]:
    """Program names as bpftool shows them: whole from BTF, or cut to the kernel's 15 characters."""
    names = {p["program"] for p in manifest["core"]["programs"]}
    return names | {n[:15] for n in names}


def our_programs(names: set[str], exclude: set[int] = frozenset()) -> set[int]:
    return {p["id"] for p in bpftool_json("prog", "show") if p.get("name") in names and p["id"] not in exclude}


def links_to(prog_ids: set[int]) -> list:
    return [link for link in bpftool_json("link", "show") if link.get("prog_id") in prog_ids]


def wait_gone(prog_ids: set[int], timeout: float = 5.0) -> set[int]:
    """Program ids still loaded after waiting up to `timeout` (the kernel frees them lazily)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {p["id"] for p in bpftool_json("prog", "show")} & prog_ids
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


class Collector:
    """A `probec run` (or loader.py) subprocess whose stderr is watched for 'attached'."""

    def __init__(self, argv: list[str], mark: str = ": attached (core)"):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.mark = mark
        self.lines: list[str] = []
        self.attached = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self.mark in line:
                self.attached.set()

    def wait_attached(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.attached.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)
                self.proc.kill()
                pytest.fail("collector did not attach:\n" + "\n".join(self.lines))

    def finish(self, sig: int, timeout: float = 30.0) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("collector did not stop:\n" + "\n".join(self.lines))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


# --- the main spec, run once through the CLI -------------------------------------------------------
MAIN_SPEC = """
name: core_main
description: Every probe kind the test workloads offer, with exact expected numbers.
binaries:
  pwork: @W@/libpwork.so
  exe: @W@/pwork
  cet: @W@/libpwork_cet.so
limits:
  concurrency: 64
  series: 16
spans:
  sleep:
    function: pwork:pwork_sleep_us
    filter: comm == "core_sleep"
  write:
    syscall: write
    filter: comm == "core_write"
metrics:
  core_sleep_seconds:
    help: Time inside pwork_sleep_us.
    histogram: sleep.duration
    buckets: exp2(64us, 1s)
    labels: [comm]
  core_write_seconds:
    histogram: write.duration
    buckets: exp2(1us, 1s)
  core_writes_total:
    count: syscall:write
    filter: comm == "core_write"
  core_write_bytes_total:
    sum: args.count
    on: syscall:write
    filter: comm == "core_write"
  core_records_total:
    count: uprobe:pwork:pwork_record
    labels: [comm]
    filter: comm != "core_excluded"
  core_record_value:
    histogram: arg0
    on: uprobe:pwork:pwork_record
    filter: comm == "core_rec"
    buckets: [0, 1, 2, 3, 4, 1023, 1024, 1025]
  core_record_exp2:
    histogram: arg0
    on: uprobe:pwork:pwork_record
    filter: comm == "core_rec"
    buckets: exp2(1, 1024)
  core_ticks_total:
    count: usdt:exe:pwork:tick
    filter: comm == "core_usdt"
  core_tick_args_total:
    sum: arg0
    on: usdt:exe:pwork:tick
    filter: comm == "core_usdt"
  core_lib_ticks_total:
    count: usdt:pwork:pwork:lib_tick
    filter: comm == "core_usdt"
  core_cet_calls_total:
    count: uretprobe:cet:pwork_record
    filter: comm == "core_cet"
  core_cet_args_total:
    sum: arg0
    on: uprobe:cet:pwork_record
    filter: comm == "core_cet"
  core_cet_returns_total:
    sum: retval
    on: uretprobe:cet:pwork_record
    filter: comm == "core_cet"
events:
  slow_sleep:
    on: sleep.end
    when: duration > 10ms
    fields: [comm, duration, ustack]
  write_done:
    on: syscallret:write
    when: comm == "core_write"
    sample: 1/10
    fields: [retval, kstack]
"""

RECORD_VALUES = (0, 1, 2, 3, 4, 5, 1023, 1024, 1025, 1026)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, workloads):
    """Build MAIN_SPEC with `probec build`, run it with `probec run`, drive the workloads, stop with
    SIGINT; hand the tests the snapshot, the events and what bpftool saw."""
    require_core_kernel()
    tmp = tmp_path_factory.mktemp("core_main")
    spec = write_spec(tmp, "core_main", MAIN_SPEC)
    out = tmp / "bundle"
    built = subprocess.run([sys.executable, "-m", "probec", "build", str(spec), "--backend", "core", "-o", str(out)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert built.returncode == 0, built.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    names = kernel_names(manifest)
    before = our_programs(names)
    snapshot, events = tmp / "snapshot.txt", tmp / "events.jsonl"
    collector = Collector([sys.executable, "-m", "probec", "run", str(out), "--port", "0", "--duration", "60",
                           "--interval", "0.2", "--snapshot", str(snapshot), "--events", str(events)])
    collector.wait_attached()
    during = our_programs(names, before)
    links = links_to(during)
    run_workload("--comm", "core_sleep", "--durations", str(tmp / "sleeps.txt"), "sleep", "20", "700", "4", "20000")
    run_workload("--comm", "core_write", "write", "50", "16")
    run_workload("--comm", "core_rec", "record", *map(str, RECORD_VALUES))
    run_workload("--comm", "core_excluded", "record", "1", "2", "3")
    run_workload("--comm", "core_usdt", "usdt", "7")
    run_workload("--comm", "core_cet", "record", "5", "7", "11", exe="pwork_cet")
    time.sleep(0.3)
    rc = collector.finish(signal.SIGINT)
    left = wait_gone(during)
    return {"rc": rc, "stderr": collector.stderr, "manifest": manifest, "bundle": out,
            "metrics": parse_metrics(snapshot.read_text()) if snapshot.exists() else {},
            "events": [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else [],
            "during": during, "links": links, "left": left, "left_links": links_to(during),
            "sleeps": measured_durations(tmp / "sleeps.txt")}


@pytest.mark.kernel
def test_cli_run_stops_cleanly_on_sigint(main_run):
    assert main_run["rc"] == 0, main_run["stderr"]
    assert "stopped on SIGINT; probes detached" in main_run["stderr"]
    assert len(main_run["during"]) == len(main_run["manifest"]["core"]["programs"]), main_run["stderr"]
    assert main_run["links"], "bpftool listed no links while the collector ran"
    assert not main_run["left"], f"programs still loaded after SIGINT: {main_run['left']}"
    assert not main_run["left_links"]


@pytest.mark.kernel
def test_uprobe_span_durations_land_in_their_log2_buckets(main_run):
    m = main_run["metrics"]
    assert sample(m, "core_sleep_seconds_count", comm="core_sleep") == 24
    # Each call in the log2 bucket its own clocks put it in.
    assert_histogram_matches(buckets(m, "core_sleep_seconds", comm="core_sleep"),
                             sample(m, "core_sleep_seconds_sum", comm="core_sleep"), main_run["sleeps"])
    counts = per_bucket(buckets(m, "core_sleep_seconds", comm="core_sleep"))
    assert counts["0.000512"] == 0          # never shorter than asked
    assert counts["0.001024"] >= 15         # most 700 us calls in (512 us, 1024 us]


@pytest.mark.kernel
def test_explicit_and_exp2_buckets_put_values_on_edges_exactly(main_run):
    m = main_run["metrics"]
    assert per_bucket(buckets(m, "core_record_value")) == {
        "0": 1, "1": 1, "2": 1, "3": 1, "4": 1, "1023": 2, "1024": 1, "1025": 1, "+Inf": 1}
    assert sample(m, "core_record_value_sum") == sum(RECORD_VALUES)
    exp2 = per_bucket(buckets(m, "core_record_exp2"))
    assert exp2 == {"1": 2, "2": 1, "4": 2, "8": 1, "16": 0, "32": 0, "64": 0, "128": 0,
                    "256": 0, "512": 0, "1024": 2, "+Inf": 2}


@pytest.mark.kernel
def test_syscall_span_and_counters_are_exact(main_run):
    m = main_run["metrics"]
    assert sample(m, "core_writes_total") == 50
    assert sample(m, "core_write_bytes_total") == 50 * 16
    assert sample(m, "core_write_seconds_count") == 50


@pytest.mark.kernel
def test_counter_labels_and_a_filter_that_excludes_a_process(main_run):
    m = main_run["metrics"]
    assert sample(m, "core_records_total", comm="core_rec") == len(RECORD_VALUES)
    assert sample(m, "core_records_total", comm="core_excluded") is None


@pytest.mark.kernel
def test_usdt_in_the_executable_and_a_library_counts_exactly(main_run):
    m = main_run["metrics"]
    assert sample(m, "core_ticks_total") == 7
    assert sample(m, "core_tick_args_total") == sum(range(7))
    assert sample(m, "core_lib_ticks_total") == 7


@pytest.mark.kernel
def test_cet_uprobes_sit_past_endbr64_and_still_read_arguments_and_returns(main_run):
    probes = {p["id"]: p for p in main_run["manifest"]["probes"]}
    cet = [p for p in probes.values() if p["binary"].endswith("libpwork_cet.so")]
    assert {p["kind"] for p in cet} == {"uprobe", "uretprobe"}
    assert all(p["offset"] == 4 for p in cet), cet
    m = main_run["metrics"]
    assert sample(m, "core_cet_calls_total") == 3
    assert sample(m, "core_cet_args_total") == 5 + 7 + 11
    assert sample(m, "core_cet_returns_total") == 5 + 7 + 11


@pytest.mark.kernel
def test_events_carry_symbolised_user_and_kernel_stacks(main_run):
    events = main_run["events"]
    slow = [e for e in events if e["event"] == "slow_sleep"]
    assert len(slow) == 4, events
    for e in slow:
        assert set(e) >= {"event", "ts_ns", "pid", "tid", "cpu", "comm", "duration_seconds", "ustack"}
        assert e["comm"] == "core_sleep" and 0.02 <= e["duration_seconds"] < 0.03
    # the first events are read while pwork still runs, so its maps resolve
    frames = [f for e in slow for f in e["ustack"]]
    assert any(f.startswith(("run_work+", "main+")) and "(pwork)" in f for f in frames), slow
    writes = [e for e in events if e["event"] == "write_done"]
    # 1 in 10 over all CPUs: exactly every 10th of the 50 writes
    assert len(writes) == 5 and all(e["retval"] == 16 for e in writes), writes
    kframes = [f for e in writes for f in e["kstack"]]
    assert any("syscall" in f for f in kframes), writes
    m = main_run["metrics"]
    assert sample(m, "probec_events_total", event="slow_sleep") == 4
    assert sample(m, "probec_events_total", event="write_done") == 50
    assert sample(m, "probec_events_lost_total") == 0


@pytest.mark.kernel
def test_health_reports_maps_and_attach_status(main_run):
    m = main_run["metrics"]
    manifest = main_run["manifest"]
    # this kernel has task storage: thread-keyed spans use it, and their HASH maps stand by unused
    assert sample(m, "probec_mechanism", feature="span_begin_times", mechanism="task_storage") == 1
    unused = {s["map"] for s in manifest["spans"] if s["task_map"]}
    for mp in manifest["maps"]:
        if mp["type"] == "TASK_STORAGE" or mp["name"] in unused:    # a slot per thread: no capacity
            assert sample(m, "probec_map_capacity", map=mp["name"]) is None
        else:
            assert sample(m, "probec_map_capacity", map=mp["name"]) == mp["max_entries"]
    assert any(mp["type"] == "TASK_STORAGE" for mp in manifest["maps"])
    assert sample(m, "probec_map_entries", map="m_core_records_total") == 1
    for p in manifest["probes"]:
        assert sample(m, "probec_probe_attached", probe=p["id"]) == 1
    assert sample(m, "probec_span_begin_overflow_total", span="sleep") == 0


@pytest.mark.kernel
def test_rebuild_is_byte_identical(main_run, tmp_path):
    """The bundle `probec build` wrote and an in-process build elsewhere agree byte for byte."""
    spec = next(main_run["bundle"].parent.glob("*.yaml"))
    again = build(spec, tmp_path / "again")
    first = sorted(p.name for p in main_run["bundle"].iterdir())
    assert first == sorted(p.name for p in again.iterdir())
    assert any(name.endswith(".bpf.o") for name in first)
    match, mismatch, errors = filecmp.cmpfiles(main_run["bundle"], again, first, shallow=False)
    assert not mismatch and not errors
    for name in first:
        data = (again / name).read_bytes()
        assert str(tmp_path).encode() not in data and b"probec-cc-" not in data, name


# --- signals ---------------------------------------------------------------------------------------
SMALL_SPEC = """
name: core_small
binaries:
  pwork: @W@/libpwork.so
metrics:
  core_small_records_total:
    count: uprobe:pwork:pwork_record
  core_small_writes_total:
    count: syscall:write
    filter: comm == "core_small"
"""


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, workloads):
    require_core_kernel()
    tmp = tmp_path_factory.mktemp("core_small")
    return build(write_spec(tmp, "core_small", SMALL_SPEC), tmp / "bundle")


@pytest.mark.kernel
@pytest.mark.parametrize("how", ["loader.py+SIGTERM", "probec run+SIGKILL"])
def test_signals_leave_no_probe_attached(small_bundle, tmp_path, how):
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    names = kernel_names(manifest)
    before = our_programs(names)
    if how.startswith("loader.py"):
        # the loader must not need the compiler (nor its jinja2/lark): make them unimportable
        blocker = ("import runpy, sys\n"
                   "for name in ('probec.compiler', 'jinja2', 'lark'):\n"
                   "    sys.modules[name] = None\n"
                   "sys.argv = sys.argv[1:]\n"
                   "runpy.run_path(sys.argv[0], run_name='__main__')\n")
        argv = [sys.executable, "-c", blocker, str(small_bundle / "loader.py"), "--port", "0", "--duration", "60",
                "--snapshot", str(tmp_path / "snap.txt")]
        sig = signal.SIGTERM
    else:
        argv = [sys.executable, "-m", "probec", "run", str(small_bundle), "--port", "0", "--duration", "60"]
        sig = signal.SIGKILL
    collector = Collector(argv)
    collector.wait_attached()
    during = our_programs(names, before)
    assert len(during) == 2 and len(links_to(during)) == 2
    run_workload("--comm", "core_small", "write", "3", "1")
    rc = collector.finish(sig)
    assert not wait_gone(during), "programs outlived the collector"
    assert not links_to(during)
    if sig == signal.SIGTERM:
        assert rc == 0, collector.stderr
        assert "stopped on SIGTERM" in collector.stderr
        text = (tmp_path / "snap.txt").read_text()
        assert sample(parse_metrics(text), "core_small_writes_total") == 3
    else:
        assert rc == -signal.SIGKILL



DIFF_SPEC = """
name: core_diff
binaries:
  pwork: @W@/libpwork.so
spans:
  sleep:
    function: pwork:pwork_sleep_us
    filter: comm == "core_diff"
metrics:
  diff_sleep_seconds:
    histogram: sleep.duration
    buckets: exp2(64us, 1s)
  diff_records_total:
    count: uprobe:pwork:pwork_record
    labels: [comm]
    filter: comm == "core_diff"
  diff_record_value:
    histogram: arg0
    on: uprobe:pwork:pwork_record
    filter: comm == "core_diff"
    buckets: [0, 1, 2, 3, 4, 1023, 1024, 1025]
"""


@pytest.mark.kernel
def test_backends_agree_on_the_same_workload(tmp_path, workloads):
    """The bpftrace, core and bcc bundles of one spec, attached at the same time to one workload:
    the same counts, and the same buckets but for a value within microseconds of an edge."""
    require_core_kernel()
    require_kernel(need_bpftrace=True)
    require_bcc_kernel()
    spec = write_spec(tmp_path, "core_diff", DIFF_SPEC)
    backends = ("bpftrace", "core", "bcc")
    bundles = {}
    for backend in backends:
        built = subprocess.run([sys.executable, "-m", "probec", "build", str(spec), "--backend", backend,
                                "-o", str(tmp_path / backend)], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert built.returncode == 0, built.stderr
        bundles[backend] = tmp_path / backend
    collectors = {}
    try:
        for backend, out in bundles.items():
            collectors[backend] = Collector([sys.executable, "-m", "probec", "run", str(out), "--port", "0",
                                             "--duration", "60", "--snapshot", str(tmp_path / f"{backend}.txt")],
                                            mark=f": attached ({backend})")
        for c in collectors.values():
            c.wait_attached()
        run_workload("--comm", "core_diff", "sleep", "30", "700", "5", "3000", "3", "20000")
        run_workload("--comm", "core_diff", "record", *map(str, RECORD_VALUES))
        time.sleep(1.2)          # bpftrace prints its maps once a second
        for backend, c in collectors.items():
            assert c.finish(signal.SIGINT) == 0, c.stderr
    finally:
        for c in collectors.values():
            if c.proc.poll() is None:
                c.proc.kill()
    got = {b: parse_metrics((tmp_path / f"{b}.txt").read_text()) for b in bundles}
    for other in ("core", "bcc"):
        for name in ("diff_sleep_seconds", "diff_record_value"):
            a, b = (per_bucket(buckets(got[x], name)) for x in ("bpftrace", other))
            assert sum(a.values()) == sum(b.values()) > 0, (other, a, b)
            # a value within microseconds of an edge may fall on either side of it: allow one move
            assert sum(abs(a[le] - b[le]) for le in a) <= 2, (other, name, a, b)
        assert per_bucket(buckets(got[other], "diff_record_value")) == \
            per_bucket(buckets(got["bpftrace"], "diff_record_value")), other
    for x in backends:
        assert sample(got[x], "diff_records_total", comm="core_diff") == len(RECORD_VALUES), x
        assert sample(got[x], "diff_sleep_seconds_count") == 38, x

# --- in-process runs -------------------------------------------------------------------------------
def run_in_process(bundle_dir: Path, workload, events: Path | None = None, **options):
    """Start a CoreRunner, run `workload`, stop; returns (store, runner, log lines)."""
    from probec.runtime.core_runner import CoreRunner
    from probec.runtime.events import EventSink
    bundle = load_bundle(bundle_dir)
    store = MetricStore(bundle.manifest)
    sink = EventSink(str(events), bundle.manifest) if events else None
    log: list[str] = []
    runner = CoreRunner(bundle, store, sink, log=log.append, **options)
    try:
        runner.start()
        workload()
        runner.poll()
        assert runner.failure is None, runner.failure
    finally:
        runner.stop()
        if sink:
            sink.close()
    return store, runner, log


OVERFLOW_SPEC = """
name: core_overflow
binaries:
  pwork: @W@/libpwork.so
limits:
  concurrency: 1
spans:
  sleep:
    function: pwork:pwork_sleep_us
    filter: comm == "core_ovf"
metrics:
  core_ovf_seconds:
    histogram: sleep.duration
    buckets: exp2(64us, 1s)
"""


@pytest.mark.kernel
def test_full_begin_map_counts_overflows(tmp_path, workloads):
    require_core_kernel()
    # a HASH begin map, sized by limits.concurrency (task storage has a slot per thread instead)
    out = build(write_spec(tmp_path, "core_overflow", OVERFLOW_SPEC), tmp_path / "bundle", task_storage=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spans"][0]["capacity"] == 2 and not manifest["spans"][0]["task_storage"]
    store, _, _ = run_in_process(out, lambda: run_workload("--comm", "core_ovf", "--threads", "4",
                                                             "sleep", "5", "3000"), bpf_stats=True)
    overflows = store.health.span_overflows["sleep"]
    series = store.snapshot()["core_ovf_seconds"].series[()]
    assert overflows > 0
    assert series.count + overflows == 20     # every call either measured or counted as lost
    # BPF run-time stats were on for the run (bpf_stats=True / PROBEC_BPF_STATS=1)
    assert store.health.program_runs["uprobe_pwork_sleep_us"] >= 20
    assert store.health.program_run_ns["uprobe_pwork_sleep_us"] > 0


THREAD_SERIES_SPEC = """
name: core_thread_series
binaries:
  pwork: @W@/libpwork.so
limits:
  series: 3
metrics:
  core_ts_calls_total:
    count: uprobe:pwork:pwork_record
    labels: [tid]
    filter: comm == "core_ts"
  core_ts_values:
    histogram: arg0
    on: uprobe:pwork:pwork_record
    labels: [tid]
    filter: comm == "core_ts"
    buckets: [1, 10, 100]
"""


@pytest.mark.kernel
def test_label_sets_past_the_limit_fold_in_the_kernel_under_contention(tmp_path, workloads):
    """8 threads on 2 CPUs, a label set each, 3 allowed: the maps fill while threads race to add
    label sets; every call is still counted, in a kept series or in __overflow__, and the 5 label
    sets folded are counted once each."""
    from probec.runtime.store import OVERFLOW
    require_core_kernel()
    out = build(write_spec(tmp_path, "core_thread_series", THREAD_SERIES_SPEC), tmp_path / "bundle")
    values = [str(v % 200) for v in range(400)]
    store, _, log = run_in_process(out, lambda: run_workload("--comm", "core_ts", "--threads", "8", "record",
                                                             *values))
    snap = store.snapshot()
    calls, hist = snap["core_ts_calls_total"], snap["core_ts_values"]
    assert sum(calls.series.values()) == 8 * len(values)
    assert len(calls.series) == 4 and calls.series[(OVERFLOW,)] == 5 * len(values)
    assert calls.dropped_series == 5 and hist.dropped_series == 5
    assert len(hist.series) == 4 and sum(h.count for h in hist.series.values()) == 8 * len(values)
    assert sum(h.sum for h in hist.series.values()) == 8 * sum(map(int, values))
    assert hist.series[(OVERFLOW,)].buckets == [5 * sum(int(v) <= 1 for v in values),
                                                 5 * sum(1 < int(v) <= 10 for v in values),
                                                 5 * sum(10 < int(v) <= 100 for v in values),
                                                 5 * sum(int(v) > 100 for v in values)]
    assert store.health.backend_errors == 0


FALLBACK_SPEC = """
name: core_fallback
spans:
  nanosleep:
    kernel: do_nanosleep
    fallback: syscall:clock_nanosleep
    filter: comm == "core_fb"
metrics:
  core_fb_seconds:
    histogram: nanosleep.duration
    buckets: exp2(64us, 1s)
"""

KPROBE_SPEC = """
name: core_kprobes
spans:
  nanosleep:
    kernel: do_nanosleep
    fallback: syscall:clock_nanosleep
metrics:
  core_kp_seconds:
    histogram: nanosleep.duration
    buckets: exp2(1us, 1s)
  core_kp_calls_total:
    count: kprobe:do_nanosleep
    labels: [comm]
  core_kp_mode_total:
    sum: arg1
    on: kprobe:hrtimer_nanosleep
  core_kp_returns_total:
    sum: retval
    on: kretprobe:do_nanosleep
"""


@pytest.mark.kernel
def test_kernel_span_attaches_its_first_working_variant(tmp_path, workloads):
    require_core_kernel()
    out = build(write_spec(tmp_path, "core_fallback", FALLBACK_SPEC), tmp_path / "bundle")
    store, runner, log = run_in_process(out, lambda: run_workload("--comm", "core_fb", "sleep", "3", "3000"))
    attached = store.health.attached
    assert attached["tracepoint_sys_enter_clock_nanosleep"] == 1
    # the variants not taken are not probes of this run: no probec_probe_attached 0 (and no alert)
    # for them, as bpftrace reports only the probes its script attaches
    assert "fentry_do_nanosleep" not in attached and "kprobe_do_nanosleep" not in attached
    assert any("using syscall:clock_nanosleep" in line for line in log), log
    series = store.snapshot()["core_fb_seconds"].series[()]
    assert series.count == 3
    assert series.buckets[6] >= 2                 # 3 ms and wake-up latency: (2.048 ms, 4.096 ms]


SCHED_SPEC = """
name: core_sched
spans:
  runq:
    begin: {probe: tracepoint:sched:sched_wakeup, key: args.pid}
    end: {probe: tracepoint:sched:sched_switch, key: args.next_pid}
    filter: args.comm == "core_sched"
metrics:
  core_runq_seconds:
    histogram: runq.duration
    buckets: exp2(1us, 1s)
    labels: [thread: args.next_comm]
"""


@pytest.mark.kernel
@pytest.mark.parametrize("kernel_btf", [True, False], ids=["kernel-btf", "no-kernel-btf"])
def test_sched_tracepoints_attach_typed_where_the_kernel_has_btf(tmp_path, workloads, monkeypatch, kernel_btf):
    """sched tracepoints are attached in their typed raw form (tp_btf) first; where the kernel has
    no BTF (hidden here) the bundle takes its classic tracepoints before loading (libbpf would fail
    the whole object), says so, and counts the same."""
    require_core_kernel()
    from probec.runtime import core_attach
    if not kernel_btf:
        monkeypatch.setattr(core_attach, "KERNEL_BTF", tmp_path / "no-such-btf")
    out = build(write_spec(tmp_path, "core_sched", SCHED_SPEC), tmp_path / "bundle")
    store, runner, log = run_in_process(out, lambda: run_workload("--comm", "core_sched", "sleep", "5", "3000"))
    typed = "tp_btf" if kernel_btf else "tracepoint"
    assert store.health.mechanisms["sched_tracepoints"] == typed
    chosen = {"tracepoint_sched_wakeup_btf", "tracepoint_sched_switch_btf"} if kernel_btf else \
        {"tracepoint_sched_wakeup", "tracepoint_sched_switch"}
    assert store.health.attached == {p: 1 for p in chosen}
    assert any("using tracepoint on this kernel (not tp_btf (not tried: no kernel BTF))" in line for line in log) != kernel_btf
    # each of the 5 sleeps ends in a timer wake-up and a switch in (the kernel may add one now and then)
    series = store.snapshot()["core_runq_seconds"].series[("core_sched",)]
    assert 5 <= series.count <= 7
    assert series.sum < 5 * MS


@pytest.mark.kernel
def test_kprobe_programs_pass_the_verifier_and_fail_attach_clearly(tmp_path, workloads):
    """Built with --kernel any: the kprobe programs load (verifier) though this kernel cannot
    attach them; running the bundle fails naming the probe and what works, leaving nothing behind."""
    require_core_kernel()
    from probec.runtime import libbpf as L
    from probec.host.features import kprobes_available
    out = build(write_spec(tmp_path, "core_kprobes", KPROBE_SPEC), tmp_path / "bundle", kernel="any")
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = {p["program"]: p["kind"] for p in manifest["core"]["programs"]}
    assert {"kprobe", "kretprobe", "fentry", "fexit", "tracepoint"} <= set(kinds.values())
    obj = L.BpfObject.open(out / manifest["core"]["object"])
    try:
        for prog, kind in kinds.items():   # fentry/fexit loads are refused outright on this kernel
            obj.set_autoload(prog, kind not in ("fentry", "fexit"))
        obj.load()
        for prog, kind in kinds.items():
            if kind in ("kprobe", "kretprobe"):
                assert obj.program(prog).info().verified_insns > 0
    finally:
        obj.close()
    if kprobes_available():
        return
    names = kernel_names(manifest)
    before = our_programs(names)
    with pytest.raises(L.BpfError) as err:
        run_in_process(out, lambda: None)
    text = str(err.value)
    assert "kprobe:do_nanosleep" in text or "kprobe:hrtimer_nanosleep" in text or "kretprobe:" in text, text
    assert "nothing is left attached" in text and "no kprobes" in text and "uprobes" in text, text
    assert not wait_gone(our_programs(names, before), 2.0)


@pytest.mark.kernel
def test_pid_setting_limits_probes_to_one_process(small_bundle):
    procs = [subprocess.Popen([str(WORKLOADS / "pwork"), "--comm", "core_small", "--wait-stdin", "record", "1", "2", "3"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        pids = [int(p.stdout.readline().split()[1]) for p in procs]

        def release():
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            for p in procs:
                assert p.wait(30) == 0

        store, _, _ = run_in_process(small_bundle, release, pid=pids[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert store.snapshot()["core_small_records_total"].series == {(): 3}


DROPS_SPEC = """
name: core_drops
limits:
  ringbuf: 4KiB
events:
  every_write:
    on: syscall:write
    when: comm == "core_drops"
    fields: [comm, args.count, args.fd]
"""


@pytest.mark.kernel
def test_ring_buffer_drops_are_counted(tmp_path, workloads):
    require_core_kernel()
    out = build(write_spec(tmp_path, "core_drops", DROPS_SPEC), tmp_path / "bundle")
    events = tmp_path / "events.jsonl"
    store, _, _ = run_in_process(out, lambda: run_workload("--comm", "core_drops", "write", "20000", "0"), events)
    written = len(events.read_text().splitlines())
    health = store.health
    assert health.events_emitted["every_write"] == 20000
    assert health.events_lost > 0, "a 4 KiB ring drained every 50 ms should overflow"
    assert written + health.events_lost == 20000


KITCHEN_SINK_SPEC = """
name: core_kitchen_sink
binaries:
  pwork: @W@/libpwork.so
  exe: @W@/pwork
  cet: @W@/libpwork_cet.so
  inf: @W@/libinference.so
limits:
  concurrency: 16
  series: 8
  ringbuf: 64KiB
spans:
  sleep:
    function: pwork:pwork_sleep_us
  fwd:
    function: inf:Inference::Forward
    within: sleep
    filter: arg1 > 5 and (pid % 7 != 3 or -arg0 / 3 < 0)
  wr:
    syscall: write
    filter: args.count >= 4096
metrics:
  switches_total:
    count: tracepoint:sched:sched_switch
    labels: [next_comm: args.next_comm, prio: args.prev_prio]
    filter: args.prev_comm != "swapper/0" and args.next_pid > 0
  fwd_seconds:
    histogram: fwd.duration
    buckets: linear(0, 5ms, 20)
    labels: [comm, pid, cpu, uid, cgroup]
  write_bytes:
    histogram: args.count
    on: syscall:write
    buckets: exp2(1B, 1MiB)
  write_ret:
    histogram: retval
    on: syscallret:write
    buckets: [0, 10, 100]
  cet_total:
    sum: arg0 * 2 + arg1 - arg2 / (arg3 + 1) % 5
    on: uprobe:cet:pwork_record
    within: sleep
  stack_args_total:
    sum: arg6 + arg7
    on: uprobe:pwork:pwork_record
  signed_total:
    sum: retval
    on: uretprobe:pwork:pwork_record
  lib_tick_total:
    count: usdt:pwork:pwork:lib_tick
    labels: [comm]
  profile_total:
    count: profile:hz:49
    labels: [comm]
  in_sleep_total:
    count: syscall:getpid
    within: sleep
events:
  slow_write:
    on: wr.end
    when: duration > 1ms
    sample: 1/10, at most 5/s
    fields: [comm, pid, duration, kstack, ustack, retval]
  switch:
    on: tracepoint:sched:sched_switch
    when: args.next_comm == "pwork"
    fields: [args.prev_comm, args.next_comm, args.prev_state, kstack]
  woken:
    on: tracepoint:sched:sched_wakeup_new
    when: args.comm == "pwork"
    fields: [args.comm, args.pid, args.prio, kstack]
"""


@pytest.mark.kernel
def test_every_construct_passes_the_verifier(tmp_path, workloads):
    require_core_kernel()
    from probec.runtime import libbpf as L
    out = build(write_spec(tmp_path, "core_kitchen_sink", KITCHEN_SINK_SPEC), tmp_path / "bundle")
    manifest = json.loads((out / "manifest.json").read_text())
    with L.BpfObject.open(out / manifest["core"]["object"]) as obj:
        obj.load()
        assert len(obj.programs) == len(manifest["core"]["programs"])
    # sched_wakeup_new reads only typed fields: a tp_btf program beside its classic one, both loaded
    # above; sched_switch reads prev_state, which only the classic record has
    sections = {p["section"] for p in manifest["core"]["programs"]}
    assert {"tp_btf/sched_wakeup_new", "tp/sched/sched_wakeup_new", "tp/sched/sched_switch"} <= sections
    assert "tp_btf/sched_switch" not in sections
    checks = {(c["tracepoint"], c["field"]) for c in manifest["core"]["tracepoint_fields"]}
    assert ("sched:sched_switch", "next_comm") in checks and ("syscalls:sys_exit_write", "ret") in checks


@pytest.mark.kernel
def test_every_spec_in_the_repo_compiles_with_werror(tmp_path, workloads):
    require_core_kernel()
    specs = sorted(SPECS.glob("*.yaml"))
    assert specs
    for spec in specs:
        out = build(spec, tmp_path / spec.stem)      # clang runs with -Wall -Werror
        assert (out / f"{json.loads((out / 'manifest.json').read_text())['name']}.bpf.o").exists()


# --- no kernel needed ------------------------------------------------------------------------------
def test_c_layouts_agree_with_the_manifest(tmp_path, workloads):
    """Compile the generated header into a user-space program that prints every sizeof and
    offsetof, and compare with the manifest's layouts."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = build(write_spec(tmp_path, "core_layouts", KITCHEN_SINK_SPEC), tmp_path / "bundle", compile=False)
    manifest = json.loads((out / "manifest.json").read_text())
    layouts = {}
    for mp in manifest["maps"]:
        for lay in (mp["key"], mp["value"]):
            if lay:
                layouts[lay["name"]] = lay
    for e in manifest["events"]:
        layouts[e["record"]["name"]] = e["record"]
    assert len(layouts) >= 2 * len(manifest["metrics"]) + len(manifest["events"]), sorted(layouts)
    lines = [f'#include "{manifest["name"]}.h"', "#include <stdio.h>", "#include <stddef.h>", "int main(void) {"]
    for name, lay in layouts.items():
        is_event = any(e["record"]["name"] == name for e in manifest["events"])
        lines.append(f'printf("%s %zu\\n", "{name}", sizeof(struct probec_{name}));')
        for i, f in enumerate(lay["fields"]):
            member = f"f_{f['name']}" if is_event and i >= 5 and not f["name"].startswith("__pad") else f["name"]
            lines.append(f'printf("%s.%d %zu\\n", "{name}", {i}, offsetof(struct probec_{name}, {member}));')
    lines.append("return 0; }")
    (out / "layouts.c").write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(out / "layouts"), str(out / "layouts.c")], check=True)
    printed = dict(line.rsplit(" ", 1) for line in subprocess.run(
        [str(out / "layouts")], capture_output=True, text=True, check=True).stdout.splitlines())
    for name, lay in layouts.items():
        assert int(printed[name]) == lay["size"], name
        assert struct.calcsize(lay["format"]) == lay["size"], name
        for i, f in enumerate(lay["fields"]):
            assert int(printed[f"{name}.{i}"]) == f["offset"], (name, f["name"])


def test_spec_strings_never_reach_the_c_source_as_literals(tmp_path):
    import re
    spec = write_spec(tmp_path, "core_inject", r"""
name: core_inject
metrics:
  core_inject_total:
    count: syscall:write
    filter: comm == "a\");}//" or comm == "*/evil/*"
""")
    out = build(spec, tmp_path / "bundle", compile=False)
    source = (out / "core_inject.bpf.c").read_text()
    assert "evil" not in source and '");}' not in source
    literals = set(re.findall(r'"[^"]*"', source))
    assert literals <= {'"vmlinux.h"', '"probec.bpf.h"', '"core_inject.h"', '"license"', '"GPL"', '".maps"',
                        '"tp/syscalls/sys_enter_write"'}, literals


def test_unsupported_constructs_are_diagnostics_not_crashes(tmp_path):
    """Tracepoint fields whose offsets were never read (tracefs unreadable at check) are a core
    diagnostic, not a crash."""
    from probec.compiler.ir.host import HostInfo
    spec = write_spec(tmp_path, "core_unknown_offsets", """
name: core_unknown_offsets
metrics:
  core_switches_total:
    count: tracepoint:sched:sched_switch
    labels: [args.next_pid]
""")
    result = check_file(str(spec), HostInfo(tracefs_roots=("/nonexistent",), btf_path="/nonexistent"))
    assert result.program is not None
    assert build_bundle(result, "core", compile=False) is None
    errors = [d for d in result.diagnostics.items if d.code == "E501"]
    assert errors and "tracepoint fields with unknown offsets" in errors[0].message, result.diagnostics.items


def test_runner_refuses_a_bundle_without_its_object(tmp_path, workloads):
    spec = write_spec(tmp_path, "core_nocompile", SMALL_SPEC)
    out = build(spec, tmp_path / "bundle", compile=False)
    from probec.runtime.core_runner import CoreRunner
    bundle = load_bundle(out)
    runner = CoreRunner(bundle, MetricStore(bundle.manifest), None)
    with pytest.raises(BundleError, match="no compiled object"):
        runner.start()
    runner.stop()


def test_tracepoint_offsets_are_checked_against_this_kernel():
    from probec.runtime.core_preflight import check_tracepoint_fields, tracefs_root
    if tracefs_root() is None:
        pytest.skip("tracefs is not mounted")
    from probec.runtime.manifest import TracepointCheck
    good = TracepointCheck(probe="p", tracepoint="syscalls:sys_exit_write", field="ret", offset=16, size=8,
                           btf_type="", member="")
    check_tracepoint_fields([good])
    with pytest.raises(BundleError, match="offset 16 size 8 on this kernel, but the bundle reads offset 24"):
        check_tracepoint_fields([dataclasses.replace(good, offset=24)])
    with pytest.raises(BundleError, match="does not exist on this kernel"):
        check_tracepoint_fields([dataclasses.replace(good, tracepoint="syscalls:sys_exit_nosuch")])
    # a field read through its BTF record type is libbpf's to relocate, not checked at an offset
    check_tracepoint_fields([dataclasses.replace(good, offset=24, btf_type="trace_event_raw_sys_exit", member="ret")])


def test_uprobes_past_endbr64_are_refused_when_the_binary_changed(workloads):
    from probec.runtime.core_preflight import check_uprobe_placement
    from probec.runtime.manifest import ProbeInfo
    probe = ProbeInfo(id="p", kind="uretprobe", category="", name="pwork_record", offset=4, symbol="pwork_record",
                      address="uretprobe:lib:pwork_record", binary=str(WORKLOADS / "libpwork_cet.so"), provider="",
                      rate=0, group="", variant=0)
    check_uprobe_placement([probe])                    # still starts with endbr64: fine
    with pytest.raises(BundleError, match="no longer starts with endbr64"):
        check_uprobe_placement([dataclasses.replace(probe, binary=str(WORKLOADS / "libpwork.so"))])
