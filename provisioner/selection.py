"""Which agent an acquire goes to, from the agents' ``status`` replies. Pure logic.

Prefer the agent that holds this kernel's parked state when its GPU is free (no move); else a free
GPU (the one with the fewest parked bytes: the most host memory left for parking); else queue
where the queue is shortest, our parked agent first among equals. An agent serving its GPU in
several slots (``--slots``) is free while a slot is, and its queue counts per slot.
"""

from __future__ import annotations

from typing import Any


def _leases(status: dict[str, Any]) -> dict[str, Any]:
    leases = status.get("leases")
    return leases if isinstance(leases, dict) else {}


def is_draining(status: dict[str, Any]) -> bool:
    """The agent is shutting down: it grants nothing more (its parked state is still served)."""
    return bool(status.get("draining") or _leases(status).get("draining"))


def is_free(status: dict[str, Any]) -> bool:
    """A lease requested there now is granted at once."""
    if is_draining(status):
        return False
    leases = _leases(status)
    if leases.get("queue"):
        return False
    free_slots = leases.get("free_slots")
    if type(free_slots) is int:
        return free_slots > 0
    return leases.get("holder") is None


def queue_length(status: dict[str, Any]) -> float:
    """Leases ahead of a new request per slot: the holders plus everyone queued."""
    leases = _leases(status)
    holders = leases.get("holders")
    held = len(holders) if isinstance(holders, list) else int(leases.get("holder") is not None)
    slots = leases.get("slots")
    per = slots if type(slots) is int and slots > 0 else 1
    return (held + len(leases.get("queue") or [])) / per


def parked_bytes(status: dict[str, Any]) -> int:
    return sum(int(p.get("bytes") or 0) for p in _leases(status).get("parked") or [])


def choose_agent(statuses: dict[str, dict[str, Any]], parked_at: str | None = None) -> str:
    """The endpoint to request a lease from; ``statuses`` maps endpoint -> status reply (only
    agents that answered), in configuration order."""
    if not statuses:
        raise ValueError("no agent answered")
    # a draining agent only refuses (asked anyway when it is all there is: it says why)
    statuses = {e: s for e, s in statuses.items() if not is_draining(s)} or statuses
    if parked_at in statuses and is_free(statuses[parked_at]):
        return parked_at  # type: ignore[return-value]
    order = list(statuses)
    free = [e for e in order if is_free(statuses[e])]
    if free:
        return min(free, key=lambda e: (parked_bytes(statuses[e]), order.index(e)))
    return min(order, key=lambda e: (queue_length(statuses[e]), e != parked_at, order.index(e)))


def where_parked(statuses: dict[str, dict[str, Any]], kernel_id: str,
                 parked_at: str | None) -> str | None:
    """Where this kernel's parked state is: ``parked_at`` unless another agent lists it (a
    draining agent moved it there; an agent lists its own kernel's parked state only to it)."""
    holding = [e for e, s in statuses.items()
               if any(p.get("kernel_id") == kernel_id for p in _leases(s).get("parked") or [])]
    if not holding or parked_at in holding:
        return parked_at
    return next((e for e in holding if not is_draining(statuses[e])), holding[0])


def likely_agent(statuses: dict[str, dict[str, Any]], parked_at: str | None = None) -> str:
    """The agent a lease would most likely be served by (device queries before any lease ask
    it): the held lease's or parked state's agent if it answered, else ``choose_agent``'s."""
    if parked_at in statuses:
        return parked_at  # type: ignore[return-value]
    return choose_agent(statuses, parked_at)
