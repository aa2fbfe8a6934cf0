"""Reusable page-locked host buffers for device-to-host copies.

A copy into page-locked memory runs at the bus's speed; into pageable memory CUDA stages it
through a buffer of its own, at a fraction of that. Allocating page-locked memory is slow (it
pins pages), so a worker keeps what it allocated and reuses a buffer once nothing else refers to
it: the reply that carried it was sent and ZeroMQ released it (a zero-copy frame holds a
reference to its buffer until then). The pool is bounded by ``limit`` bytes; past that, or for
small copies, a plain pageable array is returned.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

#: copies smaller than this are cheap either way (and ZeroMQ copies such frames on send)
MIN_STAGED_BYTES = 64 << 10
#: the references a free buffer has inside ``take``: its list, the loop variable, the argument
_FREE_REFS = 3


class PinnedStaging:
    """Page-locked buffers by power-of-two size, up to ``limit`` bytes in all."""

    def __init__(self, limit: int, allocate: Callable[[int], np.ndarray]) -> None:
        self.limit = max(0, limit)
        self._allocate = allocate
        self._buffers: dict[int, list[np.ndarray]] = {}
        self.held_bytes = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes``: a view of a free page-locked buffer where one
        fits, else a new pageable one."""
        if nbytes < MIN_STAGED_BYTES:
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
