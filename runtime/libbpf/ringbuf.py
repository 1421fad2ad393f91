"""Ring buffer: ring_buffer__new/poll/consume over BPF_MAP_TYPE_RINGBUF maps, one Python callback
per record (RingBuffer); or the ring's pages read in bulk, records decoded in batches (RingReader)."""

from __future__ import annotations

import ctypes
import errno as _errno
from ctypes import c_void_p
from typing import Callable

from .errors import BpfError, Call
from .ffi import SAMPLE_FN, Closing, lib
from .maps import Map

_CALLBACK_RAISED = -_errno.ECANCELED


class PolledBuffer(Closing):
    """What RingBuffer and PerfBuffer share: a libbpf buffer object (``_ptr``, None once closed)
    polled from Python, whose record callback keeps the first exception it raises in ``_pending``
    to be re-raised once the poll or consume call has returned."""

    KIND = "buffer"     # for "ring buffer is closed"

    def __init__(self):
        self._ptr: int | None = None
        self._pending: BaseException | None = None

    def _check(self) -> int:
        if self._ptr is None:
            raise BpfError(f"{self.KIND} is closed")
        return self._ptr

    def _finish(self, op: str, ret: int) -> int:
        """``ret`` of libbpf's poll/consume ``op``: records consumed (0 when a signal cut the wait
        short); the callback's exception, or a BpfError for a failed call, raised."""
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc
        if ret == -_errno.EINTR:
            return 0
        if ret < 0:
            raise BpfError(op, -ret)
        return ret


class RingBuffer(PolledBuffer):
    """ring_buffer__new/poll/consume over one or more BPF_MAP_TYPE_RINGBUF maps.

    ``callback(data: bytes)`` runs on the polling thread.  If it raises, the
    poll stops (that sample counts as consumed) and the exception is re-raised
    from poll()/consume().
    """

    KIND = "ring buffer"

    def __init__(self, bmap: Map, callback: Callable[[bytes], object]):
        super().__init__()
        self._callbacks: list = []  # ctypes callback objects must outlive the ring buffer
        self._maps = [bmap]
        cb = self._make_callback(callback)
        call = Call(f"ring_buffer__new({bmap.name})")
        self._ptr = call.check_ptr(lib().ring_buffer__new(bmap.fd, ctypes.cast(cb, c_void_p), None, None))

    def _make_callback(self, callback: Callable[[bytes], object]):
        def trampoline(_ctx, data, size):
            try:
                callback(ctypes.string_at(data, size))
                return 0
            except BaseException as exc:  # noqa: BLE001 - re-raised after poll
                if self._pending is None:
                    self._pending = exc
                return _CALLBACK_RAISED

        cb = SAMPLE_FN(trampoline)
        self._callbacks.append(cb)
        return cb

    def add(self, bmap: Map, callback: Callable[[bytes], object]) -> None:
        cb = self._make_callback(callback)
        call = Call(f"ring_buffer__add({bmap.name})")
        call.check_int(lib().ring_buffer__add(self._check(), bmap.fd, ctypes.cast(cb, c_void_p), None))
        self._maps.append(bmap)

    def poll(self, timeout_ms: int = 100) -> int:
        """Wait up to ``timeout_ms`` for data, consume it; returns samples consumed."""
        ret = lib().ring_buffer__poll(self._check(), timeout_ms)
        return self._finish("ring_buffer__poll", ret)

    def consume(self) -> int:
        """Consume whatever is ready without waiting; returns samples consumed."""
        ret = lib().ring_buffer__consume(self._check())
        return self._finish("ring_buffer__consume", ret)

    def epoll_fd(self) -> int:
        return lib().ring_buffer__epoll_fd(self._check())

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib().ring_buffer__free(ptr)


RINGBUF_BUSY_BIT = 1 << 31       # the record is still being written
RINGBUF_DISCARD_BIT = 1 << 30    # the program discarded it
RINGBUF_HEADER = 8               # each record: a 4-byte length (with the two bits above), 4 more


