"""What an executor is: the part of the agent that touches the device.

A session's worker (``gpu_agent.worker``, ``gpu_agent.batches``) owns sockets, validation and
errors; an executor owns the device. One ``Executor`` per worker process; one ``ExecutorSession``
per client session.

The worker calls ``ExecutorSession.op_<name>(*args)`` for each validated call of a batch, with the
arguments exactly as ``gpu_agent.protocol.OPS`` describes them, except that ``FrameRef`` arguments
are replaced by the frame's buffer (a memoryview, valid until the call returns). A method returns
the call's value for ops with ``result=True`` (``bytes``/``memoryview`` values travel as frames)
and ``None`` otherwise.

Failures are raised as ``AgentError(kind, message)`` with a kind from
``gpu_agent.protocol.ERROR_KINDS``. An error of kind ``ContextLost`` (with ``context_lost`` set)
tells the worker its device context is unusable for the rest of the process (CUDA's sticky
errors): the worker answers the batch and ends, and only its own tenant loses its session.

Address checks (is this pointer inside memory the session mapped?) are done by the worker before
the executor sees a call, for every op whose arguments are addresses or array descriptors, so
executors may trust them. Kernel arguments are opaque bytes and cannot be checked.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from gpu_agent import profiling
from gpu_agent.context_limits import ContextLimits
from gpu_agent.datastore import (
    DataError,
    DataStore,
    OpenedFile,
    check_array_dtype,
    data_error_from_os,
    npy_header,
    write_all,
)
from gpu_agent.errors import AgentError


def resident_threads(info: dict[str, Any]) -> int:
    """Threads a device can hold resident at once, from its ``device_info()``'s attributes."""
    attributes = info.get("attributes") or {}
    return (max(int(attributes.get("MULTIPROCESSOR_COUNT", 1)), 1)
            * max(int(attributes.get("MAX_THREADS_PER_MULTIPROCESSOR", 2048)), 1))


@contextlib.contextmanager
def _data_errors(path: str) -> Iterator[None]:
    """OS errors of file I/O as the DataError the client reads."""
    try:
        yield
    except OSError as e:
        raise data_error_from_os(path, e) from None


def _unsupported_data_reader() -> dict[str, Any]:
    return {"reader": "none", "detail": "this executor cannot load files"}


