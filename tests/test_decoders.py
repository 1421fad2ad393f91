"""The runtime's decoders on what the kernel really handed over, recorded once, without root:

- tests/recorded/core.json: the core runner's map reads (bpf_map_lookup_batch, per-CPU values)
  and ring-buffer records of tests/recorded/decode.yaml, decoded by the runner's metric readers
  and its event decoder;
- tests/recorded/bpftrace.jsonl: `bpftrace -f json` output of the same spec's bpftrace bundle,
  decoded by the bpftrace runner.

Both were recorded from one run of the workloads that tests/recorded/record.py lists (record
again with it, as root, under the kernel lock). The bundles are rebuilt here from the spec against
recorded host facts, and the readers made from their manifest.json as `probec run` makes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, probec

from probec.runtime.events import EventSink
from probec.runtime.manifest import Bundle, load_bundle
from probec.runtime.store import OVERFLOW, HistogramSeries, MetricStore

RECORDED = ROOT / "tests" / "recorded"
SPEC = RECORDED / "decode.yaml"
FACTS = ROOT / "tests" / "hosts" / "firecracker-6.18.json"
MAX64 = (1 << 64) - 1
OVER = (OVERFLOW, OVERFLOW)

# What the recorded workloads did (record.py): exact, durations aside.
RECORD_VALUES = [0, 1, 2, 3, 4, 5, 1023, 1024, 1025, MAX64]     # pwork_record(v) by rec_a
EXACT = {
    # explicit buckets [0, 1, 2, 3, 4, 1023, 1024, 1025] and +Inf; 5 and 1023 share le=1023,
    # 2^64-1 lands in +Inf, and the sum wraps as the kernel's u64 does
    "rec_record_value": {(): HistogramSeries([1, 1, 1, 1, 1, 2, 1, 1, 1], sum(RECORD_VALUES) & MAX64)},
    # limits.series 3: the first three label sets stay, rec_c's and rec_d's fold into __overflow__
    "rec_records_total": {("rec_a", 0): 4, ("rec_a", 1): 6, ("rec_b", 1): 2, OVER: 2},
    "rec_write_delta_total": {(): 4 * (10 - 100)},                  # signed: four writes of 10 bytes
    "rec_writes_total": {(): 4},
}


def build(backend: str, out: Path) -> Bundle:
    extra = ["--no-compile"] if backend == "core" else ["--bpftrace-version", "0.17"]
    result = probec("build", "--target", str(FACTS), "--backend", backend, *extra, "-o", str(out),
                    str(SPEC.relative_to(ROOT)))
    assert result.returncode == 0, result.stderr
    return load_bundle(out)


def events_written(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_sleep_histogram(series: dict, events: list[dict]) -> None:
    """Five calls of pwork_sleep_us (700 us and 1500 us, on both CPUs) in exp2(64us, 1s): each
    rec_sleep event carries the duration the histogram counted, so the buckets are those of the
    events' durations (le: the first edge >= the duration) and the sum is theirs, to the ns."""
    (labels, hist), = series.items()
    assert labels == ("rec_sleep",)
    sleeps = [e for e in events if e["event"] == "rec_sleep"]
    assert [e["comm"] for e in sleeps] == ["rec_sleep"] * 5
    durations = [round(e["duration_seconds"] * 1e9) for e in sleeps]
    asked = [700_000, 700_000, 1_500_000, 700_000, 1_500_000]     # in the order record.py ran them
    assert all(a <= d for a, d in zip(asked, durations)), durations   # never shorter; a busy VM adds
    edges = [64_000 << i for i in range(15)]
    expected = [0] * 16
    for d in durations:
        expected[next((i for i, edge in enumerate(edges) if d <= edge), 15)] += 1
    assert hist.buckets == expected
    assert hist.sum == sum(durations)


def assert_record_events(events: list[dict]) -> None:
    """The rec_record event at each return of pwork_record in rec_a: retval is signed (2^64-1 comes
    back as -1), `twice` computed in the kernel, active(sleep) rendered by name."""
    records = [e for e in events if e["event"] == "rec_record"]
    signed = [v - (1 << 64) if v >> 63 else v for v in RECORD_VALUES]
    assert [(e["comm"], e["retval"], e["twice"], e["phase"]) for e in records] == \
        [("rec_a", v, 2 * v, "none") for v in signed]
    assert len({e["pid"] for e in records}) == 1 and all(e["pid"] == e["tid"] and e["cpu"] == 0 for e in records)
    stamps = [e["ts_ns"] for e in records]
    assert stamps == sorted(stamps) and stamps[0] > 0
    assert set(records[0]) == {"event", "ts_ns", "pid", "tid", "cpu", "comm", "retval", "twice", "phase"}


