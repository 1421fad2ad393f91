"""`probec run --otlp URL`: metrics and sampled events over OTLP/HTTP to a real receiver started
on loopback by the test (tests/otlp_receiver.py decodes what arrives with opentelemetry-proto's
classes), checked against workloads with known calls under both backends, and against the
Prometheus snapshot and the JSON lines of the same run."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, probec
from harness import Run, assert_histogram_matches, buckets, build, measured_durations, per_bucket, value, workload, write_spec
from otlp_receiver import OtlpReceiver, attributes

FACTS = ROOT / "tests" / "hosts" / "firecracker-6.18.json"

SLEEP_SPEC = """
name: otlp_sleeps
binaries:
  pwork: $WORK/libpwork.so
spans:
  sleep:
    function: pwork:pwork_sleep_us
metrics:
  sleep_seconds:
    histogram: sleep.duration
    buckets: [500us, 1ms, 2ms, 5ms, 10ms, 25ms]
  sleeps_total:
    count: sleep.end
    labels: [comm]
  pwork.sleep.duration:               # named the OpenTelemetry way
    histogram: sleep.duration
    buckets: [500us, 1ms, 2ms, 5ms, 10ms, 25ms]
events:
  slow_sleep:
    on: sleep.end
    when: duration > 10ms and duration < 100ms
    fields: [comm, tid, duration, ustack]
