"""Host checks degrade in steps: tracefs, then kernel BTF, then a warning. Never a failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import probec
from probec.compiler.diagnostics import Diagnostics
from probec.compiler.ir.host import HostInfo, RecordedHost
from probec.host.btf import btf_strings
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


# -- recorded host facts (probec doctor --format json, probec check --target) ---------------------

RECORDED = Path(__file__).parent / "hosts" / "firecracker-6.18.json"
KPROBE_SPEC = """
name: t
metrics:
  sends_total:
    count: kprobe:tcp_sendmsg
"""


def recorded(**changes) -> RecordedHost:
    facts = json.loads(RECORDED.read_text())
    for key, value in changes.items():
        facts["mechanisms"][key] = value
    return RecordedHost(facts, "test facts")


def test_recorded_host_decides_mechanisms_not_this_kernel():
    d = check(KPROBE_SPEC, recorded(kprobe=False))
    [err] = [x for x in d.items if x.code == "E309"]
    assert "the target kernel (6.18.44-fc-v657)" in err.message
    assert not check(KPROBE_SPEC, recorded(kprobe=True)).has_errors()
    d = check(KPROBE_SPEC, recorded(kprobe=None))       # unknown: no claim either way
    assert not d.has_errors()


def test_a_spec_checked_against_two_recorded_kernels():
    """The same spec, judged by the facts of the kernel it targets, not of the one running check."""
    spec = "tests/errors/kernel_without_fallback.yaml"
    old = probec("check", "--target", str(RECORDED.with_name("debian-6.1.json")), spec)
    assert old.returncode == 0 and "0 error(s), 0 warning(s)" in old.stderr, old.stderr
    here = probec("check", "--target", str(RECORDED), spec)
    assert here.returncode == 1 and "error[E310]" in here.stderr and "(6.18.44-fc-v657)" in here.stderr


def test_recorded_host_checks_tracepoints_and_fields():
    host = recorded()
    assert not check(SPEC.format(event="sched_switch"), host).has_errors()
    d = check(SPEC.format(event="sched_swich"), host)
    [err] = [x for x in d.items if x.code == "E308"]
    assert "sched_switch" in err.hints[0]
    d = check(SPEC.replace("next_comm", "next_comm2").format(event="sched_switch"), host)
    assert any(x.code == "E223" and "next_comm2" in x.message for x in d.items)


def test_doctor_json_round_trips_into_a_recorded_host(tmp_path):
    out = probec("doctor", "--format", "json", check=True).stdout
    facts = json.loads(out)
    assert facts["probec_host_facts"] == 1 and \
        set(facts["mechanisms"]) == {"tracepoint", "uprobe", "kprobe", "fentry", "bpftrace_kfunc"}
    path = tmp_path / "here.json"
    path.write_text(out)
    host = RecordedHost.from_file(str(path))
    assert host.has_kprobes == facts["mechanisms"]["kprobe"]
    if facts["tracepoints"] is not None:          # readable tracefs: the same fields as read live
        live = HostInfo()
        assert host.tracepoints == live.tracepoints
        assert host.tracepoint_format("sched", "sched_switch") == live.tracepoint_format("sched", "sched_switch")


@pytest.mark.parametrize("content, message", [
    ("not json", "are not JSON"),
    ('{"probec_host_facts": 99}', "not a probec host-facts record of version 1"),
    ('[1, 2]', "not a probec host-facts record"),
    ('{"probec_host_facts": 1, "tracepoints": {"a:b": [[1]]}}', "is malformed"),
    ('{"probec_host_facts": 1, "mechanisms": []}', "is malformed"),
])
def test_bad_host_facts_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "facts.json"
    path.write_text(content)
    for command in (["check"], ["build", "-o", str(tmp_path / "out")]):
        result = probec(*command, "--target", str(path), "tests/errors/unknown_field.yaml")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr
        assert not (tmp_path / "out").exists()


TARGET_SPEC = """
name: targeted
spans:
  send:
    kernel: tcp_sendmsg
    fallback: syscall:sendto
metrics:
  send_seconds:
    histogram: send.duration
    buckets: exp2(1us, 1s)
  bios_total:
    count: tracepoint:block:block_bio_queue
    labels: [args.comm]
