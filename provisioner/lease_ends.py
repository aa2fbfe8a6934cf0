"""LeaseEnds: the agent ended a kernel's held lease on its own, and the kernel's keeper follows.

The agent ends a held lease by itself when it reclaims it for a waiting kernel, when it expires,
when it is revoked or released elsewhere, and when the agent drains (gpu_agent/drain.py); it
parks the kernel's session itself and pushes the lease's end (a lost push is found by the next
renewal). ``LeaseEnds`` records the end on the keeper's record (parked on that agent, and why),
tells the kernel (``KernelLink.lease_ended``) so that its next GPU call leases again and restores,
asks the agent how many bytes it parked, and after a drain follows where the state goes
(``DrainedState``). It runs on the keeper's loop; the keeper calls it under its lock.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from provisioner.clock import Clock
from provisioner.drained_state import DrainedState
from provisioner.keeper_config import AgentsSource, KeeperConfig, KernelLink
from provisioner.lease_client import AgentUnreachable, LeaseClient, LeaseRefused
from provisioner.lease_record import (
    AGENT_DRAINING,
    AGENT_RECLAIMED,
    HOLDING,
    HeldLease,
    KeeperState,
    LeaseRecord,
    ParkReason,
    released_message,
)
from provisioner.renewals import ENDED, Renewals

log = logging.getLogger("harp.provisioner.keeper")

#: how often the keeper asks an agent that parked its kernel's session whether it is done
PARKED_BYTES_POLL_S = 0.2


class LeaseEnds:
    """See the module docstring."""

    def __init__(self, config: KeeperConfig, client: LeaseClient, agents: AgentsSource,
                 clock: Clock, record: LeaseRecord, kernel: KernelLink,
                 renewals: Renewals) -> None:
        self._config = config
        self._client = client
        self._clock = clock
        self._record = record
        self._kernel = kernel
        self._renewals = renewals
        #: where the parked state goes when the agent holding it drains
        self.drains = DrainedState(config, client, agents, clock, record)
        #: asking the agent for the bytes it parked after it ended the lease itself
        self._learning: asyncio.Future[None] | None = None

    def on_push(self, endpoint: str, lease: dict[str, Any]) -> None:
        """A lease change the agent pushed; only the end of the held lease matters here (queue
        moves are awaited by the acquire itself)."""
        held = self._record.lease
        ended = lease.get("state")
        if held is None or lease.get("id") != held.lease_id or ended not in ENDED:
            return
        if self._record.state in HOLDING:
            if lease.get("reason") == AGENT_RECLAIMED:
                self.ended(held, ParkReason.RECLAIM, "")
            elif lease.get("reason") == AGENT_DRAINING:
                self.ended(held, ParkReason.ENDED, (
                    f"the GPU agent at {endpoint} is shutting down: it ended the lease once "
                    "the running GPU work finished, and its parked state moves to another agent "
                    "of the pool (the next GPU call restores it there)"))
                self.drains.follow(endpoint)
            else:
                self.ended(held, ParkReason.ENDED, f"the agent at {endpoint} {ended} the lease")

    def ended(self, lease: HeldLease, reason: ParkReason, why: str) -> None:
        """The agent ended our lease (reclaimed, expired, revoked): it parked the session."""
        record = self._record
        record.lease = None
        record.parked_at = lease.agent
        record.parked_reason = reason
        message = (f"{why}: device memory parked on {lease.agent}" if reason == ParkReason.ENDED
                   else released_message(reason, self._config.idle_timeout, lease.agent))
        record.parked_bytes = 0
        record.set(KeeperState.PARKED, message)
        self._renewals.stop()
        self._learning = asyncio.ensure_future(self._learn_parked_bytes(lease.agent))
        self.drains.watch(lease.agent)  # parked there without a lease (a drain follows it)
        try:
            self._kernel.lease_ended(reason, message, lease.lease_id)
        except Exception:  # the kernel finds out at its next call anyway
            log.exception("telling kernel %s its lease ended failed", self._config.kernel_id)

    async def _learn_parked_bytes(self, agent: str) -> None:
        """The agent parked the session itself: ask it, until the park is done (at most
        ``park_timeout``), how many bytes it holds parked for this kernel, for the lease state
        (``%harp status``, the sidebar) while the kernel stays parked there."""
        c, record = self._config, self._record
        deadline = self._clock.now() + c.park_timeout
        while record.state == KeeperState.PARKED and record.parked_at == agent:
            try:
                nbytes = await self._client.parked_bytes(agent, c.kernel_id, c.kernel_secret,
                                                         c.status_timeout)
            except (AgentUnreachable, LeaseRefused) as e:
                log.debug("parked bytes of kernel %s at %s: %s", c.kernel_id, agent, e)
                nbytes = None
            if nbytes is not None:
                if record.state == KeeperState.PARKED and record.parked_at == agent:
                    record.parked_bytes = nbytes
                    record.changed()
                return
            if self._clock.now() >= deadline:
                return
            await self._clock.sleep(PARKED_BYTES_POLL_S)

    def stop(self) -> None:
        """The keeper closes: stop asking the agents."""
        self.drains.stop()
        learning, self._learning = self._learning, None
        if learning is not None and learning is not asyncio.current_task():
            learning.cancel()
