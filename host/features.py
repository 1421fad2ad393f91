"""What this kernel can trace, found by trying rather than by version numbers."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import shutil
import subprocess
from pathlib import Path

from .btf import load_btf, tracepoint_type
from .tracefs import TRACEFS_ROOTS, FormatField, available_events, read_format, tracefs_root

HOST_FACTS_VERSION = 1
BTF_PATH = "/sys/kernel/btf/vmlinux"

BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24


@functools.lru_cache(maxsize=1)
def probe_fentry() -> bool | None:
    """Load a do-nothing fentry program. True/False when known; None when it cannot be tried
    (not root, no libbpf)."""
    if os.geteuid() != 0:
        return None
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        return None
    find = lib.libbpf_find_vmlinux_btf_id
    find.argtypes, find.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_int
    btf_id = find(b"do_nanosleep", BPF_TRACE_FENTRY)
    if btf_id < 0:
        btf_id = find(b"hrtimer_nanosleep", BPF_TRACE_FENTRY)
    if btf_id < 0:
        return False

    class Opts(ctypes.Structure):  # struct bpf_prog_load_opts (libbpf 1.x), the fields we use
        _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_int),
                    ("prog_btf_fd", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                    ("prog_ifindex", ctypes.c_uint32), ("kern_version", ctypes.c_uint32),
                    ("attach_btf_id", ctypes.c_uint32), ("attach_prog_fd", ctypes.c_uint32),
                    ("attach_btf_obj_fd", ctypes.c_uint32), ("fd_array", ctypes.c_void_p),
                    ("func_info", ctypes.c_void_p), ("func_info_cnt", ctypes.c_uint32),
                    ("func_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_void_p),
                    ("line_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                    ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                    ("log_buf", ctypes.c_char_p), ("log_true_size", ctypes.c_uint32)]

    insns = (ctypes.c_uint64 * 2)(0x00000000000000B7, 0x0000000000000095)  # r0 = 0; exit
    opts = Opts(sz=ctypes.sizeof(Opts), expected_attach_type=BPF_TRACE_FENTRY, attach_btf_id=btf_id)
    load = lib.bpf_prog_load
    load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                     ctypes.POINTER(Opts)]
    load.restype = ctypes.c_int
    fd = load(BPF_PROG_TYPE_TRACING, b"probec_probe", b"GPL", insns, 2, ctypes.byref(opts))
    if fd < 0:
        return False
    os.close(fd)
    return True


def kprobes_available(tracefs: Path | None = None) -> bool:
    """Kprobes exist when the kernel offers the kprobe PMU or a kprobe_events file in tracefs."""
    if os.path.exists("/sys/bus/event_source/devices/kprobe"):
        return True
    roots = [tracefs] if tracefs is not None else [Path(r) for r in TRACEFS_ROOTS]
    return any(os.path.exists(root / "kprobe_events") for root in roots)   # False, not EACCES, where unreadable


def kernel_functions() -> set[str] | None:
    """Names of kernel text symbols from /proc/kallsyms, or None when they cannot be read."""
    names: set[str] = set()
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in ("t", "T"):
                    names.add(parts[2])
    except OSError:
        return None
    return names or None


@functools.lru_cache(maxsize=1)
def bpftrace_kfunc() -> bool | None:
    """Whether bpftrace itself will attach kfunc (fentry) probes here, as `bpftrace --info` says:
    0.17 says no on Debian 11's 5.10, whose kernel loads fentry programs. None when unknown."""
    exe = shutil.which("bpftrace")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        name, _, value = line.strip().partition(":")
        if name.strip() == "kfunc":
            return value.strip() == "yes"
    return None


def tool_version(tool: str) -> str | None:
    """The first line `TOOL --version` prints (the path where it prints nothing), or None when
    the tool is not installed."""
    exe = shutil.which(tool)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return exe
    first = out.strip().splitlines()[0] if out.strip() else exe
    return first


def _libbpf_version() -> str | None:
    try:
        lib = ctypes.CDLL("libbpf.so.1")
    except OSError:
        return None
    lib.libbpf_major_version.restype = ctypes.c_uint32
    lib.libbpf_minor_version.restype = ctypes.c_uint32
    return f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}"