class ExecutorSession(ABC):
    """One client session's objects on the device (allocations, modules, streams, ...)."""

    #: the agent's data tree and a description of its read path; the executor sets both when
    #: it opens the session (the defaults serve nothing)
    data_store: DataStore = DataStore()
    data_reader: Callable[[], dict[str, Any]] = staticmethod(_unsupported_data_reader)
    #: the session's slot: its cap in bytes, and how many of them mapped chunks use (the
    #: worker's BatchRunner sets both); memory outside chunks (torch tensors) fits in the rest
    slot_cap: int | None = None
    #: GPU timings kept uncollected at most (harp-agent --pending-gpu-timings)
    pending_gpu_timings: int = profiling.MAX_PENDING_GPU_TIMINGS
    slot_chunk_bytes: Callable[[], int] = staticmethod(lambda: 0)

    @abstractmethod
    def close(self) -> None:
        """Free everything this session holds. Idempotent."""

    @abstractmethod
    def device_bytes(self) -> int:
        """Device memory this session has mapped, in bytes."""

    def object_bytes(self) -> int:
        """Device memory of session objects outside mapped chunks (torch tensors, what the
        context's limits reserve), in bytes: counted against the slot and reported with
        ``device_bytes``."""
        return self.limit_bytes()

    # {{{ the context's limits (gpu_agent/context_limits.py)

    #: threads the device can hold resident (SMs x threads per SM): each gets a stack
    resident_threads: int = 2048
    _limits: ContextLimits | None = None

    @property
    def limits(self) -> ContextLimits:
        if self._limits is None:
            self._limits = ContextLimits(self.resident_threads, self.slot_room)
        return self._limits

    def limit_bytes(self) -> int:
        """Device bytes the context's limits (and scratch of an operation now running) reserve
        beyond CUDA's defaults."""
        return 0 if self._limits is None else self._limits.extra_bytes()

    def slot_room(self) -> int | None:
        """Free bytes of this session's slot, or None where it has no cap."""
        cap = self.slot_cap
        return None if cap is None else cap - self.slot_chunk_bytes() - self.object_bytes()

    # }}}

    @abstractmethod
    def mapped_chunks(self) -> list[tuple[int, int]]:
        """``[(address, size), ...]`` of every piece of device memory the session mapped."""

    @abstractmethod
    def read_into(self, addr: int, out: memoryview) -> None:
        """Copy ``len(out)`` bytes of device memory at ``addr`` into ``out`` (after all the
        session's work finished): how parked state leaves the device, piece by piece."""

    @abstractmethod
    def write_from(self, addr: int, data: memoryview) -> None:
        """Copy ``data`` to device memory at ``addr`` (mapped): how parked state comes back."""

    def park_objects(self) -> Iterable[tuple[str, Any]]:
        """Session state that is not in mapped chunks (torch tensors), as ``(name, payload)``
        pairs the worker writes to park files after the chunks, one payload at a time (a
        generator may produce each when asked); restored by ``restore_objects``."""
        return ()

    def restore_objects(self, payloads: list[memoryview]) -> None:
        """Recreate what ``park_objects`` gave, its payloads in the same order."""
        if payloads:
            raise AgentError("StateLost", "the parked state holds objects this executor cannot "
                             "restore")

    # {{{ the agent's data tree (gpu_agent/datastore.py, docs/remote-data.md)

    def fill_from_file(self, dst: int, opened: OpenedFile, offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` bytes of ``opened`` from ``offset`` to device address ``dst`` (mapped
        by this session; the worker checked it), complete on return."""
        raise AgentError("NotSupported", "this executor cannot load files into device memory")

    def write_to_file(self, src: int, nbytes: int, fd: int, file_offset: int) -> None:
        """Write ``nbytes`` bytes of device memory at ``src`` to ``fd`` at ``file_offset``."""
        raise AgentError("NotSupported", "this executor cannot save device memory to files")

    def op_data_info(self) -> dict[str, Any]:
        return {**self.data_store.info(), **self.data_reader()}

    def op_data_list(self, path: str) -> list[dict[str, Any]]:
        with _data_errors(path):
            return self.data_store.listing(path)

    def op_data_open(self, path: str, spec: dict[str, Any]) -> dict[str, Any]:
        with _data_errors(path):
            return self.data_store.open_request(path, spec)

    def op_data_read(self, dst: int, path: str, offset: int, nbytes: int, identity: str) -> int:
        with _data_errors(path), self.data_store.open_for_read(path, identity) as opened:
            opened.check_range(offset, nbytes)
            if nbytes:
                self.fill_from_file(dst, opened, offset, nbytes)
        return nbytes

    def op_data_write(self, array: list[Any], path: str, options: dict[str, Any]) -> int:
        src, dtype_text, shape, strides = array
        fmt = options.get("format", "npy")
        overwrite = options.get("overwrite", True)
        with _data_errors(path):
            if fmt not in ("npy", "raw") or type(overwrite) is not bool:
                raise DataError("BAD_FORMAT", f"save options {options!r}: format is npy or raw, "
                                "overwrite a bool")
            dtype = np.dtype(dtype_text)
            check_array_dtype(dtype, path)
            fortran_order = _memory_order(dtype.itemsize, shape, strides) == "F"
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header = npy_header(dtype, tuple(shape), fortran_order) if fmt == "npy" else b""
            with self.data_store.create(path, overwrite=overwrite) as fd:
                write_all(fd, memoryview(header), 0, path)
                if nbytes:
                    self.write_to_file(src, nbytes, fd, len(header))
        return len(header) + nbytes

    # }}}

    # {{{ profiling (gpu_agent/profiling.py)

    def gpu_timer_start(self, op: str, stream: int | None) -> Any:
        """Start timing one GPU op on its stream; a token for ``gpu_timer_end``, or None (not
        timed: no GPU timing here, or ``pending_gpu_timings`` wait uncollected)."""
        return None

    def gpu_timer_end(self, token: Any, seq: int, index: int,  # noqa: B027
                      span: list[int] | None = None) -> None:
        """The op of ``token`` (call ``index`` of batch ``seq``) has been issued; with
        ``span``, the token is a batch span's (``profiling.BATCH_SPAN``) and ``span`` the call
        indices of the GPU ops it covers (``index`` is the first)."""

    def op_profile_gpu(self) -> list[list[Any]]:
        """GPU timings recorded since the last call (see protocol.OPS)."""
        return []

    def op_nvtx_push(self, message: str) -> None:
        profiling.nvtx_push(message)

    def op_nvtx_pop(self) -> None:
        profiling.nvtx_pop()

    # }}}


def object_chunk_address(index: int) -> int:
    """The address a parked object's file goes under among a parked state's chunks: negative,
    so no device address can be it and the park store keeps and moves it as any chunk."""
    return -1 - index


def is_object_chunk(addr: int) -> bool:
    return addr < 0


def _memory_order(itemsize: int, shape: list[int], strides: list[int]) -> str:
    """"C" or "F" for a contiguous array's strides; DataError for any other."""
    if int(np.prod(shape, dtype=np.int64)) <= 1:
        return "C"
    for order in ("C", "F"):
        step, expected = itemsize, []
        for n in (reversed(shape) if order == "C" else shape):
            expected.append(step)
            step *= max(n, 1)
        if order == "C":
            expected.reverse()
        if all(s == e for n, s, e in zip(shape, strides, expected, strict=True) if n > 1):
            return order
    raise DataError("BAD_FORMAT", "only contiguous arrays are saved (the shim copies others "
                    "first)")


class Executor(ABC):
    #: "pycuda" or "emulated"
    name: str
    #: the tree ``harp-agent --data-root`` serves (the default serves none)
    data_store: DataStore = DataStore()
    #: ``harp-agent --data-reader``: auto, kvikio or pipeline (executors with a choice)
    data_reader_choice: str = "auto"
    #: True when this executor is not a GPU (host memory, NumPy)
    emulated: bool
    #: set after an error that leaves the device unusable in this process (CUDA's sticky errors):
    #: the worker then answers what it was doing and ends
    context_lost: bool = False

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
        AgentError (sticky ones of kind ContextLost, setting ``context_lost``) here."""
        return method(*args)

    def metrics(self) -> dict[str, Any]:
        """Live figures for status replies (utilisation etc.); empty when unknown."""
        return {}

    def data_reader(self) -> dict[str, Any]:
        """How this executor reads files into device memory: ``{reader, detail}``."""
        return _unsupported_data_reader()

    def data_status(self) -> dict[str, Any]:
        """The data tree and read path, for status replies."""
        return {**self.data_store.info(), **self.data_reader()}

    def attach_data(self, session: ExecutorSession) -> ExecutorSession:
        """Give a new session this executor's data tree and read path."""
        session.data_store = self.data_store
        session.data_reader = self.data_reader
        return session

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device. Idempotent."""
