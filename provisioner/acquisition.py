"""PoolAcquisition: how a kernel's lease keeper gets a held lease somewhere in the agent pool.

It requests a lease where the kernel is served first (``selection.choose_agent``: its parked
agent when free, else a free agent, else the shortest queue), waits in that queue with the queue
position on the keeper's record, and while waiting looks every ``QUEUE_RECHECK_S`` whether
another agent of the pool has come free: then it leases there and gives the queued lease up.
Past ``acquire_timeout`` it gives up. Errors are ControlError, as the kernel is told them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from provisioner.clock import Clock
from provisioner.control import ControlError
from provisioner.keeper_config import AgentsSource, KeeperConfig, Progress
from provisioner.lease_client import AgentUnreachable, LeaseClient, LeaseRefused
from provisioner.lease_record import AGENT_DRAINING, HeldLease, KeeperState, LeaseRecord
from provisioner.renewals import ENDED
from provisioner.selection import choose_agent, is_draining, is_free, likely_agent

log = logging.getLogger("harp.provisioner.keeper")

#: while queued in a pool of several agents, how often the others are asked whether one is free
QUEUE_RECHECK_S = 2.0


class PoolAcquisition:
    """One of a keeper's helpers; ``provisioner.keeper.LeaseKeeper._acquire`` calls ``run``
    under the keeper's lock and handles what it raises."""

    def __init__(self, config: KeeperConfig, client: LeaseClient, agents: AgentsSource,
                 clock: Clock, record: LeaseRecord, agents_seen: set[str]) -> None:
        self._config = config
        self._client = client
        self._agents = agents
        self._clock = clock
        self._record = record
        #: every agent this kernel requested a lease from (its parked state can only be there)
        self._agents_seen = agents_seen

    async def reach_pool(self, progress: Progress | None
                         ) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """The pool's agents and the statuses of those that answer; while none does, ask again
        with backoff (saying what it waits for) up to ``reach_timeout`` (or the acquire
        timeout), then raise ControlError saying why."""
        c = self._config
        limit = c.acquire_timeout if c.acquire_timeout else c.reach_timeout
        deadline = self._clock.now() + limit
        pause = 0.25
        while True:
            agents = await self._agents()
            statuses = await self._client.statuses(agents, c.status_timeout)
            if statuses:
                return agents, statuses
            reasons = [why for why in self._client.unanswered.values()
                       if "did not answer within" not in why]
            where = ", ".join(agents) or "(none configured)"
            why = "; ".join(reasons) if reasons else (
                f"no GPU agent answered at {where}: is harp-agent running there? (HARP_AGENTS "
                "names the agents)")
            left = deadline - self._clock.now()
            if reasons or not agents or left <= 0:  # refused, or nothing to wait for
                raise ControlError("GPUUnavailable", why if reasons or not agents else
                                   f"{why} (asked again for {limit:g} s)")
            self._record.set(KeeperState.ACQUIRING, f"waiting for a GPU agent to answer at "
                                                    f"{where}")
            if progress is not None:
                await progress({"state": "unreachable", "agent": where, "position": None})
            await self._clock.sleep(min(pause, left))
            pause = min(pause * 2, 4.0)

    async def device_facts(self, preferred: str | None) -> dict[str, Any] | None:
        """The device_info of the agent a lease would most likely be served by (``preferred``:
        the held lease's or parked state's agent), from the agents' status: none is taken."""
        try:
            agents = await self._agents()
        except ControlError:
            return None
        statuses = await self._client.statuses(agents, self._config.status_timeout)
        if not statuses:
            return None
        device = statuses[likely_agent(statuses, preferred)].get("device")
        return device if isinstance(device, dict) else None

    async def run(self, agents: list[str], statuses: dict[str, dict[str, Any]],
                  parked_at: str | None, progress: Progress | None) -> dict[str, Any]:
        """The lease info once held (the record's ``lease`` is then that lease); raises
        ControlError when it ends otherwise."""
        agent = choose_agent(statuses, parked_at)
        reply = await self.request(agent)
        self._record.note_device(statuses[agent])
        self._record.lease = self._held(agent, reply)
        lease = await self._wait_in_queue(reply, progress, [a for a in agents if a != agent],
                                          parked_at)
        if lease.get("state") != "held":
            self._record.lease = None
            raise ControlError("LeaseError", f"the lease on {agent} was "
                                             f"{lease.get('state')} while waiting for it")
        return lease

    async def request(self, agent: str) -> dict[str, Any]:
        c = self._config
        self._agents_seen.add(agent)
        try:
            return await self._client.request(agent, c.kernel_id, c.kernel_secret, c.user,
                                              ttl=c.lease_ttl, info=c.lease_info())
        except LeaseRefused as e:
            raise ControlError(e.kind, f"the GPU agent at {agent} refused the lease: "
                                       f"{e.msg}") from None

    def _held(self, agent: str, reply: dict[str, Any]) -> HeldLease:
        return HeldLease(agent, reply["id"], reply["token"],
                         float(reply.get("ttl") or self._config.lease_ttl))

    async def _wait_in_queue(self, lease: dict[str, Any], progress: Progress | None,
                             others: list[str], parked_at: str | None) -> dict[str, Any]:
        """Wait until the queued lease is granted. With other agents in the pool, look every
        QUEUE_RECHECK_S for one that has come free and move there (the state follows)."""
        held = self._record.lease
        assert held is not None
        clock = self._clock
        timeout = self._config.acquire_timeout
        deadline = clock.now() + timeout if timeout else None
        told: int | None = None
        renewed = clock.now()
        while lease.get("state") == "queued":
            position = lease.get("position")
            self._record.position = position
            self._record.set(KeeperState.QUEUED, f"position {position} in the queue at "
                                                 f"{held.agent}")
            if progress is not None and position != told:
                told = position
                await progress({"state": "queued", "position": position, "agent": held.agent})
            wait = held.ttl / 3 if not others else min(held.ttl / 3, QUEUE_RECHECK_S)
            if deadline is not None:
                left = deadline - clock.now()
                if left <= 0:
                    raise ControlError("GPUUnavailable", (
                        f"no GPU was free within {timeout:g} s (HARP_ACQUIRE_TIMEOUT); still "
                        f"position {position} at {held.agent}"))
                wait = min(wait, left)
            try:
                waited_from = clock.now()
                lease = await self._client.wait_change(
                    held.agent, {"id": held.lease_id, "token": held.token, "ttl": held.ttl},
                    wait)
                if clock.now() - waited_from >= wait:
                    renewed = clock.now()  # no push came: wait_change renewed it
                elif lease.get("state") == "queued" and clock.now() - renewed >= held.ttl / 3:
                    # pushes of queue moves may come faster than the wait's renewal: a queued
                    # lease nobody renews expires all the same
                    lease = await self._client.renew(held.agent, held.lease_id, held.token)
                    renewed = clock.now()
            except LeaseRefused as e:
                raise ControlError(e.kind, f"the queued lease at {held.agent} ended: "
                                           f"{e.msg}") from None
            if lease.get("state") in ENDED and lease.get("reason") == AGENT_DRAINING:
                # the agent is shutting down and sent its queue away: queue elsewhere now
                moved = await self._queue_elsewhere(held.agent, others, parked_at)
                held, lease = moved
                others = [a for a in others if a != held.agent]
                renewed = clock.now()
                continue
            if lease.get("state") == "queued" and others:
                moved = await self._move_to_a_free_agent(others, parked_at)
                if moved is not None:
                    held, lease = moved
                    renewed = clock.now()
        self._record.position = None
        return lease

    async def _move_to_a_free_agent(self, others: list[str], parked_at: str | None
                                    ) -> tuple[HeldLease, dict[str, Any]] | None:
        """If another agent is free now, lease there and give up the queued lease; the new
        lease and its state, or None (nothing free, or it was taken first)."""
        statuses = await self._client.statuses(others, self._config.status_timeout)
        free = {e: s for e, s in statuses.items() if is_free(s)}
        if not free:
            return None
        agent = choose_agent(free, parked_at)
        try:
            reply = await self.request(agent)
        except (AgentUnreachable, ControlError) as e:
            log.debug("moving to %s: %s", agent, e)
            return None
        new = self._held(agent, reply)
        if reply.get("state") != "held":  # someone else got there first: stay where we were
            await self.release_at_agent(new)
            return None
        old, self._record.lease = self._record.lease, new
        if old is not None:
            await self.release_at_agent(old)
        self._record.note_device(statuses[agent])
        log.info("kernel %s: moved from the queue at %s to the free agent %s",
                 self._config.kernel_id, old.agent if old else "?", agent)
        return new, reply

    async def _queue_elsewhere(self, draining: str, others: list[str], parked_at: str | None
                               ) -> tuple[HeldLease, dict[str, Any]]:
        """A lease (held or queued) on another agent of the pool, for a kernel whose queued
        lease a draining agent revoked; ControlError when no other agent answers."""
        statuses = await self._client.statuses([a for a in others if a != draining],
                                               self._config.status_timeout)
        statuses = {e: s for e, s in statuses.items() if not is_draining(s)}
        if not statuses:
            raise ControlError("GPUUnavailable", f"the GPU agent at {draining} is shutting down "
                               "and no other agent of the pool answered: try again later")
        agent = choose_agent(statuses, parked_at)
        reply = await self.request(agent)
        self._record.lease = self._held(agent, reply)
        self._record.note_device(statuses[agent])
        log.info("kernel %s: %s is draining: queued again at %s", self._config.kernel_id,
                 draining, agent)
        return self._record.lease, reply

    async def drop_parked(self, agents: list[str]) -> None:
        """Drop this kernel's parked state on ``agents`` (the kernel is gone)."""
        await asyncio.gather(*(self._drop_parked_at(a) for a in agents))

    async def _drop_parked_at(self, agent: str) -> None:
        c = self._config
        try:
            await self._client.drop_parked(agent, c.kernel_id, c.kernel_secret)
        except (AgentUnreachable, LeaseRefused) as e:
            log.debug("drop_parked at %s: %s", agent, e)

    async def release_at_agent(self, lease: HeldLease, *, quietly: bool = True) -> None:
        try:
            await self._client.release(lease.agent, lease.lease_id, lease.token)
        except (AgentUnreachable, LeaseRefused) as e:
            # dead agent: nothing to release; ended lease: nothing either
            (log.debug if quietly else log.info)("release of %s at %s: %s", lease.lease_id,
                                                 lease.agent, e)
