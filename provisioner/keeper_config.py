"""What a lease keeper is configured with (``KeeperConfig``) and the callables it is given (the
pool's endpoints, a progress callback): below both the keeper and its pool acquisition, which
read them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from provisioner.lease_record import ParkReason

#: progress(message) while queued: {"state", "position", "agent"}
Progress = Callable[[dict[str, Any]], Awaitable[None]]
#: the agent endpoints to choose from, resolved at each acquire (local agents start lazily)
AgentsSource = Callable[[], Awaitable[list[str]]]


class KernelLink(Protocol):
    """How the keeper reaches the kernel it leases for."""

    async def ask_park(self, reason: ParkReason) -> dict[str, Any]:
        """The kernel's answer: {"t": "parked", session, agent, bytes} or {"t": "busy"};
        raises when the kernel cannot be asked (the agent then parks the session itself)."""

    def lease_ended(self, reason: ParkReason, message: str, lease_id: str) -> None:
        """The agent ended the held lease ``lease_id`` and parked the session itself; must not
        block."""


@dataclass
class KeeperConfig:
    kernel_id: str
    kernel_secret: str
    user: str = ""
    lease_ttl: float = 30.0
    #: seconds without GPU work before the lease is released; <= 0: never on idle
    idle_timeout: float = 60.0
    #: seconds without GPU work after which the agent may park this kernel for a waiting one
    reclaim_after: float = 3.0
    #: give up waiting in a queue after this long; None: wait as long as it takes
    acquire_timeout: float | None = None
    park_timeout: float = 30.0
    #: how long an agent may take to answer a status message at acquire (a dead agent in the
    #: pool costs each acquire this much)
    status_timeout: float = 2.0
    #: while no agent of the pool answers, acquire asks again (with backoff) for this long, or
    #: for ``acquire_timeout`` when that is set; an agent restarting is back within it
    reach_timeout: float = 30.0
    #: passed in lease_request ``info`` (host, park limits, ...); reclaim_after is added
    info: dict[str, Any] = field(default_factory=dict)

    def lease_info(self) -> dict[str, Any]:
        return {**self.info, "reclaim_after": self.reclaim_after}
