"""Maps: one :class:`Map` per struct bpf_map, its settings before load (max_entries, reuse_fd) and
its elements after (lookup, update, delete, key walk, batch lookup).  Keys and values are raw bytes;
per-CPU maps take and return one value per possible CPU."""

from __future__ import annotations

import ctypes
import errno as _errno
from ctypes import byref, c_char, c_uint32
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from . import ffi
from .errors import ENOTSUPP, BpfError, Call
from .ffi import BpfMapInfo, MapBatchOpts, lib

if TYPE_CHECKING:
    from .objects import BpfObject


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
    TASK_STORAGE = 29

    PERCPU = frozenset({PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE})


BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2


def num_possible_cpus() -> int:
    """Possible CPUs (the per-CPU map value count), via libbpf_num_possible_cpus."""
    global _possible_cpus
    if _possible_cpus is None:
        call = Call("libbpf_num_possible_cpus()")
        _possible_cpus = call.check_int(lib().libbpf_num_possible_cpus())
    return _possible_cpus


_possible_cpus: int | None = None


def _round8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class _MapIO:
    """What element access needs, read once after load (fixed from then on)."""

    fd: int
    key_size: int
    value_size: int
    buffer_size: int  # per-CPU: slot * possible CPUs
    slot: int  # per-CPU: value_size rounded up to 8; else value_size
    percpu: bool

    def split(self, raw: bytes) -> bytes | list[bytes]:
        """A value as the kernel wrote it: per-CPU maps, one ``value_size`` slice per CPU."""
        if not self.percpu:
            return raw
        vs = self.value_size
        return [raw[i : i + vs] for i in range(0, len(raw), self.slot)]


