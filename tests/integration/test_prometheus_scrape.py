"""A real Prometheus server scrapes AgentMetrics and answers lease figures through its query API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_server import JOB, Result, prometheus_binary, running_prometheus

from gpu_agent.metrics import AgentMetrics

pytestmark = pytest.mark.skipif(
    prometheus_binary() is None,
    reason="Debian's prometheus is not installed (scripts/test installs it: "
           "apt-get install prometheus)")


@pytest.fixture
def agent_metrics() -> Iterator[tuple[AgentMetrics, str]]:
    metrics = AgentMetrics()
    port = metrics.serve("127.0.0.1", 0)
    yield metrics, f"127.0.0.1:{port}"
    metrics.close()


def only_value(result: Result) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_prometheus_reads_leases_and_follows_changes(
        agent_metrics: tuple[AgentMetrics, str], tmp_path: Path) -> None:
    metrics, target = agent_metrics
    metrics.info("0.1.0", "emulated", "Emulated GPU", 4)
    metrics.leases(held=3, queued=2)
    for wait_s in (0.003, 0.004, 2.0):
        metrics.lease_granted(wait_s)
    metrics.parked(64 << 20, 0.05)

    with running_prometheus([target], tmp_path / "prometheus") as prometheus:
        held = prometheus.wait_for("harp_leases_held")
        assert only_value(held) == 3
        assert held[0]["metric"]["job"] == JOB and held[0]["metric"]["instance"] == target
        assert only_value(prometheus.query("harp_leases_queued")) == 2
        assert only_value(prometheus.query("harp_lease_wait_seconds_count")) == 3
        assert only_value(prometheus.query("harp_park_bytes_total")) == 64 << 20
        info = prometheus.query("harp_agent_info")
        assert info[0]["metric"]["executor"] == "emulated" and only_value(info) == 1
        assert only_value(prometheus.query(f'up{{job="{JOB}"}}')) == 1

        # a later scrape sees the agent's new state
        metrics.leases(held=1, queued=0)
        prometheus.wait_for("harp_leases_held == 1")
        assert only_value(prometheus.query("harp_leases_queued")) == 0
