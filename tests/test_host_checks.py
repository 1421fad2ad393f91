"""Host checks degrade in steps: tracefs, then kernel BTF, then a warning. Never a failure."""

from __future__ import annotations

import pytest

from probec.compiler.diagnostics import Diagnostics
from probec.compiler.ir.host import HostInfo, btf_strings
from probec.compiler.ir.lowering import LoweringOptions, lower
from probec.compiler.spec.loader import load_spec_text

SPEC = """
name: t
metrics:
  switches_total:
    count: tracepoint:sched:{event}
    labels: [args.next_comm]
"""


def check(text: str, host: HostInfo) -> Diagnostics:
    d = Diagnostics()
    spec = load_spec_text(text, "t.yaml", d)
    lower(spec, d, LoweringOptions(host=host))
    return d


def btf_readable() -> bool:
    return btf_strings("/sys/kernel/btf/vmlinux") is not None


@pytest.mark.skipif(not btf_readable(), reason="this kernel exposes no BTF at /sys/kernel/btf/vmlinux")
def test_without_tracefs_btf_checks_names_and_warns_about_fields():
    host = HostInfo(tracefs_roots=("/nonexistent",))
    d = check(SPEC.format(event="sched_switch"), host)
    assert not d.has_errors()
    [w] = [x for x in d.items if x.code == "W313"]
    assert "next_comm" in w.message
    assert (w.span.line, w.span.col) == (6, 14)          # the field, where it is read
    d = check(SPEC.format(event="sched_swich"), host)
    [err] = [x for x in d.items if x.code == "E308"]
    assert "btf_trace_sched_swich" in err.message and "sched_switch" in err.hints[0]


def test_without_tracefs_or_btf_only_warns():
    host = HostInfo(tracefs_roots=("/nonexistent",), btf_path="/nonexistent")
    d = check(SPEC.format(event="anything_at_all"), host)
    assert not d.has_errors()
    assert any(x.code == "W313" and "not checked" in x.message for x in d.items)


def test_no_host_says_nothing_about_tracefs():
    d = check(SPEC.format(event="sched_switch"), HostInfo(enabled=False))
    assert not d.items


def test_btf_strings_rejects_non_btf(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 64)
    assert btf_strings(str(junk)) is None
    assert btf_strings(str(tmp_path / "missing")) is None


def test_label_cardinality_and_map_size_warnings():
    d = check("""
name: card
limits:
  series: 200000
metrics:
  writes_total:
    count: syscall:write
    labels: [tid, comm]
  write_bytes:
    histogram: args.count
    on: syscall:write
    buckets: exp2(1B, 1GiB)
    labels: [comm]
""", HostInfo())
    codes = {x.code: x for x in d.items}
    assert not d.has_errors()
    assert "label 'tid'" in codes["W403"].message and codes["W403"].span.line == 8   # the leading newline
    assert "6,600,000 entries" in codes["W404"].message
