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


def is_free(status: dict[str, Any]) -> bool:
    """A lease requested there now is granted at once."""
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
    if parked_at in statuses and is_free(statuses[parked_at]):
        return parked_at  # type: ignore[return-value]
    order = list(statuses)
    free = [e for e in order if is_free(statuses[e])]
    if free:
        return min(free, key=lambda e: (parked_bytes(statuses[e]), order.index(e)))
    return min(order, key=lambda e: (queue_length(statuses[e]), e != parked_at, order.index(e)))


def likely_agent(statuses: dict[str, dict[str, Any]], parked_at: str | None = None) -> str:
    """The agent a lease would most likely be served by (device queries before any lease ask
    it): the held lease's or parked state's agent if it answered, else ``choose_agent``'s."""
    if parked_at in statuses:
        return parked_at  # type: ignore[return-value]
    return choose_agent(statuses, parked_at)
