"""Lowering decisions that no backend output shows directly: where a span's `within` is checked
again at its end."""

from __future__ import annotations

from probec.compiler.diagnostics import Diagnostics
from probec.compiler.ir.host import HostInfo
from probec.compiler.ir.lowering import LoweringOptions, lower
from probec.compiler.ir.nodes import TID, SpanEnd, walk
from probec.compiler.spec.loader import load_spec_text

# No tracefs and no BTF: field names go unchecked (a warning), so this runs anywhere.
HOST = HostInfo(tracefs_roots=("/nonexistent",), btf_path="/nonexistent")

BASE = """
name: t
spans:
  work:
    syscall: read
{inner}
metrics:
  inner_seconds:
    histogram: inner.duration
    buckets: [1ms]
{extra}
"""


def lowered(inner: str, extra: str = ""):
    d = Diagnostics()
    spec = load_spec_text(BASE.format(inner=inner, extra=extra), "t.yaml", d)
    program = lower(spec, d, LoweringOptions(host=HOST)) if not d.has_errors() else None
    return program, [x for x in d.items if x.severity.value == "error"]


def ends(program, span: str) -> list[SpanEnd]:
    return [n for n in walk(program.probes) if isinstance(n, SpanEnd) and n.span == span]


def test_thread_keyed_within_is_checked_again_where_the_span_ends():
    program, errors = lowered("""
  inner:
    syscall: nanosleep
    within: work
""")
    assert not errors
    [end] = ends(program, "inner")
    assert end.inside is not None and end.inside.span == "work" and end.inside.key == TID
    assert program.checked_at_end() == ["inner"]


def test_keyed_within_is_checked_at_the_end_key():
    program, errors = lowered("""
  inner:
    begin: {probe: tracepoint:sched:sched_switch, key: args.prev_pid}
    end: {probe: tracepoint:sched:sched_switch, key: args.next_pid}
    within: {span: work, key: args.prev_pid, end_key: args.next_pid}
""")
    assert not errors
    [end] = ends(program, "inner")
    assert end.inside is not None and "next_pid" in repr(end.inside.key)


def test_no_check_where_the_key_cannot_be_computed_at_the_end_unless_totals_need_it():
    # the within key is a return value, which the end (a syscall's entry) does not have
    inner = """
  inner:
    begin: syscallret:openat
    end: syscall:close
    within: {span: work, key: retval}
"""
    program, errors = lowered(inner)
    assert not errors
    [end] = ends(program, "inner")
    assert end.inside is None and program.checked_at_end() == []
    # with inner.total read at the outer end, the key is needed there: an error that says so
    _, errors = lowered(inner, """
  inner_per_work_seconds:
    histogram: inner.total
    on: work.end
    buckets: [1ms]
""")
    assert errors and any("end_key" in h for e in errors for h in e.hints)


def test_thread_default_within_on_another_threads_key_is_left_unchecked_without_totals():
    inner = """
  inner:
    begin: {probe: tracepoint:sched:sched_switch, key: args.prev_pid}
    end: {probe: tracepoint:sched:sched_switch, key: args.next_pid}
    within: work
"""
    program, errors = lowered(inner)
    assert not errors
    assert ends(program, "inner")[0].inside is None
    _, errors = lowered(inner, """
  inner_per_work_seconds:
    histogram: inner.total
    on: work.end
    buckets: [1ms]
""")
    assert [e.code for e in errors] == ["E332"]
