"""Reading an x86-64 ELF64 file: the identification and headers, sections, program segments,
virtual-address to file-offset translation, notes and the build-id.

Every problem with the file itself raises `ElfError` with the path in the message; a broken or
truncated file never surfaces as a `struct.error` or `IndexError`.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass


class ElfError(Exception):
    """A file that cannot be used as an ELF binary, or a name that does not resolve to one.

    Subclasses `Exception` directly until the project grows a common error base; `path` is the
    file or name that was asked for, `reason` the message without the path.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# ---------------------------------------------------------------------------------------------
# ELF constants (only the ones read here)

_ELFCLASS32, _ELFCLASS64 = 1, 2
_ELFDATA2LSB, _ELFDATA2MSB = 1, 2
_EM_NAMES = {3: "i386", 40: "arm", 62: "x86-64", 183: "aarch64", 243: "riscv"}
_ET_NAMES = {0: "NONE", 1: "REL", 2: "EXEC", 3: "DYN", 4: "CORE"}

_SHT_SYMTAB = 2
_SHT_NOTE = 7
_SHT_NOBITS = 8
_SHT_DYNSYM = 11
_SHT_GNU_VERDEF = 0x6FFFFFFD
_SHT_GNU_VERSYM = 0x6FFFFFFF

_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00
_SHN_XINDEX = 0xFFFF

_PT_LOAD = 1
_PF_X = 1

_NT_GNU_BUILD_ID = 3

_VER_FLG_BASE = 0x1
_VERSYM_HIDDEN = 0x8000

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_SYM = struct.Struct("<IBBHQQ")
_WORD = struct.Struct("<I")
_NHDR = struct.Struct("<III")
_VERDEF = struct.Struct("<HHHHIII")
_VERDAUX = struct.Struct("<II")


# ---------------------------------------------------------------------------------------------
# Plain data


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int

    @property
    def is_nobits(self) -> bool:
        return self.type == _SHT_NOBITS


@dataclass(frozen=True)
class Segment:
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int
    align: int

    @property
    def is_load(self) -> bool:
        return self.type == _PT_LOAD

    @property
    def is_executable(self) -> bool:
        return bool(self.flags & _PF_X)


# ---------------------------------------------------------------------------------------------
# The file


