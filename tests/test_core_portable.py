"""Portable core bundles (issue 10): tracepoint fields read through the kernel's BTF record types,
mechanisms chosen when the bundle loads (ring buffer or perf buffer, task storage or hash,
bpf_get_current_task_btf or bpf_get_current_task, a `kernel:` span's fentry, kprobe or
fallback), and bundles run against a BTF cut for them.

This kernel has every mechanism, so the kernel tests force each fallback with
$PROBEC_PRETEND_MISSING and check that the numbers stay exact and that health and the start line
say which mechanism ran. The compiler tests build against recorded host facts: with the record
type in the facts (firecracker-6.18) fields are read through BTF, without it (debian-6.1,
recorded before probec knew record types) at checked offsets, and the manifest says which."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, probec, require_core_kernel
from harness import Run, build, value, workload, write_spec

HOSTS = ROOT / "tests" / "hosts"

PORTABLE_SPEC = """
name: portable
spans:
  w:                                # keyed by thread: task storage or the hash
    begin: syscall:write
    end: syscallret:write
    filter: comm == "pt_writer"
  request:                          # keyed by socket: socket(fd) reads the task's file table
    begin: {probe: tracepoint:sock:sock_recv_length, key: args.sk}
    end: {probe: syscall:sendto, key: socket(args.fd)}
    filter: comm == "ho_reader" && args.ret > 0
    restart: false
metrics:
  write_seconds:
    histogram: w.duration
    buckets: exp2(1us, 1s)
  written_bytes_total:
    sum: args.count                 # a syscall argument: args[2] of trace_event_raw_sys_enter
    on: syscall:write
    filter: comm == "pt_writer"
  write_results_total:
    sum: retval                     # trace_event_raw_sys_exit.ret
    on: syscallret:write
    filter: comm == "pt_writer"
  request_seconds:
    histogram: request.duration
    buckets: [2ms, 4ms, 8ms, 16ms, 32ms, 64ms]
events:
  write_done:                       # ring buffer or perf buffer
    on: w.end
    fields: [comm, duration, retval]
  write_sampled:                    # the sampling ticket and the rate count: atomic fetch, or add then read
    on: w.end
    fields: [retval]
    sample: 1/4, at most 1000/s
