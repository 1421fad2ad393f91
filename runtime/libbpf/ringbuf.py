"""Ring buffer: ring_buffer__new/poll/consume over BPF_MAP_TYPE_RINGBUF maps, one Python callback
per record."""

from __future__ import annotations

import ctypes
import errno as _errno
from ctypes import c_void_p
from typing import Callable

from .errors import BpfError, Call
from .ffi import SAMPLE_FN, Closing, lib
from .maps import Map

_CALLBACK_RAISED = -_errno.ECANCELED


class RingBuffer(Closing):
    """ring_buffer__new/poll/consume over one or more BPF_MAP_TYPE_RINGBUF maps.

    ``callback(data: bytes)`` runs on the polling thread.  If it raises, the
    poll stops (that sample counts as consumed) and the exception is re-raised
    from poll()/consume().
    """

    def __init__(self, bmap: Map, callback: Callable[[bytes], object]):
        self._ptr: int | None = None
        self._callbacks: list = []  # ctypes callback objects must outlive the ring buffer
        self._pending: BaseException | None = None
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

    def _check(self) -> int:
        if self._ptr is None:
            raise BpfError("ring buffer is closed")
        return self._ptr

    def _finish(self, op: str, ret: int) -> int:
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc
        if ret == -_errno.EINTR:
            return 0
        if ret < 0:
            raise BpfError(op, -ret)
        return ret

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
