"""Errors and log capture: :class:`BpfError`, errno names and hints, and every line libbpf prints.

libbpf's print callback (set up in :mod:`.ffi`) hands each formatted line to :data:`capture`;
:class:`Call` marks the capture before one libbpf call and, if that call fails, raises a
:class:`BpfError` carrying the lines the call printed (for a failed load, the tail of the
verifier log).  This module imports nothing from the rest of the binding.
"""

from __future__ import annotations

import collections
import ctypes
import errno as _errno
import logging
import os
import threading
from typing import Callable, Sequence

from ...host.features import kprobes_available

logger = logging.getLogger("probec.libbpf")

# --------------------------------------------------------------------------
# errno names

ENOTSUPP = 524  # kernel-internal "operation not supported", leaks to user space
_EXTRA_ERRNO_NAMES = {ENOTSUPP: "ENOTSUPP"}
_PREFERRED_ERRNO_NAMES = {_errno.EOPNOTSUPP: "EOPNOTSUPP"}  # errno.errorcode says ENOTSUP
_LIBBPF_ERRNO_BASE = 4000  # LIBBPF_ERRNO__LIBELF ...

# libbpf_strerror once libbpf.so.1 is loaded (set by .ffi): the text of libbpf's own codes.
libbpf_strerror: Callable[[int], str] | None = None


def errno_name(err: int) -> str:
    return (
        _PREFERRED_ERRNO_NAMES.get(err)
        or _errno.errorcode.get(err)
        or _EXTRA_ERRNO_NAMES.get(err)
        or f"errno {err}"
    )


def _strerror(err: int) -> str:
    if err >= _LIBBPF_ERRNO_BASE and libbpf_strerror is not None:
        return libbpf_strerror(err)
    if err == ENOTSUPP:
        return "Operation not supported by this kernel/map"
    return os.strerror(err)


class BpfError(Exception):
    """A libbpf or bpf(2) call failed.

    Attributes: ``op`` (what was attempted), ``errno`` (positive errno or
    None), ``log`` (libbpf log lines emitted by the failing call), ``hint``.
    """

    LOG_TAIL = 40  # log lines shown in str(); the full list stays in .log

    def __init__(
        self,
        op: str,
        err: int | None = None,
        log: Sequence[str] = (),
        hint: str | None = None,
    ):
        self.op = op
        self.errno = err
        self.log = list(log)
        self.hint = hint
        super().__init__(self._render())

    @property
    def errno_name(self) -> str | None:
        return None if self.errno is None else errno_name(self.errno)

    def _render(self) -> str:
        text = self.op
        if self.errno is not None:
            text += f": {errno_name(self.errno)} ({_strerror(self.errno)})"
        lines = self.log
        if lines:
            shown = lines[-self.LOG_TAIL :]
            if len(lines) > len(shown):
                text += f"\n  ... {len(lines) - len(shown)} earlier libbpf log lines in .log"
            text += "".join(f"\n  {line}" for line in shown)
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class LibbpfMissing(BpfError):
    """libbpf.so.1 is absent, too old, or lacks a symbol we need."""

    def __init__(self, message: str):
        super().__init__(message)


# --------------------------------------------------------------------------
# hints: what a person can do about an errno from one kind of call


def kprobe_hint(err: int) -> str | None:
    if err in (_errno.ENOENT, _errno.EOPNOTSUPP) and not kprobes_available():
        return "this kernel has no kprobe support (CONFIG_KPROBES off): use a tracepoint (tp/, raw_tp/, tp_btf/) instead"
    if err == _errno.ENOENT:
        return "the kernel function may not exist or may be inlined (see /proc/kallsyms)"
    return None


def tracefs_hint(err: int) -> str | None:
    if err == _errno.ENOENT and not os.path.ismount("/sys/kernel/tracing"):
        return "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing"
    if err == _errno.ENOENT:
        return "no such tracepoint: see /sys/kernel/tracing/events/"
    return None


