"""ParkStore: memory cap and spill files, the total limit, TTL, and the reasons it remembers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpu_agent.parking import ParkStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chunks(*sizes: int, fill: int = 1) -> list[tuple[int, np.ndarray]]:
    return [(0x1000 * i, np.full(size, fill + i, np.uint8)) for i, size in enumerate(sizes)]


def test_chunks_past_the_memory_cap_spill_to_files_and_read_back(tmp_path: Path) -> None:
    store = ParkStore(memory_cap=150, limit=10_000, ttl=60, spill_dir=str(tmp_path))
    parked, evicted = store.put("s1", chunks(100, 100))
    assert evicted == []
    assert parked.nbytes == 200 and parked.spilled_bytes == 100 and store.host_bytes == 100
    assert [np.unique(c.read()).tolist() for c in parked.chunks] == [[1], [2]]
    taken = store.take("s1")
    assert taken is parked and store.get("s1") is None
    ParkStore.discard(taken)
    assert not list(tmp_path.rglob("*.bin"))


def test_the_limit_drops_the_oldest_parked_state_and_says_why() -> None:
    clock = Clock()
    store = ParkStore(memory_cap=1000, limit=250, ttl=60, clock=clock)
    store.put("old", chunks(100))
    clock.now = 1
    store.put("mid", chunks(100))
    clock.now = 2
    _, evicted = store.put("new", chunks(100))
    assert evicted == ["old"]
    assert store.get("old") is None and store.get("mid") is not None
    assert "park-limit" in store.dropped["old"]
    with pytest.raises(MemoryError, match="park limit"):
        store.put("huge", chunks(300))


def test_ttl_expires_parked_state() -> None:
    clock = Clock()
    store = ParkStore(memory_cap=1000, limit=1000, ttl=10, clock=clock)
    store.put("a", chunks(10))
    clock.now = 5
    store.put("b", chunks(10))
    clock.now = 12
    assert store.expire() == ["a"]
    assert "park-ttl" in store.dropped["a"] and store.get("b") is not None


def test_a_kernel_may_ask_for_less_than_the_agent_keeps_never_more() -> None:
    clock = Clock()
    store = ParkStore(memory_cap=1000, limit=1000, ttl=10, clock=clock)
    store.put("short", chunks(10), ttl=3)
    store.put("greedy", chunks(10), ttl=3600)  # capped by the agent's 10 s
    store.put("plain", chunks(10))
    clock.now = 4
    assert store.expire() == ["short"]
    assert "its kernel asked" in store.dropped["short"]
    assert "HARP_PARK_TTL" in store.dropped["short"]
    clock.now = 11
    assert sorted(store.expire()) == ["greedy", "plain"]
    assert "--park-ttl" in store.dropped["greedy"]
    with pytest.raises(MemoryError, match="kernel's park limit"):
        store.put("big", chunks(200), limit=100)
    assert store.get("big") is None