"""


def test_build_for_a_recorded_kernel_takes_its_offsets_and_mechanisms(tmp_path):
    """`probec build --target`: the comm of block_bio_queue sits at offset 36 on Debian's 6.1 and
    38 on the Firecracker 6.18 record; the kernel span uses kprobes where the record has them and
    its fallback where not, whatever this machine has."""
    spec = tmp_path / "targeted.yaml"
    spec.write_text(TARGET_SPEC)
    built = {}
    for facts, offset in (("debian-6.1.json", 36), ("firecracker-6.18.json", 38)):
        for backend in ("core", "bpftrace"):
            out = tmp_path / f"{facts}.{backend}"
            result = probec("build", "--target", str(RECORDED.with_name(facts)), "--backend", backend, "--no-compile",
                            "--bpftrace-version", "0.17", "-o", str(out), str(spec))
            assert result.returncode == 0, result.stderr
            built[facts, backend] = result.stderr
        checks = json.loads((tmp_path / f"{facts}.core" / "manifest.json").read_text())["core"]["tracepoint_fields"]
        assert [(c["tracepoint"], c["field"], c["offset"]) for c in checks] == \
            [("block:block_bio_queue", "comm", offset)], checks
    assert "W311" not in built["debian-6.1.json", "core"]
    assert "W311" in built["firecracker-6.18.json", "core"] and "(6.18.44-fc-v657)" in built["firecracker-6.18.json", "core"]
    old = (tmp_path / "debian-6.1.json.bpftrace" / "targeted.bt").read_text()
    new = (tmp_path / "firecracker-6.18.json.bpftrace" / "targeted.bt").read_text()
    assert "tcp_sendmsg" in old and "sys_enter_sendto" not in old
    assert "tcp_sendmsg" not in new and "sys_enter_sendto" in new


def test_host_facts_must_be_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = probec("check", "--target", str(fifo), "tests/errors/unknown_field.yaml", timeout=10)
    assert result.returncode == 2 and "not a regular file" in result.stderr


@pytest.mark.parametrize("kfunc, expected", [(True, "kfunc:tcp_sendmsg"), (False, "kprobe:tcp_sendmsg"),
                                             (None, "kfunc:tcp_sendmsg")])
def test_bpftrace_takes_the_kernel_span_variant_bpftrace_attaches(tmp_path, kfunc, expected):
    """A kernel with fentry where bpftrace attaches no kfunc probes (0.17 on Debian 11's 5.10, seen in
    the kernel matrix): the bpftrace build takes the kprobe variant, says so (W311), and check, which
    is for every backend, still takes fentry. Records without bpftrace's answer (None here: the key
    missing) keep the kernel's."""
    facts = json.loads(RECORDED.with_name("debian-6.1.json").read_text())
    if kfunc is None:
        facts["mechanisms"].pop("bpftrace_kfunc", None)
    else:
        facts["mechanisms"]["bpftrace_kfunc"] = kfunc
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    spec = "examples/send_latency/spec.yaml"
    out = tmp_path / "bundle"
    built = probec("build", spec, "--backend", "bpftrace", "--bpftrace-version", "0.17", "--target",
                   str(tmp_path / "facts.json"), "-o", str(out))
    assert built.returncode == 0, built.stderr
    script = next(out.glob("*.bt")).read_text()
    assert expected in script and script.count("tcp_sendmsg") == 2, script
    assert ("W311" in built.stderr) == (expected == "kprobe:tcp_sendmsg"), built.stderr
    checked = probec("check", "--target", str(tmp_path / "facts.json"), spec)
    assert checked.returncode == 0 and "W311" not in checked.stderr, checked.stderr


def test_an_fentry_probe_bpftrace_cannot_attach_says_why():
    d = Diagnostics()
    spec = load_spec_text(FENTRY_SPEC, "t.yaml", d)
    lower(spec, d, LoweringOptions(host=recorded(fentry=True, bpftrace_kfunc=False), backend="bpftrace"))
    [err] = [x for x in d.items if x.code == "E309"]
    assert "bpftrace here attaches no kfunc probes" in err.message
    assert not check(FENTRY_SPEC, recorded(fentry=True, bpftrace_kfunc=False)).has_errors()


FENTRY_SPEC = """
name: t
metrics:
  sends_total:
    count: fentry:tcp_sendmsg
"""