# --- core: map bytes and ring-buffer records ---------------------------------------------------------
@pytest.fixture(scope="module")
def core(tmp_path_factory, workloads):
    """The core runner made for the rebuilt bundle, its store, and the events it wrote."""
    from probec.runtime.core_runner import CoreRunner
    tmp = tmp_path_factory.mktemp("core_decode")
    bundle = build("core", tmp / "bundle")
    store = MetricStore(bundle.manifest)
    sink = EventSink(str(tmp / "events.jsonl"), bundle.manifest, store.health)
    runner = CoreRunner(bundle, store, sink, log=lambda message: None)
    recording = json.loads((RECORDED / "core.json").read_text())
    maps = {name: [(bytes.fromhex(k), [bytes.fromhex(c) for c in v] if isinstance(v, list) else bytes.fromhex(v))
                   for k, v in items] for name, items in recording["maps"].items()}
    for data in recording["records"]:
        runner.on_record(bytes.fromhex(data))
    sink.close()
    return runner, maps, store, events_written(tmp / "events.jsonl")


def test_core_map_bytes_decode_to_exact_series(core):
    runner, maps, store, events = core
    assert {r.name for r in runner.readers} == set(EXACT) | {"rec_sleep_seconds"}
    per_cpu_spread = False
    for reader in runner.readers:     # as the runner's read() does, one metric at a time
        items = maps[reader.map]
        per_cpu_spread |= any(sum(1 for c in v if any(c)) > 1 for _, v in items)
        overflow = reader.decode_overflow(maps[reader.overflow_map]) if reader.overflow_map else None
        folded = len(maps[reader.folded_map]) if reader.folded_map else 0
        store.replace(reader.name, reader.decode(items), overflow, folded)
    snapshot = store.snapshot()
    for name, series in EXACT.items():
        assert snapshot[name].series == series, name
    assert snapshot["rec_records_total"].dropped_series == 2          # rec_c and rec_d, told apart
    assert snapshot["rec_record_value"].dropped_series == 0
    assert_sleep_histogram(snapshot["rec_sleep_seconds"].series, events)
    assert per_cpu_spread, "the recording should hold a key counted on more than one CPU"


def test_core_overflow_of_a_metric_below_its_limit_is_empty(core):
    runner, maps, _store, _events = core
    sleep = next(r for r in runner.readers if r.name == "rec_sleep_seconds")
    assert sleep.decode_overflow(maps[sleep.overflow_map]) is None
    assert maps[sleep.folded_map] == []


def test_core_keys_that_differ_after_a_names_nul_are_one_series(core):
    """A comm label is 16 bytes of the key; before 6.x (Debian's 6.1) bpf_get_current_comm leaves
    the bytes after the name's NUL as they were, so one thread's updates could land under several
    kernel keys that decode to one label set (the kernel matrix found sums that kept only one).
    The bundle now zeroes the name first; a reader still adds such keys up, sums and counts alike."""
    runner, maps, _store, _events = core
    for name in ("rec_sleep_seconds", "rec_records_total"):
        reader = next(r for r in runner.readers if r.name == name)
        offset, size, ctype = reader.label_fields[0]
        assert ctype == "char"
        items = maps[reader.map]
        twins = []
        for key, values in items:
            end = key.index(b"\0", offset) + 1
            assert end < offset + size
            twins.append((key[:end] + b"\xaa" * (offset + size - end) + key[offset + size:], values))
        once, twice = reader.decode(items), reader.decode(items + twins)
        assert set(once) == set(twice) and once, name
        for labels, series in once.items():
            if isinstance(series, HistogramSeries):
                assert twice[labels] == HistogramSeries([2 * b for b in series.buckets], 2 * series.sum), name
            else:
                assert twice[labels] == 2 * series, name


def test_core_ring_buffer_records_decode_to_event_lines(core):
    runner, _maps, store, events = core
    assert_record_events(events)
    assert [e["event"] for e in events] == ["rec_record"] * 10 + ["rec_sleep"] * 5
    assert store.health.decode_errors == 0


