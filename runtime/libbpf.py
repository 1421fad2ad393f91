"""ctypes binding over the system libbpf (``libbpf.so.1``, Debian ``libbpf1``).

This is the production loader's only way into the kernel: it opens a compiled
BPF object, fills ``const volatile`` settings in ``.rodata``, loads, attaches,
reads maps and drains ring buffers.  It needs the standard library and
``libbpf.so.1`` (>= 1.0) and nothing else; it never imports the compiler.

Errors from libbpf become :class:`BpfError`, which carries the errno name, the
strerror text and the lines libbpf logged during the failing call (for a
failed load that includes the tail of the verifier log).

Set ``PROBEC_LIBBPF=/path/to/libbpf.so.1`` to use a libbpf other than the one
the dynamic loader finds (for hosts without the Debian package).
"""

from __future__ import annotations

import collections
import ctypes
import errno as _errno
import logging
import os
import platform
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    byref,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_long,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_ulong,
    c_void_p,
    sizeof,
)
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

__all__ = [
    "BpfError",
    "LibbpfMissing",
    "BpfObject",
    "Program",
    "Map",
    "Link",
    "LinkGroup",
    "RingBuffer",
    "ProgramInfo",
    "MapType",
    "libbpf_version",
    "num_possible_cpus",
    "online_cpus",
    "enable_stats",
    "program_info",
    "perf_event_open_cpu_clock",
    "recent_log_lines",
    "set_debug_logging",
    "errno_name",
    "BPF_ANY",
    "BPF_NOEXIST",
    "BPF_EXIST",
]

LIBBPF_SONAME = "libbpf.so.1"
MIN_VERSION = (1, 0)

_log = logging.getLogger("probec.libbpf")

# --------------------------------------------------------------------------
# errors


ENOTSUPP = 524  # kernel-internal "operation not supported", leaks to user space
_EXTRA_ERRNO_NAMES = {ENOTSUPP: "ENOTSUPP"}
_PREFERRED_ERRNO_NAMES = {_errno.EOPNOTSUPP: "EOPNOTSUPP"}  # errno.errorcode says ENOTSUP
_LIBBPF_ERRNO_BASE = 4000  # LIBBPF_ERRNO__LIBELF ...


def errno_name(err: int) -> str:
    return (
        _PREFERRED_ERRNO_NAMES.get(err)
        or _errno.errorcode.get(err)
        or _EXTRA_ERRNO_NAMES.get(err)
        or f"errno {err}"
    )


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


def _strerror(err: int) -> str:
    if err >= _LIBBPF_ERRNO_BASE and _lib_handle is not None:
        buf = ctypes.create_string_buffer(256)
        _lib_handle.libbpf_strerror(-err, buf, sizeof(buf))
        return buf.value.decode(errors="replace")
    if err == ENOTSUPP:
        return "Operation not supported by this kernel/map"
    return os.strerror(err)


# --------------------------------------------------------------------------
# log capture (libbpf_set_print)

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
_LEVEL_NAMES = {LIBBPF_WARN: "warn", LIBBPF_INFO: "info", LIBBPF_DEBUG: "debug"}
_PY_LEVELS = {LIBBPF_WARN: logging.WARNING, LIBBPF_INFO: logging.INFO, LIBBPF_DEBUG: logging.DEBUG}


class _LogCapture:
    """Every line libbpf prints, tagged with a sequence number and thread.

    libbpf calls the print callback on the thread that called into libbpf,
    so "lines since mark on my thread" are the lines of my call.
    """

    def __init__(self, maxlen: int = 4000):
        self._lines: collections.deque[tuple[int, int, int, str]] = collections.deque(maxlen=maxlen)
        self._seq = 0
        self._lock = threading.Lock()
        self.capture_debug = False

    def add(self, level: int, message: str) -> None:
        tid = threading.get_ident()
        with self._lock:
            for line in message.rstrip("\n").split("\n"):
                self._seq += 1
                self._lines.append((self._seq, tid, level, line))

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


_capture = _LogCapture()


def recent_log_lines(n: int = 50) -> list[str]:
    """The last ``n`` lines libbpf printed in this process (all threads)."""
    return _capture.recent(n)


def set_debug_logging(enabled: bool) -> None:
    """Also capture libbpf's DEBUG lines (many per load; off by default)."""
    _capture.capture_debug = enabled


# libc: vsnprintf formats libbpf's printf-style message from its va_list.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.restype = c_int
_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
_libc.syscall.restype = c_long
_libc.syscall.argtypes = [c_long, c_void_p, c_long, c_long, c_long, c_ulong]

# On x86_64 a va_list parameter decays to a pointer to one 24-byte
# __va_list_tag, and va_copy is a plain copy of that struct: that lets us
# measure the message first and format it exactly once into a fitting buffer.
_VA_LIST_COPYABLE = platform.machine() in ("x86_64", "AMD64")
_VA_TAG_SIZE = 24
_FIRST_TRY = 1024
_FALLBACK_BUFFER = 1 << 20


def _format_va(fmt: bytes, va_list: int) -> str:
    if _VA_LIST_COPYABLE:
        copy = ctypes.create_string_buffer(_VA_TAG_SIZE)
        ctypes.memmove(copy, va_list, _VA_TAG_SIZE)
        buf = ctypes.create_string_buffer(_FIRST_TRY)
        need = _libc.vsnprintf(buf, _FIRST_TRY, fmt, ctypes.addressof(copy))
        if need < 0:
            return fmt.decode(errors="replace")
        if need < _FIRST_TRY:
            return buf.raw[:need].decode(errors="replace")
        buf = ctypes.create_string_buffer(need + 1)
        _libc.vsnprintf(buf, need + 1, fmt, va_list)
        return buf.raw[:need].decode(errors="replace")
    # Elsewhere format once into a large buffer (truncates beyond 1 MiB).
    buf = ctypes.create_string_buffer(_FALLBACK_BUFFER)
    n = _libc.vsnprintf(buf, _FALLBACK_BUFFER, fmt, va_list)
    return buf.value.decode(errors="replace") if n >= 0 else fmt.decode(errors="replace")


