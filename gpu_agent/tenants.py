"""The books of an agent's tenants: their sessions, address ranges and kernel secrets.

``SessionBook`` records who has a session here and keeps its bounds (sessions per kernel, sessions
in all, address ranges); it changes nothing on the GPU: the pieces of ``tenancy`` act, this keeps
the books they act on. ``Outbox`` holds the replies and pushes they owe clients until the
supervisor sends them.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gpu_agent import protocol as P
from gpu_agent.errors import AgentError
from gpu_agent.leases import LeaseTable
from gpu_agent.limits import AgentLimits
from gpu_agent.parking import ParkStore
from gpu_agent.workers import WorkerHandle

#: the reason a moved session's parked state is gone (its owner finds it on the other agent)
MOVED = "it moved to another agent"
#: address ranges an agent hands out (each 256 GiB of virtual address space)
ADDRESS_RANGES = 256

Outgoing = tuple[bytes, dict[str, Any], list[Any]]


class SessionState(StrEnum):
    OPENING = "opening"  # a worker is creating or restoring it
    ACTIVE = "active"
    PARKING = "parking"  # its worker is writing its memory to the park store
    PARKED = "parked"


@dataclass
class Session:
    session_id: str
    kernel_id: str
    resume_token: str
    slot: int
    client: dict[str, Any]
    state: SessionState = SessionState.OPENING
    lease_id: str | None = None
    worker: WorkerHandle | None = None
    #: the client's connection to the supervisor (pushes go there)
    route: bytes | None = None
    #: requests answered when the worker reports: (route, header)
    waiting: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    attach: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    park_ttl: float | None = None
    park_limit: int | None = None
    started: float = field(default_factory=time.time)
    resumed: bool = False
    #: when its client's worker connection dropped (monotonic), until it comes back
    gone_at: float | None = None
    #: when its parking worker's exit was seen before its report (monotonic)
    worker_exited_at: float | None = None
    #: why parking started (told to the owner)
    park_reason: str = ""
    #: when the running park or restore started (monotonic), for the metrics
    moving_since: float = 0.0
    #: taken over from a draining agent: parked again as soon as its worker has it
    adopting: bool = False

    @property
    def base(self) -> int:
        return P.session_range(self.slot)[0]


class Outbox:
    """Messages owed to clients (route, header, frames), sent by the supervisor after each step."""

    def __init__(self) -> None:
        self._messages: list[Outgoing] = []

    def send(self, route: bytes, header: dict[str, Any], frames: list[Any] | None = None) -> None:
        self._messages.append((route, header, frames or []))

    def take(self) -> list[Outgoing]:
        messages, self._messages = self._messages, []
        return messages


class SessionBook:
    """The sessions of one agent and its kernels' secrets; see the module docstring."""

    def __init__(self, leases: LeaseTable, parking: ParkStore, limits: AgentLimits) -> None:
        self.leases = leases
        self.parking = parking
        self.limits = limits
        self.sessions: dict[str, Session] = {}
        self._kernel_secrets: dict[str, str] = {}

    # {{{ lookups

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def of_lease(self, lease_id: str) -> list[Session]:
        return [s for s in self.sessions.values()
                if s.lease_id == lease_id and s.state is not SessionState.PARKED]

    def of_route(self, route: bytes) -> Session | None:
        for session in self.sessions.values():
            if session.route == route and session.state is SessionState.ACTIVE:
                return session
        return None

    def of_kernel(self, kernel_id: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.kernel_id == kernel_id]

    def summary(self, s: Session) -> dict[str, Any]:
        parked = self.parking.get(s.session_id)
        figures = s.worker.figures() if s.worker is not None else {}
        last_end = figures.get("last_end_ns") or 0
        return {
            "id": s.session_id, "state": s.state.value,
            "device_bytes": figures.get("device_bytes", 0),
            "object_bytes": figures.get("object_bytes", 0),
            "parked_bytes": parked.nbytes if parked else 0,
            "idle_s": round(max(time.monotonic() - last_end / 1e9, 0.0), 3) if last_end else 0.0,
            "busy": bool(figures.get("busy_since_ns")),
        }

    # }}}

    # {{{ kernel secrets

    def check_secret(self, kernel_id: str, secret: str) -> None:
        """A kernel known here must present the secret it first came with."""
        known = self._kernel_secrets.get(kernel_id)
        if known is not None and not secrets.compare_digest(known, secret):
            raise AgentError("LeaseError", f"kernel {kernel_id} is known here with another "
                             "kernel_secret: refused")

    def knows_secret(self, kernel_id: str, secret: str) -> bool | None:
        """Whether ``secret`` is the kernel's (None when the kernel is not known here)."""
        known = self._kernel_secrets.get(kernel_id)
        if known is None:
            return None
        return secrets.compare_digest(known, secret)

    def secret_of(self, kernel_id: str) -> str:
        return self._kernel_secrets.get(kernel_id, "")

    def keep_secret(self, kernel_id: str, secret: str) -> None:
        self._kernel_secrets[kernel_id] = secret

    def forget_secret(self, kernel_id: str) -> None:
        """A kernel's secret is kept while it has leases or sessions here, not longer."""
        if not any(s.kernel_id == kernel_id for s in self.sessions.values()) and not any(
                lease.kernel_id == kernel_id
                for lease in [*self.leases.holders, *self.leases.queue]):
            self._kernel_secrets.pop(kernel_id, None)

    # }}}

    # {{{ adding and forgetting sessions

    def add(self, session: Session) -> None:
        self.sessions[session.session_id] = session

    def make_room(self, kernel_id: str) -> None:
        """Keep the session bounds: a kernel's oldest parked states beyond its share, and the
        agent's oldest parked states beyond its total, are dropped (their owners told)."""
        parked = sorted((s for s in self.sessions.values() if s.state is SessionState.PARKED),
                        key=lambda s: s.started)
        mine = [s for s in parked if s.kernel_id == kernel_id]
        for session in mine[:max(len(mine) - self.limits.sessions_per_kernel + 1, 0)]:
            self.parking.drop(session.session_id, (
                "its kernel made more sessions than an agent keeps for one kernel "
                f"({self.limits.sessions_per_kernel}, harp-agent --sessions-per-kernel)"))
            self.forget(session)
            parked.remove(session)
        excess = len(self.sessions) - self.limits.max_sessions + 1
        for session in parked[:max(excess, 0)]:
            self.parking.drop(session.session_id, "the agent keeps at most "
                              f"{self.limits.max_sessions} sessions (harp-agent --max-sessions)")
            self.forget(session)
        if len(self.sessions) >= self.limits.max_sessions:
            raise AgentError("SessionError", (
                f"this agent already serves {self.limits.max_sessions} sessions, all of them "
                "active (harp-agent --max-sessions): try another agent, or later"))

    def free_slot(self, wanted_base: int | None) -> int:
        used = {s.slot for s in self.sessions.values()}
        if wanted_base is not None:
            slot, rem = divmod(wanted_base - P.ADDRESS_SPACE_BASE, P.SESSION_RANGE_SIZE)
            if rem == 0 and 0 <= slot < ADDRESS_RANGES and slot not in used:
                return slot
        free = [slot for slot in range(ADDRESS_RANGES) if slot not in used]
        if not free:
            raise AgentError("SessionError", "this agent has no free address range left")
        # a random range makes it unlikely that a session moving here finds its range taken
        return free[secrets.randbelow(len(free))]

    def forget_id(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            self.forget(session)

    def forget(self, session: Session) -> None:
        self.remove(session)
        self.forget_secret(session.kernel_id)

    def remove(self, session: Session) -> None:
        """Take an ended session off the books (its kernel's secret is left as it is)."""
        self.sessions.pop(session.session_id, None)

    # }}}


#: the ids and tokens the agent makes itself (leases, sessions) are at most this long whatever
#: --max-secret says: that flag bounds what clients choose, and must not refuse the agent's own
AGENT_TOKEN_CHARS = 64
_AGENT_MADE = frozenset({"lease_id", "token", "session", "resume_token"})


def read_text(header: dict[str, Any], key: str, max_length: int) -> str:
    """``header[key]`` when it is a non-empty string of at most ``max_length`` characters
    (``AGENT_TOKEN_CHARS`` for the ids and tokens the agent made)."""
    value = header.get(key)
    agent_made = key in _AGENT_MADE
    if agent_made:
        max_length = AGENT_TOKEN_CHARS
    if isinstance(value, str) and len(value) > max_length:
        raise AgentError("ProtocolError", (
            f"{key} of {len(value)} characters: this agent takes at most {max_length} "
            "characters" + ("" if agent_made else " (harp-agent --max-secret)")))
    if not (isinstance(value, str) and value):
        raise AgentError("ProtocolError", f"{header.get('t') or 'this message'} needs a string "
                         f"{key} of at most {max_length} characters")
    return value


def lost_message(reason: str, *, parked: bool = True) -> str:
    """What an owner is told when its session's GPU state is gone."""
    what = "your parked GPU state is gone" if parked else "your GPU session ended"
    return (f"{what}: {reason}. Its device arrays, modules and streams no longer exist; your "
            "Python process and its variables are intact and other users of this GPU were not "
            "affected, and the next GPU call starts a fresh session: re-run the code that "
            "creates your device arrays.")
