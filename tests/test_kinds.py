"""The registries of probe and metric kinds (compiler/kinds.py) and what each backend declares it
can do with them: every shipped backend renders every kind the IR can hold, and a backend that
lacks one says so from its declaration (E501), before it writes anything."""

from __future__ import annotations

from probec.compiler.backends.bpftrace.generator import BpftraceBackend
from probec.compiler.backends.core.generator import CoreBackend
from probec.compiler.backends.bcc.generator import BccBackend
from probec.compiler.diagnostics import Diagnostics
from probec.compiler.driver import build_bundle, check_file
from probec.compiler.ir.host import HostInfo
from probec.compiler.kinds import IR_PROBE_KINDS, METRIC_KINDS, METRIC_SPEC_KEYS, PROBE_KINDS
from probec.compiler.monitoring.dashboard import PANELS
from probec.compiler.spec.loader import METRIC_KEYS, load_spec_text
from probec.compiler.spec.model import PROBE_KINDS as SPEC_PROBE_KINDS
from probec.runtime.core_attach import ATTACH

from harness import write_spec

HOST = HostInfo(tracefs_roots=("/nonexistent",), btf_path="/nonexistent")

SPEC = """
name: kinds
spans:
  nap:
    syscall: nanosleep
metrics:
  nap_seconds:
    histogram: nap.duration
    buckets: [1ms, 10ms]
  reads_total:
    count: syscall:read
  ticks_total:
    count: profile:hz:99
"""


def test_every_shipped_backend_renders_every_kind():
    """Every kind, but fentry/fexit under bcc: they need kernel BTF, which the hosts bcc is for
    lack (a `kernel:` span falls back to its kprobe there)."""
    for backend in (BpftraceBackend, CoreBackend, BccBackend):
        expected = set(IR_PROBE_KINDS) - ({"fentry", "fexit"} if backend is BccBackend else set())
        assert set(backend.PROBES) == expected, backend.name
        assert set(backend.UPDATES) == {k.update for k in METRIC_KINDS.values()}, backend.name


def test_the_core_runtime_attaches_every_kind_the_core_backend_writes():
    assert set(ATTACH) == set(CoreBackend.PROBES) == set(IR_PROBE_KINDS)


def test_every_metric_kind_has_a_dashboard_panel():
    assert set(PANELS) == set(METRIC_KINDS)


def test_the_spec_reads_its_kinds_from_the_registries():
    assert SPEC_PROBE_KINDS == tuple(PROBE_KINDS)
    assert set(METRIC_SPEC_KEYS) <= set(METRIC_KEYS)
    # what lowering leaves in the IR: no syscall (a tracepoint) and no kernel (a mechanism chosen)
    assert "syscall" not in IR_PROBE_KINDS and "kernel" not in IR_PROBE_KINDS and "tracepoint" in IR_PROBE_KINDS


def test_an_address_of_the_wrong_shape_is_told_its_grammar():
    for address, kind in (("uprobe:onlybinary", "uprobe"), ("kprobe:a:b", "kprobe"), ("interval:h:1", "interval")):
        d = Diagnostics()
        load_spec_text(f"name: t\nmetrics:\n  t_total:\n    count: {address}\n", "t.yaml", d)
        assert [x.code for x in d.items] == ["E111"], d.items
        assert f"should be {PROBE_KINDS[kind].address}" in d.items[0].message


def _checked(tmp_path):
    result = check_file(str(write_spec(tmp_path, SPEC)), HOST)
    assert result.program is not None, result.diagnostics.items
    return result


def test_a_backend_without_a_probe_or_metric_kind_says_so(tmp_path):
    result = _checked(tmp_path)

    class NoProfile(CoreBackend):
        PROBES = {k: v for k, v in CoreBackend.PROBES.items() if k != "profile"}
        UPDATES = {k: v for k, v in CoreBackend.UPDATES.items() if k != "buckets"}

    d = Diagnostics()
    assert not NoProfile(d, compile=False).supports(result.program)
    messages = [x.message for x in d.items if x.code == "E501"]
    assert len(messages) == 2, d.items
    assert messages[0].startswith("the core backend cannot do profile probes (profile:hz:99): it attaches ")
    assert "tracepoint" in messages[0] and "profile," not in messages[0]
    assert messages[1] == ("the core backend cannot do histogram metrics (metric 'nap_seconds'): they are updated "
                           "by 'buckets', and it renders only add")


def test_shipped_backends_support_the_program(tmp_path):
    result = _checked(tmp_path)
    for backend in (BpftraceBackend(Diagnostics()), CoreBackend(Diagnostics(), compile=False),
                    BccBackend(Diagnostics(), check_headers=False)):
        assert backend.supports(result.program) and not backend.d.items, backend.name
    assert build_bundle(result, "core", compile=False) is not None
