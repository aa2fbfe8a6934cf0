"""A real Prometheus server scrapes AgentMetrics and answers lease figures through its query API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_server import JOB, Result, prometheus_binary, running_prometheus

from gpu_agent.metrics import AgentMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "harp-dashboard.json"
# what Grafana puts in place of the dashboard's variables; 5 s holds several 1 s scrapes
GRAFANA_VARIABLES = {"$__rate_interval": "5s", "$__range": "1h", "$job": ".*",
                     "$instance": ".*"}

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


def record_some_of_everything(metrics: AgentMetrics) -> None:
    metrics.info("0.1.0", "emulated", "Emulated GPU", 2)
    metrics.leases(held=2, queued=1)
    metrics.lease_granted(0.01)
    metrics.gpu_seconds(held_s=30.0, idle_s=12.0)
    metrics.reclaimed()
    metrics.parked(1 << 20, 0.02)
    metrics.restored(1 << 20, 0.01)
    metrics.parked_bytes(memory=1 << 20, disk=0)
    metrics.sessions(active=2, parked=1)
    metrics.worker_restarted("crashed")
    metrics.refused("queue_full")
    metrics.gpu(0.5, used=1 << 30, total=16 << 30)


def test_every_grafana_dashboard_query_evaluates_to_data(
        agent_metrics: tuple[AgentMetrics, str], tmp_path: Path) -> None:
    metrics, target = agent_metrics
    record_some_of_everything(metrics)
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    queries = {(panel["title"], t["refId"]): t["expr"]
               for panel in panels for t in panel.get("targets", [])}
    assert len(queries) > 10

    with running_prometheus([target], tmp_path / "prometheus") as prometheus:
        # rate() and increase() need a few samples inside their window
        prometheus.wait_for("count_over_time(harp_slots[1m]) >= 4")
        empty = []
        for (title, ref), expr in queries.items():
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{title}: a variable Grafana would fill is left: {expr}"
            if not prometheus.query(expr):  # a PromQL error fails inside query()
                empty.append(f"{title} [{ref}]: {expr}")
        assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with prometheus")
def test_the_exposition_passes_promtool(agent_metrics: tuple[AgentMetrics, str]) -> None:
    metrics, target = agent_metrics
    record_some_of_everything(metrics)
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as reply:
        exposition = reply.read()
    assert re.search(rb"^harp_leases_held 2\.0$", exposition, re.MULTILINE)
    checked = subprocess.run([str(shutil.which("promtool")), "check", "metrics"],
                             input=exposition, capture_output=True, timeout=60)
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
