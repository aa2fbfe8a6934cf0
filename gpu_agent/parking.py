"""Parked state: where a session lives while it holds no GPU, and what it may cost.

A parked session is a manifest (the calls that recreate its objects, its address range) plus its
device memory in files: first in a memory-backed directory (tmpfs: host memory) up to
``memory_cap`` bytes in all, then in ``spill_dir`` on disk, everything bounded by ``limit``.
The worker that parks a session writes the files itself, piece by piece, and the worker that
restores it reads them; the supervisor only keeps the books, so it never holds a session's bytes
and never waits on a disk.

A park is planned before it starts (``plan``): one that can't fit even after the oldest parked
states are dropped is refused, and its owner loses that state with a clear ``StateLost``, never
an agent killed for memory. Whatever is dropped (capacity, ``ttl``) is remembered with the reason
(the most recent ``REMEMBERED_DROPS``), so the owner's next resume says why.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpu_agent.errors import AgentError
from gpu_agent.sizes import format_bytes

log = logging.getLogger("harp.agent.parking")

#: why recently dropped sessions are gone, kept for their owners' next resume (bounded)
REMEMBERED_DROPS = 4096


@dataclass
class ParkedState:
    session_id: str
    kernel_id: str
    #: [[addr, size, path], ...] as the worker wrote them
    chunks: list[list[Any]]
    #: the calls that recreate the session's objects
    log: list[Any]
    memory_bytes: int
    disk_bytes: int
    parked_at: float
    ttl: float

    @property
    def nbytes(self) -> int:
        return self.memory_bytes + self.disk_bytes


@dataclass
class ParkPlan:
    """Where a park about to start may put its bytes, and what had to go for the room."""

    memory_room: int
    evicted: list[str] = field(default_factory=list)


class ParkStore:
    """The books of every parked session of one agent; see the module docstring."""

    def __init__(self, memory_cap: int, limit: int, ttl: float, *,
                 memory_dir: str = "/dev/shm", spill_dir: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.memory_cap = memory_cap
        self.limit = limit
        self.ttl = ttl
        self._clock = clock
        base = memory_dir if os.path.isdir(memory_dir) else None
        self.memory_dir = tempfile.mkdtemp(prefix="harp-parked-mem-", dir=base)
        if spill_dir:
            os.makedirs(spill_dir, exist_ok=True)
        self.disk_dir = tempfile.mkdtemp(prefix="harp-parked-", dir=spill_dir or None)
        self._parked: dict[str, ParkedState] = {}
        #: bytes promised to parks under way (memory, total)
        self._pending: dict[str, tuple[int, int]] = {}
        self.dropped: OrderedDict[str, str] = OrderedDict()

    # {{{ books

    @property
    def memory_bytes(self) -> int:
        return (sum(p.memory_bytes for p in self._parked.values())
                + sum(m for m, _ in self._pending.values()))

    @property
    def total_bytes(self) -> int:
        return (sum(p.nbytes for p in self._parked.values())
                + sum(t for _, t in self._pending.values()))

    @property
    def disk_bytes(self) -> int:
        return sum(p.disk_bytes for p in self._parked.values())

    def get(self, session_id: str) -> ParkedState | None:
        return self._parked.get(session_id)

    def sessions(self) -> list[ParkedState]:
        return list(self._parked.values())

    # }}}

    # {{{ a park: plan, then put (or cancel)

    def plan(self, session_id: str, nbytes: int, kernel_limit: int | None = None) -> ParkPlan:
        """Room for a park of ``nbytes`` (the session's device memory and its compiled code);
        drops the oldest parked states when that makes room. AgentError(StateLost) when it
        can't fit at all (nothing is dropped then)."""
        what = f"its {format_bytes(nbytes)} of device memory and compiled code are"
        if kernel_limit is not None and nbytes > kernel_limit:
            raise AgentError("StateLost", (
                f"{what} more than its kernel lets the agent keep "
                f"({format_bytes(kernel_limit)}, park_limit / HARP_PARK_LIMIT)"))
        if nbytes > self.limit:
            raise AgentError("StateLost", (
                f"{what} more than this agent can keep parked ({format_bytes(self.limit)} in "
                "host memory and on disk, harp-agent --park-limit)"))
        evicted: list[str] = []
        for old in sorted(self._parked.values(), key=lambda p: p.parked_at):
            if self.total_bytes + nbytes <= self.limit:
                break
            self.drop(old.session_id, "the agent needed the room for other parked sessions "
                      "(harp-agent --park-limit)")
            evicted.append(old.session_id)
        memory_room = max(min(self.memory_cap - self.memory_bytes, nbytes), 0)
        self._pending[session_id] = (memory_room, nbytes)
        return ParkPlan(memory_room, evicted)

    def put(self, session_id: str, kernel_id: str, chunks: list[list[Any]], calls: list[Any],
            ttl: float | None = None) -> ParkedState:
        """Book a finished park (the worker's ``parked`` message)."""
        self._pending.pop(session_id, None)
        memory = sum(c[1] for c in chunks if str(c[2]).startswith(self.memory_dir))
        parked = ParkedState(session_id, kernel_id, chunks, calls, memory,
                             sum(c[1] for c in chunks) - memory, self._clock(),
                             min(self.ttl, ttl) if ttl is not None else self.ttl)
        self._parked[session_id] = parked
        self.dropped.pop(session_id, None)
        return parked

    def cancel(self, session_id: str) -> None:
        """A park that did not happen gives its promised room back."""
        self._pending.pop(session_id, None)

    # }}}

    def take(self, session_id: str) -> ParkedState | None:
        """Hand a parked state over (to be restored); its files go with ``discard``."""
        return self._parked.pop(session_id, None)

    def drop(self, session_id: str, reason: str) -> int:
        """Forget a session's parked state, remembering why; returns the bytes freed."""
        parked = self._parked.pop(session_id, None)
        self.remember(session_id, reason)
        if parked is None:
            return 0
        discard(parked)
        log.info("dropped parked session %s (%s): %s", session_id, format_bytes(parked.nbytes),
                 reason)
        return parked.nbytes

    def remember(self, session_id: str, reason: str) -> None:
        self.dropped[session_id] = reason
        self.dropped.move_to_end(session_id)
        while len(self.dropped) > REMEMBERED_DROPS:
            self.dropped.popitem(last=False)

    def expire(self) -> list[str]:
        """Drop parked states older than their ttl; returns their session ids."""
        now = self._clock()
        old = [p for p in self._parked.values() if now - p.parked_at > p.ttl]
        for parked in old:
            self.drop(parked.session_id, (
                f"it was parked longer than the agent keeps parked state ({self.ttl:g} s, "
                "harp-agent --park-ttl)") if parked.ttl >= self.ttl else (
                f"it was parked longer than its kernel asked the agent to keep it "
                f"({parked.ttl:g} s, park_ttl / HARP_PARK_TTL)"))
        return [p.session_id for p in old]

    def close(self) -> None:
        for parked in list(self._parked.values()):
            discard(parked)
        self._parked.clear()
        for directory in (self.memory_dir, self.disk_dir):
            shutil.rmtree(directory, ignore_errors=True)


def discard(parked: ParkedState) -> None:
    for _addr, _size, path in parked.chunks:
        try:
            os.unlink(path)
        except OSError:
            pass
