"""What a batch's reply does on the notebook side.

``PendingBatch`` is a sent batch waiting for its reply; ``ReplyDelivery`` hands each call's
value to its ``on_result`` (``FrameRef`` values as memoryviews of the reply's frames) and the
reply's error (the first failed call of its batch) to that call's ``on_error`` and then to
``on_call_error(call_meta, error)``. A malformed reply ends the writer (its ``fail`` callback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from gpu_agent import protocol
from harp_jupyter.profiler import recorder as profiling
from harp_jupyter.shim.call_queue import CallMeta
from harp_jupyter.shim.errors import Error, ProtocolError
from harp_jupyter.shim.kernel_output import note_reply_output


@dataclass(slots=True)
class PendingBatch:
    """A sent batch waiting for its reply. Its calls and frames are kept until then, so that a
    batch the agent never ran (its session was parked first) can be sent again after the
    restore; not ``replayable`` when its frames were the caller's to reuse once sent."""

    seq: int
    metas: list[CallMeta]
    sent: int = 0  # monotonic ns, when profiled
    details: list[str] | None = None  # kernel names, when profiled
    calls: list[list[Any]] = field(default_factory=list)
    frames: list[memoryview] = field(default_factory=list)
    replayable: bool = True
    #: of a batch sent with ``track``: its frames are still the caller's until ``wait_sent``
    #: returns, so until then it can be sent again
    tracker: zmq.MessageTracker | None = None


@dataclass
class Unanswered:
    """What a writer whose session the agent parked had not had answered (``take_unanswered``):
    the batches sent, oldest first, then the calls not sent yet (with their frames)."""

    batches: list[PendingBatch]
    queued: PendingBatch


class ReplyDelivery:
    def __init__(self, label: str,
                 on_call_error: Callable[[CallMeta | None, dict[str, Any]], None],
                 fail: Callable[[Error], Error]) -> None:
        self._label = label
        self._on_call_error = on_call_error
        self._fail = fail

    def accept(self, pending: PendingBatch, header: dict[str, Any], frames: list[zmq.Frame],
               *, profiled: bool) -> None:
        """The reply ``header`` (with ``frames``) of ``pending``, already matched to it; with
        ``profiled``, the batch's timings go to the running profile, if any."""
        if "out" in header:
            note_reply_output(header)
        if profiled and pending.details is not None and profiling.active is not None:
            profiling.active.note_batch(profiling.BatchTiming(
                pending.seq, self._label, pending.sent, profiling.active.now(),
                [m[0] for m in pending.metas], [m[1] for m in pending.metas],
                pending.details,
                header.get("p") if isinstance(header.get("p"), dict) else None))
        self.deliver(pending, header, frames)

    def deliver(self, pending: PendingBatch, header: dict[str, Any],
                 frames: list[zmq.Frame]) -> None:
        """``accept`` of a reply without printed output, not profiled."""
        metas = pending.metas
        try:
            for index, value in header.get("r") or ():
                on_result = metas[index][2]
                if on_result is not None:
                    on_result(_resolve(value, frames))
        except (TypeError, ValueError, IndexError) as e:
            raise self._fail(ProtocolError(
                f"malformed reply from the agent at {self._label}: {e!r}")) from None
        error = header.get("e")
        if not error:
            return
        if not isinstance(error, dict):
            error = {"kind": "ProtocolError", "msg": f"malformed error in reply: {error!r}"}
        index = error.get("i")
        meta = metas[index] if type(index) is int and 0 <= index < len(metas) else None
        if meta is not None and meta[3] is not None:
            meta[3]()
        self._on_call_error(meta, error)


def _resolve(value: Any, frames: list[zmq.Frame]) -> Any:
    if isinstance(value, protocol.FrameRef):
        if not 1 <= value.index <= len(frames):
            raise IndexError(f"reply refers to frame {value.index}, it has {len(frames)}")
        return frames[value.index - 1].buffer
    return value
