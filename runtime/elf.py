"""What a uprobe or USDT attachment needs to know about an x86-64 ELF file.

Pure Python (struct, mmap, ctypes): section and program headers, `.symtab`/`.dynsym` symbols
with their GNU symbol versions, SystemTap USDT notes, the build-id, virtual-address to
file-offset translation, function entry bytes, C++ demangling and name lookup with
"did you mean" suggestions. The compiler's checker and the runtime both use it, so it lives in
the runtime and imports nothing from the compiler.

Every problem with the file itself raises `ElfError` with the path in the message; a broken or
truncated file never surfaces as a `struct.error` or `IndexError`.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import difflib
import functools
import mmap
import os
import re
import stat
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence


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
_NT_STAPSDT = 3

_VER_FLG_BASE = 0x1
_VERSYM_HIDDEN = 0x8000

SYMBOL_TYPES = {0: "NOTYPE", 1: "OBJECT", 2: "FUNC", 3: "SECTION", 4: "FILE", 5: "COMMON",
                6: "TLS", 10: "GNU_IFUNC"}
SYMBOL_BINDS = {0: "LOCAL", 1: "GLOBAL", 2: "WEAK", 10: "GNU_UNIQUE"}
_FUNCTION_TYPES = frozenset({"FUNC", "GNU_IFUNC"})
_FUNCTION_TYPE_IDS = frozenset({2, 10})
_ADDRESSABLE_TYPE_IDS = frozenset({1, 2, 10})  # OBJECT, FUNC, GNU_IFUNC
_BIND_PREFERENCE = {"GLOBAL": 0, "WEAK": 1, "GNU_UNIQUE": 2, "LOCAL": 3}

ENDBR64 = b"\xf3\x0f\x1e\xfa"

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_SYM = struct.Struct("<IBBHQQ")
_WORD = struct.Struct("<I")
_NHDR = struct.Struct("<III")
_VERDEF = struct.Struct("<HHHHIII")
_VERDAUX = struct.Struct("<II")
_STAPSDT_ADDRS = struct.Struct("<QQQ")


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


@dataclass(frozen=True)
class Symbol:
    """One `.symtab` or `.dynsym` entry. `value` is the link-time virtual address."""

    name: str
    value: int
    size: int
    type: str  # FUNC, OBJECT, GNU_IFUNC, ... (SYMBOL_TYPES), or "TYPE_<n>"
    bind: str  # GLOBAL, WEAK, LOCAL, GNU_UNIQUE, or "BIND_<n>"
    shndx: int
    table: str  # ".symtab" or ".dynsym"
    version: str | None = None  # GNU symbol version of a defined .dynsym symbol
    hidden_version: bool = False  # `name@VER` rather than the default `name@@VER`

    @property
    def defined(self) -> bool:
        return self.shndx != _SHN_UNDEF

    @property
    def is_function(self) -> bool:
        return self.type in _FUNCTION_TYPES

    @property
    def demangled(self) -> str:
        return demangle(self.name)


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


# ---------------------------------------------------------------------------------------------
# Demangling


@functools.lru_cache(maxsize=1)
def _cxa_demangle():
    """`(__cxa_demangle, free)` from libstdc++/libc, or None when libstdc++ is missing."""
    try:
        libstdcxx = ctypes.CDLL("libstdc++.so.6")
        libc = ctypes.CDLL(None)
        fn = getattr(libstdcxx, "__cxa_demangle")
        free = libc.free
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    fn.restype = ctypes.c_void_p
    free.argtypes = [ctypes.c_void_p]
    free.restype = None
    return fn, free


@functools.lru_cache(maxsize=1 << 17)
def demangle(name: str) -> str:
    """The C++ demangled form of `name`, or `name` itself when it is not an Itanium-mangled
    name, cannot be demangled, or libstdc++ is not installed. A `@VERSION` suffix is dropped
    from mangled names."""
    if not name.startswith("_Z"):
        return name
    demangler = _cxa_demangle()
    if demangler is None:
        return name
    fn, free = demangler
    base = name.split("@", 1)[0]
    status = ctypes.c_int(0)
    try:
        raw = base.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name
    ptr = fn(raw, None, None, ctypes.byref(status))
    if not ptr:
        return name
    try:
        text = ctypes.string_at(ptr)
    finally:
        free(ptr)
    if status.value != 0:
        return name
    return text.decode("utf-8", "replace")


# Parsing demangled names back into "qualified name without parameters".

_CLONE_SUFFIX = re.compile(r"(?: \[clone [^\]]*\])+$")
_TRAILING_QUALIFIERS = (" const", " volatile", " &&", " &", " noexcept", " transaction_safe")
_ABI_TAG = re.compile(r"\[abi:[^\]]*\]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names the Itanium ABI writes as substitutions (St, Sa, Sb, Ss, Si, So, Sd), so they may not
# appear in the mangled text when they are the last component (constructors, destructors).
_ABBREVIATED_STD = frozenset({"allocator", "basic_string", "string", "basic_istream", "istream",
                              "basic_ostream", "ostream", "basic_iostream", "iostream"})


def _strip_qualifiers(text: str) -> str:
    """`f(int) const &` -> `f(int)`; anything not ending in a parameter list is left alone."""
    stripped = text
    while not stripped.endswith(")"):
        for qualifier in _TRAILING_QUALIFIERS:
            if stripped.endswith(qualifier):
                stripped = stripped[:-len(qualifier)]
                break
        else:
            return text
    return stripped


def _strip_clone_suffix(text: str) -> str:
    return _CLONE_SUFFIX.sub("", text) if " [clone " in text else text


def _strip_abi_tags(text: str) -> str:
    return _ABI_TAG.sub("", text) if "[abi:" in text else text


_NOT_NESTING_OR_SPACE = re.compile(r"[^<>() ]+")
_ANGLES = re.compile(r"[<>]")
_OPERATOR = re.compile(r"\boperator\b")
_MEANINGLESS_SPACE = re.compile(r" (?:(?<=\W )|(?!\w))")  # a space not between two words


def _split_parameters(demangled: str) -> tuple[str, str | None]:
    """`(name part, parameter list)` of a demangled function, without `[clone ...]` suffixes
    and trailing qualifiers; the parameter list is None for names without one (C names)."""
    text = _strip_qualifiers(_strip_clone_suffix(demangled))
    if not text.endswith(")"):
        return text, None
    # Walk the parentheses from the right, the next ')' and the next '(' each found by rfind
    # (C code; a demangled name averages 340 characters in libtorch, but only 9 parentheses).
    depth = 0
    close = len(text) - 1
    opening = text.rfind("(", 0, close)
    while True:
        if close > opening:
            depth += 1
            close = text.rfind(")", 0, close)
        elif opening < 0:
            return text, None
        else:
            depth -= 1
            if depth == 0:
                return text[:opening], text[opening:]
            opening = text.rfind("(", 0, opening)


def _split_operator(name: str) -> tuple[str, str]:
    """`ns::Foo::operator<` -> (`ns::Foo::`, `operator<`): operator names hold <, >, ( and
    spaces that are not nesting."""
    match = _OPERATOR.search(name) if "operator" in name else None
    return (name[:match.start()], name[match.start():]) if match else (name, "")


def _drop_return_type(name: str) -> str:
    """`int ns::f<int>` -> `ns::f<int>`: cut at the last space outside <> and ()."""
    head, tail = _split_operator(name)
    if " " not in head:
        return name
    # Only the brackets and spaces matter: walk those (a regex drops the rest in C) and count
    # spaces, so the cut is "after the n-th space".
    depth = 0
    spaces = 0
    cut = -1
    for ch in _NOT_NESTING_OR_SPACE.sub("", head):
        if ch == " ":
            if depth == 0:
                cut = spaces
            spaces += 1
        elif ch == "<" or ch == "(":
            depth += 1
        else:
            depth -= 1
    return head.split(" ", cut + 1)[-1] + tail if cut >= 0 else name


def qualified_name(demangled: str) -> str:
    """The qualified function name without return type and parameters:
    `int Inference::Forward(int) const` -> `Inference::Forward`."""
    name, _ = _split_parameters(demangled)
    return _drop_return_type(name)


def _strip_templates(name: str) -> str:
    """`Foo<int>::bar<char>` -> `Foo::bar` (leaves `operator<` and friends alone)."""
    head, tail = _split_operator(name)
    if "<" not in head:
        return name
    pieces = []
    depth = 0
    kept_from = 0
    for match in _ANGLES.finditer(head):
        if match.group() == "<":
            if depth == 0:
                pieces.append(head[kept_from:match.start()])
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                kept_from = match.end()
    if depth == 0:
        pieces.append(head[kept_from:])
    return "".join(pieces) + tail


def _squash(text: str) -> str:
    """Drop the spaces that carry no meaning, so `f(int, char const*)` == `f(int,char const *)`."""
    return _MEANINGLESS_SPACE.sub("", " ".join(text.split()))


# ---------------------------------------------------------------------------------------------
# The file


class ElfFile:
    """A read-only, memory-mapped ELF64 little-endian file.

    Headers are parsed on construction; symbols, notes and lookup indexes on first use.
    Use as a context manager or call `close()` to release the mapping early.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._map = self._open()
        self.file_size = len(self._map)
        self._lock = threading.RLock()
        self._symbol_tables: list[_SymbolTable] | None = None
        self._symbols: tuple[Symbol, ...] | None = None
        self._by_address: tuple[list[int], list[Symbol]] | None = None
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

    def __enter__(self) -> ElfFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ElfFile({self.path!r})"

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

    # -- symbols --------------------------------------------------------------------------

    def _tables(self) -> list[_SymbolTable]:
        """`.symtab` then `.dynsym`, checked once; names and entries are read as lookups ask."""
        if self._symbol_tables is None:
            with self._lock:
                if self._symbol_tables is None:
                    tables = [self._read_table(s, ".symtab") for s in self.sections
                              if s.type == _SHT_SYMTAB]
                    tables += [self._read_table(s, ".dynsym") for s in self.sections
                               if s.type == _SHT_DYNSYM]
                    self._symbol_tables = [t for t in tables if t is not None]
        return self._symbol_tables

    def _read_table(self, table: Section, label: str) -> _SymbolTable | None:
        """Check a symbol table and its string table and copy out the name offset of every
        entry; None for a table without entries. Every check a full read of the table would
        make happens here, so a corrupt table fails on first use whatever is looked up."""
        if table.is_nobits or table.size == 0:
            return None
        if not 0 < table.link < len(self.sections):
            raise ElfError(self.path, f"corrupt ELF file: {table.name} has no string table")
        strings = self.sections[table.link]
        self._check_range(strings.offset, strings.size, f"{strings.name} string table")
        count = table.size // _SYM.size
        self._check_range(table.offset, count * _SYM.size, f"{table.name} symbol table")
        name_offsets = self._name_offsets(table.offset, count)
        if count:
            last_nul = self._map.rfind(b"\0", strings.offset, strings.offset + strings.size)
            last_nul = last_nul - strings.offset if last_nul >= 0 else -1
            highest = max(_words(name_offsets))
            if last_nul < highest:
                raise ElfError(self.path, f"corrupt ELF file: a {table.name} symbol name (index "
                                          f"{highest}) runs past the end of {strings.name} "
                                          f"({strings.size} bytes)")
        versym, version_names = (self._symbol_versions(count) if label == ".dynsym"
                                 else (None, {}))
        if not count:
            return None
        return _SymbolTable(self, label, table.offset, count, strings, name_offsets, versym,
                            version_names)

    def _name_offsets(self, offset: int, count: int) -> bytes:
        """The `st_name` field of `count` symbol entries at `offset`, as packed little-endian
        32-bit words: the first 4 bytes of every 24-byte entry, copied by a strided view of
        the mapping instead of unpacking every entry (the range is already checked)."""
        if not count:
            return b""
        with memoryview(self._map) as whole, \
                whole[offset:offset + count * _SYM.size] as entries, \
                entries.cast("I") as words, \
                words[::_SYM.size // _WORD.size] as names:
            return names.tobytes()

    def _symbol_versions(self, count: int) -> tuple[tuple[int, ...] | None, dict[int, str]]:
        """The .gnu.version entry of every .dynsym symbol and the names of the versions this
        file defines (.gnu.version_d); (None, {}) when the file has no symbol versions."""
        versym = next((s for s in self.sections if s.type == _SHT_GNU_VERSYM), None)
        if versym is None or versym.size < count * 2:
            return None, {}
        indexes = struct.unpack(f"<{count}H",
                                self._bytes(versym.offset, count * 2, ".gnu.version"))
        names: dict[int, str] = {}
        verdef = next((s for s in self.sections if s.type == _SHT_GNU_VERDEF), None)
        if verdef is not None and 0 < verdef.link < len(self.sections):
            strings = self.sections[verdef.link]
            offset = verdef.offset
            for _ in range(min(verdef.info, verdef.size // _VERDEF.size)):
                _, flags, index, _, _, aux, next_off = self._unpack(_VERDEF, offset,
                                                                    ".gnu.version_d")
                name_idx, _ = self._unpack(_VERDAUX, offset + aux, ".gnu.version_d aux")
                if not flags & _VER_FLG_BASE:
                    names[index] = self._string(strings.offset, strings.size, name_idx,
                                                ".gnu.version_d")
                if next_off == 0:
                    break
                offset += next_off
        return indexes, names

    @property
    def symbols(self) -> tuple[Symbol, ...]:
        """Every named symbol: `.symtab` first, then `.dynsym`."""
        if self._symbols is None:
            self._symbols = tuple(table.symbol(i) for table in self._tables()
                                  for i, name in enumerate(table.names) if name)
        return self._symbols

    def _function_refs(self) -> Iterator[tuple[_SymbolTable, int]]:
        for table in self._tables():
            for i in table.function_indexes():
                yield table, i

    def defined_functions(self) -> tuple[Symbol, ...]:
        """FUNC and GNU_IFUNC symbols defined in this file (both tables; aliases included)."""
        return tuple(table.symbol(i) for table, i in self._function_refs())

    def find_function(self, name: str) -> list[Symbol]:
        """Defined functions called `name`, one per address, sorted by address.

        An exact symbol-name match wins: C name, mangled name, `name` without `@VERSION`
        (default versions are preferred), or `name@VERSION` for one version.
        Otherwise demangled C++ names match either in full (`Inference::Warmup(int)`; spaces and
        trailing `const` are not significant) or by qualified name without parameters
        (`Inference::Forward` matches every `Inference::Forward(...)`; template arguments and
        ABI tags may be left out). Compiler-made fragments (`[clone .cold]`, `.constprop`)
        never match a demangled name. More than one result means the name is ambiguous.
        """
        wanted = name.strip()
        if wanted.startswith("::"):
            wanted = wanted[2:]
        if not wanted:
            return []
        exact = [table.symbol(i) for table in self._tables()
                 for i in table.functions_named(wanted)]
        if not exact and "@" in wanted:  # `foo@VER_1` in a stripped file: ask .gnu.version
            base, _, version = wanted.partition("@")
            exact = [symbol for table in self._tables() for symbol in
                     map(table.symbol, table.functions_named(base))
                     if symbol.version == version.lstrip("@")]
        if exact:
            return _distinct_functions(exact, wanted)
        return _distinct_functions(self._demangled_matches(wanted), wanted)

    def _demangled_matches(self, wanted: str, search: bool | None = None) -> list[Symbol]:
        """Defined functions whose demangled name matches `wanted`, in table and entry order.

        The candidates come from a search of each string table's bytes for the needles below
        (`_SymbolTable.mangled_names_with`) or from a walk over every decoded function name.
        The walk is for names without a needle and for needles so common that even the rarest
        occurs, by a sampled estimate, more often than once per eight entries of the table
        (once per sixteen when the names are decoded already; libtorch's .strtab holds
        `24WrapFunctionIntoFunctor_` 115,000 times): past that, looping over the hits in
        Python costs more than walking the decoded names. `search` True or False forces one way where
        there is a needle; both give the same list, the tests compare them. Either way only
        function names are demangled, each name once."""
        name_part, params = _split_parameters(wanted)
        last = _last_identifier(name_part)
        # Every mangled name spells out its last identifier, except constructors and
        # destructors of the std classes the ABI abbreviates: a cheap filter before demangling.
        needle = last if last and last not in _ABBREVIATED_STD and "operator" not in wanted else ""
        # Itanium names spell each plain component as <length><identifier> ("6linear4call"):
        # requiring all of them skips demangling nearly every symbol of a large C++ library.
        needles = [f"{len(c)}{c}" for c in _strip_templates(_strip_abi_tags(name_part)).split("::")
                   if _IDENTIFIER.fullmatch(c) and c != "std" and c not in _ABBREVIATED_STD
                   and "operator" not in c] if needle else []
        target = _squash(wanted) if params is not None else _squash(name_part)

        verdicts: dict[str, bool] = {}  # .symtab and .dynsym, aliases: the same names

        def matches(mangled: str) -> bool:
            if not mangled.startswith("_Z") or (needle and needle not in mangled):
                return False
            if any(n not in mangled for n in needles):
                return False
            verdict = verdicts.get(mangled)
            if verdict is None:
                keys = _match_keys(demangle(mangled))
                verdict = verdicts[mangled] = keys is not None and target in (
                    keys.signatures if params is not None else keys.names)
            return verdict

        found = []
        terms = [needle, *needles]
        for table in self._tables():
            anchor = None
            if needle and search is not False:
                anchor, expected = table.rarest(terms)
                if search is None and expected > table.count / (16 if table.decoded else 8):
                    anchor = None
            if anchor is not None:
                # vtables, typeinfo and undefined entries hold the terms too: filter to
                # functions before demangling
                offsets = table.mangled_names_with(anchor, terms)
                indexes = [i for i in table.entries_named_at(offsets)
                           if table.is_defined_function(i) and matches(table.name(i))]
            else:
                names = table.names
                indexes = [i for i in table.function_indexes() if matches(names[i])]
            found += map(table.symbol, indexes)
        return found

    def close_names(self, name: str, n: int = 3) -> list[str]:
        """Up to `n` function names that look like `name`, best first, for "did you mean":
        C names and demangled qualified names (full signatures when `name` has parameters).
        The last `::` component is scored too, so `Froward` finds `Inference::Forward`."""
        with_params = "(" in name
        # A name that several entries share (.symtab and .dynsym copies, aliases) is
        # demangled once.
        symbol_names: set[str] = set()
        for table in self._tables():
            names = table.names
            symbol_names.update(names[i] for i in table.function_indexes())
        candidates: set[str] = set()
        for symbol_name in symbol_names:
            if symbol_name.startswith("_Z"):
                full = demangle(symbol_name)
                if _is_lookup_name(full):
                    candidates.add(full if with_params else _display_name(full))
            else:
                candidates.add(symbol_name.split("@", 1)[0])
        candidates.discard(name)
        matcher = difflib.SequenceMatcher(autojunk=False)
        matcher.set_seq2(name)
        name_counts = collections.Counter(name)
        scored = []
        for candidate in candidates:
            best = 0.0
            for text in {candidate, candidate.rsplit("::", 1)[-1]}:
                if _may_be_close(name_counts, len(name), text, 0.6):
                    matcher.set_seq1(text)
                    best = max(best, matcher.ratio())
            if best >= 0.6:
                scored.append((best, candidate))
        scored.sort(key=lambda item: (-item[0], item[1]))
        return [candidate for _, candidate in scored[:n]]

    def symbol_at(self, vaddr: int) -> tuple[Symbol, int] | None:
        """The function or object covering link-time address `vaddr` and the offset into it.
        A symbol of size 0 (assembler labels such as `_init`) covers everything up to the next
        symbol in its own section."""
        if self._by_address is None:
            with self._lock:
                if self._by_address is None:
                    self._by_address = self._address_index()
        starts, symbols = self._by_address
        i = bisect.bisect_right(starts, vaddr) - 1
        if i < 0:
            return None
        symbol = symbols[i]
        if symbol.size:
            if vaddr >= symbol.value + symbol.size:
                return None
        elif symbol.shndx < len(self.sections):
            section = self.sections[symbol.shndx]
            if not section.addr <= vaddr < section.addr + section.size:
                return None
        return symbol, vaddr - symbol.value

    def _address_index(self) -> tuple[list[int], list[Symbol]]:
        best: dict[int, Symbol] = {}
        for table in self._tables():
            for i, (_, info, _, shndx, value, _) in enumerate(table.raw):
                if (info & 0xF not in _ADDRESSABLE_TYPE_IDS or shndx == _SHN_UNDEF
                        or shndx >= _SHN_LORESERVE or not table.names[i]):
                    continue
                symbol = table.symbol(i)
                current = best.get(value)
                if current is None or _alias_rank(symbol, "") < _alias_rank(current, ""):
                    best[value] = symbol
        ordered = sorted(best.items())
        return [value for value, _ in ordered], [symbol for _, symbol in ordered]

    # -- function bytes -------------------------------------------------------------------

    def _one_function(self, symbol: Symbol | str) -> Symbol:
        if isinstance(symbol, Symbol):
            return symbol
        found = self.find_function(symbol)
        if not found:
            raise ElfError(self.path, f"no function {symbol!r}")
        if len(found) > 1:
            listing = ", ".join(f"{demangle(s.name)} at {s.value:#x}" for s in found)
            raise ElfError(self.path, f"function name {symbol!r} is ambiguous: {listing}")
        return found[0]

    def function_entry_bytes(self, symbol: Symbol | str, n: int = 16) -> bytes:
        """The first `n` bytes of a function (fewer when the function is shorter)."""
        function = self._one_function(symbol)
        offset = self.vaddr_to_file_offset(function.value)
        count = min(n, function.size) if function.size else n
        count = min(count, self.file_size - offset)
        return self._bytes(offset, count, f"function {function.name!r}")

    def starts_with_endbr64(self, symbol: Symbol | str) -> bool:
        """Whether the function begins with `endbr64` (CET IBT, `-fcf-protection`); a uprobe
        at +0 then traps and single-steps, one at +4 does not."""
        return self.function_entry_bytes(symbol, len(ENDBR64)) == ENDBR64

    # -- notes ----------------------------------------------------------------------------

    def _notes(self, section: Section) -> list[tuple[str, int, bytes]]:
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
            for owner, typ, desc in self._notes(section):
                if owner == "GNU" and typ == _NT_GNU_BUILD_ID:
                    return desc.hex()
        return None

    def usdt_probes(self) -> list[UsdtProbe]:
        """The SystemTap SDT probes in `.note.stapsdt`, in note order.

        As the SDT note specification asks, when a `.stapsdt.base` section exists and its
        address differs from the base recorded in a note (the file was prelinked or otherwise
        moved after the notes were written), the difference is added to `pc` and `semaphore`.
        """
        section = self.section(".note.stapsdt")
        if section is None or section.type != _SHT_NOTE:
            return []
        base_section = self.section(".stapsdt.base")
        probes = []
        for owner, typ, desc in self._notes(section):
            if owner != "stapsdt" or typ not in (1, 2, _NT_STAPSDT):
                continue
            if len(desc) < _STAPSDT_ADDRS.size:
                raise ElfError(self.path, "corrupt ELF file: a .note.stapsdt note is too short")
            pc, base, semaphore = _STAPSDT_ADDRS.unpack_from(desc, 0)
            strings = desc[_STAPSDT_ADDRS.size:].split(b"\0")
            if len(strings) < 2:
                raise ElfError(self.path, "corrupt ELF file: a .note.stapsdt note has no "
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


# More offsets than this are looked up with one pass over every entry's name offset rather
# than one bytes.find() each (a find costs about 1/40 of such a pass on libtorch's .symtab).
_FEW_OFFSETS = 32
# How `_SymbolTable.rarest` samples a large string table.
_SAMPLE_WINDOWS = 16
_SAMPLE_WINDOW = 64 * 1024


class _SymbolTable:
    """One `.symtab` or `.dynsym`, read from the mapping as it is asked about.

    Opening the table copies out only the name offset (`st_name`) of every entry. A lookup by
    name searches the string table's bytes (the `bytes.find` of a needle is C code, a Python
    loop over half a million names is not), then unpacks just the entries whose names start
    where it found something. The lists of every name and every raw `Elf64_Sym` tuple (`names`,
    `raw`) are decoded on first use, for the callers that walk the whole table (`symbols`,
    `symbol_at`, `close_names`); `Symbol` objects are made only for the entries someone asks
    about (making them all costs more than reading the table)."""

    __slots__ = ("label", "count", "versym", "version_names", "_elf", "_entries_at",
                 "_strings", "_name_offsets", "_names", "_raw", "_known_names", "_versioned",
                 "_functions", "_has_at_sign")

    def __init__(self, elf: ElfFile, label: str, entries_at: int, count: int, strings: Section,
                 name_offsets: bytes, versym: tuple[int, ...] | None,
                 version_names: dict[int, str]) -> None:
        self.label = label
        self.count = count
        self.versym = versym
        self.version_names = version_names
        self._elf = elf
        self._entries_at = entries_at  # file offset of entry 0
        self._strings = strings  # the string table section (range checked by _read_table)
        self._name_offsets = name_offsets  # st_name of entry i at bytes 4*i..4*i+3
        self._names: list[str] | None = None
        self._raw: list[tuple] | None = None
        self._known_names: frozenset[str] | None = None
        self._versioned: dict[str, list[int]] | None = None
        self._functions: list[int] | None = None
        self._has_at_sign: bool | None = None  # whether any name could be `name@VERSION`

    # -- the whole table, decoded once ---------------------------------------------------

    @property
    def decoded(self) -> bool:
        """Whether `names` is decoded already."""
        return self._names is not None

    @property
    def names(self) -> list[str]:
        """The name of every entry, in entry order."""
        if self._names is None:
            with self._elf._lock:
                if self._names is None:
                    self._names = self._decode_names()
        return self._names

    def _decode_names(self) -> list[str]:
        strtab = self._elf._bytes(self._strings.offset, self._strings.size,
                                  f"{self._strings.name} string table")
        starts = _words(self._name_offsets)
        if strtab.isascii():  # the usual case: find and slice a str, no decode per name
            text = strtab.decode("ascii")
            find = text.find
            return [text[i:find("\0", i)] for i in starts]
        find = strtab.find
        return [strtab[i:find(b"\0", i)].decode("utf-8", "replace") for i in starts]

    @property
    def raw(self) -> list[tuple]:
        """The unpacked `Elf64_Sym` tuple of every entry, in entry order."""
        if self._raw is None:
            with self._elf._lock:
                if self._raw is None:
                    self._raw = list(_SYM.iter_unpack(self._elf._bytes(
                        self._entries_at, self.count * _SYM.size, f"{self.label} symbol table")))
        return self._raw

    # -- one entry -------------------------------------------------------------------------

    def entry(self, i: int) -> tuple:
        """The unpacked `Elf64_Sym` tuple of entry `i`."""
        if self._raw is not None:
            return self._raw[i]
        return _SYM.unpack_from(self._elf._map, self._entries_at + i * _SYM.size)

    def name(self, i: int) -> str:
        """The name of entry `i`, decoded as `names` decodes it."""
        if self._names is not None:
            return self._names[i]
        start = self._strings.offset + self.entry(i)[0]
        # _read_table made sure a NUL follows every name
        end = self._elf._map.find(b"\0", start, self._strings.offset + self._strings.size)
        return self._elf._map[start:end].decode("utf-8", "replace")

    def is_defined_function(self, i: int) -> bool:
        _, info, _, shndx, _, _ = self.entry(i)
        return info & 0xF in _FUNCTION_TYPE_IDS and shndx != _SHN_UNDEF

    def symbol(self, i: int) -> Symbol:
        _, info, _, shndx, value, size = self.entry(i)
        typ, bind = info & 0xF, info >> 4
        name = self.name(i)
        version, hidden = None, False
        if self.versym is not None and shndx != _SHN_UNDEF:
            entry = self.versym[i]
            version = self.version_names.get(entry & 0x7FFF)
            hidden = bool(entry & _VERSYM_HIDDEN)
        elif "@" in name:  # .symtab spells versions out: `foo@@VER_2` default, `foo@VER_1` not
            tail = name.split("@", 1)[1]
            version, hidden = tail.lstrip("@") or None, not tail.startswith("@")
        return Symbol(name, value, size, SYMBOL_TYPES.get(typ) or f"TYPE_{typ}",
                      SYMBOL_BINDS.get(bind) or f"BIND_{bind}", shndx, self.label, version,
                      hidden)

    # -- lookups ---------------------------------------------------------------------------

    def function_indexes(self) -> list[int]:
        """Indexes of the named, defined FUNC and GNU_IFUNC entries."""
        if self._functions is None:
            names = self.names
            self._functions = [i for i, entry in enumerate(self.raw)
                               if entry[1] & 0xF in _FUNCTION_TYPE_IDS
                               and entry[3] != _SHN_UNDEF and names[i]]
        return self._functions

    def functions_named(self, name: str) -> list[int]:
        """Indexes of the defined functions called `name` or `name@VERSION`/`name@@VERSION`:
        from the decoded names when something decoded them already, else from a search of the
        string table (`_named_by_search`; both give the same list)."""
        if self._names is None and _searchable(name):
            found = self._named_by_search(name)
        else:
            found = self._named_in_list(name)
        return [i for i in found if self.is_defined_function(i)]

    def _named_in_list(self, name: str) -> list[int]:
        """Entries called `name`, then entries called `name@...`, each in entry order."""
        if self._known_names is None:
            self._known_names = frozenset(self.names)
        found = []
        if name in self._known_names:  # usually once; local symbols may repeat a name
            names = self.names
            i = -1
            while True:  # list.index runs in C, a Python loop over every name does not
                try:
                    i = names.index(name, i + 1)
                except ValueError:
                    break
                found.append(i)
        if self._versioned is None:
            self._versioned = {}
            if "@" in "\0".join(self.names):
                for i, n in enumerate(self.names):
                    if "@" in n:
                        self._versioned.setdefault(n.split("@", 1)[0], []).append(i)
        return found + self._versioned.get(name, [])

    def _named_by_search(self, name: str) -> list[int]:
        """`_named_in_list` without decoding any name. A name runs from where its entry points
        up to the next NUL, so wherever `name\\0` occurs in the string table, an entry pointing
        there is called `name` (linkers share tails: "free" may sit inside "xfree"); where
        `name@` occurs, one pointing there is `name@VERSION`. `name` is ASCII without NULs."""
        encoded = name.encode("ascii")
        found = self.entries_named_at(self._occurrences(encoded + b"\0"))
        if self._has_at_sign is None:  # one memchr-speed pass instead of a search per lookup
            self._has_at_sign = bool(self._occurrences(b"@", first_only=True))
        if self._has_at_sign and "@" not in name:  # `a@b` is never the part before an `@`
            found += self.entries_named_at(self._occurrences(encoded + b"@"))
        return found

    def _occurrences(self, needle: bytes, first_only: bool = False) -> list[int]:
        """String-table offsets of every occurrence of `needle` in the string table (or of
        the first one only)."""
        data, start = self._elf._map, self._strings.offset
        end = start + self._strings.size
        found = []
        at = data.find(needle, start, end)
        while at >= 0:
            found.append(at - start)
            if first_only:
                break
            at = data.find(needle, at + 1, end)
        return found

    def entries_named_at(self, offsets: Iterable[int]) -> list[int]:
        """Indexes, in entry order, of the entries whose name starts at one of `offsets`
        (string-table offsets)."""
        wanted = {offset for offset in offsets if 0 <= offset <= 0xFFFFFFFF}
        if len(wanted) > _FEW_OFFSETS:
            return [i for i, offset in enumerate(_words(self._name_offsets)) if offset in wanted]
        packed = self._name_offsets
        found = []
        for offset in wanted:
            word = _WORD.pack(offset)
            at = packed.find(word)
            while at >= 0:
                if at % _WORD.size == 0:  # not the tail of one word and the head of the next
                    found.append(at // _WORD.size)
                at = packed.find(word, at + 1)
        return sorted(found)

    def rarest(self, terms: list[str]) -> tuple[str, float]:
        """The one of `terms` (ASCII text) that looks rarest in the string table, and about how
        many times it occurs there: counted over the whole table up to 1 MiB, else over 16
        windows of 64 KiB spread across it and scaled up (a few milliseconds for libtorch's
        76 MB). Length is no guide: `6Tensor` is in most of libtorch's names, `3add` in few."""
        data, start, size = self._elf._map, self._strings.offset, self._strings.size
        if size <= _SAMPLE_WINDOWS * _SAMPLE_WINDOW:
            windows = [data[start:start + size]]
        else:
            step = size // _SAMPLE_WINDOWS
            windows = [data[start + k * step:start + k * step + _SAMPLE_WINDOW]
                       for k in range(_SAMPLE_WINDOWS)]
        sampled = sum(len(window) for window in windows) or 1
        counts = {term: sum(window.count(term.encode("ascii")) for window in windows)
                  for term in terms}
        # fewest hits first, then the longer term, then the later one (usually more specific)
        rarest = min(reversed(terms), key=lambda term: (counts[term], -len(term)))
        return rarest, counts[rarest] * size / sampled

    def mangled_names_with(self, anchor: str, terms: list[str]) -> list[int]:
        """String-table offsets of every name in the string table that starts with `_Z` and
        contains each of `terms` (ASCII text), whether or not an entry points at it.

        Only `anchor`, one of the terms, is searched for. Each string that holds it is then
        read once and checked from its start and from every `_Z` inside it, since an entry
        may point into the middle of a string whose tail is its name."""
        encoded = [term.encode("ascii") for term in terms]
        anchor_bytes = anchor.encode("ascii")
        data, start = self._elf._map, self._strings.offset
        end = start + self._strings.size
        found = []
        at = data.find(anchor_bytes, start, end)
        while at >= 0:
            previous_nul = data.rfind(b"\0", start, at)
            string_start = previous_nul + 1 if previous_nul >= 0 else start
            string_end = data.find(b"\0", at, end)
            if string_end < 0:  # after the last NUL: no entry's name reaches here
                break
            string = data[string_start:string_end]
            head = 0 if string.startswith(b"_Z") else string.find(b"_Z", 1)
            while head >= 0:
                if all(string.find(term, head) >= 0 for term in encoded):
                    found.append(string_start - start + head)
                head = string.find(b"_Z", head + 1)
            at = data.find(anchor_bytes, string_end + 1, end)
        return found


def _searchable(name: str) -> bool:
    """Whether a name can be looked for as bytes: ASCII (the decoded form of other bytes is
    ambiguous, "\\ufffd" stands for any invalid sequence) and without NUL, the separator."""
    return name.isascii() and "\0" not in name


def _words(packed: bytes) -> Sequence[int]:
    """Packed little-endian 32-bit words as ints (a view, no copy, on little-endian hosts)."""
    if sys.byteorder == "little":
        return memoryview(packed).cast("I")
    return struct.unpack(f"<{len(packed) // _WORD.size}I", packed)


def _may_be_close(counts: collections.Counter[str], length: int, text: str,
                  cutoff: float) -> bool:
    """Whether `SequenceMatcher.real_quick_ratio()` and `quick_ratio()` of `text` against the
    string with character `counts` and `length` both reach `cutoff`, the checks `close_names`
    makes before the costly `ratio()`: the first looks at the two lengths, the second at the
    characters the two share, counted with repeats. The same numbers, computed without a
    Python loop over every character of `text`."""
    total = length + len(text)
    if not total:
        return True  # two empty strings: both ratios are 1.0
    if 2.0 * min(length, len(text)) / total < cutoff:
        return False
    shared = sum(min(count, text.count(char)) for char, count in counts.items())
    return 2.0 * shared / total >= cutoff


class _MatchKeys(NamedTuple):
    signatures: tuple[str, ...]  # squashed `[ret] name(params) [const]`, return type,
    # qualifiers and ABI tags optional
    names: tuple[str, ...]  # squashed qualified names: as is, no ABI tags, no templates
    display: str  # qualified name without ABI tags, for suggestions


def _is_lookup_name(demangled: str) -> bool:
    """False for names that were not demangled and for compiler-made fragments
    (`[clone .cold]`, `[clone .constprop.0]`): lookups and suggestions skip them."""
    return bool(demangled) and not demangled.startswith("_Z") and " [clone " not in demangled


def _display_name(demangled: str) -> str:
    """`_match_keys(demangled).display`, without working out the other keys."""
    return _strip_abi_tags(_drop_return_type(_split_parameters(demangled)[0]))


@functools.lru_cache(maxsize=1 << 16)
def _match_keys(demangled: str) -> _MatchKeys | None:
    """What a demangled function name can be looked up by; None where `_is_lookup_name` says
    so."""
    if not _is_lookup_name(demangled):
        return None
    name, params = _split_parameters(demangled)
    qualified = _drop_return_type(name)
    plain = _strip_abi_tags(qualified)
    names = {_squash(qualified), _squash(plain), _squash(_strip_templates(plain))}
    signatures = {_squash(demangled)}
    if params is not None:
        qualifiers = demangled[len(_strip_qualifiers(demangled)):]
        for written in {name, qualified, plain}:
            signatures.add(_squash(written + params))
            signatures.add(_squash(written + params + qualifiers))
    return _MatchKeys(tuple(signatures), tuple(names), plain)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def _last_identifier(text: str) -> str:
    identifiers = _IDENTIFIER.findall(_strip_templates(_strip_abi_tags(text)))
    return identifiers[-1] if identifiers else ""


def _alias_rank(symbol: Symbol, wanted: str) -> tuple:
    """Sort key choosing one name among aliases at one address: the name asked for, a default
    symbol version, a sized symbol, fewer leading underscores (`getpid` over `__getpid`),
    GLOBAL over WEAK over LOCAL, then the `.dynsym` copy (it carries the version)."""
    return (symbol.name != wanted and symbol.name.split("@", 1)[0] != wanted,
            symbol.hidden_version,
            symbol.size == 0,
            len(symbol.name) - len(symbol.name.lstrip("_")),
            _BIND_PREFERENCE.get(symbol.bind, 9),
            symbol.table != ".dynsym",
            len(symbol.name),
            symbol.name)


def _distinct_functions(found: list[Symbol], wanted: str) -> list[Symbol]:
    """One symbol per address (aliases, `.symtab`/`.dynsym` copies), sorted by address.
    Sized functions win over size-0 labels, and default versions over `name@OLD` ones, when
    both kinds are among the candidates."""
    groups: dict[int, list[Symbol]] = {}
    for symbol in found:
        groups.setdefault(symbol.value, []).append(symbol)
    chosen = []
    for group in groups.values():
        best = min(group, key=lambda s: _alias_rank(s, wanted))
        versioned = [s for s in group if s.version is not None or s.hidden_version]
        hidden = bool(versioned) and all(s.hidden_version for s in versioned)
        chosen.append((best, hidden))
    if any(symbol.size for symbol, _ in chosen):
        chosen = [(symbol, hidden) for symbol, hidden in chosen if symbol.size]
    if any(not hidden for _, hidden in chosen):
        chosen = [(symbol, hidden) for symbol, hidden in chosen if not hidden]
    return sorted((symbol for symbol, _ in chosen), key=lambda s: s.value)


# ---------------------------------------------------------------------------------------------
# Opening by path, with a small cache


_CACHE_SIZE = 32
_cache: collections.OrderedDict[tuple, ElfFile] = collections.OrderedDict()
_cache_lock = threading.Lock()


def open_elf(path: str | os.PathLike[str]) -> ElfFile:
    """An `ElfFile` for `path`, shared while the file (device, inode, size, mtime) is unchanged."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ElfError(path, "no such file") from None
    except OSError as exc:
        raise ElfError(path, f"cannot open: {exc.strerror or exc}") from None
    key = (os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    elf = ElfFile(path)
    with _cache_lock:
        _cache[key] = elf
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return elf


def find_function(path: str | os.PathLike[str], name: str) -> list[Symbol]:
    """`ElfFile.find_function` on a (cached) open of `path`."""
    return open_elf(path).find_function(name)


def close_names(path: str | os.PathLike[str], name: str, n: int = 3) -> list[str]:
    """`ElfFile.close_names` on a (cached) open of `path`."""
    return open_elf(path).close_names(name, n)


def usdt_probes(path: str | os.PathLike[str]) -> list[UsdtProbe]:
    """`ElfFile.usdt_probes` on a (cached) open of `path`."""
    return open_elf(path).usdt_probes()


# ---------------------------------------------------------------------------------------------
# Finding a binary by name

LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                "/lib", "/usr/lib", "/usr/local/lib")
_LDCONFIG_PATHS = ("/sbin/ldconfig", "/usr/sbin/ldconfig")
_LDCONFIG_LINE = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S.*)$")


@functools.lru_cache(maxsize=1)
def _ldconfig_cache() -> tuple[tuple[str, str], ...]:
    """(soname, path) pairs for x86-64 libraries from `ldconfig -p`; empty if unavailable."""
    for ldconfig in _LDCONFIG_PATHS:
        if not os.access(ldconfig, os.X_OK):
            continue
        try:
            result = subprocess.run([ldconfig, "-p"], capture_output=True, text=True,
                                    timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        entries = []
        for line in result.stdout.splitlines():
            match = _LDCONFIG_LINE.match(line)
            if match and "x86-64" in match.group(2):
                entries.append((match.group(1), match.group(3).strip()))
        return tuple(entries)
    return ()


def resolve_binary(name_or_path: str | os.PathLike[str]) -> str:
    """The real path of a binary named by path (`./app`, `/usr/bin/python3`) or by bare name.

    A bare name is looked up in the `ldconfig -p` cache (exactly, then as `NAME.*` when that
    is unique, so `libcuda.so` finds `libcuda.so.1`), then in the usual library folders, then
    on `$PATH`. Raises `ElfError` saying where it looked.
    """
    text = os.fspath(name_or_path)
    if not text:
        raise ElfError(text, "empty binary name")
    if "/" in text:
        if os.path.exists(text):
            return os.path.realpath(text)
        raise ElfError(text, f"no such file (looked at {os.path.abspath(text)})")
    looked: list[str] = []
    cache = _ldconfig_cache()
    if cache:
        looked.append("the ldconfig cache (ldconfig -p)")
        exact = [path for soname, path in cache if soname == text and os.path.exists(path)]
        if exact:
            return os.path.realpath(exact[0])
        versioned = sorted({os.path.realpath(path) for soname, path in cache
                            if soname.startswith(text + ".") and os.path.exists(path)})
        if len(versioned) == 1:
            return versioned[0]
        if len(versioned) > 1:
            raise ElfError(text, "more than one library matches: " + ", ".join(versioned))
    else:
        looked.append("the ldconfig cache (unavailable)")
    for folder in LIBRARY_DIRS:
        candidate = os.path.join(folder, text)
        looked.append(candidate)
        if os.path.isfile(candidate):
            return os.path.realpath(candidate)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder:
            continue
        candidate = os.path.join(folder, text)
        looked.append(candidate)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    raise ElfError(text, "binary not found; looked in " + ", ".join(looked))
