"""`probec rules SPEC`: Prometheus recording and alerting rules for a spec's collector.

Recording rules follow Prometheus's `level:metric:operations` convention: the labels kept, the
metric, and what was done to it, e.g. `job:sleep_duration_seconds:p99_rate5m`. Alerts: each
`alert: pNN > X for D` of the spec, then the collector's own health (events lost or held back
by a rate limit above a share of the events, maps near capacity, label sets folded into
`__overflow__`, span begins dropped, probes detached, the collector down).
"""

from __future__ import annotations

import yaml

from ..ir.nodes import Metric, Program
from ..kinds import METRIC_KINDS
from ..spec.model import AlertSpec, Spec
from .promql import HEALTH, QUANTILES, by, export_scale, label_names, label_value, number, quantile_expr, selector

RATE_WINDOW = "5m"
BASELINE_WINDOW = "1d"         # `alert: p99 > 3x baseline`: the quantile's median over this
LOST_SHARE = 0.01              # events the kernel could not hand over, as a share of the events
RATE_LIMITED_SHARE = 0.5       # events held back by `at most N/s`, as a share of the events
MAP_FULL_SHARE = 0.9           # entries / max_entries of a BPF map
HEALTH_FOR = "5m"
DOWN_FOR = "1m"
# Prometheus's template functions that show a value in the metric's unit.
HUMANIZE = {"seconds": "humanizeDuration", "bytes": "humanize1024"}


def record_name(metric: Metric, q: float) -> str:
    level = "_".join(("job",) + label_names(metric))
    return f"{level}:{metric.name}:p{number(q * 100).replace('.', '')}_rate{RATE_WINDOW}"


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def quantile_rules(metric: Metric, job: str) -> list[dict]:
    keep = ("job",) + label_names(metric)
    return [{"record": record_name(metric, q), "expr": quantile_expr(q, metric, job, RATE_WINDOW, keep)}
            for q in QUANTILES]


def metric_alert(metric: Metric, alert: AlertSpec, job: str) -> dict:
    """`pNN > X`: the recorded quantile (or, for p90 and p999, its expression) above X in the
    exported unit. `pNN > Mx baseline`: above M times its median over BASELINE_WINDOW."""
    keep = ("job",) + label_names(metric)
    q = alert.quantile
    recorded = q in QUANTILES
    series = record_name(metric, q) if recorded else quantile_expr(q, metric, job, RATE_WINDOW, keep)
    pname = f"p{number(q * 100).replace('.', '')}"
    if alert.multiple:
        window = f"[{BASELINE_WINDOW}]" if recorded else f"[{BASELINE_WINDOW}:{RATE_WINDOW}]"
        inner = series if recorded else f"({series})"
        expr = f"{series} > {number(alert.multiple)} * quantile_over_time(0.5, {inner}{window})"
        summary = f"{metric.name}: {pname} above {number(alert.multiple)}x its median over {BASELINE_WINDOW}"
    else:
        threshold = number(export_scale(metric, alert.threshold))
        expr = f"{series} > {threshold}"
        summary = f"{metric.name}: {pname} above {threshold}" + (f" {metric.unit}" if metric.unit else "")
    rule = {"alert": f"{camel(metric.name)}{pname.upper()}High", "expr": expr}
    if alert.for_seconds:
        rule["for"] = duration(alert.for_seconds)
    shown = "{{ $value | %s }}" % HUMANIZE.get(metric.unit, "humanize")
    rule["labels"] = {"severity": "warning"}
    rule["annotations"] = {
        "summary": summary,
        "description": f"{pname} of {metric.name} over the last {RATE_WINDOW} is {shown}.",
    }
    return rule


