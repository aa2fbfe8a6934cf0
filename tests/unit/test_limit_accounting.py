"""gpu_agent.context_limits: what a session's limits and scratch memory take from its slot."""

from __future__ import annotations

import pytest

from gpu_agent.context_limits import LIMITS, ContextLimits
from gpu_agent.errors import AgentError

MiB = 1 << 20


class Slot:
    """A slot of ``cap`` bytes whose other use is ``used`` bytes (as ExecutorSession.slot_room
    counts it: chunks plus object bytes, the limits' own among them)."""

    def __init__(self, cap: int, used: int = 0) -> None:
        self.cap, self.used = cap, used
        self.limits = ContextLimits(threads=1000, room=self.room)

    def room(self) -> int:
        return self.cap - self.used - self.limits.extra_bytes()


def test_defaults_take_nothing_and_raised_limits_take_what_cuda_reserves() -> None:
    slot = Slot(64 * MiB)
    assert slot.limits.extra_bytes() == 0
    assert {name: slot.limits.get(name) for name in LIMITS} == {
        name: limit.default for name, limit in LIMITS.items()}
    slot.limits.check_set("STACK_SIZE", 2048)
    slot.limits.set("STACK_SIZE", 2048)
    slot.limits.set("MALLOC_HEAP_SIZE", 10 * MiB)
    assert slot.limits.extra_bytes() == 1024 * 1000 + 2 * MiB
    slot.limits.set("MALLOC_HEAP_SIZE", 1 * MiB)  # below the default gives nothing back
    assert slot.limits.extra_bytes() == 1024 * 1000


def test_a_value_past_the_slot_is_memory_error_and_changes_nothing() -> None:
    slot = Slot(64 * MiB, used=60 * MiB)
    with pytest.raises(AgentError) as refused:
        slot.limits.check_set("PRINTF_FIFO_SIZE", 6 * MiB)  # 5 MiB more, 4 free
    assert refused.value.kind == "MemoryError"
    assert "Context.set_limit(PRINTF_FIFO_SIZE, 6291456)" in str(refused.value)
    assert "4.0 MiB of this GPU slot is free" in str(refused.value)
    assert slot.limits.get("PRINTF_FIFO_SIZE") == 1 * MiB
    slot.limits.check_set("PRINTF_FIFO_SIZE", 5 * MiB)  # 4 more: fits exactly


def test_limits_the_agent_cannot_count_or_does_not_know_are_refused() -> None:
    slot = Slot(64 * MiB)
    slot.limits.check_set("DEV_RUNTIME_SYNC_DEPTH", 2)
    with pytest.raises(AgentError, match="refused by this GPU agent") as refused:
        slot.limits.check_set("DEV_RUNTIME_SYNC_DEPTH", 3)
    assert refused.value.kind == "LogicError"
    with pytest.raises(AgentError, match="unknown limit 'PERSISTING_L2_CACHE_SIZE'"):
        slot.limits.check_set("PERSISTING_L2_CACHE_SIZE", 1)
    with pytest.raises(AgentError, match="unknown limit") as unknown:
        slot.limits.get("x" * 100_000)
    assert len(str(unknown.value)) < 300  # a hostile name is not echoed whole


def test_scratch_counts_while_held_and_is_refused_without_room() -> None:
    slot = Slot(64 * MiB, used=40 * MiB)
    with slot.limits.scratch(20 * MiB, "setting up a generator"):
        assert slot.limits.extra_bytes() == 20 * MiB
        with pytest.raises(AgentError, match=r"setting up another needs 8\.0 MiB more device "
                                             r"memory, 4\.0 MiB of this GPU slot is free"):
            with slot.limits.scratch(8 * MiB, "setting up another"):
                pass
    assert slot.limits.extra_bytes() == 0
    with pytest.raises(RuntimeError), slot.limits.scratch(24 * MiB, "x"):
        raise RuntimeError("the operation failed")
    assert slot.limits.extra_bytes() == 0  # given back whatever happened


def test_stack_scratch_is_the_raise_for_every_resident_thread() -> None:
    slot = Slot(64 * MiB)
    assert slot.limits.stack_scratch(16384) == (16384 - 1024) * 1000
    slot.limits.set("STACK_SIZE", 32768)
    assert slot.limits.stack_scratch(16384) == 0
