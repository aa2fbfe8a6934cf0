"""Which agents a kernel without a provisioner talks to: ``activate(agent=...)``, else
``HARP_AGENTS`` (a comma list or a name with several addresses), else the deprecated
``HARP_AGENT``. The session and the direct lease source both ask; neither imports the other for
it."""

from __future__ import annotations

import os

from harp_jupyter import shim
from harp_jupyter.shim.errors import AgentNotConfiguredError
from provisioner.pool import expand_endpoints, parse_endpoints


def configured_endpoint() -> str:
    """The agent endpoint: ``activate(agent=...)``, else the first of HARP_AGENTS, else the
    deprecated HARP_AGENT."""
    endpoint = shim.configured_agent()
    if not endpoint:
        text = os.environ.get("HARP_AGENTS", "").strip()
        if text and text != "auto":
            endpoint = parse_endpoints(text)[0]
    endpoint = endpoint or os.environ.get("HARP_AGENT", "").strip()
    if not endpoint:
        raise AgentNotConfiguredError(
            "no GPU agent configured: set HARP_AGENTS=tcp://HOST:PORT (or run the script with"
            " `harp run --agents tcp://HOST:PORT`, or call"
            " harp_jupyter.shim.activate(agent=...))")
    return endpoint


def configured_agents() -> list[str]:
    """The pool a direct lease source leases from."""
    text = os.environ.get("HARP_AGENTS", "").strip()
    if not text or text == "auto":
        return [configured_endpoint()]
    return expand_endpoints(parse_endpoints(text))
