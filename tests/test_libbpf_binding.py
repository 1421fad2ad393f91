"""Tests for probec.runtime.libbpf, the ctypes binding over libbpf.so.1.

They load and attach real programs (tests/bpf/binding_test.bpf.c) on this
kernel; run them serialised with other kernel tests:

    flock /tmp/probec-kernel.lock python3 -m pytest tests/test_libbpf_binding.py
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from ctypes import sizeof
from pathlib import Path

import pytest

from probec.runtime import libbpf as L
from probec.runtime.libbpf import ffi

HERE = Path(__file__).parent / "bpf"
BPF_SRC = HERE / "binding_test.bpf.c"
TARGET_SRC = HERE / "target.c"
ZERO = struct.pack("<I", 0)

# indices into the `counters` ARRAY map (see binding_test.bpf.c)
RAW_TP, TP_BTF, UPROBE, URETPROBE, UPROBE_ARG_SUM, URET_SUM, USDT, USDT_ARG_SUM, PERF, KPROBE = range(10)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to load BPF programs"
    for tool in ("clang", "gcc"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        return "libbpf-dev headers missing (apt-get install libbpf-dev)"
    if not any(Path(p, "sys/sdt.h").exists() for p in ("/usr/include", "/usr/include/x86_64-linux-gnu")):
        return "sys/sdt.h missing (apt-get install systemtap-sdt-dev)"
    try:
        L.libbpf_version()
    except L.LibbpfMissing as exc:
        return str(exc)
    return None


pytestmark = [pytest.mark.kernel, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    if not os.path.ismount("/sys/kernel/tracing"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=True)
    out = tmp_path_factory.mktemp("libbpf_binding")
    obj = out / "binding_test.bpf.o"
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86",
         "-I/usr/include/x86_64-linux-gnu", "-c", str(BPF_SRC), "-o", str(obj)],
        check=True,
    )
    target = out / "target"
    subprocess.run(["gcc", "-O2", "-g", "-o", str(target), str(TARGET_SRC)], check=True)
    return {"obj": obj, "target": target, "dir": out}


def open_loaded(build, target_pid: int | None = None, **max_entries) -> L.BpfObject:
    obj = L.BpfObject.open(build["obj"])
    obj.set_rodata("target_pid", struct.pack("<I", os.getpid() if target_pid is None else target_pid))
    obj.set_autoload("rejected_by_verifier", False)
    for name, n in max_entries.items():
        obj.set_max_entries(name, n)
    obj.load()
    return obj


def u64(b: bytes) -> int:
    return struct.unpack("<Q", b)[0]


def percpu_sum(values: list[bytes]) -> int:
    return sum(u64(v) for v in values)


def counter(obj: L.BpfObject, idx: int) -> int:
    return u64(obj.map("counters").lookup(struct.pack("<I", idx)))


def getpid_calls(n: int) -> None:
    getpid = os.getpid  # glibc >= 2.25 does not cache: every call is a syscall
    for _ in range(n):
        getpid()


# ---------------------------------------------------------------- basics


def test_version_and_cpus():
    assert L.libbpf_version().startswith("v1.")
    assert L.num_possible_cpus() >= len(L.online_cpus()) >= 1


def test_struct_mirrors_match_c_headers(tmp_path):
    src = tmp_path / "sizes.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/perf_event.h>\n"
        "#include <bpf/libbpf.h>\n#include <bpf/bpf.h>\n"
        "int main(void){printf(\"%zu %zu %zu %zu %zu %zu %zu\\n\","
        "sizeof(struct bpf_prog_info), offsetof(struct bpf_prog_info, run_time_ns),"
        "offsetof(struct bpf_prog_info, recursion_misses),"
        "sizeof(struct bpf_uprobe_opts), offsetof(struct bpf_uprobe_opts, func_name),"
        "sizeof(struct bpf_usdt_opts), sizeof(struct bpf_map_batch_opts));return 0;}\n"
    )
    exe = tmp_path / "sizes"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == [
        sizeof(ffi.BpfProgInfo), ffi.BpfProgInfo.run_time_ns.offset, ffi.BpfProgInfo.recursion_misses.offset,
        sizeof(ffi.UprobeOpts), ffi.UprobeOpts.func_name.offset,
        sizeof(ffi.UsdtOpts), sizeof(ffi.MapBatchOpts),
    ]


def test_open_missing_file_is_bpf_error(tmp_path):
    with pytest.raises(L.BpfError) as info:
        L.BpfObject.open(tmp_path / "nope.bpf.o")
    assert info.value.errno == errno.ENOENT
    assert "ENOENT" in str(info.value) and "nope.bpf.o" in str(info.value)


def test_object_inventory_and_rodata_layout(build):
    with L.BpfObject.open(build["obj"]) as obj:
        assert {"count_getpid", "on_target_fn", "on_tick", "on_cpu_clock"} <= set(obj.programs)
        assert obj.program("count_getpid").section_name == "tp/syscalls/sys_enter_getpid"
        assert obj.rodata_variables() == {"target_pid": (0, 4), "tag": (8, 8)}
        obj.set_rodata("tag", struct.pack("<Q", 0x1122334455667788))
        obj.write_rodata(0, struct.pack("<I", 4242))
        assert obj.rodata_buffer() == struct.pack("<IIQ", 4242, 0, 0x1122334455667788)
        with pytest.raises(ValueError):
            obj.set_rodata("target_pid", b"\x00" * 8)
        with pytest.raises(KeyError, match="target_pid"):
            obj.set_rodata("no_such_var", b"\x00")
        with pytest.raises(KeyError, match="calls_by_tid"):
            obj.map("no_such_map")


def test_settings_after_load_are_refused(build):
    with open_loaded(build, calls_by_tid=2048) as obj:
        m = obj.map("calls_by_tid")
        assert (m.type, m.key_size, m.value_size, m.max_entries) == (L.MapType.HASH, 4, 8, 2048)
        assert obj.map("hist").is_percpu and obj.map("hist").max_entries == 64
        # .rodata is frozen and mapped read-only after load: writing must raise, not crash
        with pytest.raises(L.BpfError, match="already loaded"):
            obj.write_rodata(0, b"\x01\x00\x00\x00")
        with pytest.raises(L.BpfError, match="already loaded"):
            obj.set_max_entries("hist", 128)
        assert obj.rodata_buffer()[:4] == struct.pack("<I", os.getpid())
    with pytest.raises(L.BpfError, match="closed"):
        obj.map("hist").fd


# ---------------------------------------------------------------- tracepoint + maps + ring buffer


def test_tracepoint_counts_exactly(build):
    n = 500
    with open_loaded(build) as obj:
        events: list[bytes] = []
        rb = L.RingBuffer(obj.map("events"), events.append)
        link = obj.program("count_getpid").attach_tracepoint("syscalls", "sys_enter_getpid")
        getpid_calls(n)
        percpu = obj.map("calls_percpu").lookup(ZERO)
        assert isinstance(percpu, list) and len(percpu) == L.num_possible_cpus()
        assert percpu_sum(percpu) == n
        tid = struct.pack("<I", threading.get_native_id())
        assert u64(obj.map("calls_by_tid").lookup(tid)) == n
        assert obj.map("calls_by_tid").count_entries() == 1
        while rb.consume():
            pass
        assert len(events) == n
        decoded = [struct.unpack("<IIQ", e) for e in events]
        assert {(pid, t) for pid, t, _ in decoded} == {(os.getpid(), threading.get_native_id())}
        assert [seq for _, _, seq in decoded] == list(range(n))
        link.destroy()
        rb.close()


def test_link_destroy_stops_counting_and_is_idempotent(build):
    with open_loaded(build) as obj:
        link = obj.program("count_getpid").attach()
        assert link.fd >= 0 and obj.links == [link]
        getpid_calls(100)
        link.destroy()
        assert link.destroyed and obj.links == []
        getpid_calls(100)
        assert percpu_sum(obj.map("calls_percpu").lookup(ZERO)) == 100
        link.destroy()  # second destroy is a no-op: nothing freed twice, nothing counting again
        getpid_calls(100)
        assert link.destroyed and obj.links == [] and percpu_sum(obj.map("calls_percpu").lookup(ZERO)) == 100


def test_object_close_destroys_links_first(build):
    obj = open_loaded(build)
    links = [obj.program("count_getpid").attach(), obj.program("count_raw_sys_enter").attach()]
    obj.close()
    assert all(link.destroyed for link in links)
    obj.close()     # a second close is a no-op: libbpf frees nothing twice
    assert all(link.destroyed for link in links) and obj.links == []


def test_batch_lookup_equals_per_key_lookup(build):
    n = 200
    with open_loaded(build) as obj:
        with obj.program("count_getpid").attach():
            getpid_calls(n)
        hist = obj.map("hist")
        batch, per_key = hist.items_batch(), hist.items()
        assert len(batch) == 64 and batch == per_key
        assert [percpu_sum(v) for _, v in batch] == [n // 64 + (i < n % 64) for i in range(64)]
        assert hist.items_batch(chunk=5) == per_key  # several batch rounds

        # a HASH map filled from user space, walked in small batches
        h = obj.map("calls_by_tid")
        h.delete(struct.pack("<I", threading.get_native_id()))
        for k in range(300):
            h.update(struct.pack("<I", k), struct.pack("<Q", k * k))
        assert sorted(h.items_batch(chunk=7)) == sorted(h.items())
        assert h.count_entries() == 300
        assert h.delete(struct.pack("<I", 7)) is True
        assert h.delete(struct.pack("<I", 7)) is False
        assert h.lookup(struct.pack("<I", 7)) is None
        assert u64(h.lookup(struct.pack("<I", 9))) == 81
        assert len(h.items_batch()) == 299
        with pytest.raises(L.BpfError) as info:
            h.update(struct.pack("<I", 9), struct.pack("<Q", 0), flags=L.BPF_NOEXIST)
        assert info.value.errno == errno.EEXIST
        with pytest.raises(ValueError):
            h.lookup(b"\x00")


def test_percpu_update_roundtrip(build):
    with open_loaded(build) as obj:
        hist = obj.map("hist")
        ncpu = L.num_possible_cpus()
        values = [struct.pack("<Q", 1000 + cpu) for cpu in range(ncpu)]
        hist.update(struct.pack("<I", 3), values)
        assert hist.lookup(struct.pack("<I", 3)) == values
        assert hist.value_buffer_size == 8 * ncpu
        with pytest.raises(ValueError):
            hist.update(struct.pack("<I", 3), values[:-1] if ncpu > 1 else values * 2)


def test_ring_buffer_callback_exception_is_reraised(build):
    n = 10
    with open_loaded(build) as obj:
        got: list[bytes] = []

        def callback(data: bytes) -> None:
            if len(got) == 3 and not getattr(callback, "raised", False):
                callback.raised = True
                raise RuntimeError("boom in callback")
            got.append(data)

        with obj.program("count_getpid").attach(), L.RingBuffer(obj.map("events"), callback) as rb:
            getpid_calls(n)
            with pytest.raises(RuntimeError, match="boom"):
                rb.poll(100)
            while rb.poll(10):
                pass
        assert len(got) == n - 1  # the sample whose callback raised is consumed


# ---------------------------------------------------------------- rodata filter


def test_rodata_target_pid_filters_by_pid(build):
    k = 321
    child = subprocess.Popen([str(build["target"]), "getpid", str(k)], stdin=subprocess.PIPE)
    try:
        with open_loaded(build, target_pid=child.pid) as obj:
            with obj.program("count_getpid").attach():
                getpid_calls(1000)  # ours: filtered out
                child.communicate(b"go\n", timeout=10)
                assert child.returncode == 0
            assert percpu_sum(obj.map("calls_percpu").lookup(ZERO)) == k
            assert [u64(v) for _, v in obj.map("calls_by_tid").items()] == [k]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# ---------------------------------------------------------------- other attach kinds


def test_raw_tp_and_tp_btf_auto_attach(build):
    n = 300
    with open_loaded(build) as obj:
        links = [obj.attach("count_raw_sys_enter"), obj.attach("count_btf_sys_enter")]
        getpid_calls(n)
        for link in links:
            link.destroy()
        raw, btf = counter(obj, RAW_TP), counter(obj, TP_BTF)
        # every syscall of this process counts: the n getpid calls plus a few others
        assert n <= raw < n + 50 and n <= btf < n + 50
        with obj.program("count_raw_sys_enter").attach_raw_tracepoint("sys_enter"):
            getpid_calls(n)
        assert counter(obj, RAW_TP) >= raw + n


def test_uprobe_uretprobe_usdt_exact(build):
    n = 200
    target = str(build["target"])
    with open_loaded(build) as obj:
        obj.program("on_target_fn").attach_uprobe(target, "target_fn")
        obj.program("on_target_fn_ret").attach_uprobe(target, "target_fn", retprobe=True)
        obj.program("on_tick").attach_usdt(target, "probec", "tick")
        subprocess.run([target, "calls", str(n)], check=True)
        tri = n * (n + 1) // 2
        assert counter(obj, UPROBE) == n and counter(obj, UPROBE_ARG_SUM) == tri
        assert counter(obj, URETPROBE) == n and counter(obj, URET_SUM) == 2 * tri
        assert counter(obj, USDT) == n and counter(obj, USDT_ARG_SUM) == tri
        assert len(obj.links) == 3


def test_uprobe_pid_filter(build):
    target = str(build["target"])
    with open_loaded(build) as obj:
        # attached to this process only: the child's calls do not count
        obj.program("on_target_fn").attach_uprobe(target, "target_fn", pid=os.getpid())
        subprocess.run([target, "calls", "50"], check=True)
        assert counter(obj, UPROBE) == 0


def test_uprobe_missing_symbol_names_it(build):
    with open_loaded(build) as obj:
        with pytest.raises(L.BpfError) as info:
            obj.program("on_target_fn").attach_uprobe(build["target"], "no_such_symbol_xyz")
        exc = info.value
        assert exc.errno == errno.ENOENT
        assert "no_such_symbol_xyz" in str(exc)
        assert any("no_such_symbol_xyz" in line for line in exc.log)  # libbpf's own words
        with pytest.raises(L.BpfError, match="nosuch:probe"):
            obj.program("on_tick").attach_usdt(build["target"], "nosuch", "probe")


def test_kprobe_attach_fails_readably_without_kprobes(build):
    has_kprobes = any(
        os.path.exists(p)
        for p in ("/sys/bus/event_source/devices/kprobe/type", "/sys/kernel/tracing/kprobe_events")
    )
    with open_loaded(build) as obj:
        prog = obj.program("on_kprobe")
        if has_kprobes:  # another kernel: it must simply work
            prog.attach_kprobe("do_nanosleep").destroy()
            return
        with pytest.raises(L.BpfError) as info:
            prog.attach_kprobe("do_nanosleep")
        text = str(info.value)
        assert info.value.errno == errno.ENOENT
        assert "kprobe:do_nanosleep" in text and "ENOENT (No such file or directory)" in text
        assert "tracepoint" in info.value.hint


def test_verifier_rejection_carries_the_log(build):
    with L.BpfObject.open(build["obj"]) as obj:
        assert obj.program("rejected_by_verifier").autoload
        with pytest.raises(L.BpfError) as info:
            obj.load()
    exc = info.value
    assert exc.errno == errno.EACCES
    text = "\n".join(exc.log)
    assert "rejected_by_verifier" in text
    assert "BEGIN PROG LOAD LOG" in text and "invalid mem access" in text
    assert "invalid mem access" in str(exc)


def test_the_log_survives_another_print_callback_in_the_process(build):
    """BCC's module sets its own callback on the same libbpf.so.1 when it loads a program (the
    collector may run a bcc and a core bundle in one process); our load takes the callback back."""
    from probec.runtime.libbpf import ffi
    seen = []
    other = ffi.PRINT_FN(lambda level, fmt, args: seen.append(level) or 0)
    ffi.lib().libbpf_set_print(other)
    try:
        with L.BpfObject.open(build["obj"]) as obj:
            with pytest.raises(L.BpfError) as info:
                obj.load()
        assert "invalid mem access" in "\n".join(info.value.log)
    finally:
        ffi.lib().libbpf_set_print(ffi._print_callback)


def test_profile_cpu_clock_per_cpu(build):
    with open_loaded(build) as obj:
        group = obj.program("on_cpu_clock").attach_cpu_clock(1000)
        assert len(group) == len(L.online_cpus())
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            pass
        group.destroy()
        ticks = counter(obj, PERF)
        assert ticks >= 50  # ~200 expected on the busy CPU alone
        time.sleep(0.05)
        assert counter(obj, PERF) == ticks
        group.destroy()


def test_run_time_stats(build):
    n = 1000
    with open_loaded(build) as obj:
        prog = obj.program("count_getpid")
        stats_fd = L.enable_stats()
        try:
            before = L.program_info(prog)
            with prog.attach():
                getpid_calls(n)
            after = prog.info()
        finally:
            os.close(stats_fd)
        assert after.name == "count_getpid" and after.id == before.id and after.verified_insns > 0
        assert after.run_cnt - before.run_cnt >= n  # other processes' getpid count too
        assert after.run_time_ns > before.run_time_ns
        assert after.recursion_misses == 0


def test_log_capture_does_not_leak_between_calls(build):
    with open_loaded(build) as obj:
        with pytest.raises(L.BpfError) as first:
            obj.program("on_target_fn").attach_uprobe(build["target"], "first_missing")
        with pytest.raises(L.BpfError) as second:
            obj.program("on_target_fn").attach_uprobe(build["target"], "second_missing")
        assert not any("second_missing" in line for line in first.value.log)
        assert not any("first_missing" in line for line in second.value.log)
        assert any("second_missing" in line for line in L.recent_log_lines(20))


# ---------------------------------------------------------------- missing or old libbpf


def _import_with_libbpf(path: str) -> str:
    """Load the binding in a fresh interpreter against another libbpf; return its error."""
    code = (
        "from probec.runtime import libbpf as L\n"
        "try:\n    L.libbpf_version()\nexcept L.LibbpfMissing as e:\n    print(e)\n"
        "else:\n    print('no error')\n"
    )
    env = dict(os.environ, PROBEC_LIBBPF=path)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_missing_libbpf_says_what_to_install(tmp_path):
    out = _import_with_libbpf(str(tmp_path / "libbpf.so.1"))
    assert "not found: apt-get install libbpf1" in out


@pytest.mark.parametrize(
    "major, minor, expected",
    [(0, 8, "needs libbpf >= 1.0, found 0.8"), (1, 0, "lacks bpf_object__open_file(): needs libbpf >= 1.0")],
)
def test_old_or_incomplete_libbpf_is_named(tmp_path, major, minor, expected):
    src = tmp_path / "fake.c"
    src.write_text(
        f"unsigned libbpf_major_version(void) {{ return {major}; }}\n"
        f"unsigned libbpf_minor_version(void) {{ return {minor}; }}\n"
        "const char *libbpf_version_string(void) { return \"fake\"; }\n"
        "int libbpf_strerror(int e, char *b, unsigned long n) { return 0; }\n"
        "void *libbpf_set_print(void *fn) { return 0; }\n"
        "int libbpf_num_possible_cpus(void) { return 1; }\n"
    )
    lib = tmp_path / "libbpf.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    assert expected in _import_with_libbpf(str(lib))
