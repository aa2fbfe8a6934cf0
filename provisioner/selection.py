"""Which agent an acquire goes to, from the agents' ``status`` replies. Pure logic.

Prefer the agent that holds this kernel's parked state when its GPU is free (no move); else a free
GPU (the one with the fewest parked bytes: the most host memory left for parking); else queue
where the queue is shortest, our parked agent first among equals.
"""

from __future__ import annotations

from typing import Any


def _leases(status: dict[str, Any]) -> dict[str, Any]:
    leases = status.get("leases")
    return leases if isinstance(leases, dict) else {}


def is_free(status: dict[str, Any]) -> bool:
    leases = _leases(status)
    return leases.get("holder") is None and not leases.get("queue")


def queue_length(status: dict[str, Any]) -> int:
    """Leases ahead of a new request: the holder plus everyone queued."""
    leases = _leases(status)
    return int(leases.get("holder") is not None) + len(leases.get("queue") or [])


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