def health_alerts(program: Program, job: str) -> list[dict]:
    w = RATE_WINDOW

    def rate(name: str) -> str:
        return f"rate({selector(HEALTH[name], job)}[{w}])"

    def alert(name: str, expr: str, wait: str, summary: str, description: str, severity: str = "warning") -> dict:
        rule = {"alert": name, "expr": expr}
        if wait:
            rule["for"] = wait
        rule.update({"labels": {"severity": severity}, "annotations": {"summary": summary, "description": description}})
        return rule

    out = []
    if program.events:
        out.append(alert(
            "ProbecEventsLost",
            f"sum {by('job', 'instance')} ({rate('events_lost')}) > {number(LOST_SHARE)} * "
            f"sum {by('job', 'instance')} ({rate('events')})", HEALTH_FOR,
            f"{{{{ $labels.instance }}}}: events lost above {number(LOST_SHARE * 100)}% of events",
            "The kernel could not hand events to user space (ring buffer full): raise limits.ringbuf "
            "or sample more sparsely."))
        if any(e.max_per_second for e in program.events):
            out.append(alert(
                "ProbecEventsRateLimited",
                f"sum {by('job', 'instance', 'event')} ({rate('events_rate_limited')}) > "
                f"{number(RATE_LIMITED_SHARE)} * sum {by('job', 'instance', 'event')} ({rate('events')})",
                HEALTH_FOR,
                f"{{{{ $labels.instance }}}}: event {{{{ $labels.event }}}} held back by its rate limit "
                f"above {number(RATE_LIMITED_SHARE * 100)}% of events",
                "The spec's 'at most N/s' keeps less than it sees."))
    out.append(alert(
        "ProbecMapNearCapacity",
        f"{selector(HEALTH['map_entries'], job)} / {selector(HEALTH['map_capacity'], job)} > {number(MAP_FULL_SHARE)}",
        HEALTH_FOR,
        f"{{{{ $labels.instance }}}}: BPF map {{{{ $labels.map }}}} is {{{{ $value | humanizePercentage }}}} full",
        "A full map drops new keys: raise limits.series or limits.concurrency."))
    if any(m.labels for m in program.metrics):
        out.append(alert(
            "ProbecSeriesOverflow",
            f"increase({selector(HEALTH['series_dropped'], job)}[{w}]) > 0", "",
            f"{{{{ $labels.instance }}}}: label sets of {{{{ $labels.metric }}}} folded into __overflow__",
            "The metric has more label sets than limits.series: raise it or use fewer labels."))
    if program.spans:
        out.append(alert(
            "ProbecSpanBeginOverflow",
            f"increase({selector(HEALTH['span_begin_overflow'], job)}[{w}]) > 0", "",
            f"{{{{ $labels.instance }}}}: span {{{{ $labels.span }}}} dropped begins",
            "The begin map was full: raise limits.concurrency."))
    out.append(alert(
        "ProbecProbeDetached", f"{selector(HEALTH['probe_attached'], job)} == 0", DOWN_FOR,
        f"{{{{ $labels.instance }}}}: probe {{{{ $labels.probe }}}} is not attached",
        "Nothing is counted at this probe.", "critical"))
    out.append(alert(
        "ProbecCollectorDown",
        f"{selector('up', job)} == 0 or {selector(HEALTH['up'], job)} == 0", DOWN_FOR,
        f"{{{{ $labels.instance }}}}: the probec collector is down or not attached",
        "Prometheus cannot scrape the collector, or its probes are not being read.", "critical"))
    return out


def rules_document(spec: Spec, program: Program, job: str) -> dict:
    recording, alerting = [], []
    for metric in program.metrics:
        if not METRIC_KINDS[metric.kind].buckets:      # quantiles need buckets
            continue
        recording += quantile_rules(metric, job)
        alert = spec.metrics[metric.name].alert if metric.name in spec.metrics else None
        if alert is not None:
            alerting.append(metric_alert(metric, alert, job))
    alerting += health_alerts(program, job)
    groups = []
    if recording:
        groups.append({"name": f"{program.name}.recording", "rules": recording})
    groups.append({"name": f"{program.name}.alerts", "rules": alerting})
    return {"groups": groups}


def render_rules(spec: Spec, program: Program, job: str) -> str:
    header = (f"# Prometheus rules for the probec spec '{program.name}' ({label_value(program.source)}), scraped as "
              f"job=\"{label_value(job)}\".\n# Generated by `probec rules`: do not edit.\n")
    return header + yaml.safe_dump(rules_document(spec, program, job), sort_keys=False, width=1000,
                                   default_flow_style=False)
