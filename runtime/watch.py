"""What `probec run` keeps an eye on between map reads: the traced binaries on disk (a deploy that
replaces one needs the uprobes attached again) and the traced process (`--pid`, `--pid-file`).

Both backends share these; each runner decides what re-attaching means for it.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from .manifest import ProbeInfo


class FileIdentity(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @property
    def inode(self) -> tuple[int, int]:
        return self.dev, self.ino


def file_identity(path: str) -> FileIdentity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class BinaryWatch:
    """The files the probes sit in, by path.

    A uprobe sits in an inode, not a path: when a deploy removes a library and puts a new copy
    in its place (a new inode), processes started afterwards run the new file and the uprobe
    never fires for them. `check()` reports such a path once the new file has stayed the same
    for one interval (a copy still being written is not attached to), until `accept()` says the
    probes are on it. A file rewritten in place (same inode, new size or mtime) is reported
    once per change: the uprobes' breakpoints may now sit in the middle of other code."""

    def __init__(self, paths):
        self.seen: dict[str, FileIdentity | None] = {p: file_identity(p) for p in sorted(set(paths)) if p}
        self.pending: dict[str, FileIdentity] = {}

    def check(self) -> tuple[list[str], list[str]]:
        """(replaced, rewritten in place) paths since the last check."""
        replaced, rewritten = [], []
        for path, old in self.seen.items():
            now = file_identity(path)
            if now is None:                  # removed, the new copy not there yet
                continue
            if old is None:
                self.seen[path] = now
                continue
            if now.inode != old.inode:
                if self.pending.get(path) == now:
                    replaced.append(path)
                else:
                    self.pending[path] = now
            elif now != old:
                self.seen[path] = now
                rewritten.append(path)
        return replaced, rewritten

    def old(self, path: str) -> FileIdentity | None:
        return self.seen.get(path)

    def accept(self, path: str) -> None:
        """The probes now sit in the file at `path` as it is."""
        self.seen[path] = self.pending.pop(path, None) or file_identity(path)


def missing_in(path: str, probes: list[ProbeInfo]) -> list[str]:
    """The addresses of these probes (manifest entries) whose function or USDT note the file at
    `path` lacks: bpftrace leaves such a uprobe out without a word, so look first."""
    from ..host import elf
    try:
        binary = elf.open_elf(path)
        notes = {(u.provider, u.name) for u in binary.usdt_probes()} if any(
            p.kind == "usdt" for p in probes) else set()
        return [p.address for p in probes
                if (p.kind == "usdt" and (p.provider, p.name) not in notes)
                or (p.kind != "usdt" and not binary.find_function(p.symbol))]
    except elf.ElfError as exc:
        return [f"{p.address} ({exc})" for p in probes]


def inodes_mapped(inodes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Which of these (dev, ino) some process still maps (a removed library stays mapped by the
    processes that loaded it)."""
    wanted = {(f"{os.major(dev):02x}:{os.minor(dev):02x}", ino): (dev, ino) for dev, ino in inodes}
    found = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return set(inodes)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(None, 5)
                    if len(fields) >= 5 and fields[4] != "0":
                        hit = wanted.get((fields[3], int(fields[4])))
                        if hit is not None:
                            found.add(hit)
        except (OSError, ValueError):
            continue
        if len(found) == len(wanted):
            break
    return found


def process_start(pid: int) -> int | None:
    """The start time (clock ticks after boot) of a running process, or None when there is none:
    with the pid it tells a process from a later one that reuses its pid. A zombie is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class TargetError(Exception):
    pass


class ProcessTarget:
    """The process `--pid` names, or the one `--pid-file` names at each check."""

    def __init__(self, pid: int, pid_file: str | None = None):
        self.pid_file = pid_file
        if pid_file:
            pid = self.read_pid_file()
            if pid is None:
                raise TargetError(f"--pid-file {pid_file}: {self.problem}")
        self.pid = pid
        self.started = process_start(pid)
        if self.started is None:
            where = f" (from {pid_file})" if pid_file else ""
            raise TargetError(f"no running process {pid}{where} to trace")
        self.up = True
        self.problem: str | None = None

    def read_pid_file(self) -> int | None:
        try:
            fd = os.open(self.pid_file, os.O_RDONLY | os.O_NONBLOCK)    # a FIFO must not hang the run
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    self.problem = "it is not a regular file"
                    return None
                text = os.read(fd, 64).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
        except OSError as exc:
            self.problem = f"cannot read it ({exc.strerror})"
            return None
        if not text.isdigit() or not 0 < int(text) < 1 << 22:
            self.problem = f"it does not hold a process id ({text[:20]!r})"
            return None
        self.problem = None
        return int(text)

    def check(self) -> tuple[bool, tuple[int, int] | None]:
        """(the target exited since the last check, (pid, start) of a new target to follow)."""
        exited = False
        if self.up and process_start(self.pid) != self.started:
            self.up = False
            exited = True
        if not self.pid_file:
            return exited, None
        pid = self.read_pid_file()
        if pid is None:
            return exited, None
        started = process_start(pid)
        if started is None or (pid, started) == (self.pid, self.started):
            return exited, None
        return exited, (pid, started)

    def follow(self, pid: int, started: int) -> None:
        self.pid, self.started, self.up = pid, started, True
