"""What the build host knows: tracepoints and their fields, kernel functions and mechanisms,
binaries and their symbols. Every look-up degrades to `None` (unknown) rather than failing, so
that `probec check` runs without root and says which host checks it skipped.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path


TRACEFS_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


@dataclass(frozen=True)
class FormatField:
    name: str
    ctype: str
    offset: int
    size: int
    signed: bool
    array_len: int            # char name[16] -> 16; 0 for scalars

    @property
    def is_string(self) -> bool:
        return self.array_len > 0 and self.ctype.split()[-1] == "char"


class HostInfo:
    """Facts about this machine, each read once."""

    def __init__(self, enabled: bool = True, tracefs_roots: tuple[str, ...] = TRACEFS_ROOTS,
                 btf_path: str = "/sys/kernel/btf/vmlinux"):
        self.enabled = enabled
        self.tracefs_roots = tracefs_roots
        self.btf_path = btf_path

    @functools.cached_property
    def tracefs(self) -> Path | None:
        if not self.enabled:
            return None
        for root in self.tracefs_roots:
            if os.access(os.path.join(root, "events"), os.R_OK) and os.path.isdir(os.path.join(root, "events", "sched")):
                return Path(root)
        return None

    @functools.cached_property
    def tracepoints(self) -> set[str] | None:
        """`category:name` of every tracepoint, or None where tracefs is not readable."""
        if self.tracefs is None:
            return None
        try:
            text = (self.tracefs / "available_events").read_text()
        except OSError:
            return None
        return set(text.split())

    @functools.cached_property
    def btf_tracepoints(self) -> set[str] | None:
        """Tracepoint names (without category) from kernel BTF, where tracefs is not readable:
        every tracepoint has a `btf_trace_NAME` typedef. None when BTF is not readable either."""
        if not self.enabled:
            return None
        names = btf_strings(self.btf_path)
        if names is None:
            return None
        return {n[len("btf_trace_"):] for n in names if n.startswith("btf_trace_")}

    @functools.lru_cache(maxsize=None)
    def tracepoint_format(self, category: str, name: str) -> dict[str, FormatField] | None:
        if self.tracefs is None:
            return None
        try:
            text = (self.tracefs / "events" / category / name / "format").read_text()
        except OSError:
            return None
        return parse_format(text)

    @functools.cached_property
    def kernel_functions(self) -> set[str] | None:
        """Names of kernel functions (text symbols), or None when they cannot be read."""
        if not self.enabled:
            return None
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

    @functools.cached_property
    def has_kprobes(self) -> bool | None:
        if not self.enabled:
            return None
        if os.path.exists("/sys/bus/event_source/devices/kprobe"):
            return True
        if self.tracefs is not None:
            return (self.tracefs / "kprobe_events").exists()
        return False

    @functools.cached_property
    def has_fentry(self) -> bool | None:
        """Loading a do-nothing fentry program is the only honest test; needs root and libbpf."""
        if not self.enabled:
            return None
        try:
            from ...runtime.features import probe_fentry
        except ImportError:  # pragma: no cover - runtime is part of the package
            return None
        return probe_fentry()

    def binary(self, path: str):
        return _open_elf(path)


@functools.lru_cache(maxsize=64)
def _open_elf(path: str):
    from ...runtime import elf
    return elf.ElfFile(path)


_FIELD = re.compile(r"field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);")


def parse_format(text: str) -> dict[str, FormatField]:
    """Fields of a tracefs `format` file, without the common_* header fields."""
    fields: dict[str, FormatField] = {}
    for m in _FIELD.finditer(text):
        decl = m.group("decl").strip()
        array_len = 0
        am = re.fullmatch(r"(.*?)\s*\b([A-Za-z_][A-Za-z0-9_]*)\s*\[(\d*)\]", decl)
        if am:
            ctype, name = am.group(1), am.group(2)
            array_len = int(am.group(3) or 0) or int(m.group("size"))
        else:
            nm = re.fullmatch(r"(.*?)\s*\*?\s*\b([A-Za-z_][A-Za-z0-9_]*)", decl)
            if not nm:
                continue
            ctype, name = decl[: nm.start(2)].strip(), nm.group(2)
        if name.startswith("common_"):
            continue
        fields[name] = FormatField(name, ctype, int(m.group("off")), int(m.group("size")),
                                   m.group("signed") == "1", array_len)
    return fields


def btf_strings(path: str) -> set[str] | None:
    """All names in a BTF blob's string section (header: magic, version, flags, hdr_len,
    type_off, type_len, str_off, str_len)."""
    import struct
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