"""
EDGES = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025]


@pytest.fixture
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


def run_sleeps(tmp_path: Path, backend: str, url: str, *extra: str):
    """40 calls of 200 us, 6 of 20 ms and one of 400 ms (the last keeps the process alive while
    bpftrace symbolises the stacks: it is no event), timed by the workload itself; 6 events."""
    bundle = build(write_spec(tmp_path, SLEEP_SPEC), backend, tmp_path / "bundle")
    durations = tmp_path / "durations.txt"
    began = time.time_ns()
    run = Run(bundle, tmp_path, "--otlp", url, *extra)
    try:
        workload("pwork", "--comm", "pw_otlp", "--durations", str(durations), "sleep", "40", "200", "6", "20000",
                 "1", "400000")
        metrics = run.stop()
    finally:
        run.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    return metrics, run, measured_durations(durations), (began, time.time_ns())


@pytest.mark.kernel
def test_metrics_and_spans_arrive_exactly(tmp_path, backend, receiver):
    metrics, run, measured, (began, ended) = run_sleeps(tmp_path, backend, receiver.url)
    assert receiver.bad == []

    # Metrics: the same numbers as the Prometheus snapshot, named the OpenTelemetry way.
    got = receiver.last_metrics()
    hist = got["sleep"]
    assert hist.unit == "s" and hist.histogram.aggregation_temporality == 2        # cumulative
    [point] = hist.histogram.data_points
    assert list(point.explicit_bounds) == EDGES
    assert point.count == 47
    snapshot = per_bucket(buckets(metrics, "sleep_seconds"))
    assert list(point.bucket_counts) == [snapshot[le] for le in sorted(snapshot, key=lambda le: float(le))]
    assert point.sum == pytest.approx(value(metrics, "sleep_seconds_sum"), rel=1e-12)
    cumulative = dict(zip([repr(e) for e in EDGES] + ["+Inf"], itertools.accumulate(point.bucket_counts)))
    assert_histogram_matches(cumulative, point.sum, measured)     # each call in the bucket its clocks say
    counter = got["sleeps"]
    assert counter.sum.is_monotonic and counter.sum.aggregation_temporality == 2
    assert [(attributes(p), p.as_int) for p in counter.sum.data_points] == [({"comm": "pw_otlp"}, 47)]
    assert got["probec_events_lost"].sum.data_points[0].as_int == 0
    assert {attributes(p)["signal"]: p.as_int for p in got["probec_otlp_export_failures"].sum.data_points} == \
        {"metrics": 0, "traces": 0}
    assert "sleep_seconds_window" not in got and "sleep_window" not in got
    # a spec metric named the OpenTelemetry way keeps its name over OTLP; Prometheus derives its own
    dotted = got["pwork.sleep.duration"]
    assert dotted.unit == "s" and dotted.histogram.data_points == hist.histogram.data_points
    assert value(metrics, "pwork_sleep_duration_seconds_count") == 47
    assert buckets(metrics, "pwork_sleep_duration_seconds") == buckets(metrics, "sleep_seconds")

    # Spans: one per event, as the JSON lines have them, on the wall clock of this test.
    spans = receiver.spans()
    events = run.events()
    assert len(spans) == len(events) == 6
    resource = attributes(spans[0][0].resource)
    assert resource["service.name"] == "otlp_sleeps" and resource["probec.backend"] == backend
    spans = sorted((span for _, span in spans), key=lambda s: s.start_time_unix_nano)
    slow = [i for i, d in enumerate(measured.inner) if d > 0.010]
    assert slow == list(range(40, 47)) and max(measured.outer[:40]) < 0.010     # else the VM stalled a call
    assert max(measured.outer[40:46]) < 0.1 and measured.inner[46] > 0.1
    for span, event, call in zip(spans, sorted(events, key=lambda e: e["ts_ns"]), slow):
        attrs = attributes(span)
        assert span.name == "slow_sleep" and span.kind == 1
        assert len(span.trace_id) == 16 and len(span.span_id) == 8
        assert attrs["process.pid"] == event["pid"] and attrs["thread.id"] == event["tid"] == event["pid"]
        assert attrs["comm"] == "pw_otlp" and attrs["duration_seconds"] == event["duration_seconds"]
        assert span.end_time_unix_nano - span.start_time_unix_nano == round(event["duration_seconds"] * 1e9)
        assert measured.inner[call] - 1e-6 <= (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9 \
            <= measured.outer[call] + 1e-6
        assert began <= span.start_time_unix_nano < span.end_time_unix_nano <= ended
        assert attrs["ustack"] == event["ustack"]
        assert any("run_work" in frame or "main" in frame for frame in attrs["ustack"]), attrs["ustack"]
    assert len({s.trace_id for s in spans}) == 6
    assert value(metrics, "probec_otlp_export_failures_total", signal="traces") == 0
    assert value(metrics, "probec_events_dropped_total", reason="otlp") == 0


@pytest.mark.kernel
def test_export_failures_are_counted_and_said_once(tmp_path, backend):
    """A receiver that answers 503 to everything: every span is counted as dropped, every failed
    export counted, and each signal's failure said once in the log."""
    down = OtlpReceiver(fail_with=503)
    try:
        metrics, run, _measured, _ = run_sleeps(tmp_path, backend, down.url, "--otlp-interval", "0.3")
    finally:
        down.close()
    stderr = run.stderr()
    assert value(metrics, "probec_events_total", event="slow_sleep") == 6
    assert value(metrics, "probec_events_dropped_total", reason="otlp") == 6
    assert value(metrics, "probec_otlp_export_failures_total", signal="traces") >= 1
    assert value(metrics, "probec_otlp_export_failures_total", signal="metrics") >= 2    # every 0.3 s
    assert stderr.count("cannot export traces") == 1 and stderr.count("cannot export metrics") == 1, stderr
    assert len(run.events()) == 6           # the JSON lines do not depend on the receiver
    assert down.requests["/v1/traces"] >= 1 and down.requests["/v1/metrics"] >= 2


