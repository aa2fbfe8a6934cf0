"""The agent's side of ``%%harp profile``: timings of profiled batches, GPU timings, NVTX.

A batch whose header has ``p`` (1: agent timings, 2: also GPU timings) is timed call by call;
its reply carries ``p: {recv, end, calls: [[index, start, end], ...]}`` in this process's clock
(``now_ns``), which the notebook places on its own clock from the round trips. GPU timings (CUDA
events around each GPU op, only while profiling) are collected by the ``profile_gpu`` op.

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

#: ops that put work on the device (their GPU time is measured while profiling)
GPU_WORK = frozenset({"htod", "dtoh", "dtod", "memset", "launch", "array", "elementwise_call",
                      "reduction_call"})
#: op -> position of its stream argument
STREAM_ARG = {name: i for name, op in P.OPS.items()
              for i, check in enumerate(op.args) if check is P.STREAM}


def now_ns() -> int:
    return time.monotonic_ns() + _SKEW_NS


class BatchTimer:
    """Timings of one profiled batch."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.received = now_ns()
        self.calls: list[list[int]] = []

    @property
    def gpu(self) -> bool:
        return self.level >= 2

    def reply(self) -> dict[str, Any]:
        return {"recv": self.received, "end": now_ns(), "calls": self.calls}


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
