"""Settings of the server extension, as traitlets (``c.HarpServer.agents = ...``)."""

from __future__ import annotations

from traitlets import Float
from traitlets.config import Configurable

from provisioner.settings import AgentSettings


class HarpServer(Configurable, AgentSettings):  # type: ignore[misc]
    """``agents`` and ``token`` (as the Elastic GPU kernels have them) name the agents the pool
    view shows; keep them equal to the kernels' settings."""

    status_timeout = Float(
        2.0, help="Seconds an agent may take to answer the pool view's status question before "
                  "it is shown as unreachable.",
    ).tag(config=True)
