"""Host<->device copies of the shim's session: how a copy is cut, and its calls.

``RemoteSession.htod`` and ``dtoh_into`` hand over to ``HostCopies``. A copy the caller waits
for goes in ``copy_pieces``, each a batch, so that the worker copies one piece to or from the GPU
while the next is on the wire; an asynchronous one in ``async_chunks``, the calls around it
overlapping it already. A synchronous upload up to ``SNAPSHOT_COPY_BYTES`` is snapshotted into
reused buffers and returns at once; a larger one goes zero-copy and returns once it is on the
wire (``SessionRestore.send_tracked``). No piece or chunk is larger than the agent's
``max_frame``. ``bench/copy_stages.py`` measures each stage of such a copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from gpu_agent import protocol
from gpu_agent.staging_buffers import StagingBuffers
from harp_jupyter.shim.batch import BatchWriter, CallMeta, byte_view
from harp_jupyter.shim.callsite import CallSite, user_call_site
from harp_jupyter.shim.errors import ProtocolError
from harp_jupyter.shim.restore import SessionRestore

#: a host<->device copy the caller waits for, of at least this many bytes, goes in pieces, one
#: message each, so that the agent copies one piece to (or from) the GPU while the next is on
#: the wire, and the notebook copies one out while the next arrives: done one after another,
#: the wire, the device copy and the host copy of a 1-16 MiB copy leave at most 0.7x of the
#: wire's own speed (bench/forwarding.py's bounds table)
PIPELINE_MIN_BYTES = 1 << 20
#: the pieces a pipelined copy is cut into, at least (more for a copy past their size bound)
PIPELINE_PIECES = 4
#: the size bounds of a piece: each piece costs a message's work on both sides, and each is a
#: message the agent holds whole before copying it. On an H200 host, 16 MiB went fastest in
#: 1 MiB pieces and 4 MiB in 512 KiB-1 MiB ones; in four interleaved comparisons a 1 MiB copy
#: went up 1-14% faster in four pieces than in two, and down within 5% either way
PIECE_MIN_BYTES = 256 << 10
PIECE_MAX_BYTES = 1 << 20
#: an asynchronous copy (``memcpy_htod_async``, ``memcpy_dtoh_async``) goes in calls of at most
#: this many bytes: the caller does not wait for it, so the copies around it overlap it already,
#: and pieces would only add batches. Under a network's delay a batch a piece costs round trips:
#: at most ``protocol.MAX_INFLIGHT_BATCHES`` are in flight (bench/network_delay.py's image
#: pipeline, 1 MiB frames, spent 2.7 round trips of a 1 ms delay per sync point with pieces)
ASYNC_CHUNK_BYTES = 16 << 20

#: a synchronous host->device copy up to this size is snapshotted by a copy and returns at once;
#: a larger one goes zero-copy and returns when its data is on the wire
SNAPSHOT_COPY_BYTES = 4 << 20
#: the snapshots' buffers kept for reuse, at most (a new one would be fresh pages, each faulted
#: in by the copy)
SNAPSHOT_STAGING_BYTES = 16 << 20


class CopyHost(Protocol):
    """What the copies use of their session."""

    lock: threading.RLock

    def _ensure_connected(self) -> BatchWriter: ...

    def _send_deferred(self) -> None: ...

    def _current_or_restored(self, writer: BatchWriter) -> BatchWriter: ...

    def _add(self, writer: BatchWriter, op: str, args: Any, site: CallSite | None,
             on_result: Callable[[Any], None] | None = None,
             on_error: Callable[[], None] | None = None, *, end_batch: bool = False) -> None: ...

    def _sync_one(self, writer: BatchWriter, call: list[Any], meta: CallMeta) -> None: ...

    def _wait_all(self, writer: BatchWriter) -> None: ...


class HostCopies:
    """A session's copies between the notebook's memory and the device's; see the module
    docstring."""

    def __init__(self, host: CopyHost, restore: SessionRestore) -> None:
        self._host = host
        self._restore = restore
        self._snapshots = StagingBuffers(SNAPSHOT_STAGING_BYTES, _host_buffer)

    @property
    def snapshot_bytes(self) -> int:
        """The bytes the snapshots' reused buffers hold now (for tests)."""
        return self._snapshots.held_bytes

    def htod(self, dst: int, buffer: Any, stream: int | None = None, *,
             keep: bool = False) -> None:
        """Copy ``buffer`` to device address ``dst``: in ``copy_pieces``, returning once they
        are sent (large buffers go zero-copy; the buffer may then change); or, with ``keep``,
        in ``async_chunks``, returning at once (the buffer must stay unchanged until the copy
        executed, as for cuMemcpyHtoDAsync)."""
        view = byte_view(buffer)
        nbytes = view.nbytes
        if nbytes == 0:
            return
        host = self._host
        writer = host._ensure_connected()
        host._send_deferred()
        site = user_call_site(3)
        if keep:
            for offset, size in async_chunks(nbytes, writer.max_frame):
                host._add(writer, "htod", [int(dst) + offset, view[offset:offset + size],
                                           stream], site, end_batch=True)
            return
        pieces = copy_pieces(nbytes, writer.max_frame)
        if nbytes <= SNAPSHOT_COPY_BYTES:
            # copying is cheaper than waiting until ZeroMQ has sent the caller's buffer; a
            # piece goes as soon as it is copied, so the next copy overlaps its sending
            for offset, size in pieces:
                host._add(writer, "htod", [int(dst) + offset,
                                           self._snapshot(view[offset:offset + size]), stream],
                          site, end_batch=len(pieces) > 1)
            return
        self._restore.send_tracked(writer, [
            ("htod", [int(dst) + offset, view[offset:offset + size], stream])
            for offset, size in pieces], site)

    def _snapshot(self, piece: memoryview) -> Any:
        """A copy of ``piece``: bytes when it goes inline, else a reused buffer's view."""
        if piece.nbytes < protocol.MAX_INLINE_BYTES:
            return piece.tobytes()
        copy = self._snapshots.take(piece.nbytes)
        copy[:] = piece
        return copy

    def dtoh_into(self, dest: Any, src: int, stream: int | None = None, *,
                  wait: bool = True) -> None:
        """Copy ``len(dest)`` bytes from device address ``src`` into the writable buffer
        ``dest``. With ``wait`` this is a sync point; without, ``dest`` is filled when the
        replies arrive (at the latest by the next sync point)."""
        view = byte_view(dest)
        if view.readonly:
            raise TypeError("the destination buffer is read-only")
        nbytes = view.nbytes
        host = self._host
        writer = host._ensure_connected()
        site = user_call_site(3)
        with host.lock:
            host._send_deferred()
            pieces = (copy_pieces(nbytes, writer.max_frame) if wait
                      else async_chunks(nbytes, writer.max_frame))
            if wait and len(pieces) == 1:
                host._sync_one(writer, ["dtoh", int(src), nbytes, stream],
                               ("dtoh", site, copy_into(view), None))
                return
            for offset, size in pieces:
                host._add(writer, "dtoh", [int(src) + offset, size, stream], site,
                          copy_into(view[offset:offset + size]),
                          end_batch=wait or len(pieces) > 1)
            if wait:
                host._wait_all(host._current_or_restored(writer))


