"""LeaseKeeper: its record (the idle countdown, the lease state dict, the messages), pushes from
the agent, and whole contention histories over a fake pool on a fake clock: queueing, moves
between agents, idle release, reclaim by the agent, the acquire timeout, never two holders and
nobody starving."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from provisioner.control import ControlError
from provisioner.keeper import LeaseKeeper, grant
from provisioner.keeper_config import KeeperConfig
from provisioner.lease_record import (
    HeldLease,
    KeeperState,
    ParkReason,
    idle_left,
    released_message,
)
from tests.unit.fake_pool import Activity, FakeClock, FakePool

AGENT = "tcp://127.0.0.1:5555"


class FakeKernel:
    """The keeper's KernelLink: parks unless busy, notes when its lease ended."""

    def __init__(self, activity: Activity | None = None) -> None:
        self.activity = activity
        self.agent: str | None = None
        self.asked: list[str] = []
        self.ended: list[tuple[str, str]] = []

    async def ask_park(self, reason: ParkReason) -> dict[str, Any]:
        self.asked.append(str(reason))
        if self.activity is not None and self.activity.busy:
            return {"t": "busy"}
        return {"t": "parked", "session": "s", "agent": self.agent, "bytes": 2 << 20}

    def lease_ended(self, reason: ParkReason, message: str, lease_id: str) -> None:
        self.ended.append((str(reason), message))


def keeper(clock: FakeClock | None = None, kernel: FakeKernel | None = None,
           **config: Any) -> LeaseKeeper:
    async def agents() -> list[str]:
        return [AGENT]

    return LeaseKeeper(KeeperConfig("kernel-1", "secret", **config), None,  # type: ignore[arg-type]
                       agents, kernel or FakeKernel(), clock=clock or FakeClock(1000.0))


def hold(k: LeaseKeeper, granted_at: float, session: dict[str, Any] | None = None) -> None:
    k.record.lease = HeldLease(AGENT, "lease-1", "token-1", 30.0, granted_at)
    k.record.state = KeeperState.HELD
    k.record.note_session(session)


# {{{ idle_left


def test_idle_countdown_from_the_session_report() -> None:
    session = {"state": "active", "idle_s": 10.0, "busy": False}
    assert idle_left(60, session, seconds_since_report=5, seconds_held=100) == 45


def test_busy_session_never_counts_down() -> None:
    session = {"state": "active", "idle_s": 500.0, "busy": True}
    assert idle_left(60, session, seconds_since_report=100, seconds_held=1000) == 60


def test_never_idle_longer_than_held() -> None:
    # a session parked an hour ago and restored right now reports a large idle_s
    session = {"state": "active", "idle_s": 3600.0, "busy": False}
    assert idle_left(60, session, seconds_since_report=0, seconds_held=2) == 58


def test_parked_or_missing_session_counts_from_the_grant() -> None:
    assert idle_left(60, None, seconds_since_report=0, seconds_held=20) == 40
    parked = {"state": "parked", "idle_s": 0.0, "busy": False}
    assert idle_left(60, parked, seconds_since_report=0, seconds_held=70) == 0


@pytest.mark.parametrize("timeout", [0, -1])
def test_zero_idle_timeout_means_never(timeout: float) -> None:
    assert idle_left(timeout, None, seconds_since_report=0, seconds_held=1e9) is None


# }}}

# {{{ the record


def test_lease_state_has_every_documented_key() -> None:
    state = keeper(reclaim_after=2.5).lease_state()
    assert set(state) == {"state", "agent", "gpu", "emulated", "memory_used",
                          "memory_allocated", "memory_total", "held_since", "held_s",
                          "idle_timeout", "idle_left_s", "reclaim_after", "position",
                          "gpu_seconds", "parked_bytes", "parked_reason", "kernel_id",
                          "message"}
    assert state["state"] == "none" and state["kernel_id"] == "kernel-1"
    assert state["reclaim_after"] == 2.5


