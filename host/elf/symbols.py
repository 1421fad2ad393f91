"""Symbols of an ELF file and looking functions up by name: `.symtab`/`.dynsym` with their GNU
symbol versions, C and C++ names (mangled, demangled, qualified), aliases, "did you mean"
suggestions, the symbol at an address, and a function's entry bytes."""

from __future__ import annotations

import bisect
import collections
import difflib
import os
import struct
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from .demangling import (_ABBREVIATED_STD, _IDENTIFIER, _display_name, _is_lookup_name, _last_identifier,
                         _match_keys, _split_parameters, _squash, _strip_abi_tags, _strip_templates, demangle)
from .format import (_SHN_LORESERVE, _SHN_UNDEF, _SHT_DYNSYM, _SHT_GNU_VERDEF, _SHT_GNU_VERSYM, _SHT_SYMTAB, _SYM,
                     _VER_FLG_BASE, _VERDAUX, _VERDEF, _VERSYM_HIDDEN, _WORD, ElfError, ElfFormat, Section)
from .usdt import UsdtProbe, read_usdt_probes

SYMBOL_TYPES = {0: "NOTYPE", 1: "OBJECT", 2: "FUNC", 3: "SECTION", 4: "FILE", 5: "COMMON",
                6: "TLS", 10: "GNU_IFUNC"}
SYMBOL_BINDS = {0: "LOCAL", 1: "GLOBAL", 2: "WEAK", 10: "GNU_UNIQUE"}
_FUNCTION_TYPES = frozenset({"FUNC", "GNU_IFUNC"})
_FUNCTION_TYPE_IDS = frozenset({2, 10})
_ADDRESSABLE_TYPE_IDS = frozenset({1, 2, 10})  # OBJECT, FUNC, GNU_IFUNC
_BIND_PREFERENCE = {"GLOBAL": 0, "WEAK": 1, "GNU_UNIQUE": 2, "LOCAL": 3}

ENDBR64 = b"\xf3\x0f\x1e\xfa"


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


class ElfFile(ElfFormat):
    """A read-only, memory-mapped ELF64 little-endian file, with its symbols and lookups by name.

    Headers are parsed on construction; symbols, notes and lookup indexes on first use.
    Use as a context manager or call `close()` to release the mapping early.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._symbol_tables: list[_SymbolTable] | None = None
        self._symbols: tuple[Symbol, ...] | None = None
        self._by_address: tuple[list[int], list[Symbol]] | None = None

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

    # -- USDT -----------------------------------------------------------------------------

    def usdt_probes(self) -> list[UsdtProbe]:
        """The SystemTap SDT probes in `.note.stapsdt`, in note order (see `usdt.read_usdt_probes`)."""
        return read_usdt_probes(self)


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
