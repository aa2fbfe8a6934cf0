"""Client-side placement of device allocations inside the session's address range.

The agent maps device memory only in GRANULARITY-sized, GRANULARITY-aligned chunks at addresses the
client chooses (protocol op ``alloc``). This module decides those addresses, with no I/O:

* a request of at least ``GRANULARITY`` bytes gets chunks of its own (rounded up);
* a smaller request is sub-allocated, ``ALIGNMENT``-aligned, inside shared chunks; a shared chunk
  is unmapped when its last allocation is freed (one empty shared chunk is kept for reuse, so a
  loop that allocates and frees a small buffer does not map and unmap every time).

``allocate`` returns the address and the chunks the caller must map (``alloc`` ops) first;
``release`` returns the chunks the caller must unmap (``free`` ops), as ``(address, size)``.

Freed allocations with chunks of their own are cached (``FreedChunks``), as a caching allocator
does: their chunks stay mapped, up to ``cache_limit`` bytes (the oldest unmapped first past it),
and the next allocation of the same rounded size takes them back with nothing to map, so a loop
that makes a 4 MiB temporary every step maps it once (no ``alloc``/``free`` per step: the agent's
``free`` drains the GPU). A cached chunk is reused only by this allocator, so only within its
session (its tenant), and it is not zeroed on reuse: its new owner may read what the old one
left, as pycuda's ``mem_alloc`` (and ``pycuda.tools.DeviceMemoryPool``) allow; the agent zeroes
a chunk only when it maps it (the caller orders a reused chunk after its old owner's work:
``DeviceMemory``). ``evict_cached`` unmaps cached chunks (the caller, before mapping memory the
slot may not have room for, before a park, at a ``mem_get_info``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from gpu_agent.protocol import GRANULARITY, align_up

ALIGNMENT = 256


class AddressSpaceExhausted(Exception):
    """The session's address range has no hole large enough."""


class FreeList:
    """Free intervals of ``[0, size)``: first fit, coalescing on release."""

    def __init__(self, size: int) -> None:
        self._starts: list[int] = [0]
        self._ends: list[int] = [size]

    def take(self, nbytes: int, alignment: int) -> int | None:
        for i, (start, end) in enumerate(zip(self._starts, self._ends, strict=True)):
            addr = align_up(start, alignment)
            if addr + nbytes <= end:
                self._cut(i, addr, addr + nbytes)
                return addr
        return None

    def fits(self, nbytes: int, alignment: int) -> bool:
        """Whether ``take`` would find room (without taking it)."""
        return any(align_up(start, alignment) + nbytes <= end
                   for start, end in zip(self._starts, self._ends, strict=True))

    def _cut(self, i: int, lo: int, hi: int) -> None:
        start, end = self._starts[i], self._ends[i]
        del self._starts[i], self._ends[i]
        if hi < end:
            self._starts.insert(i, hi)
            self._ends.insert(i, end)
        if start < lo:
            self._starts.insert(i, start)
            self._ends.insert(i, lo)

    def give(self, lo: int, hi: int) -> None:
        i = bisect.bisect_left(self._starts, lo)
        if (i > 0 and self._ends[i - 1] > lo) or (i < len(self._starts) and self._starts[i] < hi):
            raise ValueError(f"double free of [{lo:#x}, {hi:#x})")
        if i > 0 and self._ends[i - 1] == lo:
            i -= 1
            lo = self._starts[i]
            del self._starts[i], self._ends[i]
        if i < len(self._starts) and self._starts[i] == hi:
            hi = self._ends[i]
            del self._starts[i], self._ends[i]
        self._starts.insert(i, lo)
        self._ends.insert(i, hi)

    def free_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))


