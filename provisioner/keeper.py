"""LeaseKeeper: one kernel's GPU lease, from acquire to release (docs/leases-design.md).

The one implementation of lease keeping on the kernels' side. Its users give it a way to reach
the kernel (``keeper_config.KernelLink``) and a lease client:

* ``provisioner.kernel_lease.KernelLease`` (ElasticGPUProvisioner): the kernel is another process
  reached over its control socket;
* ``harp_jupyter.shim.lease.DirectLeaseSource`` (``harp run``, plain Python): the kernel is the
  session in the same process.

States (``KeeperState``, as the sidebar shows them)::

    none -> acquiring -> (queued ->) held -> parking -> parked -> acquiring ...
    any with a lease -> lost (the agent died); held -> parked (the agent ended the lease)

Acquiring asks every agent of the pool for its status and requests a lease where it is served
first (``selection.choose_agent``); while queued in a pool of several agents it looks every
``QUEUE_RECHECK_S`` for one that has come free and moves there; it gives up after
``acquire_timeout``. While held it renews every ``lease_ttl / 3`` s (the agent expires leases a
dead server stops renewing) and applies the idle policy with what each renewal reports (the
session's ``idle_s`` and ``busy``): idle past ``idle_timeout`` and not busy, the kernel is asked
to park (so no call of its can race the park) and the lease is released when it has; a kernel
that does not answer within ``park_timeout`` gets its lease released anyway (the agent parks the
session itself). The agent may end the lease first: reclaimed for a waiting kernel after
``reclaim_after`` s without GPU work (the agent knows idleness exactly; the keeper passes the
kernel's ``reclaim_after`` in the lease request), expired, revoked. The kernel is then told
(``KernelLink.lease_ended``) so that its next GPU call leases again and restores its state.

The keeper decides and holds the lock; its parts do one job each: ``PoolAcquisition`` finds the
pool and gets a held lease in it, ``Renewals`` keeps it alive and watches the idle countdown,
``LeaseEnds`` follows the agent's own end of it (and, after a drain, ``DrainedState`` where the
parked state went), and ``LeaseRecord`` holds the facts and the state the sidebar shows.

Every public coroutine runs on one event loop; an asyncio lock makes acquire, park and release
one at a time, so a kernel's acquire never slips between a park and the release that follows it.
All time comes from one injected ``Clock`` (tests run whole contention histories on a fake one).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from provisioner.acquisition import PoolAcquisition
from provisioner.clock import Clock, SystemClock, within
from provisioner.control import ControlError
from provisioner.drained_state import lost_note
from provisioner.keeper_config import AgentsSource, KeeperConfig, KernelLink, Progress
from provisioner.lease_client import AgentUnreachable, LeaseClient
from provisioner.lease_ends import LeaseEnds
from provisioner.lease_record import (
    HeldLease,
    KeeperState,
    LeaseRecord,
    OnChange,
    ParkReason,
    applied_reclaim_after,
    released_message,
)
from provisioner.renewals import Renewals
from provisioner.selection import where_parked

log = logging.getLogger("harp.provisioner.keeper")


class LeaseKeeper:
    def __init__(self, config: KeeperConfig, client: LeaseClient, agents: AgentsSource,
                 kernel: KernelLink, *, clock: Clock | None = None,
                 on_change: OnChange | None = None) -> None:
        self.config = config
        self.client = client
        if client is not None:  # its status requests prove the kernel (its parked state)
            client.kernel = (config.kernel_id, config.kernel_secret)
        self._kernel = kernel
        self._clock = clock or SystemClock()
        self.record = LeaseRecord(config.kernel_id, self._clock.now, self._settings, on_change)
        self._lock = asyncio.Lock()
        self._acquiring: asyncio.Task[Any] | None = None
        self.agents_seen: set[str] = set()
        self._acquisition = PoolAcquisition(config, client, agents, self._clock, self.record,
                                            self.agents_seen)
        self._renewals = Renewals(self, client, self._clock, self.record, config.lease_ttl)
        #: the agent's own end of the held lease (reclaim, expiry, drain)
        self._ends = LeaseEnds(config, client, agents, self._clock, self.record, kernel,
                               self._renewals)
        self.closed = False

    # {{{ what the owner reads

    @property
    def state(self) -> KeeperState:
        return self.record.state

    @property
    def lease(self) -> HeldLease | None:
        return self.record.lease

    @property
    def parked_at(self) -> str | None:
        return self.record.parked_at

    def lease_state(self) -> dict[str, Any]:
        return self.record.lease_state()

    def _settings(self) -> dict[str, float]:
        return {"idle_timeout": self.config.idle_timeout,
                "reclaim_after": self.config.reclaim_after}

    # }}}

    # {{{ what the kernel asks

    async def acquire(self, resume: dict[str, Any] | None = None,
                      progress: Progress | None = None,
                      refused: str | None = None) -> dict[str, Any]:
        """Lease a GPU (the kernel's first GPU call, the sidebar's Lease); returns the
        ``grant`` {agent, lease: [id, token], from}. ``resume`` = {session, resume_token, agent}
        of the kernel's parked session, if any; ``refused`` the id of a lease the agent refused
        the kernel's hello with (it ended before the kernel attached): dropped, not granted
        again. Raises ControlError."""
        async with self._lock:
            self._check_open()
            lease = self.lease
            if refused is not None and lease is not None and lease.lease_id == refused:
                parked_at = self.parked_at
                await self._drop_lease(quietly=True)
                self.record.parked_at = parked_at
            if self.record.holding and self.state == KeeperState.HELD:
                return grant(self.lease, None)
            parked_at = (resume or {}).get("agent") or self.parked_at
            self._acquiring = asyncio.current_task()
            try:
                return await self._acquire(parked_at if isinstance(parked_at, str) else None,
                                           progress)
            except asyncio.CancelledError:
                await self._drop_lease(quietly=True)
                raise
            finally:
                self._acquiring = None

    async def parked(self, info: dict[str, Any]) -> None:
        """The kernel parked its session on its own (``%harp release``): release the lease."""
        async with self._lock:
            lease = self.lease
            self.record.note_parked(info)
            await self._drop_lease()
            self.record.parked_reason = ParkReason.RELEASE
            self.record.set(KeeperState.PARKED, released_message(
                ParkReason.RELEASE, self.config.idle_timeout,
                self.parked_at or (lease.agent if lease else "the agent")))
            self._watch_parked()

    async def lost(self, reason: str) -> None:
        """The agent died under the kernel: forget the lease (released best effort, in case
        the agent lives and only the kernel's connection broke)."""
        async with self._lock:
            await self._drop_lease(quietly=True)
            self.record.parked_at = None
            self.record.set(KeeperState.LOST, f"GPU lost: {reason}")

    async def device_facts(self, parked_at: str | None) -> dict[str, Any] | None:
        """The device_info of the agent this kernel's next acquire would most likely get (its
        own lease's, else the pool's choice), from the agents' status: no lease is taken."""
        preferred = self.lease.agent if self.lease is not None else (parked_at or self.parked_at)
        return await self._acquisition.device_facts(preferred)

    def set_idle(self, seconds: float) -> None:
        """``%harp idle``: a new idle timeout, effective at once (call on the keeper's loop)."""
        self.config.idle_timeout = float(seconds)
        self._renewals.wake()

    def note_memory_allocated(self, nbytes: int | None) -> None:
        """The bytes the kernel's allocations cover, as it answered (KernelLease.refresh)."""
        if self.record.holding:
            self.record.memory_allocated = nbytes

    async def release(self, reason: ParkReason = ParkReason.RELEASE) -> bool:
        """Park the kernel's session and give the GPU back now (the sidebar's Release button).
        False when the kernel is busy and kept it."""
        async with self._lock:
            if self.lease is None or self.state != KeeperState.HELD:
                return False
            return await self._park(reason)

    def adopt(self, lease: HeldLease | None, parked_at: str | None = None,
              agents_seen: list[str] | None = None) -> None:
        """Take over a lease a previous server held for this kernel (load_provisioner_info):
        keep renewing it; if it ended meanwhile, the first renewal says so."""
        self.record.parked_at = parked_at
        self.agents_seen.update(agents_seen or ())
        if parked_at:
            self.agents_seen.add(parked_at)
        if lease is None:
            self.record.set(KeeperState.PARKED if parked_at else KeeperState.NONE, "")
            return
        self.record.lease = lease
        self.agents_seen.add(lease.agent)
        self.record.note_session(None)
        self.record.set(KeeperState.HELD, "taken over from a previous server")
        self._renewals.start()

    # }}}

    # {{{ acquire

    async def _acquire(self, parked_at: str | None, progress: Progress | None
                       ) -> dict[str, Any]:
        self.record.set(KeeperState.ACQUIRING, "")
        try:
            agents, statuses = await self._acquisition.reach_pool(progress)
            # the agents say where this kernel's parked state is (a draining agent hands it on)
            parked_at = where_parked(statuses, self.config.kernel_id, parked_at)
            gone = self._ends.drains.gone(parked_at, statuses)
            if gone is not None:
                parked_at = self.record.parked_at = None
                self.record.set(KeeperState.ACQUIRING, lost_note(gone))
            lease = await self._acquisition.run(agents, statuses, parked_at, progress)
        except AgentUnreachable as e:
            await self._failed(str(e))
            raise ControlError("GPUUnavailable", str(e)) from None
        except ControlError as e:
            await self._failed(e.msg)
            raise
        except Exception as e:  # e.g. a bad agent setting: the user's cell must say what
            await self._failed(str(e))
            raise ControlError("GPUUnavailable", f"cannot lease a GPU: {e}") from None
        assert self.lease is not None
        self.lease.granted_at = self._clock.now()
        self.lease.reclaim_after = applied_reclaim_after(lease)
        self.record.note_session(lease.get("session"))
        self.record.set(KeeperState.HELD, "")
        self._renewals.start()
        return grant(self.lease, parked_at, gone)

    async def _failed(self, message: str) -> None:
        await self._drop_lease(quietly=True)
        self.record.set(KeeperState.NONE, message)

    # }}}

    # {{{ renewals and the idle policy

    async def renewal_lost(self, lease: HeldLease, why: str) -> None:
        """Renewals: the agent did not answer."""
        async with self._lock:
            if self.lease is lease:
                self.record.lease = None
                self.record.parked_at = None
                self.record.set(KeeperState.LOST, f"GPU lost: {why}")

    async def renewal_ended(self, lease: HeldLease, info: dict[str, Any] | None,
                            why: str) -> None:
        """Renewals: the agent no longer knows the lease (the push saying why was lost)."""
        async with self._lock:
            if self.lease is lease:
                if info is not None:
                    self._ends.on_push(lease.agent, {**info, "id": lease.lease_id})
                else:
                    self._ends.ended(lease, ParkReason.ENDED, why)

    async def idle_due(self, lease: HeldLease) -> None:
        """Renewals: the idle countdown ran out; park unless something changed meanwhile."""
        async with self._lock:
            left = self.record.idle_left_s()
            if self.lease is lease and self.state == KeeperState.HELD and left is not None \
                    and left <= 0:
                await self._park(ParkReason.IDLE)

    async def refresh(self, max_age: float) -> None:
        """The session's figures at most ``max_age`` s old (KernelLease.refresh, for the
        sidebar); see Renewals.refresh."""
        await self._renewals.refresh(max_age)

    def idle_left_s(self) -> float | None:
        return self.record.idle_left_s()

    async def _park(self, reason: ParkReason) -> bool:
        """Ask the kernel to park, then release (lock held). False when the kernel is busy."""
        lease = self.lease
        assert lease is not None
        self.record.set(KeeperState.PARKING, f"parking ({reason})")
        answer: dict[str, Any] | None
        try:
            answer = await within(self._clock, self._kernel.ask_park(reason),
                                  self.config.park_timeout)
        except TimeoutError:
            answer = None
            log.warning("kernel %s did not park within %g s: releasing its lease at %s anyway",
                        self.config.kernel_id, self.config.park_timeout, lease.agent)
        except Exception as e:  # no kernel to ask (not connected): the agent parks it
            log.info("kernel %s could not be asked to park (%s): releasing at the agent",
                     self.config.kernel_id, e)
            answer = None
        if self.lease is not lease:
            return True  # the lease ended meanwhile (lost, expired, reclaimed)
        if answer is not None and answer.get("t") == "busy":
            self.record.set(KeeperState.HELD, "")
            return False
        if answer is not None and answer.get("t") == "parked":
            self.record.note_parked(answer)
        else:
            self.record.parked_at = lease.agent  # the agent parks the session when it ends
        await self._drop_lease()
        self.record.parked_reason = reason
        self.record.set(KeeperState.PARKED, released_message(
            reason, self.config.idle_timeout, self.parked_at or lease.agent))
        self._watch_parked()
        return True

    def _watch_parked(self) -> None:
        """Parked without a lease: no push would say that its agent drains (DrainedState)."""
        if self.parked_at:
            self._ends.drains.watch(self.parked_at)

    # }}}

    def on_push(self, endpoint: str, lease: dict[str, Any]) -> None:
        """A lease change the agent pushed (the lease client's callback, on the keeper's loop):
        see LeaseEnds.on_push."""
        self._ends.on_push(endpoint, lease)

    async def _drop_lease(self, *, quietly: bool = False) -> None:
        """Release our lease at its agent (held or queued) and forget it."""
        lease, self.record.lease = self.lease, None
        self.record.position = None
        self._renewals.stop()
        if lease is not None:
            await self._acquisition.release_at_agent(lease, quietly=quietly)

    def detach(self) -> None:
        """Stop renewing without releasing: another server takes the lease over (it has the
        lease from get_provisioner_info). Nothing else changes; the lease expires unless the new
        owner renews it."""
        self.closed = True
        self._renewals.stop()
        self._ends.stop()
        acquiring = self._acquiring
        if acquiring is not None and acquiring is not asyncio.current_task():
            acquiring.cancel()

    async def shutdown(self) -> None:
        """Release the lease and drop this kernel's parked state on every agent; idempotent.
        Run by the owner when the kernel process is gone or restarts (its state is unreachable
        then), or when a process without a provisioner exits."""
        if self.closed:
            return
        self.closed = True
        self._ends.stop()
        acquiring = self._acquiring
        if acquiring is not None and acquiring is not asyncio.current_task():
            acquiring.cancel()
        async with self._lock:
            await self._drop_lease(quietly=True)
            # parked state of this kernel can only be where it held a lease (a move goes to
            # the agent of the new lease), so the agents it has seen are every agent that may
            # hold some; asking the whole pool would start local agents just to say goodbye
            agents = set(self.agents_seen)
            if self.parked_at:
                agents.add(self.parked_at)
            await self._acquisition.drop_parked(sorted(agents))
            self.record.parked_at = None
            self.record.set(KeeperState.NONE, "the kernel ended")

    def _check_open(self) -> None:
        if self.closed:
            raise ControlError("GPUUnavailable", "this kernel is shutting down")


def grant(lease: HeldLease | None, parked_at: str | None, gone: str | None = None
          ) -> dict[str, Any]:
    """The grant of the held ``lease``; with ``gone`` (the parked state is known lost) its
    ``from`` is the granted agent itself, so that the kernel's resume fetches from nowhere and
    is answered StateLost at once, its ``note`` says why and ``state_lost`` the reason the
    kernel's error gives."""
    assert lease is not None
    agent = lease.agent
    moved = parked_at if parked_at and parked_at != agent else None
    answer = {"t": "grant", "agent": agent, "lease": [lease.lease_id, lease.token],
              "from": agent if gone else moved}
    if gone:
        answer["note"] = lost_note(gone)
        answer["state_lost"] = gone
    return answer
