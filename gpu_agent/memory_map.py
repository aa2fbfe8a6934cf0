"""Which device address ranges a session has mapped, and checks against them.

The server checks every address a call names before the executor sees it, so a wrong pointer is a
clear error for that session and never touches another session's memory.
"""

from __future__ import annotations

import bisect

from gpu_agent.errors import AgentError
from gpu_agent.protocol import GRANULARITY


class AddressError(AgentError):
    """An address or range the session has not mapped (or may not map)."""

    def __init__(self, message: str) -> None:
        super().__init__("HandleError", message)


class MappedRanges:
    """Disjoint ``[start, start + size)`` ranges inside one session's address range."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.limit = base + size
        self._starts: list[int] = []
        self._sizes: dict[int, int] = {}
        # kept as ranges come and go: the worker reads it after every batch (a sum over the
        # ranges would cost a session with many allocations time on each round trip)
        self._mapped = 0

    @property
    def mapped_bytes(self) -> int:
        return self._mapped

    def __len__(self) -> int:
        return len(self._starts)

    def starts_at(self, addr: int) -> bool:
        """Whether an allocation starts exactly at ``addr``."""
        return addr in self._sizes

    def ranges(self) -> list[tuple[int, int]]:
        return [(start, self._sizes[start]) for start in self._starts]

    def check_new(self, addr: int, size: int) -> None:
        """Raise AddressError unless ``alloc(addr, size)`` is allowed."""
        if size <= 0 or addr % GRANULARITY or size % GRANULARITY:
            raise AddressError(
                f"alloc at {addr:#x} of {size} bytes: address and size must be positive "
                f"multiples of {GRANULARITY} bytes")
        if addr < self.base or addr + size > self.limit:
            raise AddressError(
                f"alloc at {addr:#x} of {size} bytes lies outside this session's address range "
                f"[{self.base:#x}, {self.limit:#x})")
        i = bisect.bisect_right(self._starts, addr)
        if i and self._starts[i - 1] + self._sizes[self._starts[i - 1]] > addr:
            raise AddressError(f"alloc at {addr:#x} overlaps the allocation at "
                               f"{self._starts[i - 1]:#x}")
        if i < len(self._starts) and self._starts[i] < addr + size:
            raise AddressError(f"alloc at {addr:#x} of {size} bytes overlaps the allocation at "
                               f"{self._starts[i]:#x}")

    def add(self, addr: int, size: int) -> None:
        self.check_new(addr, size)
        bisect.insort(self._starts, addr)
        self._sizes[addr] = size
        self._mapped += size

    def add_external(self, addr: int, size: int) -> None:
        """Memory the session may address but did not allocate (a module's ``__device__``
        globals): checked like an allocation, never freed by the client."""
        if addr not in self._sizes:
            bisect.insort(self._starts, addr)
        self._mapped += size - self._sizes.get(addr, 0)
        self._sizes[addr] = size

    def remove(self, addr: int) -> int:
        """Forget the allocation that starts at ``addr``; returns its size."""
        size = self._sizes.pop(addr, None)
        if size is None:
            raise AddressError(
                f"free of {addr:#x}: no allocation starts there ({self._near(addr)})")
        self._starts.remove(addr)
        self._mapped -= size
        return size

    def check(self, lo: int, hi: int) -> None:
        """Raise AddressError unless ``[lo, hi)`` lies inside one mapped range."""
        if hi <= lo:
            if hi == lo:
                return
            raise AddressError(f"empty or negative range [{lo:#x}, {hi:#x})")
        i = bisect.bisect_right(self._starts, lo) - 1
        if i >= 0:
            start = self._starts[i]
            if hi <= start + self._sizes[start]:
                return
        raise AddressError(
            f"[{lo:#x}, {hi:#x}) ({hi - lo} bytes) is not inside memory this session allocated "
            f"({self._near(lo)}); was it freed, or is the size wrong?")

    def _near(self, addr: int) -> str:
        if not self._starts:
            return "the session has no allocations"
        i = bisect.bisect_right(self._starts, addr) - 1
        start = self._starts[max(i, 0)]
        return f"nearest allocation: {start:#x}, {self._sizes[start]} bytes"
