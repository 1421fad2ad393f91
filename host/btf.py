"""Kernel BTF: the names in a BTF blob (`/sys/kernel/btf/vmlinux`), read without libbpf."""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass


def btf_strings(path: str) -> set[str] | None:
    """All names in a BTF blob's string section (header: magic, version, flags, hdr_len,
    type_off, type_len, str_off, str_len), or None when the file is unreadable or not BTF."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < 24:
        return None
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != 0xEB9F:
        return None
    _type_off, _type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    start = hdr_len + str_off
    return {s.decode("ascii", "replace") for s in data[start:start + str_len].split(b"\0") if s}


# --- types ---------------------------------------------------------------------------------------
BTF_MAGIC = 0xEB9F
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG, KIND_ENUM64 = 8, 9, 10, 11, 18, 19
_EXTRA = {KIND_INT: 4, KIND_ARRAY: 12, 14: 4, 17: 4}                  # bytes after struct btf_type
_PER_MEMBER = {KIND_STRUCT: 12, KIND_UNION: 12, KIND_ENUM: 8, 13: 8, 15: 12, KIND_ENUM64: 12}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


@dataclass(frozen=True)
class Member:
    """A struct member as CO-RE sees it: its name, byte offset, and its type with typedefs and
    qualifiers stripped (kind, size in bytes, signedness; arrays: the element's and the count)."""
    name: str
    offset: int
    kind: str                 # int | ptr | enum | array | other
    size: int
    signed: bool = False
    elem_kind: str = ""       # arrays: int | ptr | enum | other
    elem_size: int = 0
    elem_signed: bool = False
    count: int = 0            # arrays: number of elements


class Btf:
    """The structs of a BTF blob, read without libbpf: enough to find a tracepoint's record type
    (`struct trace_event_raw_<class>`) and its members' offsets and kinds."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise ValueError("too short for BTF")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise ValueError("not BTF (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self.data = data
        self.strings = hdr_len + str_off
        self.strings_end = self.strings + str_len
        self.offsets = [0]            # type id -> position of its struct btf_type (id 0 is void)
        self.structs: dict[str, int] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, _ = struct.unpack_from("<III", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self.offsets.append(pos)
            if kind == KIND_STRUCT and name_off:
                self.structs.setdefault(self.name(name_off), len(self.offsets) - 1)
            pos += 12 + _EXTRA.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen

    @classmethod
    def from_file(cls, path: str) -> "Btf | None":
        """The BTF in `path`, or None when it cannot be read or is not BTF."""
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except (OSError, ValueError, struct.error):
            return None

    def name(self, off: int) -> str:
        at = self.strings + off
        return self.data[at:self.data.index(b"\0", at)].decode("ascii", "replace")

    def _type(self, type_id: int) -> tuple[int, int, int, int]:
        """(kind, vlen/info, size-or-type, position) of a type, with qualifiers and typedefs skipped."""
        for _ in range(32):
            if type_id == 0 or type_id >= len(self.offsets):
                return 0, 0, 0, 0
            pos = self.offsets[type_id]
            _, info, size_type = struct.unpack_from("<III", self.data, pos)
            kind = (info >> 24) & 0x1F
            if kind not in _MODIFIERS:
                return kind, info, size_type, pos
            type_id = size_type
        return 0, 0, 0, 0

    def _scalar(self, type_id: int) -> tuple[str, int, bool]:
        kind, info, size, pos = self._type(type_id)
        if kind == KIND_INT:
            encoding = struct.unpack_from("<I", self.data, pos + 12)[0]
            return "int", size, bool((encoding >> 24) & 1)
        if kind == KIND_PTR:
            return "ptr", 8, False
        if kind in (KIND_ENUM, KIND_ENUM64):
            return "enum", size, bool(info >> 31)
        return "other", 0, False

    def members(self, struct_name: str) -> list[Member] | None:
        """The members of `struct struct_name`, or None when there is no such struct."""
        type_id = self.structs.get(struct_name)
        if type_id is None:
            return None
        pos = self.offsets[type_id]
        _, info, _ = struct.unpack_from("<III", self.data, pos)
        bitfields = bool(info >> 31)
        out = []
        for i in range(info & 0xFFFF):
            name_off, mtype, moff = struct.unpack_from("<III", self.data, pos + 12 + 12 * i)
            bits = moff & 0xFFFFFF if bitfields else moff
            if bitfields and moff >> 24:      # a bitfield: CO-RE cannot load it directly
                out.append(Member(self.name(name_off), bits // 8, "other", 0))
                continue
            kind, _info, _size, apos = self._type(mtype)
            if kind == KIND_ARRAY:
                elem, _index, count = struct.unpack_from("<III", self.data, apos + 12)
                ekind, esize, esigned = self._scalar(elem)
                out.append(Member(self.name(name_off), bits // 8, "array", esize * count, False,
                                  ekind, esize, esigned, count))
            else:
                skind, ssize, ssigned = self._scalar(mtype)
                out.append(Member(self.name(name_off), bits // 8, skind, ssize, ssigned))
        return out


@functools.lru_cache(maxsize=4)
def load_btf(path: str) -> Btf | None:
    return Btf.from_file(path)


# --- tracepoint records --------------------------------------------------------------------------
RECORD_PREFIX = "trace_event_raw_"


SYS_ENTER_ARGS = 16          # offsetof(struct trace_event_raw_sys_enter, args): after ent and id


def _layout(members: list[Member]) -> tuple[tuple[str, int], ...]:
    return tuple((m.name, m.offset) for m in members if m.name not in ("ent", "__data"))


@functools.lru_cache(maxsize=4)
def _record_index(btf: Btf) -> dict[tuple, list[str]]:
    """Record types by their fields' names and offsets: a DEFINE_EVENT's record is its class's."""
    index: dict[tuple, list[str]] = {}
    for name in btf.structs:
        if name.startswith(RECORD_PREFIX):
            index.setdefault(_layout(btf.members(name) or []), []).append(name)
    return index


def _member_name(f) -> str:
    """A tracefs field's member name in the record: variable-length ones are __data_loc_NAME."""
    for loc in ("__data_loc", "__rel_loc"):
        if f.ctype.startswith(loc):
            return f"{loc}_{f.name}"
    return f.name


def tracepoint_type(btf: Btf, category: str, name: str, fields) -> str | None:
    """The record type (`struct trace_event_raw_...`) of tracepoint category:name in `btf`, whose
    members are its tracefs `fields` (name -> FormatField) at the same offsets: what CO-RE
    relocations read them through. None when BTF cannot tell (the fields are read at offsets).

    syscalls:sys_enter_* share `trace_event_raw_sys_enter` (their fields are args[i]) and
    sys_exit_* `trace_event_raw_sys_exit` (ret), as libbpf-tools reads them. Other events have
    `trace_event_raw_NAME`, or their class's record type, the one with the same fields; events of
    two classes with the same layout are ambiguous."""
    if category == "syscalls" and name.startswith(("sys_enter_", "sys_exit_")):
        struct_name = RECORD_PREFIX + ("sys_enter" if name.startswith("sys_enter_") else "sys_exit")
        members = {m.name: m for m in btf.members(struct_name) or []}
        if name.startswith("sys_enter_"):
            args = members.get("args")
            ok = args is not None and args.offset == SYS_ENTER_ARGS and args.elem_size == 8
        else:
            ok = "ret" in members and members["ret"].offset == SYS_ENTER_ARGS
        return struct_name if ok else None
    layout = tuple((_member_name(f), f.offset) for f in sorted(fields.values(), key=lambda f: f.offset))
    candidates = _record_index(btf).get(layout, [])
    own = RECORD_PREFIX + name
    if own in candidates:
        return own
    return candidates[0] if len(candidates) == 1 else None
