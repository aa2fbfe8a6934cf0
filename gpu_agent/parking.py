"""Parked device memory: where a session's bytes live while it holds no GPU.

A parked session's chunks (``(address, bytes)``) stay in host memory up to ``memory_cap`` bytes in
all; past that they are written to files under ``spill_dir``. ``limit`` bounds everything parked
(memory and disk): a park that would pass it drops the oldest parked states first. Whatever is
dropped, by capacity or by ``ttl``, is remembered with the reason, so that the owner's next resume
gets a clear ``StateLost`` instead of a silent fresh start.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("harp.agent.parking")


@dataclass
class ParkedChunk:
    addr: int
    size: int
    data: np.ndarray | None = None  # in host memory, or
    path: Path | None = None  # spilled to this file

    def read(self) -> np.ndarray:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return np.fromfile(self.path, np.uint8, self.size)


@dataclass
class ParkedMemory:
    session_id: str
    chunks: list[ParkedChunk]
    parked_at: float = field(default_factory=time.monotonic)
    #: seconds it is kept: the agent's --park-ttl, or less where the kernel asked for less
    ttl: float = float("inf")

    @property
    def nbytes(self) -> int:
        return sum(c.size for c in self.chunks)

    @property
    def spilled_bytes(self) -> int:
        return sum(c.size for c in self.chunks if c.path is not None)


class ParkStore:
    """The parked memory of every session of one agent; see the module docstring."""

    def __init__(self, memory_cap: int, limit: int, ttl: float, spill_dir: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.memory_cap = memory_cap
        self.limit = limit
        self.ttl = ttl
        self._spill_root = spill_dir
        self._spill_dir: Path | None = None
        self._clock = clock
        self._parked: dict[str, ParkedMemory] = {}
        #: session id -> why its parked state is gone
        self.dropped: dict[str, str] = {}

    @property
    def host_bytes(self) -> int:
        return sum(c.size for p in self._parked.values() for c in p.chunks if c.data is not None)

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self._parked.values())

    def get(self, session_id: str) -> ParkedMemory | None:
        return self._parked.get(session_id)

    def put(self, session_id: str, chunks: list[tuple[int, Any]], *, ttl: float | None = None,
            limit: int | None = None) -> tuple[ParkedMemory, list[str]]:
        """Keep a session's chunks; returns its ParkedMemory and the sessions dropped for room.
        ``ttl`` and ``limit``: what the session's kernel asked for (its provisioner's park_ttl
        and park_limit), applied where they are below the agent's own. Raises MemoryError when
        the state alone is larger than the limit."""
        nbytes = sum(memoryview(data).nbytes for _, data in chunks)
        if nbytes > self.limit:
            raise MemoryError(
                f"this session's device memory ({nbytes} bytes) is larger than the agent's park "
                f"limit ({self.limit} bytes, --park-limit)")
        if limit is not None and nbytes > limit:
            raise MemoryError(
                f"this session's device memory ({nbytes} bytes) is larger than its kernel's park "
                f"limit ({limit} bytes, park_limit / HARP_PARK_LIMIT)")
        evicted: list[str] = []
        for old in sorted(self._parked.values(), key=lambda p: p.parked_at):
            if self.total_bytes + nbytes <= self.limit:
                break
            if old.session_id != session_id:
                self.drop(old.session_id, "the agent needed the room for other parked sessions "
                          "(--park-limit)")
                evicted.append(old.session_id)
        parked = ParkedMemory(session_id, [], parked_at=self._clock(),
                              ttl=min(self.ttl, ttl) if ttl is not None else self.ttl)
        room = self.memory_cap - self.host_bytes
        for addr, data in chunks:
            array = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
            size = array.nbytes
            if size <= room:
                parked.chunks.append(ParkedChunk(addr, size, data=array))
                room -= size
            else:
                path = self._spill_path(session_id, addr)
                array.tofile(path)
                parked.chunks.append(ParkedChunk(addr, size, path=path))
        self._parked[session_id] = parked
        self.dropped.pop(session_id, None)
        return parked, evicted

    def take(self, session_id: str) -> ParkedMemory | None:
        """Remove and return a session's parked memory (its files are deleted by ``discard``)."""
        return self._parked.pop(session_id, None)

    def drop(self, session_id: str, reason: str) -> int:
        """Forget a session's parked memory, remembering why; returns the bytes freed."""
        parked = self._parked.pop(session_id, None)
        if parked is None:
            return 0
        self.discard(parked)
        self.dropped[session_id] = reason
        log.info("dropped parked session %s (%d bytes): %s", session_id, parked.nbytes, reason)
        return parked.nbytes

    def expire(self) -> list[str]:
        """Drop parked states older than ``ttl``; returns their session ids."""
        now = self._clock()
        old = [p for p in self._parked.values() if now - p.parked_at > p.ttl]
        for parked in old:
            self.drop(parked.session_id, (
                f"it was parked longer than the agent keeps parked state ({self.ttl:g} s, "
                "--park-ttl)") if parked.ttl >= self.ttl else (
                f"it was parked longer than its kernel asked the agent to keep it "
                f"({parked.ttl:g} s, park_ttl / HARP_PARK_TTL)"))
        return [p.session_id for p in old]

    @staticmethod
    def discard(parked: ParkedMemory) -> None:
        for chunk in parked.chunks:
            if chunk.path is not None:
                try:
                    chunk.path.unlink()
                except OSError:
                    pass

    def _spill_path(self, session_id: str, addr: int) -> Path:
        if self._spill_dir is None:
            root = self._spill_root
            if root:
                os.makedirs(root, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="harp-parked-", dir=root or None))
        return self._spill_dir / f"{session_id}-{addr:x}.bin"

    def close(self) -> None:
        for session_id in list(self._parked):
            self.discard(self._parked.pop(session_id))
        if self._spill_dir is not None:
            try:
                os.rmdir(self._spill_dir)
            except OSError:
                pass