def test_the_lease_request_carries_reclaim_after() -> None:
    config = KeeperConfig("k", "s", reclaim_after=1.5, info={"host": "h"})
    assert config.lease_info() == {"host": "h", "reclaim_after": 1.5}


def test_gpu_seconds_add_up_over_leases_and_each_change_is_told_once() -> None:
    clock = FakeClock(1000.0)
    told: list[tuple[str, str, int | None, float]] = []
    k = keeper(clock)
    record = k.record
    record.on_change = lambda c: told.append((c["previous"], c["state"], c["position"],
                                              c["gpu_seconds"]))
    record.set(KeeperState.ACQUIRING, "")
    record.position = 2
    record.set(KeeperState.QUEUED, "position 2")
    record.set(KeeperState.QUEUED, "position 2")  # nothing changed: not told again
    record.position = 1
    record.set(KeeperState.QUEUED, "position 1")
    record.set(KeeperState.HELD, "")
    clock.t += 30
    record.set(KeeperState.PARKING, "")
    record.set(KeeperState.PARKED, "")
    clock.t += 100  # parked time is not GPU time
    record.set(KeeperState.ACQUIRING, "")
    record.set(KeeperState.HELD, "")
    clock.t += 5
    assert k.lease_state()["gpu_seconds"] == 35
    assert told == [("none", "acquiring", None, 0), ("acquiring", "queued", 2, 0),
                    ("queued", "queued", 1, 0), ("queued", "held", None, 0),
                    ("held", "parking", None, 30), ("parking", "parked", None, 30),
                    ("parked", "acquiring", None, 30), ("acquiring", "held", None, 30)]


