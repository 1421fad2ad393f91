"""Perf events: the software cpu-clock event per CPU (``perf_event_open``), and a program attached
to it at a frequency on every CPU (``profile``) or once a period on one CPU (``interval``)."""

from __future__ import annotations

import ctypes
import os
import platform
from ctypes import sizeof
from typing import TYPE_CHECKING, Sequence

from .errors import BpfError
from .ffi import PerfEventAttr, libc
from .links import Link, LinkGroup

if TYPE_CHECKING:
    from .objects import Program

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_FLAG_FD_CLOEXEC = 1 << 3
_PERF_ATTR_FREQ = 1 << 10  # bit 10 of the flags bitfield: sample_freq, not period
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "AMD64": 298, "aarch64": 241, "arm64": 241}


def _parse_cpu_list(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def online_cpus() -> list[int]:
    with open("/sys/devices/system/cpu/online") as f:
        return _parse_cpu_list(f.read())


def perf_event_open_cpu_clock(cpu: int, frequency_hz: int = 0, period_ns: int = 0) -> int:
    """perf_event_open for the software cpu-clock event on one CPU, all tasks: sampled
    `frequency_hz` times a second (profile), or once every `period_ns` of that CPU's clock
    (interval)."""
    nr = _SYS_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise BpfError(f"perf_event_open: unknown syscall number on {platform.machine()}")
    attr = PerfEventAttr()
    attr.type = PERF_TYPE_SOFTWARE
    attr.size = sizeof(attr)
    attr.config = PERF_COUNT_SW_CPU_CLOCK
    attr.sample_period_or_freq = period_ns or frequency_hz
    attr.flags = 0 if period_ns else _PERF_ATTR_FREQ
    fd = libc.syscall(nr, ctypes.addressof(attr), -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        what = f"every {period_ns} ns" if period_ns else f"{frequency_hz} Hz"
        raise BpfError(f"perf_event_open(cpu-clock, cpu {cpu}, {what})", err)
    return fd


def _attach_cpu_clock_on(
    program: "Program", cpu: int, description: str, frequency_hz: int = 0, period_ns: int = 0
) -> Link:
    """One cpu-clock event on ``cpu`` with ``program`` attached; the event is closed if attaching fails."""
    pfd = perf_event_open_cpu_clock(cpu, frequency_hz, period_ns)
    try:
        return program.attach_perf_event(pfd, description)
    except BaseException:
        os.close(pfd)
        raise


def attach_cpu_clock(program: "Program", frequency_hz: int, cpus: Sequence[int] | None = None) -> LinkGroup:
    """``profile``: a software cpu-clock event at ``frequency_hz`` on each CPU."""
    links: list[Link] = []
    try:
        for cpu in online_cpus() if cpus is None else cpus:
            links.append(
                _attach_cpu_clock_on(program, cpu, f"{program.name}@profile:{frequency_hz}Hz:cpu{cpu}", frequency_hz)
            )
    except BaseException:
        for link in links:
            link.destroy()
        raise
    return LinkGroup(links, f"{program.name}@profile:{frequency_hz}Hz")


def attach_interval(program: "Program", period_ns: int) -> LinkGroup:
    """``interval``: the cpu-clock event once every ``period_ns`` on one CPU (the first
    online), as bpftrace's interval probes fire on one CPU."""
    cpu = online_cpus()[0]
    link = _attach_cpu_clock_on(program, cpu, f"{program.name}@interval:{period_ns}ns:cpu{cpu}", period_ns=period_ns)
    return LinkGroup([link], f"{program.name}@interval:{period_ns}ns")
