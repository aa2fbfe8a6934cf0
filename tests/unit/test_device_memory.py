"""DeviceMemory: the calls it queues for allocations, with the cache of freed memory."""

from __future__ import annotations

from typing import Any

import pytest

from gpu_agent.protocol import ADDRESS_SPACE_BASE, GRANULARITY
from harp_jupyter.shim.device_memory import (
    DEFAULT_CACHE_CAP,
    DeviceMemory,
    cache_limit_for,
)

MIB = 1 << 20
SLOT = 64 * MIB


class Queued:
    """Records the calls DeviceMemory queues, as the session's ``_add`` would send them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []

    def __call__(self, op: str, args: list[Any], *_: Any) -> None:
        self.calls.append((op, args))

    def take(self) -> list[str]:
        ops, self.calls = [op for op, _ in self.calls], []
        return ops


def memory(cache: int, monkeypatch: pytest.MonkeyPatch) -> DeviceMemory:
    monkeypatch.setenv("HARP_CACHED_MEMORY", str(cache))
    mem = DeviceMemory()
    mem.adopt_range(ADDRESS_SPACE_BASE, 1024 * GRANULARITY, SLOT)
    return mem


def test_the_default_bound_is_an_eighth_of_the_slot_up_to_a_gib() -> None:
    assert cache_limit_for(SLOT, None) == SLOT // 8
    assert cache_limit_for(80 << 30, None) == DEFAULT_CACHE_CAP
    assert cache_limit_for(None, None) == 0
    assert cache_limit_for(SLOT, 0) == 0 and cache_limit_for(SLOT, 5 * MIB) == 5 * MIB


@pytest.mark.parametrize("text", ["-1", "1.5", "lots"])
def test_a_setting_that_is_not_bytes_is_refused(text: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_CACHED_MEMORY", text)
    with pytest.raises(ValueError, match="HARP_CACHED_MEMORY must be a whole number of bytes"):
        DeviceMemory()


def test_a_reuse_sends_a_one_byte_ordering_memset_instead_of_alloc_and_free(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mem, add = memory(SLOT, monkeypatch), Queued()
    addr, _, _ = mem.allocate(add, 4 * MIB)
    mem.release(add, addr)
    assert add.take() == ["alloc"]
    again, _, wait = mem.allocate(add, 4 * MIB)
    assert again == addr and not wait
    assert add.calls == [("memset", [addr, 0, 1, 1, None])]


def test_mapping_unmaps_the_oldest_cached_until_what_stays_cached_still_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mem, add = memory(SLOT, monkeypatch), Queued()
    addrs = [mem.allocate(add, 8 * MIB)[0] for _ in range(4)]
    for addr in addrs:
        mem.release(add, addr)
    add.take()
    assert mem.cached_bytes == 32 * MIB and mem.free_estimate == 32 * MIB
    # 16 MiB more would leave 16 free, less than the 32 cached: the oldest cached chunk goes
    # first (then 24 stay cached and 40 - 16 = 24 are free)
    mem.allocate(add, 16 * MIB)
    assert add.calls[0] == ("free", [addrs[0]])
    assert [op for op, _ in add.calls[1:]] == ["alloc"]
    assert mem.cached_bytes == 24 * MIB and mem.free_estimate == 24 * MIB


def test_the_slots_room_bounds_the_cache_when_the_estimate_is_higher(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mem, add = memory(SLOT, monkeypatch), Queued()
    addrs = [mem.allocate(add, 8 * MIB)[0] for _ in range(4)]
    for addr in addrs:
        mem.release(add, addr)
    mem.free_estimate = SLOT  # as a restore's welcome says until its mem_get_info comes back
    add.take()
    mem.allocate(add, 16 * MIB)
    assert add.take() == ["free", "alloc"]  # by the estimate alone, nothing would go


def test_a_cache_of_zero_queues_what_it_did_before(monkeypatch: pytest.MonkeyPatch) -> None:
    mem, add = memory(0, monkeypatch), Queued()
    for _ in range(3):
        addr, _, _ = mem.allocate(add, 4 * MIB)
        mem.release(add, addr)
    assert add.take() == ["alloc", "free"] * 3


def test_release_cache_unmaps_everything_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    mem, add = memory(SLOT, monkeypatch), Queued()
    addrs = [mem.allocate(add, 4 * MIB)[0] for _ in range(3)]
    for addr in addrs:
        mem.release(add, addr)
    add.take()
    mem.release_cache(add)
    assert add.calls == [("free", [a]) for a in addrs]
    assert mem.cached_bytes == 0 and mem.free_estimate == SLOT


def test_a_reuse_keeps_the_empty_shared_chunk_a_new_mapping_unmaps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mem, add = memory(SLOT, monkeypatch), Queued()
    big, _, _ = mem.allocate(add, 4 * MIB)
    small, _, _ = mem.allocate(add, 4)  # a loss read back, say
    mem.release(add, small)  # its chunk is kept mapped, empty, for the next small one
    mem.release(add, big)
    add.take()
    mem.allocate(add, 4 * MIB)
    assert add.take() == ["memset"]  # no free: the reuse needs no room
    mem.allocate(add, 6 * MIB)
    assert add.take() == ["free", "alloc"]  # a new mapping unmaps the empty chunk, as before


def test_a_late_mem_get_info_reply_counts_what_was_mapped_after_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore queues a ``mem_get_info`` with its first calls; its reply may come after more
    were queued (uploads in pieces, a full window). The agent ran it before them, so the free
    memory it says is less what they map and more what they unmap: an allocation the slot
    cannot hold still waits for the agent and fails at its line."""
    mem, add = memory(0, monkeypatch), Queued()
    note = mem.mem_info_receiver()  # queued first, answered later
    first, _, _ = mem.allocate(add, 8 * MIB)
    mem.allocate(add, 8 * MIB)
    mem.release(add, first)
    note([SLOT, SLOT])  # the agent's free memory when it ran, before the calls after it
    assert mem.free_estimate == SLOT - 8 * MIB
    _, _, wait = mem.allocate(add, SLOT)
    assert wait