_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)


def _on_libbpf_print(level: int, fmt: bytes | None, va_list: int | None) -> int:
    try:
        if level == LIBBPF_DEBUG and not (_capture.capture_debug or _log.isEnabledFor(logging.DEBUG)):
            return 0
        if fmt is None:
            return 0
        message = _format_va(fmt, va_list) if va_list else fmt.decode(errors="replace")
        _capture.add(level, message)
        _log.log(_PY_LEVELS.get(level, logging.INFO), "%s", message.rstrip("\n"))
        return len(message)
    except Exception:  # never let an exception cross back into C
        return 0


_print_callback = _PRINT_FN(_on_libbpf_print)  # module global: must stay alive


# --------------------------------------------------------------------------
# loading libbpf.so.1 and declaring every function we call

_vp = c_void_p
_PROTOTYPES: dict[str, tuple[object, list]] = {
    # version / misc
    "libbpf_major_version": (c_uint32, []),
    "libbpf_minor_version": (c_uint32, []),
    "libbpf_version_string": (c_char_p, []),
    "libbpf_strerror": (c_int, [c_int, c_char_p, c_size_t]),
    "libbpf_set_print": (_vp, [_PRINT_FN]),
    "libbpf_num_possible_cpus": (c_int, []),
    # object
    "bpf_object__open_file": (_vp, [c_char_p, _vp]),
    "bpf_object__load": (c_int, [_vp]),
    "bpf_object__close": (None, [_vp]),
    "bpf_object__name": (c_char_p, [_vp]),
    "bpf_object__btf": (_vp, [_vp]),
    "bpf_object__next_program": (_vp, [_vp, _vp]),
    "bpf_object__next_map": (_vp, [_vp, _vp]),
    "bpf_object__find_map_by_name": (_vp, [_vp, c_char_p]),
    # program
    "bpf_program__name": (c_char_p, [_vp]),
    "bpf_program__section_name": (c_char_p, [_vp]),
    "bpf_program__fd": (c_int, [_vp]),
    "bpf_program__type": (c_int, [_vp]),
    "bpf_program__autoload": (c_bool, [_vp]),
    "bpf_program__set_autoload": (c_int, [_vp, c_bool]),
    "bpf_program__attach": (_vp, [_vp]),
    "bpf_program__attach_tracepoint": (_vp, [_vp, c_char_p, c_char_p]),
    "bpf_program__attach_raw_tracepoint": (_vp, [_vp, c_char_p]),
    "bpf_program__attach_kprobe": (_vp, [_vp, c_bool, c_char_p]),
    "bpf_program__attach_uprobe_opts": (_vp, [_vp, c_int, c_char_p, c_size_t, _vp]),
    "bpf_program__attach_usdt": (_vp, [_vp, c_int, c_char_p, c_char_p, c_char_p, _vp]),
    "bpf_program__attach_perf_event": (_vp, [_vp, c_int]),
    # link
    "bpf_link__fd": (c_int, [_vp]),
    "bpf_link__destroy": (c_int, [_vp]),
    # map (libbpf side)
    "bpf_map__name": (c_char_p, [_vp]),
    "bpf_map__fd": (c_int, [_vp]),
    "bpf_map__type": (c_int, [_vp]),
    "bpf_map__key_size": (c_uint32, [_vp]),
    "bpf_map__value_size": (c_uint32, [_vp]),
    "bpf_map__max_entries": (c_uint32, [_vp]),
    "bpf_map__map_flags": (c_uint32, [_vp]),
    "bpf_map__set_max_entries": (c_int, [_vp, c_uint32]),
    "bpf_map__initial_value": (_vp, [_vp, POINTER(c_size_t)]),
    "bpf_map__reuse_fd": (c_int, [_vp, c_int]),
    # map (syscall wrappers)
    "bpf_map_lookup_elem": (c_int, [c_int, _vp, _vp]),
    "bpf_map_update_elem": (c_int, [c_int, _vp, _vp, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, _vp]),
    "bpf_map_get_next_key": (c_int, [c_int, _vp, _vp]),
    "bpf_map_lookup_batch": (c_int, [c_int, _vp, _vp, _vp, _vp, POINTER(c_uint32), _vp]),
    # stats / info
    "bpf_enable_stats": (c_int, [c_int]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, _vp, POINTER(c_uint32)]),
    # ring buffer
    "ring_buffer__new": (_vp, [c_int, _vp, _vp, _vp]),
    "ring_buffer__add": (c_int, [_vp, c_int, _vp, _vp]),
    "ring_buffer__poll": (c_int, [_vp, c_int]),
    "ring_buffer__consume": (c_int, [_vp]),
    "ring_buffer__epoll_fd": (c_int, [_vp]),
    "ring_buffer__free": (None, [_vp]),
    # BTF (to find .rodata variables by name)
    "btf__find_by_name_kind": (c_int, [_vp, c_char_p, c_uint32]),
    "btf__type_by_id": (_vp, [_vp, c_uint32]),
    "btf__name_by_offset": (c_char_p, [_vp, c_uint32]),
}

_lib_handle: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _lib() -> ctypes.CDLL:
    """libbpf.so.1, loaded, version-checked and typed once per process."""
    global _lib_handle
    if _lib_handle is not None:
        return _lib_handle
    with _lib_lock:
        if _lib_handle is not None:
            return _lib_handle
        name = os.environ.get("PROBEC_LIBBPF") or LIBBPF_SONAME
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise LibbpfMissing(
                f"{name} not found: apt-get install libbpf1 (or set PROBEC_LIBBPF): {exc}"
            ) from None
        missing = [fn for fn in ("libbpf_major_version", "libbpf_minor_version") if not hasattr(lib, fn)]
        if missing:
            raise LibbpfMissing(f"{name} is older than libbpf 0.6 (no {missing[0]}): needs libbpf >= 1.0")
        for fn in ("libbpf_major_version", "libbpf_minor_version"):
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = _PROTOTYPES[fn]
        version = (lib.libbpf_major_version(), lib.libbpf_minor_version())
        if version < MIN_VERSION:
            raise LibbpfMissing(
                f"needs libbpf >= {MIN_VERSION[0]}.{MIN_VERSION[1]}, found {version[0]}.{version[1]} ({name})"
            )
        for fn, (restype, argtypes) in _PROTOTYPES.items():
            try:
                func = getattr(lib, fn)
            except AttributeError:
                raise LibbpfMissing(
                    f"{name} {version[0]}.{version[1]} lacks {fn}(): needs libbpf >= 1.0"
                ) from None
            func.restype = restype
            func.argtypes = argtypes
        lib.libbpf_set_print(_print_callback)
        _lib_handle = lib
        return lib


