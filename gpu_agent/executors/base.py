"""What an executor is: the part of the agent that touches the device.

The agent's server (``gpu_agent.server``) owns sockets, sessions, validation and errors; an executor
owns the device. One ``Executor`` per agent process; one ``ExecutorSession`` per client session.

The server calls ``ExecutorSession.op_<name>(*args)`` for each validated call of a batch, with the
arguments exactly as ``gpu_agent.protocol.OPS`` describes them, except that ``FrameRef`` arguments
are replaced by the frame's buffer (a memoryview, valid until the call returns). A method returns
the call's value for ops with ``result=True`` (``bytes``/``memoryview`` values travel as frames)
and ``None`` otherwise.

Failures are raised as ``ExecutorError(kind, message)`` with a kind from
``gpu_agent.protocol.ERROR_KINDS``. Raising ``ContextLost`` tells the server the device context is
gone: every session of this executor loses its device state, and when the executor sets
``restart_required`` the agent restarts its process (CUDA's sticky errors last as long as it).

Address checks (is this pointer inside memory the session mapped?) are done by the server before
the executor sees a call, for every op whose arguments are addresses or array descriptors, so
executors may trust them. Kernel arguments are opaque bytes and cannot be checked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from gpu_agent import profiling


class ExecutorError(Exception):
    """A failed call: ``kind`` is one of protocol.ERROR_KINDS, ``code`` a CUDA error name if any."""

    def __init__(self, kind: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


class ContextLost(ExecutorError):
    """The device context was destroyed and recreated; all sessions lost their device state."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__("ContextLost", message, code)


class ExecutorSession(ABC):
    """One client session's objects on the device (allocations, modules, streams, ...)."""

    @abstractmethod
    def close(self) -> None:
        """Free everything this session holds. Idempotent."""

    @abstractmethod
    def device_bytes(self) -> int:
        """Device memory this session has mapped, in bytes."""

    @abstractmethod
    def park(self) -> list[tuple[int, Any]]:
        """Wait for the session's work, copy every mapped chunk to host memory, unmap it and
        give the device memory back; returns ``[(address, host buffer), ...]``. Modules, streams
        and events stay. The address range stays reserved, so ``restore`` maps the same
        addresses again."""

    @abstractmethod
    def restore(self, chunks: list[tuple[int, Any]]) -> None:
        """Map each chunk at its address again and copy its bytes back (after ``park``, or into
        a fresh session on another agent whose objects were recreated from the creation log)."""

    def busy(self) -> bool:
        """Whether GPU work this session issued may still be running."""
        return False

    def batch_done(self) -> None:  # noqa: B027 - optional hook
        """Called after each batch ran (executors that track ``busy`` mark it here)."""

    # {{{ profiling (gpu_agent/profiling.py)

    def gpu_timer_start(self, op: str, stream: int | None) -> Any:
        """Start timing one GPU op on its stream; a token for ``gpu_timer_end``, or None."""
        return None

    def gpu_timer_end(self, token: Any, seq: int, index: int) -> None:  # noqa: B027
        """The op of ``token`` (call ``index`` of batch ``seq``) has been issued."""

    def op_profile_gpu(self) -> list[list[Any]]:
        """GPU timings recorded since the last call (see protocol.OPS)."""
        return []

    def op_nvtx_push(self, message: str) -> None:
        profiling.nvtx_push(message)

    def op_nvtx_pop(self) -> None:
        profiling.nvtx_pop()

    # }}}


class Executor(ABC):
    #: "pycuda" or "emulated"
    name: str
    #: True when this executor is not a GPU (host memory, NumPy)
    emulated: bool
    #: set after an error that leaves the device unusable in this process (CUDA's sticky errors):
    #: the agent then answers what it was doing and replaces its process
    restart_required: bool = False

    @abstractmethod
    def device_info(self) -> dict[str, Any]:
        """Static facts about the device, sent in ``welcome`` and ``status``.

        Keys: ``name``, ``compute_capability`` [major, minor], ``total_memory``, ``pci_bus_id``,
        ``attributes`` {ATTRIBUTE_NAME: int} (pycuda's device_attribute names), ``driver_version``,
        ``emulated`` (bool), ``count`` (devices this agent serves: 1).
        """

    @abstractmethod
    def mem_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes."""

    @abstractmethod
    def open_session(self, base: int, size: int) -> ExecutorSession:
        """Start a session whose allocations lie in ``[base, base + size)``."""

    def run(self, method: Any, *args: Any) -> Any:
        """Call one of a session's ``op_`` methods; executors turn their library's errors into
        ExecutorError (and sticky ones into ContextLost) here."""
        return method(*args)

    def metrics(self) -> dict[str, Any]:
        """Live figures for status replies (utilisation etc.); empty when unknown."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device. Idempotent."""
