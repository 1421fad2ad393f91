"""Decoding what a core bundle's maps and ring buffer hold, from the manifest's layouts alone: metric
maps into store snapshots, event records into rows of events.EventFormat (in batches), stack ids
into frames."""

from __future__ import annotations

import collections
import itertools
import operator
import struct

from .events import EventFormat
from .libbpf.ringbuf import RINGBUF_HEADER
from .manifest import EVENT_HEADER_NAMES, BundleError, EventInfo, MapInfo, MetricInfo
from .store import HistogramSeries

MASK64 = (1 << 64) - 1


def _signed64(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def _percpu_total(values) -> int:
    if isinstance(values, (bytes, bytearray)):
        return int.from_bytes(values[:8], "little")
    return sum(int.from_bytes(v[:8], "little") for v in values) & MASK64


# --- metrics -------------------------------------------------------------------------------------
class MetricReader:
    """Turns one metric's per-CPU map into a store snapshot."""

    def __init__(self, meta: MetricInfo, map_meta: MapInfo, signed: bool):
        self.meta = meta
        self.name = meta.name
        self.map = meta.map
        self.overflow_map = meta.overflow_map     # labelled metrics: the kernel's __overflow__
        self.folded_map = meta.folded_map         # and the label sets folded into it
        self.histogram = meta.kind == "histogram"
        self.nb = len(meta.edges) + 1
        self.sum_slot = meta.sum_slot
        self.signed = signed
        self.labelled = bool(meta.labels)
        self.label_fields = []
        self.bucket_at = None
        if self.labelled:
            fields = {f.label: f for f in map_meta.key.fields if f.label}
            for lab in meta.labels:
                f = fields.get(lab.name)
                if f is None:
                    raise BundleError(f"manifest: metric '{self.name}' has label '{lab.name}' but its key "
                                      "layout has no field for it")
                self.label_fields.append((f.offset, f.size, f.ctype))
            bucket = [f for f in map_meta.key.fields if f.name == "bucket"]
            if self.histogram:
                if not bucket:
                    raise BundleError(f"manifest: histogram '{self.name}' has no bucket in its key layout")
                self.bucket_at = bucket[0].offset

    def total(self, values) -> int:
        raw = _percpu_total(values)
        return _signed64(raw) if self.signed else raw

    def labels(self, key: bytes) -> tuple:
        out = []
        for offset, size, ctype in self.label_fields:
            raw = key[offset:offset + size]
            if ctype == "char":
                out.append(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
            else:
                out.append(int.from_bytes(raw, "little", signed=ctype.startswith("__s")))
        return tuple(out)

    def decode(self, items) -> dict:
        if not self.labelled:
            slots = {int.from_bytes(k[:4], "little"): v for k, v in items}
            if not self.histogram:
                value = self.total(slots[0]) if 0 in slots else 0
                return {(): value} if value else {}
            buckets = [_percpu_total(slots[i]) if i in slots else 0 for i in range(self.nb)]
            total = self.total(slots[self.sum_slot]) if self.sum_slot in slots else 0
            return {(): HistogramSeries(buckets, total)} if any(buckets) else {}
        out: dict[tuple, object] = {}
        for key, values in items:
            labels = self.labels(key)
            if not self.histogram:
                out[labels] = self.total(values)
                continue
            bucket = int.from_bytes(key[self.bucket_at:self.bucket_at + 4], "little")
            series = out.get(labels)
            if series is None:
                series = out[labels] = HistogramSeries([0] * self.nb)
            if bucket == self.sum_slot:
                series.sum = self.total(values)
            elif bucket < self.nb:
                series.buckets[bucket] += _percpu_total(values)
        return out

    def decode_overflow(self, items):
        """The kernel's __overflow__ series, from its per-CPU array (None while it is empty): the
        same slots as an unlabelled metric's map."""
        slots = {int.from_bytes(k[:4], "little"): v for k, v in items}
        if not self.histogram:
            value = self.total(slots[0]) if 0 in slots else 0
            return value or None
        buckets = [_percpu_total(slots[i]) if i in slots else 0 for i in range(self.nb)]
        if not any(buckets):
            return None
        return HistogramSeries(buckets, self.total(slots[self.sum_slot]) if self.sum_slot in slots else 0)


# --- events --------------------------------------------------------------------------------------
class EventDecoder:
    """Ring-buffer records of one event -> the rows of its EventFormat (see events.py)."""

    def __init__(self, meta: EventInfo):
        self.meta = meta
        self.format = EventFormat(meta)
        record = meta.record
        self.size = record.size
        self.struct = struct.Struct(record.format)
        # the same record as RingReader hands a run of them over: its 8-byte ring header before,
        # padding to 8 bytes after
        stride = (record.size + RINGBUF_HEADER + 7) & ~7
        self.block = struct.Struct(f"<{RINGBUF_HEADER}x{record.format.lstrip('<=')}{stride - RINGBUF_HEADER - record.size}x")
        names = [f.name for f in record.fields if not f.name.startswith("__pad")]
        header = tuple(names[:len(EVENT_HEADER_NAMES)])
        if header != EVENT_HEADER_NAMES:
            raise BundleError(f"manifest: event '{meta.name}' record does not start with the probec header")
        position = {n: i for i, n in enumerate(names) if i >= len(EVENT_HEADER_NAMES)}
        at = {n: names.index(n) for n in EVENT_HEADER_NAMES}
        self.row = operator.itemgetter(at["ts"], at["pid"], at["tid"], at["cpu"],
                                       *(position[f.name] for f in self.format.fields))
        self.stacks = [(i, f.kind == "kernelstack") for i, f in enumerate(self.format.fields, start=4)
                       if f.kind.endswith("stack")]

    def rows(self, values: list[tuple], stacks: "StackSymbols | None", health) -> list[tuple]:
        rows = list(map(self.row, values))
        if not self.stacks:
            return rows
        out = []
        for row in rows:
            row = list(row)
            for at, kernel in self.stacks:
                try:
                    row[at] = stacks.frames(row[at], row[1], kernel) if stacks else []
                except Exception:
                    health.decode_errors += 1
                    row[at] = []
            out.append(tuple(row))
        return out


class StackSymbols:
    """Stack ids from the stack-trace map -> symbolised frames, cached per pid."""

    def __init__(self, stack_map, depth: int):
        self.map = stack_map
        self.depth = depth
        self.recent: collections.OrderedDict[int, tuple[int, ...]] = collections.OrderedDict()
        self.users: collections.OrderedDict[int, object] = collections.OrderedDict()
        try:
            from . import symbolize
            self.symbolize = symbolize
        except Exception:  # symbolisation is optional: raw addresses still say something
            self.symbolize = None

    def addresses(self, stack_id: int) -> tuple[int, ...]:
        key = struct.pack("<I", stack_id & 0xFFFFFFFF)
        raw = self.map.lookup(key)
        if raw is not None:
            addrs = struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8])
            # Free the slot for other stacks; a later event with this id that was taken before
            # the delete finds it in `recent` (the kernel never rewrites an occupied slot).
            self.map.delete(key)
            self.recent[stack_id] = addrs
            while len(self.recent) > 4096:
                self.recent.popitem(last=False)
            return addrs
        return self.recent.get(stack_id, ())

    def user(self, pid: int):
        user = self.users.get(pid)
        if user is None:
            user = self.users[pid] = self.symbolize.UserSymbols(pid)
            while len(self.users) > 64:
                self.users.popitem(last=False)
        else:
            self.users.move_to_end(pid)
        return user

    def frames(self, stack_id: int, pid: int, kernel: bool) -> list[str]:
        if stack_id < 0:
            return []
        addrs = list(self.addresses(stack_id))
        while addrs and not addrs[-1]:
            addrs.pop()
        if self.symbolize is None:
            return [f"{a:#x}" for a in addrs]
        table = self.symbolize.KernelSymbols.shared() if kernel else self.user(pid)
        return [table.symbolize(a, return_address=i > 0) for i, a in enumerate(addrs)]


