"""A pool of agents named by one DNS name: each address it resolves to is one agent.

Kubernetes' headless Service resolves to the pod IP of every ready agent, so the GPU side grows
and shrinks without a change anywhere else. Both sides use this: kernels to find agents
(provisioner.pool), a draining agent to find the others it hands parked state to.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

Resolver = Callable[[str], list[str]]


def resolve_all(host: str) -> list[str]:
    """Every IPv4/IPv6 address ``host`` resolves to, in resolver order, without duplicates."""
    seen: dict[str, None] = {}
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
        if family in (socket.AF_INET, socket.AF_INET6):
            seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


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


def checked_pool(spec: str) -> list[str]:
    """``"tcp://a:5555, tcp://b:5555"`` -> its endpoints, each checked for form (not resolved)."""
    endpoints = [item.strip() for item in spec.split(",") if item.strip()]
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
            raise ValueError(f"pool endpoint {endpoint!r} is not of the form tcp://HOST:PORT")
    return endpoints
