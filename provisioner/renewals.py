"""Renewals: the task that keeps a held lease alive and watches its idle countdown.

It renews every ``ttl / 3`` s (an agent expires a lease nobody renews: a dead server frees its GPU
that way), records what each renewal reports about the session (``idle_s``, ``busy``, device
bytes) and wakes early when the idle countdown runs out. What to do about what it finds (a lost
agent, an ended lease, an idle kernel) is the keeper's: it calls back ``RenewalOwner``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from provisioner.clock import Clock, within
from provisioner.lease_client import AgentUnreachable, LeaseClient, LeaseRefused
from provisioner.lease_record import HeldLease, KeeperState, LeaseRecord

log = logging.getLogger("harp.provisioner.keeper")

#: lease states after which the agent no longer knows the lease as ours
ENDED = ("released", "revoked", "expired")


class RenewalOwner(Protocol):
    """The keeper, as the renewals call it back (each on the keeper's loop)."""

    async def renewal_lost(self, lease: HeldLease, why: str) -> None:
        """The agent did not answer: it is gone, and the lease with it."""

    async def renewal_ended(self, lease: HeldLease, info: dict[str, object] | None,
                            why: str) -> None:
        """The agent no longer knows the lease (``info``: its final state, when it said)."""

    async def idle_due(self, lease: HeldLease) -> None:
        """The idle countdown ran out."""


class Renewals:
    def __init__(self, owner: RenewalOwner, client: LeaseClient, clock: Clock,
                 record: LeaseRecord, default_ttl: float) -> None:
        self._owner = owner
        self._client = client
        self._clock = clock
        self._record = record
        self._default_ttl = default_ttl
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        """The keeper, when a lease is held (granted, or taken over)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        """The keeper, when the lease ends; never cancels the task calling it."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def wake(self) -> None:
        """Re-plan now (the idle timeout changed)."""
        self._wake.set()

    async def _run(self) -> None:
        while (lease := self._record.lease) is not None:
            await self._sleep(self._next_tick(lease))
            lease = self._record.lease
            if lease is None:
                return
            if self._record.state != KeeperState.HELD:
                continue  # parking: the parker decides
            try:
                if not await self._renew(lease):
                    return
                left = self._record.idle_left_s()
                if left is not None and left <= 0:
                    await self._owner.idle_due(lease)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the renewals: the lease would just expire
                log.exception("renewing lease %s failed", lease.lease_id)

    async def _renew(self, lease: HeldLease) -> bool:
        """One renewal; False when the lease is gone (lost with its agent, or ended)."""
        try:
            info = await self._client.renew(lease.agent, lease.lease_id, lease.token)
        except AgentUnreachable as e:
            await self._owner.renewal_lost(lease, str(e))
            return False
        except LeaseRefused as e:
            await self._owner.renewal_ended(lease, None, e.msg)
            return False
        if self._record.lease is not lease:
            return False
        if info.get("state") in ENDED:  # the push saying so was lost
            await self._owner.renewal_ended(lease, info, f"the agent {info.get('state')} it")
            return False
        self._record.note_session(info.get("session"))
        return True

    async def refresh(self, max_age: float) -> None:
        """Renew now if the last session report is older than ``max_age`` s, so lease_state()
        shows current memory and idleness (the sidebar asks); failures are left to the loop,
        which renews again soon and handles them."""
        lease = self._record.lease
        if lease is None or self._record.state != KeeperState.HELD:
            return
        if self._record.session is not None and \
                self._clock.now() - self._record.reported_at < max_age:
            return
        try:
            info = await self._client.renew(lease.agent, lease.lease_id, lease.token)
        except (AgentUnreachable, LeaseRefused):
            return
        if self._record.lease is lease and info.get("state") not in ENDED:
            self._record.note_session(info.get("session"))

    def _next_tick(self, lease: HeldLease) -> float:
        every = (lease.ttl or self._default_ttl) / 3
        left = self._record.idle_left_s()
        return every if left is None else min(every, max(left, 0.2))

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await within(self._clock, self._wake.wait(), seconds)
        except TimeoutError:
            pass
