"""Running one session's batches: validation, address and work checks, the executor, the reply.

``BatchRunner`` lives in the session's worker process. Every call is hostile until checked: its
arguments against ``protocol.OPS``, every address it names against the memory this session
mapped, every array it names against the slot's memory (elements actually covered, so a stride-0
view is costed at its full shape), its results against the largest frame. An error in one call
does not stop the batch (later calls still run, as with CUDA's non-sticky errors); the first error
is the batch's error. Nothing here can reach another session: it has no other.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from gpu_agent import profiling
from gpu_agent import protocol as P
from gpu_agent.errors import AgentError
from gpu_agent.executors.base import Executor, ExecutorSession
from gpu_agent.memory_map import MappedRanges
from gpu_agent.sessions import SessionLog
from gpu_agent.sizes import format_bytes

log = logging.getLogger("harp.agent.worker")


class BatchRunner:
    """One session's device objects and the checks around them; see the module docstring."""

    def __init__(self, executor: Executor, device: ExecutorSession, base: int, size: int, *,
                 memory_cap: int, max_frame: int, max_objects: int = 4096,
                 pending_gpu_timings: int = profiling.MAX_PENDING_GPU_TIMINGS) -> None:
        self.executor = executor
        self.device = device
        self.ranges = MappedRanges(base, size)
        self.log = SessionLog()
        self.memory_cap = memory_cap
        self.max_frame = max_frame
        self.max_objects = max_objects
        self.calls = 0
        self.batches = 0
        #: set when the device context is unusable: every later call fails with it
        self.lost: str | None = None
        #: the CUDA error that made it unusable, as CUDA said it
        self.lost_cause: str | None = None
        self._ops = {name: getattr(device, f"op_{name}") for name in P.OPS}
        device.slot_cap = memory_cap
        device.pending_gpu_timings = pending_gpu_timings
        device.slot_chunk_bytes = lambda: self.ranges.mapped_bytes
        self._run = executor.run

    # {{{ one batch

    def run(self, header: dict[str, Any], frames: list[Any]) -> tuple[dict[str, Any], list[Any]]:
        """The reply header and frames for one ``batch`` message."""
        seq, calls = header.get("q"), header.get("c")
        if type(seq) is not int or type(calls) is not list:
            raise P.ProtocolError("batch needs an int 'q' and a list 'c'")
        if len(calls) > P.MAX_CALLS_PER_BATCH:
            raise P.ProtocolError(f"batch of {len(calls)} calls: at most "
                                  f"{P.MAX_CALLS_PER_BATCH} per batch")
        self.batches += 1
        level = header.get("p")
        if level is None and len(calls) == 1 and self.lost is None:
            return self._run_alone(seq, calls[0], frames)
        timer = (profiling.BatchTimer(level, calls, self.device)
                 if type(level) is int and level > 0 else None)
        results: list[list[Any]] = []
        out_frames: list[Any] = []
        first_error: dict | None = None
        buf_positions = P.BUF_POSITIONS
        for index, call in enumerate(calls):
            if self.lost is not None:
                first_error = first_error or P.error("ContextLost", self.lost, index=index)
                break
            try:
                name, args = P.validate_call(call)
                positions = buf_positions.get(name)
                if positions is not None:
                    args = _resolve_frames(args, positions, frames)
                value = self.call(name, args, timer, seq, index)
                if name in _RESULT_OPS:
                    if isinstance(value, _BUFFER_TYPES):
                        value = _buffer_result(value, out_frames)
                    results.append([index, value])
            except Exception as e:
                first_error = first_error or self._failed(e, index, call)
        reply: dict[str, Any] = {"t": P.REPLY, "q": seq, "r": results, "e": first_error}
        if timer is not None:
            reply["p"] = timer.reply(seq)
        return reply, out_frames

    def _run_alone(self, seq: int, call: Any, frames: list[Any]
                   ) -> tuple[dict[str, Any], list[Any]]:
        """``run`` of a batch of one call, not profiled (a sync point's): the same checks and
        reply, without the loop's bookkeeping."""
        try:
            name, args = P.validate_call(call)
            positions = P.BUF_POSITIONS.get(name)
            if positions is not None:
                args = _resolve_frames(args, positions, frames)
            value = self.call(name, args)
        except Exception as e:
            return {"t": P.REPLY, "q": seq, "r": [], "e": self._failed(e, 0, call)}, []
        if name not in _RESULT_OPS:
            return {"t": P.REPLY, "q": seq, "r": [], "e": None}, []
        if isinstance(value, _BUFFER_TYPES):
            out_frames: list[Any] = []
            value = _buffer_result(value, out_frames)
            return {"t": P.REPLY, "q": seq, "r": [[0, value]], "e": None}, out_frames
        return {"t": P.REPLY, "q": seq, "r": [[0, value]], "e": None}, []

    def _failed(self, e: Exception, index: int, call: Any) -> dict[str, Any]:
        """The wire error of call ``index`` that raised ``e``; a lost context ends the session
        after this batch."""
        if isinstance(e, AgentError):
            if e.kind == "ContextLost" or self.executor.context_lost:
                self.lost_cause = str(e)
                self.lost = _context_lost_message(str(e))
                e = AgentError("ContextLost", self.lost, e.code)
            return e.to_wire(index=index, op=_op_name(call))
        # an executor bug is reported, never a crash of the worker
        op = _op_name(call)
        log.exception("call %s failed", op)
        return P.error("RuntimeError", f"the agent failed running {op}: {type(e).__name__}: "
                       f"{e} (a bug in harp-agent: please report it)", index=index, op=op)

    def call(self, name: str, args: list[Any], timer: profiling.BatchTimer | None = None,
             seq: int = 0, index: int = 0) -> Any:
        """Check and run one validated call (also used to replay a parked session's log)."""
        self._check(name, args)
        if timer is not None:
            value = (self._mem_info() if name == "mem_get_info"
                     else self._run_timed(timer, seq, index, name, args))
        elif name == "mem_get_info":
            value = self._mem_info()
        else:
            value = self._run(self._ops[name], *args)
        if name in _MAPPING_OPS:
            self._after(name, args, value)
        if name in P.OBJECT_OPS:
            self.log.record(name, args)
        self.calls += 1
        return value

    def _run_timed(self, timer: profiling.BatchTimer, seq: int, index: int, name: str,
                   args: list[Any]) -> Any:
        edge = timer.edges.get(index)  # whether this call starts or ends a GPU timer
        if edge is None:
            started = profiling.now_ns()
            value = self._run(self._ops[name], *args)
            timer.calls.append([index, started, profiling.now_ns()])
            return value
        token = timer.gpu_start(edge, name, profiling.stream_of(name, args), index)
        started = profiling.now_ns()
        try:
            value = self._run(self._ops[name], *args)
        except BaseException:
            timer.gpu_end(edge, token, seq, index, ran=False)
            raise
        timer.calls.append([index, started, profiling.now_ns()])
        timer.gpu_end(edge, token, seq, index, ran=True)
        return value

    # }}}

    # {{{ checks

    def _check(self, name: str, args: list[Any]) -> None:
        ranges = self.ranges
        if name in _MAPPING_OPS:
            self._check_mapping(name, args)
            return
        if name in _CREATING_OPS and len(self.log) >= self.max_objects:
            raise AgentError("LogicError", f"this session holds {len(self.log)} device objects "
                             f"(modules, kernels, streams, events, generators), the most one "
                             f"session may (harp-agent --session-objects): free some first")
        if name == "dtoh" and args[1] > self.max_frame:
            raise AgentError("LogicError", f"dtoh of {format_bytes(args[1])} in one call: at "
                             f"most {format_bytes(self.max_frame)} (harp-agent --max-frame); copy "
                             "in pieces")
        touches = _TOUCHES.get(name)
        if touches is not None:
            for lo, nbytes in touches(args):
                ranges.check(lo, lo + nbytes)
        if name not in P.DESCRIPTOR_OPS:
            return
        for desc in P.descriptors_of(args):
            lo, hi = P.descriptor_extent(desc)
            ranges.check(lo, hi)
            logical = P.descriptor_elements(desc) * P.wire_dtype(desc[1]).itemsize
            if logical > self.memory_cap:
                raise AgentError(
                    "LogicError", f"an array of shape {tuple(desc[2])} and dtype {desc[1]} "
                    f"({format_bytes(logical)} as laid out by its shape) is larger than this GPU "
                    f"slot's memory ({format_bytes(self.memory_cap)}): its strides make it cover "
                    "few bytes, but an operation on it would work on every element")

    def _check_mapping(self, name: str, args: list[Any]) -> None:
        ranges = self.ranges
        if name == "alloc":
            ranges.check_new(args[0], args[1])
            if self.device_bytes + args[1] > self.memory_cap:
                raise AgentError(
                    "MemoryError", f"out of memory: {format_bytes(args[1])} requested, "
                    f"{format_bytes(self.memory_cap - self.device_bytes)} of this GPU slot's "
                    f"{format_bytes(self.memory_cap)} free (cuMemAlloc: out of memory)",
                    "CUDA_ERROR_OUT_OF_MEMORY")
        elif name == "free":
            if not ranges.starts_at(args[0]):
                ranges.remove(args[0])  # raises the clear error

    def _after(self, name: str, args: list[Any], value: Any) -> None:
        if name == "alloc":
            self.ranges.add(args[0], args[1])
        elif name == "free":
            self.ranges.remove(args[0])
        elif name == "get_global":
            self.ranges.add_external(value[0], value[1])

    def _mem_info(self) -> list[int]:
        free, _total = self.executor.mem_info()
        room = self.memory_cap - self.device_bytes
        return [max(min(free, room), 0), self.memory_cap]

    # }}}

    @property
    def device_bytes(self) -> int:
        """The session's use of its slot: mapped chunks and objects outside them (tensors)."""
        return self.usage()[0]

    def usage(self) -> tuple[int, int]:
        """``(device_bytes, object bytes)``, each object counted once (the status page's)."""
        objects = self.device.object_bytes()
        return self.ranges.mapped_bytes + objects, objects