def load_hint(err: int) -> str | None:
    if err == _errno.EPERM:
        from ...host.capabilities import effective_capabilities, seccomp_filtered
        if seccomp_filtered() and {"CAP_BPF", "CAP_PERFMON"} <= (effective_capabilities() or set()):
            return ("EPERM on load with CAP_BPF and CAP_PERFMON held, under a seccomp filter: container runtimes' "
                    "default profiles (containers-common's: podman, CRI-O) allow bpf() only with CAP_SYS_ADMIN; "
                    "run with the profile of deploy/image/seccomp.py (docs/deploy.md)")
        return "EPERM on load: needs root/CAP_BPF+CAP_PERFMON; fentry/fexit are locked down on some kernels"
    if err == _errno.EACCES:
        return "the verifier rejected a program: see its log above"
    return None


# --------------------------------------------------------------------------
# log capture (what libbpf_set_print's callback receives)

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
_LEVEL_NAMES = {LIBBPF_WARN: "warn", LIBBPF_INFO: "info", LIBBPF_DEBUG: "debug"}
_PY_LEVELS = {LIBBPF_WARN: logging.WARNING, LIBBPF_INFO: logging.INFO, LIBBPF_DEBUG: logging.DEBUG}


class LogCapture:
    """Every line libbpf prints, tagged with a sequence number and thread.

    libbpf calls the print callback on the thread that called into libbpf,
    so "lines since mark on my thread" are the lines of my call.
    """

    def __init__(self, maxlen: int = 4000):
        self._lines: collections.deque[tuple[int, int, int, str]] = collections.deque(maxlen=maxlen)
        self._seq = 0
        self._lock = threading.Lock()
        self.capture_debug = False

    def wants(self, level: int) -> bool:
        """Whether a line at ``level`` is kept or logged (DEBUG lines only on request)."""
        return level != LIBBPF_DEBUG or self.capture_debug or logger.isEnabledFor(logging.DEBUG)

    def add(self, level: int, message: str) -> None:
        tid = threading.get_ident()
        with self._lock:
            for line in message.rstrip("\n").split("\n"):
                self._seq += 1
                self._lines.append((self._seq, tid, level, line))

    def print(self, level: int, message: str) -> None:
        """One message from libbpf: kept for the failing call's error and passed to logging."""
        self.add(level, message)
        logger.log(_PY_LEVELS.get(level, logging.INFO), "%s", message.rstrip("\n"))

    def mark(self) -> int:
        return self._seq

    def since(self, mark: int, include_debug: bool = False) -> list[str]:
        tid = threading.get_ident()
        with self._lock:
            return [
                line
                for seq, t, level, line in self._lines
                if seq > mark and t == tid and (include_debug or level != LIBBPF_DEBUG)
            ]

    def recent(self, n: int) -> list[str]:
        with self._lock:
            return [f"{_LEVEL_NAMES[lv]}: {line}" for _, _, lv, line in list(self._lines)[-n:]]


capture = LogCapture()


def recent_log_lines(n: int = 50) -> list[str]:
    """The last ``n`` lines libbpf printed in this process (all threads)."""
    return capture.recent(n)


def set_debug_logging(enabled: bool) -> None:
    """Also capture libbpf's DEBUG lines (many per load; off by default)."""
    capture.capture_debug = enabled


class Call:
    """Runs one libbpf call and turns its failure into a BpfError with logs."""

    __slots__ = ("op", "mark")

    def __init__(self, op: str):
        self.op = op
        self.mark = capture.mark()

    def log(self) -> list[str]:
        return capture.since(self.mark)

    def fail(self, err: int | None, hint: Callable[[int], str | None] | None = None) -> BpfError:
        return BpfError(self.op, err, self.log(), hint(err) if hint and err is not None else None)

    def check_int(self, ret: int, hint: Callable[[int], str | None] | None = None) -> int:
        if ret < 0:
            raise self.fail(-ret, hint)
        return ret

    def check_ptr(self, ptr: int | None, hint: Callable[[int], str | None] | None = None) -> int:
        # libbpf >= 1.0 returns NULL and sets errno (libbpf_get_error(NULL) == -errno).
        if not ptr:
            raise self.fail(ctypes.get_errno() or _errno.EINVAL, hint)
        return ptr
