"""A fake clock and a fake pool of agents for the lease keeper's unit tests.

``FakeClock`` is the keeper's one clock: ``sleep`` waits until ``run`` advances the time to it, so
a contention history of minutes runs in milliseconds and the same seed gives the same history.
``FakePool`` holds one ``gpu_agent.leases.LeaseTable`` per agent (the agent's own lease logic,
pure) and hands each kernel a ``FakeLeaseClient`` with LeaseClient's methods, pushes included.
The agents reclaim as the real one does: while someone waits and no slot is free, a holder whose
kernel has had no GPU work for its ``reclaim_after`` is revoked with reason "reclaimed".
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Coroutine
from typing import Any

from gpu_agent.leases import Lease, LeaseError, LeaseState, LeaseTable
from provisioner.clock import within
from provisioner.lease_client import LeaseRefused

#: how many times the loop turns before the fake time moves on: enough for every chain of
#: awaits the keeper starts to run to its next sleep
SETTLE_TURNS = 60


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.t = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + max(seconds, 0.0), next(self._seq), future))
        await future

    async def run(self, main: Coroutine[Any, Any, Any], limit_s: float) -> Any:
        """Run ``main`` to its end, moving the time to the next sleeper whenever everything
        else waits; AssertionError past ``limit_s`` of fake time."""
        task = asyncio.ensure_future(main)
        end = self.t + limit_s
        while True:
            for _ in range(SETTLE_TURNS):
                await asyncio.sleep(0)
            if task.done():
                return task.result()
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)  # cancelled
            if not self._sleepers:
                task.cancel()
                raise AssertionError("everything waits and no time can pass: a deadlock")
            at, _, future = heapq.heappop(self._sleepers)
            if at > end:
                task.cancel()
                raise AssertionError(f"not done within {limit_s} s of fake time")
            self.t = max(self.t, at)
            future.set_result(None)


class Activity:
    """What a fake kernel's session does on the GPU, as its agent sees it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.busy = False
        self.last_work_end = clock.now()

    def session(self) -> dict[str, Any]:
        idle = 0.0 if self.busy else self.clock.now() - self.last_work_end
        return {"id": "s", "state": "active", "busy": self.busy, "idle_s": idle,
                "device_bytes": 2 << 20}


class FakeAgent:
    def __init__(self, endpoint: str, clock: FakeClock, slots: int = 1) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.table = LeaseTable(30.0, clock.now, slots=slots)
        self.activity: dict[str, Activity] = {}  # kernel id -> its session's activity
        self.clients: dict[str, FakeLeaseClient] = {}  # lease id -> the client holding it
        self.reclaimed = 0
        self._told: dict[str, int] = {}  # lease id -> the queue position last pushed

    def status(self) -> dict[str, Any]:
        holders = [{"kernel_id": h.kernel_id, "lease_id": h.lease_id} for h in
                   self.table.holders]
        return {"device": {"name": "fake", "total_memory": 1 << 30}, "emulated": True,
                "leases": {"slots": self.table.slots, "free_slots": self.table.free_slots,
                           "holders": holders,
                           "holder": holders[0] if holders and self.table.slots == 1 else None,
                           "queue": [{"position": i + 1, "kernel_id": q.kernel_id}
                                     for i, q in enumerate(self.table.queue)],
                           "parked": []}}

    def info(self, lease: Lease) -> dict[str, Any]:
        activity = self.activity.get(lease.kernel_id)
        held = lease.state is LeaseState.HELD
        return {"id": lease.lease_id, "state": lease.state.value, "kernel_id": lease.kernel_id,
                "position": self.table.position(lease.lease_id) if lease.active else None,
                "agent": self.endpoint, "ttl": lease.ttl, "reason": lease.reason or None,
                "session": activity.session() if held and activity is not None else None}

    def settle(self, changed: list[Lease]) -> None:
        """Grant what came free and push every change to its holder (a queued lease: when its
        position moved), as the agent does."""
        changed = [*changed, *self.table.promote()]
        for lease in self.table.queue:
            if self._told.get(lease.lease_id) != self.table.position(lease.lease_id):
                changed.append(lease)
        for lease in changed:
            if lease.active:
                self._told[lease.lease_id] = self.table.position(lease.lease_id)
            client = self.clients.get(lease.lease_id)
            if client is not None:
                client.push(self.endpoint, self.info(lease))

    def reclaim(self) -> None:
        if not self.table.queue or self.table.free_slots:
            return
        for lease in self.table.holders:
            activity = self.activity.get(lease.kernel_id)
            after = float(lease.info.get("reclaim_after", 3.0))
            if activity is not None and activity.session()["idle_s"] >= after and \
                    not activity.busy:
                self.reclaimed += 1
                self.settle(self.table.revoke(lease.lease_id, "reclaimed"))
                return

    async def run(self) -> None:
        """The agent's tick: expiry and reclaim."""
        while True:
            await self.clock.sleep(0.05)
            self.settle(self.table.expire())
            self.reclaim()