# --- without the kernel: the span encoding, the names, the errors ---------------------------------------
def test_recorded_events_become_exact_spans(tmp_path, receiver, workloads):
    """The recorded ring-buffer records of tests/recorded/decode.yaml through the core runner's
    decoder to a SpanExport: signed retvals, a value computed in the kernel, an enumeration by
    name, strings, times; each span as its JSON line says."""
    from probec.runtime.core_runner import CoreRunner
    from probec.runtime.events import EventOutput, EventSink
    from probec.runtime.manifest import load_bundle
    from probec.runtime.otlp import SpanExport
    from probec.runtime.store import MetricStore
    result = probec("build", "--target", str(FACTS), "--backend", "core", "--no-compile", "-o",
                    str(tmp_path / "bundle"), "tests/recorded/decode.yaml")
    assert result.returncode == 0, result.stderr
    bundle = load_bundle(tmp_path / "bundle")
    store = MetricStore(bundle.manifest)
    said = []
    spans = SpanExport(receiver.url, bundle.manifest, {"service.name": "decode"}, store.health, said.append)
    output = EventOutput(bundle.manifest, EventSink(str(tmp_path / "events.jsonl"), bundle.manifest), spans)
    runner = CoreRunner(bundle, store, output, log=said.append)
    records = json.loads((ROOT / "tests" / "recorded" / "core.json").read_text())["records"]
    for data in records:
        runner.on_record(bytes.fromhex(data))
    output.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    got = receiver.spans()
    assert len(got) == len(events) == 15 and said == [] and receiver.bad == []
    assert store.health.decode_errors == 0 and store.health.events_unsent == 0
    for (rs, span), event in zip(got, events):
        attrs = attributes(span)
        assert span.name == event["event"]
        expected = {k: v for k, v in event.items() if k not in ("event", "ts_ns", "pid", "tid", "cpu")}
        assert {k: attrs[k] for k in expected} == expected
        assert (attrs["process.pid"], attrs["thread.id"], attrs["cpu.logical_number"]) == \
            (event["pid"], event["tid"], event["cpu"])
        length = span.end_time_unix_nano - span.start_time_unix_nano
        assert length == (round(event["duration_seconds"] * 1e9) if "duration_seconds" in event else 0)
    assert [attributes(s)["retval"] for _, s in got[:10]] == [0, 1, 2, 3, 4, 5, 1023, 1024, 1025, -1]
    assert {attributes(s)["phase"] for _, s in got[:10]} == {"none"}
    assert attributes(got[0][0].resource) == {"service.name": "decode"}


def test_names_follow_opentelemetry():
    from probec.runtime.otlp import otel_name
    assert otel_name("request_seconds", "seconds") == ("request", "s")
    assert otel_name("written_bytes_total", "bytes") == ("written", "By")
    assert otel_name("writes_total", "none") == ("writes", "")
    assert otel_name("probec_backend_gap_seconds") == ("probec_backend_gap", "s")
    assert otel_name("probec_events_lost") == ("probec_events_lost", "")
    assert otel_name("http.server.request.duration", "seconds") == ("http.server.request.duration", "s")


def bpftrace_bundle(tmp_path: Path) -> Path:
    result = probec("build", "--target", str(FACTS), "--bpftrace-version", "0.17", "-o", str(tmp_path / "bundle"),
                    str(write_spec(tmp_path, SLEEP_SPEC)))
    assert result.returncode == 0, result.stderr
    return tmp_path / "bundle"


@pytest.mark.skipif(os.geteuid() != 0, reason="probec run refuses to go on without root before it reads --otlp")
def test_missing_sdk_is_a_clear_error(tmp_path, workloads):
    """Without the 'otlp' extra (an `opentelemetry` package that has no SDK in it, first on the
    path), `probec run --otlp` says what to install and exits 1, before attaching anything."""
    bundle = bpftrace_bundle(tmp_path)
    fake = tmp_path / "fake" / "opentelemetry"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=f"{fake.parent}{os.pathsep}{ROOT}")
    result = probec("run", str(bundle), "--port", "0", "--otlp", "http://127.0.0.1:1", env=env)
    assert result.returncode == 1, result.stderr
    assert "pip install 'probec[otlp]'" in result.stderr and "Traceback" not in result.stderr
    assert "attached" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="probec run refuses to go on without root before it reads --otlp")
def test_otlp_url_must_be_http(tmp_path, workloads):
    result = probec("run", str(bpftrace_bundle(tmp_path)), "--port", "0", "--otlp", "127.0.0.1:4318")
    assert result.returncode == 1
    assert "--otlp takes an http:// or https:// URL" in result.stderr and "Traceback" not in result.stderr


SLEEP_EVENTS_SPEC = """
name: otlp_sleep_events
binaries:
  pwork: $WORK/libpwork.so
spans:
  sleep:
    function: pwork:pwork_sleep_us
metrics:
  sleeps_total:
    count: sleep.end
events:
"""