def test_a_failing_listener_does_not_break_the_keeper() -> None:
    k = keeper()

    def broken(change: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    k.record.on_change = broken
    k.record.set(KeeperState.ACQUIRING, "")
    assert k.state == KeeperState.ACQUIRING


def test_lease_state_while_held() -> None:
    clock = FakeClock(1000.0)
    k = keeper(clock, idle_timeout=60)
    k.record.note_device({"device": {"name": "H100", "total_memory": 80}, "emulated": False,
                          "memory": {"total": 80, "used": 3}})
    hold(k, granted_at=990.0, session={"state": "active", "idle_s": 0.0, "busy": False,
                                       "device_bytes": 4 << 20})
    k.note_memory_allocated(1000)
    state = k.lease_state()
    assert state["state"] == "held" and state["agent"] == AGENT
    assert (state["gpu"], state["emulated"], state["memory_total"]) == ("H100", False, 80)
    assert state["memory_used"] == 4 << 20 and state["memory_allocated"] == 1000
    assert state["held_since"] == 990.0 and state["held_s"] == 10.0
    assert 0 < state["idle_left_s"] <= 60


def test_allocated_bytes_add_the_session_objects_only_the_agent_knows() -> None:
    """A model on "harp": the kernel's allocator has nothing, the agent holds its tensors."""
    k = keeper()
    hold(k, granted_at=990.0, session={"state": "active", "idle_s": 0.0, "busy": False,
                                       "device_bytes": (2 << 20) + 5000, "object_bytes": 5000})
    k.note_memory_allocated(1000)
    assert k.lease_state()["memory_allocated"] == 6000
    for garbage in (-1, "5000", None, 1.5, [1]):
        k.record.note_session({"state": "active", "object_bytes": garbage})
        assert k.lease_state()["memory_allocated"] == 1000, garbage


def test_lease_state_when_parked_names_the_agent_holding_the_state() -> None:
    k = keeper()
    hold(k, granted_at=990.0)
    k.record.note_parked({"session": "s1", "agent": "tcp://elsewhere:1", "bytes": 1024})
    k.record.lease = None
    k.record.set(KeeperState.PARKED, "released")
    state = k.lease_state()
    assert (state["state"], state["agent"]) == ("parked", "tcp://elsewhere:1")
    assert state["held_s"] is None and state["idle_left_s"] is None
    assert state["memory_allocated"] is None and state["parked_bytes"] == 1024


def test_park_answer_without_a_session_keeps_the_lease_agent() -> None:
    k = keeper()
    hold(k, granted_at=990.0)
    k.record.note_parked({"session": None, "agent": None, "bytes": 0})
    assert k.parked_at == AGENT


def test_queued_position_shows_only_while_queued() -> None:
    k = keeper()
    k.record.position = 3
    k.record.set(KeeperState.QUEUED, "position 3")
    assert k.lease_state()["position"] == 3
    k.record.set(KeeperState.HELD, "")
    assert k.lease_state()["position"] is None


def test_one_phrase_per_reason_a_lease_ended_parked() -> None:
    assert released_message(ParkReason.RELEASE, 60, AGENT) == (
        f"You released the GPU: device memory parked on {AGENT}")
    assert released_message(ParkReason.IDLE, 60, AGENT) == (
        f"Released after 60 s without GPU work: device memory parked on {AGENT}")
    assert released_message(ParkReason.IDLE, 2.5, AGENT).startswith("Released after 2.5 s ")
    assert released_message(ParkReason.RECLAIM, 60, AGENT) == (
        f"Released for a kernel waiting in the queue: device memory parked on {AGENT}")


# }}}

# {{{ pushes


def test_pushed_end_of_our_lease_means_parked_at_its_agent_and_the_kernel_is_told() -> None:
    kernel = FakeKernel()
    k = keeper(kernel=kernel)
    hold(k, granted_at=990.0)
    k.on_push(AGENT, {"id": "lease-1", "state": "expired"})
    assert k.lease is None and k.state == KeeperState.PARKED and k.parked_at == AGENT
    assert "expired" in k.record.message
    assert kernel.ended == [("ended", k.record.message)]
    assert k.lease_state()["parked_reason"] == "ended"


def test_a_reclaimed_lease_is_parked_with_its_reason() -> None:
    kernel = FakeKernel()
    k = keeper(kernel=kernel)
    hold(k, granted_at=990.0)
    k.on_push(AGENT, {"id": "lease-1", "state": "revoked", "reason": "reclaimed"})
    state = k.lease_state()
    assert (state["state"], state["parked_reason"]) == ("parked", "reclaim")
    assert state["message"] == released_message(ParkReason.RECLAIM, 60, AGENT)
    assert kernel.ended == [("reclaim", state["message"])]


def test_pushes_about_other_leases_or_live_states_change_nothing() -> None:
    kernel = FakeKernel()
    k = keeper(kernel=kernel)
    hold(k, granted_at=990.0)
    k.on_push(AGENT, {"id": "someone-else", "state": "revoked"})
    k.on_push(AGENT, {"id": "lease-1", "state": "held", "position": 0})
    assert k.lease is not None and k.state == KeeperState.HELD and kernel.ended == []


# }}}


def test_grant_names_the_agent_the_state_moves_from() -> None:
    k = keeper()
    hold(k, granted_at=990.0)
    assert grant(k.lease, "tcp://other:1") == {"t": "grant", "agent": AGENT,
                                               "lease": ["lease-1", "token-1"],
                                               "from": "tcp://other:1"}
    assert grant(k.lease, AGENT)["from"] is None and grant(k.lease, None)["from"] is None


# {{{ histories on a fake pool


class Notebook:
    """One kernel on the fake pool: its keeper, its session's activity, its kernel link."""

    def __init__(self, pool: FakePool, index: int, **config: Any) -> None:
        self.kernel_id = f"kernel-{index}"
        self.activity = Activity(pool.clock)
        self.kernel = FakeKernel(self.activity)
        client = pool.client(self.activity, self.kernel_id)
        endpoints = list(pool.agents)

        async def agents() -> list[str]:
            return endpoints

        self.keeper = LeaseKeeper(KeeperConfig(self.kernel_id, "secret", **config),
                                  client, agents, self.kernel,  # type: ignore[arg-type]
                                  clock=pool.clock)
        client.on_push = self.keeper.on_push
        self.waits: list[float] = []

    async def acquire(self) -> dict[str, Any]:
        asked = self.keeper.record._clock()
        grant = await self.keeper.acquire()
        self.waits.append(self.keeper.record._clock() - asked)
        self.kernel.agent = grant["agent"]
        return grant

    async def work(self, clock: FakeClock, seconds: float) -> None:
        self.activity.busy = True
        await clock.sleep(seconds)
        self.activity.busy = False
        self.activity.last_work_end = clock.now()


def check_holders(pool: FakePool, notebooks: list[Notebook]) -> None:
    """Never two holders of one slot: every keeper that believes it holds a GPU holds a lease
    its agent grants it, and no agent has more holders than slots."""
    for endpoint, agent in pool.agents.items():
        holding = [n for n in notebooks if n.keeper.record.holding
                   and n.keeper.lease is not None and n.keeper.lease.agent == endpoint]
        granted = {h.lease_id for h in agent.table.holders}
        assert len(granted) <= agent.table.slots
        for n in holding:
            assert n.keeper.lease is not None and n.keeper.lease.lease_id in granted, \
                (n.kernel_id, endpoint)


async def monitor(pool: FakePool, notebooks: list[Notebook], stop: asyncio.Event) -> None:
    while not stop.is_set():
        check_holders(pool, notebooks)
        await pool.clock.sleep(0.05)


def run_history(seed: int, notebooks_n: int, agents_n: int, cycles: int) -> tuple[
        FakePool, list[Notebook]]:
    rng = random.Random(seed)
    clock = FakeClock()
    pool = FakePool(clock, agents_n)
    notebooks = [Notebook(pool, i, idle_timeout=20.0, reclaim_after=3.0, lease_ttl=30.0)
                 for i in range(notebooks_n)]
    done: list[str] = []

    async def notebook(n: Notebook) -> None:
        await clock.sleep(rng.random() * 5)
        for _ in range(cycles):
            await n.acquire()
            await n.work(clock, rng.choice([0.2, 1.0, 4.0, 8.0]))
            choice = rng.random()
            if choice < 0.3:  # %harp release
                await n.keeper.release(ParkReason.RELEASE)
            await clock.sleep(rng.expovariate(1 / 6))  # thinking: idle or reclaim may park it
        await n.keeper.shutdown()
        done.append(n.kernel_id)

    async def history() -> None:
        stop = asyncio.Event()
        agents = [asyncio.ensure_future(a.run()) for a in pool.agents.values()]
        watch = asyncio.ensure_future(monitor(pool, notebooks, stop))
        try:
            await asyncio.gather(*(notebook(n) for n in notebooks))
        finally:
            stop.set()
            for task in [*agents, watch]:
                task.cancel()
        assert await asyncio.gather(watch, return_exceptions=True)

    asyncio.run(clock.run(history(), limit_s=3600))
    assert sorted(done) == sorted(n.kernel_id for n in notebooks)  # nobody starved
    return pool, notebooks


@pytest.mark.parametrize("seed", [int(os.environ.get("HARP_TEST_SEED", "11")), 12, 13])
def test_randomized_contention_over_a_pool_never_two_holders_and_nobody_starves(
        seed: int) -> None:
    pool, notebooks = run_history(seed, notebooks_n=6, agents_n=2, cycles=6)
    waits = [w for n in notebooks for w in n.waits]
    # a waiter is served once a holder has worked its burst (8 s at most) and idled 3 s, or
    # left; six notebooks on two GPUs: a few such turns at most
    assert max(waits) < 120, sorted(waits)[-5:]
    assert sum(a.reclaimed for a in pool.agents.values()) > 0  # idle holders were reclaimed
    assert all(n.keeper.state == KeeperState.NONE for n in notebooks)
    for agent in pool.agents.values():
        assert agent.table.holders == [] and agent.table.queue == []


def test_a_queued_kernel_moves_to_the_agent_that_comes_free() -> None:
    clock = FakeClock()
    pool = FakePool(clock, 2)
    first, second, third = (Notebook(pool, i) for i in range(3))

    async def history() -> None:
        held = {(await n.acquire())["agent"]: n for n in (first, second)}
        first.activity.busy = second.activity.busy = True  # long cells: nobody is reclaimed
        waiting = asyncio.ensure_future(third.acquire())
        await clock.sleep(1.0)
        assert third.keeper.state == KeeperState.QUEUED
        queued_at = third.keeper.lease.agent  # type: ignore[union-attr]
        other = next(a for a in held if a != queued_at)
        held[other].activity.busy = False
        await held[other].keeper.release(ParkReason.RELEASE)
        grant = await waiting
        assert grant["agent"] == other and pool.moves == 1
        assert pool.agents[queued_at].table.queue == []  # it left the queue it was in
        for n in (first, second, third):
            await n.keeper.shutdown()

    asyncio.run(clock.run(history(), limit_s=600))


def test_a_reclaimed_kernel_queues_like_anyone_else_and_gets_its_gpu_back() -> None:
    clock = FakeClock()
    pool = FakePool(clock, 1)
    first, second = (Notebook(pool, i, reclaim_after=3.0, idle_timeout=600) for i in range(2))

    async def history() -> None:
        ticking = asyncio.ensure_future(next(iter(pool.agents.values())).run())
        await first.acquire()
        await first.work(clock, 1.0)
        asked = clock.now()
        await second.acquire()  # queued, served once the first has idled 3 s
        assert 3.0 <= clock.now() - asked < 4.0
        assert first.keeper.state == KeeperState.PARKED
        assert first.keeper.lease_state()["parked_reason"] == "reclaim"
        assert [reason for reason, _ in first.kernel.ended] == ["reclaim"]
        second.activity.busy = True  # a long cell: never interrupted
        back = asyncio.ensure_future(first.acquire())
        await clock.sleep(60)
        assert not back.done() and first.keeper.state == KeeperState.QUEUED
        second.activity.busy = False
        second.activity.last_work_end = clock.now()
        await back
        assert first.keeper.state == KeeperState.HELD
        assert second.keeper.state == KeeperState.PARKED
        for n in (first, second):
            await n.keeper.shutdown()
        ticking.cancel()

    asyncio.run(clock.run(history(), limit_s=600))


def test_without_waiters_only_the_idle_timeout_parks() -> None:
    clock = FakeClock()
    pool = FakePool(clock, 1)
    alone = Notebook(pool, 0, reclaim_after=1.0, idle_timeout=10.0)

    async def history() -> None:
        ticking = asyncio.ensure_future(next(iter(pool.agents.values())).run())
        await alone.acquire()
        await clock.sleep(9.0)
        assert alone.keeper.state == KeeperState.HELD  # idle 9 s, nobody waits: kept
        await clock.sleep(2.0)
        assert alone.keeper.state == KeeperState.PARKED and alone.kernel.asked == ["idle"]
        assert alone.keeper.lease_state()["message"].startswith("Released after 10 s without")
        await alone.keeper.shutdown()
        ticking.cancel()

    asyncio.run(clock.run(history(), limit_s=600))


def test_a_queued_lease_pushed_often_is_still_renewed() -> None:
    clock = FakeClock()
    pool = FakePool(clock, 1)
    holder, waiter = Notebook(pool, 0), Notebook(pool, 1)
    agent = next(iter(pool.agents.values()))

    async def history() -> None:
        await holder.acquire()
        holder.activity.busy = True
        waiting = asyncio.ensure_future(waiter.acquire())
        await clock.sleep(1.0)
        queued = agent.table.queue[0]
        for _ in range(100):  # a push each second, as a busy queue moving would send
            agent.clients[queued.lease_id].push(agent.endpoint, agent.info(queued))
            await clock.sleep(1.0)
            agent.settle(agent.table.expire())
        assert not waiting.done() and queued.state.value == "queued"
        holder.activity.busy = False
        await holder.keeper.release(ParkReason.RELEASE)
        await waiting
        for n in (holder, waiter):
            await n.keeper.shutdown()

    asyncio.run(clock.run(history(), limit_s=600))


def test_acquire_timeout_gives_up_and_leaves_the_queue() -> None:
    clock = FakeClock()
    pool = FakePool(clock, 1)
    holder = Notebook(pool, 0)
    waiter = Notebook(pool, 1, acquire_timeout=5.0)

    async def history() -> None:
        await holder.acquire()
        holder.activity.busy = True
        asked = clock.now()
        with pytest.raises(ControlError) as failed:
            await waiter.acquire()
        assert failed.value.kind == "GPUUnavailable" and "within 5 s" in failed.value.msg
        assert clock.now() - asked == pytest.approx(5.0)
        assert waiter.keeper.state == KeeperState.NONE
        assert next(iter(pool.agents.values())).table.queue == []
        await holder.keeper.shutdown()

    asyncio.run(clock.run(history(), limit_s=600))


# }}}


# {{{ an agent that does not answer yet


class LateAgents:
    """The pool's lease client, with every agent silent until ``back_at`` (a restart)."""

    def __init__(self, client: Any, clock: FakeClock, back_at: float) -> None:
        self._client, self._clock, self._back_at = client, clock, back_at
        self.asked = 0
        self.unanswered: dict[str, str] = {}

    async def statuses(self, endpoints: list[str], timeout: float | None = None
                       ) -> dict[str, dict[str, Any]]:
        self.asked += 1
        if self._clock.now() < self._back_at:
            await self._clock.sleep(timeout or 0)
            self.unanswered = {e: f"{e} did not answer within {timeout:g} s" for e in endpoints}
            return {}
        self.unanswered = {}
        return await self._client.statuses(endpoints, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.mark.parametrize("acquire_timeout", [None, 60.0])
def test_acquire_keeps_asking_an_agent_that_does_not_answer_yet(
        acquire_timeout: float | None) -> None:
    clock = FakeClock()
    pool = FakePool(clock, 1)
    kernel = Notebook(pool, 0, acquire_timeout=acquire_timeout)
    late = LateAgents(kernel.keeper.client, clock, back_at=clock.now() + 20)
    kernel.keeper.client = kernel.keeper._acquisition._client = late  # type: ignore[assignment]
    told: list[dict[str, Any]] = []

    async def progress(message: dict[str, Any]) -> None:
        told.append(message)
        assert "waiting for a GPU agent to answer" in kernel.keeper.record.message

    async def history() -> None:
        grant = await kernel.keeper.acquire(None, progress)
        assert grant["agent"] in pool.agents
        assert late.asked > 2 and told and told[0]["state"] == "unreachable"
        await kernel.keeper.shutdown()

    asyncio.run(clock.run(history(), limit_s=600))


def test_acquire_gives_up_on_a_silent_pool_after_its_reach_timeout_and_says_why() -> None:
    clock = FakeClock()
    pool = FakePool(clock, 1)
    kernel = Notebook(pool, 0, reach_timeout=10.0)
    late = LateAgents(kernel.keeper.client, clock, back_at=clock.now() + 1e9)
    kernel.keeper.client = kernel.keeper._acquisition._client = late  # type: ignore[assignment]

    async def history() -> None:
        asked = clock.now()
        with pytest.raises(ControlError) as failed:
            await kernel.keeper.acquire()
        assert "is harp-agent running there?" in failed.value.msg
        assert "asked again for 10 s" in failed.value.msg
        assert clock.now() - asked >= 10.0 and late.asked > 2
        assert kernel.keeper.state == KeeperState.NONE

    asyncio.run(clock.run(history(), limit_s=600))


# }}}