class RingReader(Closing):
    """A BPF_MAP_TYPE_RINGBUF read in bulk, without a call per record: the ring's pages mapped
    into this process as libbpf maps them (the consumer page read-write; the producer page and
    the data pages, mapped twice in a row so a record never wraps, read-only).

    ``read()`` copies out every committed record up to the first one still being written and
    moves the consumer position past them at once, so the kernel can reuse the space while they
    are decoded. Records of one size, back to back, come out as one block that
    ``struct.iter_unpack`` decodes in one call; anything else record by record.

    Positions and headers go through memoryviews cast to native 'Q'/'I', so each is one aligned
    8- or 4-byte load or store, in program order (the headers are read before the records they
    commit). ``struct.pack_into("<Q")`` stores byte by byte: the kernel would then see torn
    consumer positions and fail reservations as if the ring were full."""

    def __init__(self, bmap: Map, max_bytes: int = 1 << 20):
        import mmap
        import select

        self._maps: list = []
        size = bmap.max_entries
        page = mmap.PAGESIZE
        self.fd = bmap.fd
        self.size = size
        self.mask = size - 1
        self.max_bytes = max(page, min(max_bytes, size))
        self._cons = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(self.fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._cons_pos = memoryview(self._cons).cast("Q")
        self._prod_pos = memoryview(self._prod)[:8].cast("Q")
        self._data = memoryview(self._prod)[page:]
        self._words = self._data.cast("I")
        self._poller = select.poll()
        self._poller.register(self.fd, select.POLLIN)

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel wakes readers, or `timeout_ms` passes (the generated programs
        wake the reader only once a share of the ring waits)."""
        self._poller.poll(timeout_ms)

    def pending(self) -> int:
        """Bytes written (or being written) and not yet read."""
        return self._prod_pos[0] - self._cons_pos[0]

    def read(self, record_size: int = 0) -> tuple[bytes, int, list[bytes]]:
        """What the ring holds, at most ``max_bytes`` of it: ``(block, count, others)``.

        ``block`` holds the first ``count`` records when they are all ``record_size`` bytes long,
        each with its 8-byte ring header and padded to 8 bytes; ``others`` are the records after
        those (their data only), in ring order. Both are copies: the space is the kernel's again."""
        cons = self._cons_pos[0]
        prod = self._prod_pos[0]
        end = min(prod, cons + self.max_bytes)
        if cons >= end:
            return b"", 0, []
        block, count = b"", 0
        if record_size:
            stride = (record_size + RINGBUF_HEADER + 7) & ~7
            n = (end - cons) // stride
            if n:
                at = cons & self.mask
                # every header of the run at once (a strided view), read before any record
                headers = self._words[at >> 2:(at >> 2) + n * (stride >> 2):stride >> 2].tolist()
                count = n if headers.count(record_size) == n else _first_other(headers, record_size)
                if count:
                    block = self._data[at:at + count * stride].tobytes()
                    cons += count * stride
        others = []
        words, data, mask = self._words, self._data, self.mask
        while cons < end:
            at = cons & mask
            length = words[at >> 2]
            if length & RINGBUF_BUSY_BIT:
                break
            size = length & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT)
            if not length & RINGBUF_DISCARD_BIT:
                others.append(data[at + RINGBUF_HEADER:at + RINGBUF_HEADER + size].tobytes())
            cons += (size + RINGBUF_HEADER + 7) & ~7
        self._cons_pos[0] = cons
        return block, count, others

    def close(self) -> None:
        if getattr(self, "_cons", None) is None:
            return
        for view in (self._words, self._data, self._prod_pos, self._cons_pos):
            view.release()
        self._prod.close()
        self._cons.close()
        self._cons = None


def _first_other(headers: list[int], record_size: int) -> int:
    """How many headers, from the first, are `record_size` (committed, not discarded)."""
    for i, h in enumerate(headers):
        if h != record_size:
            return i
    return len(headers)
