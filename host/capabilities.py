"""Which Linux capabilities this process holds, and which `probec run` needs.

Measured on kernel 6.18 (docs/deploy.md has the table): loading and attaching the probes needs
CAP_BPF and CAP_PERFMON, nothing else, when the process runs as uid 0 (tracefs's files are
root's, mode 0700/0440, so uid 0 reads them as their owner). A process of another uid also needs
CAP_DAC_READ_SEARCH to read tracefs (tracepoint ids and formats), and cannot run the bpftrace
backend at all: bpftrace 0.17 refuses every uid but 0. CAP_SYS_RESOURCE is needed only on
kernels that charge BPF memory to RLIMIT_MEMLOCK (before 5.11) instead of the memory cgroup.
CAP_SYS_ADMIN is not needed, except for `--bpf-stats` (the kernel's BPF_ENABLE_STATS), and on
kernels before 5.8, which have no CAP_BPF or CAP_PERFMON (/proc/sys/kernel/cap_last_cap below 38):
there CAP_SYS_ADMIN is what loads and attaches BPF programs."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import resource
from dataclasses import dataclass

# include/uapi/linux/capability.h
CAPABILITIES = {
    "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39,
}

BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_FUNC_KTIME_GET_COARSE_NS = 160     # came with memory-cgroup accounting of BPF memory (5.11):
                                       # libbpf's own test for whether RLIMIT_MEMLOCK still matters


def effective_capabilities(status: str = "/proc/self/status") -> set[str] | None:
    """The names (of those in CAPABILITIES) in this process's effective set; None when unreadable."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    mask = int(line.split()[1], 16)
                    return {name for name, bit in CAPABILITIES.items() if mask >> bit & 1}
    except (OSError, ValueError):
        return None
    return None


def last_capability(path: str = "/proc/sys/kernel/cap_last_cap") -> int | None:
    """The highest capability this kernel knows (37 before 5.8: no CAP_PERFMON, no CAP_BPF)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def seccomp_filtered(status: str = "/proc/self/status") -> bool:
    """True when a seccomp filter runs on this process's system calls (a container's profile)."""
    try:
        with open(status) as f:
            return any(line.split() == ["Seccomp:", "2"] for line in f)
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def memlock_matters() -> bool | None:
    """True when this kernel charges BPF maps and programs to RLIMIT_MEMLOCK, False when it charges
    them to the memory cgroup, None when it cannot be told (no libbpf, or no right to load BPF)."""
    if resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] == resource.RLIM_INFINITY:
        return False
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        return None
    probe = lib.libbpf_probe_bpf_helper
    probe.argtypes, probe.restype = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p], ctypes.c_int
    found = probe(BPF_PROG_TYPE_SOCKET_FILTER, BPF_FUNC_KTIME_GET_COARSE_NS, None)
    if found < 0:
        return None
    return found == 0


UPROBE_PMU_TYPE = "/sys/bus/event_source/devices/uprobe/type"
_PROBE_PATH = b"/nonexistent/probec-capability-probe"


@functools.lru_cache(maxsize=1)
def uprobes_need_sys_admin() -> bool | None:
    """True when this kernel lets only CAP_SYS_ADMIN create uprobe perf events: the fix of
    CVE-2025-38466 (commit ba677dbe77af, "perf: Revert to requiring CAP_SYS_ADMIN for uprobes",
    mainline 6.16 and stable 5.10.240, 5.15.189, 6.1.146, 6.6.99, 6.12.39, 6.15.7). False when
    CAP_PERFMON is enough, None when it cannot be told (no uprobe PMU, or no CAP_PERFMON to try).

    Found by trying, without tracing anything: a child process with CAP_PERFMON but not
    CAP_SYS_ADMIN asks for a uprobe on a path that does not exist. The kernel checks the
    capability before it looks the path up, so EACCES means refused and ENOENT means allowed."""
    try:
        pmu = int(open(UPROBE_PMU_TYPE).read())
    except (OSError, ValueError):
        return None
    have = effective_capabilities()
    if have is None or "CAP_PERFMON" not in have:
        return None
    child = os.fork()
    if child == 0:                              # only async-signal-safe work until _exit
        code = 2
        try:
            code = _try_uprobe_without_sys_admin(pmu)
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return {0: False, 1: True}.get(os.waitstatus_to_exitcode(status))


def _try_uprobe_without_sys_admin(pmu: int) -> int:
    """In a forked child: drop CAP_SYS_ADMIN from the effective set and open a uprobe event on a
    missing path. 0: allowed (ENOENT), 1: refused (EACCES), 2: anything else."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)        # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()                       # two of {effective, permitted, inheritable}
    if libc.capget(header, data) != 0:
        return 2
    data[0] &= ~(1 << CAPABILITIES["CAP_SYS_ADMIN"])
    if libc.capset(header, data) != 0:
        return 2
    attr = (ctypes.c_uint8 * 128)()
    path = ctypes.create_string_buffer(_PROBE_PATH)
    ctypes.c_uint32.from_buffer(attr, 0).value = pmu                 # type
    ctypes.c_uint32.from_buffer(attr, 4).value = 112                 # size: PERF_ATTR_SIZE_VER5
    ctypes.c_uint64.from_buffer(attr, 40).value = 1 << 5             # exclude_kernel
    ctypes.c_uint64.from_buffer(attr, 56).value = ctypes.addressof(path)   # config1: uprobe_path
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(298, attr, 0, -1, -1, 0)                       # perf_event_open(attr, self, any cpu)
    if fd >= 0:
        os.close(fd)
        return 0
    return {errno.ENOENT: 0, errno.EACCES: 1}.get(ctypes.get_errno(), 2)


