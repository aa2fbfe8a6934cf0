"""The pool of GPU agents a provisioner may lease from.

The pool is configuration, not a service: a list of ZeroMQ endpoints. A host name that resolves to
several addresses (a Kubernetes headless Service) counts as one agent per address, so scaling the
GPU side needs no change on the notebook side.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from provisioner import local_agents

Resolver = Callable[[str], list[str]]


def resolve_all(host: str) -> list[str]:
    """Every IPv4/IPv6 address ``host`` resolves to, in resolver order, without duplicates."""
    seen: dict[str, None] = {}
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
        if family in (socket.AF_INET, socket.AF_INET6):
            seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


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


def expand_endpoints(endpoints: Iterable[str], resolver: Resolver = resolve_all) -> list[str]:
    """One endpoint per agent: names that resolve to several addresses become several endpoints.

    Literal addresses and names that resolve to one address are kept as written, so error
    messages show what the operator configured.
    """
    expanded: dict[str, None] = {}
    for endpoint in endpoints:
        if endpoint == "auto":
            expanded.setdefault(endpoint, None)
            continue
        parts = urlsplit(endpoint)
        host, port = parts.hostname or "", parts.port
        try:
            addresses = resolver(host)
        except OSError:
            addresses = []  # unresolvable now: keep it; connecting will say what is wrong
        if len(addresses) <= 1:
            expanded.setdefault(endpoint, None)
            continue
        for address in addresses:
            shown = f"[{address}]" if ":" in address else address
            expanded.setdefault(f"tcp://{shown}:{port}", None)
    return list(expanded)


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
