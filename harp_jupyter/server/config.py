"""Settings of the server extension, as traitlets (``c.HarpServer.agents = ...``)."""

from __future__ import annotations

import os

from traitlets import Float, Unicode, default
from traitlets.config import Configurable


class HarpServer(Configurable):  # type: ignore[misc]
    agents = Unicode(
        help="GPU agents the pool view shows: tcp://HOST:PORT endpoints, comma-separated, or "
             "'auto' (the local agents Elastic GPU kernels start on this machine's GPUs). "
             "Default: $HARP_AGENTS, else 'auto'; keep it equal to the kernels' setting.",
    ).tag(config=True)

    token = Unicode(
        None, allow_none=True,
        help="Shared secret of the GPU agents (their --token). Default: $HARP_TOKEN.",
    ).tag(config=True)

    status_timeout = Float(
        2.0, help="Seconds an agent may take to answer the pool view's status question before "
                  "it is shown as unreachable.",
    ).tag(config=True)

    @default("agents")
    def _agents_default(self) -> str:
        return os.environ.get("HARP_AGENTS", "").strip() or "auto"

    @default("token")
    def _token_default(self) -> str | None:
        return os.environ.get("HARP_TOKEN") or None
