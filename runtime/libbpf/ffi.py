"""The C side: libc and libbpf.so.1, every function's argtypes/restype, and the C structs we mirror.

:func:`lib` loads libbpf.so.1 once per process, checks its version, declares every function of
:data:`PROTOTYPES` and routes libbpf's printf-style log through :func:`_on_libbpf_print` into
:data:`.errors.capture`.  The struct mirrors are checked against the C headers by
tests/test_libbpf_binding.py.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
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

from . import errors
from .errors import LibbpfMissing, capture

LIBBPF_SONAME = "libbpf.so.1"
MIN_VERSION = (1, 0)

# --------------------------------------------------------------------------
# libc: vsnprintf formats libbpf's printf-style message from its va_list; syscall opens perf events.

libc = ctypes.CDLL(None, use_errno=True)
libc.vsnprintf.restype = c_int
libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
libc.syscall.restype = c_long
libc.syscall.argtypes = [c_long, c_void_p, c_long, c_long, c_long, c_ulong]

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
        need = libc.vsnprintf(buf, _FIRST_TRY, fmt, ctypes.addressof(copy))
        if need < 0:
            return fmt.decode(errors="replace")
        if need < _FIRST_TRY:
            return buf.raw[:need].decode(errors="replace")
        buf = ctypes.create_string_buffer(need + 1)
        libc.vsnprintf(buf, need + 1, fmt, va_list)
        return buf.raw[:need].decode(errors="replace")
    # Elsewhere format once into a large buffer (truncates beyond 1 MiB).
    buf = ctypes.create_string_buffer(_FALLBACK_BUFFER)
    n = libc.vsnprintf(buf, _FALLBACK_BUFFER, fmt, va_list)
    return buf.value.decode(errors="replace") if n >= 0 else fmt.decode(errors="replace")


PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)  # libbpf_print_fn_t
SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)  # ring_buffer_sample_fn
PERF_SAMPLE_FN = CFUNCTYPE(None, c_void_p, c_int, c_void_p, c_uint32)  # perf_buffer_sample_fn
PERF_LOST_FN = CFUNCTYPE(None, c_void_p, c_int, c_uint64)  # perf_buffer_lost_fn


def _on_libbpf_print(level: int, fmt: bytes | None, va_list: int | None) -> int:
    try:
        if not capture.wants(level) or fmt is None:
            return 0
        message = _format_va(fmt, va_list) if va_list else fmt.decode(errors="replace")
        capture.print(level, message)
        return len(message)
    except Exception:  # never let an exception cross back into C
        return 0


_print_callback = PRINT_FN(_on_libbpf_print)  # module global: must stay alive


# --------------------------------------------------------------------------
# every libbpf function we call

_vp = c_void_p
PROTOTYPES: dict[str, tuple[object, list]] = {
    # version / misc
    "libbpf_major_version": (c_uint32, []),
    "libbpf_minor_version": (c_uint32, []),
    "libbpf_version_string": (c_char_p, []),
    "libbpf_strerror": (c_int, [c_int, c_char_p, c_size_t]),
    "libbpf_set_print": (_vp, [PRINT_FN]),
    "libbpf_num_possible_cpus": (c_int, []),
    # object
    "bpf_object__open_file": (_vp, [c_char_p, _vp]),
    "libbpf_probe_bpf_map_type": (c_int, [c_int, _vp]),
    "libbpf_probe_bpf_helper": (c_int, [c_int, c_int, _vp]),
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
    "bpf_program__insns": (_vp, [_vp]),
    "bpf_program__insn_cnt": (c_size_t, [_vp]),
    "bpf_program__set_insns": (c_int, [_vp, _vp, c_size_t]),
    "bpf_prog_load": (c_int, [c_int, c_char_p, c_char_p, _vp, c_size_t, _vp]),
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
    "bpf_map__set_type": (c_int, [_vp, c_int]),
    "bpf_map__set_key_size": (c_int, [_vp, c_uint32]),
    "bpf_map__set_value_size": (c_int, [_vp, c_uint32]),
    "bpf_map__set_map_flags": (c_int, [_vp, c_uint32]),
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
    # perf buffer (kernels without ring buffers)
    "perf_buffer__new": (_vp, [c_int, c_size_t, _vp, _vp, _vp, _vp]),
    "perf_buffer__poll": (c_int, [_vp, c_int]),
    "perf_buffer__consume": (c_int, [_vp]),
    "perf_buffer__free": (None, [_vp]),
    # BTF (to find .rodata variables by name)
    "btf__find_by_name_kind": (c_int, [_vp, c_char_p, c_uint32]),
    "btf__type_by_id": (_vp, [_vp, c_uint32]),
    "btf__name_by_offset": (c_char_p, [_vp, c_uint32]),
}

# Set once by lib(); code that already called lib() (a map's fd came from it) may use it directly.
handle: ctypes.CDLL | None = None
_lock = threading.Lock()


def claim_print() -> None:
    """libbpf's print callback is one per process: another user of the same libbpf.so.1 in this
    process (BCC's Python module sets its own when it loads a program) takes it away, and libbpf's
    log then never reaches the errors that need it. Set ours again before the calls whose log we read."""
    lib().libbpf_set_print(_print_callback)


def lib() -> ctypes.CDLL:
    """libbpf.so.1, loaded, version-checked and typed once per process."""
    global handle
    if handle is not None:
        return handle
    with _lock:
        if handle is not None:
            return handle
        name = os.environ.get("PROBEC_LIBBPF") or LIBBPF_SONAME
        try:
            loaded = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise LibbpfMissing(
                f"{name} not found: apt-get install libbpf1 (or set PROBEC_LIBBPF): {exc}"
            ) from None
        missing = [fn for fn in ("libbpf_major_version", "libbpf_minor_version") if not hasattr(loaded, fn)]
        if missing:
            raise LibbpfMissing(f"{name} is older than libbpf 0.6 (no {missing[0]}): needs libbpf >= 1.0")
        for fn in ("libbpf_major_version", "libbpf_minor_version"):
            getattr(loaded, fn).restype, getattr(loaded, fn).argtypes = PROTOTYPES[fn]
        version = (loaded.libbpf_major_version(), loaded.libbpf_minor_version())
        if version < MIN_VERSION:
            raise LibbpfMissing(
                f"needs libbpf >= {MIN_VERSION[0]}.{MIN_VERSION[1]}, found {version[0]}.{version[1]} ({name})"
            )
        for fn, (restype, argtypes) in PROTOTYPES.items():
            try:
                func = getattr(loaded, fn)
            except AttributeError:
                raise LibbpfMissing(
                    f"{name} {version[0]}.{version[1]} lacks {fn}(): needs libbpf >= 1.0"
                ) from None
            func.restype = restype
            func.argtypes = argtypes
        loaded.libbpf_set_print(_print_callback)

        def strerror(err: int) -> str:
            buf = ctypes.create_string_buffer(256)
            loaded.libbpf_strerror(-err, buf, sizeof(buf))
            return buf.value.decode(errors="replace")

        errors.libbpf_strerror = strerror
        handle = loaded
        return loaded


def libbpf_version() -> str:
    """The loaded libbpf's version string, e.g. ``v1.1``."""
    return (lib().libbpf_version_string() or b"?").decode()


def cstr(s: str | os.PathLike | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


# --------------------------------------------------------------------------
# struct mirrors


class _Opts(ctypes.Structure):
    """A libbpf ``struct *_opts``: its first field ``sz`` holds its own size, as LIBBPF_OPTS() fills it."""

    def __init__(self, **fields):
        super().__init__(sz=sizeof(self), **fields)


class ObjectOpenOpts(_Opts):  # struct bpf_object_open_opts (libbpf 1.1: 80 bytes)
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_attach_prog_fd", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_char_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class UprobeOpts(_Opts):  # struct bpf_uprobe_opts (libbpf 1.1: 40 bytes)
    _fields_ = [
        ("sz", c_size_t),
        ("ref_ctr_offset", c_size_t),
        ("bpf_cookie", c_uint64),
        ("retprobe", c_bool),
        ("func_name", c_char_p),
    ]


class UsdtOpts(_Opts):  # struct bpf_usdt_opts (16 bytes)
    _fields_ = [("sz", c_size_t), ("usdt_cookie", c_uint64)]


class MapBatchOpts(_Opts):  # struct bpf_map_batch_opts (24 bytes)
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class BpfMapInfo(ctypes.Structure):
    """The leading fields of struct bpf_map_info from linux/bpf.h (the kernel fills what fits)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class BpfProgInfo(ctypes.Structure):
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


class PerfEventAttr(ctypes.Structure):
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


class BtfType(ctypes.Structure):  # struct btf_type
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


class BtfVarSecinfo(ctypes.Structure):  # struct btf_var_secinfo
    _fields_ = [("type", c_uint32), ("offset", c_uint32), ("size", c_uint32)]


assert sizeof(ObjectOpenOpts) == 80 and ObjectOpenOpts.btf_custom_path.offset == 48
assert sizeof(UprobeOpts) == 40 and sizeof(UsdtOpts) == 16 and sizeof(MapBatchOpts) == 24
assert sizeof(BpfProgInfo) == 232 and BpfProgInfo.run_time_ns.offset == 192
assert sizeof(PerfEventAttr) == 128


class Closing:
    """A handle to a C object that close() frees: usable in `with`, and closed when collected."""

    def close(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
