"""What a kernel's lease keeper knows and shows: the states, declared once, and the lease state
dict that ``%harp status``, the sidebar and the lease events read (docs/leases-design.md).

Pure bookkeeping, no I/O: ``provisioner.keeper.LeaseKeeper`` moves the state and fills in the
facts; ``LeaseRecord.lease_state()`` reads them out. The states' values are a contract with the
lease event schema (harp_jupyter/server/schemas/lease-v1.yaml) and the lab's tokens.ts; a unit
test checks that the three agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

log = logging.getLogger("harp.provisioner.keeper")


class KeeperState(StrEnum):
    """A kernel's lease, as the sidebar shows it (ARCHITECTURE.md §5)."""

    NONE = "none"
    ACQUIRING = "acquiring"
    QUEUED = "queued"
    HELD = "held"
    PARKING = "parking"
    PARKED = "parked"
    LOST = "lost"


#: the states in which the kernel has a GPU (a parking kernel still holds its lease)
HOLDING = (KeeperState.HELD, KeeperState.PARKING)


class ParkReason(StrEnum):
    """Why a held lease ended with the kernel's state parked."""

    RELEASE = "release"  # %harp release, the sidebar's Release button
    IDLE = "idle"  # the keeper's idle timeout
    RECLAIM = "reclaim"  # someone waited: the agent took it back (its lease came back revoked,
    # reason "reclaimed"), the kernel having had no GPU work for reclaim_after seconds
    ENDED = "ended"  # the agent ended the lease otherwise (expired, revoked by the operator)


#: what the agent says in ``lease.reason`` when it reclaims an idle holder for a waiter
AGENT_RECLAIMED = "reclaimed"
#: the reason of a lease a shutting-down agent ended (gpu_agent.drain.DRAINING)
AGENT_DRAINING = "draining"

#: the note a reclaimed kernel's next cell shows, once
RECLAIMED_NOTICE = "parked while idle because another notebook was waiting"


def released_message(reason: ParkReason, idle_timeout: float, agent: str) -> str:
    """The lease state's message once a lease ended with the state parked on ``agent``."""
    why = {ParkReason.RELEASE: "You released the GPU",
           ParkReason.IDLE: f"Released after {idle_timeout:g} s without GPU work",
           ParkReason.RECLAIM: "Released for a kernel waiting in the queue",
           ParkReason.ENDED: "The agent ended the lease"}[reason]
    return f"{why}: device memory parked on {agent}"


@dataclass
class HeldLease:
    agent: str
    lease_id: str
    token: str
    ttl: float
    granted_at: float | None = None  # the keeper's clock (epoch seconds)
    #: the reclaim_after the agent applies to this lease (it bounds the kernel's by its own)
    reclaim_after: float | None = None


def applied_reclaim_after(lease: dict[str, Any]) -> float | None:
    """The reclaim_after an agent says it applies in a lease it granted (None: not said)."""
    value = lease.get("reclaim_after")
    return float(value) if type(value) in (int, float) and value >= 0 else None


def idle_left(idle_timeout: float, session: dict[str, Any] | None, seconds_since_report: float,
              seconds_held: float) -> float | None:
    """Seconds until the idle policy releases, from the last renew report; None = never.

    A busy session never counts down. The report is ``seconds_since_report`` old, so that much
    more idleness has passed since. A lease is never idle for longer than it has been held: a
    session parked long ago and being restored right now reports a large ``idle_s``, and must
    not be parked again before its kernel has had a chance to use the GPU it just got. Without a
    session (the kernel has not said hello yet, or it failed) the lease is idle since its grant.
    """
    if idle_timeout <= 0:
        return None
    if session is not None and session.get("busy"):
        return idle_timeout
    idle_s = seconds_held
    if session is not None and session.get("state", "active") == "active":
        idle_s = min(idle_s, float(session.get("idle_s") or 0.0) + seconds_since_report)
    return max(0.0, idle_timeout - idle_s)


