"""What a profile records, on the notebook side, while ``%%harp profile`` runs.

The shim calls the ``note_*`` hooks of the ``active`` recorder (None when not profiling, so the
cost outside a profile is one attribute test per call). Times are ``time.monotonic_ns()`` of
this process; the agent's times arrive in its own clock with each profiled batch's reply and are
placed on ours with ``ClockOffset``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gpu_agent import protocol
from gpu_agent.profiling import AGENT_TIMING, GPU_PER_BATCH, GPU_PER_OP
from harp_jupyter.shim.callsite import CallSite

#: the recorder of the profile now running, if any
active: Recorder | None = None

#: kernel names by function handle, noted whether or not a profile runs (a kernel is usually
#: compiled in an earlier cell than the one profiled)
KERNEL_NAMES: dict[int, str] = {}
NAMING_OPS = frozenset({"get_function", "elementwise_new", "reduction_new"})
#: calls that run the kernel of the handle in their first argument
KERNEL_CALLS = frozenset({"launch", "elementwise_call", "reduction_call"})
#: calls that run an aten operator named by their second argument (harp tensors)
TORCH_OPERATOR_CALLS = frozenset({"torch_op", "torch_op_sync"})
#: calls whose bytes note_call counts from their arguments
_SIZED_CALLS = frozenset({"dtoh", "torch_download"}) | TORCH_OPERATOR_CALLS
#: calls that name what they run (detail_of)
_NAMED_CALLS = KERNEL_CALLS | {"array"} | TORCH_OPERATOR_CALLS


def note_kernel_name(op: str, args: list[Any]) -> None:
    """From get_function(fn, mod, name), elementwise_new(kernel, arguments, operation, name,
    options), reduction_new(kernel, ..., options with name)."""
    if op == "get_function" and len(args) > 2:
        KERNEL_NAMES[args[0]] = str(args[2])
    elif op == "elementwise_new" and len(args) > 3:
        KERNEL_NAMES[args[0]] = str(args[3])
    elif op == "reduction_new" and len(args) > 6 and isinstance(args[6], dict):
        KERNEL_NAMES[args[0]] = str(args[6].get("name") or "reduction")


def host_tensor_bytes(tree: Any) -> int:
    """The bytes of the host tensors a torch call's argument tree carries inline."""
    if type(tree) is list:
        return sum(host_tensor_bytes(item) for item in tree)
    if type(tree) is dict:
        inline = tree.get(protocol.TORCH_HOST_TENSOR)
        if type(inline) is list and len(inline) == 3 and type(inline[2]) is bytes:
            return len(inline[2])
        return sum(host_tensor_bytes(item) for item in tree.values())
    return 0


def _detail_of(call: list[Any]) -> str:
    op = call[0]
    if len(call) < 2:
        return ""
    if op in KERNEL_CALLS:
        return KERNEL_NAMES.get(call[1], "")
    if op == "array":
        return str(call[1])
    if len(call) > 2:  # a torch operator call
        return str(call[2])  # "aten::add.Tensor"
    return ""


_monotonic_ns = time.monotonic_ns


@dataclass(slots=True)
class ApiCall:
    """A call queued for the agent, or a run of ``count`` consecutive calls of the same op,
    kernel and line (a loop of one launch), the last at ``last``: one record, not thousands."""

    at: int
    op: str
    site: CallSite | None
    bytes_up: int
    bytes_down: int
    detail: str = ""
    count: int = 1
    last: int = 0


@dataclass(slots=True)
class Blocked:
    """The notebook waited for the agent: at a sync point, for a full send window, for an
    upload to leave."""

    start: int
    end: int
    op: str
    site: CallSite | None
    why: str
    #: what the op ran, where it names one (the aten operator of a torch_op_sync)
    detail: str = ""


@dataclass(slots=True)
class BatchTiming:
    seq: int
    agent: str
    sent: int
    received: int
    ops: list[str]
    sites: list[CallSite | None]
    details: list[str]
    #: from the agent, its clock: {"recv", "end", "calls": [[index, start, end], ...]}
    agent_times: dict[str, Any] | None = None


