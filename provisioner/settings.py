"""Settings every user of the agent pool shares, as traitlets (the provisioner's kernels and the
server extension's pool view). Kept apart from ``provisioner.pool``, which the kernel-side shim
imports and which must not need traitlets."""

from __future__ import annotations

import os

from traitlets import HasTraits, List, Unicode, Union, default


class AgentSettings(HasTraits):  # type: ignore[misc]
    """Which agents, and their secret: the settings every user of the pool shares (the
    provisioner's kernels and the server extension's pool view)."""

    agents = Union(
        [Unicode(), List(Unicode())],
        help="GPU agents to lease from: tcp://HOST:PORT endpoints (a comma list or a list); a "
             "DNS name resolving to several addresses (a Kubernetes headless Service) counts as "
             "one agent per address; 'auto' starts one local agent per GPU of this machine. "
             "Default: $HARP_AGENTS, else 'auto'.",
    ).tag(config=True)
    token = Unicode(
        None, allow_none=True,
        help="Shared secret of the GPU agents (their --token). Default: $HARP_TOKEN.",
    ).tag(config=True)

    @default("agents")
    def _agents_default(self) -> str:
        return os.environ.get("HARP_AGENTS", "").strip() or "auto"

    @default("token")
    def _token_default(self) -> str | None:
        return os.environ.get("HARP_TOKEN") or None
