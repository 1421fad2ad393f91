"""The PromQL pieces that rules and dashboards share: selectors, quantile expressions, the names
of the health metrics the runtime exports (runtime/exporter.py), and numbers as PromQL writes them."""

from __future__ import annotations

from ..ir.nodes import Metric

# The runtime's health families that rules and dashboards read (runtime/exporter.py exports them
# on every scrape, whatever the spec).
HEALTH = {
    "up": "probec_up",
    "events": "probec_events_total",
    "events_lost": "probec_events_lost_total",
    "events_rate_limited": "probec_events_rate_limited_total",
    "series_dropped": "probec_series_dropped_total",
    "span_begin_overflow": "probec_span_begin_overflow_total",
    "map_entries": "probec_map_entries",
    "map_capacity": "probec_map_capacity",
    "probe_attached": "probec_probe_attached",
    "last_read": "probec_last_read_seconds",
    "backend_restarts": "probec_backend_restarts_total",
}
QUANTILES = (0.5, 0.95, 0.99)


def number(value: float) -> str:
    """A PromQL number: 0.05, 1e-06, 3."""
    text = repr(float(f"{value:.12g}"))
    return text[:-2] if text.endswith(".0") else text


def label_value(text: str) -> str:
    """A label value as a PromQL string literal's inside: backslashes, quotes and newlines escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def selector(name: str, job: str) -> str:
    return f'{name}{{job="{label_value(job)}"}}'


def counter_name(metric: Metric) -> str:
    """The sample name of a counter as exported: BASE_total."""
    base = metric.name[:-6] if metric.name.endswith("_total") else metric.name
    return f"{base}_total"


def label_names(metric: Metric) -> tuple[str, ...]:
    """The metric's own labels as exported (a `parts:` histogram's `part` among them)."""
    return tuple(label.name for label in metric.labels)


def by(*labels: str) -> str:
    return f"by ({', '.join(labels)})"


def quantile_expr(q: float, metric: Metric, job: str, window: str, keep: tuple[str, ...]) -> str:
    """histogram_quantile over the rate of the buckets, keeping the labels `keep` (and `le`)."""
    return (f"histogram_quantile({number(q)}, sum {by(*keep, 'le')} "
            f"(rate({selector(metric.name + '_bucket', job)}[{window}])))")


def export_scale(metric: Metric, raw: int) -> float:
    """A value in the metric's base units (ns, bytes) as exported (seconds, bytes)."""
    return raw * metric.scale
