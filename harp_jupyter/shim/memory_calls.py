"""MemoryCalls: a session's memory API (alloc, free, release_later, mem_get_info).

It works on the session's ``DeviceMemory``: the addresses are chosen there and the chunk maps
queued as calls; an allocation larger than the free memory last known waits for the agent, so
that running out raises ``MemoryError`` at the user's line. Releases that finalizers ask for (any
thread) wait in the memory's ``deferred`` until the next call on a user thread sends them
(``send_deferred``).

Freed allocations of 2 MiB and more stay mapped in a cache (``DeviceMemory``); a ``mem_get_info``
and a park (``release_cache``, the parking hook) unmap the cache first, so that the free memory
the user reads and the bytes a park copies are what they would be without it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from harp_jupyter.shim.batch import BatchWriter
from harp_jupyter.shim.call_errors import CallErrors
from harp_jupyter.shim.callsite import CallSite, user_call_site
from harp_jupyter.shim.device_memory import AddCall, DeviceMemory
from harp_jupyter.shim.errors import LogicError
from harp_jupyter.shim.restore import SessionRestore


class MemoryHost(Protocol):
    """What the memory API uses of its session."""

    lock: threading.RLock

    @property
    def closed(self) -> bool: ...

    def current_writer(self) -> BatchWriter | None: ...

    def _ensure_connected(self) -> BatchWriter: ...

    def _current_or_restored(self, writer: BatchWriter) -> BatchWriter: ...

    def _add(self, writer: BatchWriter, op: str, args: Any, site: CallSite | None,
             on_result: Callable[[Any], None] | None = None,
             on_error: Callable[[], None] | None = None, *, end_batch: bool = False) -> None: ...

    def call_sync(self, op: str, *args: Any) -> Any: ...


class MemoryCalls:
    """alloc/free/release_later/mem_get_info of one session; see the module docstring."""

    def __init__(self, host: MemoryHost, memory: DeviceMemory, errors: CallErrors,
                 restore: SessionRestore) -> None:
        self._host = host
        self._memory = memory
        self._errors = errors
        self._restore = restore
        self._deferred = memory.deferred

    def alloc(self, nbytes: int) -> int:
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise LogicError("cuMemAlloc failed: invalid argument (size must be positive)")
        host = self._host
        writer = host._ensure_connected()
        with host.lock:
            if self._deferred:
                self.send_deferred()
            addr, failed, must_wait = self._memory.allocate(self._queue_on(writer), nbytes)
            if must_wait:
                self._wait_for_alloc(host._current_or_restored(writer), addr, failed)
        return addr

    def _queue_on(self, writer: BatchWriter, *, site: bool = True) -> AddCall:
        """What ``DeviceMemory`` queues its calls with: the session's ``_add`` on ``writer``,
        under the user's call site (with ``site``), found when the first call is queued. Most
        allocations and frees queue none (sub-allocated, or cached), and walking the stack
        for them had been two of the three walks of a small array operation."""
        host = self._host
        found: list[CallSite | None] = [] if site else [None]

        def add(op: str, args: list[Any], on_result: Callable[[Any], None] | None = None,
                on_error: Callable[[], None] | None = None) -> None:
            if not found:
                found.append(user_call_site())
            host._add(writer, op, args, found[0], on_result, on_error)

        return add

    def _wait_for_alloc(self, writer: BatchWriter, addr: int, failed: list[int]) -> None:
        self._restore.wait_everything(writer)
        if self._errors.first is not None:
            if not failed:  # this allocation worked; an earlier call's error is raised
                self.free(addr)
            self._errors.raise_first()

    def free(self, addr: int) -> None:
        host = self._host
        writer = host.current_writer()
        if writer is None or host.closed or self._errors.lost is not None:
            return  # nothing mapped, or the session is gone with its memory
        if writer.fatal is not None or writer.connection.lost:
            # its worker is gone (parked by the agent, or lost): the next call decides
            self._deferred.append(("free", int(addr)))
            return
        with host.lock:
            self._memory.release(self._queue_on(writer), int(addr))

    def release_later(self, op: str, *args: Any) -> None:
        if not self._host.closed and self._errors.lost is None:
            self._deferred.append((op, *args))

    def send_deferred(self) -> None:
        """Send the releases finalizers queued (a call on a user thread, first)."""
        host = self._host
        with host.lock:
            while self._deferred:
                op, *args = self._deferred.popleft()
                if op == "free":
                    if self._memory.owns(args[0]):
                        self.free(args[0])
                else:
                    writer = host.current_writer()
                    if writer is not None:
                        host._add(writer, op, args, None)

    def release_cache(self, writer: BatchWriter | None = None) -> None:
        """Unmap the cached freed allocations (before a park; ``writer``: the current one),
        after sending the finalizers' frees, which may add to them."""
        host = self._host
        with host.lock:
            if self._deferred:
                self.send_deferred()
            writer = writer or host.current_writer()
            if writer is not None and self._memory.cached_bytes:
                self._memory.release_cache(self._queue_on(writer, site=False))

    def mem_get_info(self) -> tuple[int, int]:
        # the user asks how much is free: cached chunks would count as used
        if self._deferred or self._memory.cached_bytes:
            self._host._ensure_connected()  # (a parked session is restored: as call_sync does)
            self.release_cache()
        free, total = self._host.call_sync("mem_get_info")
        self._memory.free_estimate = int(free)
        return int(free), int(total)
