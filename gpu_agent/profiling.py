"""The agent's side of ``%%harp profile``: timings of profiled batches, GPU timings, NVTX.

A batch whose header has ``p`` (``AGENT_TIMING``, ``GPU_PER_OP`` or ``GPU_PER_BATCH``) is timed
call by call; its reply carries ``p: {recv, end, calls: [[index, start, end], ...]}`` in this
process's clock (``now_ns``), which the notebook places on its own clock from the round trips.
GPU timings (CUDA events, only while profiling) are collected by the ``profile_gpu`` op:

- ``GPU_PER_OP``: two events around every GPU op, a record ``[op, stream, start, end, seq,
  index]`` each.
- ``GPU_PER_BATCH``: the same while a batch has at most ``PER_OP_UP_TO`` GPU ops on a stream;
  a batch with more on one stream gets one pair of events there, before its first GPU op and
  after its last, and one record ``[BATCH_SPAN, stream, start, end, seq, first index, [call
  indices]]``. The GPU times of the ops inside it are not measured: two events per tiny launch
  cost more than the launch (issue 16), and the span says how many ops it holds instead. An
  agent that predates it treats the level as ``GPU_PER_OP``.

``HARP_AGENT_CLOCK_SKEW_S`` shifts this clock (tests use it to show that spans still line up
when the two machines' clocks disagree).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from gpu_agent import protocol as P

log = logging.getLogger("harp.agent.profiling")

_SKEW_NS = int(float(os.environ.get("HARP_AGENT_CLOCK_SKEW_S") or 0) * 1e9)

#: the ``p`` levels of a batch header
AGENT_TIMING, GPU_PER_OP, GPU_PER_BATCH = 1, 2, 3
#: with GPU_PER_BATCH, the most GPU ops on one stream of one batch that are timed one by one
PER_OP_UP_TO = 8
#: the op of a GPU timing record that spans several GPU ops of one batch on one stream
BATCH_SPAN = "batch"
#: op -> position of its stream argument
STREAM_ARG = {name: i for name, op in P.OPS.items()
              for i, check in enumerate(op.args) if check is P.STREAM}
#: ops that put work on the device (timed on the GPU while profiling)
_GPU_OPS = frozenset(name for name, op in P.OPS.items() if op.gpu)


def now_ns() -> int:
    return time.monotonic_ns() + _SKEW_NS


class BatchTimer:
    """Timings of one profiled batch: its calls on the agent's clock and, at the GPU levels,
    the GPU timers of its GPU ops (through the session's ``gpu_timer_start``/``_end``)."""

    def __init__(self, level: int, calls: list[Any], device: Any) -> None:
        self.level = level
        self.received = now_ns()
        self.calls: list[list[int]] = []
        self.gpu = level >= GPU_PER_OP
        self._device = device
        #: GPU_PER_BATCH: stream -> GPU ops of this batch still to run there, for the streams
        #: with more than PER_OP_UP_TO (counted from the calls as sent: a call that fails
        #: validation never runs, and its stream's span is closed by ``reply``)
        self._left: dict[Any, int] = (_many_per_stream(calls) if level >= GPU_PER_BATCH
                                      else {})
        #: stream -> [token, call indices] of its open span
        self._spans: dict[Any, list[Any]] = {}

    def gpu_start(self, name: str, stream: int | None, index: int) -> Any:
        """Before GPU op ``name`` (call ``index``) runs on ``stream``: a token for
        ``gpu_end``."""
        if stream not in self._left:
            return self._device.gpu_timer_start(name, stream)
        span = self._spans.get(stream)
        if span is None:
            span = self._spans[stream] = [self._device.gpu_timer_start(BATCH_SPAN, stream), []]
        span[1].append(index)
        return None

    def gpu_end(self, token: Any, stream: int | None, seq: int, index: int, ran: bool) -> None:
        """After call ``index`` (``ran``: it was issued without an error)."""
        if stream not in self._left:
            if ran and token is not None:
                self._device.gpu_timer_end(token, seq, index)
            return
        span = self._spans[stream]
        if not ran:
            span[1].pop()
        self._left[stream] -= 1
        if self._left[stream] == 0:
            self._close(stream, seq)

    def reply(self, seq: int) -> dict[str, Any]:
        for stream in list(self._spans):  # spans of calls that never ran (invalid, context lost)
            self._close(stream, seq)
        return {"recv": self.received, "end": now_ns(), "calls": self.calls}

    def _close(self, stream: Any, seq: int) -> None:
        token, indices = self._spans.pop(stream)
        if token is not None and indices:
            self._device.gpu_timer_end(token, seq, indices[0], indices)


def _many_per_stream(calls: list[Any]) -> dict[Any, int]:
    """stream -> GPU ops of ``calls`` on it, for the streams with more than PER_OP_UP_TO.
    ``calls`` are not validated yet: anything unlike a GPU call is not counted."""
    counts: dict[Any, int] = {}
    for call in calls:
        if type(call) is list and call and type(call[0]) is str and call[0] in _GPU_OPS:
            stream = stream_of(call[0], call[1:])
            if stream is None or type(stream) is int:
                counts[stream] = counts.get(stream, 0) + 1
    return {stream: n for stream, n in counts.items() if n > PER_OP_UP_TO}


def stream_of(name: str, args: list[Any]) -> int | None:
    position = STREAM_ARG.get(name)
    return args[position] if position is not None and position < len(args) else None


def nvtx_push(message: str) -> None:
    """Open the notebook's NVTX range in this process too (Nsight Systems on the GPU server
    shows it next to the kernels); nothing when the nvtx package is not installed."""
    try:
        import nvtx
    except ImportError:
        return
    nvtx.push_range(message, domain="harp")


def nvtx_pop() -> None:
    try:
        import nvtx
    except ImportError:
        return
    nvtx.pop_range(domain="harp")
