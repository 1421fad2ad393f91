"""Sampled events as JSON lines: one object per event, time-valued fields in seconds."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import sys
import threading

from .cgroups import CGROUP_LABELS
from .manifest import EventField, Label, Manifest


def rendered(value, spec: Label | EventField):
    """A value as people read it: IPv4 addresses (kept as numbers in network order) as dotted
    quads, enumerations (the part of a `parts:` histogram, an `active(...)` span) as their
    names; anything else as it is. Shared by labels and event fields."""
    if spec.render == "ipv4" and isinstance(value, int):
        return socket.inet_ntoa(struct.pack("<I", value & 0xFFFFFFFF))
    if spec.render == "enum" and isinstance(value, int):
        names = spec.names
        return names[value] if 0 <= value < len(names) else value
    return value


class EventSink:
    """Writes events as JSON lines, whole lines only, and keeps going when it cannot.

    Lines are built whole, kept in memory and written together at each flush (every interval, at
    close, or once 64 KiB wait). A write that fails (a full disk) leaves no part of a line behind:
    the whole lines that went out stay, the file is cut back to the last of them, and the rest is
    dropped and counted in `health.events_unwritten`. The next flush tries again, so writing
    resumes when space comes back. Each change between failing and writing is logged once."""

    FLUSH_BYTES = 1 << 16

    def __init__(self, path: str, manifest: Manifest, health=None, log=None):
        self.path = path
        self.health = health
        self.log = log or (lambda message: None)
        self.lock = threading.Lock()
        if path == "-":
            sys.stdout.flush()
            self.fd, self.owned = sys.stdout.fileno(), False
        else:   # OSError (a missing or read-only folder) reaches `probec run`, which says so and exits 1
            self.fd, self.owned = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644), True
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)      # only a file can be cut back to a whole line
        self.end = st.st_size if self.regular else 0
        self.events = {e.index: e for e in manifest.events}
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.written = 0
        self.dropped = 0
        self.failing: str | None = None              # why the last write failed, while it does
        self.cgroups = None                          # a cgroups.CgroupResolver, where fields show pods

    def field_name(self, spec: EventField) -> str:
        return f"{spec.name}_seconds" if spec.unit == "time" else spec.name

    def value(self, spec: EventField, raw):
        if spec.unit == "time" and isinstance(raw, int):
            return raw / 1e9
        if self.cgroups is not None and spec.render in CGROUP_LABELS and isinstance(raw, int):
            return self.cgroups.attribute(spec.render, raw, fetch=False)    # the container or pod of a cgroup id
        return rendered(raw, spec)

    def write(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self.lock:
            self.pending.append(line)
            self.pending_bytes += len(line)
            if self.pending_bytes >= self.FLUSH_BYTES:
                self._write_pending()

    def flush(self) -> None:
        with self.lock:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self.pending or self.fd < 0:
            return
        lines, data = self.pending, b"".join(self.pending)
        self.pending, self.pending_bytes = [], 0
        done, error = 0, None
        try:
            while done < len(data):
                done += os.write(self.fd, memoryview(data)[done:])
        except OSError as exc:
            error = exc
        whole = kept = 0
        for line in lines:
            if whole + len(line) > done:
                break
            whole += len(line)
            kept += 1
        if whole < done and self.regular:
            try:
                os.ftruncate(self.fd, self.end + whole)   # cut the line the failure split
            except OSError:
                pass
        self.end += whole
        self.written += kept
        if error is None:
            if self.failing:
                self.log(f"events: writing to {self.path} again ({self.dropped} dropped in all)")
                self.failing = None
            return
        self.dropped += len(lines) - kept
        if self.health is not None:
            self.health.events_unwritten = self.dropped
        if not self.failing:
            self.failing = error.strerror or str(error)
            self.log(f"events: cannot write to {self.path} ({self.failing}); dropping events until it can, "
                     'counted in probec_events_dropped_total{reason="write"}')

    def close(self) -> None:
        self.flush()
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