class GpuTime:
    """Seconds a kernel has held a GPU, over all its leases."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._ended = 0.0
        self._since: float | None = None

    def holding(self, now_holding: bool) -> None:
        if now_holding and self._since is None:
            self._since = self._clock()
        elif not now_holding and self._since is not None:
            self._ended += self._clock() - self._since
            self._since = None

    def seconds(self) -> float:
        current = self._clock() - self._since if self._since is not None else 0.0
        return self._ended + current


#: on_change(lease_state() plus "previous": the state before) at each state or queue-position
#: change, on the keeper's loop; must not block (the sidebar's events)
OnChange = Callable[[dict[str, Any]], None]


class LeaseRecord:
    """The keeper's facts about one kernel's lease, and the lease state dict made of them.

    The keeper sets ``state`` through ``set()`` (which tells ``on_change``) and the facts
    directly; ``lease_state()`` is read by the keeper's owner (``%harp status``, the sidebar)."""

    def __init__(self, kernel_id: str, clock: Callable[[], float],
                 settings: Callable[[], dict[str, float]], on_change: OnChange | None) -> None:
        self.kernel_id = kernel_id
        self._clock = clock
        #: the kernel's current idle_timeout and reclaim_after (set_idle changes the former)
        self._settings = settings
        self.on_change = on_change
        self.state = KeeperState.NONE
        self.message = ""
        self.position: int | None = None
        self.lease: HeldLease | None = None
        #: the agent holding this kernel's parked state (prefer it at the next acquire)
        self.parked_at: str | None = None
        self.parked_bytes = 0
        #: why the last held lease ended parked (None while holding, or before any)
        self.parked_reason: ParkReason | None = None
        #: from the agent's status at acquire: gpu, emulated, memory_total
        self.device: dict[str, Any] = {}
        #: the session as the last renewal reported it, and when (the keeper's clock)
        self.session: dict[str, Any] | None = None
        self.reported_at = 0.0
        #: the bytes the kernel's own allocations cover, as the kernel last said
        self.memory_allocated: int | None = None
        self.gpu_time = GpuTime(clock)
        self._told: tuple[KeeperState, int | None] = (KeeperState.NONE, None)

    def set(self, state: KeeperState, message: str) -> None:
        previous = self.state
        if state != previous:
            log.debug("kernel %s: %s -> %s %s", self.kernel_id, previous, state, message)
        self.state, self.message = state, message
        if state != KeeperState.QUEUED:
            self.position = None
        if state not in HOLDING:
            self.session = None
            self.memory_allocated = None
        else:
            self.parked_reason = None
        self.gpu_time.holding(state in HOLDING)
        self._tell(previous)

    def changed(self) -> None:
        """Tell ``on_change`` of a new figure in the same state (the parked bytes)."""
        self._tell(self.state, force=True)

    def _tell(self, previous: KeeperState, *, force: bool = False) -> None:
        told = (self.state, self.position)
        if (told == self._told and not force) or self.on_change is None:
            self._told = told
            return
        self._told = told
        try:
            self.on_change({**self.lease_state(), "previous": str(previous)})
        except Exception:  # a listener's bug must not break the lease
            log.exception("lease change listener of kernel %s failed", self.kernel_id)

    def note_session(self, session: Any) -> None:
        self.session = session if isinstance(session, dict) else None
        self.reported_at = self._clock()

    def note_parked(self, info: dict[str, Any]) -> None:
        """The kernel's answer to a park (or its own ``parked``): where its state now is."""
        if info.get("session"):
            self.parked_at = str(info.get("agent") or (self.lease.agent if self.lease else ""))
            self.parked_bytes = int(info.get("bytes") or 0)
        elif self.lease is not None:
            self.parked_at = self.lease.agent  # nothing was connected: whatever is there stays

    def note_device(self, status: dict[str, Any]) -> None:
        device = status.get("device") if isinstance(status.get("device"), dict) else {}
        memory = status.get("memory") if isinstance(status.get("memory"), dict) else {}
        self.device = {"gpu": device.get("name"),
                       "emulated": bool(status.get("emulated", device.get("emulated"))),
                       "memory_total": memory.get("total", device.get("total_memory"))}

    @property
    def holding(self) -> bool:
        return self.lease is not None and self.state in HOLDING

    def idle_left_s(self) -> float | None:
        lease = self.lease
        if lease is None or not self.holding:
            return None
        now = self._clock()
        held_s = now - (lease.granted_at if lease.granted_at is not None else now)
        return idle_left(self._settings()["idle_timeout"], self.session,
                         now - self.reported_at, held_s)

    def _allocated(self, session: dict[str, Any]) -> int | None:
        """What the user's allocations cover: the kernel's answer (its allocator's arrays) and
        the session objects only the agent knows (torch tensors: a model on "harp" is not 0 B)."""
        if self.memory_allocated is None:
            return None
        objects = session.get("object_bytes")
        return self.memory_allocated + (objects if type(objects) is int and objects > 0 else 0)

    def lease_state(self) -> dict[str, Any]:
        """The lease state dict of docs/leases-design.md (``%harp status``, the sidebar)."""
        lease = self.lease
        held = self.holding
        granted = lease.granted_at if held and lease is not None else None
        session = self.session or {}
        left = self.idle_left_s()
        settings = self._settings()
        return {
            "state": str(self.state),
            "agent": lease.agent if lease is not None else self.parked_at,
            "gpu": self.device.get("gpu"),
            "emulated": self.device.get("emulated"),
            "memory_used": session.get("device_bytes") if held else None,
            "memory_allocated": self._allocated(session) if held else None,
            "memory_total": self.device.get("memory_total"),
            "held_since": granted,
            "held_s": round(self._clock() - granted, 1) if granted is not None else None,
            "idle_timeout": settings["idle_timeout"],
            "idle_left_s": round(left, 1) if left is not None else None,
            # while held, what the agent applies (its own limit may be lower than asked)
            "reclaim_after": (lease.reclaim_after if held and lease is not None
                              and lease.reclaim_after is not None
                              else settings["reclaim_after"]),
            "position": self.position,
            "gpu_seconds": round(self.gpu_time.seconds(), 3),
            "parked_bytes": self.parked_bytes if self.parked_at and not held else 0,
            "parked_reason": str(self.parked_reason) if self.parked_reason else None,
            "kernel_id": self.kernel_id,
            "message": self.message,
        }
