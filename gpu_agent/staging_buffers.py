"""Reusable host buffers for the bytes of copies that travel as zero-copy frames.

A worker stages device-to-host copies in page-locked buffers: a copy into page-locked memory
runs at the bus's speed, into pageable memory CUDA stages it through a buffer of its own, at a
fraction of that, and allocating page-locked memory is slow (it pins pages). The shim snapshots
a synchronous host-to-device copy into plain buffers: a fresh allocation of a few hundred KiB
is a fresh mapping, whose first touch costs a page fault per page. Either way a buffer is
reused once nothing else refers to it: the message that carried it was sent and ZeroMQ released
it (a zero-copy frame holds a reference to its buffer until then), and, in the shim, the batch
was answered. The pool is bounded by ``limit`` bytes; past that, or for small copies, a new
array is returned.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

#: by default copies smaller than this are not staged: ZeroMQ copies such frames on send
MIN_STAGED_BYTES = 64 << 10
#: the references a free buffer has inside ``take``: its list, the loop variable, the argument
_FREE_REFS = 3


class StagingBuffers:
    """Buffers made by ``allocate`` (page-locked ones in a worker) by power-of-two size, up to
    ``limit`` bytes in all."""

    def __init__(self, limit: int, allocate: Callable[[int], np.ndarray], *,
                 min_bytes: int = MIN_STAGED_BYTES) -> None:
        self.limit = max(0, limit)
        self.min_bytes = min_bytes
        self._allocate = allocate
        self._buffers: dict[int, list[np.ndarray]] = {}
        self.held_bytes = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes``: a view of a free buffer of the pool where one
        fits, else a new plain one."""
        if nbytes < self.min_bytes:
            return np.empty(nbytes, np.uint8)
        size = 1 << (nbytes - 1).bit_length()
        buffers = self._buffers.setdefault(size, [])
        for buffer in buffers:
            if sys.getrefcount(buffer) == _FREE_REFS:
                return buffer[:nbytes]
        if self.held_bytes + size > self.limit:
            return np.empty(nbytes, np.uint8)
        buffer = self._allocate(size)
        buffers.append(buffer)
        self.held_bytes += size
        return buffer[:nbytes]

    def clear(self) -> None:
        """Forget every buffer (they are freed once their last reader lets go)."""
        self._buffers.clear()
        self.held_bytes = 0
