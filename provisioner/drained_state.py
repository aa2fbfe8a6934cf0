"""Where a kernel's parked state goes when the agent that holds it drains (gpu_agent/drain.py).

A draining agent ends the kernel's lease (reason ``draining``), parks its session and offers the
state to the other agents of its pool; one takes it, or none does and the state goes when the
agent exits. ``DrainedState`` follows that for the keeper, so that ``%harp status`` and the
sidebar say what happened without waiting for the kernel's next GPU call: it asks the draining
agent every ``FOLLOW_S`` whether it still holds the state; once it does not (or no longer
answers) it asks the pool's other agents, and the state is parked where one of them lists it, or
lost, with the reason and what to do, when the draining agent is gone and none lists it.

A kernel whose state was already parked there without a lease (released, or idle) hears of no
drain: ``watch`` asks that agent every ``lease_ttl / 3`` s, follows it once it drains, and
concludes the same way once it no longer answers.

The kernel's next acquire asks ``gone()``: a grant made after such a loss carries the reason, so
that the kernel's cell says what happened instead of trying to fetch the state from nowhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from provisioner.clock import Clock
from provisioner.control import ControlError
from provisioner.keeper_config import AgentsSource, KeeperConfig
from provisioner.lease_client import AgentUnreachable, LeaseClient, LeaseRefused
from provisioner.lease_record import KeeperState, LeaseRecord
from provisioner.selection import is_draining, where_parked

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
        #: agent -> why the kernel's state parked there is known lost
        self._lost_at: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def follow(self, agent: str) -> None:
        """``agent`` ended the lease while draining, the kernel's state parked there."""
        self._drained.add(agent)
        self.stop()
        self._task = asyncio.ensure_future(self._logged(self._follow(agent)))

    def watch(self, agent: str) -> None:
        """The kernel's state is parked on ``agent`` and it holds no lease there (released, or
        idle): nothing would tell it of a drain, so ask ``agent`` every ``lease_ttl / 3`` s;
        once it says it drains, follow it; once it no longer answers, conclude at once."""
        self.stop()
        self._task = asyncio.ensure_future(self._logged(self._watch(agent)))

    async def _logged(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not pass unseen (the next acquire finds out anyway)
            log.exception("following the parked state of kernel %s failed",
                          self._config.kernel_id)

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def gone(self, parked_at: str | None, statuses: dict[str, dict[str, Any]]) -> str | None:
        """At acquire: why the parked state is lost, when the agent that held it drained (or was
        found gone), no longer answers, and no agent that answers lists the state
        (``statuses``); else None."""
        if parked_at is None or parked_at in statuses:
            return None
        why = self._lost_at.pop(parked_at, None)
        if why is None and parked_at in self._drained:
            why = drained_reason(parked_at)
        self._drained.discard(parked_at)
        return why

    def _still_parked_at(self, agent: str) -> bool:
        return self._record.state == KeeperState.PARKED and self._record.parked_at == agent

    async def _watch(self, agent: str) -> None:
        while self._still_parked_at(agent):
            await self._clock.sleep(self._config.lease_ttl / 3)
            if not self._still_parked_at(agent):
                return
            status = await self._status(agent)
            if status is None:
                await self._conclude(agent, gone=True, drained=False)
                return
            if is_draining(status):
                self._drained.add(agent)
                await self._follow(agent)
                return

    async def _follow(self, agent: str) -> None:
        while self._still_parked_at(agent):
            await self._clock.sleep(FOLLOW_S)
            if not self._still_parked_at(agent):
                return
            status = await self._status(agent)
            if status is not None and where_parked({agent: status}, self._config.kernel_id,
                                                   None):
                continue  # still there (being offered, or kept for fetches until its grace)
            if await self._conclude(agent, gone=status is None, drained=True):
                return
            # it answers and lists it no more, and nobody lists it yet: on its way; ask again

    async def _status(self, agent: str) -> dict[str, Any] | None:
        """``agent``'s status for this kernel; None when it does not answer (it exited)."""
        c = self._config
        while True:
            try:
                return await self._client.status(agent, c.status_timeout)
            except AgentUnreachable:
                return None
            except LeaseRefused as e:  # it answers: ask again
                log.debug("kernel %s: status of %s: %s", c.kernel_id, agent, e)
                await self._clock.sleep(FOLLOW_S)

    async def _conclude(self, agent: str, *, gone: bool, drained: bool) -> bool:
        """``agent`` no longer lists the kernel's parked state (``gone``: it no longer answers):
        parked where another agent lists it, else lost when ``agent`` is gone. False when
        nothing can be said yet (it answers, and no other agent lists the state yet)."""
        elsewhere = await self._listed_elsewhere(agent)
        if not self._still_parked_at(agent):
            return True
        if elsewhere is not None:
            self._record.parked_at = elsewhere
            self._record.set(KeeperState.PARKED, (
                f"The GPU agent at {agent} shut down (a drain) and handed your parked device "
                f"memory to {elsewhere}: the next GPU call restores it there" if drained else
                f"Your parked device memory is on {elsewhere} (the GPU agent at {agent} no "
                "longer has it): the next GPU call restores it there"))
            return True
        if gone:
            self._lost(agent, drained_reason(agent) if drained else (
                f"the GPU agent at {agent} that held your parked GPU state no longer answers "
                "(it shut down or restarted) and no other agent of the pool lists that state"))
            return True
        return False

    async def _listed_elsewhere(self, agent: str) -> str | None:
        try:
            agents = [a for a in await self._agents() if a != agent]
        except ControlError:
            return None
        statuses = await self._client.statuses(agents, self._config.status_timeout)
        return where_parked(statuses, self._config.kernel_id, None)

    def _lost(self, agent: str, why: str) -> None:
        self._lost_at[agent] = why
        log.warning("kernel %s: %s", self._config.kernel_id, why)
        self._record.parked_at = None
        self._record.parked_bytes = 0
        self._record.set(KeeperState.LOST, (
            f"GPU state lost: {why}, so its device arrays are gone. Your variables are intact: "
            "the next GPU cell leases a GPU and starts a fresh session; re-run the cells that "
            "create your device arrays"))