@dataclass(slots=True)
class Span:
    """A named interval on one track (NVTX ranges, lease events)."""

    track: str
    name: str
    start: int
    end: int
    args: dict[str, Any] = field(default_factory=dict)


class Recorder:
    def __init__(self, *, gpu_timing: bool = True, per_op: bool = False) -> None:
        #: the batch header's ``p`` (gpu_agent/profiling.py): agent timings only; GPU (CUDA
        #: event) timings of every GPU op; or, the default, of each GPU op of a batch with few
        #: on a stream and one span per stream for a batch with more (two events per tiny
        #: launch cost more than the launch)
        self.level = (AGENT_TIMING if not gpu_timing else GPU_PER_OP if per_op
                      else GPU_PER_BATCH)
        self.started = time.monotonic_ns()
        self.ended: int | None = None
        self.calls: list[ApiCall] = []
        self.blocked: list[Blocked] = []
        self.batches: list[BatchTiming] = []
        self.spans: list[Span] = []
        #: GPU timings per agent, its clock: [op, stream, start, end, seq, index]
        self.gpu: dict[str, list[list[Any]]] = {}
        self.gpu_timing_note = ""
        self._nvtx_open: list[tuple[str, int, CallSite | None]] = []
        self._lock = threading.Lock()

    @staticmethod
    def now() -> int:
        return time.monotonic_ns()

    def note_call(self, call: list[Any], site: CallSite | None, bytes_up: int) -> None:
        """A call queued for the agent: ``call`` as it goes on the wire, ``[op, *args]``.
        It runs for every call of a profiled cell, so the common case (the same call as the
        one before: a loop) only counts."""
        op = call[0]
        bytes_down = 0
        if op in _SIZED_CALLS:
            if op == "dtoh" and len(call) > 2:
                bytes_down = int(call[2])
            elif op == "torch_download" and len(call) > 3:
                bytes_down = int(call[3])  # torch_download(tensor, offset, nbytes)
            elif op in TORCH_OPERATOR_CALLS and len(call) > 4:
                bytes_up += host_tensor_bytes(call[4])  # small host tensors go inline
        detail = _detail_of(call) if op in _NAMED_CALLS else ""
        now = _monotonic_ns()
        calls = self.calls
        if calls and self.ended is None:
            last = calls[-1]
            if last.op == op and last.site == site and last.detail == detail:
                last.count += 1
                last.last = now
                if bytes_up or bytes_down:
                    last.bytes_up += bytes_up
                    last.bytes_down += bytes_down
                return
        calls.append(ApiCall(now, op, site, bytes_up, bytes_down, detail, 1, now))

    def note_received(self, op: str, nbytes: int) -> None:
        """``nbytes`` of data a reply brought back, counted on the latest ``op`` call (the
        scalar of a torch ``.item()``, which comes in its ``torch_op_sync`` reply)."""
        for call in reversed(self.calls):
            if call.op == op:
                call.bytes_down += nbytes
                return

    @staticmethod
    def detail_of(call: list[Any]) -> str:
        """The kernel a wire call ``[op, *args]`` runs, where there is one (its function or
        operation name)."""
        return _detail_of(call) if call[0] in _NAMED_CALLS else ""

    def note_blocked(self, start: int, end: int, op: str, site: CallSite | None,
                     why: str, detail: str = "") -> None:
        self.blocked.append(Blocked(start, end, op, site, why, detail))

    def note_batch(self, timing: BatchTiming) -> None:
        self.batches.append(timing)

    def note_span(self, track: str, name: str, start: int, end: int, **args: Any) -> None:
        with self._lock:
            self.spans.append(Span(track, name, start, end, args))

    def nvtx_push(self, name: str, site: CallSite | None) -> None:
        self._nvtx_open.append((name, self.now(), site))

    def nvtx_pop(self) -> None:
        if self._nvtx_open:
            name, start, site = self._nvtx_open.pop()
            where = f"{site[0]}:{site[1]}" if site else ""
            self.note_span("nvtx", name, start, self.now(), site=where)

    def finish(self) -> None:
        self.ended = self.now()
        while self._nvtx_open:  # ranges the cell left open end with it
            self.nvtx_pop()
