"""`probec rules` and `probec dashboard`: what they write passes Prometheus's own checks.

No kernel here: the rules and the dashboard come from the checked spec alone. `promtool check
rules` reads every shipped spec's rules; `promtool test rules` runs our unit tests (input series,
expected alerts and recorded values) against a spec's rules; every dashboard query parses in a
real Prometheus (its HTTP API says where a query does not) and names only metrics the spec
exports or the collector's health metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, probec
from prometheus_server import PrometheusServer, require_tool

SHIPPED = sorted([*ROOT.glob("examples/*/spec.yaml"), *ROOT.glob("specs/*.yaml"),
                  *ROOT.glob("benchmarks/specs/*.yaml")])
# The health metrics runtime/exporter.py exports on every scrape, and Prometheus's own `up`.
HEALTH = {"up", "probec_up", "probec_events_total", "probec_events_lost_total", "probec_events_rate_limited_total",
          "probec_series_dropped_total", "probec_span_begin_overflow_total", "probec_map_entries",
          "probec_map_capacity", "probec_probe_attached", "probec_last_read_seconds", "probec_backend_restarts_total"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}

MONITORED_SPEC = """
name: monitored
binaries:
  pwork: /bin/true
spans:
  sleep:
    function: pwork:main
metrics:
  lat_seconds:
    histogram: sleep.duration
    buckets: [100ms, 200ms]
    alert: p99 > 50ms for 5m
  lat_by_comm_seconds:
    histogram: sleep.duration
    labels: [comm]
    buckets: [10ms, 200ms]
    alert: p99 > 2x baseline for 5m
  phases_seconds:
    parts: {wait: duration / 2, work: duration / 2}
    on: sleep.end
    buckets: exp2(1ms, 1s)
  sleeps_total:
    count: sleep.end
    labels: [comm]
  sleeps_in_flight:
    gauge: sleep.open
events:
  slow:
    on: sleep.end
    when: duration > 150ms
    sample: at most 10/s
    fields: [comm, duration]
