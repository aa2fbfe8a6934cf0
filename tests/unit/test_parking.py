"""ParkStore: parks planned before they start, the memory tier and the limit, TTL, reasons kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_agent.errors import AgentError
from gpu_agent.parking import REMEMBERED_DROPS, ParkStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write_park(store: ParkStore, session: str, sizes: list[int], memory_room: int
               ) -> list[list[object]]:
    """What a worker does for a park: files in the memory dir while the room lasts."""
    chunks: list[list[object]] = []
    for i, size in enumerate(sizes):
        where = store.memory_dir if size <= memory_room else store.disk_dir
        if where == store.memory_dir:
            memory_room -= size
        path = Path(where) / f"{session}-{i}.bin"
        path.write_bytes(bytes([i + 1]) * size)
        chunks.append([0x1000 * i, size, str(path)])
    return chunks


def park(store: ParkStore, session: str, *sizes: int) -> list[str]:
    plan = store.plan(session, sum(sizes))
    store.put(session, "kernel", write_park(store, session, list(sizes), plan.memory_room), [])
    return plan.evicted


def test_bytes_past_the_memory_cap_go_to_disk_and_are_counted_there(tmp_path: Path) -> None:
    store = ParkStore(memory_cap=150, limit=10_000, ttl=60, memory_dir=str(tmp_path / "m"),
                      spill_dir=str(tmp_path / "d"))
    (tmp_path / "m").mkdir(exist_ok=True)
    assert park(store, "s1", 100, 100) == []
    parked = store.get("s1")
    assert parked is not None
    assert (parked.nbytes, parked.memory_bytes, parked.disk_bytes) == (200, 100, 100)
    assert store.memory_bytes == 100 and store.disk_bytes == 100
    store.drop("s1", "test")
    assert not list(tmp_path.rglob("*.bin"))
    store.close()


def test_the_plan_drops_the_oldest_parked_state_for_room_and_says_why() -> None:
    clock = Clock()
    store = ParkStore(memory_cap=1000, limit=250, ttl=60, clock=clock)
    park(store, "old", 100)
    clock.now = 1
    park(store, "mid", 100)
    clock.now = 2
    assert park(store, "new", 100) == ["old"]
    assert store.get("old") is None and "--park-limit" in store.dropped["old"]
    assert store.total_bytes == 200
    store.close()


def test_a_park_larger_than_the_limit_is_refused_before_it_starts_and_drops_nothing() -> None:
    store = ParkStore(memory_cap=1000, limit=250, ttl=60)
    park(store, "kept", 100)
    with pytest.raises(AgentError) as refused:
        store.plan("huge", 300)
    assert refused.value.kind == "StateLost" and "--park-limit" in str(refused.value)
    assert store.get("kept") is not None and store.total_bytes == 100
    with pytest.raises(AgentError, match="park_limit"):
        store.plan("kernel-bound", 200, kernel_limit=150)
    store.close()


def test_a_planned_park_reserves_its_room_until_it_is_put_or_cancelled() -> None:
    store = ParkStore(memory_cap=100, limit=300, ttl=60)
    first = store.plan("a", 80)
    assert first.memory_room == 80 and store.memory_bytes == 80
    second = store.plan("b", 80)
    assert second.memory_room == 20  # the memory tier is promised to the first park
    store.cancel("a")
    store.cancel("b")
    assert store.total_bytes == 0 and store.memory_bytes == 0
    store.close()


def test_expired_parked_state_is_dropped_with_the_reason_it_came_from() -> None:
    clock = Clock()
    store = ParkStore(memory_cap=1000, limit=1000, ttl=60, clock=clock)
    park(store, "agent-ttl", 10)
    plan = store.plan("kernel-ttl", 10)
    store.put("kernel-ttl", "k", write_park(store, "kernel-ttl", [10], plan.memory_room), [],
              ttl=5)
    clock.now = 10
    assert store.expire() == ["kernel-ttl"]
    assert "park_ttl" in store.dropped["kernel-ttl"]
    clock.now = 61
    assert store.expire() == ["agent-ttl"]
    assert "--park-ttl" in store.dropped["agent-ttl"]
    store.close()


def test_remembered_drop_reasons_are_bounded() -> None:
    store = ParkStore(memory_cap=1, limit=1, ttl=60)
    for i in range(REMEMBERED_DROPS + 10):
        store.remember(f"s{i}", "gone")
    assert len(store.dropped) == REMEMBERED_DROPS
    assert "s0" not in store.dropped and f"s{REMEMBERED_DROPS + 9}" in store.dropped
    store.close()
