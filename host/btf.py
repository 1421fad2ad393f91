"""Kernel BTF: the names in a BTF blob (`/sys/kernel/btf/vmlinux`), read without libbpf."""

from __future__ import annotations

import struct


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
