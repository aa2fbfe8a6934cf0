"""Who may use this agent's GPU: the lease table.

Pure logic, no I/O: the agent's supervisor feeds it requests and the clock, and acts on what it
returns. An agent serves one GPU in ``slots`` slots (one by default) and the table grants each slot
to one lease at a time, so two holders of one slot cannot exist by construction; a slot whose last
tenant is still being parked (``draining``) is not granted until it is free. Everyone else waits
in a FIFO queue of at most ``max_queue``. Every lease, held or queued, must be renewed within its
ttl or it expires (a dead jupyter_server stops renewing); a ttl is finite and clamped.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from gpu_agent.errors import AgentError


class LeaseState(StrEnum):
    QUEUED = "queued"
    HELD = "held"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"


class LeaseError(AgentError):
    """A request about a lease that does not exist, or with the wrong token."""

    def __init__(self, message: str, kind: str = "LeaseError") -> None:
        super().__init__(kind, message)


@dataclass
class Lease:
    lease_id: str
    token: str
    kernel_id: str
    user: str
    state: LeaseState
    requested_at: float
    renewed_at: float
    ttl: float = 30.0
    granted_at: float | None = None
    ended_at: float | None = None
    info: dict = field(default_factory=dict)
    #: why it ended, when the agent ended it early ("reclaimed": someone waited while it idled)
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state in (LeaseState.QUEUED, LeaseState.HELD)


class LeaseTable:
    """The leases of one GPU: at most ``slots`` held, the rest queued in arrival order."""

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic, *,
                 slots: int = 1, max_queue: int = 256, min_ttl: float = 1.0) -> None:
        if not (math.isfinite(ttl) and ttl > 0) or slots < 1 or max_queue < 0:
            raise ValueError("ttl must be a positive number, slots at least 1")
        self.ttl = ttl
        self.min_ttl = min(min_ttl, ttl)
        self.slots = slots
        self.max_queue = max_queue
        #: slots whose last tenant is still being parked: not granted until it is done
        self.draining = 0
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._queue: deque[str] = deque()
        self._holders: dict[str, None] = {}

    # {{{ queries

    @property
    def holders(self) -> list[Lease]:
        return [self._leases[lease_id] for lease_id in self._holders]

    @property
    def free_slots(self) -> int:
        return max(self.slots - len(self._holders) - self.draining, 0)

    @property
    def queue(self) -> list[Lease]:
        return [self._leases[lease_id] for lease_id in self._queue]

    def position(self, lease_id: str) -> int:
        """0 for the holder, n >= 1 for the n-th in the queue."""
        lease = self._get(lease_id)
        if lease.state is LeaseState.HELD:
            return 0
        if lease.state is LeaseState.QUEUED:
            return self._queue.index(lease_id) + 1
        raise LeaseError(f"lease {lease_id} is {lease.state.value}")

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def check(self, lease_id: str, token: str) -> Lease:
        """The lease if ``token`` is its token and it is active; LeaseError otherwise."""
        lease = self._leases.get(lease_id)
        if lease is None or not secrets.compare_digest(lease.token, token):
            raise LeaseError("unknown lease or wrong token")
        if not lease.active:
            raise LeaseError(f"lease {lease_id} is {lease.state.value}")
        return lease

    # }}}

    # {{{ changes; each returns the leases whose state changed, in order

    def request(self, kernel_id: str, user: str = "", info: dict | None = None,
                ttl: float | None = None) -> list[Lease]:
        """A new lease: held at once if a slot is free, queued otherwise (first of the result).
        ``ttl`` may shorten the table's ttl for this lease (never below ``min_ttl``), never
        lengthen it; one that is not a finite number is refused, as is a request past a full
        queue."""
        if ttl is not None and not (isinstance(ttl, int | float) and math.isfinite(ttl)):
            raise LeaseError(f"lease ttl must be a finite number of seconds, not {ttl!r}",
                             "ProtocolError")
        if len(self._queue) >= self.max_queue and not self.free_slots:
            raise LeaseError(f"this GPU's queue is full ({self.max_queue} waiting, "
                             "harp-agent --max-queue): try another agent or later",
                             "LeaseError")
        now = self._clock()
        lease = Lease(
            lease_id=secrets.token_hex(8),
            token=secrets.token_urlsafe(24),
            kernel_id=kernel_id,
            user=user,
            state=LeaseState.QUEUED,
            requested_at=now,
            renewed_at=now,
            info=dict(info or {}),
            ttl=self.ttl if ttl is None else min(max(ttl, self.min_ttl), self.ttl),
        )
        self._leases[lease.lease_id] = lease
        self._queue.append(lease.lease_id)
        promoted = self._promote(now)
        return [lease, *(p for p in promoted if p is not lease)]

    def renew(self, lease_id: str, token: str) -> Lease:
        lease = self.check(lease_id, token)
        lease.renewed_at = self._clock()
        return lease

    def release(self, lease_id: str, token: str) -> list[Lease]:
        """End a lease (held or queued); ``promote`` then grants its slot."""
        self.check(lease_id, token)
        return self._end(lease_id, LeaseState.RELEASED)

    def revoke(self, lease_id: str, reason: str = "") -> list[Lease]:
        """End a lease on the agent's or the operator's word (no token needed)."""
        lease = self._get(lease_id)
        if not lease.active:
            return []
        lease.reason = reason
        return self._end(lease_id, LeaseState.REVOKED)

    def expire(self) -> list[Lease]:
        """End every lease not renewed within ``ttl``; returns what changed."""
        now = self._clock()
        changed: list[Lease] = []
        for lease_id in [*self._queue, *self._holders]:
            lease = self._leases[lease_id]
            if lease.active and now - lease.renewed_at > lease.ttl:
                changed += self._end(lease_id, LeaseState.EXPIRED, now)
        return changed

    def forget(self, older_than: float) -> None:
        """Drop ended leases that ended more than ``older_than`` seconds ago."""
        now = self._clock()
        for lease_id, lease in list(self._leases.items()):
            ended = lease.ended_at
            if not lease.active and ended is not None and now - ended > older_than:
                del self._leases[lease_id]

    # }}}

    def _get(self, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseError(f"unknown lease {lease_id}")
        return lease

    def _end(self, lease_id: str, state: LeaseState, now: float | None = None) -> list[Lease]:
        now = self._clock() if now is None else now
        lease = self._leases[lease_id]
        if lease.state is LeaseState.HELD:
            del self._holders[lease_id]
        else:
            self._queue.remove(lease_id)
        lease.state = state
        lease.ended_at = now
        # no promotion here: the caller first parks what the lease held (``draining``), then
        # calls ``promote``, so a slot is never granted while its last tenant still occupies it
        return [lease]

    def promote(self) -> list[Lease]:
        """Grant free slots to the queue's head (after a draining slot came free)."""
        return self._promote(self._clock())

    def _promote(self, now: float) -> list[Lease]:
        granted: list[Lease] = []
        while self._queue and self.free_slots:
            lease_id = self._queue.popleft()
            lease = self._leases[lease_id]
            lease.state = LeaseState.HELD
            lease.granted_at = now
            lease.renewed_at = now
            self._holders[lease_id] = None
            granted.append(lease)
        return granted
