"""Where a kernel's parked state goes when the agent that holds it drains (gpu_agent/drain.py).

A draining agent ends the kernel's lease (reason ``draining``), parks its session and offers the
state to the other agents of its pool; one takes it, or none does and the state goes when the
agent exits. ``DrainedState`` follows that for the keeper, so that ``%harp status`` and the
sidebar say what happened without waiting for the kernel's next GPU call: it asks the draining
agent every ``FOLLOW_S`` whether it still holds the state; once it does not (or no longer
answers) it asks the pool's other agents, and the state is parked where one of them lists it, or
lost, with the reason and what to do, when the draining agent is gone and none lists it.

The kernel's next acquire asks ``gone()``: a grant made after such a loss carries the reason, so
that the kernel's cell says what happened instead of trying to fetch the state from nowhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from provisioner.clock import Clock
from provisioner.control import ControlError
from provisioner.keeper_config import AgentsSource, KeeperConfig
from provisioner.lease_client import AgentUnreachable, LeaseClient, LeaseRefused
from provisioner.lease_record import KeeperState, LeaseRecord
from provisioner.selection import where_parked

log = logging.getLogger("harp.provisioner.keeper")

#: how often a draining agent is asked whether it still holds the kernel's parked state
FOLLOW_S = 1.0


def drained_reason(agent: str) -> str:
    """Why a kernel's parked state is gone after ``agent`` drained (said once, in its cell)."""
    return (f"the GPU agent at {agent} shut down (a drain, SIGTERM) and no other agent of its "
            "pool took your parked GPU state")


def lost_note(why: str) -> str:
    """What the kernel is told with the grant after such a loss (and the keeper shows while it
    leases): ``why`` and what follows."""
    return f"{why}, so that state is gone; the next GPU call starts a fresh session"


class DrainedState:
    """See the module docstring."""

    def __init__(self, config: KeeperConfig, client: LeaseClient, agents: AgentsSource,
                 clock: Clock, record: LeaseRecord) -> None:
        self._config = config
        self._client = client
        self._agents = agents
        self._clock = clock
        self._record = record
        #: agents that ended this kernel's lease because they were shutting down
        self._drained: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def follow(self, agent: str) -> None:
        """``agent`` ended the lease while draining, the kernel's state parked there."""
        self._drained.add(agent)
        self.stop()
        self._task = asyncio.ensure_future(self._follow(agent))

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def gone(self, parked_at: str | None, statuses: dict[str, dict[str, Any]]) -> str | None:
        """At acquire: why the parked state is lost, when the agent that held it drained, no
        longer answers, and no agent that answers lists the state (``statuses``); else None."""
        if parked_at is None or parked_at not in self._drained or parked_at in statuses:
            return None
        self._drained.discard(parked_at)
        return drained_reason(parked_at)

    def _still_parked_at(self, agent: str) -> bool:
        return self._record.state == KeeperState.PARKED and self._record.parked_at == agent

    async def _follow(self, agent: str) -> None:
        c = self._config
        while self._still_parked_at(agent):
            await self._clock.sleep(FOLLOW_S)
            if not self._still_parked_at(agent):
                return
            try:
                status: dict[str, Any] | None = await self._client.status(agent,
                                                                           c.status_timeout)
            except AgentUnreachable:
                status = None  # exited: the state moved, or went with it
            except LeaseRefused as e:  # it answers: ask again
                log.debug("kernel %s: status of draining %s: %s", c.kernel_id, agent, e)
                continue
            if status is not None and where_parked({agent: status}, c.kernel_id, None):
                continue  # still there (being offered, or kept for fetches until its grace)
            elsewhere = await self._listed_elsewhere(agent)
            if not self._still_parked_at(agent):
                return
            if elsewhere is not None:
                self._record.parked_at = elsewhere
                self._record.set(KeeperState.PARKED, (
                    f"The GPU agent at {agent} shut down (a drain) and handed your parked device "
                    f"memory to {elsewhere}: the next GPU call restores it there"))
                return
            if status is None:
                self._lost(agent)
                return
            # it answers and lists it no more, and nobody lists it yet: on its way; ask again

    async def _listed_elsewhere(self, agent: str) -> str | None:
        try:
            agents = [a for a in await self._agents() if a != agent]
        except ControlError:
            return None
        statuses = await self._client.statuses(agents, self._config.status_timeout)
        return where_parked(statuses, self._config.kernel_id, None)

    def _lost(self, agent: str) -> None:
        why = drained_reason(agent)
        log.warning("kernel %s: %s", self._config.kernel_id, why)
        self._record.parked_at = None
        self._record.parked_bytes = 0
        self._record.set(KeeperState.LOST, (
            f"GPU state lost: {why}, so its device arrays are gone. Your variables are intact: "
            "the next GPU cell leases a GPU and starts a fresh session; re-run the cells that "
            "create your device arrays"))
