"""docs/deploy.md keeps up with deploy/ and the agent's metrics: every overlay, every family."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gpu_agent.metrics import REFUSAL_KINDS, WORKER_RESTART_REASONS, AgentMetrics

REPO = Path(__file__).resolve().parents[2]
GUIDE = (REPO / "docs" / "deploy.md").read_text()


def test_the_guide_names_every_overlay_and_how_to_apply_it() -> None:
    for overlay in sorted(p.name for p in (REPO / "deploy" / "overlays").iterdir()):
        assert f"deploy/overlays/{overlay}" in GUIDE, overlay
    assert "kubectl apply -k deploy/overlays/gpu" in GUIDE
    assert "kubectl -n harp create secret generic harp-agent --from-literal=token=" in GUIDE
    for path in ("deploy/jupyterhub/values.yaml", "deploy/grafana/harp-dashboard.json",
                 "deploy/docker/agent.Dockerfile", "deploy/docker/notebook.Dockerfile"):
        assert path in GUIDE and (REPO / path).is_file(), path


def test_the_guide_documents_every_metric_family_and_label_value() -> None:
    metrics = AgentMetrics()
    metrics.info("0", "emulated", "none", 1)
    exposition = metrics.exposition()[0].decode()
    for family in text_string_to_metric_families(exposition):
        shown = family.name + ("_total" if family.type == "counter" else "")
        shown = shown + "_info" if family.type == "info" else shown
        assert f"`{shown}" in GUIDE, shown
    for value in (REFUSAL_KINDS | WORKER_RESTART_REASONS):
        assert f"`{value}`" in GUIDE, value
