"""The jupyter_server extension behind the Elastic GPU sidebar: REST under ``/harp/api/`` and
lease events on the server's event bus (docs/sidebar-api.md). Enabled by the config file pip
installs (jupyter-config/server-config/harp_jupyter.json)."""

from __future__ import annotations

from typing import Any

from harp_jupyter.server.config import HarpServer
from harp_jupyter.server.events import LEASE_EVENT_SCHEMA_ID, LeaseEvents
from harp_jupyter.server.handlers import routes
from harp_jupyter.server.kernels import ElasticKernels
from harp_jupyter.server.metrics import install as install_metrics
from harp_jupyter.server.pool import PoolView

__all__ = ["LEASE_EVENT_SCHEMA_ID", "HarpServer"]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "harp_jupyter.server"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    config = HarpServer(parent=serverapp)
    pool = PoolView(config)
    kernels = ElasticKernels(serverapp.kernel_manager, serverapp.session_manager,
                             parked_source=pool.parked_by_kernel)
    events = LeaseEvents(serverapp.event_logger, serverapp.io_loop)
    events.start()
    serverapp.web_app.settings.update({"harp_kernels": kernels, "harp_pool": pool,
                                       "harp_events": events})
    serverapp.web_app.add_handlers(".*$", routes(serverapp.web_app.settings["base_url"]))
    install_metrics()  # the notebook side on the server's own /metrics
    serverapp.log.info("harp: Elastic GPU API at /harp/api/ (agents: %s)", config.agents)