def libbpf_version() -> str:
    """The loaded libbpf's version string, e.g. ``v1.1``."""
    return (_lib().libbpf_version_string() or b"?").decode()


class _Call:
    """Runs one libbpf call and turns its failure into a BpfError with logs."""

    __slots__ = ("op", "mark")

    def __init__(self, op: str):
        self.op = op
        self.mark = _capture.mark()

    def log(self) -> list[str]:
        return _capture.since(self.mark)

    def fail(self, err: int | None, hint: str | None = None) -> BpfError:
        return BpfError(self.op, err, self.log(), hint)

    def check_int(self, ret: int, hint: Callable[[int], str | None] | None = None) -> int:
        if ret < 0:
            err = -ret
            raise self.fail(err, hint(err) if hint else None)
        return ret

    def check_ptr(self, ptr: int | None, hint: Callable[[int], str | None] | None = None) -> int:
        # libbpf >= 1.0 returns NULL and sets errno (libbpf_get_error(NULL) == -errno).
        if not ptr:
            err = ctypes.get_errno() or _errno.EINVAL
            raise self.fail(err, hint(err) if hint else None)
        return ptr


# --------------------------------------------------------------------------
# constants


class MapType:
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    PERCPU_CGROUP_STORAGE = 15
    RINGBUF = 27

    PERCPU = frozenset({PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE})


BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_STATS_RUN_TIME = 0
BTF_KIND_DATASEC = 15

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_FLAG_FD_CLOEXEC = 1 << 3
_PERF_ATTR_FREQ = 1 << 10  # bit 10 of the flags bitfield: sample_freq, not period
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "AMD64": 298, "aarch64": 241, "arm64": 241}


# --------------------------------------------------------------------------
# struct mirrors


class _UprobeOpts(ctypes.Structure):  # struct bpf_uprobe_opts (libbpf 1.1: 40 bytes)
    _fields_ = [
        ("sz", c_size_t),
        ("ref_ctr_offset", c_size_t),
        ("bpf_cookie", c_uint64),
        ("retprobe", c_bool),
        ("func_name", c_char_p),
    ]


class _UsdtOpts(ctypes.Structure):  # struct bpf_usdt_opts (16 bytes)
    _fields_ = [("sz", c_size_t), ("usdt_cookie", c_uint64)]


class _MapBatchOpts(ctypes.Structure):  # struct bpf_map_batch_opts (24 bytes)
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class _BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info from linux/bpf.h (232 bytes on 6.x UAPI)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * 16),
        ("ifindex", c_uint32),
        ("gpl_compatible", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64),
        ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32),
        ("func_info", c_uint64),
        ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32),
        ("line_info", c_uint64),
        ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),
        ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32),
        ("attach_btf_id", c_uint32),
        ("_pad", c_uint32),
    ]


