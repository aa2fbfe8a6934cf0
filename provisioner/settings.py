"""Settings every user of the agent pool shares, as traitlets (the provisioner's kernels and the
server extension's pool view). Kept apart from ``provisioner.pool``, which the kernel-side shim
imports and which must not need traitlets."""

from __future__ import annotations

import logging
import os

from traitlets import HasTraits, List, Unicode, Union, default

log = logging.getLogger("harp")
_warned_deprecated_agent = False


def agents_from_environment(environ: dict[str, str] | None = None) -> str:
    """$HARP_AGENTS, else the deprecated $HARP_AGENT (with one warning per process), else
    'auto'. HARP_AGENTS is the one documented spelling; HARP_AGENT is still read so that a
    kernel started with only the old variable (nbconvert, papermill, an editor) finds its agent."""
    global _warned_deprecated_agent
    env = os.environ if environ is None else environ
    agents = env.get("HARP_AGENTS", "").strip()
    if agents:
        return agents
    deprecated = env.get("HARP_AGENT", "").strip()
    if deprecated:
        if not _warned_deprecated_agent:
            _warned_deprecated_agent = True
            log.warning("harp: HARP_AGENT is deprecated: set HARP_AGENTS=%s instead", deprecated)
        return deprecated
    return "auto"


class AgentSettings(HasTraits):  # type: ignore[misc]
    """Which agents, and their secret: the settings every user of the pool shares (the
    provisioner's kernels and the server extension's pool view)."""

    agents = Union(
        [Unicode(), List(Unicode())],
        help="GPU agents to lease from: tcp://HOST:PORT endpoints (a comma list or a list); a "
             "DNS name resolving to several addresses (a Kubernetes headless Service) counts as "
             "one agent per address; 'auto' starts one local agent per GPU of this machine. "
             "Default: $HARP_AGENTS (the deprecated $HARP_AGENT is read "
             "when it is unset), else 'auto'.",
    ).tag(config=True)
    token = Unicode(
        None, allow_none=True,
        help="Shared secret of the GPU agents (their --token). Default: $HARP_TOKEN.",
    ).tag(config=True)

    @default("agents")
    def _agents_default(self) -> str:
        return agents_from_environment()

    @default("token")
    def _token_default(self) -> str | None:
        return os.environ.get("HARP_TOKEN") or None