def copy_pieces(nbytes: int, max_frame: int = protocol.MAX_FRAME_BYTES
                ) -> list[tuple[int, int]]:
    """``(offset, size)`` of the pieces a copy of ``nbytes`` goes in: none for nothing, one
    below ``PIPELINE_MIN_BYTES``, else ``PIPELINE_PIECES`` of whole pages, each within
    ``PIECE_MIN_BYTES`` and ``PIECE_MAX_BYTES`` (the last may be shorter); none larger than
    the agent's ``max_frame``."""
    if nbytes <= max_frame and nbytes < PIPELINE_MIN_BYTES:
        return [(0, nbytes)] if nbytes else []
    quarter = (-(-nbytes // PIPELINE_PIECES) + 4095) & ~4095
    return _cut(nbytes, min(PIECE_MAX_BYTES, max(PIECE_MIN_BYTES, quarter), max_frame))


def async_chunks(nbytes: int, max_frame: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of the calls an asynchronous copy of ``nbytes`` goes in, each within
    ``ASYNC_CHUNK_BYTES`` and the agent's ``max_frame``."""
    return _cut(nbytes, min(ASYNC_CHUNK_BYTES, max_frame))


def _cut(nbytes: int, size: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of ``nbytes`` in parts of ``size`` (at least 1), the last shorter."""
    size = max(1, size)
    return [(offset, min(size, nbytes - offset)) for offset in range(0, nbytes, size)]


def _host_buffer(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, np.uint8)


def copy_into(target: memoryview) -> Callable[[Any], None]:
    """A reply's ``on_result`` that copies the bytes it brings into ``target``."""
    def copy(value: Any) -> None:
        source = value if type(value) is memoryview else byte_view(value)
        if source.nbytes != target.nbytes:
            raise ProtocolError(f"dtoh returned {source.nbytes} bytes, expected {target.nbytes}")
        target[:] = source

    return copy
