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


@pytest.mark.parametrize("cache_limit", [0, 6 * GRANULARITY])
def test_random_workload_keeps_allocations_disjoint_and_accounted(cache_limit: int) -> None:
    rng = random.Random(7)
    alloc = AddressAllocator(BASE, 1024 * GRANULARITY, cache_limit=cache_limit)
    live: dict[int, int] = {}
    mapped: dict[int, int] = {}
    for _ in range(3000):
        if rng.random() < 0.02:
            for chunk, _size in alloc.evict_cached(rng.choice([None, GRANULARITY])):
                del mapped[chunk]
        elif live and rng.random() < 0.5:
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
        assert alloc.cached_bytes <= cache_limit
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


# {{{ the cache of freed own-chunk allocations

MIB4 = 2 * GRANULARITY


def test_a_freed_large_allocation_is_cached_and_taken_back_with_nothing_to_map() -> None:
    alloc = AddressAllocator(BASE, SIZE, cache_limit=4 * MIB4)
    addr, chunks = alloc.allocate(MIB4)
    assert chunks == [(addr, MIB4)]
    for _ in range(10):
        assert alloc.release(addr) == []  # kept mapped: no free
        assert alloc.cached_bytes == MIB4 and alloc.mapped_bytes == MIB4
        assert not alloc.owns(addr)  # a second release is a double free, as before
        again, chunks = alloc.allocate(MIB4 - 100)  # the same rounded size
        assert (again, chunks) == (addr, [])
        assert alloc.cached_bytes == 0 and alloc.mapped_bytes == MIB4
    assert alloc.requested_bytes == MIB4 - 100


def test_another_rounded_size_maps_its_own_chunks() -> None:
    alloc = AddressAllocator(BASE, SIZE, cache_limit=4 * MIB4)
    addr, _ = alloc.allocate(MIB4)
    alloc.release(addr)
    other, chunks = alloc.allocate(GRANULARITY)
    assert chunks == [(other, GRANULARITY)] and other != addr
    assert alloc.cached_bytes == MIB4


def test_the_cache_keeps_at_most_its_limit_unmapping_the_oldest() -> None:
    alloc = AddressAllocator(BASE, SIZE, cache_limit=2 * MIB4)
    addrs = [alloc.allocate(MIB4)[0] for _ in range(3)]
    assert alloc.release(addrs[0]) == []
    assert alloc.release(addrs[1]) == []
    assert alloc.release(addrs[2]) == [(addrs[0], MIB4)]  # the oldest goes
    assert alloc.cached_bytes == 2 * MIB4 and alloc.mapped_bytes == 2 * MIB4


def test_an_allocation_larger_than_the_limit_is_unmapped_at_once() -> None:
    alloc = AddressAllocator(BASE, SIZE, cache_limit=MIB4)
    addr, _ = alloc.allocate(2 * MIB4)
    assert alloc.release(addr) == [(addr, 2 * MIB4)]
    assert alloc.cached_bytes == 0 and alloc.mapped_bytes == 0


def test_a_limit_of_zero_unmaps_every_release_as_before() -> None:
    alloc = AddressAllocator(BASE, SIZE, cache_limit=0)
    for _ in range(3):
        addr, chunks = alloc.allocate(MIB4)
        assert chunks == [(addr, MIB4)]
        assert alloc.release(addr) == [(addr, MIB4)]
    assert alloc.mapped_bytes == 0


def test_evict_cached_unmaps_the_oldest_first_until_enough() -> None:
    alloc = AddressAllocator(BASE, SIZE, cache_limit=8 * MIB4)
    addrs = [alloc.allocate(MIB4)[0] for _ in range(3)]
    for addr in addrs:
        alloc.release(addr)
    assert alloc.evict_cached(MIB4 + 1) == [(addrs[0], MIB4), (addrs[1], MIB4)]
    assert alloc.evict_cached() == [(addrs[2], MIB4)]
    assert alloc.evict_cached() == [] and alloc.mapped_bytes == 0
    # the evicted addresses are free address space again
    assert alloc.allocate(MIB4)[1] != []


def test_bytes_to_map_says_what_allocate_would_map() -> None:
    alloc = AddressAllocator(BASE, SIZE, cache_limit=8 * MIB4)
    assert alloc.bytes_to_map(MIB4) == MIB4
    assert alloc.bytes_to_map(100) == GRANULARITY
    addr, _ = alloc.allocate(MIB4)
    alloc.allocate(100)
    alloc.release(addr)
    assert alloc.bytes_to_map(MIB4 - 1) == 0  # cached
    assert alloc.bytes_to_map(3 * GRANULARITY) == 3 * GRANULARITY
    assert alloc.bytes_to_map(100) == 0  # room in the shared chunk
    assert alloc.bytes_to_map(GRANULARITY - 1) == GRANULARITY  # no room left in it


def test_a_cached_chunk_whose_mapping_failed_is_dropped() -> None:
    alloc = AddressAllocator(BASE, SIZE, cache_limit=8 * MIB4)
    addr, _ = alloc.allocate(MIB4)
    alloc.release(addr)  # freed before the agent's failure came back
    alloc.forget_chunk(addr)
    assert alloc.cached_bytes == 0 and alloc.mapped_bytes == 0
    again, chunks = alloc.allocate(MIB4)
    assert chunks == [(again, MIB4)]  # mapped anew

# }}}