class FreedChunks:
    """Chunks of freed allocations kept mapped, by age (to unmap the oldest first) and by size
    (to reuse one of the size asked); pure bookkeeping, the allocator maps and unmaps."""

    def __init__(self, limit: int) -> None:
        self.limit = max(int(limit), 0)
        self.bytes = 0
        self._by_age: dict[int, int] = {}  # addr -> size, the oldest first
        self._by_size: dict[int, list[int]] = {}  # size -> addrs, the newest last

    def __contains__(self, addr: int) -> bool:
        return addr in self._by_age

    def __bool__(self) -> bool:
        return bool(self._by_age)

    def has(self, size: int) -> bool:
        return bool(self._by_size.get(size))

    def put(self, addr: int, size: int) -> None:
        self._by_age[addr] = size
        self._by_size.setdefault(size, []).append(addr)
        self.bytes += size

    def take(self, size: int) -> int | None:
        """The newest chunk of exactly ``size`` bytes (the likeliest still in the GPU's
        caches), out of the cache; None when there is none."""
        addrs = self._by_size.get(size)
        if not addrs:
            return None
        addr = addrs[-1]
        self.drop(addr)
        return addr

    def oldest(self) -> int:
        return next(iter(self._by_age))

    def drop(self, addr: int) -> int:
        """Out of the cache; its size."""
        size = self._by_age.pop(addr)
        addrs = self._by_size[size]
        addrs.remove(addr)
        if not addrs:
            del self._by_size[size]
        self.bytes -= size
        return size


@dataclass
class _SharedChunk:
    addr: int
    free: FreeList = field(default_factory=lambda: FreeList(GRANULARITY))
    live: int = 0  # allocations inside


