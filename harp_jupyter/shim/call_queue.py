"""The calls a ``BatchWriter`` has not sent yet: the next batch, as it will go on the wire.

Buffer arguments (the ``BUF`` arguments of ``protocol.OPS``) smaller than
``protocol.MAX_INLINE_BYTES`` are copied into the call (a snapshot); larger ones become the
batch's frames, referenced by ``FrameRef`` (``gpu_agent.multipart.send`` decides whether ZeroMQ
copies one or takes it zero-copy); one larger than the agent's largest frame (``max_frame``,
from its welcome) is the user's ``LogicError``, before anything is queued. Each call has its
``CallMeta`` (op, the user's call site, the callbacks of its result and its error). The
profiler's recorder, when a profile runs, is told of every call as it is queued. Not
thread-safe: the writer's lock guards it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gpu_agent import protocol
from gpu_agent.sizes import format_bytes
from harp_jupyter.profiler import recorder as profiling
from harp_jupyter.shim.callsite import CallSite
from harp_jupyter.shim.errors import LogicError

#: (op, call site, on_result, on_error) of one queued call
CallMeta = tuple[str, CallSite | None, Callable[[Any], None] | None, Callable[[], None] | None]

BUF_POSITIONS = protocol.BUF_POSITIONS


def byte_view(buffer: Any) -> memoryview:
    """A flat unsigned-byte view of a contiguous buffer (bytes, bytearray, memoryview, ndarray)."""
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    if view.ndim == 1 and view.format == "B":
        return view
    if view.c_contiguous:
        return view.cast("B")
    if view.contiguous:  # Fortran order: its bytes in memory order
        import numpy as np

        return memoryview(np.asarray(buffer).ravel(order="K").view(np.uint8))
    raise TypeError("buffer must be contiguous (numpy.ascontiguousarray makes it so)")


class CallQueue:
    """Calls, their metas and frames, in the order they were added."""

    def __init__(self, max_frame: int = protocol.MAX_FRAME_BYTES) -> None:
        #: the largest frame the agent takes (``harp-agent --max-frame``)
        self.max_frame = max_frame
        self.calls: list[list[Any]] = []
        self.metas: list[CallMeta] = []
        self.frames: list[memoryview] = []
        self.frame_bytes = 0
        #: the most calls taken at once (for tests)
        self.peak = 0

    def __len__(self) -> int:
        return len(self.calls)

    def add(self, op: str, args: Sequence[Any], site: CallSite | None,
            on_result: Callable[[Any], None] | None,
            on_error: Callable[[], None] | None) -> None:
        positions = BUF_POSITIONS.get(op)
        call = [op, *args]
        if positions:
            frames = len(self.frames)
            try:
                for i in positions:
                    call[i + 1] = self._buffer_argument(op, call[i + 1])
            except LogicError:
                del self.frames[frames:]
                self.frame_bytes = sum(frame.nbytes for frame in self.frames)
                raise
        if op in profiling.NAMING_OPS:
            profiling.note_kernel_name(op, call[1:])
        if profiling.active is not None:
            profiling.active.note_call(call, site, self._bytes_of(call, positions))
        self.calls.append(call)
        self.metas.append((op, site, on_result, on_error))

    def add_inline(self, call: list[Any], site: CallSite | None) -> None:
        """``add`` of a whole wire call whose buffer arguments are all ``bytes`` shorter than
        ``protocol.MAX_INLINE_BYTES`` (the caller knows), without callbacks."""
        op = call[0]
        if op in profiling.NAMING_OPS:
            profiling.note_kernel_name(op, call[1:])
        if profiling.active is not None:
            profiling.active.note_call(call, site, self._bytes_of(call, BUF_POSITIONS.get(op)))
        self.calls.append(call)
        self.metas.append((op, site, None, None))

    def _buffer_argument(self, op: str, value: Any) -> Any:
        if type(value) is bytes and len(value) < protocol.MAX_INLINE_BYTES:
            return value  # the common case (a kernel's packed arguments): inline as it is
        if isinstance(value, protocol.FrameRef):
            return value
        view = byte_view(value)
        if view.nbytes < protocol.MAX_INLINE_BYTES:
            return value if isinstance(value, bytes) else view.tobytes()
        if view.nbytes > self.max_frame:
            raise LogicError(
                f"{op}: its data is {format_bytes(view.nbytes)}, more than the "
                f"{format_bytes(self.max_frame)} the agent takes in one piece (harp-agent "
                "--max-frame): make it smaller, or ask the agent's operator for a larger "
                "--max-frame. Nothing was sent; the session goes on.")
        self.frames.append(view)
        self.frame_bytes += view.nbytes
        return protocol.FrameRef(len(self.frames))

    def _bytes_of(self, call: list[Any], positions: tuple[int, ...] | None) -> int:
        total = 0
        for i in positions or ():
            value = call[i + 1]
            total += (self.frames[value.index - 1].nbytes
                      if isinstance(value, protocol.FrameRef) else len(value))
        return total

    def take(self) -> tuple[list[list[Any]], list[CallMeta], list[memoryview]]:
        """``(calls, metas, frames)``, leaving the queue empty."""
        taken = self.calls, self.metas, self.frames
        self.peak = max(self.peak, len(self.calls))
        self.calls, self.metas, self.frames, self.frame_bytes = [], [], [], 0
        return taken

    def put_back(self, calls: list[list[Any]], metas: list[CallMeta],
                 frames: list[memoryview]) -> None:
        """Make ``calls`` (taken, or another writer's) the queue, frames and all: the queue
        must be empty."""
        self.calls, self.metas, self.frames = calls, metas, frames
        self.frame_bytes = sum(f.nbytes for f in frames)
