"""What Prometheus and Grafana need besides the collector: recording and alerting rules
(`probec rules`) and a dashboard (`probec dashboard`), both read from a checked program.

Like the backends, these read the IR (and the spec's `alert:` lines), never YAML, and write the
same bytes for the same spec: no timestamps, paths or versions inside.
"""
