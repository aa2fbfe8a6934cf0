"""The agent's lease requests: grant, queue, renew, release, revoke, reclaim, and who is told.

``LeaseDesk`` answers a client's lease messages over the pure ``LeaseTable``, acts on what the
table changes and pushes each change to the connection that holds the lease. When a lease ends, the
sessions it held are parked through ``park_session``, a hook the session lifecycle installs (it
sits above this module), before the slot is granted again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack

from gpu_agent import protocol as P
from gpu_agent.errors import AgentError
from gpu_agent.leases import Lease, LeaseState, LeaseTable
from gpu_agent.limits import AgentLimits
from gpu_agent.metrics import AgentMetrics
from gpu_agent.sizes import format_bytes
from gpu_agent.tenants import Outbox, Session, SessionBook, SessionState, read_text
from gpu_agent.workers import WorkerPool

log = logging.getLogger("harp.agent.tenancy")

DRAINING_REFUSAL = ("this GPU agent is shutting down (draining): it grants no new lease; ask "
                    "another agent of the pool")


def _parking_not_wired(session: Session, why: str) -> None:
    raise RuntimeError("LeaseDesk.park_session was not installed")



def described_map(header: dict[str, Any], key: str, what: str, limits: AgentLimits
                  ) -> dict[str, Any]:
    """``header[key]`` when it is a map no larger packed than ``--max-lease-info`` ({} when it
    is not a map): what a client says of itself (lease info, the client description of hello),
    which the agent keeps and shows in every status reply."""
    value = header.get(key) if isinstance(header.get(key), dict) else {}
    if (packed := len(msgpack.packb(value, default=str))) > limits.max_lease_info:
        raise AgentError("ProtocolError", (
            f"{what} of {format_bytes(packed)}: this agent takes at most "
            f"{format_bytes(limits.max_lease_info)} (harp-agent --max-lease-info)"))
    return value

class LeaseDesk:
    """See the module docstring."""

    def __init__(self, leases: LeaseTable, book: SessionBook, workers: WorkerPool,
                 limits: AgentLimits, outbox: Outbox, metrics: AgentMetrics, *, endpoint: str,
                 clock: Callable[[], float]) -> None:
        self.leases = leases
        self.book = book
        self.workers = workers
        self.limits = limits
        self.outbox = outbox
        self.metrics = metrics
        self.endpoint = endpoint
        self._clock = clock
        #: lease id -> the connection that hears about that lease's changes
        self.lease_routes: dict[str, bytes] = {}
        #: last queue position told to each active lease, to push only changes
        self._told: dict[str, int] = {}
        #: the agent is shutting down (gpu_agent.drain): no new leases, no adoptions
        self.shutting_down = False
        #: parks an ended lease's session (installed by the session lifecycle)
        self.park_session: Callable[[Session, str], None] = _parking_not_wired

    # {{{ a client's lease messages

    def request(self, route: bytes, header: dict[str, Any]) -> None:
        if self.shutting_down:
            raise AgentError("LeaseError", DRAINING_REFUSAL)
        kernel_id = self._text(header, "kernel_id")
        secret = self._text(header, "kernel_secret")
        user = header.get("user") if isinstance(header.get("user"), str) else ""
        if len(user) > self.limits.max_secret:
            raise AgentError("ProtocolError", f"user name of {len(user)} characters: this agent "
                             f"takes at most {self.limits.max_secret} (harp-agent --max-secret)")
        info = described_map(header, "info", "lease info", self.limits)
        self.book.check_secret(kernel_id, secret)
        for lease in self.active_leases():
            if lease.kernel_id == kernel_id:  # a resent request: the same lease again
                self._reply_lease(route, header, lease, with_token=True)
                return
        changed = self.leases.request(kernel_id, user, info, header.get("ttl"))
        self.book.keep_secret(kernel_id, secret)
        lease = changed[0]
        self._told[lease.lease_id] = self.leases.position(lease.lease_id)
        if lease.state is LeaseState.HELD:
            self.metrics.lease_granted(0.0)
        log.info("lease %s for kernel %s: %s", lease.lease_id, kernel_id, lease.state.value)
        self._reply_lease(route, header, lease, with_token=True)
        self.tell(self.settle(changed[1:]))

    def renew(self, route: bytes, header: dict[str, Any]) -> None:
        lease = self.leases.renew(*self._lease_ref(header))
        self._reply_lease(route, header, lease)

    def release(self, route: bytes, header: dict[str, Any]) -> None:
        changed = self.leases.release(*self._lease_ref(header))
        lease = changed[0]
        holder = self.lease_routes.get(lease.lease_id)
        self._reply_lease(route, header, lease)
        self.lease_routes.pop(lease.lease_id, None)
        if holder is not None and holder != route:
            # released from another connection (it had the token): the one that holds the
            # lease hears it now, not at its next renewal
            self.outbox.send(holder, {"t": P.LEASE, "lease": self.lease_info(lease)})
        self.tell([x for x in self.settle(changed) if x is not lease])

    def held(self, ref: Any) -> Lease:
        """The held lease a session message presents as ``[lease_id, token]``."""
        if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, str) for x in ref)):
            raise AgentError("LeaseError", "this client presented no lease: a GPU session needs "
                             "a lease held on this agent (lease_request first)")
        lease = self.leases.check(ref[0], ref[1])
        if lease.state is not LeaseState.HELD:
            raise AgentError("LeaseError", f"lease {lease.lease_id} is still queued (position "
                             f"{self.leases.position(lease.lease_id)}): wait for the grant")
        return lease

    def _reply_lease(self, route: bytes, header: dict[str, Any], lease: Lease, *,
                     with_token: bool = False) -> None:
        self.lease_routes[lease.lease_id] = route
        self.outbox.send(route, {"t": P.LEASE, "rid": header.get("rid"),
                                 "lease": self.lease_info(lease, with_token=with_token)})

    def _lease_ref(self, header: dict[str, Any]) -> tuple[str, str]:
        return self._text(header, "lease_id"), self._text(header, "token")

    def _text(self, header: dict[str, Any], key: str) -> str:
        return read_text(header, key, self.limits.max_secret)

    # }}}

    # {{{ acting on changes

    def revoke(self, lease_id: str, reason: str = "") -> None:
        """End a lease on the agent's word (its kernel is told, with ``reason``)."""
        self.tell(self.settle(self.leases.revoke(lease_id, reason)))

    def expire(self) -> None:
        self.tell(self.settle(self.leases.expire()))

    def update(self) -> None:
        """Grant what came free (a session ended or parked) and tell the queue's moves."""
        self.tell(self.settle([]))

    def settle(self, changed: list[Lease]) -> list[Lease]:
        """Act on lease changes (park the sessions of ended leases, grant free slots); returns
        the leases to tell, ended ones first, then grants and queue moves."""
        ended = [lease for lease in changed if not lease.active]
        for lease in ended:
            for session in self.book.of_lease(lease.lease_id):
                self.park_session(session, f"its lease was {lease.state.value}")
            self._told.pop(lease.lease_id, None)
            self.book.forget_secret(lease.kernel_id)
        self.leases.draining = self._draining()
        granted = self.leases.promote()
        for lease in granted:
            waited = self._clock() - lease.requested_at
            self.metrics.lease_granted(waited)
            log.info("lease %s of kernel %s granted after %.3f s in the queue", lease.lease_id,
                     lease.kernel_id, waited)
        told = list(ended)
        for lease in [*changed, *granted, *self.leases.queue]:
            if not lease.active or lease in told:
                continue
            position = self.leases.position(lease.lease_id)
            if self._told.get(lease.lease_id) != position:
                self._told[lease.lease_id] = position
                told.append(lease)
        return told

    def _draining(self) -> int:
        """Workers that still occupy the GPU for a lease no longer held: parking, or ending
        (until their process is gone, their memory is not free)."""
        held = {lease.lease_id for lease in self.leases.holders}
        count = 0
        for worker in self.workers.workers.values():
            if worker.session_id is None or worker.ended_by == "parked":
                continue  # a spare, or a parked session's worker: its memory is given back
            session = self.book.get(worker.session_id)
            if session is None or session.worker is not worker or session.lease_id not in held:
                count += 1
        return count

    def tell(self, leases: list[Lease]) -> None:
        for lease in leases:
            route = self.lease_routes.get(lease.lease_id)
            if route is not None:
                self.outbox.send(route, {"t": P.LEASE, "lease": self.lease_info(lease)})
            if not lease.active:
                self.lease_routes.pop(lease.lease_id, None)

    def release_with_process(self, session: Session) -> None:
        """A lease held by the vanished process itself (``harp run``) ends with it."""
        for lease in self.leases.holders:
            if lease.kernel_id == session.kernel_id and lease.info.get("holder") == "process":
                self.revoke(lease.lease_id)

    # }}}

    # {{{ reclaim on demand

    def reclaim(self, now: float) -> None:
        """Reclaim on demand: while kernels wait that no slot coming free will serve, holders
        whose sessions have had no GPU work for their ``reclaim_after`` are parked at once, one
        per such waiter (a running batch is never interrupted: a busy holder is reclaimed once
        it has idled that long). The first parked is the one that frees its slot soonest: the
        fewest device bytes to park (the waiter's wait includes that park, the reclaimed
        kernel's comeback that restore), the longest idle among equals."""
        uncovered = self.uncovered_waiters()
        if not uncovered:
            return
        for idle_s, lease in self.reclaimable(now)[:uncovered]:
            log.info("reclaiming lease %s of kernel %s: idle %.3f s while %d wait",
                     lease.lease_id, lease.kernel_id, idle_s, len(self.leases.queue))
            self.metrics.reclaimed()
            self.revoke(lease.lease_id, "reclaimed")

    def uncovered_waiters(self) -> int:
        """Kernels in the queue that no slot coming free (free, or its last tenant being
        parked or ended) will serve: only these may take an idle holder's slot."""
        leases = self.leases
        return max(len(leases.queue) - leases.free_slots - leases.draining, 0)

    def reclaimable(self, now: float) -> list[tuple[float, Lease]]:
        """Holders idle for their ``reclaim_after`` and how long, the first to reclaim first."""
        found: list[tuple[int, float, Lease]] = []
        for lease in self.leases.holders:
            idle_s = self.idle_seconds(lease, now)
            if idle_s is not None and idle_s >= self.reclaim_after(lease):
                found.append((self._device_bytes(lease), idle_s, lease))
        found.sort(key=lambda x: (x[0], -x[1]))
        return [(idle_s, lease) for _, idle_s, lease in found]

    def _device_bytes(self, lease: Lease) -> int:
        return sum(int(s.worker.figures().get("device_bytes") or 0)
                   for s in self.book.of_lease(lease.lease_id) if s.worker is not None)

    def idle_seconds(self, lease: Lease, now: float) -> float | None:
        """How long a held lease's GPU has had no work (None while a batch runs)."""
        sessions = self.book.of_lease(lease.lease_id)
        if not sessions:
            return now - (lease.granted_at or now)  # held, never used: idle since the grant
        idle = float("inf")
        for session in sessions:
            if session.state is not SessionState.ACTIVE or session.worker is None:
                return None
            figures = session.worker.figures()
            if figures.get("busy_since_ns"):
                return None
            last = figures.get("last_end_ns") or 0
            idle = min(idle, now - last / 1e9 if last else now - session.moving_since)
        return idle

    def reclaim_after(self, lease: Lease) -> float:
        """What this agent applies: the kernel's own, bounded by the agent's."""
        asked = lease.info.get("reclaim_after") if isinstance(lease.info, dict) else None
        agent = self.limits.reclaim_after
        if type(asked) in (int, float) and 0 <= asked < agent:
            return float(asked)
        return agent

    # }}}

    def active_leases(self) -> list[Lease]:
        return [*self.leases.holders, *self.leases.queue]

    def lease_info(self, lease: Lease, *, with_token: bool = False) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": lease.lease_id, "state": lease.state.value, "kernel_id": lease.kernel_id,
            "user": lease.user, "agent": self.endpoint, "ttl": lease.ttl,
            "position": self.leases.position(lease.lease_id) if lease.active else None,
            "granted_at": wall_time(lease.granted_at, self._clock), "session": None,
            "slots": self.leases.slots, "reason": lease.reason or None,
            "reclaim_after": self.reclaim_after(lease),
        }
        if with_token:
            info["token"] = lease.token
        sessions = self.book.of_kernel(lease.kernel_id)
        sessions.sort(key=lambda s: s.state is not SessionState.ACTIVE)
        if sessions:
            info["session"] = self.book.summary(sessions[0])
        return info


def wall_time(monotonic_at: float | None, clock: Callable[[], float]) -> float | None:
    """A moment of ``clock`` as wall-clock time (what clients are shown)."""
    if monotonic_at is None:
        return None
    return time.time() - (clock() - monotonic_at)