class Map:
    """One map of a BpfObject.  Keys and values are raw bytes.

    Per-CPU maps take and return a list with one ``value_size`` bytes value
    per possible CPU.
    """

    def __init__(self, obj: "BpfObject", ptr: int):
        self._obj = obj
        self._ptr = ptr
        self._io_cache: _MapIO | None = None
        self.name: str = lib().bpf_map__name(ptr).decode()

    def _io(self) -> _MapIO:
        io = self._io_cache
        if io is None:
            fd = self.fd  # raises before load
            percpu = self.is_percpu
            vs = self.value_size
            slot = _round8(vs) if percpu else vs
            io = _MapIO(fd, self.key_size, vs, self.value_buffer_size, slot, percpu)
            self._io_cache = io
        else:
            self._obj._check_open()
        return io

    @property
    def ptr(self) -> int:
        self._obj._check_open()
        return self._ptr

    @property
    def fd(self) -> int:
        fd = lib().bpf_map__fd(self.ptr)
        if fd < 0:
            raise BpfError(f"map '{self.name}' has no fd: load the object first")
        return fd

    @property
    def type(self) -> int:
        return lib().bpf_map__type(self.ptr)

    @property
    def key_size(self) -> int:
        return lib().bpf_map__key_size(self.ptr)

    @property
    def value_size(self) -> int:
        return lib().bpf_map__value_size(self.ptr)

    @property
    def max_entries(self) -> int:
        return lib().bpf_map__max_entries(self.ptr)

    @property
    def flags(self) -> int:
        return lib().bpf_map__map_flags(self.ptr)

    @property
    def is_percpu(self) -> bool:
        return self.type in MapType.PERCPU

    @property
    def value_buffer_size(self) -> int:
        """Bytes the kernel reads/writes per value (per-CPU: 8-aligned slot per CPU)."""
        if self.is_percpu:
            return _round8(self.value_size) * num_possible_cpus()
        return self.value_size

    # -- settings before load

    def _before_load(self, what: str) -> None:
        if self._obj.loaded:
            raise BpfError(f"{what}({self.name}): object already loaded")

    def set_max_entries(self, n: int) -> None:
        self._before_load("set_max_entries")
        call = Call(f"bpf_map__set_max_entries({self.name}, {n})")
        call.check_int(lib().bpf_map__set_max_entries(self.ptr, n))

    def set_shape(self, map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> None:
        """Make this map another type before load (a stand-in for one the kernel cannot create)."""
        self._before_load("set_shape")
        libbpf = lib()
        for op, fn, value in (("set_type", libbpf.bpf_map__set_type, map_type),
                              ("set_key_size", libbpf.bpf_map__set_key_size, key_size),
                              ("set_value_size", libbpf.bpf_map__set_value_size, value_size),
                              ("set_max_entries", libbpf.bpf_map__set_max_entries, max_entries),
                              ("set_map_flags", libbpf.bpf_map__set_map_flags, flags)):
            Call(f"bpf_map__{op}({self.name}, {value})").check_int(fn(self.ptr, value))
        self._io_cache = None

    def reuse_fd(self, other: "Map") -> None:
        """Before load: use ``other``'s kernel map instead of creating one, so a second object's
        programs read and write the same entries (libbpf dups the fd)."""
        self._before_load("reuse_fd")
        call = Call(f"bpf_map__reuse_fd({self.name})")
        call.check_int(lib().bpf_map__reuse_fd(self.ptr, other.fd))

    # -- element access

    def _key(self, io: _MapIO, key: bytes) -> bytes:
        if len(key) != io.key_size:
            raise ValueError(f"map '{self.name}': key is {len(key)} bytes, expected {io.key_size}")
        return bytes(key)  # passed as a read-only pointer

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

    def _failed(self, op: str, ret: int) -> BpfError:
        return BpfError(f"{op}({self.name})", -ret)

    def lookup(self, key: bytes) -> bytes | list[bytes] | None:
        """The value at ``key`` (per-CPU maps: list per CPU), or None if absent."""
        io = self._io_cache or self._io()
        if self._obj._ptr is None:
            self._io()  # raises "closed"
        if len(key) != io.key_size:
            self._key(io, key)  # raises ValueError
        vbuf = (c_char * io.buffer_size)()
        ret = ffi.handle.bpf_map_lookup_elem(io.fd, bytes(key), vbuf)  # loaded: io holds an fd
        if ret < 0:
            if ret == -_errno.ENOENT:
                return None
            raise self._failed("bpf_map_lookup_elem", ret)
        return io.split(vbuf.raw)

    def update(self, key: bytes, value: bytes | Sequence[bytes], flags: int = BPF_ANY) -> None:
        io = self._io()
        ret = lib().bpf_map_update_elem(io.fd, self._key(io, key), self._pack_value(io, value), flags)
        if ret < 0:
            raise self._failed("bpf_map_update_elem", ret)

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there."""
        io = self._io()
        ret = lib().bpf_map_delete_elem(io.fd, self._key(io, key))
        if ret < 0:
            if -ret == _errno.ENOENT:
                return False
            raise self._failed("bpf_map_delete_elem", ret)
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key, via bpf_map_get_next_key (a concurrent delete may restart a hash walk)."""
        io = self._io()
        fd, ks = io.fd, io.key_size
        libbpf = lib()
        prev = None
        nxt = ctypes.create_string_buffer(ks)
        while True:
            ret = libbpf.bpf_map_get_next_key(fd, prev, nxt)
            if ret < 0:
                if -ret == _errno.ENOENT:
                    return
                raise self._failed("bpf_map_get_next_key", ret)
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
        libbpf = lib()
        max_entries = self.max_entries
        cap = max(1, min(max_entries, chunk or 4096))
        token = max(ks, 8)  # hash maps use a u32 bucket index, arrays a key
        in_batch = ctypes.create_string_buffer(token)
        out_batch = ctypes.create_string_buffer(token)
        opts = MapBatchOpts()
        out: list[tuple[bytes, bytes | list[bytes]]] = []
        first = True
        keys = values = None
        while True:
            if keys is None or len(keys) < ks * cap:
                keys = (c_char * (ks * cap))()
                values = (c_char * (vs * cap))()
            count = c_uint32(cap)
            ret = libbpf.bpf_map_lookup_batch(
                fd, None if first else in_batch, out_batch, keys, values, byref(count), byref(opts)
            )
            err = -ret if ret < 0 else 0
            if err and err != _errno.ENOENT:
                if first and err in (_errno.EINVAL, _errno.EOPNOTSUPP, ENOTSUPP):
                    return self.items()
                if err == _errno.ENOSPC and cap < (1 << 20):  # a hash bucket larger than cap
                    cap *= 2
                    continue
                raise self._failed("bpf_map_lookup_batch", ret)
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


class _FdOwner:
    """What a Map asks of its object, for a map that no BpfObject owns (one BCC created)."""

    _ptr = 1
    loaded = True

    def _check_open(self) -> None:
        pass


class FdMap(Map):
    """A map known by its fd only (BCC made it): the same element access, batch lookups and
    ring buffers as a Map of a BpfObject; its type and sizes are the kernel's (bpf_obj_get_info_by_fd)."""

    def __init__(self, fd: int, name: str):
        info = BpfMapInfo()
        size = c_uint32(ctypes.sizeof(info))
        call = Call(f"bpf_obj_get_info_by_fd(map {name}, fd {fd})")
        call.check_int(lib().bpf_obj_get_info_by_fd(fd, byref(info), byref(size)))
        self._obj = _FdOwner()
        self._ptr = 0
        self._io_cache = None
        self._fd = fd
        self._info = info
        self.name = name

    @property
    def ptr(self) -> int:
        raise BpfError(f"map '{self.name}' is known by its fd only")

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def type(self) -> int:
        return self._info.type

    @property
    def key_size(self) -> int:
        return self._info.key_size

    @property
    def value_size(self) -> int:
        return self._info.value_size

    @property
    def max_entries(self) -> int:
        return self._info.max_entries

    @property
    def flags(self) -> int:
        return self._info.map_flags