class _PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr: the leading fields, zero-padded to VER7 (128 bytes)."""

    _fields_ = [
        ("type", c_uint32),
        ("size", c_uint32),
        ("config", c_uint64),
        ("sample_period_or_freq", c_uint64),
        ("sample_type", c_uint64),
        ("read_format", c_uint64),
        ("flags", c_uint64),
        ("_rest", c_uint8 * 80),
    ]


class _BtfType(ctypes.Structure):  # struct btf_type
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):  # struct btf_var_secinfo
    _fields_ = [("type", c_uint32), ("offset", c_uint32), ("size", c_uint32)]


assert sizeof(_UprobeOpts) == 40 and sizeof(_UsdtOpts) == 16 and sizeof(_MapBatchOpts) == 24
assert sizeof(_BpfProgInfo) == 232 and _BpfProgInfo.run_time_ns.offset == 192
assert sizeof(_PerfEventAttr) == 128


# --------------------------------------------------------------------------
# helpers


def num_possible_cpus() -> int:
    """Possible CPUs (the per-CPU map value count), via libbpf_num_possible_cpus."""
    global _possible_cpus
    if _possible_cpus is None:
        call = _Call("libbpf_num_possible_cpus()")
        _possible_cpus = call.check_int(_lib().libbpf_num_possible_cpus())
    return _possible_cpus


_possible_cpus: int | None = None


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


def _round8(n: int) -> int:
    return (n + 7) & ~7


def _cstr(s: str | os.PathLike | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


# --------------------------------------------------------------------------
# links


class Link:
    """One attachment (struct bpf_link).  ``destroy()`` detaches; idempotent."""

    def __init__(self, ptr: int, description: str, owner: "BpfObject | None" = None):
        self._ptr: int | None = ptr
        self.description = description
        self._owner = owner

    @property
    def fd(self) -> int:
        if self._ptr is None:
            return -1
        return _lib().bpf_link__fd(self._ptr)

    @property
    def destroyed(self) -> bool:
        return self._ptr is None

    def destroy(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is None:
            return
        if self._owner is not None:
            self._owner._forget_link(self)
            self._owner = None
        call = _Call(f"bpf_link__destroy({self.description})")
        call.check_int(_lib().bpf_link__destroy(ptr))

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __repr__(self) -> str:
        state = "destroyed" if self.destroyed else f"fd={self.fd}"
        return f"<Link {self.description} {state}>"


class LinkGroup:
    """Several links made by one request (a perf event per CPU)."""

    def __init__(self, links: list[Link], description: str):
        self.links = links
        self.description = description

    @property
    def destroyed(self) -> bool:
        return all(link.destroyed for link in self.links)

    def destroy(self) -> None:
        errors = []
        for link in self.links:
            try:
                link.destroy()
            except BpfError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "LinkGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __len__(self) -> int:
        return len(self.links)

    def __repr__(self) -> str:
        return f"<LinkGroup {self.description} x{len(self.links)}>"


# --------------------------------------------------------------------------
# programs


@dataclass(frozen=True)
class ProgramInfo:
    id: int
    type: int
    name: str
    tag: str
    run_time_ns: int
    run_cnt: int
    recursion_misses: int
    verified_insns: int
    xlated_prog_len: int
    jited_prog_len: int


def program_info(prog: "Program | int") -> ProgramInfo:
    """bpf_obj_get_info_by_fd on a program (or a raw program fd).

    run_time_ns/run_cnt only advance while stats are enabled (enable_stats()).
    """
    fd = prog.fd if isinstance(prog, Program) else int(prog)
    info = _BpfProgInfo()
    info_len = c_uint32(sizeof(info))
    call = _Call(f"bpf_obj_get_info_by_fd(prog fd {fd})")
    call.check_int(_lib().bpf_obj_get_info_by_fd(fd, byref(info), byref(info_len)))
    return ProgramInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        tag=bytes(info.tag).hex(),
        run_time_ns=info.run_time_ns,
        run_cnt=info.run_cnt,
        recursion_misses=info.recursion_misses,
        verified_insns=info.verified_insns,
        xlated_prog_len=info.xlated_prog_len,
        jited_prog_len=info.jited_prog_len,
    )


def enable_stats() -> int:
    """Turn on BPF run-time stats (BPF_STATS_RUN_TIME); returns an fd.

    Stats stay on while the fd is open: keep it, and os.close() it when done.
    """
    call = _Call("bpf_enable_stats(BPF_STATS_RUN_TIME)")
    return call.check_int(_lib().bpf_enable_stats(BPF_STATS_RUN_TIME))


def perf_event_open_cpu_clock(cpu: int, frequency_hz: int = 0, period_ns: int = 0) -> int:
    """perf_event_open for the software cpu-clock event on one CPU, all tasks: sampled
    `frequency_hz` times a second (profile), or once every `period_ns` of that CPU's clock
    (interval)."""
    nr = _SYS_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise BpfError(f"perf_event_open: unknown syscall number on {platform.machine()}")
    attr = _PerfEventAttr()
    attr.type = PERF_TYPE_SOFTWARE
    attr.size = sizeof(attr)
    attr.config = PERF_COUNT_SW_CPU_CLOCK
    attr.sample_period_or_freq = period_ns or frequency_hz
    attr.flags = 0 if period_ns else _PERF_ATTR_FREQ
    fd = _libc.syscall(nr, ctypes.addressof(attr), -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        what = f"every {period_ns} ns" if period_ns else f"{frequency_hz} Hz"
        raise BpfError(f"perf_event_open(cpu-clock, cpu {cpu}, {what})", err)
    return fd


def _kprobe_hint(err: int) -> str | None:
    if err in (_errno.ENOENT, _errno.EOPNOTSUPP) and not any(
        os.path.exists(p)
        for p in (
            "/sys/bus/event_source/devices/kprobe/type",
            "/sys/kernel/tracing/kprobe_events",
            "/sys/kernel/debug/tracing/kprobe_events",
        )
    ):
        return "this kernel has no kprobe support (CONFIG_KPROBES off): use a tracepoint (tp/, raw_tp/, tp_btf/) instead"
    if err == _errno.ENOENT:
        return "the kernel function may not exist or may be inlined (see /proc/kallsyms)"
    return None


def _tracefs_hint(err: int) -> str | None:
    if err == _errno.ENOENT and not os.path.ismount("/sys/kernel/tracing"):
        return "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing"
    if err == _errno.ENOENT:
        return "no such tracepoint: see /sys/kernel/tracing/events/"
    return None


def _load_hint(err: int) -> str | None:
    if err == _errno.EPERM:
        return "EPERM on load: needs root/CAP_BPF+CAP_PERFMON; fentry/fexit are locked down on some kernels"
    if err == _errno.EACCES:
        return "the verifier rejected a program: see its log above"
    return None


class Program:
    """One program of a BpfObject (struct bpf_program)."""

    def __init__(self, obj: "BpfObject", ptr: int):
        self._obj = obj
        self._ptr = ptr
        lib = _lib()
        self.name: str = lib.bpf_program__name(ptr).decode()
        self.section_name: str = (lib.bpf_program__section_name(ptr) or b"").decode()

    @property
    def ptr(self) -> int:
        self._obj._check_open()
        return self._ptr

    @property
    def fd(self) -> int:
        fd = _lib().bpf_program__fd(self.ptr)
        if fd < 0:
            raise BpfError(f"program '{self.name}' has no fd (object not loaded, or autoload off)")
        return fd

    @property
    def type(self) -> int:
        return _lib().bpf_program__type(self.ptr)

    @property
    def autoload(self) -> bool:
        return bool(_lib().bpf_program__autoload(self.ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        call = _Call(f"bpf_program__set_autoload({self.name}, {bool(value)})")
        call.check_int(_lib().bpf_program__set_autoload(self.ptr, bool(value)))

    def info(self) -> ProgramInfo:
        return program_info(self)

    def _link(self, ptr: int, description: str) -> Link:
        return self._obj._keep_link(Link(ptr, description, self._obj))

    def attach(self) -> Link:
        """Auto-attach from the SEC() name (tp/, raw_tp/, tp_btf/, uprobe/x:y, ...)."""
        call = _Call(f"bpf_program__attach({self.name}, SEC {self.section_name!r})")
        ptr = call.check_ptr(
            _lib().bpf_program__attach(self.ptr),
            lambda err: f"SEC({self.section_name!r}) names no attach target: use attach_uprobe(), "
            "attach_usdt(), attach_cpu_clock() or attach_tracepoint() with one"
            if err == _errno.EOPNOTSUPP
            else None,
        )
        return self._link(ptr, f"{self.name}@{self.section_name}")

    def attach_tracepoint(self, category: str, name: str) -> Link:
        call = _Call(f"bpf_program__attach_tracepoint({self.name} -> {category}:{name})")
        ptr = call.check_ptr(
            _lib().bpf_program__attach_tracepoint(self.ptr, category.encode(), name.encode()),
            _tracefs_hint,
        )
        return self._link(ptr, f"{self.name}@tracepoint:{category}:{name}")

    def attach_raw_tracepoint(self, name: str) -> Link:
        call = _Call(f"bpf_program__attach_raw_tracepoint({self.name} -> {name})")
        ptr = call.check_ptr(_lib().bpf_program__attach_raw_tracepoint(self.ptr, name.encode()))
        return self._link(ptr, f"{self.name}@raw_tp:{name}")

    def attach_kprobe(self, func_name: str, retprobe: bool = False) -> Link:
        kind = "kretprobe" if retprobe else "kprobe"
        call = _Call(f"bpf_program__attach_kprobe({self.name} -> {kind}:{func_name})")
        ptr = call.check_ptr(
            _lib().bpf_program__attach_kprobe(self.ptr, bool(retprobe), func_name.encode()),
            _kprobe_hint,
        )
        return self._link(ptr, f"{self.name}@{kind}:{func_name}")

    def attach_uprobe(
        self,
        binary_path: str | os.PathLike,
        func_name: str | None = None,
        offset: int = 0,
        *,
        retprobe: bool = False,
        pid: int = -1,
        cookie: int = 0,
        ref_ctr_offset: int = 0,
    ) -> Link:
        """uprobe/uretprobe on ``binary_path``.

        With ``func_name``, ``offset`` is relative to the symbol; without it,
        ``offset`` is a file offset.  ``pid`` -1 means every process.
        """
        opts = _UprobeOpts(
            sz=sizeof(_UprobeOpts),
            ref_ctr_offset=ref_ctr_offset,
            bpf_cookie=cookie,
            retprobe=bool(retprobe),
            func_name=_cstr(func_name),
        )
        kind = "uretprobe" if retprobe else "uprobe"
        where = f"{os.fspath(binary_path)}:{func_name or ''}{'+' if func_name and offset else ''}"
        where += f"{offset:#x}" if offset or not func_name else ""
        call = _Call(f"bpf_program__attach_uprobe_opts({self.name} -> {kind}:{where}, pid {pid})")
        ptr = call.check_ptr(
            _lib().bpf_program__attach_uprobe_opts(
                self.ptr, pid, _cstr(binary_path), offset, ctypes.addressof(opts)
            ),
            lambda err: f"no symbol '{func_name}' in {os.fspath(binary_path)}? check `nm -D`/`nm` on it"
            if err == _errno.ENOENT and func_name
            else None,
        )
        return self._link(ptr, f"{self.name}@{kind}:{where}")

    def attach_usdt(
        self,
        binary_path: str | os.PathLike,
        provider: str,
        name: str,
        *,
        pid: int = -1,
        cookie: int = 0,
    ) -> Link:
        opts = _UsdtOpts(sz=sizeof(_UsdtOpts), usdt_cookie=cookie)
        where = f"{os.fspath(binary_path)}:{provider}:{name}"
        call = _Call(f"bpf_program__attach_usdt({self.name} -> usdt:{where}, pid {pid})")
        ptr = call.check_ptr(
            _lib().bpf_program__attach_usdt(
                self.ptr, pid, _cstr(binary_path), provider.encode(), name.encode(), ctypes.addressof(opts)
            ),
            lambda err: f"no USDT probe {provider}:{name} in {os.fspath(binary_path)}? check `readelf -n`"
            if err == _errno.ENOENT
            else None,
        )
        return self._link(ptr, f"{self.name}@usdt:{where}")

    def attach_perf_event(self, pfd: int, description: str | None = None) -> Link:
        """Attach to an open perf event fd; the link takes ownership of ``pfd``."""
        call = _Call(f"bpf_program__attach_perf_event({self.name} -> perf fd {pfd})")
        ptr = call.check_ptr(_lib().bpf_program__attach_perf_event(self.ptr, pfd))
        return self._link(ptr, description or f"{self.name}@perf_event:fd{pfd}")

    def attach_cpu_clock(self, frequency_hz: int, cpus: Sequence[int] | None = None) -> LinkGroup:
        """``profile``: a software cpu-clock event at ``frequency_hz`` on each CPU."""
        links: list[Link] = []
        try:
            for cpu in online_cpus() if cpus is None else cpus:
                pfd = perf_event_open_cpu_clock(cpu, frequency_hz)
                try:
                    links.append(
                        self.attach_perf_event(pfd, f"{self.name}@profile:{frequency_hz}Hz:cpu{cpu}")
                    )
                except BaseException:
                    os.close(pfd)
                    raise
        except BaseException:
            for link in links:
                link.destroy()
            raise
        return LinkGroup(links, f"{self.name}@profile:{frequency_hz}Hz")

    def attach_interval(self, period_ns: int) -> LinkGroup:
        """``interval``: the cpu-clock event once every ``period_ns`` on one CPU (the first
        online), as bpftrace's interval probes fire on one CPU."""
        cpu = online_cpus()[0]
        pfd = perf_event_open_cpu_clock(cpu, period_ns=period_ns)
        try:
            link = self.attach_perf_event(pfd, f"{self.name}@interval:{period_ns}ns:cpu{cpu}")
        except BaseException:
            os.close(pfd)
            raise
        return LinkGroup([link], f"{self.name}@interval:{period_ns}ns")

    def __repr__(self) -> str:
        return f"<Program {self.name} SEC {self.section_name!r}>"