def host_facts(kernel_symbols: bool = True) -> dict:
    """What this machine can trace, as `probec doctor --format json` records it: the facts that
    `probec check --target FILE` checks a spec against on another machine. Unknown facts are null."""
    root = tracefs_root()
    tracepoints: dict[str, list] | None = None
    types: dict[str, str] | None = None
    btf = load_btf(BTF_PATH)
    if root is not None:
        names = available_events(root)
        if names is not None:
            tracepoints = {}
            for tp in sorted(names):
                category, _, name = tp.partition(":")
                fields = read_format(root, category, name)
                tracepoints[tp] = None if fields is None else [f.to_list() for f in fields.values()]
            if btf is not None:
                types = {}
                for tp, rows in tracepoints.items():
                    category, _, name = tp.partition(":")
                    record = None if rows is None else tracepoint_type(
                        btf, category, name, {r[0]: FormatField.from_list(r) for r in rows})
                    if record:
                        types[tp] = record
    functions = kernel_functions() if kernel_symbols else None
    return {
        "probec_host_facts": HOST_FACTS_VERSION,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "btf": os.path.exists("/sys/kernel/btf/vmlinux"),
        "mechanisms": {
            "tracepoint": True if root is not None else None,
            "uprobe": os.path.exists("/sys/bus/event_source/devices/uprobe"),
            "kprobe": kprobes_available(root),
            "fentry": probe_fentry(),
            "bpftrace_kfunc": bpftrace_kfunc(),
        },
        "tools": {tool: tool_version(tool) for tool in ("bpftrace", "clang", "bpftool")} | {"libbpf": _libbpf_version()},
        "tracepoints": tracepoints,
        "tracepoint_types": types,           # BTF record type of each tracepoint, where BTF tells
        "kernel_functions": sorted(functions) if functions is not None else None,
        "privileges": privileges(),
    }


def privileges() -> dict:
    """The capabilities `probec run` needs on this kernel (for any probe kind), which this process
    has, and which it lacks; doctor's `privileges` record."""
    from .capabilities import (effective_capabilities, memlock_matters, run_privileges, seccomp_filtered,
                               uprobes_need_sys_admin)
    need = run_privileges()
    have = effective_capabilities()
    return {
        "uid": need.uid,
        "capabilities": sorted(have) if have is not None else None,
        "needed": list(need.needed),
        "missing": list(need.missing),
        "why": need.why,
        "uprobes_need_sys_admin": uprobes_need_sys_admin(),
        "memlock_matters": memlock_matters(),
        "bpftrace": need.bpftrace or "runs",
        "seccomp_filtered": seccomp_filtered(),
    }


def doctor_report() -> str:
    rows = [("kernel", platform.release())]
    rows.append(("uid", str(os.geteuid())))
    p = privileges()
    held = set(p["capabilities"] or ())
    rows.append(("capabilities held", ", ".join(c for c in p["needed"] if c in held) or "none of those needed"))
    rows.append(("capabilities lacking", ", ".join(p["missing"]) or "none: 'probec run' can load and attach"))
    for cap in p["needed"]:
        rows.append((f"  {cap}", p["why"][cap]))
    if p["uprobes_need_sys_admin"] is None:
        rows.append(("  uprobes", "unknown whether they need CAP_SYS_ADMIN here (needs CAP_PERFMON to find out)"))
    if p["seccomp_filtered"]:
        rows.append(("seccomp", "a filter is on (a container's profile): it must allow bpf() and perf_event_open() "
                                "(deploy/image/seccomp.py)"))
    if p["bpftrace"] != "runs":
        rows.append(("bpftrace backend", p["bpftrace"]))
    rows.append(("BTF (/sys/kernel/btf/vmlinux)", "yes" if os.path.exists("/sys/kernel/btf/vmlinux") else "no"))
    tracefs = os.path.isdir("/sys/kernel/tracing/events/sched")
    if tracefs:
        rows.append(("tracefs", "mounted"))
    elif os.path.ismount("/sys/kernel/tracing"):
        rows.append(("tracefs", "mounted, not readable by this process (uid 0, or CAP_DAC_READ_SEARCH)"))
    else:
        rows.append(("tracefs", "not mounted: mount -t tracefs nodev /sys/kernel/tracing"))
    rows.append(("tracepoints", "yes" if tracefs else "unknown"))
    rows.append(("uprobes", "yes" if os.path.exists("/sys/bus/event_source/devices/uprobe") else "no"))
    rows.append(("kprobes", "yes" if kprobes_available() else "no (no CONFIG_KPROBES): use tracepoints or syscalls"))
    fentry = probe_fentry()
    rows.append(("fentry/fexit", {True: "yes", False: "no (BPF function tracing refused): use tracepoints",
                                  None: "unknown (needs root)"}[fentry]))
    for tool in ("bpftrace", "clang", "bpftool"):
        rows.append((tool, shutil.which(tool) or "not installed"))
    rows.append(("libbpf", _libbpf_version() or "not found: apt-get install libbpf1"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