"""

WRITES, SIZE, ROUNDS = 40, 4096, 10


def drive() -> None:
    workload("pwork", "--comm", "pt_writer", "write", str(WRITES), str(SIZE))
    subprocess.run([sys.executable, str(ROOT / "tests" / "workloads" / "handoff.py"), str(ROUNDS),
                    "10000", "2000"], check=True, timeout=60)


def assert_exact(metrics: dict, run: Run) -> None:
    assert value(metrics, "write_seconds_count") == WRITES
    assert value(metrics, "written_bytes_total") == WRITES * SIZE
    assert value(metrics, "write_results_total") == WRITES * SIZE
    assert value(metrics, "request_seconds_count") == ROUNDS
    events = [e for e in run.events() if e["event"] == "write_done"]
    assert len(events) == WRITES and all(e["retval"] == SIZE and e["comm"] == "pt_writer" for e in events)
    # one writing thread: 1 in 4 exactly, with atomic fetch or with an add then a read
    assert len([e for e in run.events() if e["event"] == "write_sampled"]) == WRITES // 4
    assert value(metrics, "probec_events_lost_total") == 0


@pytest.fixture(scope="module")
def portable_bundle(tmp_path_factory) -> Path:
    require_core_kernel()
    tmp = tmp_path_factory.mktemp("portable")
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "workloads")], check=True, capture_output=True)
    return build(write_spec(tmp, PORTABLE_SPEC), "core", tmp / "bundle", "--kernel", "any")


FETCH = {"event_counters": "atomic_fetch_add"}
MISSING = {
    "": {"events": "ring_buffer", "span_begin_times": "task_storage", "current_task": "get_current_task_btf",
         **FETCH},
    "ring_buffer": {"events": "perf_buffer", "span_begin_times": "task_storage",
                    "current_task": "get_current_task_btf", **FETCH},
    "task_storage": {"events": "ring_buffer", "span_begin_times": "hash", "current_task": "get_current_task_btf",
                     **FETCH},
    # task storage needs a BTF task pointer: without the helper, the hash keeps the begin times
    "get_current_task_btf": {"events": "ring_buffer", "span_begin_times": "hash",
                             "current_task": "get_current_task", **FETCH},
    # kernels before 5.12 refuse the fetch instruction even in dead code: it is rewritten before load
    "atomic_fetch": {"events": "ring_buffer", "span_begin_times": "task_storage",
                     "current_task": "get_current_task_btf", "event_counters": "add_then_read"},
    "ring_buffer,task_storage,get_current_task_btf,atomic_fetch": {
        "events": "perf_buffer", "span_begin_times": "hash", "current_task": "get_current_task",
        "event_counters": "add_then_read"},
}


@pytest.mark.kernel
@pytest.mark.parametrize("missing", list(MISSING), ids=[m or "none" for m in MISSING])
def test_mechanisms_chosen_at_load_count_exactly(portable_bundle, tmp_path, monkeypatch, missing):
    """One bundle, built with --kernel any, on a kernel that has (or pretends not to have) each
    mechanism: the same exact counts every time, and health and the start line say what ran."""
    monkeypatch.setenv("PROBEC_PRETEND_MISSING", missing)
    run = Run(portable_bundle, tmp_path)
    try:
        drive()
        metrics = run.stop()
    finally:
        run.kill()
    assert_exact(metrics, run)
    expected = dict(MISSING[missing], tracepoint_fields="btf")
    used = {dict(k)["feature"]: dict(k)["mechanism"] for k, v in metrics["probec_mechanism"].items() if v == 1}
    assert used == expected
    start = next(line for line in run.stderr().splitlines() if ": attached (core)" in line)
    assert all(f"{feature}: {mechanism}" in start for feature, mechanism in expected.items()), start
    if expected["span_begin_times"] == "hash":
        assert value(metrics, "probec_map_capacity", map="span_w_begin") > 1
        assert "span_w_task" not in {dict(k)["map"] for k in metrics["probec_map_capacity"]}
    else:
        assert "span_w_begin" not in {dict(k)["map"] for k in metrics["probec_map_capacity"]}


@pytest.mark.kernel
def test_unknown_pretended_feature_is_refused(portable_bundle, tmp_path):
    r = probec("run", str(portable_bundle), "--port", "0", "--duration", "1",
               env={**os.environ, "PROBEC_PRETEND_MISSING": "ringbuf"})
    assert r.returncode == 1 and "PROBEC_PRETEND_MISSING names ringbuf" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.kernel
def test_pretending_fentry_missing_runs_the_next_variant(tmp_path, monkeypatch):
    """PROBEC_PRETEND_MISSING=fentry: the loader passes over the fentry/fexit variant of a
    `kernel:` span without trying it, as on a kernel that refuses function tracing, and runs the
    next variant that attaches: kprobe where the kernel has kprobes, else (as here, no
    CONFIG_KPROBES) the spec's fallback. The log, the start line and probec_mechanism say which
    ran and why, and the counts are exact (examples/send_latency on its workload)."""
    from probec.host.features import kprobes_available
    require_core_kernel()
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples" / "workloads")], check=True, capture_output=True)
    bundle = build(ROOT / "examples" / "send_latency" / "spec.yaml", "core", tmp_path / "bundle", "--kernel", "any")
    expected = "kprobe:tcp_sendmsg" if kprobes_available() else "syscall:sendto"
    monkeypatch.setenv("PROBEC_PRETEND_MISSING", "fentry")
    n, m = 50, 2
    run = Run(bundle, tmp_path)
    try:
        subprocess.run([str(ROOT / "examples" / "workloads" / "build" / "sendlat"), str(n), "1000", str(m), "5"],
                       check=True, capture_output=True, timeout=60)
        metrics = run.stop()
    finally:
        run.kill()
    assert value(metrics, "send_duration_seconds_count", comm="sl_client") == n + m
    assert value(metrics, "send_duration_seconds_count", comm="sl_server") == m
    stderr = run.stderr()
    # fentry was never tried (without the setting, it is tried and refused: "load of ...: EPERM" here)
    assert ("span_send: using " + expected + " on this kernel (not fentry:tcp_sendmsg "
            "(not tried: PROBEC_PRETEND_MISSING=fentry)") in stderr, stderr
    if expected == "syscall:sendto":
        assert "kprobe:tcp_sendmsg (attach of kernel:tcp_sendmsg: " in stderr, stderr   # tried, refused here
    used = {dict(k)["feature"]: dict(k)["mechanism"] for k, v in metrics["probec_mechanism"].items() if v == 1}
    assert used["span_send"] == expected, used
    start = next(line for line in stderr.splitlines() if ": attached (core)" in line)
    assert f"span_send: {expected}" in start, start


@pytest.mark.kernel
def test_pretending_fentry_missing_refuses_a_probe_that_needs_it(tmp_path):
    """An fentry/fexit probe outside a `kernel:` span has nothing to fall to: the run refuses,
    naming the probe and the setting, and attaches nothing."""
    require_core_kernel()
    bundle = build(ROOT / "tests" / "kernels" / "specs" / "send_fentry.yaml", "core", tmp_path / "bundle",
                   "--kernel", "any")
    r = probec("run", str(bundle), "--port", "0", "--duration", "1",
               env={**os.environ, "PROBEC_PRETEND_MISSING": "fentry"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "fentry:tcp_sendmsg" in r.stderr and "PROBEC_PRETEND_MISSING=fentry takes away" in r.stderr, r.stderr


@pytest.mark.kernel
def test_a_bundle_runs_on_the_btf_cut_for_it(portable_bundle, tmp_path):
    """`probec btf` cuts what the bundle's relocations read from the kernel's BTF; `probec run
    --btf` resolves them against that file alone and counts exactly."""
    cut = tmp_path / "portable.btf"
    r = probec("btf", str(portable_bundle), "-o", str(cut))
    assert r.returncode == 0, r.stderr
    size = cut.stat().st_size
    assert 0 < size < Path("/sys/kernel/btf/vmlinux").stat().st_size // 100
    dump = subprocess.run(["bpftool", "btf", "dump", "file", str(cut)], capture_output=True, text=True,
                          check=True).stdout
    for record in ("trace_event_raw_sys_enter", "trace_event_raw_sys_exit", "trace_event_raw_sock_msg_length",
                   "task_struct", "files_struct"):
        assert f"STRUCT '{record}'" in dump, record
    run = Run(portable_bundle, tmp_path, "--btf", str(cut))
    try:
        drive()
        metrics = run.stop()
    finally:
        run.kill()
    assert_exact(metrics, run)


OTHER_SPEC = """
name: other
metrics:
  switches_total:
    count: tracepoint:sched:sched_switch
    filter: args.next_pid == 1