# --------------------------------------------------------------------------
# maps


@dataclass(frozen=True)
class _MapIO:
    """What element access needs, read once after load (fixed from then on)."""

    fd: int
    key_size: int
    value_size: int
    buffer_size: int  # per-CPU: slot * possible CPUs
    slot: int  # per-CPU: value_size rounded up to 8; else value_size
    percpu: bool


class Map:
    """One map of a BpfObject.  Keys and values are raw bytes.

    Per-CPU maps take and return a list with one ``value_size`` bytes value
    per possible CPU.
    """

    def __init__(self, obj: "BpfObject", ptr: int):
        self._obj = obj
        self._ptr = ptr
        self._io_cache: _MapIO | None = None
        self.name: str = _lib().bpf_map__name(ptr).decode()

    def _io(self) -> _MapIO:
        io = self._io_cache
        if io is None:
            fd = self.fd  # raises before load
            percpu = self.is_percpu
            vs = self.value_size
            slot = _round8(vs) if percpu else vs
            io = _MapIO(fd, self.key_size, vs, self.value_buffer_size, slot, percpu)
            self._io_cache = io
        elif self._obj._ptr is None:
            raise BpfError(f"BPF object {self._obj.path} is closed")
        return io

    @property
    def ptr(self) -> int:
        self._obj._check_open()
        return self._ptr

    @property
    def fd(self) -> int:
        fd = _lib().bpf_map__fd(self.ptr)
        if fd < 0:
            raise BpfError(f"map '{self.name}' has no fd: load the object first")
        return fd

    @property
    def type(self) -> int:
        return _lib().bpf_map__type(self.ptr)

    @property
    def key_size(self) -> int:
        return _lib().bpf_map__key_size(self.ptr)

    @property
    def value_size(self) -> int:
        return _lib().bpf_map__value_size(self.ptr)

    @property
    def max_entries(self) -> int:
        return _lib().bpf_map__max_entries(self.ptr)

    @property
    def flags(self) -> int:
        return _lib().bpf_map__map_flags(self.ptr)

    @property
    def is_percpu(self) -> bool:
        return self.type in MapType.PERCPU

    @property
    def value_buffer_size(self) -> int:
        """Bytes the kernel reads/writes per value (per-CPU: 8-aligned slot per CPU)."""
        if self.is_percpu:
            return _round8(self.value_size) * num_possible_cpus()
        return self.value_size

    def set_max_entries(self, n: int) -> None:
        if self._obj.loaded:
            raise BpfError(f"set_max_entries({self.name}): object already loaded")
        call = _Call(f"bpf_map__set_max_entries({self.name}, {n})")
        call.check_int(_lib().bpf_map__set_max_entries(self.ptr, n))

    def reuse_fd(self, other: "Map") -> None:
        """Before load: use ``other``'s kernel map instead of creating one, so a second object's
        programs read and write the same entries (libbpf dups the fd)."""
        if self._obj.loaded:
            raise BpfError(f"reuse_fd({self.name}): object already loaded")
        call = _Call(f"bpf_map__reuse_fd({self.name})")
        call.check_int(_lib().bpf_map__reuse_fd(self.ptr, other.fd))

    # -- element access

    def _key(self, io: _MapIO, key: bytes) -> bytes:
        if len(key) != io.key_size:
            raise ValueError(f"map '{self.name}': key is {len(key)} bytes, expected {io.key_size}")
        return bytes(key)  # passed as a read-only pointer

    @staticmethod
    def _split_value(io: _MapIO, raw: bytes) -> bytes | list[bytes]:
        if not io.percpu:
            return raw
        vs = io.value_size
        return [raw[i : i + vs] for i in range(0, len(raw), io.slot)]

    def _pack_value(self, io: _MapIO, value: bytes | Sequence[bytes]) -> ctypes.Array:
        size = io.buffer_size
        if io.percpu and not isinstance(value, (bytes, bytearray, memoryview)):
            values = list(value)
            ncpu = num_possible_cpus()
            if len(values) != ncpu:
                raise ValueError(f"map '{self.name}': {len(values)} per-CPU values, expected {ncpu}")
            buf = ctypes.create_string_buffer(size)
            for i, v in enumerate(values):
                v = bytes(v)
                if len(v) != io.value_size:
                    raise ValueError(f"map '{self.name}': value is {len(v)} bytes, expected {io.value_size}")
                ctypes.memmove(ctypes.addressof(buf) + i * io.slot, v, len(v))
            return buf
        value = bytes(value)
        if len(value) != size:
            raise ValueError(f"map '{self.name}': value is {len(value)} bytes, expected {size}")
        return ctypes.create_string_buffer(value, size)

    def lookup(self, key: bytes) -> bytes | list[bytes] | None:
        """The value at ``key`` (per-CPU maps: list per CPU), or None if absent."""
        io = self._io_cache or self._io()
        if self._obj._ptr is None:
            self._io()  # raises "closed"
        if len(key) != io.key_size:
            self._key(io, key)  # raises ValueError
        vbuf = (c_char * io.buffer_size)()
        ret = _lib_handle.bpf_map_lookup_elem(io.fd, bytes(key), vbuf)
        if ret < 0:
            if ret == -_errno.ENOENT:
                return None
            raise BpfError(f"bpf_map_lookup_elem({self.name})", -ret)
        if not io.percpu:
            return vbuf.raw
        raw, vs = vbuf.raw, io.value_size
        return [raw[i : i + vs] for i in range(0, len(raw), io.slot)]

    def update(self, key: bytes, value: bytes | Sequence[bytes], flags: int = BPF_ANY) -> None:
        io = self._io()
        ret = _lib().bpf_map_update_elem(io.fd, self._key(io, key), self._pack_value(io, value), flags)
        if ret < 0:
            raise BpfError(f"bpf_map_update_elem({self.name})", -ret)

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there."""
        io = self._io()
        ret = _lib().bpf_map_delete_elem(io.fd, self._key(io, key))
        if ret < 0:
            if -ret == _errno.ENOENT:
                return False
            raise BpfError(f"bpf_map_delete_elem({self.name})", -ret)
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key, via bpf_map_get_next_key (a concurrent delete may restart a hash walk)."""
        io = self._io()
        fd, ks = io.fd, io.key_size
        lib = _lib()
        prev = None
        nxt = ctypes.create_string_buffer(ks)
        while True:
            ret = lib.bpf_map_get_next_key(fd, prev, nxt)
            if ret < 0:
                if -ret == _errno.ENOENT:
                    return
                raise BpfError(f"bpf_map_get_next_key({self.name})", -ret)
            prev = nxt.raw
            yield prev

    def items(self) -> list[tuple[bytes, bytes | list[bytes]]]:
        """(key, value) pairs with one lookup per key."""
        out = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted meanwhile
                out.append((key, value))
        return out

    def items_batch(self, chunk: int | None = None) -> list[tuple[bytes, bytes | list[bytes]]]:
        """(key, value) pairs with bpf_map_lookup_batch; per-key lookups where unsupported."""
        io = self._io()
        fd, ks, vs = io.fd, io.key_size, io.buffer_size
        lib = _lib()
        max_entries = self.max_entries
        cap = max(1, min(max_entries, chunk or 4096))
        token = max(ks, 8)  # hash maps use a u32 bucket index, arrays a key
        in_batch = ctypes.create_string_buffer(token)
        out_batch = ctypes.create_string_buffer(token)
        opts = _MapBatchOpts(sz=sizeof(_MapBatchOpts))
        out: list[tuple[bytes, bytes | list[bytes]]] = []
        first = True
        keys = values = None
        while True:
            if keys is None or len(keys) < ks * cap:
                keys = (c_char * (ks * cap))()
                values = (c_char * (vs * cap))()
            count = c_uint32(cap)
            ret = lib.bpf_map_lookup_batch(
                fd, None if first else in_batch, out_batch, keys, values, byref(count), byref(opts)
            )
            err = -ret if ret < 0 else 0
            if err and err != _errno.ENOENT:
                if first and err in (_errno.EINVAL, _errno.EOPNOTSUPP, ENOTSUPP):
                    return self.items()
                if err == _errno.ENOSPC and cap < (1 << 20):  # a hash bucket larger than cap
                    cap *= 2
                    continue
                raise BpfError(f"bpf_map_lookup_batch({self.name})", err)
            n = count.value
            kraw, vraw = keys.raw, values.raw
            if io.percpu:
                size, slot = io.value_size, io.slot
                out.extend(
                    (kraw[i * ks : i * ks + ks], [vraw[j : j + size] for j in range(i * vs, i * vs + vs, slot)])
                    for i in range(n)
                )
            else:
                out.extend((kraw[i * ks : i * ks + ks], vraw[i * vs : i * vs + vs]) for i in range(n))
            if err == _errno.ENOENT or n == 0:
                return out
            if len(out) >= max_entries:  # full walk of an array: skip the final ENOENT round
                return out
            ctypes.memmove(in_batch, out_batch, token)
            first = False

    def count_entries(self) -> int:
        """Number of keys present (for map fullness: count_entries() / max_entries)."""
        return sum(1 for _ in self.keys())

    def __repr__(self) -> str:
        return f"<Map {self.name} type={self.type} key={self.key_size} value={self.value_size} max={self.max_entries}>"