def test_core_records_that_do_not_fit_are_counted_not_written(core, tmp_path):
    """A record of an unknown event or shorter than its layout is a decode error, never an event."""
    runner, _maps, _store, _events = core
    recording = json.loads((RECORDED / "core.json").read_text())
    record = bytes.fromhex(recording["records"][0])
    store = MetricStore(runner.manifest)
    sink = EventSink(str(tmp_path / "events.jsonl"), runner.manifest, store.health)
    from probec.runtime.core_runner import CoreRunner
    broken = CoreRunner(runner.bundle, store, sink, log=lambda message: None)
    broken.on_record(b"\x07\x00\x00\x00" + record[4:])        # no event 7 in this bundle
    broken.on_record(record[:-8])
    sink.close()
    assert store.health.decode_errors == 2 and events_written(tmp_path / "events.jsonl") == []


# --- bpftrace: recorded `bpftrace -f json` output ----------------------------------------------------
@pytest.fixture(scope="module")
def bpftrace(tmp_path_factory, workloads):
    from probec.runtime.bpftrace_runner import BpftraceRunner
    tmp = tmp_path_factory.mktemp("bpftrace_decode")
    bundle = build("bpftrace", tmp / "bundle")
    store = MetricStore(bundle.manifest)
    sink = EventSink(str(tmp / "events.jsonl"), bundle.manifest, store.health)
    runner = BpftraceRunner(bundle, store, sink, log=lambda message: None)
    for line in (RECORDED / "bpftrace.jsonl").read_text().splitlines():
        runner.handle(json.loads(line))
    sink.close()
    return runner, store, events_written(tmp / "events.jsonl")


def test_bpftrace_json_output_decodes_to_exact_series(bpftrace):
    _runner, store, events = bpftrace
    snapshot = store.snapshot()
    for name, series in EXACT.items():
        assert snapshot[name].series == series, name
    assert snapshot["rec_records_total"].dropped_series == 2
    assert_sleep_histogram(snapshot["rec_sleep_seconds"].series, events)
    assert store.health.attached and all(store.health.attached.values())     # the ready mark arrived
    assert store.health.events_emitted == {"rec_record": 10, "rec_sleep": 5}
    assert store.health.decode_errors == 0


def test_bpftrace_events_decode_like_the_core_ones(bpftrace, core):
    _runner, _store, events = bpftrace
    assert_record_events(events)
    assert [e["event"] for e in events] == ["rec_record"] * 10 + ["rec_sleep"] * 5
    core_events = core[3]
    assert [set(e) for e in events] == [set(e) for e in core_events]


def test_bpftrace_ipv4_event_fields_keep_the_text_bpftrace_printed(tmp_path, workloads):
    """bpftrace prints an IPv4 event field with ntop() as text ("%s"; "%llu" does not compile):
    the runner keeps it, as the core runner renders its number, a dotted quad."""
    from probec.runtime.bpftrace_runner import BpftraceRunner
    spec = ROOT / "tests" / "golden" / "specs" / "golden_kernel.yaml"
    result = probec("build", "--target", str(FACTS), "--bpftrace-version", "0.17", "-o", str(tmp_path / "bundle"),
                    str(spec.relative_to(ROOT)))
    assert result.returncode == 0, result.stderr
    bundle = load_bundle(tmp_path / "bundle")
    assert '"E\\0370\\037%llu\\037%d\\037%d\\037%d\\037%s\\037%s\\037' in (tmp_path / "bundle" / "golden_kernel.bt").read_text()
    store = MetricStore(bundle.manifest)
    sink = EventSink(str(tmp_path / "events.jsonl"), bundle.manifest, store.health)
    runner = BpftraceRunner(bundle, store, sink, log=lambda message: None)
    line = "\x1f".join(["E", "0", "123", "7", "8", "1", "10.0.0.1", "192.168.1.20", "40000", "80", "1",
                        "\n        tcp_retransmit_skb+0\n        tcp_retransmit_timer+1\n"]) + "\n"
    runner.handle({"type": "printf", "data": line})
    sink.close()
    assert store.health.decode_errors == 0
    [event] = events_written(tmp_path / "events.jsonl")
    assert event == {"event": "retransmit", "ts_ns": 123, "pid": 7, "tid": 8, "cpu": 1, "args_saddr": "10.0.0.1",
                     "args_daddr": "192.168.1.20", "args_sport": 40000, "args_dport": 80, "args_state": 1,
                     "kstack": ["tcp_retransmit_skb+0", "tcp_retransmit_timer+1"]}