class AddressAllocator:
    """Places allocations in ``[base, base + size)``; see the module docstring."""

    def __init__(self, base: int, size: int, granularity: int = GRANULARITY,
                 alignment: int = ALIGNMENT, cache_limit: int = 0) -> None:
        if base % granularity or size % granularity:
            raise ValueError("the range must be granularity-aligned")
        self.base, self.size = base, size
        self.granularity, self.alignment = granularity, alignment
        self._chunks = FreeList(size)  # offsets of unmapped address space
        self._own: dict[int, int] = {}  # addr -> mapped size, for allocations with own chunks
        self._shared: dict[int, _SharedChunk] = {}  # chunk addr -> chunk
        self._small: dict[int, tuple[int, int]] = {}  # addr -> (chunk addr, size)
        self._spare: _SharedChunk | None = None  # an empty shared chunk kept mapped
        self._forgotten: set[int] = set()  # allocations inside chunks whose mapping failed
        self._requested: dict[int, int] = {}  # addr -> nbytes asked, for every live allocation
        self._freed = FreedChunks(cache_limit)  # freed own-chunk allocations kept mapped
        #: every mapped byte, cached ones included (the agent counts them all against the slot)
        self.mapped_bytes = 0
        #: the sum of the sizes asked of allocate() by live allocations: the user's own bytes,
        #: apart from the alignment and the 2 MiB pages mapped for them (%harp status)
        self.requested_bytes = 0

    # {{{ public

    def allocate(self, nbytes: int) -> tuple[int, list[tuple[int, int]]]:
        """``(address, [(chunk_addr, chunk_size), ...] to map first)``."""
        if nbytes <= 0:
            raise ValueError("allocation size must be positive")
        if nbytes >= self.granularity:
            size = align_up(nbytes, self.granularity)
            addr = self._freed.take(size)
            new = addr is None
            if addr is None:
                addr = self._map(size)
            self._own[addr] = size
            self._note_requested(addr, nbytes)
            return addr, [(addr, size)] if new else []
        size = align_up(nbytes, self.alignment)
        new_chunks: list[tuple[int, int]] = []
        for chunk in self._shared.values():
            offset = chunk.free.take(size, self.alignment)
            if offset is not None:
                break
        else:
            if self._spare is not None:
                chunk, self._spare = self._spare, None
            else:
                chunk = _SharedChunk(self._map(self.granularity))
                new_chunks.append((chunk.addr, self.granularity))
            self._shared[chunk.addr] = chunk
            offset = chunk.free.take(size, self.alignment)
            assert offset is not None
        chunk.live += 1
        addr = chunk.addr + offset
        self._small[addr] = (chunk.addr, size)
        self._note_requested(addr, nbytes)
        return addr, new_chunks

    def release(self, addr: int) -> list[tuple[int, int]]:
        """Forget the allocation at ``addr``; the chunks to unmap."""
        self.requested_bytes -= self._requested.pop(addr, 0)
        size = self._own.pop(addr, None)
        if size is not None:
            freed = self._freed
            if size > freed.limit:
                self._unmap(addr, size)
                return [(addr, size)]
            evicted = self.evict_cached(freed.bytes + size - freed.limit)
            freed.put(addr, size)
            return evicted
        if addr in self._forgotten:
            self._forgotten.discard(addr)
            return []
        try:
            chunk_addr, size = self._small.pop(addr)
        except KeyError:
            raise ValueError(f"no allocation at {addr:#x}") from None
        chunk = self._shared[chunk_addr]
        offset = addr - chunk_addr
        chunk.free.give(offset, offset + size)
        chunk.live -= 1
        if chunk.live:
            return []
        del self._shared[chunk_addr]
        if self._spare is None:
            self._spare = chunk
            return []
        self._unmap(chunk_addr, self.granularity)
        return [(chunk_addr, self.granularity)]

    def forget_chunk(self, chunk_addr: int) -> None:
        """A chunk whose ``alloc`` failed on the agent: it is not mapped; drop what lives in it."""
        if chunk_addr in self._freed:  # freed (and cached) before the failure came back
            self._unmap(chunk_addr, self._freed.drop(chunk_addr))
            return
        size = self._own.pop(chunk_addr, None)
        if size is not None:
            self._forgotten.add(chunk_addr)
            self.requested_bytes -= self._requested.pop(chunk_addr, 0)
        else:
            chunk = self._shared.pop(chunk_addr, None)
            if chunk is None and self._spare is not None and self._spare.addr == chunk_addr:
                chunk, self._spare = self._spare, None
            if chunk is None:
                return
            size = self.granularity
            for addr in [a for a, (c, _) in self._small.items() if c == chunk_addr]:
                del self._small[addr]
                self._forgotten.add(addr)
                self.requested_bytes -= self._requested.pop(addr, 0)
        self._unmap(chunk_addr, size)

    def release_spare(self) -> list[tuple[int, int]]:
        """Unmap the kept empty shared chunk, if any (before a large allocation, say)."""
        if self._spare is None:
            return []
        addr, self._spare = self._spare.addr, None
        self._unmap(addr, self.granularity)
        return [(addr, self.granularity)]

    def evict_cached(self, nbytes: int | None = None) -> list[tuple[int, int]]:
        """Unmap cached chunks, the oldest first, until ``nbytes`` are unmapped (None: all);
        the chunks to unmap."""
        evicted: list[tuple[int, int]] = []
        cache, unmapped = self._freed, 0
        while cache and (nbytes is None or unmapped < nbytes):
            addr = cache.oldest()
            size = cache.drop(addr)
            self._unmap(addr, size)
            evicted.append((addr, size))
            unmapped += size
        return evicted

    def bytes_to_map(self, nbytes: int) -> int:
        """How many bytes ``allocate(nbytes)`` would map now (0: a cached or shared chunk)."""
        if nbytes >= self.granularity:
            size = align_up(nbytes, self.granularity)
            return 0 if self._freed.has(size) else size
        size = align_up(nbytes, self.alignment)
        if self._spare is not None or any(
                chunk.free.fits(size, self.alignment) for chunk in self._shared.values()):
            return 0
        return self.granularity

    def owns(self, addr: int) -> bool:
        return addr in self._own or addr in self._small or addr in self._forgotten

    def chunk_of(self, addr: int) -> int | None:
        """The mapped chunk that holds the allocation at ``addr``."""
        if addr in self._own:
            return addr
        entry = self._small.get(addr)
        return entry[0] if entry else None

    @property
    def cached_bytes(self) -> int:
        """Bytes of freed allocations kept mapped (counted in ``mapped_bytes`` too)."""
        return self._freed.bytes

    @property
    def cache_limit(self) -> int:
        return self._freed.limit

    @property
    def live_allocations(self) -> int:
        return len(self._own) + len(self._small)

    # }}}

    def _note_requested(self, addr: int, nbytes: int) -> None:
        self._requested[addr] = nbytes
        self.requested_bytes += nbytes

    def _map(self, size: int) -> int:
        offset = self._chunks.take(size, self.granularity)
        if offset is None:
            raise AddressSpaceExhausted(
                f"no {size}-byte hole left in the session's {self.size}-byte address range")
        self.mapped_bytes += size
        return self.base + offset

    def _unmap(self, addr: int, size: int) -> None:
        self.mapped_bytes -= size
        offset = addr - self.base
        self._chunks.give(offset, offset + size)
