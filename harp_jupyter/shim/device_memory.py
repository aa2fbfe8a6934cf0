"""DeviceMemory: a session's device addresses, chosen on the client (docs/forwarding-design.md).

The addresses come from an ``AddressAllocator`` over the range the agent's welcome gave; a
restored session must get the same range back, or every device pointer the program holds would
be wrong. The free device memory is estimated (the welcome's total, each reply's
``mem_get_info``, minus what was mapped since) so that an allocation larger than it waits for the
agent and fails at the user's line. Releases that finalizers ask for wait in ``deferred`` for
the next call on a user thread.

Freed allocations of at least 2 MiB stay mapped in the allocator's cache, up to
HARP_CACHED_MEMORY bytes (``cache_limit_for``). So that the cache does not make an allocation
fail that would have succeeded without it, cached chunks are unmapped before a mapping, oldest
first, in the same batch ahead of the ``alloc`` (the agent unmaps them before it maps), until the
free memory as last known (and the slot's room) holds the new bytes and, as a margin, what stays
cached (``_make_room``). A reused chunk gets a 1-byte memset on the default stream, which orders
it after its previous owner's work on other streams, as a ``cuMemAlloc`` would (not on a stream
created ``STREAM_NON_BLOCKING``, which nothing orders).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

from harp_jupyter.shim.allocator import AddressAllocator, AddressSpaceExhausted
from harp_jupyter.shim.errors import HandleError, MemoryError, ProtocolError

#: how memory queues a call: ``add(op, args, on_result=None, on_error=None)``, the session's
#: ``_add`` on its writer under the user's call site (``MemoryCalls`` makes it)
AddCall = Callable[..., None]

#: HARP_CACHED_MEMORY's default: this fraction of the slot, at most DEFAULT_CACHE_CAP bytes
DEFAULT_CACHE_FRACTION = 8
DEFAULT_CACHE_CAP = 1 << 30


def cached_memory_from_env() -> int | None:
    """HARP_CACHED_MEMORY in bytes (None: unset, the default applies); ValueError when it is
    not a whole number of bytes."""
    text = os.environ.get("HARP_CACHED_MEMORY", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"HARP_CACHED_MEMORY must be a whole number of bytes (0 turns the cache "
                         f"of freed device memory off), not {text!r}")
    return value


def cache_limit_for(slot_bytes: int | None, setting: int | None) -> int:
    """The cache's bound: the setting, else 1/8 of the slot up to 1 GiB (0: no slot known)."""
    if setting is not None:
        return setting
    if not slot_bytes:
        return 0
    return min(int(slot_bytes) // DEFAULT_CACHE_FRACTION, DEFAULT_CACHE_CAP)


class DeviceMemory:
    """The allocator, the free memory as last known, and the releases queued by finalizers."""

    def __init__(self) -> None:
        self.allocator: AddressAllocator | None = None
        self.free_estimate: int | None = None
        #: bytes mapped minus bytes unmapped by the calls queued so far: what a ``mem_get_info``
        #: reply does not count yet of the calls queued after it
        self.net_mapped = 0
        #: the slot's bytes (the welcome's total memory): mapped memory, cached included, fits it
        self.slot_bytes: int | None = None
        #: HARP_CACHED_MEMORY, read when the session is made so that a bad value says so early
        self.cache_setting = cached_memory_from_env()
        #: (op, *args) of releases from finalizers, sent by the next call on a user thread
        self.deferred: deque[tuple[Any, ...]] = deque()

    @property
    def address_range(self) -> tuple[int, int] | None:
        """The range a restore must get back (None before the first welcome)."""
        allocator = self.allocator
        return None if allocator is None else (allocator.base, allocator.size)

    def adopt_range(self, base: int, size: int, total_memory: int | None) -> bool:
        """Take the welcome's range (and total memory); True when it restored the range this
        session had. ProtocolError when a restore put the session elsewhere."""
        allocator = self.allocator
        restored = allocator is not None
        if allocator is None:
            self.allocator = AddressAllocator(
                base, size, cache_limit=cache_limit_for(total_memory, self.cache_setting))
        elif (base, size) != (allocator.base, allocator.size):
            raise ProtocolError(f"the agent restored this session at {base:#x}, not at "
                                f"{allocator.base:#x}: device pointers would be wrong")
        self.free_estimate = total_memory
        self.slot_bytes = total_memory
        return restored

    def allocate(self, add: AddCall, nbytes: int) -> tuple[int, list[int], bool]:
        """Choose the address and queue the chunk maps with ``add`` (the session's, lock held):
        (address, the list the chunks that fail are added to, whether the agent must be waited
        for)."""
        allocator = self.allocator
        assert allocator is not None
        large = nbytes >= allocator.granularity
        # what this allocation maps matters only for what may be unmapped first: the spare
        # shared chunk (a large one's) and cached chunks, when there are any; a small one with
        # nothing cached skips the search allocate() makes anyway
        need = allocator.bytes_to_map(nbytes) if large or allocator.cached_bytes else 0
        if need and large:  # (a cached chunk needs no room)
            self._unmap(add, allocator.release_spare())
        self._make_room(add, need)
        try:
            addr, chunks = allocator.allocate(nbytes)
        except AddressSpaceExhausted as e:
            raise MemoryError(f"cuMemAlloc failed: out of memory ({e})") from None
        if not chunks and nbytes >= allocator.granularity:
            # a cached chunk: work queued on another stream may still use it. cuMemAlloc is an
            # ordering point between streams (CUDA's implicit synchronization); a 1-byte memset
            # on the legacy default stream is one too, without draining the GPU
            add("memset", [addr, 0, 1, 1, None])
        must_wait = False
        failed: list[int] = []
        for chunk_addr, size in chunks:
            estimate = self.free_estimate
            self.net_mapped += size
            if estimate is not None:
                must_wait = must_wait or size > estimate
                self.free_estimate = estimate - size
            add("alloc", [chunk_addr, size], None, _chunk_failed(allocator, chunk_addr, failed))
        return addr, failed, must_wait

    def release(self, add: AddCall, addr: int) -> None:
        """Queue the unmapping of the allocation at ``addr`` (lock held)."""
        allocator = self.allocator
        assert allocator is not None
        try:
            chunks = allocator.release(addr)
        except ValueError:
            raise HandleError(f"cuMemFree failed: no allocation at {addr:#x}") from None
        self._unmap(add, chunks)

    def release_cache(self, add: AddCall) -> None:
        """Unmap every cached chunk (lock held): before a park, at a ``mem_get_info``."""
        allocator = self.allocator
        if allocator is not None:
            self._unmap(add, allocator.evict_cached())

    @property
    def cached_bytes(self) -> int:
        """Bytes of freed allocations kept mapped for reuse (PyTorch's "reserved" less its
        "allocated"): this session's, counted against its slot."""
        allocator = self.allocator
        return allocator.cached_bytes if allocator is not None else 0

    def _make_room(self, add: AddCall, need: int) -> None:
        """Unmap cached chunks, oldest first, until the free memory as last known (and the
        slot's room) would still hold what stays cached once ``need`` new bytes are mapped:
        the cache never takes the room an allocation needs, with a margin of its own size
        for memory taken since that the client does not see (torch tensors, cuRAND state).
        They go ahead of the ``alloc``, so the agent unmaps them first."""
        allocator = self.allocator
        assert allocator is not None
        cached = allocator.cached_bytes
        if not need or not cached:
            return
        rooms = [] if self.free_estimate is None else [self.free_estimate]
        if self.slot_bytes:
            rooms.append(self.slot_bytes - allocator.mapped_bytes)
        if not rooms:
            return
        short = need + cached - min(rooms)
        if short > 0:
            # each byte unmapped leaves the cache and joins the free memory: half suffices
            self._unmap(add, allocator.evict_cached((short + 1) // 2))

    def _unmap(self, add: AddCall, chunks: list[tuple[int, int]]) -> None:
        for chunk, size in chunks:
            add("free", [chunk])
            self.note_unmapped(size)

    def owns(self, addr: int) -> bool:
        return self.allocator is not None and self.allocator.owns(addr)

    def note_unmapped(self, size: int) -> None:
        self.net_mapped -= size
        if self.free_estimate is not None:
            self.free_estimate += size

    def mem_info_receiver(self) -> Callable[[Any], None]:
        """The ``on_result`` of a ``mem_get_info`` queued now: the free memory it replies, less
        what the calls queued after it map (the agent ran them after it; their reply may come
        after some were queued)."""
        mark = self.net_mapped

        def note(value: Any) -> None:
            try:
                self.free_estimate = int(value[0]) - (self.net_mapped - mark)
            except (TypeError, ValueError, IndexError):
                pass

        return note

    @property
    def requested_bytes(self) -> int:
        allocator = self.allocator
        return allocator.requested_bytes if allocator is not None else 0


def _chunk_failed(allocator: AddressAllocator, chunk_addr: int,
                  failed: list[int]) -> Callable[[], None]:
    def forget() -> None:
        allocator.forget_chunk(chunk_addr)
        failed.append(chunk_addr)

    return forget
