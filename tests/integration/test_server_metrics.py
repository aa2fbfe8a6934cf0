"""The notebook side on jupyter_server's own /metrics: a real jupyter_server with our extension,
a real Elastic GPU kernel, a real emulated agent; /metrics scraped over HTTP as Prometheus does,
with the server's token (``authenticate_prometheus`` is on by default)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("jupyter_server")
pytest.importorskip("pytest_jupyter")
from prometheus_client.parser import text_string_to_metric_families

from harp_jupyter.server.metrics import STATES
from tests.integration.test_server_api import (  # noqa: F401 (fixtures)
    GPU_CELL,
    agents,
    jp_server_config,
    post,
    run_cell,
    start_notebook,
)

pytest_plugins = ["pytest_jupyter.jupyter_server"]
pytestmark = pytest.mark.timeout(180)


async def scrape(jp_fetch: Callable[..., Any]) -> dict[tuple[str, tuple], float]:
    response = await jp_fetch("metrics")
    assert response.code == 200
    samples: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def kernels_in(samples: dict[tuple[str, tuple], float], state: str) -> float:
    return samples[("harp_notebook_kernels", (("state", state),))]


async def test_the_servers_metrics_show_kernels_by_lease_state_waits_and_parked_bytes(
        jp_fetch: Callable[..., Any], jp_serverapp: Any) -> None:
    before = await scrape(jp_fetch)
    assert "process_cpu_seconds_total" in {name for name, _ in before}  # the server's own too
    waits_before = before.get(("harp_notebook_lease_wait_seconds_count", ()), 0.0)
    kernel_id = await start_notebook(jp_fetch, "metrics.ipynb")
    samples = await scrape(jp_fetch)
    assert kernels_in(samples, "none") >= 1
    # a fixed, small label set: every lease state, nothing per kernel or per agent
    labelled = {labels for name, labels in samples if name == "harp_notebook_kernels"}
    assert labelled == {(("state", state),) for state in STATES}
    assert not any(kernel_id in str(labels) for _, labels in samples)

    assert await run_cell(jp_serverapp, kernel_id, GPU_CELL) == "499500.0\n"
    samples = await scrape(jp_fetch)
    assert kernels_in(samples, "held") == 1
    assert samples[("harp_notebook_lease_wait_seconds_count", ())] == waits_before + 1
    assert samples[("harp_notebook_gpu_seconds_held", ())] >= 0

    await post(jp_fetch, "harp", "api", "kernels", kernel_id, "release")
    samples = await scrape(jp_fetch)
    assert kernels_in(samples, "parked") == 1 and kernels_in(samples, "held") == 0
    assert samples[("harp_notebook_parked_bytes", ())] >= 4000
