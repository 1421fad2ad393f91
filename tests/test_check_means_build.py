"""What `probec check` accepts builds: core's C compiled by the real clang, the bpftrace script
accepted by the real bpftrace (`bpftrace -d`: parsed, checked and compiled to BPF, attached nowhere).

The specs are edge cases generated around every limit in compiler/spec/limits.py: numbers just
inside and just outside each bound, names at the length limit and one past it, reserved and
colliding names, expressions at the nesting limit, map keys and event records at the stack budget.
Each case says what it expects: `ok` must build in every backend, `reject` must be refused by
check with a positioned, coded diagnostic; either way nothing may raise.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import WORKLOADS, require_kernel

from probec.compiler.diagnostics import Severity, render_text
from probec.compiler.driver import build_bundle, check_file
from probec.compiler.spec.limits import INT_MAX, LIMITS, MAX_BUCKETS, MAX_EXPRESSION_DEPTH, MAX_NAME_LENGTH


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    expect: str          # ok | reject


def span_spec(name: str = "t", metrics: str = "", events: str = "", limits: str = "", span: str = "wr") -> str:
    """A spec around one syscall span; METRICS and EVENTS are YAML blocks indented by two."""
    return (f"name: {name}\n" + (f"limits:\n{limits}" if limits else "") +
            f"spans:\n  {span}:\n    syscall: write\n" +
            "metrics:\n" + (metrics or f"  wr_seconds:\n    histogram: {span}.duration\n    buckets: [1ms]\n") +
            (f"events:\n{events}" if events else ""))


def counter(filter_text: str, name: str = "x_total", on: str = "wr.end", labels: str = "") -> str:
    text = f"  {name}:\n    count: {on}\n"
    if filter_text:
        text += f"    filter: {filter_text}\n"
    if labels:
        text += f"    labels: [{labels}]\n"
    return text


def event(name: str = "e", sample: str = "", fields: str = "pid", on: str = "wr.end") -> str:
    return f"  {name}:\n    on: {on}\n" + (f"    sample: {sample}\n" if sample else "") + f"    fields: [{fields}]\n"


def histogram(buckets: str, name: str = "h_seconds", labels: str = "") -> str:
    return f"  {name}:\n    histogram: wr.duration\n    buckets: {buckets}\n" + \
        (f"    labels: [{labels}]\n" if labels else "")


def both(label: str, make, inside, outside) -> list[Case]:
    """The same spec just inside a limit (must build) and just outside it (must be refused)."""
    return [Case(f"{label}-inside", make(inside), "ok"), Case(f"{label}-outside", make(outside), "reject")]


def named(n: int, stem: str = "n") -> str:
    return (stem + "_" + "x" * n)[:n]


def comm_list(n: int) -> str:
    return ", ".join(f"{{c{i}: comm}}" for i in range(n))


def edge_cases() -> list[Case]:
    cases: list[Case] = []
    lim = LIMITS
    # numbers in expressions, plain and with units
    cases += both("integer-literal", lambda v: span_spec(metrics=counter(f"pid != {v}")), INT_MAX, INT_MAX + 1)
    cases += [Case(f"integer-{v:#x}", span_spec(metrics=counter(f"pid != {v}")), "reject")
              for v in ((1 << 64) - 1, 1 << 64, 10 ** 30)]
    cases += both("duration-ns", lambda v: span_spec(metrics=counter(f"duration > {v}ns")), INT_MAX, INT_MAX + 1)
    hours = INT_MAX // 3_600_000_000_000
    cases += both("duration-h", lambda v: span_spec(metrics=counter(f"duration > {v}h")), hours, hours + 1)
    cases += both("size-GiB", lambda v: span_spec(metrics=counter(f"retval * 1B > {v}GiB", on="syscallret:write")),
                  INT_MAX >> 30, (INT_MAX >> 30) + 1)
    cases.append(Case("negated-largest", span_spec(metrics=counter(f"-{INT_MAX} < 0")), "ok"))
    # bucket edges: the largest value, exp2's doubling past it, and the number of edges
    cases += both("bucket-edge", lambda v: span_spec(metrics=histogram(f"[1ns, {v}ns]")), INT_MAX, INT_MAX + 1)
    cases += both("bucket-exp2", lambda v: span_spec(metrics=histogram(f"exp2(1ns, {v}ns)")), 1 << 62, INT_MAX)
    cases += both("bucket-linear", lambda n: span_spec(metrics=histogram(f"linear(0, 1ms, {n})")),
                  MAX_BUCKETS, MAX_BUCKETS + 1)
    cases += both("bucket-list", lambda n: span_spec(metrics=histogram(
        "[" + ", ".join(f"{i + 1}us" for i in range(n)) + "]")), MAX_BUCKETS, MAX_BUCKETS + 1)
    # event sampling and rate limits
    cases += both("sample", lambda v: span_spec(events=event(sample=f"1/{v}")), lim["sample"].high,
                  lim["sample"].high + 1)
    cases += both("sample-2^64", lambda v: span_spec(events=event(sample=f"1/{v}")), 1 << 40, (1 << 64) - 1)
    cases += both("rate", lambda v: span_spec(events=event(sample=f"at most {v}/s")), lim["rate"].high,
                  lim["rate"].high + 1)
    cases += both("rate-20-digits", lambda v: span_spec(events=event(sample=f"1/3, at most {v}/s")), 10 ** 18,
                  10 ** 20 - 1)
    # probe addresses with numbers
    cases += both("interval", lambda s: span_spec(metrics=counter("", on=f"interval:s:{s}")), 86400, 86401)
    cases.append(Case("interval-past-a-day", span_spec(metrics=counter("", on="interval:s:86401")), "reject"))
    cases.append(Case("interval-20-digits", span_spec(metrics=counter("", on=f"interval:ms:{10 ** 20}")), "reject"))
    cases.append(Case("uprobe-offset-past-end", span_spec(metrics=counter(
        "", on=f"uprobe:{WORKLOADS / 'libpwork.so'}:pwork_nop+{1 << 20}")), "reject"))
    cases.append(Case("uprobe-offset-inside", span_spec(metrics=counter(      # bpftrace 0.17 places none
        "", on=f"uprobe:{WORKLOADS / 'libpwork.so'}:pwork_nop+1")), "reject"))
    cases.append(Case("uprobe-offset-zero", span_spec(metrics=counter(
        "", on=f"uprobe:{WORKLOADS / 'libpwork.so'}:pwork_nop+0")), "ok"))
    # limits
    for key, unit in (("series", ""), ("concurrency", ""), ("ringbuf", "")):
        hi = lim[f"limits.{key}"].high
        outside = hi * 2 if key == "ringbuf" else hi + 1
        cases += both(f"limits-{key}", lambda v, key=key: span_spec(
            limits=f"  {key}: {v}\n", metrics=counter("", labels="comm"),
            events=event() if key == "ringbuf" else ""), hi, outside)
    # names: at the length limit and one past it, everywhere a name goes
    cases += both("spec-name-length", lambda n: span_spec(name=named(n, "s")), MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1)
    cases += both("metric-name-length", lambda n: span_spec(metrics=counter("", name=named(n, "m"))),
                  MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1)
    cases += both("event-name-length", lambda n: span_spec(events=event(name=named(n, "e"), sample="1/2, at most 5/s")),
                  MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1)
    cases += both("label-name-length", lambda n: span_spec(metrics=counter("", labels=f"{{{named(n, 'l')}: pid}}")),
                  MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1)
    cases += both("field-name-length", lambda n: span_spec(events=event(fields=f"{{{named(n, 'f')}: pid}}")),
                  MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1)
    cases += both("span-name-length", lambda n: span_spec(span=named(n, "w")), MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1)
    # reserved names and names whose generated identifiers meet
    for spec_name in ("vmlinux", "probec", "loader", "manifest"):
        cases.append(Case(f"spec-name-{spec_name}", span_spec(name=spec_name), "reject"))
    cases.append(Case("spec-name-like-header", span_spec(name="probec_bpf"), "ok"))
    cases.append(Case("field-pad", span_spec(events=event(fields="comm, {__pad0: pid}")), "reject"))
    cases.append(Case("field-bucket", span_spec(events=event(fields="comm, {bucket: pid}, tid, cpu")), "ok"))
    cases.append(Case("field-event", span_spec(events=event(fields="comm, {event: tid}")), "reject"))
    cases.append(Case("field-pid-not-pid", span_spec(events=event(fields="{pid: tid}")), "reject"))
    cases.append(Case("label-dunder", span_spec(metrics=counter("", labels="{__name__: comm}")), "reject"))
    cases.append(Case("label-bucket", span_spec(metrics=histogram("[1ms]", labels="{bucket: pid}")), "ok"))
    cases.append(Case("label-le-counter", span_spec(metrics=counter("", labels="{le: pid}")), "ok"))
    cases.append(Case("label-le-histogram", span_spec(metrics=histogram("[1ms]", labels="{le: pid}")), "reject"))
    cases.append(Case("label-quantile", span_spec(metrics=histogram("[1ms]", labels="{quantile: pid}")), "reject"))
    cases.append(Case("only-total", span_spec(metrics=counter("", name="_total")), "reject"))
    cases.append(Case("underscore-name", span_spec(metrics=counter("", name="_x_total")), "ok"))
    cases.append(Case("health-prefix", span_spec(metrics=counter("", name="probec_events_total")), "reject"))
    cases.append(Case("calls-and-calls_total", span_spec(
        metrics=counter("", name="calls") + counter("", name="calls_total")), "reject"))
    for suffix in ("sum", "count", "bucket", "window", "window_count"):
        cases.append(Case(f"histogram-and-{suffix}", span_spec(
            metrics=histogram("[1ms]", name="x") + counter("", name=f"x_{suffix}")), "reject"))
    cases.append(Case("histogram-and-sum-total", span_spec(
        metrics=histogram("[1ms]", name="x") + counter("", name="x_sum_total")), "reject"))
    cases.append(Case("event-window-clash", span_spec(
        events=event("a", "at most 5/s") + event("a_in", "at most 5/s")), "reject"))
    cases.append(Case("struct-clash", span_spec(
        metrics=counter("", name="event_a"), events=event("a_value")), "reject"))
    cases.append(Case("similar-names", span_spec(
        metrics=counter("", name="a_total") + counter("", name="a_total_b_total") + histogram("[1ms]", name="a_b"),
        events=event("a") + event("a_seen") + event("a_tick")), "ok"))
    # expressions at the nesting limit
    depth = MAX_EXPRESSION_DEPTH
    cases += both("nested-not", lambda n: span_spec(metrics=counter("not " * n + "pid == 1")), depth - 2, depth - 1)
    cases += both("nested-sum", lambda n: span_spec(metrics=counter(" + ".join(["pid"] * n) + " == 1")),
                  depth - 1, depth)
    cases += both("nested-minus", lambda n: span_spec(metrics=counter("-" * n + "pid == 1")), depth - 2, depth - 1)
    cases.append(Case("deep-parentheses", span_spec(metrics=counter("(" * 50 + "pid" + ")" * 50 + " == 1")), "ok"))
    cases.append(Case("nested-not-260", span_spec(metrics=counter("not " * 260 + "pid == 1")), "reject"))
    # the stack: map keys, event records, both at one probe
    cases += both("comm-labels", lambda n: span_spec(metrics=counter("", labels=comm_list(n))), 27, 28)
    cases += both("int-labels", lambda n: span_spec(metrics=counter("", labels=", ".join(
        f"{{p{i}: pid + {i}}}" for i in range(n)))), 56, 57)
    cases += both("histogram-labels", lambda n: span_spec(metrics=histogram("exp2(1us, 1s)", labels=comm_list(n))),
                  26, 27)
    cases += both("comm-fields", lambda n: span_spec(events=event(fields=comm_list(n))), 25, 26)
    cases += both("int-fields", lambda n: span_spec(events=event(fields=", ".join(
        f"{{p{i}: pid + {i}}}" for i in range(n)))), 51, 52)
    cases += both("stack-fields", lambda n: span_spec(events=event(fields="ustack, kstack, " + ", ".join(
        f"{{p{i}: pid + {i}}}" for i in range(n)))), 47, 48)
    cases.append(Case("labels-and-fields", span_spec(
        metrics=counter("", labels=comm_list(24)), events=event(fields=comm_list(24))), "ok"))
    cases.append(Case("many-metrics", span_spec(metrics="".join(
        counter("", name=f"m{i}_total", labels="comm") for i in range(20))), "ok"))
    # 40 labelled counters on one probe: 121 maps in its program, past the kernel's 64 (E352)
    cases.append(Case("too-many-maps", span_spec(metrics="".join(
        counter("", name=f"m{i}_total", labels="comm") for i in range(40))), "reject"))
    # socket() where bpftrace loads no tracepoint types: return probes, uprobes, constants
    pwork = WORKLOADS / "libpwork.so"
    cases.append(Case("socket-syscallret", span_spec(metrics=counter("socket(3) != 0", on="syscallret:write")), "ok"))
    cases.append(Case("socket-retval", span_spec(metrics=counter("", on="syscallret:write",
                                                                 labels="{s: socket(retval)}")), "ok"))
    cases.append(Case("socket-uretprobe", span_spec(metrics=counter(
        "socket(1) != 0", on=f"uretprobe:{pwork}:pwork_nop")), "ok"))
    cases.append(Case("socket-uprobe", span_spec(metrics=counter(
        "socket(arg0) != 0", on=f"uprobe:{pwork}:pwork_record")), "ok"))
    cases.append(Case("socket-span-key", span_spec(metrics=histogram("[1ms]")).replace(
        "syscall: write", "syscall: getpid\n    key: socket(1)"), "ok"))
    return cases


CASES = edge_cases()


def check_or_build(case: Case, tmp: Path):
    """Check the case; on acceptance build both backends. Returns (result, core dir, bpftrace dir)."""
    spec = tmp / "spec.yaml"
    spec.write_text(case.text)
    result = check_file(str(spec))
    errors = [d for d in result.diagnostics.items if d.severity is Severity.ERROR]
    shown = render_text(result.diagnostics.sorted(), result.sources)
    if result.program is None:
        assert case.expect == "reject", f"check refused a spec that both backends build:\n{shown}"
        assert errors, "check refused without an error"
        for d in errors:       # file:line:col, a stable code and a help line where it matters
            assert d.span is not None and d.span.line >= 1 and d.span.col >= 1, shown
            assert re.fullmatch(r"E\d{3}", d.code), shown
        return None
    assert case.expect == "ok", f"check accepted a spec outside the limits:\n{case.text}"
    return result


@pytest.fixture(scope="module")
def clang():
    require_kernel(need_clang=True)     # clang only; nothing is loaded
    if shutil.which("bpftool") is None:
        pytest.skip("bpftool is not installed (needed once to generate vmlinux.h)")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_check_means_core_builds(case: Case, tmp_path: Path, workloads, clang):
    result = check_or_build(case, tmp_path)
    if result is None:
        return
    bundle = build_bundle(result, "core", compile=True)
    shown = render_text(result.diagnostics.sorted(), result.sources)
    assert bundle is not None, f"core build failed after check accepted:\n{shown}"
    assert any(name.endswith(".bpf.o") for name in bundle.files), shown
    assert_exposition_parses(bundle.manifest)


def assert_exposition_parses(manifest) -> None:
    """The runtime's exposition of every metric (one series each) parses as Prometheus reads it:
    no family or sample name twice, no label Prometheus keeps for itself. promtool, where it is
    installed, parses it too (its lint warnings are naming advice, not a rejected scrape)."""
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_text
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
    from prometheus_client.parser import text_string_to_metric_families
    from probec.runtime.exporter import Exporter
    from probec.runtime.store import HistogramSeries, MetricStore
    store = MetricStore(manifest)
    for m in manifest.metrics:
        key = tuple("x" if lab.type == "str" else 0 for lab in m.labels)
        value = HistogramSeries([1] * (len(m.edges) + 1), 5) if m.kind == "histogram" else 3
        store.replace(m.name, {key: value})
    store.remember()
    exporter = Exporter(store, manifest.name, "core")
    text = exporter.text()
    families = list(text_string_to_metric_families(text))
    # OpenMetrics, which Prometheus asks for first, forbids what the older text format lets pass
    # (a histogram x beside a counter x_count); its parser checks every family against the others
    list(openmetrics_families(openmetrics_text(exporter.registry).decode()))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"a metric family twice: {sorted(names)}"
    owner: dict[str, str] = {}
    for f in families:
        for sample in {s.name for s in f.samples}:
            assert owner.setdefault(sample, f.name) == f.name, f"'{sample}' in '{f.name}' and '{owner[sample]}'"
    if shutil.which("promtool"):
        run = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                             timeout=30)
        assert "error while linting" not in run.stdout + run.stderr, run.stdout + run.stderr


@pytest.mark.kernel
@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "ok"], ids=[c.name for c in CASES if c.expect == "ok"])
def test_check_means_bcc_loads(case: Case, tmp_path: Path, workloads):
    """What check accepts, the bcc backend builds (headers left to the host that runs it, as
    `--kernel any` does), BCC compiles, and the verifier takes every function of."""
    from conftest import require_bcc_kernel
    from harness import bcc_verify
    from probec.runtime.bcc_runner import program_text
    require_bcc_kernel()
    result = check_or_build(case, tmp_path)
    if result is None:
        return
    bundle = build_bundle(result, "bcc", check_headers=False)
    shown = render_text(result.diagnostics.sorted(), result.sources)
    assert bundle is not None, f"bcc build failed after check accepted:\n{shown}"
    bundle.write(tmp_path / "bcc")
    assert bcc_verify(program_text(tmp_path / "bcc" / f"{bundle.name}.py"), bundle.manifest.to_dict())


@pytest.mark.kernel
@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "ok"], ids=[c.name for c in CASES if c.expect == "ok"])
def test_check_means_bpftrace_accepts(case: Case, tmp_path: Path, workloads, bpftrace_kernel):
    """`bpftrace -d` runs bpftrace 0.17's parser, semantic checks and BPF code generation (where its
    stack limit and unknown struct members are found) and stops before loading anything."""
    result = check_or_build(case, tmp_path)
    bundle = build_bundle(result, "bpftrace", "0.17")
    shown = render_text(result.diagnostics.sorted(), result.sources)
    assert bundle is not None, f"bpftrace build failed after check accepted:\n{shown}"
    bundle.write(tmp_path / "bt")
    script = next((tmp_path / "bt").glob("*.bt"))
    run = subprocess.run(["bpftrace", "-d", str(script)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines()
              if re.search(r"\berror\b", line, re.I) and "RLIMIT_MEMLOCK" not in line
              and "available_filter_functions" not in line]
    assert run.returncode == 0 and not errors, f"bpftrace rejected the script:\n" + "\n".join(errors[:10])


LOADED = ("comm-labels-inside", "histogram-labels-inside", "comm-fields-inside", "int-fields-inside",
          "stack-fields-inside", "socket-uretprobe")


@pytest.mark.kernel
@pytest.mark.parametrize("name", LOADED)
def test_specs_at_the_stack_budget_load_in_bpftrace(name: str, tmp_path: Path, workloads, bpftrace_kernel):
    """`bpftrace -d` stops before the kernel's verifier: the largest keys and records check
    accepts are loaded and attached for real here, until bpftrace says every probe is attached."""
    from probec.compiler.backends.bpftrace.generator import READY_MARK
    case = next(c for c in CASES if c.name == name)
    result = check_or_build(case, tmp_path)
    bundle = build_bundle(result, "bpftrace", "0.17")
    assert bundle is not None
    bundle.write(tmp_path / "bt")
    script = next((tmp_path / "bt").glob("*.bt"))
    proc = subprocess.Popen(["bpftrace", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    watchdog = threading.Timer(60, proc.kill)     # a bpftrace that neither loads nor exits
    watchdog.start()
    try:
        for line in proc.stdout:           # ends when bpftrace exits (it fails to load) or is ready
            lines.append(line.rstrip("\n"))
            if READY_MARK in line:
                break
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert any(READY_MARK in line for line in lines), "bpftrace did not load the script:\n" + "\n".join(lines[-10:])
