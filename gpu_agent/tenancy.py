"""Who uses this agent's GPU and what they keep on it: leases, sessions, parked state.

``Tenancy`` is the supervisor's authority logic with no sockets of its own: the supervisor hands
its pieces requests, worker messages and ticks, and sends what they put in ``outbox``. The GPU's
slots belong to the holders of the held leases (``LeaseDesk`` over ``LeaseTable``); each active
session runs in a worker of its own (``SessionLifecycle`` over ``WorkerPool``), opened for a
client by ``SessionDesk``; parked state moves between agents through ``ParkedHandoff``; all of
them keep their books in one ``SessionBook``. When a lease ends, its kernel's active sessions are
parked before the slot is granted again, so a new tenant never shares memory with an old one, and
the parked owner finds its memory intact at the same addresses, here or on another agent.

``Tenancy`` wires the pieces, runs their tick, and reports on them (status, metrics). Nothing here
waits: opening, restoring and parking are orders to a worker, answered when the worker reports
back; a client's ``hello`` or ``park`` is answered then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gpu_agent.lease_desk import LeaseDesk, wall_time
from gpu_agent.leases import Lease, LeaseTable
from gpu_agent.limits import AgentLimits
from gpu_agent.metrics import AgentMetrics
from gpu_agent.parked_handoff import ParkedHandoff
from gpu_agent.parking import ParkStore
from gpu_agent.session_desk import SessionDesk
from gpu_agent.session_lifecycle import SessionLifecycle
from gpu_agent.tenants import Outbox, SessionBook, SessionState
from gpu_agent.workers import WorkerPool

#: ended leases are remembered this long, so a late renew gets "released" rather than "unknown"
FORGET_ENDED_S = 600.0


class Tenancy:
    """See the module docstring."""

    def __init__(self, workers: WorkerPool, parking: ParkStore, limits: AgentLimits, *,
                 endpoint: str, agent_info: dict[str, Any],
                 device_info: Callable[[], dict[str, Any]], metrics: AgentMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = workers
        self.parking = parking
        self.limits = limits
        self.metrics = metrics
        self._clock = clock
        self._last_tick = clock()
        self.leases = LeaseTable(limits.lease_ttl, clock, slots=limits.slots,
                                 max_queue=limits.max_queue, min_ttl=limits.min_lease_ttl)
        self.book = SessionBook(self.leases, parking, limits)
        self.outbox = Outbox()
        self.lease_desk = LeaseDesk(self.leases, self.book, workers, limits, self.outbox,
                                    metrics, endpoint=endpoint, clock=clock)
        self.lifecycle = SessionLifecycle(self.book, self.lease_desk, workers, parking, limits,
                                          self.outbox, metrics, agent_info=agent_info,
                                          device_info=device_info, clock=clock)
        self.session_desk = SessionDesk(self.book, self.lease_desk, self.lifecycle, parking,
                                        limits, self.outbox, endpoint=endpoint)
        self.handoff = ParkedHandoff(self.book, self.lease_desk, self.lifecycle, parking,
                                     limits, endpoint=endpoint)
        #: refusals by kind, for status and metrics
        self.refusals: dict[str, int] = {}

    def tick(self) -> None:
        now = self._clock()
        self.lease_desk.expire()
        self.lease_desk.reclaim(now)
        self._account(now)
        self.leases.forget(FORGET_ENDED_S)
        for session_id in self.parking.expire():
            self.book.forget_id(session_id)
        self.lifecycle.watch(now)

    def _account(self, now: float) -> None:
        """The figures the metrics keep: slot-seconds held (and held idle while someone
        waits), leases, sessions, parked bytes."""
        elapsed, self._last_tick = now - self._last_tick, now
        holders = self.leases.holders
        desk = self.lease_desk
        # idle past reclaim_after while someone waited, only as many holders as there are
        # waiters no slot coming free will serve: the others' slots were nobody's to take
        uncovered = desk.uncovered_waiters()
        idle = min(len(desk.reclaimable(now)), uncovered) if uncovered else 0
        self.metrics.gpu_seconds(len(holders) * elapsed, idle * elapsed)
        self.metrics.leases(len(holders), len(self.leases.queue))
        states = [s.state for s in self.book.sessions.values()]
        self.metrics.sessions(sum(st is not SessionState.PARKED for st in states),
                              sum(st is SessionState.PARKED for st in states))
        self.metrics.parked_bytes(self.parking.memory_bytes, self.parking.disk_bytes)

    def status(self, *, everyone: bool, kernel: tuple[str, str] | None = None
               ) -> dict[str, Any]:
        """Leases and sessions: everyone's for the operator, else the pool's figures and the
        asking kernel's own (``kernel`` = (kernel_id, kernel_secret) it proved)."""
        now = self._clock()
        own = None
        if kernel is not None and self.book.knows_secret(kernel[0], kernel[1]):
            own = kernel[0]

        def visible(kernel_id: str) -> bool:
            return everyone or kernel_id == own

        def holder(lease: Lease) -> dict[str, Any]:
            entry: dict[str, Any] = {"since": wall_time(lease.granted_at, self._clock)}
            if visible(lease.kernel_id):
                entry.update(lease_id=lease.lease_id, kernel_id=lease.kernel_id,
                             user=lease.user, info=lease.info,
                             reclaim_after=self.lease_desk.reclaim_after(lease))
            return entry

        holders = [holder(lease) for lease in self.leases.holders]
        parked = [{"bytes": p.nbytes, "spilled_bytes": p.disk_bytes,
                   "parked_s": round(now - p.parked_at, 3),
                   **({"session": p.session_id, "kernel_id": p.kernel_id}
                      if visible(p.kernel_id) else {})}
                  for p in self.parking.sessions()]
        return {
            "ttl": self.leases.ttl, "slots": self.leases.slots,
            "free_slots": self.leases.free_slots, "reclaim_after": self.limits.reclaim_after,
            "holders": holders,
            "holder": holders[0] if holders and self.leases.slots == 1 else None,
            "queue": [{"position": i + 1, "waiting_s": round(now - q.requested_at, 3),
                       **({"lease_id": q.lease_id, "kernel_id": q.kernel_id, "user": q.user,
                           "info": q.info} if visible(q.kernel_id) else {})}
                      for i, q in enumerate(self.leases.queue)],
            "parked": parked,
            "park_store": {"memory_bytes": self.parking.memory_bytes,
                           "disk_bytes": self.parking.disk_bytes,
                           "memory_cap": self.parking.memory_cap, "limit": self.parking.limit},
            "sessions": [{"session": s.session_id, "kernel_id": s.kernel_id,
                          "client": s.client, **self.book.summary(s)}
                         for s in self.book.sessions.values() if visible(s.kernel_id)],
            "refusals": dict(self.refusals),
            "draining": self.lease_desk.shutting_down,
            "worker_restarts": self.workers.restarts,
        }

    def close(self) -> None:
        self.parking.close()
