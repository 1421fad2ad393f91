"""Perf buffer: perf_buffer__new/poll/consume over a BPF_MAP_TYPE_PERF_EVENT_ARRAY, one Python
callback per record: what a kernel without ring buffers (before 5.8) hands events through."""

from __future__ import annotations

import ctypes
from ctypes import c_void_p
from typing import Callable

from .errors import Call
from .ffi import PERF_LOST_FN, PERF_SAMPLE_FN, lib
from .maps import Map
from .ringbuf import PolledBuffer

PAGES_PER_CPU = 64          # 256 KiB per CPU with 4 KiB pages (a power of two, as the kernel wants)


class PerfBuffer(PolledBuffer):
    """perf_buffer__new/poll/consume over one PERF_EVENT_ARRAY map.

    With ``callback(data: bytes)``, each record is handed to it on the polling thread, as
    RingBuffer does; without, records are kept until read(), as RingReader's wait()/read() hand
    them over (one by one: perf records carry no common size). ``data`` may carry up to 7 bytes of
    the kernel's padding after the record. ``lost`` counts the records the kernel reported lost (a
    full per-CPU buffer). An exception in the callback is re-raised from poll()/consume().
    """

    KIND = "perf buffer"

    def __init__(self, bmap: Map, callback: Callable[[bytes], object] | None = None, pages: int = PAGES_PER_CPU):
        super().__init__()
        self.lost = 0
        self._kept: list[bytes] = []
        if callback is None:
            callback = self._kept.append

        def on_sample(_ctx, _cpu, data, size):
            if self._pending is not None:
                return
            try:
                callback(ctypes.string_at(data, size))
            except BaseException as exc:  # noqa: BLE001 - re-raised after poll
                self._pending = exc

        def on_lost(_ctx, _cpu, count):
            self.lost += count

        self._callbacks = (PERF_SAMPLE_FN(on_sample), PERF_LOST_FN(on_lost))  # must outlive the buffer
        call = Call(f"perf_buffer__new({bmap.name}, {pages} pages)")
        self._ptr = call.check_ptr(lib().perf_buffer__new(
            bmap.fd, pages, ctypes.cast(self._callbacks[0], c_void_p), ctypes.cast(self._callbacks[1], c_void_p),
            None, None))

    def poll(self, timeout_ms: int = 100) -> int:
        return self._finish("perf_buffer__poll", lib().perf_buffer__poll(self._check(), timeout_ms))

    def consume(self) -> int:
        return self._finish("perf_buffer__consume", lib().perf_buffer__consume(self._check()))

    def wait(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for records (RingReader's interface): kept for read()."""
        self.poll(timeout_ms)

    def read(self, _size: int = 0) -> tuple[bytes, int, list[bytes]]:
        """The records that arrived, as RingReader.read() gives them: (b"", 0, records)."""
        self.consume()
        kept, self._kept[:] = list(self._kept), []
        return b"", 0, kept

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib().perf_buffer__free(ptr)