# --------------------------------------------------------------------------
# the object


class BpfObject:
    """A BPF ELF object: open, configure, load, attach, read; close when done."""

    def __init__(self, ptr: int, path: str):
        self._ptr: int | None = ptr
        self.path = path
        self.loaded = False
        self._links: list[Link] = []
        lib = _lib()
        self.name: str = (lib.bpf_object__name(ptr) or b"").decode()
        self.programs: dict[str, Program] = {}
        p = lib.bpf_object__next_program(ptr, None)
        while p:
            prog = Program(self, p)
            self.programs[prog.name] = prog
            p = lib.bpf_object__next_program(ptr, p)
        self.maps: dict[str, Map] = {}
        m = lib.bpf_object__next_map(ptr, None)
        while m:
            bmap = Map(self, m)
            self.maps[bmap.name] = bmap
            m = lib.bpf_object__next_map(ptr, m)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "BpfObject":
        path = os.fspath(path)
        lib = _lib()
        call = _Call(f"bpf_object__open_file({path})")
        ptr = call.check_ptr(lib.bpf_object__open_file(os.fsencode(path), None))
        return cls(ptr, path)

    # -- lifetime

    def _check_open(self) -> None:
        if self._ptr is None:
            raise BpfError(f"BPF object {self.path} is closed")

    def _keep_link(self, link: Link) -> Link:
        self._links.append(link)
        return link

    def _forget_link(self, link: Link) -> None:
        try:
            self._links.remove(link)
        except ValueError:
            pass

    @property
    def links(self) -> list[Link]:
        return list(self._links)

    def destroy_links(self) -> None:
        for link in reversed(self.links):
            try:
                link.destroy()
            except BpfError as exc:
                _log.warning("%s", exc)

    def close(self) -> None:
        """Destroy every link made through this object, then close it."""
        if self._ptr is None:
            return
        self.destroy_links()
        ptr, self._ptr = self._ptr, None
        _lib().bpf_object__close(ptr)

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- lookup by name

    def program(self, name: str) -> Program:
        try:
            return self.programs[name]
        except KeyError:
            raise KeyError(f"no program '{name}' in {self.path}; have: {', '.join(sorted(self.programs))}") from None

    def map(self, name: str) -> Map:
        """A map by its libbpf name; internal maps also by section (".rodata", ".bss")."""
        if name in self.maps:
            return self.maps[name]
        self._check_open()
        ptr = _lib().bpf_object__find_map_by_name(self._ptr, name.encode())
        if ptr:
            for m in self.maps.values():
                if m._ptr == ptr:
                    return m
        raise KeyError(f"no map '{name}' in {self.path}; have: {', '.join(sorted(self.maps))}")

    # -- settings before load

    def set_autoload(self, prog_name: str, autoload: bool) -> None:
        self._before_load("set_autoload")
        self.program(prog_name).autoload = autoload

    def set_max_entries(self, map_name: str, n: int) -> None:
        self._before_load("set_max_entries")
        self.map(map_name).set_max_entries(n)

    def _before_load(self, what: str) -> None:
        self._check_open()
        if self.loaded:
            raise BpfError(f"{what}: {self.path} is already loaded (settings apply before load)")

    def _section_buffer(self, section: str) -> tuple[int, int]:
        bmap = self.map(section)
        size = c_size_t(0)
        addr = _lib().bpf_map__initial_value(bmap.ptr, byref(size))
        if not addr:
            raise BpfError(f"bpf_map__initial_value({section}): no initial value buffer")
        return addr, size.value

    def rodata_buffer(self, section: str = ".rodata") -> bytes:
        """A copy of the section's initial contents (what load() will freeze)."""
        self._check_open()
        addr, size = self._section_buffer(section)
        return ctypes.string_at(addr, size)

    def write_rodata(self, offset: int, data: bytes, section: str = ".rodata") -> None:
        """Write ``data`` at ``offset`` into the section's initial value, before load."""
        self._before_load("write_rodata")
        addr, size = self._section_buffer(section)
        data = bytes(data)
        if offset < 0 or offset + len(data) > size:
            raise ValueError(f"write_rodata: [{offset}, {offset + len(data)}) outside {section} of {size} bytes")
        ctypes.memmove(addr + offset, data, len(data))

    def rodata_variables(self, section: str = ".rodata") -> dict[str, tuple[int, int]]:
        """name -> (offset, size) of the section's variables, from the object's BTF."""
        self._check_open()
        lib = _lib()
        btf = lib.bpf_object__btf(self._ptr)
        if not btf:
            raise BpfError(f"{self.path} has no BTF: build it with clang -g")
        type_id = lib.btf__find_by_name_kind(btf, section.encode(), BTF_KIND_DATASEC)
        if type_id < 0:
            raise BpfError(f"no BTF DATASEC '{section}' in {self.path}", -type_id)
        t = _BtfType.from_address(lib.btf__type_by_id(btf, type_id))
        vlen = t.info & 0xFFFF
        base = ctypes.addressof(t) + sizeof(_BtfType)
        out = {}
        for i in range(vlen):
            si = _BtfVarSecinfo.from_address(base + i * sizeof(_BtfVarSecinfo))
            var = _BtfType.from_address(lib.btf__type_by_id(btf, si.type))
            out[lib.btf__name_by_offset(btf, var.name_off).decode()] = (si.offset, si.size)
        return out

    def set_rodata(self, name: str, value: bytes, section: str = ".rodata") -> None:
        """Set one ``const volatile`` global by name (size must match exactly)."""
        variables = self.rodata_variables(section)
        if name not in variables:
            raise KeyError(f"no variable '{name}' in {section} of {self.path}; have: {', '.join(sorted(variables))}")
        offset, size = variables[name]
        if len(value) != size:
            raise ValueError(f"{section} variable '{name}' is {size} bytes, got {len(value)}")
        self.write_rodata(offset, value, section)

    # -- load

    def load(self) -> None:
        self._before_load("load")
        call = _Call(f"bpf_object__load({self.path})")
        call.check_int(_lib().bpf_object__load(self._ptr), _load_hint)
        self.loaded = True

    def attach(self, prog_name: str) -> Link:
        """Auto-attach one program from its SEC() name."""
        return self.program(prog_name).attach()

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else ("loaded" if self.loaded else "opened")
        return f"<BpfObject {self.path} {state} programs={list(self.programs)} maps={list(self.maps)}>"