"""


@pytest.mark.kernel
def test_a_relocation_that_does_not_resolve_names_its_field(portable_bundle, tmp_path):
    """Run against a BTF that lacks the record type (one cut for another bundle): the load fails
    before anything attaches, naming the probe, the tracepoint and the field."""
    other = build(write_spec(tmp_path, OTHER_SPEC, "other.yaml"), "core", tmp_path / "other", "--kernel", "any")
    cut = tmp_path / "other.btf"
    assert probec("btf", str(other), "-o", str(cut)).returncode == 0
    r = probec("run", str(portable_bundle), "--port", "0", "--duration", "1", "--btf", str(cut))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "which this kernel's BTF does not have" in r.stderr and "nothing is attached" in r.stderr, r.stderr
    line = next(line for line in r.stderr.splitlines() if "does not have" in line)
    # the verifier stops at the first unresolved one: a field of a tracepoint of this bundle
    assert "reads tracepoint syscalls:sys_" in line or "reads tracepoint sock:sock_recv_length" in line, line
    assert "trace_event_raw_" in line


# -- compiler: which fields go through BTF, which at offsets -----------------------------------------
def built_core(tmp_path: Path, host: str, text: str = PORTABLE_SPEC) -> tuple[dict, str]:
    spec = write_spec(tmp_path, text)
    out = tmp_path / host
    r = probec("build", "--target", str(HOSTS / f"{host}.json"), "--backend", "core", "--no-compile", "-o",
               str(out), str(spec))
    assert r.returncode == 0, r.stderr
    return json.loads((out / "manifest.json").read_text()), (out / "portable.bpf.c").read_text()


def test_fields_go_through_btf_record_types_where_the_facts_name_them(tmp_path):
    manifest, source = built_core(tmp_path, "firecracker-6.18")
    fields = {(c["tracepoint"], c["field"]): (c["btf_type"], c["member"])
              for c in manifest["core"]["tracepoint_fields"]}
    assert fields[("syscalls:sys_enter_write", "count")] == ("trace_event_raw_sys_enter", "args[2]")
    assert fields[("syscalls:sys_exit_write", "ret")] == ("trace_event_raw_sys_exit", "ret")
    assert fields[("sock:sock_recv_length", "sk")] == ("trace_event_raw_sock_msg_length", "sk")
    assert "((struct trace_event_raw_sys_enter___probec *)ctx)->args[2]" in source
    record = source.split("struct trace_event_raw_sock_msg_length___probec {\n", 1)[1].split("}", 1)[0]
    assert sorted(record.splitlines()) == ["\t__s32 ret;", "\tconst void *sk;"]   # only the members read
    assert "(char *)ctx +" not in source


SYSCALL_FIELDS_SPEC = """
name: portable
metrics:
  written_bytes_total:
    sum: args.count
    on: syscall:write
  write_results_total:
    sum: retval
    on: syscallret:write
"""


def test_fields_fall_back_to_checked_offsets_without_record_types(tmp_path):
    manifest, source = built_core(tmp_path, "debian-6.1", SYSCALL_FIELDS_SPEC)   # recorded without record types
    checks = manifest["core"]["tracepoint_fields"]
    assert checks and all(c["btf_type"] == "" and c["member"] == "" for c in checks)
    count = next(c for c in checks if c["field"] == "count")
    assert f"(char *)ctx + {count['offset']}" in source and {c["field"] for c in checks} == {"count", "ret"}
    assert "___probec" not in source
