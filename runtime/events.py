"""Sampled events as JSON lines: one object per event, time-valued fields in seconds.

Runners hand over events in batches of rows, one tuple per event in the order EventFormat gives
(`ts_ns`, `pid`, `tid`, `cpu`, then the event's own fields): a number as the kernel counted it
(times in ns), a string as bytes or text, a stack as its frames. A batch becomes its JSON lines in
a few calls that loop in C (`str.__mod__` mapped over the rows), not a dict and a `json.dumps`
per event."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import sys
import threading

from .manifest import EventField, EventInfo, Label, Manifest

HEADER_KEYS = ("ts_ns", "pid", "tid", "cpu")
MEMO_ENTRIES = 4096       # distinct strings remembered per field, then forgotten all at once


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


def field_key(spec: EventField) -> str:
    """A field's key in an event's JSON object (and its span attribute): durations in seconds."""
    return f"{spec.name}_seconds" if spec.unit == "time" else spec.name


def text_of(raw) -> str:
    """A string field as text: a C char array (bytes up to its first NUL) or text already."""
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")
    return raw


class Memo(dict):
    """value -> what `make` makes of it, made once per distinct value (comm, ports, pids repeat);
    looked up from C by `map(memo.__getitem__, column)`."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, value):
        made = self.make(value)
        if len(self) >= MEMO_ENTRIES:
            self.clear()
        self[value] = made
        return made


class EventFormat:
    """One event's rows -> JSON lines.

    `fields` are the event's fields that rows carry after the four header values: a field that
    is one of them (`pid`, `tid`, `cpu`; the spec allows those names only for that very value)
    is left out, as the JSON object has each key once."""

    def __init__(self, meta: EventInfo):
        self.meta = meta
        self.name = meta.name
        self.fields = tuple(f for f in meta.fields if field_key(f) not in HEADER_KEYS)
        self.keys = HEADER_KEYS + tuple(field_key(f) for f in self.fields)
        self.duration_at = next((4 + i for i, f in enumerate(self.fields) if f.name == "duration" and f.unit == "time"),
                                None)
        parts = ['{"event":' + json.dumps(meta.name).replace("%", "%%") + ',"ts_ns":%d,"pid":%d,"tid":%d,"cpu":%d']
        self.columns: list[tuple[int, object]] = []      # (row position, what makes its JSON text)
        for i, f in enumerate(self.fields, start=4):
            key = json.dumps(field_key(f)).replace("%", "%%")
            if f.kind.endswith("stack"):
                parts.append(f",{key}:%s")
                self.columns.append((i, json.dumps))
            elif f.kind == "str":
                parts.append(f",{key}:%s")
                self.columns.append((i, Memo(lambda raw: json.dumps(text_of(raw))).__getitem__))
            elif f.render:
                parts.append(f",{key}:%s")
                self.columns.append((i, Memo(lambda raw, f=f: json.dumps(rendered(raw, f))).__getitem__))
            elif f.unit == "time":
                parts.append(f",{key}:%r")
                self.columns.append((i, (1e9).__rtruediv__))
            else:
                parts.append(f",{key}:%d")
        self.template = "".join(parts) + "}\n"

    def lines(self, rows: list[tuple]) -> str:
        """The JSON lines of `rows`, one per row, joined."""
        if self.columns:
            cols = list(zip(*rows))
            for at, make in self.columns:
                cols[at] = map(make, cols[at])
            rows = zip(*cols)
        return "".join(map(self.template.__mod__, rows))

    def records(self, rows: list[tuple]) -> list[dict]:
        """The rows as the objects their JSON lines hold."""
        return [json.loads(line) for line in self.lines(rows).splitlines()]


class EventOutput:
    """Where a run's events go: the JSON-lines file, spans over OTLP, or both. Runners call
    add() with each batch, from their reading thread."""

    def __init__(self, manifest: Manifest, sink: "EventSink | None" = None, spans=None):
        self.formats = {e.index: EventFormat(e) for e in manifest.events}
        self.sink = sink
        self.spans = spans

    def add(self, index: int, rows: list[tuple]) -> None:
        if self.sink is not None:
            self.sink.add(index, rows)
        if self.spans is not None:
            self.spans.add(index, rows)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.spans is not None:
            self.spans.close()


class EventSink:
    """Writes events as JSON lines, whole lines only, and keeps going when it cannot.

    Lines are built whole (a batch at a time), kept in memory and written together at each flush (every interval, at
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
        self.formats = {e.index: EventFormat(e) for e in manifest.events}
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.written = 0
        self.dropped = 0
        self.failing: str | None = None              # why the last write failed, while it does

    def add(self, index: int, rows: list[tuple]) -> None:
        """A batch of one event's rows (see EventFormat), as JSON lines."""
        self.write_lines(self.formats[index].lines(rows))

    def write_lines(self, text: str) -> None:
        data = text.encode()
        with self.lock:
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes >= self.FLUSH_BYTES:
                self._write_pending()

    def flush(self) -> None:
        with self.lock:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self.pending or self.fd < 0:
            return
        data = b"".join(self.pending)
        self.pending, self.pending_bytes = [], 0
        done, error = 0, None
        try:
            while done < len(data):
                done += os.write(self.fd, memoryview(data)[done:])
        except OSError as exc:
            error = exc
        whole = data.rfind(b"\n", 0, done) + 1        # the bytes of the whole lines that went out
        kept = data.count(b"\n", 0, whole)
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
        self.dropped += data.count(b"\n", whole)
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