"""


def generate(tmp: Path, command: str, spec: Path, *extra: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"{spec.stem}.{command}"
    result = probec(command, str(spec), "-o", str(out), *extra, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside label matchers, ranges,
    `by (...)` lists and strings, that are not functions, keywords or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        if m.group(2) is None and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def exported_names(spec: Path) -> set[str]:
    """The sample names the collector of this spec exports (compiler/spec/limits.py)."""
    from probec.compiler.diagnostics import Diagnostics
    from probec.compiler.spec.limits import exposed_names
    from probec.compiler.spec.loader import load_spec_file
    loaded, _ = load_spec_file(spec, Diagnostics())
    return {name for m in loaded.metrics.values() for name in exposed_names(m.name, m.kind)}


def dashboard_queries(path: Path) -> list[str]:
    dashboard = json.loads(path.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def rule_queries(path: Path) -> tuple[list[str], set[str]]:
    """Every rule's expression, and the names recording rules define."""
    groups = yaml.safe_load(path.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return [r["expr"] for r in rules], {r["record"] for r in rules if "record" in r}


def test_metric_names_reads_promql():
    assert metric_names('histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{job="x",le=~"1.*"}[5m])))') == {"a_bucket"}
    assert metric_names('up{job="j"} == 0 or probec_up{job="j"} == 0') == {"up", "probec_up"}
    assert metric_names("job:a:p99_rate5m > 0.05 and on (job) b / ignoring (x) c offset 5m") == {"job:a:p99_rate5m", "b", "c"}


@pytest.mark.parametrize("spec", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_rules_of_every_shipped_spec_pass_promtool(tmp_path, spec):
    promtool = require_tool("promtool")
    rules = generate(tmp_path, "rules", spec)
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    exprs, recorded = rule_queries(rules)
    allowed = exported_names(spec) | HEALTH | recorded
    for expr in exprs:
        assert metric_names(expr) <= allowed, (expr, metric_names(expr) - allowed)


def test_rules_and_dashboard_are_deterministic(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MONITORED_SPEC)
    for command in ("rules", "dashboard"):
        first = generate(tmp_path / "a", command, spec).read_bytes()
        second = generate(tmp_path / "b", command, spec).read_bytes()
        assert first == second
        assert str(tmp_path).encode() not in first      # no absolute path inside
    # The job the collector is scraped as is the spec's name unless told otherwise.
    rules = generate(tmp_path / "c", "rules", spec, "--job", "serving").read_text()
    assert 'job="serving"' in rules and 'job="monitored"' not in rules
    # A job name with quotes, backslashes or a newline stays inside its PromQL string.
    promtool = require_tool("promtool")
    odd = generate(tmp_path / "d", "rules", spec, "--job", 'a"b\\c\nd')
    check = subprocess.run([promtool, "check", "rules", str(odd)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'job="a\\"b\\\\c\\nd"' in odd.read_text()


def test_rules_refuse_a_bad_spec_with_a_positioned_diagnostic(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MONITORED_SPEC.replace("alert: p99 > 50ms for 5m", "alert: p99 > 4KiB"))
    for command in ("rules", "dashboard"):
        result = probec(command, str(spec), timeout=60)
        assert result.returncode == 1 and result.stdout == ""
        assert "Traceback" not in result.stderr
        assert f"{spec}:12:18: error[E117]" in result.stderr, result.stderr


def unit_tests(rules: Path) -> dict:
    """Our unit tests of the rules of MONITORED_SPEC, as `promtool test rules` reads them: input
    series a minute apart, then the alerts expected at given times and the recorded values."""
    job, inst = 'job="monitored"', 'instance="host:9435"'
    series = [
        # 100 observations a minute: 50 at or under 100ms, 50 in (100ms, 200ms]. p99 interpolates
        # within the second bucket: 0.1 + 0.1 * (99 - 50) / 50 = 0.198; p50 is the first edge.
        (f'lat_seconds_bucket{{{job},{inst},le="0.1"}}', "0+50x15"),
        (f'lat_seconds_bucket{{{job},{inst},le="0.2"}}', "0+100x15"),
        (f'lat_seconds_bucket{{{job},{inst},le="+Inf"}}', "0+100x15"),
        (f'probec_map_entries{{{job},{inst},map="begin"}}', "95x15"),
        (f'probec_map_capacity{{{job},{inst},map="begin"}}', "100x15"),
        (f'probec_map_entries{{{job},{inst},map="lat"}}', "10x15"),
        (f'probec_map_capacity{{{job},{inst},map="lat"}}', "100x15"),
        (f'probec_probe_attached{{{job},{inst},probe="uprobe:pwork:main"}}', "1 1 1 1 1 0x10"),
        (f'probec_series_dropped_total{{{job},{inst},metric="sleeps_total"}}', "0x7 3x8"),
        (f'probec_events_total{{{job},{inst},event="slow"}}', "0+600x15"),
        (f'probec_events_lost_total{{{job},{inst}}}', "0+60x15"),
        (f'probec_events_rate_limited_total{{{job},{inst},event="slow"}}', "0+6x15"),
        (f'up{{{job},{inst}}}', "1x9 0x6"),
        # 100 a minute at or under 10ms for 30 minutes (p99 0.0099), then 100 a minute in
        # (10ms, 200ms] (p99 0.01 + 0.19 * 0.99 = 0.1981): twenty times the day's median.
        (f'lat_by_comm_seconds_bucket{{{job},{inst},comm="a",le="0.01"}}', "0+100x30 3000+0x30"),
        (f'lat_by_comm_seconds_bucket{{{job},{inst},comm="a",le="0.2"}}', "0+100x61"),
        (f'lat_by_comm_seconds_bucket{{{job},{inst},comm="a",le="+Inf"}}', "0+100x61"),
    ]

    # Alerts firing at 12 minutes: their labels and summaries (each description is the rule's own
    # fixed text, read from the rules file).
    descriptions = {r["alert"]: r["annotations"]["description"]
                    for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"] if "alert" in r}
    here = {"job": "monitored", "instance": "host:9435"}
    firing_at_12m = {
        "LatSecondsP99High": [({"job": "monitored", "severity": "warning"}, "lat_seconds: p99 above 0.05 seconds")],
        "ProbecMapNearCapacity": [({**here, "map": "begin", "severity": "warning"},
                                   "host:9435: BPF map begin is 95% full")],
        "ProbecProbeDetached": [({**here, "probe": "uprobe:pwork:main", "severity": "critical"},
                                 "host:9435: probe uprobe:pwork:main is not attached")],
        "ProbecSeriesOverflow": [({**here, "metric": "sleeps_total", "severity": "warning"},
                                  "host:9435: label sets of sleeps_total folded into __overflow__")],
        "ProbecEventsLost": [({**here, "severity": "warning"}, "host:9435: events lost above 1% of events")],
        "LatByCommSecondsP99High": [],          # p99 at its baseline
        "ProbecEventsRateLimited": [],          # 1% held back: under the 50% share
        "ProbecSpanBeginOverflow": [],
        "ProbecCollectorDown": [({**here, "severity": "critical"},
                                 "host:9435: the probec collector is down or not attached")],
    }
    assert set(firing_at_12m) == set(descriptions)
    assert descriptions["LatSecondsP99High"] == "p99 of lat_seconds over the last 5m is {{ $value | humanizeDuration }}."
    alert_tests = [{"eval_time": "12m", "alertname": name, "exp_alerts": [
        {"exp_labels": labels, "exp_annotations": {"summary": summary, "description": descriptions[name]}}
        for labels, summary in alerts]} for name, alerts in firing_at_12m.items()]
    alert_tests[0]["exp_alerts"][0]["exp_annotations"]["description"] = "p99 of lat_seconds over the last 5m is 198ms."
    alert_tests.append({"eval_time": "40m", "alertname": "LatByCommSecondsP99High", "exp_alerts": [
        {"exp_labels": {"job": "monitored", "comm": "a", "severity": "warning"},
         "exp_annotations": {"summary": "lat_by_comm_seconds: p99 above 2x its median over 1d",
                             "description": "p99 of lat_by_comm_seconds over the last 5m is 198.1ms."}}]})
    # Before `for:` has passed, nothing fires: the p99 alert waits 5 minutes, a detached probe 1.
    alert_tests += [{"eval_time": "4m", "alertname": "LatSecondsP99High", "exp_alerts": []},
                    {"eval_time": "5m", "alertname": "ProbecProbeDetached", "exp_alerts": []},
                    {"eval_time": "6m", "alertname": "ProbecSeriesOverflow", "exp_alerts": []},
                    {"eval_time": "9m", "alertname": "ProbecCollectorDown", "exp_alerts": []},
                    {"eval_time": "33m", "alertname": "LatByCommSecondsP99High", "exp_alerts": []}]
    return {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": alert_tests,
            "promql_expr_test": [
                {"expr": "job:lat_seconds:p99_rate5m", "eval_time": "10m",
                 "exp_samples": [{"labels": 'job:lat_seconds:p99_rate5m{job="monitored"}', "value": 0.198}]},
                {"expr": "job:lat_seconds:p50_rate5m", "eval_time": "10m",
                 "exp_samples": [{"labels": 'job:lat_seconds:p50_rate5m{job="monitored"}', "value": 0.1}]},
            ],
        }],
    }


def test_promtool_runs_our_unit_tests_against_the_rules(tmp_path):
    promtool = require_tool("promtool")
    spec = tmp_path / "spec.yaml"
    spec.write_text(MONITORED_SPEC)
    rules = generate(tmp_path, "rules", spec)
    tests = tmp_path / "rules_test.yml"
    tests.write_text(yaml.safe_dump(unit_tests(rules), sort_keys=False))
    run = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_dashboard_query_parses_and_names_what_the_spec_exports(tmp_path):
    """Each target of each panel, for every shipped spec and a spec with every kind of metric, is
    a query Prometheus accepts ($__rate_interval read as Grafana would fill it in), selecting
    only the spec's own samples or the collector's health."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(MONITORED_SPEC)
    server = PrometheusServer(tmp_path / "prometheus")
    try:
        for path in [*SHIPPED, spec]:
            dashboard = generate(tmp_path, "dashboard", path)
            document = json.loads(dashboard.read_text())
            assert document["schemaVersion"] >= 36 and document["panels"][0]["type"] == "row"
            allowed = exported_names(path) | HEALTH
            queries = dashboard_queries(dashboard)
            assert queries, path
            for expr in queries:
                answer = server.query(expr.replace("$__rate_interval", "1m"))
                assert answer["status"] == "success", (path, expr, answer)
                assert metric_names(expr) <= allowed, (path, expr, metric_names(expr) - allowed)
    finally:
        server.stop()
    panels = json.loads(generate(tmp_path, "dashboard", spec).read_text())["panels"]
    kinds = {(p["type"], p["title"]) for p in panels}
    # each histogram: a heatmap and its quantile lines; the parts stacked; the counter as a rate;
    # the health row.
    for name in ("lat_seconds", "lat_by_comm_seconds", "phases_seconds"):
        assert ("heatmap", f"{name}: distribution") in kinds and ("timeseries", f"{name}: p50, p95, p99") in kinds
    stacked = next(p for p in panels if p["title"] == "phases_seconds: mean by part (stacked)")
    assert stacked["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert ("timeseries", "sleeps_total: rate") in kinds and ("row", "Collector health") in kinds
    assert ("timeseries", "sleeps_in_flight: now") in kinds
