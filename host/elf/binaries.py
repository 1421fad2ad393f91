"""ELF files by path: a small cache of open files, and finding a binary or library by bare name
(the ldconfig cache, the usual library folders, `$PATH`)."""

from __future__ import annotations

import collections
import functools
import os
import re
import subprocess
import threading

from .format import ElfError
from .symbols import ElfFile, Symbol
from .usdt import UsdtProbe


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