# --------------------------------------------------------------------------
# ring buffer

_SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)
_CALLBACK_RAISED = -_errno.ECANCELED


class RingBuffer:
    """ring_buffer__new/poll/consume over one or more BPF_MAP_TYPE_RINGBUF maps.

    ``callback(data: bytes)`` runs on the polling thread.  If it raises, the
    poll stops (that sample counts as consumed) and the exception is re-raised
    from poll()/consume().
    """

    def __init__(self, bmap: Map, callback: Callable[[bytes], object]):
        self._ptr: int | None = None
        self._callbacks: list = []  # ctypes callback objects must outlive the ring buffer
        self._pending: BaseException | None = None
        self._maps = [bmap]
        cb = self._make_callback(callback)
        call = _Call(f"ring_buffer__new({bmap.name})")
        self._ptr = call.check_ptr(_lib().ring_buffer__new(bmap.fd, ctypes.cast(cb, c_void_p), None, None))

    def _make_callback(self, callback: Callable[[bytes], object]):
        def trampoline(_ctx, data, size):
            try:
                callback(ctypes.string_at(data, size))
                return 0
            except BaseException as exc:  # noqa: BLE001 - re-raised after poll
                if self._pending is None:
                    self._pending = exc
                return _CALLBACK_RAISED

        cb = _SAMPLE_FN(trampoline)
        self._callbacks.append(cb)
        return cb

    def add(self, bmap: Map, callback: Callable[[bytes], object]) -> None:
        cb = self._make_callback(callback)
        call = _Call(f"ring_buffer__add({bmap.name})")
        call.check_int(_lib().ring_buffer__add(self._check(), bmap.fd, ctypes.cast(cb, c_void_p), None))
        self._maps.append(bmap)

    def _check(self) -> int:
        if self._ptr is None:
            raise BpfError("ring buffer is closed")
        return self._ptr

    def _finish(self, op: str, ret: int) -> int:
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc
        if ret == -_errno.EINTR:
            return 0
        if ret < 0:
            raise BpfError(op, -ret)
        return ret

    def poll(self, timeout_ms: int = 100) -> int:
        """Wait up to ``timeout_ms`` for data, consume it; returns samples consumed."""
        ret = _lib().ring_buffer__poll(self._check(), timeout_ms)
        return self._finish("ring_buffer__poll", ret)

    def consume(self) -> int:
        """Consume whatever is ready without waiting; returns samples consumed."""
        ret = _lib().ring_buffer__consume(self._check())
        return self._finish("ring_buffer__consume", ret)

    def epoll_fd(self) -> int:
        return _lib().ring_buffer__epoll_fd(self._check())

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _lib().ring_buffer__free(ptr)

    def __enter__(self) -> "RingBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
