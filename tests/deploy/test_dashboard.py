"""deploy/grafana/harp-dashboard.json: it queries exactly the agent's metric families, every one of
them, through the dashboard's datasource variable, with a sound panel layout."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gpu_agent.metrics import AgentMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "harp-dashboard.json"
METRIC = re.compile(r"\bharp_[a-z_]+\b")


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def exported_families() -> dict[str, set[str]]:
    """Each family AgentMetrics exports, with the sample names a query may use for it."""
    metrics = AgentMetrics()
    metrics.info("0", "emulated", "none", 1)
    text = metrics.exposition()[0].decode()
    return {family.name: {s.name for s in family.samples}
            for family in text_string_to_metric_families(text)}


def test_every_query_names_a_real_family_and_every_family_is_shown() -> None:
    families = exported_families()
    sample_names = set().union(*families.values())
    referenced = {name for expr in expressions(load()) for name in METRIC.findall(expr)}
    assert referenced, "the dashboard queries nothing"
    assert referenced <= sample_names, f"not exported by the agent: {referenced - sample_names}"
    unshown = {family for family, samples in families.items() if not samples & referenced}
    assert not unshown, f"families with no panel: {unshown}"


def test_queries_go_through_the_datasource_variable_and_select_agents() -> None:
    dashboard = load()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            for metric_use in re.findall(r"harp_[a-z_]+\{[^}]*\}|harp_[a-z_]+(?![a-z_{])",
                                         target["expr"]):
                assert 'instance=~"$instance"' in metric_use, (panel["title"], metric_use)


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    dashboard = load()
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
