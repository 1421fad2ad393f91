"""Prometheus, for real: Debian's Prometheus scrapes a running `probec run` collector every
second (loopback only, its own data folder), with the rules `probec rules` wrote loaded, and its
HTTP API answers what the workload's ground truth says: counters exactly, and
`histogram_quantile` over a workload with a known distribution in the bucket that the
workload's own clocks put that quantile in. Every dashboard and rule query names only metrics
that the real scrape has. Under each backend."""

from __future__ import annotations

import math
import time
import urllib.request

import pytest

from conftest import probec
from harness import Run, build, measured_durations, workload, write_spec
from prometheus_server import PrometheusServer, free_port
from test_rules import dashboard_queries, metric_names, rule_queries

pytestmark = pytest.mark.kernel
JOB = "prom_real"
EDGES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05)

SPEC = """
name: prom_real
binaries:
  pwork: $WORK/pwork
  lib: $WORK/libpwork.so
spans:
  sleep:
    function: lib:pwork_sleep_us
metrics:
  sleep_duration_seconds:
    histogram: sleep.duration
    buckets: [500us, 1ms, 2ms, 5ms, 10ms, 25ms, 50ms]
    alert: p99 > 5ms
  records_total:
    count: uprobe:lib:pwork_record
  recorded:
    histogram: arg0
    on: uprobe:lib:pwork_record
    buckets: [1, 10, 100]
  ticks_total:
    count: usdt:pwork:pwork:tick
    labels: [comm]
events:
  slow_sleep:
    on: sleep.end
    when: duration > 10ms
    sample: at most 1000/s
    fields: [comm, duration]
"""


