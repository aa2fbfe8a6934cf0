"""The pool of GPU agents a provisioner may lease from.

The pool is configuration, not a service: a list of ZeroMQ endpoints. A host name that resolves to
several addresses (a Kubernetes headless Service) counts as one agent per address, so scaling the
GPU side needs no change on the notebook side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from urllib.parse import urlsplit

from gpu_agent.pool_names import Resolver, expand_endpoints, resolve_all
from provisioner import local_agents

__all__ = [
    "Resolver",
    "checked_endpoints",
    "configured_endpoints",
    "expand_endpoints",
    "parse_endpoints",
    "resolve_agents",
    "resolve_all",
]


def parse_endpoints(spec: str | Iterable[str]) -> list[str]:
    """Endpoints from ``"tcp://a:5555, tcp://b:5555"`` or a list; each checked for form."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    endpoints = [item.strip() for item in items if item.strip()]
    for endpoint in endpoints:
        if endpoint == "auto":
            continue
        parts = urlsplit(endpoint)
        if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
            raise ValueError(
                f"agent endpoint {endpoint!r} is not of the form tcp://HOST:PORT "
                "(or 'auto' for local agents on local GPUs)")
    return endpoints


def checked_endpoints(spec: str | Iterable[str]) -> list[str]:
    """The agents of a setting (``HARP_AGENTS``) as written, checked but not resolved (no DNS);
    ``["auto"]`` for local agents. ValueError for a malformed setting."""
    endpoints = parse_endpoints(spec)
    if "auto" in endpoints and endpoints != ["auto"]:
        raise ValueError("agents: 'auto' cannot be mixed with agent endpoints")
    return endpoints


def configured_endpoints(spec: str | Iterable[str]) -> list[str]:
    """``checked_endpoints``, with names resolving to several addresses expanded (DNS)."""
    endpoints = checked_endpoints(spec)
    return endpoints if endpoints == ["auto"] else expand_endpoints(endpoints)


async def resolve_agents(spec: str | Iterable[str], token: str | None) -> list[str]:
    """The agent endpoints to use now: names resolved again each time (a headless Service grows
    and shrinks), in a thread so a slow DNS stalls nobody; ``auto`` starts the local agents.
    ValueError for a malformed setting, local_agents.NoLocalGPU for auto without a GPU."""
    endpoints = await asyncio.to_thread(configured_endpoints, spec)
    if endpoints != ["auto"]:
        return endpoints
    return await local_agents.shared(token).endpoints_async()
