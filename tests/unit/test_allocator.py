"""AddressAllocator: client-side placement of allocations in the session's address range."""

from __future__ import annotations

import itertools
import random

import pytest

from gpu_agent.protocol import ADDRESS_SPACE_BASE, GRANULARITY
from harp_jupyter.shim.allocator import ALIGNMENT, AddressAllocator, AddressSpaceExhausted

BASE = ADDRESS_SPACE_BASE
SIZE = 64 * GRANULARITY


def make() -> AddressAllocator:
    return AddressAllocator(BASE, SIZE)


def test_large_allocation_gets_its_own_aligned_chunk_rounded_up() -> None:
    alloc = make()
    addr, chunks = alloc.allocate(GRANULARITY + 1)
    assert addr % GRANULARITY == 0 and BASE <= addr < BASE + SIZE
    assert chunks == [(addr, 2 * GRANULARITY)]
    assert alloc.mapped_bytes == 2 * GRANULARITY
    assert alloc.release(addr) == [(addr, 2 * GRANULARITY)]
    assert alloc.mapped_bytes == 0


def test_small_allocations_share_one_chunk_aligned_without_overlap() -> None:
    alloc = make()
    placed = []
    new_chunks = []
    for size in (1, 100, 256, 257, 4000):
        addr, chunks = alloc.allocate(size)
        placed.append((addr, size))
        new_chunks += chunks
    assert len(new_chunks) == 1  # one shared chunk mapped for all of them
    chunk_addr, chunk_size = new_chunks[0]
    for addr, size in placed:
        assert addr % ALIGNMENT == 0
        assert chunk_addr <= addr and addr + size <= chunk_addr + chunk_size
    spans = sorted(placed)
    for (a, n), (b, _) in itertools.pairwise(spans):
        assert a + n <= b


def test_freed_space_is_reused() -> None:
    alloc = make()
    first, _ = alloc.allocate(1000)
    alloc.allocate(1000)
    alloc.release(first)
    again, chunks = alloc.allocate(1000)
    assert again == first and chunks == []
    big, _ = alloc.allocate(3 * GRANULARITY)
    alloc.release(big)
    big_again, chunks = alloc.allocate(3 * GRANULARITY)
    assert big_again == big and chunks == [(big, 3 * GRANULARITY)]


def test_empty_shared_chunk_is_kept_once_then_unmapped() -> None:
    alloc = make()
    a, chunks_a = alloc.allocate(GRANULARITY - 256)  # fills a first chunk
    b, chunks_b = alloc.allocate(GRANULARITY - 256)  # needs a second one
    assert len(chunks_a) == len(chunks_b) == 1
    assert alloc.release(a) == []  # kept as the spare
    assert alloc.release(b) == [chunks_b[0]]  # a second empty chunk is unmapped
    c, chunks_c = alloc.allocate(10)  # reuses the spare without mapping
    assert chunks_c == [] and alloc.chunk_of(c) == chunks_a[0][0]
    assert alloc.mapped_bytes == GRANULARITY


def test_release_spare_unmaps_the_kept_chunk() -> None:
    alloc = make()
    a, chunks = alloc.allocate(10)
    alloc.release(a)
    assert alloc.release_spare() == chunks
    assert alloc.mapped_bytes == 0
    assert alloc.release_spare() == []


def test_unknown_and_double_free_are_refused() -> None:
    alloc = make()
    a, _ = alloc.allocate(10)
    alloc.allocate(10)
    alloc.release(a)
    with pytest.raises(ValueError):
        alloc.release(a)
    with pytest.raises(ValueError):
        alloc.release(BASE + 12345)


def test_forgotten_chunk_drops_its_allocations_quietly() -> None:
    alloc = make()
    small, chunks = alloc.allocate(10)
    big, _ = alloc.allocate(GRANULARITY)
    alloc.forget_chunk(chunks[0][0])
    alloc.forget_chunk(big)
    assert alloc.owns(small) and alloc.owns(big)
    assert alloc.release(small) == [] and alloc.release(big) == []
    assert alloc.mapped_bytes == 0 and alloc.live_allocations == 0


def test_address_range_exhaustion_is_reported() -> None:
    alloc = AddressAllocator(BASE, 4 * GRANULARITY)
    alloc.allocate(3 * GRANULARITY)
    with pytest.raises(AddressSpaceExhausted):
        alloc.allocate(2 * GRANULARITY)
    alloc.allocate(GRANULARITY)  # what is left still fits


def test_random_workload_keeps_allocations_disjoint_and_accounted() -> None:
    rng = random.Random(7)
    alloc = AddressAllocator(BASE, 1024 * GRANULARITY)
    live: dict[int, int] = {}
    mapped: dict[int, int] = {}
    for _ in range(3000):
        if live and rng.random() < 0.5:
            addr = rng.choice(list(live))
            del live[addr]
            for chunk, _size in alloc.release(addr):
                del mapped[chunk]
        else:
            size = rng.choice([1, 17, 256, 5000, 70000, GRANULARITY // 2, GRANULARITY,
                               GRANULARITY + 7])
            addr, chunks = alloc.allocate(size)
            for chunk, chunk_size in chunks:
                assert chunk % GRANULARITY == 0 and chunk not in mapped
                mapped[chunk] = chunk_size
            live[addr] = size
        spans = sorted(live.items())
        for (a, n), (b, _) in itertools.pairwise(spans):
            assert a + n <= b, "allocations overlap"
        for addr, size in live.items():
            chunk = alloc.chunk_of(addr)
            assert chunk in mapped and addr + size <= chunk + mapped[chunk]
    assert alloc.mapped_bytes == sum(mapped.values())


def test_requested_bytes_count_what_live_allocations_asked_for() -> None:
    alloc = make()
    big, _ = alloc.allocate(GRANULARITY + 1)
    small, chunks = alloc.allocate(40)
    other, _ = alloc.allocate(40)
    assert alloc.requested_bytes == GRANULARITY + 81
    alloc.release(other)
    assert alloc.requested_bytes == GRANULARITY + 41
    alloc.forget_chunk(chunks[0][0])  # its alloc failed on the agent: the 40 bytes are gone
    alloc.forget_chunk(big)
    assert alloc.requested_bytes == 0
    alloc.release(small)  # a forgotten allocation released later counts nothing twice
    alloc.release(big)
    assert alloc.requested_bytes == 0 and alloc.live_allocations == 0


def test_requested_bytes_over_a_random_history() -> None:
    rng = random.Random(7)
    alloc = make()
    live: dict[int, int] = {}
    for _ in range(500):
        if live and rng.random() < 0.45:
            addr = rng.choice(list(live))
            alloc.release(addr)
            del live[addr]
        else:
            nbytes = rng.choice([1, 17, 4096, GRANULARITY - 1, GRANULARITY + 3])
            try:
                addr, _ = alloc.allocate(nbytes)
            except AddressSpaceExhausted:
                continue
            live[addr] = nbytes
        assert alloc.requested_bytes == sum(live.values())
