"""Build the typed spec from YAML nodes: shapes, names, unknown keys, probe addresses, buckets.

Cross-references (a metric naming a span) and expression types are checked later, in the IR's
lowering; this module only needs the file itself.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import replace
from pathlib import Path

from ..diagnostics import Diagnostics, SourceSpan, did_you_mean, shown
from ..expr.ast import SIZE_UNITS, TIME_UNITS, Expr, Name
from ..expr.parser import parse_expression
from ..kinds import METRIC_SPEC_KEYS, PROBE_KINDS as PROBE_KIND_REGISTRY
from .limits import (EVENT_RECORD_KEYS, HISTOGRAM_LABELS, INT_MAX, LIMITS, MAX_BUCKETS, MAX_EXPRESSION_DEPTH, MAX_NAME_LENGTH,
                     RESERVED_METRIC_PREFIX, RESERVED_SPEC_NAMES, exposed_names, expression_depth, out_of_range)
from .model import (PROBE_KINDS, AlertSpec, Binary, Buckets, EventField, EventSpec, LabelSpec, Limits,
                    MetricSpec, ProbeAddress, SpanEndRef, SpanOpenRef, SpanSide, SpanSpec, Spec, WithinRef)
from .yaml_source import MAX_SPEC_BYTES, YMap, YNode, YScalar, YSeq, load_yaml

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# A metric named the OpenTelemetry way (http.server.request.duration): lower-case words and dots.
OTEL_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+\Z")
# Characters allowed in binary paths and symbols: enough for real files and mangled C++ names,
# nothing that can break out of a bpftrace probe address or a C string.
SAFE_PATH = re.compile(r"[A-Za-z0-9_./+@-]+\Z")
# Binary paths may name environment variables, expanded when the spec is built: ${TORCH_LIB}.
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SAFE_SYMBOL = re.compile(r"[A-Za-z0-9_.$:~<>, *&()\[\]+-]+\Z")

TOP_KEYS = ("version", "name", "description", "binaries", "limits", "spans", "metrics", "events")
SPAN_KEYS = ("begin", "end", "function", "syscall", "kernel", "key", "filter", "within",
             "restart", "fallback", "description")
WITHIN_KEYS = ("span", "key", "end_key")
SIDE_KEYS = ("probe", "key")
METRIC_KEYS = ("help", *METRIC_SPEC_KEYS, "on", "filter", "labels", "buckets", "within", "unit", "alert")
# `alert: p99 > 50ms for 5m`: a quantile (p50, p90, p95, p99, p999), a threshold with the
# histogram's unit or a multiple of its baseline (`3x baseline`), and optionally how long it must
# hold (Prometheus durations: s, m, h, d).
ALERT = re.compile(r"\s*p([0-9]{2,3})\s*>\s*(?:([0-9]{1,6}(?:\.[0-9]{1,6})?)x\s+baseline|(\S+))"
                   r"(?:\s+for\s+([0-9]+)(s|m|min|h|d))?\s*")
ALERT_QUANTILES = ("50", "90", "95", "99", "999")
ALERT_FOR_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
EVENT_KEYS = ("on", "when", "sample", "fields")
LIMIT_KEYS = ("concurrency", "series", "ringbuf")
BINARY_KEYS = ("path", "optional")
STACK_FIELDS = {"ustack": "user", "kstack": "kernel"}
# Every number in a spec ends up in a 64-bit unsigned field in the kernel or the manifest.
# Digits read as a number at all; what fits is then held to limits.LIMITS (E130, E212), which
# tells the value it refuses. Past this many digits there is no value worth telling.
MAX_DIGITS = 40
# Spans, metrics or events in one spec: real specs have tens; some checks compare every span with
# every probe, so thousands would take seconds.
MAX_SECTION_ENTRIES = 256


class SpecLoader:
    def __init__(self, file: str, diags: Diagnostics):
        self.file = file
        self.d = diags

    # -- small shape helpers -------------------------------------------------------------------
    def expect_map(self, node: YNode | None, what: str) -> YMap | None:
        if node is None:
            return None
        if not isinstance(node, YMap):
            self.d.error("E104", f"{what} must be a mapping", node.span)
            return None
        return node

    def expect_scalar(self, node: YNode | None, what: str) -> YScalar | None:
        if node is None:
            return None
        if not isinstance(node, YScalar):
            self.d.error("E104", f"{what} must be a single value, not a "
                         f"{'list' if isinstance(node, YSeq) else 'mapping'}", node.span)
            return None
        return node

    def check_keys(self, node: YMap, allowed: tuple[str, ...], what: str) -> None:
        for key, _ in node.entries:
            if key.value not in allowed:
                self.d.error("E105", f"unknown key '{key.value}' in {what}", key.span,
                             did_you_mean(key.value, allowed) or f"allowed here: {', '.join(allowed)}")

    def integer(self, node: YNode | None, what: str, minimum: int = 0) -> int | None:
        s = self.expect_scalar(node, what)
        if s is None:
            return None
        m = re.fullmatch(r"([0-9][0-9_]*)\s*([A-Za-z]*)", s.value.strip())
        unit = m.group(2) if m else ""
        if not m or (unit and unit not in SIZE_UNITS):
            self.d.error("E106", f"{what} must be a whole number, got '{shown(s.value)}'", s.span)
            return None
        value = self.whole_number(m.group(1), what, s.span)
        if value is None:
            return None
        value *= SIZE_UNITS[unit] if unit else 1
        if value < minimum:
            self.d.error("E106", f"{what} must be at least {minimum}, got {value}", s.span)
            return None
        if what in LIMITS and out_of_range(what, value):
            return self.out_of_range(what, value, s.span)
        return value

    def whole_number(self, digits: str, what: str, span: SourceSpan, code: str = "E130") -> int | None:
        """The value of decimal digits (with '_' separators), or None when there are too many."""
        digits = digits.replace("_", "")
        if len(digits) > MAX_DIGITS:
            self.d.error(code, f"{what} is too large: {len(digits)} digits, and the largest number both "
                         f"backends represent is {INT_MAX:,}", span)
            return None
        return int(digits)

    def out_of_range(self, what: str, value: int, span: SourceSpan) -> None:
        """Report a number outside what both backends represent (limits.LIMITS)."""
        self.d.error("E130", out_of_range(what, value), span, LIMITS[what].why)
        return None

    def expression(self, node: YNode | None, what: str) -> Expr | None:
        s = self.expect_scalar(node, what)
        if s is None:
            return None
        if s.value.strip() == "":
            self.d.error("E201", f"{what} is empty", s.span)
            return None
        if "\n" in s.value:
            self.d.error("E201", f"{what} must fit on one line", s.span)
            return None
        expr = parse_expression(s.value, s.text_span(0, 1), self.d)
        if expr is not None and expression_depth(expr) > MAX_EXPRESSION_DEPTH:
            self.d.error("E134", f"{what} nests {expression_depth(expr)} levels deep; at most "
                         f"{MAX_EXPRESSION_DEPTH} are allowed", s.span,
                         "clang refuses deeper nesting in the generated C; split or simplify the expression")
            return None
        return expr

    def ident(self, key: YScalar, what: str) -> bool:
        if not IDENT.match(key.value):
            self.d.error("E107", f"{what} '{key.value}' is not a valid name", key.span,
                         "names are letters, digits and '_', not starting with a digit")
            return False
        return self.name_rules(key, what)

    def name_rules(self, key: YScalar, what: str) -> bool:
        """Names become C identifiers, bpftrace maps, files and Prometheus names: bounded in
        length, and `__` is probec's own prefix (its padding fields, its bpftrace maps)."""
        if len(key.value) > MAX_NAME_LENGTH:
            self.d.error("E131", f"{what} '{key.value[:20]}...' has {len(key.value)} characters; at most "
                         f"{MAX_NAME_LENGTH} are allowed", key.span, "shorten it")
            return False
        if key.value.startswith("__"):
            self.d.error("E131", f"{what} '{key.value}' starts with '__', which probec keeps for names it "
                         "generates", key.span,
                         "drop the leading underscores (Prometheus keeps '__' labels for itself too)")
            return False
        return True

    # -- probe addresses -----------------------------------------------------------------------
    def probe_address(self, node: YNode | None, what: str, allow_span_end: bool = False):
        s = self.expect_scalar(node, what)
        if s is None:
            return None
        text = s.value.strip()
        span = s.text_span(0, len(text))
        if allow_span_end and ":" not in text:
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\.end", text)
            if m:
                return SpanEndRef(m.group(1), span)
            self.d.error("E110", f"'{shown(text)}' is neither a probe address nor SPAN.end", span,
                         "write e.g. 'tracepoint:tcp:tcp_retransmit_skb' or 'inference.end'")
            return None
        kind, sep, rest = text.partition(":")
        if kind == "tp":
            kind = "tracepoint"
        if not sep or kind not in PROBE_KINDS:
            self.d.error("E110", f"unknown probe kind '{kind}' in '{shown(text)}'", span,
                         did_you_mean(kind, PROBE_KINDS) or "probe kinds: " + ", ".join(PROBE_KINDS))
            return None
        parts = rest.split(":")
        grammar = PROBE_KIND_REGISTRY[kind].address

        def bad(message: str, hint: str = "") -> None:
            self.d.error("E111", message, span, hint)

        if kind == "tracepoint":
            if len(parts) != 2 or not all(IDENT.match(p) for p in parts):
                return bad(f"'{shown(text)}' should be {grammar}", "e.g. tracepoint:sched:sched_switch")
            return ProbeAddress(kind, text, span, target=parts[0], name=parts[1])
        if kind in ("syscall", "syscallret", "kprobe", "kretprobe", "fentry", "fexit", "kernel", "kernelret"):
            if len(parts) != 1 or not IDENT.match(parts[0]):
                return bad(f"'{shown(text)}' should be {grammar}",
                           f"e.g. {kind}:" + ("sendmsg" if "sys" in kind else "tcp_sendmsg"))
            return ProbeAddress(kind, text, span, name=parts[0])
        if kind in ("uprobe", "uretprobe"):
            binary, _, symbol = rest.partition(":")
            if not binary or not symbol:
                return bad(f"'{shown(text)}' should be {grammar}",
                           "BINARY is a path or a name from 'binaries'")
            offset = None
            m = re.fullmatch(r"(.*?)\+(0x[0-9a-fA-F]+|[0-9]+)", symbol)
            if m:
                symbol, digits = m.group(1), m.group(2)
                offset = int(digits, 16) if digits.startswith("0x") else int(digits) if len(digits) <= 10 else -1
                if not 0 <= offset < 1 << 32:
                    return bad(f"offset +{digits if len(digits) <= 24 else digits[:20] + '...'} is too large "
                               "for an offset into a function", "offsets are bytes past the symbol's start")
            if not SAFE_PATH.match(binary):
                return bad(f"binary '{binary}' has characters probec does not accept in a path",
                           "use letters, digits and ._/+@-")
            if not SAFE_SYMBOL.match(symbol):
                return bad(f"symbol '{symbol}' has characters that cannot be in a symbol name")
            return ProbeAddress(kind, text, span, target=binary, name=symbol, offset=offset)
        if kind == "usdt":
            if len(parts) != 3 or not all(parts) or not SAFE_PATH.match(parts[0]) \
                    or not IDENT.match(parts[1]) or not IDENT.match(parts[2]):
                return bad(f"'{shown(text)}' should be {grammar}")
            return ProbeAddress(kind, text, span, target=parts[0], provider=parts[1], name=parts[2])
        if kind == "profile":
            if len(parts) != 2 or parts[0] != "hz" or not re.fullmatch(r"[0-9]{1,5}", parts[1]) \
                    or not 1 <= int(parts[1]) <= 10_000:
                return bad(f"'{shown(text)}' should be {grammar} with 1 <= N <= 10000", "e.g. profile:hz:99")
            return ProbeAddress(kind, text, span, rate=int(parts[1]))
        if kind == "interval":
            scale = {"s": 1_000_000_000, "ms": 1_000_000}
            if len(parts) != 2 or parts[0] not in scale or not parts[1].isdigit() or int(parts[1]) == 0:
                return bad(f"'{shown(text)}' should be {grammar}", "e.g. interval:s:1")
            period = int(parts[1]) * scale[parts[0]] if len(parts[1]) <= 20 else LIMITS["interval"].high + 1
            if out_of_range("interval", period):
                self.d.error("E130", f"'{shown(text)}': an interval is at most a day", span, LIMITS["interval"].why)
                return None
            return ProbeAddress(kind, text, span, rate=period)
        raise AssertionError(kind)  # pragma: no cover

    # -- sections ------------------------------------------------------------------------------
    def load(self, root: YNode) -> Spec | None:
        top = self.expect_map(root, "the spec")
        if top is None:
            return None
        self.check_keys(top, TOP_KEYS, "the spec")
        version = top.get("version")
        if version is not None:
            v = self.expect_scalar(version, "version")
            if v is not None and v.value != "1":
                self.d.error("E106", f"unsupported spec version '{v.value}'", v.span, "this probec reads version 1")
        name_node = self.expect_scalar(top.get("name"), "name")
        name = "spec"
        if name_node is None:
            self.d.error("E108", "the spec needs a 'name'", top.span, "add e.g. 'name: inference_latency'")
        elif self.ident(name_node, "spec name"):
            name = name_node.value
            if name in RESERVED_SPEC_NAMES:
                self.d.error("E131", f"spec name '{name}' is the name of a file probec writes or reads when it "
                             "builds", name_node.span, "choose another name")
        desc = self.expect_scalar(top.get("description"), "description")
        binaries = self.binaries(top.get("binaries"))
        limits = self.limits(top.get("limits"))
        spans = self.named_section(top.get("spans"), "spans", self.span_spec)
        metrics = self.named_section(top.get("metrics"), "metrics", self.metric_spec)
        events = self.named_section(top.get("events"), "events", self.event_spec)
        if top.get("metrics") is None and top.get("events") is None:
            self.d.error("E109", "the spec defines no metrics and no events: nothing would be exported",
                         top.span, "add a 'metrics:' section")
        self.prometheus_names(metrics)
        return Spec(self.file, name, desc.value if desc else "", binaries, limits, spans, metrics, events, top.span)

    def prometheus_names(self, metrics: dict[str, MetricSpec]) -> None:
        """Refuse what makes Prometheus drop the whole scrape: two metrics whose exported names
        meet (a counter `calls` beside `calls_total`, a histogram X beside X_sum), and histogram
        labels its own series carry (`le`, and `quantile` of its NAME_window summary). Labels
        starting with `__` are refused with every other such name (name_rules)."""
        owner: dict[str, str] = {}
        for m in metrics.values():
            names = exposed_names(m.name, m.kind)
            if not names[0]:
                self.d.error("E107", f"metric '{m.name}' has no name before '_total'", m.span,
                             "e.g. 'writes_total'")
                continue
            clash = next((owner[n] for n in names if n in owner), None)
            if clash is not None:
                other = metrics[clash]
                self.d.error("E132", f"metric '{m.name}' and metric '{clash}' would both export "
                             f"'{next(n for n in names if owner.get(n) == clash)}'", m.span,
                             f"a {other.kind} '{clash}' exports {', '.join(exposed_names(clash, other.kind))}; "
                             "rename one of them")
                continue
            owner.update((n, m.name) for n in names)
            for lab in m.labels:
                if m.kind == "histogram" and lab.name in HISTOGRAM_LABELS:
                    self.d.error("E133", f"metric '{m.name}': label '{lab.name}' is one the histogram's own "
                                 "series carry", lab.span, "name this label otherwise")

    def named_section(self, node, what, build):
        section = self.expect_map(node, what)
        out = {}
        if section is None:
            return out
        if len(section.entries) > MAX_SECTION_ENTRIES:
            self.d.error("E116", f"{len(section.entries)} {what} in one spec; at most {MAX_SECTION_ENTRIES}",
                         section.span, "split the spec: each is built and run on its own")
            return out
        for key, value in section.entries:
            dotted = what == "metrics" and OTEL_METRIC_NAME.match(key.value)
            if not dotted and not (METRIC_NAME if what == "metrics" else IDENT).match(key.value):
                self.d.error("E107", f"'{key.value}' is not a valid name for {what}", key.span,
                             "names are letters, digits and '_', not starting with a digit"
                             + (" (or OpenTelemetry's lower-case words joined by dots: "
                                "'http.server.request.duration')" if what == "metrics" else ""))
                continue
            if not self.name_rules(key, f"{what[:-1]} name"):
                continue
            if what == "metrics" and key.value.replace(".", "_").startswith(RESERVED_METRIC_PREFIX):
                self.d.error("E131", f"metric '{key.value}': names starting with '{RESERVED_METRIC_PREFIX}' "
                             "are probec's health metrics", key.span, "choose another prefix")
                continue
            item = build(key, value)
            if item is not None and dotted:
                item = self.prometheus_name(item)
            if item is not None and item.name in out:        # a dotted name and the one derived from it
                first = out[item.name]
                self.d.error("E132", f"metric '{item.otel_name or item.name}' and metric '{first.otel_name or first.name}' "
                             f"would both export '{item.name}'", key.span, "rename one of them")
            elif item is not None:
                out[item.name] = item
        return out

    def prometheus_name(self, m: MetricSpec) -> MetricSpec | None:
        """A metric named the OpenTelemetry way keeps that name over OTLP and gets the name
        Prometheus derives from it for /metrics, the kernel maps and everything else: dots to
        underscores, the unit as a suffix, `_total` for counters (`http.server.request.duration`
        in seconds: `http_server_request_duration_seconds`). The unit comes from `unit:` or the
        buckets; a `sum:` counter says it with `unit:`."""
        unit = m.unit or {"time": "seconds", "size": "bytes"}.get(m.buckets.dimension if m.buckets else "", "")
        if not unit and m.kind == "counter" and m.value is not None:
            self.d.error("E107", f"metric '{m.name}' is named the OpenTelemetry way and sums a value: say its unit, "
                         "from which its Prometheus name is derived", m.span,
                         "add 'unit: seconds', 'unit: bytes' or 'unit: none'")
            return None
        name = m.name.replace(".", "_")
        if unit in ("seconds", "bytes") and not name.endswith("_" + unit):
            name += "_" + unit
        if m.kind == "counter":
            name += "_total"
        return replace(m, name=name, otel_name=m.name)

    def binaries(self, node) -> dict[str, Binary]:
        section = self.expect_map(node, "binaries")
        out: dict[str, Binary] = {}
        if section is None:
            return out
        for key, value in section.entries:
            if not self.ident(key, "binary name"):
                continue
            optional = False
            if isinstance(value, YMap):
                self.check_keys(value, BINARY_KEYS, f"binary '{key.value}'")
                opt = self.expect_scalar(value.get("optional"), "optional")
                optional = opt is not None and opt.value.lower() in ("true", "yes", "1")
                value = value.get("path")
                if value is None:
                    self.d.error("E108", f"binary '{key.value}' needs a 'path'", key.span)
                    continue
            s = self.expect_scalar(value, f"binary '{key.value}'")
            if s is None:
                continue
            if not SAFE_PATH.match(ENV_REFERENCE.sub("x", s.value)):
                self.d.error("E111", f"path '{shown(s.value)}' has characters probec does not accept in a path",
                             s.span, "use letters, digits and ._/+@-, and ${VARIABLE} for the environment")
                continue
            out[key.value] = Binary(key.value, s.value, s.span, optional)
        return out

    def limits(self, node) -> Limits:
        section = self.expect_map(node, "limits")
        if section is None:
            return Limits()
        self.check_keys(section, LIMIT_KEYS, "limits")
        conc = self.integer(section.get("concurrency"), "limits.concurrency", 1)
        series = self.integer(section.get("series"), "limits.series", 1)
        ring = self.integer(section.get("ringbuf"), "limits.ringbuf", 4096)
        if ring is not None and ring & (ring - 1):
            self.d.error("E106", f"limits.ringbuf must be a power of two bytes, got {ring}",
                         section.get("ringbuf").span, "e.g. 1MiB, 4MiB, 16MiB")
            ring = None
        default = Limits()
        return Limits(conc or default.concurrency, series or default.series,
                      ring or default.ringbuf_bytes, section.span)

    def span_side(self, node, what) -> SpanSide | None:
        if isinstance(node, YMap):
            self.check_keys(node, SIDE_KEYS, what)
            if node.get("probe") is None:
                self.d.error("E108", f"{what} needs a 'probe'", node.span)
                return None
            probe = self.probe_address(node.get("probe"), f"{what}.probe")
            key = self.expression(node.get("key"), f"{what}.key") if node.get("key") is not None else None
            return SpanSide(probe, key) if probe else None
        probe = self.probe_address(node, what)
        return SpanSide(probe, None) if probe else None

    def span_pair(self, node: YMap, what: str) -> tuple[SpanSide, SpanSide] | None:
        """begin/end, or one of the shorthands function/syscall/kernel."""
        shorthands = [k for k in ("function", "syscall", "kernel") if node.get(k) is not None]
        explicit = node.get("begin") is not None or node.get("end") is not None
        if len(shorthands) + explicit != 1:
            self.d.error("E112", f"{what} needs either begin/end or one of function/syscall/kernel",
                         node.span, "e.g. 'syscall: read', or 'begin: ...' with 'end: ...'")
            return None
        if explicit:
            if node.get("begin") is None or node.get("end") is None:
                self.d.error("E112", f"{what} needs both 'begin' and 'end'", node.span)
                return None
            begin = self.span_side(node.get("begin"), f"{what}.begin")
            end = self.span_side(node.get("end"), f"{what}.end")
            return (begin, end) if begin and end else None
        short = shorthands[0]
        s = self.expect_scalar(node.get(short), f"{what}.{short}")
        if s is None:
            return None
        begin_kind, end_kind = {"function": ("uprobe", "uretprobe"), "syscall": ("syscall", "syscallret"),
                                "kernel": ("kernel", "kernelret")}[short]
        sides = []
        for kind in (begin_kind, end_kind):
            probe = self.probe_address(YScalar(f"{kind}:{s.value}", s.span, s.quoted, s.style_offset),
                                       f"{what}.{short}")
            if probe is None:
                return None
            sides.append(SpanSide(replace(probe, span=s.text_span(0, len(s.value.strip()))), None))
        return sides[0], sides[1]

    def span_spec(self, key: YScalar, node: YNode) -> SpanSpec | None:
        m = self.expect_map(node, f"span '{key.value}'")
        if m is None:
            return None
        what = f"span '{key.value}'"
        self.check_keys(m, SPAN_KEYS, what)
        pair = self.span_pair(m, what)
        if pair is None:
            return None
        begin, end = pair
        if m.get("key") is not None:
            shared_key = self.expression(m.get("key"), f"{what}.key")
            begin = SpanSide(begin.probe, begin.key or shared_key)
            end = SpanSide(end.probe, end.key or shared_key)
        fallback = None
        fb = m.get("fallback")
        if fb is not None:
            if isinstance(fb, YMap):
                self.check_keys(fb, ("begin", "end", "syscall", "function"), f"{what}.fallback")
                fallback = self.span_pair(fb, f"{what}.fallback")
            else:
                s = self.expect_scalar(fb, f"{what}.fallback")
                if s is not None:
                    probe = self.probe_address(s, f"{what}.fallback")
                    if probe is not None and probe.kind == "syscall":
                        ret = ProbeAddress("syscallret", probe.text.replace("syscall:", "syscallret:", 1),
                                           probe.span, name=probe.name)
                        fallback = (SpanSide(probe, begin.key), SpanSide(ret, end.key))
                    elif probe is not None:
                        self.d.error("E112", f"{what}.fallback as one address must be syscall:NAME", s.span,
                                     "for other pairs write 'fallback: {begin: ..., end: ...}'")
        filt = self.expression(m.get("filter"), f"{what}.filter") if m.get("filter") is not None else None
        within = self.within_ref(m.get("within"), f"{what}.within")
        desc = self.expect_scalar(m.get("description"), "description")
        restart = self.boolean(m.get("restart"), f"{what}.restart", True)
        return SpanSpec(key.value, key.span, begin, end, filt, within, fallback, desc.value if desc else "",
                        restart)

    def boolean(self, node, what: str, default: bool) -> bool:
        s = self.expect_scalar(node, what)
        if s is None:
            return default
        word = s.value.strip().lower()
        if word not in ("true", "false", "yes", "no"):
            self.d.error("E104", f"{what} must be true or false, not '{shown(s.value)}'", s.span)
            return default
        return word in ("true", "yes")

    def within_ref(self, node, what) -> WithinRef | None:
        """`within: SPAN`, or `within: {span: SPAN, key: EXPR}` for a span with a key of its own."""
        key = end_key = None
        if isinstance(node, YMap):
            self.check_keys(node, WITHIN_KEYS, what)
            if node.get("span") is None:
                self.d.error("E108", f"{what} needs a 'span'", node.span, "e.g. 'within: {span: request, key: args.sk}'")
                return None
            for name in ("key", "end_key"):
                if node.get(name) is not None:
                    expr = self.expression(node.get(name), f"{what}.{name}")
                    if expr is None:
                        return None
                    key, end_key = (expr, end_key) if name == "key" else (key, expr)
            if end_key is not None and key is None:
                self.d.error("E108", f"{what}: 'end_key' goes with 'key'", node.get("end_key").span)
                return None
            node = node.get("span")
        s = self.expect_scalar(node, what)
        if s is None:
            return None
        if not IDENT.match(s.value):
            self.d.error("E107", f"{what} must name a span", s.span)
            return None
        return WithinRef(s.value, s.span, key, end_key)

    def parts(self, node, what: str) -> tuple[tuple[str, Expr, SourceSpan], ...] | None:
        """`parts: {inference: inference.total, send: send.total}`: one histogram family whose
        observations are labelled `part`."""
        m = self.expect_map(node, what)
        if m is None:
            return None
        out = []
        for key, value in m.entries:
            if not IDENT.match(key.value):
                self.d.error("E107", f"{what}: a part is named with letters, digits and '_', not '{key.value}'",
                             key.span)
                continue
            expr = self.expression(value, f"{what}.{key.value}")
            if expr is not None:
                out.append((key.value, expr, key.span))
        if not m.entries:
            self.d.error("E113", f"{what} needs at least one part", m.span, "e.g. 'parts: {inference: inference.total}'")
            return None
        if len(out) > 32:
            self.d.error("E113", f"{what}: at most 32 parts", m.span)
            return None
        return tuple(out) if len(out) == len(m.entries) else None

    def buckets(self, node: YNode) -> Buckets | None:
        buckets = self.bucket_edges(node)
        if buckets is not None and len(buckets.edges) > MAX_BUCKETS:
            self.d.error("E120", f"{len(buckets.edges)} bucket edges; at most {MAX_BUCKETS} are allowed", buckets.span)
            return None
        if buckets is not None and buckets.edges[-1] > LIMITS["bucket edge"].high:
            self.d.error("E130", f"buckets: the edge {buckets.edges[-1]:,} is past the largest one both backends "
                         f"compare with, {LIMITS['bucket edge'].high:,}", buckets.span, LIMITS["bucket edge"].why)
            return None
        return buckets

    def bucket_edges(self, node: YNode) -> Buckets | None:
        if isinstance(node, YSeq):
            edges, dims = [], set()
            for item in node.items:
                s = self.expect_scalar(item, "a bucket edge")
                if s is None:
                    return None
                q = self.quantity(s, s.value.strip(), s.text_span(0, len(s.value)))
                if q is None:
                    return None
                edges.append(q[0])
                dims.add(q[1])
            if len(dims) > 1:
                self.d.error("E120", "bucket edges mix units", node.span, "write all edges as times or all as sizes")
                return None
            if not edges:
                self.d.error("E120", "an explicit bucket list needs at least one edge", node.span)
                return None
            if len(edges) > 64:
                self.d.error("E120", f"{len(edges)} bucket edges; at most 64 are allowed", node.span)
                return None
            if any(b <= a for a, b in zip(edges, edges[1:])):
                self.d.error("E120", "bucket edges must be strictly ascending", node.span)
                return None
            return Buckets("explicit", tuple(edges), dims.pop(), node.span)
        s = self.expect_scalar(node, "buckets")
        if s is None:
            return None
        text = s.value.strip()
        m = re.fullmatch(r"(exp2|linear)\s*\((.*)\)", text)
        if not m:
            self.d.error("E120", f"buckets '{shown(text)}' not understood", s.span,
                         "write exp2(1us, 16s), linear(0, 5ms, 20) or a list like [1ms, 5ms, 10ms]")
            return None
        args = [a.strip() for a in m.group(2).split(",")]
        offset = text.index("(") + 1
        parsed = []
        for a in args:
            where = s.text_span(offset + (text[offset:].find(a) if a else 0), len(a))
            q = self.quantity(s, a, where)
            if q is None:
                return None
            parsed.append(q)
        if m.group(1) == "exp2":
            if len(parsed) != 2:
                self.d.error("E120", "exp2 takes two arguments: the first and the last edge", s.span,
                             "e.g. exp2(1us, 16s)")
                return None
            (lo, dim_lo), (hi, dim_hi) = parsed
            if dim_lo != dim_hi or lo <= 0 or hi <= lo:
                self.d.error("E120", "exp2(first, last) needs 0 < first < last in one unit", s.span)
                return None
            edges = [lo]
            while edges[-1] < hi:
                edges.append(edges[-1] * 2)
            if len(edges) > 64:
                self.d.error("E120", f"exp2 gives {len(edges)} buckets; at most 64 are allowed", s.span)
                return None
            return Buckets("exp2", tuple(edges), dim_lo, s.span)
        if len(parsed) != 3:
            self.d.error("E120", "linear takes three arguments: start, step and count", s.span,
                         "e.g. linear(0, 5ms, 20)")
            return None
        (start, d1), (step, d2), (count, d3) = parsed
        dims = {d for d in (d1, d2) if d != "none"}
        if len(dims) > 1 or d3 != "none" or step <= 0 or not 1 <= count <= 64:
            self.d.error("E120", "linear(start, step, count) needs one unit, step > 0 and 1 <= count <= 64", s.span)
            return None
        # Prometheus's linear_buckets: count edges start, start+step, ...
        edges = [start + i * step for i in range(count)]
        return Buckets("linear", tuple(edges), dims.pop() if dims else "none", s.span)

    def quantity(self, scalar: YScalar, text: str, span: SourceSpan) -> tuple[int, str] | None:
        m = re.fullmatch(r"([0-9][0-9_]*)(?:\.([0-9]+))?\s*([A-Za-z]*)", text)
        if not m or (m.group(3) and m.group(3) not in TIME_UNITS and m.group(3) not in SIZE_UNITS):
            self.d.error("E121", f"'{shown(text)}' is not a number with an optional unit", span,
                         "units: ns us ms s min h, B KB MB GB KiB MiB GiB")
            return None
        whole, frac, unit = m.group(1).replace("_", ""), m.group(2) or "", m.group(3)
        scale = TIME_UNITS.get(unit) or SIZE_UNITS.get(unit) or 1
        if frac and not unit:
            self.d.error("E121", f"'{shown(text)}': plain numbers must be whole", span)
            return None
        frac = frac[:MAX_DIGITS]   # digits past these are below a nanosecond or a byte
        if len(whole) > MAX_DIGITS:
            self.d.error("E121", f"'{shown(text)}' is too large: the largest number both backends represent "
                         f"is {INT_MAX:,}", span)
            return None
        value = int(whole) * scale + ((int(frac) * scale) // 10 ** len(frac) if frac else 0)
        dim = "time" if unit in TIME_UNITS else "size" if unit in SIZE_UNITS else "none"
        return value, dim

    def named_expressions(self, item: YMap, kind: str) -> list[tuple[YScalar, Expr]]:
        """`- NAME: EXPRESSION` entries of a list (labels, event fields): each valid name with its
        parsed expression; the others reported."""
        out = []
        for k, v in item.entries:
            expr = self.expression(v, f"{kind} '{k.value}'")
            if expr is not None and self.ident(k, f"{kind} name"):
                out.append((k, expr))
        return out

    def labels(self, node, what) -> tuple[LabelSpec, ...]:
        if node is None:
            return ()
        if not isinstance(node, YSeq):
            self.d.error("E104", f"{what} must be a list", node.span, "e.g. labels: [comm, pid]")
            return ()
        out: list[LabelSpec] = []
        for item in node.items:
            if isinstance(item, YMap):
                out += [LabelSpec(k.value, expr, k.span) for k, expr in self.named_expressions(item, "label")]
                continue
            expr = self.expression(item, "a label")
            if expr is None:
                continue
            if not isinstance(expr, Name):
                self.d.error("E122", "a label that is not a plain name needs a name of its own", item.span,
                             "write it as '- NAME: EXPRESSION'")
                continue
            out.append(LabelSpec(expr.parts[-1], expr, item.span))
        seen = set()
        for label in out:
            if label.name in seen:
                self.d.error("E122", f"label '{label.name}' appears twice", label.span)
            seen.add(label.name)
        return tuple(out)

    def metric_spec(self, key: YScalar, node: YNode) -> MetricSpec | None:
        what = f"metric '{key.value}'"
        m = self.expect_map(node, what)
        if m is None:
            return None
        self.check_keys(m, METRIC_KEYS, what)
        kinds = [k for k in METRIC_SPEC_KEYS if m.get(k) is not None]
        if len(kinds) != 1:
            keys = list(METRIC_SPEC_KEYS)
            self.d.error("E113", f"{what} needs exactly one of {', '.join(keys[:-1])} or {keys[-1]}", key.span,
                         "e.g. 'histogram: inference.duration' or 'count: tracepoint:tcp:tcp_retransmit_skb'")
            return None
        kind, metric_kind = kinds[0], METRIC_SPEC_KEYS[kinds[0]]
        if metric_kind.open_spans:
            return self.gauge_spec(key, m, what)
        parts: tuple = ()
        on_node = m.get("on")
        on = self.probe_address(on_node, f"{what}.on", allow_span_end=True) if on_node is not None else None
        value: Expr | None = None
        if kind == "count":
            if on_node is not None:
                self.d.error("E113", f"{what}: 'count' already says where; drop 'on'", on_node.span)
            on = self.probe_address(m.get("count"), f"{what}.count", allow_span_end=True)
        elif kind == "parts":
            parts = self.parts(m.get("parts"), f"{what}.parts")
            if parts is None:
                return None
            if on_node is None:
                self.d.error("E113", f"{what}: say where the parts are measured with 'on'", key.span,
                             "e.g. 'on: request.end'")
                return None
        else:
            s = self.expect_scalar(m.get(kind), f"{what}.{kind}")
            if s is None:
                return None
            ref = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\.duration\s*", s.value)
            if ref and on_node is None:
                on = SpanEndRef(ref.group(1), s.text_span(0, len(s.value.strip())))
                value = Name(("duration",), s.text_span(len(ref.group(1)) + 1, len("duration")))
            else:
                value = self.expression(s, f"{what}.{kind}")
                if on_node is None:
                    self.d.error("E113", f"{what}: say where the value comes from with 'on'", key.span,
                                 "e.g. 'on: syscall:write' or 'on: inference.end'")
                    return None
        if on is None:
            return None
        buckets = None
        if metric_kind.buckets:
            if m.get("buckets") is None:
                self.d.error("E120", f"{what} needs 'buckets'", key.span, "e.g. 'buckets: exp2(1us, 16s)'")
                return None
            buckets = self.buckets(m.get("buckets"))
            if buckets is None:
                return None
        elif m.get("buckets") is not None:
            self.d.error("E120", f"{what}: only histograms have buckets", m.get("buckets").span)
        filt = self.expression(m.get("filter"), f"{what}.filter") if m.get("filter") is not None else None
        help_node = self.expect_scalar(m.get("help"), "help")
        unit_node = self.expect_scalar(m.get("unit"), "unit")
        unit = unit_node.value if unit_node else ""
        if unit and unit not in ("seconds", "bytes", "none"):
            self.d.error("E114", f"unknown unit '{unit}'", unit_node.span, "units: seconds, bytes, none")
        labels = self.labels(m.get("labels"), f"{what}.labels")
        if parts and any(lab.name == "part" for lab in labels):
            self.d.error("E122", f"{what}: label 'part' is the name of the part already", next(
                lab.span for lab in labels if lab.name == "part"), "name this label otherwise")
        alert = None
        if m.get("alert") is not None:
            if not metric_kind.buckets:
                self.d.error("E117", f"{what}: only histograms have alerts", m.get("alert").span,
                             "alerts watch a quantile, e.g. 'alert: p99 > 50ms for 5m' on a histogram")
            else:
                alert = self.alert(m.get("alert"), what, buckets)
        return MetricSpec(key.value, key.span, metric_kind.name,
                          help_node.value if help_node else "", on, value, filt, labels, buckets,
                          self.within_ref(m.get("within"), f"{what}.within"), unit, parts, alert)

    def gauge_spec(self, key: YScalar, m: YMap, what: str) -> MetricSpec | None:
        """`gauge: SPAN.open`: how many of the span are open now. It changes where the span opens
        and closes, so nothing else says where or what it counts."""
        for k, node in m.entries:
            if k.value not in ("gauge", "help"):
                self.d.error("E113", f"{what}: a gauge counts the spans open now; '{k.value}' does not apply "
                             "to it", k.span, "a gauge follows its span: give the span the filter or key")
        s = self.expect_scalar(m.get("gauge"), f"{what}.gauge")
        if s is None:
            return None
        ref = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\.open\s*", s.value)
        if not ref:
            self.d.error("E113", f"{what}: 'gauge: {shown(s.value)}' should be 'gauge: SPAN.open'", s.span,
                         "e.g. 'gauge: request.open': the requests in flight")
            return None
        help_node = self.expect_scalar(m.get("help"), "help")
        return MetricSpec(key.value, key.span, "gauge", help_node.value if help_node else "",
                          SpanOpenRef(ref.group(1), s.text_span(0, len(s.value.strip()))), None, None, (), None, None)

    def alert(self, node: YNode, what: str, buckets: Buckets) -> AlertSpec | None:
        """`p99 > 50ms for 5m`: the threshold in the unit of the histogram's bucket edges; or
        `p99 > 3x baseline for 10m`: a multiple of the quantile's usual value."""
        s = self.expect_scalar(node, f"{what}.alert")
        if s is None:
            return None
        m = ALERT.fullmatch(s.value)
        if not m:
            self.d.error("E117", f"{what}: alert '{shown(s.value)}' not understood", s.span,
                         "write 'pNN > THRESHOLD [for DURATION]' or 'pNN > Nx baseline [for DURATION]', "
                         "e.g. 'p99 > 50ms for 5m'")
            return None
        if m.group(1) not in ALERT_QUANTILES:
            self.d.error("E117", f"{what}: alert quantile 'p{m.group(1)}' is none of "
                         f"{', '.join('p' + q for q in ALERT_QUANTILES)}", s.text_span(m.start(1) - 1, len(m.group(1)) + 1))
            return None
        threshold, dimension, multiple = 0, buckets.dimension, 0.0
        if m.group(2) is not None:
            multiple = float(m.group(2))
            if multiple <= 1:
                self.d.error("E117", f"{what}: alert multiple '{m.group(2)}x' is not above the baseline",
                             s.text_span(m.start(2), len(m.group(2)) + 1), "write a multiple above 1, e.g. '2x baseline'")
                return None
        else:
            threshold_span = s.text_span(m.start(3), len(m.group(3)))
            quantity = self.quantity(s, m.group(3), threshold_span)
            if quantity is None:
                return None
            threshold, dimension = quantity
            if dimension != buckets.dimension:
                said = {"time": "a duration", "size": "a size", "none": "a plain number"}
                self.d.error("E117", f"{what}: alert threshold '{m.group(3)}' is {said[dimension]}, the histogram's "
                             f"buckets are {said[buckets.dimension]}", threshold_span,
                             "write the threshold in the unit of the buckets")
                return None
        for_seconds = 0
        if m.group(4) is not None:
            for_seconds = int(m.group(4)[:MAX_DIGITS]) * ALERT_FOR_UNITS[m.group(5)]
            if for_seconds > 86_400 * 365:
                self.d.error("E117", f"{what}: alert duration '{m.group(4)}{m.group(5)}' is over a year",
                             s.text_span(m.start(4), len(m.group(4)) + len(m.group(5))))
                return None
        return AlertSpec(int(m.group(1)) / 10 ** len(m.group(1)), threshold, dimension, for_seconds, s.span, multiple)

    def sample(self, node) -> tuple[int, int]:
        s = self.expect_scalar(node, "sample")
        if s is None:
            return 1, 0
        # Runs of spaces made one first: the pattern's neighbouring optional spaces would otherwise
        # try every split of a long run (seconds for a few thousand spaces).
        text = re.sub(r"\s+", " ", s.value.strip())
        m = re.fullmatch(r"(?:1 ?/ ?([0-9]+)|all)? ?(?:,? ?at most ([0-9]+) ?/ ?s)?", text)
        if not m or not text:
            self.d.error("E115", f"sample '{shown(text)}' not understood", s.span,
                         "write '1/10', 'at most 100/s' or '1/10, at most 100/s'")
            return 1, 0
        if m.group(1) is not None and int(m.group(1)[:21]) == 0:
            self.d.error("E115", "sample '1/0' would keep nothing", s.span, "write '1/N' with N >= 1")
            return 1, 0
        numbers = []
        for group, what, default in ((1, "sample", 1), (2, "rate", 0)):
            digits = m.group(group)
            value = int(digits) if digits is not None and len(digits) <= 20 else LIMITS[what].high + 1 \
                if digits is not None else default
            if out_of_range(what, value):
                where = s.text_span(s.value.find(digits), len(digits))
                self.d.error("E130", f"sample: {'1/N' if what == 'sample' else 'at most N/s'} with N = {shown(digits)}: "
                             f"N must be at most {LIMITS[what].high:,}", where, LIMITS[what].why)
                return 1, 0
            numbers.append(value)
        return numbers[0], numbers[1]

    def event_spec(self, key: YScalar, node: YNode) -> EventSpec | None:
        what = f"event '{key.value}'"
        m = self.expect_map(node, what)
        if m is None:
            return None
        self.check_keys(m, EVENT_KEYS, what)
        if m.get("on") is None:
            self.d.error("E108", f"{what} needs 'on'", key.span, "e.g. 'on: inference.end'")
            return None
        on = self.probe_address(m.get("on"), f"{what}.on", allow_span_end=True)
        when = self.expression(m.get("when"), f"{what}.when") if m.get("when") is not None else None
        every, rate = self.sample(m.get("sample")) if m.get("sample") is not None else (1, 0)
        fields: list[EventField] = []
        fnode = m.get("fields")
        if fnode is not None and not isinstance(fnode, YSeq):
            self.d.error("E104", f"{what}.fields must be a list", fnode.span)
        elif fnode is not None:
            for item in fnode.items:
                if isinstance(item, YMap):           # - NAME: EXPRESSION
                    fields += [EventField(k.value, expr, "", k.span)
                               for k, expr in self.named_expressions(item, "event field")]
                    continue
                s = self.expect_scalar(item, "an event field")
                if s is None:
                    continue
                if s.value.strip() in STACK_FIELDS:
                    fields.append(EventField(s.value.strip(), None, STACK_FIELDS[s.value.strip()], s.span))
                    continue
                expr = self.expression(s, "an event field")
                if expr is None:
                    continue
                if not isinstance(expr, Name):
                    self.d.error("E122", "an event field that is not a plain name needs a name of its own",
                                 s.span, "write it as '- NAME: EXPRESSION'")
                    continue
                fields.append(EventField(expr.dotted.replace(".", "_"), expr, "", s.span))
            seen = set()
            for f in fields:
                if f.name in seen:
                    self.d.error("E122", f"{what}: field '{f.name}' appears twice", f.span)
                seen.add(f.name)
                plain = isinstance(f.expr, Name) and f.expr.dotted == f.name
                if f.name in EVENT_RECORD_KEYS and not plain:
                    self.d.error("E131", f"{what}: field '{f.name}' would replace the '{f.name}' every event "
                                 "record carries", f.span, "name this field otherwise")
        if on is None:
            return None
        return EventSpec(key.value, key.span, on, when, every, rate, tuple(fields))


def load_spec_text(text: str, file: str, diags: Diagnostics) -> Spec | None:
    root = load_yaml(text, file, diags)
    if root is None:
        return None
    return SpecLoader(file, diags).load(root)


def read_spec_source(path: str | Path, diags: Diagnostics) -> str | None:
    """The text of a spec file, or None with a diagnostic: only a regular file of at most
    MAX_SPEC_BYTES of UTF-8 is read (a FIFO would block, /dev/zero would never end)."""
    try:
        # O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        diags.error("E100", f"spec file '{path}' does not exist", None)
        return None
    except OSError as exc:
        diags.error("E100", f"cannot read spec file '{path}': {exc.strerror or exc}", None)
        return None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "it is a directory" if stat.S_ISDIR(mode) else "not a regular file"
            diags.error("E100", f"cannot read spec file '{path}': {what}", None, "give the path of a .yaml file")
            return None
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SPEC_BYTES:
            chunk = os.read(fd, MAX_SPEC_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        diags.error("E100", f"cannot read spec file '{path}': {exc.strerror or exc}", None)
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_SPEC_BYTES:
        diags.error("E100", f"spec file '{path}' is larger than {MAX_SPEC_BYTES // 1024} KiB",
                    SourceSpan(str(path), 1, 1), "a spec is a few kilobytes; is this the right file?")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start]
        line = before.count(b"\n") + 1
        col = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        diags.error("E100", f"spec file '{path}' is not UTF-8: byte {data[exc.start]:#04x} cannot start or "
                    "continue a character here", SourceSpan(str(path), line, col), "save the file as UTF-8")
        return None


def load_spec_file(path: str | Path, diags: Diagnostics) -> tuple[Spec | None, str]:
    """Load a spec file; returns the spec (None on fatal problems) and its text for rendering."""
    text = read_spec_source(path, diags)
    if text is None:
        return None, ""
    return load_spec_text(text, str(path), diags), text
