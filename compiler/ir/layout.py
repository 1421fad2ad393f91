"""Struct layouts: one computation gives the C struct, the Python struct format and the manifest."""

from __future__ import annotations

from .nodes import Field, Layout, ValueType


def _scalar(name: str, kind: str, size: int, code: str, label: str = "") -> tuple:
    return (name, kind, 0, size, code, label)


def struct_layout(name: str, members: list[tuple[str, ValueType, str]], bucket: bool = False,
                  header: list[tuple[str, str, int, str]] | None = None) -> Layout:
    """Lay out members (name, type, label) so every field is naturally aligned.

    8-byte integers come first, then strings, then the 4-byte bucket index; the struct is padded
    to a multiple of 8 so that C and Python agree on its size without compiler-specific rules.
    `header` fields (name, kind, size, code) go first, as written.
    """
    planned: list[tuple] = []
    for hname, kind, size, code in header or []:
        planned.append((hname, kind, 0, size, code, ""))
    wide = [m for m in members if m[1].kind != "str"]
    strings = [m for m in members if m[1].kind == "str"]
    for mname, mtype, label in wide:
        planned.append(_scalar(mname, "signed" if mtype.signed else "unsigned", 8, "q" if mtype.signed else "Q", label))
    for mname, mtype, label in strings:
        planned.append((mname, "bytes", mtype.length, mtype.length, f"{mtype.length}s", label))
    if bucket:
        planned.append(_scalar("bucket", "unsigned", 4, "I"))
    fields: list[Field] = []
    offset = 0
    pad = 0
    for fname, kind, length, size, code, label in planned:
        align = min(size, 8) if kind != "bytes" else 1
        if offset % align:
            gap = align - offset % align
            fields.append(Field(f"__pad{pad}", "bytes", gap, gap, offset, f"{gap}x"))
            pad += 1
            offset += gap
        fields.append(Field(fname, kind, length, size, offset, code, label))
        offset += size
    if offset % 8 or offset == 0:
        gap = 8 - offset % 8 if offset % 8 else 8
        fields.append(Field(f"__pad{pad}", "bytes", gap, gap, offset, f"{gap}x"))
        offset += gap
    return Layout(name, tuple(fields), offset)


def u64_value(name: str) -> Layout:
    return Layout(name, (Field("value", "unsigned", 0, 8, 0, "Q"),), 8)


def u32_key(name: str) -> Layout:
    return Layout(name, (Field("index", "unsigned", 0, 4, 0, "I"),), 4)