class ElfFormat:
    """A read-only, memory-mapped ELF64 little-endian file: its headers, sections, segments and
    notes. `ElfFile` (symbols.py) adds the symbol tables and lookups.

    Headers are parsed on construction, notes on first use.
    Use as a context manager or call `close()` to release the mapping early.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._map = self._open()
        self.file_size = len(self._map)
        self._lock = threading.RLock()
        self._notes_cache: dict[str, list[tuple[str, int, bytes]]] = {}
        self._parse_header()
        self.sections = self._parse_sections()
        self.segments = self._parse_segments()
        self._load_segments = sorted((s for s in self.segments if s.is_load),
                                     key=lambda s: s.vaddr)
        self._section_by_name = {}
        for section in self.sections:
            self._section_by_name.setdefault(section.name, section)

    # -- lifecycle ------------------------------------------------------------------------

    def _open(self) -> mmap.mmap:
        try:
            # O_NONBLOCK: a FIFO without a writer would block the open; it is refused below.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ElfError(self.path, "no such file") from None
        except IsADirectoryError:
            raise ElfError(self.path, "is a directory, not an ELF file") from None
        except PermissionError:
            raise ElfError(self.path, "permission denied") from None
        except OSError as exc:
            raise ElfError(self.path, f"cannot open: {exc.strerror or exc}") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise ElfError(self.path, "is a directory, not an ELF file")
            if not stat.S_ISREG(info.st_mode):
                raise ElfError(self.path, "not a regular file")
            if info.st_size == 0:
                raise ElfError(self.path, "empty file, not an ELF file")
            try:
                return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise ElfError(self.path, f"cannot map file: {exc}") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a memoryview still points into it; the GC will release it
            pass

    def __enter__(self) -> ElfFormat:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    # -- bounded reads --------------------------------------------------------------------

    def _unpack(self, layout: struct.Struct, offset: int, what: str) -> tuple:
        if offset < 0 or offset + layout.size > self.file_size:
            raise self._truncated(what, offset, layout.size)
        return layout.unpack_from(self._map, offset)

    def _check_range(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > self.file_size:
            raise self._truncated(what, offset, size)

    def _bytes(self, offset: int, size: int, what: str) -> bytes:
        self._check_range(offset, size, what)
        return self._map[offset:offset + size]

    def _truncated(self, what: str, offset: int, size: int) -> ElfError:
        return ElfError(self.path, f"truncated or corrupt ELF file: {what} at offset {offset:#x} "
                                   f"({size} bytes) runs past the end of the file "
                                   f"({self.file_size} bytes)")

    def _string(self, table_offset: int, table_size: int, index: int, what: str) -> str:
        if index >= table_size:
            raise ElfError(self.path, f"corrupt ELF file: {what} name index {index} is outside "
                                      f"its string table ({table_size} bytes)")
        start = table_offset + index
        end = self._map.find(b"\0", start, table_offset + table_size)
        if end < 0:
            raise self._truncated(f"{what} name", start, table_size - index)
        return self._map[start:end].decode("utf-8", "replace")

    # -- headers --------------------------------------------------------------------------

    def _parse_header(self) -> None:
        ident = self._map[:16]
        if ident[:4] != b"\x7fELF":
            raise ElfError(self.path, f"not an ELF file (starts with {bytes(ident[:4])!r})")
        if len(ident) < 16:
            raise self._truncated("ELF identification", 0, 16)
        if ident[4] == _ELFCLASS32:
            raise ElfError(self.path, "32-bit ELF files are not supported (only ELF64)")
        if ident[4] != _ELFCLASS64:
            raise ElfError(self.path, f"invalid ELF class {ident[4]}")
        if ident[5] == _ELFDATA2MSB:
            raise ElfError(self.path, "big-endian ELF files are not supported")
        if ident[5] != _ELFDATA2LSB:
            raise ElfError(self.path, f"invalid ELF data encoding {ident[5]}")
        (_, e_type, e_machine, _, e_entry, e_phoff, e_shoff, _, _, e_phentsize, e_phnum,
         e_shentsize, e_shnum, e_shstrndx) = self._unpack(_EHDR, 0, "ELF header")
        self.elf_type = _ET_NAMES.get(e_type, f"TYPE_{e_type}")
        self.machine_id = e_machine
        self.machine = _EM_NAMES.get(e_machine, f"machine {e_machine}")
        self.entry = e_entry
        self._phoff, self._phentsize, self._phnum = e_phoff, e_phentsize, e_phnum
        self._shoff, self._shentsize, self._shnum = e_shoff, e_shentsize, e_shnum
        self._shstrndx = e_shstrndx

    def _parse_sections(self) -> tuple[Section, ...]:
        if self._shoff == 0:
            return ()
        if self._shentsize != _SHDR.size:
            raise ElfError(self.path, f"corrupt ELF file: section header size {self._shentsize}")
        first = self._unpack(_SHDR, self._shoff, "section header 0")
        count = self._shnum or first[5]  # e_shnum == 0: the real count is in section 0's size
        strndx = self._shstrndx if self._shstrndx != _SHN_XINDEX else first[6]
        raw = [self._unpack(_SHDR, self._shoff + i * _SHDR.size, f"section header {i}")
               for i in range(count)]
        names_offset = names_size = 0
        if 0 < strndx < count:
            names_offset, names_size = raw[strndx][4], raw[strndx][5]
            if names_offset + names_size > self.file_size:
                raise self._truncated("section name table", names_offset, names_size)
        sections = []
        for i, (name, typ, flags, addr, offset, size, link, info, align, entsize) in enumerate(raw):
            label = (self._string(names_offset, names_size, name, f"section {i}")
                     if names_size else "")
            sections.append(Section(i, label, typ, flags, addr, offset, size, link, info,
                                    align, entsize))
        return tuple(sections)

    def _parse_segments(self) -> tuple[Segment, ...]:
        if self._phoff == 0 or self._phnum == 0:
            return ()
        if self._phentsize != _PHDR.size:
            raise ElfError(self.path, f"corrupt ELF file: program header size {self._phentsize}")
        segments = []
        for i in range(self._phnum):
            typ, flags, offset, vaddr, _, filesz, memsz, align = self._unpack(
                _PHDR, self._phoff + i * _PHDR.size, f"program header {i}")
            segments.append(Segment(typ, flags, offset, vaddr, filesz, memsz, align))
        return tuple(segments)

    def section(self, name: str) -> Section | None:
        return self._section_by_name.get(name)

    def section_data(self, section: Section) -> bytes:
        if section.is_nobits:
            return b""
        return self._bytes(section.offset, section.size, f"section {section.name!r}")

    # -- addresses ------------------------------------------------------------------------

    def vaddr_to_file_offset(self, vaddr: int) -> int:
        """The file offset of link-time virtual address `vaddr` (what a uprobe attaches to),
        through the PT_LOAD segment that holds it."""
        for segment in self._load_segments:
            if segment.vaddr <= vaddr < segment.vaddr + segment.filesz:
                return vaddr - segment.vaddr + segment.offset
            if segment.vaddr <= vaddr < segment.vaddr + segment.memsz:
                raise ElfError(self.path, f"address {vaddr:#x} is in zero-filled memory "
                                          "(.bss), not backed by the file")
        raise ElfError(self.path, f"address {vaddr:#x} is not inside any PT_LOAD segment")

    def file_offset_to_vaddr(self, offset: int) -> int | None:
        """The link-time virtual address of file offset `offset`, or None when no PT_LOAD
        segment maps it."""
        for segment in self._load_segments:
            if segment.offset <= offset < segment.offset + segment.filesz:
                return offset - segment.offset + segment.vaddr
        return None

    # -- notes ----------------------------------------------------------------------------

    def notes(self, section: Section) -> list[tuple[str, int, bytes]]:
        """(owner, type, descriptor) of every note in a SHT_NOTE section."""
        cached = self._notes_cache.get(section.name)
        if cached is not None:
            return cached
        data = self.section_data(section)
        align = 8 if section.addralign == 8 else 4
        notes = []
        pos = 0
        while pos + _NHDR.size <= len(data):
            namesz, descsz, typ = _NHDR.unpack_from(data, pos)
            name_start = pos + _NHDR.size
            desc_start = pos + _align(_NHDR.size + namesz, align)
            end = _align(desc_start + descsz, align)
            if desc_start + descsz > len(data):
                raise ElfError(self.path, f"corrupt ELF file: note at offset "
                                          f"{section.offset + pos:#x} in {section.name} runs "
                                          "past the end of its section")
            owner = data[name_start:name_start + namesz].rstrip(b"\0").decode("ascii", "replace")
            notes.append((owner, typ, data[desc_start:desc_start + descsz]))
            pos = end
        self._notes_cache[section.name] = notes
        return notes

    @property
    def build_id(self) -> str | None:
        """The GNU build-id as lowercase hex, or None."""
        for section in self.sections:
            if section.type != _SHT_NOTE:
                continue
            for owner, typ, desc in self.notes(section):
                if owner == "GNU" and typ == _NT_GNU_BUILD_ID:
                    return desc.hex()
        return None


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
