"""Tracefs: where it is mounted, which tracepoints exist, and the field layout of each one's
`format` file. One reader for the compiler's host checks, the core runner's pre-load layout check
and `probec doctor`'s recorded host facts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

TRACEFS_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

_FIELD = re.compile(r"field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);")


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

    def to_list(self) -> list:
        return [self.name, self.ctype, self.offset, self.size, int(self.signed), self.array_len]

    @classmethod
    def from_list(cls, row: list) -> "FormatField":
        name, ctype, offset, size, signed, array_len = row
        return cls(str(name), str(ctype), int(offset), int(size), bool(signed), int(array_len))


def tracefs_root(roots: tuple[str, ...] = TRACEFS_ROOTS) -> Path | None:
    """The first readable tracefs mount with tracepoints under it, or None."""
    for root in roots:
        if os.access(os.path.join(root, "events"), os.R_OK) and os.path.isdir(os.path.join(root, "events", "sched")):
            return Path(root)
    return None


def available_events(root: Path) -> set[str] | None:
    """`category:name` of every tracepoint, or None when the list cannot be read."""
    try:
        return set((root / "available_events").read_text().split())
    except OSError:
        return None


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


def read_format(root: Path, category: str, name: str) -> dict[str, FormatField] | None:
    """A tracepoint's fields, or None when it has no readable format file."""
    try:
        text = (root / "events" / category / name / "format").read_text()
    except OSError:
        return None
    return parse_format(text)