def run_sleep_events(tmp_path: Path, receiver: OtlpReceiver, events: dict[str, list[str]],
                     *pwork_args: str) -> tuple[dict, Run, Path, float]:
    """A span over pwork_sleep_us, `sleeps_total` counting its ends and, at every end, one event of
    each of `events` (name: fields), built for the core backend (the ring: bpftrace 0.17 prints
    events one line at a time from user space, 11-50 us each in the traced program,
    benchmarks/results/event_cost.md) and run with --otlp to `receiver` while pwork runs
    `pwork_args`. Checks that nothing was lost, undecodable, dropped or failed on the way; returns
    the final metrics, the run, the bundle and the seconds pwork took."""
    from conftest import require_kernel
    require_kernel(need_clang=True)
    spec = SLEEP_EVENTS_SPEC + "".join(f"  {name}:\n    on: sleep.end\n    fields: [{', '.join(fields)}]\n"
                                       for name, fields in events.items())
    bundle = build(write_spec(tmp_path, spec), "core", tmp_path / "bundle")
    run = Run(bundle, tmp_path, "--otlp", receiver.url)
    try:
        began = time.monotonic()
        workload("pwork", *pwork_args)
        took = time.monotonic() - began
        metrics = run.stop()
    finally:
        run.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    assert value(metrics, "probec_events_lost_total") == 0 and value(metrics, "probec_decode_errors_total") == 0
    assert value(metrics, "probec_events_dropped_total", reason="otlp") == 0
    assert value(metrics, "probec_otlp_export_failures_total", signal="traces") == 0
    assert receiver.bad == []
    return metrics, run, bundle, took


@pytest.mark.kernel
def test_no_event_lost_at_a_moderate_rate(tmp_path, receiver, workloads):
    """100,000 calls of 5 us, an event at each (about 100k events/s here), with the default 1 MiB
    ring: every one in the JSON lines and every one a span."""
    metrics, run, _, took = run_sleep_events(tmp_path, receiver, {"each_sleep": ["duration"]},
                                             "sleep", "100000", "5")
    print(f"100,000 events in {took:.2f} s: {100_000 / took:,.0f} events/s")
    assert value(metrics, "sleeps_total") == 100_000
    assert value(metrics, "probec_events_total", event="each_sleep") == 100_000
    with open(run.events_path) as f:
        assert sum(1 for _ in f) == 100_000
    assert receiver.span_count == 100_000


@pytest.mark.kernel
def test_records_of_two_sizes_interleaved_are_all_read(tmp_path, receiver, workloads):
    """Two events of different record sizes at every call, so the ring holds them interleaved:
    the bulk reader hands runs of one size over as blocks and the rest one by one. Every event of
    both arrives in the JSON lines and as a span, with its own fields."""
    _, run, bundle, _ = run_sleep_events(tmp_path, receiver, {"short_record": ["duration"],
                                                              "long_record": ["comm", "duration"]},
                                         "--comm", "pw_sizes", "sleep", "3000", "5")
    sizes = {e["name"]: e["record"]["size"] for e in json.loads((bundle / "manifest.json").read_text())["events"]}
    assert sizes["short_record"] != sizes["long_record"]
    events = run.events()
    by_name = {name: [e for e in events if e["event"] == name] for name in sizes}
    assert {name: len(es) for name, es in by_name.items()} == {"short_record": 3000, "long_record": 3000}
    assert all(e["comm"] == "pw_sizes" for e in by_name["long_record"])
    assert all(set(e) == {"event", "ts_ns", "pid", "tid", "cpu", "duration_seconds"} for e in by_name["short_record"])
    # each call's two events carry the same duration (one span end)
    assert sorted(e["duration_seconds"] for e in by_name["short_record"]) == \
        sorted(e["duration_seconds"] for e in by_name["long_record"])
    spans = [span for _, span in receiver.spans()]
    assert receiver.span_count == 6000
    assert sum(1 for s in spans if s.name == "long_record" and attributes(s)["comm"] == "pw_sizes") == 3000
