"""Kernel tests: what changes under a running collector. A deploy replaces a traced library on disk;
the traced process exits and a new one takes its place. Both backends must keep counting exactly,
and say what happened in the health metrics and, once, in the log."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from conftest import WORKLOADS
from harness import Run, build, value, write_spec

pytestmark = pytest.mark.kernel


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(run: Run, port: int, name: str, want: float, timeout: float = 20, **labels) -> dict:
    """Scrape until NAME{labels} reads `want` (or the time is up: the caller's asserts then say why)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = run.scrape(port)
        if value(metrics, name, **labels) == want or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


NOP_SPEC = """
name: deployed
binaries:
  pwork: {lib}
metrics:
  nop_calls_total:
    count: uprobe:pwork:pwork_nop
"""


def deployed(tmp_path, backend):
    """pwork and libpwork.so copied to a deploy folder, and a bundle probing that copy."""
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    for name in ("pwork", "libpwork.so"):
        shutil.copy2(WORKLOADS / name, deploy / name)
    lib = deploy / "libpwork.so"
    return deploy, lib, build(write_spec(tmp_path, NOP_SPEC.format(lib=lib)), backend, tmp_path / "bundle")


def test_replaced_library_is_attached_again(tmp_path, backend):
    """rm and a fresh copy, as a deploy does: processes started before and after are both counted."""
    deploy, lib, bundle = deployed(tmp_path, backend)
    port = free_port()
    run = Run(bundle, tmp_path, port=port)
    try:
        subprocess.run([str(deploy / "pwork"), "nop", "1000"], check=True, timeout=60)
        lib.unlink()
        shutil.copy2(WORKLOADS / "libpwork.so", lib)
        wait_for(run, port, "probec_probe_reattached_total", 1, probe="uprobe_pwork_nop")
        subprocess.run([str(deploy / "pwork"), "nop", "500"], check=True, timeout=60)
        metrics = run.stop()
    finally:
        run.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    assert value(metrics, "nop_calls_total") == 1500
    assert value(metrics, "probec_probe_reattached_total", probe="uprobe_pwork_nop") == 1
    assert value(metrics, "probec_probe_attached", probe="uprobe_pwork_nop") == 1
    assert value(metrics, "probec_binary_rewritten_total", binary=str(lib)) == 0
    assert run.stderr().count("was replaced on disk") == 1


def test_library_changed_in_place_is_reported(tmp_path, backend):
    """cp over a traced file keeps its inode: nothing can make that safe, so it is said, once."""
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    lib = deploy / "libpwork.so"
    shutil.copy2(WORKLOADS / "libpwork.so", lib)
    bundle = build(write_spec(tmp_path, NOP_SPEC.format(lib=lib)), backend, tmp_path / "bundle")
    port = free_port()
    run = Run(bundle, tmp_path, port=port)
    try:
        for _ in range(2):    # no process runs it now, so this crashes nothing
            with open(lib, "r+b") as f:
                f.seek(0, 2)
                f.write(b"\0" * 16)
            wait_for(run, port, "probec_binary_rewritten_total", _ + 1, binary=str(lib))
        metrics = run.stop()
    finally:
        run.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    assert value(metrics, "probec_binary_rewritten_total", binary=str(lib)) == 2
    assert value(metrics, "probec_probe_reattached_total", probe="uprobe_pwork_nop") == 0
    assert run.stderr().count("was changed in place") == 1


def start_target(*args: str) -> tuple[subprocess.Popen, int]:
    """pwork --wait-stdin: it says its pid and waits for a line before doing its work."""
    proc = subprocess.Popen([str(WORKLOADS / "pwork"), "--wait-stdin", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("PID "), line
    return proc, int(line.split()[1])


def release(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(60) == 0


def write_pid_file(path, pid: int) -> None:
    part = path.with_suffix(".new")
    part.write_text(f"{pid}\n")
    part.rename(path)


FOLLOW_SPEC = """
name: follow
binaries:
  pwork: $WORK/libpwork.so
metrics:
  record_calls_total:
    count: uprobe:pwork:pwork_record
events:
  recorded:
    on: uprobe:pwork:pwork_record
    fields: {fields}
"""


def test_pid_file_follows_a_restarted_target(tmp_path, backend):
    """--pid-file: the target exits (reported), a new one starts and writes its pid: it is traced,
    and nothing else is; its events come through with their stacks."""
    # bpftrace 0.17 can exit while it symbolises the stack of a process that has just exited (W504)
    fields = "[arg0]" if backend == "bpftrace" else "[arg0, ustack]"
    bundle = build(write_spec(tmp_path, FOLLOW_SPEC.format(fields=fields)), backend, tmp_path / "bundle")
    pid_file = tmp_path / "service.pid"
    first, first_pid = start_target("record", *map(str, range(100, 130)))
    second = None
    write_pid_file(pid_file, first_pid)
    port = free_port()
    run = Run(bundle, tmp_path, "--pid-file", str(pid_file), port=port)
    try:
        assert value(run.scrape(port), "probec_target_pid") == first_pid
        subprocess.run([str(WORKLOADS / "pwork"), "record", "1", "2", "3"], check=True, timeout=60)   # not it
        release(first)
        metrics = wait_for(run, port, "probec_target_exits_total", 1)
        assert value(metrics, "probec_target_up") == 0
        second, second_pid = start_target("record", *map(str, range(200, 220)))
        write_pid_file(pid_file, second_pid)
        metrics = wait_for(run, port, "probec_target_pid", second_pid)
        assert value(metrics, "probec_target_up") == 1
        release(second)
        wait_for(run, port, "probec_target_exits_total", 2)
        metrics = run.stop()
    finally:
        run.kill()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    assert value(metrics, "record_calls_total") == 50
    assert value(metrics, "probec_target_exits_total") == 2
    assert value(metrics, "probec_target_pid") == second_pid
    assert value(metrics, "probec_backend_restarts_total") == 0
    events = run.events()
    assert sorted((e["pid"], e["arg0"]) for e in events) == \
        [(first_pid, v) for v in range(100, 130)] + [(second_pid, v) for v in range(200, 220)]
    if backend != "bpftrace":  # stacks read through the (reloaded, for core) object's view of the same map
        assert all(e["ustack"] for e in events), events[-1]
    log = run.stderr()
    assert log.count(f"target process {first_pid} exited") == 1
    assert log.count(f"following process {second_pid}") == 1
    assert "Traceback" not in log


FOLLOW_USDT_SPEC = """
name: follow_usdt
binaries:
  exe: $WORK/pwork
  lib: $WORK/libpwork.so
metrics:
  ticks_total:
    count: usdt:exe:pwork:tick
  tick_args_total:
    sum: arg0
    on: usdt:exe:pwork:tick
  lib_ticks_total:
    count: usdt:lib:pwork:lib_tick
"""


def test_pid_file_follows_usdt_probes_to_a_restarted_target(tmp_path, backend):
    """--pid-file with USDT probes, in the executable and in a library: they fire for the process
    named in the file only, before and after it restarts (bcc attaches them for each process)."""
    bundle = build(write_spec(tmp_path, FOLLOW_USDT_SPEC), backend, tmp_path / "bundle")
    pid_file = tmp_path / "service.pid"
    first, first_pid = start_target("usdt", "5")
    second = None
    write_pid_file(pid_file, first_pid)
    port = free_port()
    run = Run(bundle, tmp_path, "--pid-file", str(pid_file), port=port)
    try:
        subprocess.run([str(WORKLOADS / "pwork"), "usdt", "3"], check=True, timeout=60)   # not it
        release(first)
        wait_for(run, port, "probec_target_exits_total", 1)
        second, second_pid = start_target("usdt", "4")
        write_pid_file(pid_file, second_pid)
        wait_for(run, port, "probec_target_pid", second_pid)
        release(second)
        wait_for(run, port, "probec_target_exits_total", 2)
        metrics = run.stop()
    finally:
        run.kill()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    assert value(metrics, "ticks_total") == 9
    assert value(metrics, "tick_args_total") == sum(range(5)) + sum(range(4))
    assert value(metrics, "lib_ticks_total") == 9
    assert value(metrics, "probec_backend_restarts_total") == 0
    assert run.stderr().count(f"following process {second_pid}") == 1


def perf_links(pid: int) -> int:
    """Perf-event file descriptors of a process (one per uprobe a core runner holds)."""
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            count += os.readlink(f"{fd_dir}/{fd}") == "anon_inode:[perf_event]"
        except OSError:
            continue
    return count


def test_processes_on_the_replaced_library(tmp_path, backend):
    """A process that loaded the library before the deploy runs the old file to its end: core keeps
    its probes there and counts it, and so does bcc; bpftrace attaches to one file per path and says it
    no longer can."""
    deploy, lib, bundle = deployed(tmp_path, backend)
    port = free_port()
    run = Run(bundle, tmp_path, port=port)
    old = subprocess.Popen([str(deploy / "pwork"), "--wait-stdin", "nop", "700"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert old.stdout.readline().startswith("PID ")
        lib.unlink()
        shutil.copy2(WORKLOADS / "libpwork.so", lib)
        wait_for(run, port, "probec_probe_reattached_total", 1, probe="uprobe_pwork_nop")
        links_before = perf_links(run.proc.pid)
        release(old)
        subprocess.run([str(deploy / "pwork"), "nop", "500"], check=True, timeout=60)
        deadline = time.monotonic() + 10
        while perf_links(run.proc.pid) >= links_before and time.monotonic() < deadline:
            time.sleep(0.2)
        links_after = perf_links(run.proc.pid)
        metrics = run.stop()
    finally:
        run.kill()
        if old.poll() is None:
            old.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    assert value(metrics, "probec_probe_reattached_total", probe="uprobe_pwork_nop") == 1
    if backend != "bpftrace":
        assert value(metrics, "nop_calls_total") == 1200
        assert links_after == links_before - 1, "the old file's probe outlived the last process running it"
    else:
        assert value(metrics, "nop_calls_total") == 500
        assert run.stderr().count("processes still running the old") == 1


def test_a_replacement_without_the_symbol_is_reported_and_retried(tmp_path, backend):
    """A deploy puts a file without the probed function at the path: the probe reads as detached,
    the log says why once, and the next file there is attached to."""
    deploy, lib, bundle = deployed(tmp_path, backend)
    port = free_port()
    run = Run(bundle, tmp_path, port=port)
    try:
        subprocess.run([str(deploy / "pwork"), "nop", "100"], check=True, timeout=60)
        lib.unlink()
        shutil.copy2(WORKLOADS / "libinference.so", lib)        # no pwork_nop in it
        metrics = wait_for(run, port, "probec_probe_attached", 0, probe="uprobe_pwork_nop")
        assert value(metrics, "probec_probe_attached", probe="uprobe_pwork_nop") == 0
        time.sleep(1.5)                                           # retried at every interval, said once
        lib.unlink()
        shutil.copy2(WORKLOADS / "libpwork.so", lib)
        wait_for(run, port, "probec_probe_reattached_total", 1, probe="uprobe_pwork_nop")
        subprocess.run([str(deploy / "pwork"), "nop", "50"], check=True, timeout=60)
        metrics = run.stop()
    finally:
        run.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    assert value(metrics, "nop_calls_total") == 150
    assert value(metrics, "probec_probe_attached", probe="uprobe_pwork_nop") == 1
    assert value(metrics, "probec_probe_reattached_total", probe="uprobe_pwork_nop") == 1
    assert run.stderr().count("cannot be attached to the new file") == 1


def test_pid_target_exit_is_reported_and_nothing_else_is_traced(tmp_path, backend):
    """--pid: when the process exits, that is said (metric, one log line), and the probes do not
    fall back to tracing every process (bpftrace -p exits with its target and was restarted without it)."""
    bundle = build(write_spec(tmp_path, FOLLOW_SPEC.format(fields="[arg0]")), backend, tmp_path / "bundle")
    target, pid = start_target("record", "7", "8", "9")
    port = free_port()
    run = Run(bundle, tmp_path, "--pid", str(pid), port=port)
    try:
        release(target)
        metrics = wait_for(run, port, "probec_target_exits_total", 1)
        assert value(metrics, "probec_target_up") == 0
        time.sleep(1.5)      # a few intervals: a restarted bpftrace would be attached by now
        subprocess.run([str(WORKLOADS / "pwork"), "record", "1", "2"], check=True, timeout=60)
        metrics = run.stop()
    finally:
        run.kill()
        if target.poll() is None:
            target.kill()
        print(f"probec run stderr:\n{run.stderr()}")
    assert value(metrics, "record_calls_total") == 3
    assert value(metrics, "probec_target_exits_total") == 1
    assert value(metrics, "probec_target_pid") == pid
    assert value(metrics, "probec_backend_restarts_total") == 0
    assert sorted(e["arg0"] for e in run.events()) == [7, 8, 9]
    assert run.stderr().count(f"target process {pid} exited") == 1
