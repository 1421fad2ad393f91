"""Turn stack addresses into `function+0xoffset (module)` text.

Kernel addresses are looked up in `/proc/kallsyms`, read once per process. User addresses are
looked up through the process's `/proc/PID/maps` and the ELF symbols of each mapped file
(`probec.host.elf`), demangled. Nothing here raises for an address it cannot name: a
process that has exited, a file that is gone or unreadable, or hidden kernel pointers all give
the raw address instead.

Stacks from `bpf_get_stackid`/`bpf_get_stack` hold the probed instruction first and return
addresses after it. A return address may point just past the end of a function that ends in a
call (a `noreturn` callee), so frames after the first are looked up at `address - 1`; the
offset printed is still that of the address itself.
"""

from __future__ import annotations

import bisect
import collections
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable

from ..host.elf import ElfError, ElfFile, demangle, open_elf

KALLSYMS = "/proc/kallsyms"
_KERNEL_TEXT_TYPES = frozenset("tTwW")
_MAPS_RELOAD_INTERVAL_S = 1.0


def _hex(address: int) -> str:
    return f"{address:#x}"


# ---------------------------------------------------------------------------------------------
# Kernel


class KernelSymbols:
    """Kernel text symbols from kallsyms, sorted for bisection.

    When every address reads as zero (`kernel.kptr_restrict`, or not root), `available` is
    False, `unavailable_reason` says why, and `symbolize` returns raw addresses.
    """

    _shared: KernelSymbols | None = None
    _shared_lock = threading.Lock()

    def __init__(self, path: str = KALLSYMS) -> None:
        self.path = path
        self._starts: list[int] = []
        self._names: list[str] = []
        self._modules: list[str | None] = []
        self.unavailable_reason: str | None = None
        self._load()

    @classmethod
    def shared(cls) -> KernelSymbols:
        """The process-wide instance, read from /proc/kallsyms on first use."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def __len__(self) -> int:
        return len(self._starts)

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self.unavailable_reason = f"cannot read {self.path}: {exc.strerror or exc}"
            return
        text = data.decode("utf-8", "replace")
        addresses, names, modules = _parse_kallsyms(text)
        if not addresses:
            self.unavailable_reason = f"{self.path} lists no kernel text symbols"
            return
        if not any(addresses):
            self.unavailable_reason = (f"{self.path} shows only zero addresses: kernel symbols "
                                       "are hidden (kernel.kptr_restrict, or not running as root)")
            return
        order = sorted(range(len(addresses)), key=addresses.__getitem__)
        self._starts = [addresses[i] for i in order]
        self._names = [names[i] for i in order]
        self._modules = [modules[i] for i in order]

    def _index(self, address: int) -> int:
        return bisect.bisect_right(self._starts, address) - 1

    def lookup(self, address: int) -> tuple[str, int, str | None] | None:
        """(symbol name, offset, module or None for vmlinux), or None when unknown."""
        i = self._index(address)
        if i < 0:
            return None
        return self._names[i], address - self._starts[i], self._modules[i]

    def address_of(self, name: str) -> int | None:
        """The address of the first kernel text symbol called `name`."""
        try:
            return self._starts[self._names.index(name)]
        except ValueError:
            return None

    def symbolize(self, address: int, return_address: bool = False) -> str:
        """`name+0xoff`, `name+0xoff [module]`, or the raw address."""
        i = self._index(address - 1 if return_address and address else address)
        if i < 0:
            return _hex(address)
        text = f"{self._names[i]}+{address - self._starts[i]:#x}"
        module = self._modules[i]
        return f"{text} [{module}]" if module else text


def _parse_kallsyms(text: str) -> tuple[list[int], list[str], list[str | None]]:
    """Text symbols as parallel lists (address, name, module). vmlinux comes first and its
    lines are exactly three fields, so that part is split in one go; module lines
    (`addr t name\t[module]`) are parsed one by one."""
    first_module = text.find("\t[")
    cut = len(text) if first_module < 0 else text.rfind("\n", 0, first_module) + 1
    addresses: list[int] = []
    names: list[str] = []
    modules: list[str | None] = []
    tokens = text[:cut].split()
    if len(tokens) % 3 == 0:
        for address, kind, name in zip(tokens[0::3], tokens[1::3], tokens[2::3]):
            if kind in _KERNEL_TEXT_TYPES:
                addresses.append(int(address, 16))
                names.append(name)
        modules.extend([None] * len(addresses))
        rest = text[cut:]
    else:
        rest = text
    for line in rest.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 3 or parts[1] not in _KERNEL_TEXT_TYPES:
            continue
        try:
            address = int(parts[0], 16)
        except ValueError:
            continue
        addresses.append(address)
        names.append(parts[2])
        modules.append(parts[3].strip().strip("[]") if len(parts) > 3 else None)
    return addresses, names, modules


# ---------------------------------------------------------------------------------------------
# User space


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str  # "" for anonymous memory; "[vdso]", "[heap]" for special ones

    @property
    def executable(self) -> bool:
        return "x" in self.perms

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")

    @property
    def module(self) -> str:
        path = self.path[:-len(" (deleted)")] if self.deleted else self.path
        return os.path.basename(path) or path or "anon"


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of a process; raises OSError when it is gone or unreadable."""
    mappings = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 5:
                continue
            start, _, end = parts[0].partition("-")
            try:
                mappings.append(Mapping(int(start, 16), int(end, 16), parts[1], int(parts[2], 16),
                                        parts[3], int(parts[4]),
                                        parts[5].rstrip("\n") if len(parts) > 5 else ""))
            except ValueError:
                continue
    return mappings


