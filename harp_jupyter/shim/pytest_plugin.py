"""``pytest -p harp_jupyter.shim.pytest_plugin``: run a pycuda test suite through the shim.

The agent comes from HARP_AGENT, or, under pytest-xdist, from HARP_AGENTS (comma-separated):
worker gwN uses the N-th agent (modulo their number), so workers' compiles run in parallel.
"""

from __future__ import annotations

import os
from typing import Any


def pytest_configure(config: Any) -> None:
    from harp_jupyter.shim import activate

    agents = [a for a in os.environ.get("HARP_AGENTS", "").split(",") if a.strip()]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    if agents:
        index = int(worker[2:]) if worker[2:].isdigit() else 0
        activate(agents[index % len(agents)].strip())
    else:
        activate()
