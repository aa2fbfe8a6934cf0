"""Who may use this agent's GPU: the lease table.

Pure logic, no I/O: the agent's server feeds it requests and the clock, and acts on what it returns.
An agent serves one GPU and the table grants it to one lease at a time, so two holders of one GPU
cannot exist by construction. Everyone else waits in a FIFO queue. Every lease, held or queued, must
be renewed within ``ttl`` seconds or it expires (a dead jupyter_server stops renewing).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class LeaseState(StrEnum):
    QUEUED = "queued"
    HELD = "held"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"


class LeaseError(Exception):
    """A request about a lease that does not exist, or with the wrong token."""


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

    @property
    def active(self) -> bool:
        return self.state in (LeaseState.QUEUED, LeaseState.HELD)


class LeaseTable:
    """The leases of one GPU: at most one held, the rest queued in arrival order."""

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.ttl = ttl
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._queue: deque[str] = deque()
        self._holder: str | None = None

    # {{{ queries

    @property
    def holder(self) -> Lease | None:
        return self._leases[self._holder] if self._holder else None

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
        """A new lease: held at once if the GPU is free, queued otherwise (first of the result).
        ``ttl`` may shorten the table's ttl for this lease, never lengthen it."""
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
            ttl=self.ttl if ttl is None or ttl <= 0 else min(ttl, self.ttl),
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
        """End a lease (held or queued); the next in the queue may be granted."""
        self.check(lease_id, token)
        return self._end(lease_id, LeaseState.RELEASED)

    def revoke(self, lease_id: str) -> list[Lease]:
        """End a lease on the operator's word (no token needed)."""
        lease = self._get(lease_id)
        if not lease.active:
            return []
        return self._end(lease_id, LeaseState.REVOKED)

    def expire(self) -> list[Lease]:
        """End every lease not renewed within ``ttl``; returns what changed."""
        now = self._clock()
        changed: list[Lease] = []
        for lease_id in [*self._queue, *([self._holder] if self._holder else [])]:
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
            self._holder = None
        else:
            self._queue.remove(lease_id)
        lease.state = state
        lease.ended_at = now
        return [lease, *self._promote(now)]

    def _promote(self, now: float) -> list[Lease]:
        if self._holder is not None or not self._queue:
            return []
        lease_id = self._queue.popleft()
        lease = self._leases[lease_id]
        lease.state = LeaseState.HELD
        lease.granted_at = now
        lease.renewed_at = now
        self._holder = lease_id
        return [lease]