def exposition_names(text: str) -> set[str]:
    """The sample names a scrape has or declares: every sample line's name, and for each
    `# TYPE` line the names of its type (a counter's _total, a histogram's _bucket, ...)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "untyped": ("",)}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name + suffix for suffix in suffixes[kind]}
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def bucket_of(value: float) -> tuple[float, float]:
    """The histogram bucket (lower, upper] a value falls in."""
    lower = 0.0
    for edge in EDGES:
        if value <= edge:
            return lower, edge
        lower = edge
    return lower, math.inf


def truth_buckets(q: float, durations: list[float]) -> set[tuple[float, float]]:
    """The bucket of the q-quantile of the durations, as Prometheus ranks it (rank q * n)."""
    ordered = sorted(durations)
    return {bucket_of(ordered[max(0, math.ceil(q * len(ordered)) - 1)])}


def wait_for(server: PrometheusServer, expr: str, want: float, timeout: float = 30) -> float:
    """Query until the latest sample reads `want`; returns when it did (the caller's asserts say
    what it read when the time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = server.vector(expr)
        if got and list(got.values())[0] == want:
            return time.time()
        time.sleep(0.25)
    return time.time()


def test_prometheus_scrapes_exact_counts_and_quantiles_in_the_true_bucket(tmp_path, backend):
    spec = write_spec(tmp_path, SPEC)
    rules = tmp_path / "rules.yml"
    made = probec("rules", str(spec), "-o", str(rules), timeout=60)
    assert made.returncode == 0, made.stderr
    dashboard = tmp_path / "dashboard.json"
    made = probec("dashboard", str(spec), "-o", str(dashboard), timeout=60)
    assert made.returncode == 0, made.stderr
    port = free_port()
    run = Run(build(spec, backend, tmp_path / "bundle"), tmp_path, port=port)
    server = None
    try:
        server = PrometheusServer(tmp_path / "prometheus", (f"127.0.0.1:{port}",), job=JOB,
                                  rule_files=(rules,))
        sel = f'{{job="{JOB}"}}'
        wait_for(server, f"up{sel}", 1)
        # One call first, and Prometheus holding it: the histogram's series exist in the TSDB
        # before the workload, so the rate over the workload counts every call of it.
        warm = tmp_path / "warm.txt"
        workload("pwork", "--durations", str(warm), "sleep", "1", "1000")
        wait_for(server, f"sleep_duration_seconds_count{sel}", 1)
        # 30 rounds of nine 1 ms calls and one 20 ms call: p50 among the 1 ms calls, p99 among
        # the 20 ms ones.
        timed = tmp_path / "sleeps.txt"
        workload("pwork", "--durations", str(timed), "sleep", *["9", "1000", "1", "20000"] * 30)
        workload("pwork", "record", "0", "1", "5", "10", "50", "100", "1000")
        workload("pwork", "--comm", "prom_a", "usdt", "7")
        workload("pwork", "--comm", "prom_b", "usdt", "3")
        # Wait for the last counts in Prometheus, then for one more scrape and rule evaluation.
        wait_for(server, f"sleep_duration_seconds_count{sel}", 301)
        wait_for(server, f'ticks_total{{job="{JOB}",comm="prom_b"}}', 3)
        time.sleep(2.5)
        at = time.time()

        def one(expr: str) -> float:
            got = server.vector(expr, at)
            assert len(got) == 1, (expr, got)
            return list(got.values())[0]

        # Counters, as the workload counted: exact.
        assert one(f"records_total{sel}") == 7
        assert one(f'ticks_total{{job="{JOB}",comm="prom_a"}}') == 7
        assert one(f'ticks_total{{job="{JOB}",comm="prom_b"}}') == 3
        assert one(f"sleep_duration_seconds_count{sel}") == 301
        assert {dict(k)["le"]: v for k, v in server.vector(f"recorded_bucket{sel}", at).items()} == \
            {"1": 2, "10": 4, "100": 6, "+Inf": 7}
        # Quantiles over the workload: in the bucket its own clocks say. A span lies between the
        # caller's clock and the body's own, so either one's bucket is the truth.
        measured = measured_durations(warm, timed)
        window = "5m"          # the whole run: the series began with the warm-up call
        for q in (0.5, 0.99):
            truth = truth_buckets(q, measured.outer) | truth_buckets(q, measured.inner)
            got = one(f"histogram_quantile({q}, rate(sleep_duration_seconds_bucket{sel}[{window}]))")
            assert any(low < got <= high for low, high in truth), (q, got, truth)
            # The recording rule `probec rules` wrote says the same.
            recorded = one(f"job:sleep_duration_seconds:p{round(q * 100)}_rate5m{sel}")
            assert any(low < recorded <= high for low, high in truth), (q, recorded, truth)
            print(f"{backend}: p{round(q * 100)} {got:.6f} s (recorded {recorded:.6f} s), true bucket {truth}")
        assert truth_buckets(0.99, measured.outer) == {(0.01, 0.025)}
        # The spec's alert (p99 > 5ms, no `for`) fires; the collector's health alerts do not.
        alerts = server.api("alerts")["data"]["alerts"]
        firing = sorted(a["labels"]["alertname"] for a in alerts if a["state"] == "firing")
        assert firing == ["SleepDurationSecondsP99High"], alerts
        # Every query of the dashboard and the rules names only what this collector exports.
        scraped = {dict(k)["__name__"] for k in server.vector(f"group by (__name__) ({sel})", at)}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            declared = exposition_names(r.read().decode())
        exprs, recorded_names = rule_queries(rules)
        prometheus_own = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
                          "scrape_samples_post_metric_relabeling", "ALERTS", "ALERTS_FOR_STATE"}
        assert scraped - prometheus_own - recorded_names <= declared
        for expr in exprs + dashboard_queries(dashboard):
            names = metric_names(expr)
            assert names <= declared | recorded_names | {"up"}, (expr, names - declared)
        run.stop()
    finally:
        if server is not None:
            server.stop()
            print(f"prometheus log:\n{server.log()}")
        run.kill()
        print(f"probec run stderr:\n{run.stderr()}")