UPROBE_KINDS = ("uprobe", "uretprobe", "usdt")


@dataclass(frozen=True)
class RunPrivileges:
    """What `probec run` needs here for one set of probe kinds, against what this process has."""
    uid: int
    have: frozenset[str]
    needed: tuple[str, ...]         # in the order they are reported
    missing: tuple[str, ...]
    why: dict                       # capability -> why it is needed
    bpftrace: str | None            # why the bpftrace backend cannot run here; None when it can

    def error(self, backend: str) -> str | None:
        """What is missing for `backend`, or None when the run can go ahead."""
        if self.missing:
            reasons = "; ".join(f"{c}: {self.why[c]}" for c in self.missing)
            return (f"this process (uid {self.uid}) lacks {', '.join(self.missing)} ({reasons}). "
                    f"Needed here: {', '.join(self.needed)}. 'probec doctor' lists what it has; "
                    "'probec check' works without")
        if backend == "bpftrace" and self.bpftrace:
            return self.bpftrace
        return None


def run_privileges(kinds: set[str] | frozenset[str] = frozenset(), uid: int | None = None,
                   have: set[str] | None = None, last_cap: int | None = None) -> RunPrivileges:
    """The capabilities `probec run` needs for probes of `kinds` on this kernel (`last_cap`: its
    /proc/sys/kernel/cap_last_cap, read when not given)."""
    uid = os.geteuid() if uid is None else uid
    have = effective_capabilities() if have is None else have
    have = set(CAPABILITIES) if have is None else have
    last_cap = last_capability() if last_cap is None else last_cap
    if last_cap is not None and last_cap < CAPABILITIES["CAP_BPF"]:
        why = {"CAP_SYS_ADMIN": "load and attach BPF programs (this kernel predates CAP_BPF and CAP_PERFMON, 5.8)"}
    else:
        why = {"CAP_BPF": "load BPF programs and maps",
               "CAP_PERFMON": "attach tracing programs (perf events, tracepoints)"}
    if uid != 0 and (not kinds or "tracepoint" in kinds):
        why["CAP_DAC_READ_SEARCH"] = "read tracefs (root's, mode 0700) as a uid other than 0"
    if (not kinds or set(kinds) & set(UPROBE_KINDS)) and "CAP_SYS_ADMIN" not in why and uprobes_need_sys_admin():
        why["CAP_SYS_ADMIN"] = ("uprobes and USDT: this kernel creates uprobe perf events for CAP_SYS_ADMIN "
                                "only (the fix of CVE-2025-38466)")
    if memlock_matters():
        why["CAP_SYS_RESOURCE"] = "raise RLIMIT_MEMLOCK (this kernel charges BPF memory to it, not to the cgroup)"
    needed = tuple(why)
    missing = tuple(c for c in needed if c not in have)
    bpftrace = None
    if uid != 0:
        bpftrace = (f"the bpftrace backend runs only as uid 0 (bpftrace 0.17 refuses any other user; this process "
                    f"is uid {uid}): run it as uid 0 (with the capabilities 'probec doctor' lists), or build a core bundle "
                    "(probec build --backend core), which runs as any uid")
    return RunPrivileges(uid, frozenset(have), needed, missing, why, bpftrace)
