"""Sampled events as JSON lines: one object per event, time-valued fields in seconds."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading


def rendered(value, spec: dict):
    """A value as people read it: IPv4 addresses (kept as numbers in network order) as dotted
    quads, enumerations (the part of a `parts:` histogram, an `active(...)` span) as their
    names; anything else as it is. Shared by labels and event fields."""
    if spec.get("render") == "ipv4" and isinstance(value, int):
        return socket.inet_ntoa(struct.pack("<I", value & 0xFFFFFFFF))
    if spec.get("render") == "enum" and isinstance(value, int):
        names = spec.get("names") or []
        return names[value] if 0 <= value < len(names) else value
    return value


class EventSink:
    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.lock = threading.Lock()
        # Block-buffered: a write per event would cost a syscall each; flush() runs every
        # interval and at close, so a reader sees events within a second and none are lost.
        self.stream = sys.stdout if path == "-" else open(path, "a", buffering=1 << 16)
        self.events = {e["index"]: e for e in manifest["events"]}
        self.written = 0

    def field_name(self, spec: dict) -> str:
        return f"{spec['name']}_seconds" if spec.get("unit") == "time" else spec["name"]

    def value(self, spec: dict, raw):
        if spec.get("unit") == "time" and isinstance(raw, int):
            return raw / 1e9
        return rendered(raw, spec)

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self.lock:
            self.stream.write(line + "\n")
            self.written += 1

    def flush(self) -> None:
        with self.lock:
            self.stream.flush()

    def close(self) -> None:
        self.flush()
        if self.stream is not sys.stdout:
            self.stream.close()