#: derived from protocol.OPS: ops with a result, ops that change the session's mapped ranges,
#: explicit ranges of the ops that name any
_RESULT_OPS = frozenset(name for name, op in P.OPS.items() if op.result)
_MAPPING_OPS = frozenset(("alloc", "free", "get_global"))
_CREATING_OPS = frozenset(name for name, op in P.OPS.items() if op.creates is not None)
_TOUCHES = {name: op.touches for name, op in P.OPS.items() if op.touches is not None}
#: results that travel as frames of their own
_BUFFER_TYPES = (bytes, bytearray, memoryview, np.ndarray)
#: a buffer result smaller than this goes inline in the reply's header (a scalar's read): a
#: frame of its own costs both sides more than copying a few bytes
INLINE_RESULT_BYTES = 4096


def _buffer_result(value: Any, out_frames: list[Any]) -> Any:
    """The wire value of a buffer result: its bytes when small, else a ``FrameRef`` to it,
    appended to ``out_frames``."""
    view = memoryview(value)
    if view.nbytes < INLINE_RESULT_BYTES:
        return view.tobytes()
    out_frames.append(value)
    return P.frame_ref(len(out_frames))


def _op_name(call: Any) -> str | None:
    return call[0] if type(call) is list and call and type(call[0]) is str else None


def _resolve_frames(args: list[Any], positions: tuple[int, ...], frames: list[Any]
                    ) -> list[Any]:
    """``args`` with the FrameRefs at its buffer positions replaced by the frames' buffers."""
    resolved = args
    for i in positions:
        value = args[i]
        if type(value) is P.FrameRef:
            if not 1 <= value.index <= len(frames):
                raise P.ProtocolError(f"frame {value.index} is not in this message "
                                      f"({len(frames)} frames)")
            frame = frames[value.index - 1]
            if resolved is args:
                resolved = list(args)
            resolved[i] = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    return resolved


def _context_lost_message(error: str) -> str:
    return (f"{error}. This error ended your GPU session: CUDA keeps such errors for the life "
            "of the context, so your session's device memory, modules and streams are gone. "
            "Your Python process and its variables are intact and other users of this GPU were "
            "not affected; the next GPU call starts a fresh session, so fix the CUDA kernel and "
            "re-run the code that creates your device arrays.")
