"""MappedRanges' running count of mapped bytes agrees with its ranges through any sequence of
allocations, frees and module globals (a seeded random walk)."""

from __future__ import annotations

import random

import pytest

from gpu_agent.memory_map import AddressError, MappedRanges
from gpu_agent.protocol import GRANULARITY


@pytest.mark.parametrize("seed", range(5))
def test_mapped_bytes_is_the_sum_of_the_ranges(seed: int) -> None:
    rng = random.Random(seed)
    base = 1 << 40
    ranges = MappedRanges(base, 64 * GRANULARITY)
    for _ in range(500):
        slot = base + rng.randrange(64) * GRANULARITY
        action = rng.choice(("add", "add", "remove", "external"))
        try:
            if action == "add":
                ranges.add(slot, GRANULARITY * rng.randint(1, 3))
            elif action == "remove":
                ranges.remove(slot)
            else:
                ranges.add_external(slot + 256, rng.randint(1, 4096))
        except AddressError:
            pass
        assert ranges.mapped_bytes == sum(size for _start, size in ranges.ranges())
