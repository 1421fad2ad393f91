"""SystemTap SDT (USDT) probes: the `.note.stapsdt` notes of an ELF file and their argument
operands."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .format import _SHT_NOTE, ElfError, ElfFormat

_NT_STAPSDT = 3
_STAPSDT_ADDRS = struct.Struct("<QQQ")


@dataclass(frozen=True)
class UsdtArgument:
    """One `SIZE@LOCATION` operand of a USDT probe, e.g. `-4@%edi`."""

    size: int  # bytes
    signed: bool
    location: str  # assembler operand: `%rdi`, `-80(%rbx)`, `$5`


@dataclass(frozen=True)
class UsdtProbe:
    """A SystemTap SDT probe. `pc` and `semaphore` are link-time virtual addresses, already
    corrected by the `.stapsdt.base` difference; `semaphore` is 0 when the probe has none."""

    provider: str
    name: str
    pc: int
    base: int  # the `.stapsdt.base` address recorded in the note
    semaphore: int
    arguments: str  # the raw argument string, e.g. "-4@%edi 8@%rsi"

    @property
    def args(self) -> tuple[UsdtArgument, ...]:
        parsed = []
        for operand in self.arguments.split():
            size_text, sep, location = operand.partition("@")
            if sep and size_text.lstrip("-").isdigit():
                size = int(size_text)
            else:  # old notes: no size prefix
                size, location = 8, operand
            parsed.append(UsdtArgument(abs(size), size < 0, location))
        return tuple(parsed)


def read_usdt_probes(elf: ElfFormat) -> list[UsdtProbe]:
    """The SystemTap SDT probes in `.note.stapsdt`, in note order.

    As the SDT note specification asks, when a `.stapsdt.base` section exists and its
    address differs from the base recorded in a note (the file was prelinked or otherwise
    moved after the notes were written), the difference is added to `pc` and `semaphore`.
    """
    section = elf.section(".note.stapsdt")
    if section is None or section.type != _SHT_NOTE:
        return []
    base_section = elf.section(".stapsdt.base")
    probes = []
    for owner, typ, desc in elf.notes(section):
        if owner != "stapsdt" or typ not in (1, 2, _NT_STAPSDT):
            continue
        if len(desc) < _STAPSDT_ADDRS.size:
            raise ElfError(elf.path, "corrupt ELF file: a .note.stapsdt note is too short")
        pc, base, semaphore = _STAPSDT_ADDRS.unpack_from(desc, 0)
        strings = desc[_STAPSDT_ADDRS.size:].split(b"\0")
        if len(strings) < 2:
            raise ElfError(elf.path, "corrupt ELF file: a .note.stapsdt note has no "
                                     "provider/name strings")
        provider = strings[0].decode("ascii", "replace")
        probe = strings[1].decode("ascii", "replace")
        arguments = strings[2].decode("ascii", "replace") if len(strings) > 2 else ""
        if base_section is not None and base and base_section.addr != base:
            shift = base_section.addr - base
            pc += shift
            if semaphore:
                semaphore += shift
        probes.append(UsdtProbe(provider, probe, pc, base, semaphore, arguments))
    return probes