# ElfFile per mapped file, shared by every UserSymbols: (path as the process sees it, inode).
_ELF_BY_INODE_SIZE = 64
_elf_by_inode: collections.OrderedDict[tuple[str, int], ElfFile] = collections.OrderedDict()
_elf_by_inode_lock = threading.Lock()


class UserSymbols:
    """Symbols of one process's executable mappings.

    The maps are read on construction and again (at most once a second) when an address
    falls outside every known mapping, for libraries loaded later. Files are opened through
    `/proc/PID/root` so binaries inside containers resolve, then `/proc/PID/map_files` (files
    deleted since they were mapped), then the plain path; a candidate whose inode differs from
    the mapped one is skipped rather than trusted.
    """

    def __init__(self, pid: int) -> None:
        self.pid = int(pid)
        self.error: str | None = None  # why the maps could not be read, if they could not
        self._mappings: list[Mapping] = []
        self._starts: list[int] = []
        self._loaded_at = float("-inf")
        self._unusable: set[tuple[str, int]] = set()
        self.refresh()

    @property
    def mappings(self) -> list[Mapping]:
        return list(self._mappings)

    def refresh(self) -> None:
        """Read /proc/PID/maps again. Keeps the old mappings when the process is gone, so
        addresses recorded while it lived still resolve."""
        self._loaded_at = time.monotonic()
        try:
            mappings = [m for m in read_maps(self.pid) if m.executable]
        except OSError as exc:
            self.error = f"cannot read /proc/{self.pid}/maps: {exc.strerror or exc}"
            return
        self.error = None
        mappings.sort(key=lambda m: m.start)
        self._mappings = mappings
        self._starts = [m.start for m in mappings]

    def mapping_for(self, address: int) -> Mapping | None:
        mapping = self._find_mapping(address)
        if mapping is None and time.monotonic() - self._loaded_at >= _MAPS_RELOAD_INTERVAL_S:
            self.refresh()
            mapping = self._find_mapping(address)
        return mapping

    def _find_mapping(self, address: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._mappings[i].end:
            return self._mappings[i]
        return None

    def _elf_for(self, mapping: Mapping) -> ElfFile | None:
        key = (mapping.path, mapping.inode)
        with _elf_by_inode_lock:
            elf = _elf_by_inode.get(key)
            if elf is not None:
                _elf_by_inode.move_to_end(key)
                return elf
        if key in self._unusable:
            return None
        plain = mapping.path[:-len(" (deleted)")] if mapping.deleted else mapping.path
        candidates = [f"/proc/{self.pid}/root{plain}",
                      f"/proc/{self.pid}/map_files/{mapping.start:x}-{mapping.end:x}"]
        if not mapping.deleted:
            candidates.append(plain)
        for candidate in candidates:
            try:
                if os.stat(candidate).st_ino != mapping.inode:
                    continue
                elf = open_elf(candidate)
            except (OSError, ElfError):
                continue
            with _elf_by_inode_lock:
                _elf_by_inode[key] = elf
                while len(_elf_by_inode) > _ELF_BY_INODE_SIZE:
                    _elf_by_inode.popitem(last=False)
            return elf
        self._unusable.add(key)
        return None

    def lookup(self, address: int, return_address: bool = False
               ) -> tuple[Mapping | None, str | None, int]:
        """(mapping, demangled symbol name, offset from the symbol) for `address`; the name is
        None when unknown, and the mapping None when no executable mapping holds it."""
        probe = address - 1 if return_address and address else address
        mapping = self.mapping_for(probe)
        if mapping is None or not mapping.file_backed:
            return mapping, None, 0
        elf = self._elf_for(mapping)
        if elf is None:
            return mapping, None, 0
        vaddr = elf.file_offset_to_vaddr(probe - mapping.start + mapping.offset)
        if vaddr is None:
            return mapping, None, 0
        found = elf.symbol_at(vaddr)
        if found is None:
            return mapping, None, 0
        symbol, offset = found
        return mapping, demangle(symbol.name), offset + (address - probe)

    def symbolize(self, address: int, return_address: bool = False) -> str:
        """`name+0xoff (module)`, `0x... (module)` when the module has no symbol there, or
        `0x... [unknown]` outside every executable mapping (or when the process is gone)."""
        mapping, name, offset = self.lookup(address, return_address)
        if mapping is None:
            return f"{_hex(address)} [unknown]"
        if name is None:
            return f"{_hex(address)} ({mapping.module})"
        return f"{name}+{offset:#x} ({mapping.module})"


def symbolize_stack(addresses: Iterable[int], pid: int | None = None,
                    kernel: bool = False) -> list[str]:
    """One line per frame, innermost first. Trailing zero addresses (the unused tail of a
    stack-map entry) are dropped. `kernel=True` uses kallsyms; otherwise `pid` names the
    process, and without one the raw addresses come back."""
    frames = list(addresses)
    while frames and not frames[-1]:
        frames.pop()
    if kernel:
        symbols = KernelSymbols.shared()
        return [symbols.symbolize(a, return_address=i > 0) for i, a in enumerate(frames)]
    if pid is None:
        return [_hex(a) for a in frames]
    user = UserSymbols(pid)
    return [user.symbolize(a, return_address=i > 0) for i, a in enumerate(frames)]
