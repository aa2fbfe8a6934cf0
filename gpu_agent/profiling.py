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
from bisect import bisect_left
from typing import Any

from gpu_agent import protocol as P

log = logging.getLogger("harp.agent.profiling")

_SKEW_NS = int(float(os.environ.get("HARP_AGENT_CLOCK_SKEW_S") or 0) * 1e9)

#: the ``p`` levels of a batch header
AGENT_TIMING, GPU_PER_OP, GPU_PER_BATCH = 1, 2, 3
#: with GPU_PER_BATCH, the most GPU ops on one stream of one batch that are timed one by one:
#: a loop step between two sync points keeps its kernels' own times, while a launch-bound loop
#: (hundreds of launches a batch, where two events per launch cost more than the launch) gets
#: one span per batch and stream
PER_OP_UP_TO = 32
#: the op of a GPU timing record that spans several GPU ops of one batch on one stream
BATCH_SPAN = "batch"
#: GPU timing records a session keeps until ``profile_gpu`` collects them (a profile does at
#: its end), unless ``harp-agent --pending-gpu-timings`` says otherwise: past it, GPU ops are not
#: timed (two CUDA events each while profiling op by op),
#: and the notebook's timeline says how many of its GPU ops have no GPU time
MAX_PENDING_GPU_TIMINGS = 100_000
#: op -> position of its stream argument
STREAM_ARG = {name: i for name, op in P.OPS.items()
              for i, check in enumerate(op.args) if check is P.STREAM}
#: ops that put work on the device (timed on the GPU while profiling) -> (length of a valid
#: call ``[op, *args]``, position of its stream in it or 0: the default stream)
_GPU_SHAPE = {name: (len(op.args) + 1, STREAM_ARG[name] + 1 if name in STREAM_ARG else 0)
              for name, op in P.OPS.items() if op.gpu}


def _skewed_now_ns() -> int:
    return time.monotonic_ns() + _SKEW_NS


#: this process's clock for profiles (read twice per profiled call: the C function itself
#: when no skew is set)
now_ns = _skewed_now_ns if _SKEW_NS else time.monotonic_ns


class BatchTimer:
    """Timings of one profiled batch: its calls on the agent's clock and, at the GPU levels,
    the GPU timers of its GPU ops (the session's ``gpu_timer_start``/``_end``).

    Which calls start or end a GPU timer is worked out once, from the batch's calls as sent
    (``edges``: call index -> ``PER_OP`` or the ``_Span`` it opens or closes), so that a GPU op
    inside a batch span costs the agent no more than any call of a profiled batch. A span
    counts the calls of its stream that ran (a call that failed a check or raised is not in
    it); one whose last call never ran is closed by ``reply``, one whose first call never ran
    is not timed (its ops then have no GPU time, as a failed op has none)."""

    def __init__(self, level: int, calls: list[Any], device: Any) -> None:
        self.level = level
        self.received = now_ns()
        self.calls: list[list[int]] = []
        self.edges: dict[int, Any] = {}
        self._spans: list[_Span] = []
        self._ran: list[int] = []
        self._device = device
        if level >= GPU_PER_OP:
            self._plan(calls)

    def _plan(self, calls: list[Any]) -> None:
        # not validated yet: a call unlike a valid GPU call is left out (it will not run)
        shape = _GPU_SHAPE
        gpu = [(index, call) for index, call in enumerate(calls)
               if type(call) is list and call and type(call[0]) is str
               and len(call) == shape.get(call[0], (0, 0))[0]]
        by_stream: dict[Any, list[int]] = {}
        for index, call in gpu:
            at = shape[call[0]][1]
            stream = call[at] if at else None
            if stream is None or type(stream) is int:
                indices = by_stream.get(stream)
                if indices is None:
                    by_stream[stream] = [index]
                else:
                    indices.append(index)
        edges = self.edges
        for indices in by_stream.values():
            if self.level == GPU_PER_OP or len(indices) <= PER_OP_UP_TO:
                edges.update(dict.fromkeys(indices, PER_OP))
            else:
                span = _Span(indices)
                self._spans.append(span)
                edges[indices[0]] = edges[indices[-1]] = span

    def gpu_start(self, edge: Any, name: str, stream: int | None, index: int) -> Any:
        """Before the call ``index`` at an edge runs on ``stream``: a token for ``gpu_end``."""
        if edge is PER_OP:
            return self._device.gpu_timer_start(name, stream)
        if index == edge.indices[0]:
            edge.token = self._device.gpu_timer_start(BATCH_SPAN, stream)
        return edge

    def gpu_end(self, edge: Any, token: Any, seq: int, index: int, ran: bool) -> None:
        """After the call ``index`` at an edge (``ran``: it was issued without an error)."""
        if edge is PER_OP:
            if ran and token is not None:
                self._device.gpu_timer_end(token, seq, index)
        elif index == edge.last:
            self._close(edge, seq)

    def reply(self, seq: int) -> dict[str, Any]:
        for span in self._spans:  # spans whose last call never ran (failed a check, lost)
            self._close(span, seq)
        return {"recv": self.received, "end": now_ns(), "calls": self.calls}

    def _close(self, span: _Span, seq: int) -> None:
        token, span.token = span.token, None
        if token is None:
            return
        # the calls that ran, in index order, taken from ``calls`` once over all spans (a
        # batch of many streams closes many spans)
        ran = self._ran
        ran.extend(call[0] for call in self.calls[len(ran):])
        indices = [i for i in span.indices if (at := bisect_left(ran, i)) < len(ran)
                   and ran[at] == i]
        if not indices:
            return
        try:
            self._device.gpu_timer_end(token, seq, indices[0], indices)
        except Exception as e:  # a stream destroyed or a context lost since: untimed
            log.debug("batch %d: GPU span not timed: %s", seq, e)


#: the edge of a GPU op timed on its own
PER_OP = "per-op"


class _Span:
    """The GPU ops of one batch on one stream timed as one: their call indices, and the timer
    token from before the first's start to after the last's end."""

    __slots__ = ("indices", "last", "token")

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices
        self.last = indices[-1]
        self.token: Any = None


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