def decode_block(decoders: dict[int, EventDecoder], decoder: EventDecoder, block: bytes,
                 stacks: StackSymbols | None, output, health) -> None:
    """A run of records of `decoder`'s size, as RingReader.read() hands them over, decoded in one
    call; each run of one event goes to `output` as one batch (events of one size may share it)."""
    for index, values in itertools.groupby(decoder.block.iter_unpack(block), key=_EVENT_INDEX):
        values = list(values)
        owner = decoders.get(index)
        if owner is None or owner.size != decoder.size:
            health.decode_errors += len(values)
            continue
        if output is not None:
            output.add(index, owner.rows(values, stacks, health))


def decode_records(decoders: dict[int, EventDecoder], records: list[bytes], stacks: StackSymbols | None,
                   output, health) -> None:
    """Records one by one (of several sizes, or single), each run of one event as one batch to
    `output`; a record of no event of the bundle, or shorter than its layout, is counted in
    health.decode_errors."""
    values: list[tuple] = []
    current = None
    for data in records:
        try:
            decoder = decoders[int.from_bytes(data[:4], "little")]
            value = decoder.struct.unpack_from(data)
        except (KeyError, struct.error):
            health.decode_errors += 1
            continue
        if decoder is not current and values:
            if output is not None:
                output.add(current.meta.index, current.rows(values, stacks, health))
            values = []
        current = decoder
        values.append(value)
    if values and output is not None:
        output.add(current.meta.index, current.rows(values, stacks, health))


_EVENT_INDEX = operator.itemgetter(0)