class FakePool:
    def __init__(self, clock: FakeClock, agents: int, slots: int = 1) -> None:
        self.clock = clock
        self.agents = {f"tcp://agent-{i}:1": FakeAgent(f"tcp://agent-{i}:1", clock, slots)
                       for i in range(agents)}
        self.moves = 0  # queued leases given up for another agent's held one

    def client(self, activity: Activity, kernel_id: str) -> FakeLeaseClient:
        for agent in self.agents.values():
            agent.activity[kernel_id] = activity
        return FakeLeaseClient(self)


class FakeLeaseClient:
    """LeaseClient's methods over a FakePool."""

    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self.on_push: Callable[[str, dict[str, Any]], None] | None = None
        self._pushes: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    def push(self, endpoint: str, lease: dict[str, Any]) -> None:
        self._pushes.setdefault(lease["id"], asyncio.Queue()).put_nowait(lease)
        if self.on_push is not None:
            self.on_push(endpoint, lease)

    def _agent(self, endpoint: str) -> FakeAgent:
        return self.pool.agents[endpoint]

    async def status(self, endpoint: str, timeout: float | None = None) -> dict[str, Any]:
        await asyncio.sleep(0)
        return self._agent(endpoint).status()

    async def statuses(self, endpoints: list[str], timeout: float | None = None
                       ) -> dict[str, dict[str, Any]]:
        await asyncio.sleep(0)
        return {e: self._agent(e).status() for e in endpoints}

    async def request(self, endpoint: str, kernel_id: str, kernel_secret: str, user: str = "",
                      *, ttl: float | None = None, info: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        await asyncio.sleep(0)
        agent = self._agent(endpoint)
        changed = agent.table.request(kernel_id, user, info, ttl)
        lease = changed[0]
        agent.clients[lease.lease_id] = self
        reply = {**agent.info(lease), "token": lease.token}
        agent.settle(changed[1:])
        return reply

    async def renew(self, endpoint: str, lease_id: str, token: str) -> dict[str, Any]:
        await asyncio.sleep(0)
        agent = self._agent(endpoint)
        try:
            return agent.info(agent.table.renew(lease_id, token))
        except LeaseError as e:
            raise LeaseRefused("LeaseError", str(e)) from None

    async def release(self, endpoint: str, lease_id: str, token: str) -> dict[str, Any]:
        await asyncio.sleep(0)
        agent = self._agent(endpoint)
        lease = agent.table.get(lease_id)
        if lease is not None and lease.state is LeaseState.QUEUED:
            self.pool.moves += 1  # the keeper only gives a queued lease up for a better one
        try:
            changed = agent.table.release(lease_id, token)
        except LeaseError as e:
            raise LeaseRefused("LeaseError", str(e)) from None
        agent.settle(changed)
        return agent.info(changed[0])

    async def parked_bytes(self, endpoint: str, kernel_id: str, kernel_secret: str,
                           timeout: float | None = None) -> int | None:
        await asyncio.sleep(0)
        activity = self._agent(endpoint).activity.get(kernel_id)
        return activity.session()["device_bytes"] if activity is not None else None

    async def drop_parked(self, endpoint: str, kernel_id: str,
                          kernel_secret: str) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"t": "dropped", "sessions": 0, "bytes": 0}

    async def wait_change(self, endpoint: str, lease: dict[str, Any],
                          timeout: float | None = None) -> dict[str, Any]:
        queue = self._pushes.setdefault(str(lease["id"]), asyncio.Queue())
        try:
            return await within(self.pool.clock, queue.get(), timeout or lease["ttl"] / 3)
        except TimeoutError:
            renewed = await self.renew(endpoint, lease["id"], lease["token"])
            return {**renewed, "token": lease["token"]}
