"""AgentMetrics: each family's values over real HTTP, bounded labels, health and ready probes."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpu_agent.metrics import REFUSAL_KINDS, WORKER_RESTART_REASONS, AgentMetrics

FAMILIES = {
    "harp_leases_held", "harp_leases_queued", "harp_lease_wait_seconds",
    "harp_gpu_seconds_held_total", "harp_gpu_seconds_held_idle_total", "harp_reclaims_total",
    "harp_parks_total", "harp_park_bytes_total", "harp_park_seconds", "harp_restores_total",
    "harp_restore_bytes_total", "harp_restore_seconds", "harp_parked_bytes", "harp_sessions",
    "harp_worker_restarts_total", "harp_refusals_total", "harp_gpu_utilization_ratio",
    "harp_gpu_memory_used_bytes", "harp_gpu_memory_total_bytes", "harp_slots",
    "harp_agent_info",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str) -> tuple[int, str, str]:
    """Status, body and content type of a GET, 4xx/5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode(), reply.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers["Content-Type"]


def scrape(port: int) -> Samples:
    status, text, content_type = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def served() -> Iterator[tuple[AgentMetrics, int]]:
    metrics = AgentMetrics()
    port = metrics.serve("127.0.0.1", 0)
    yield metrics, port
    metrics.close()


def test_port_zero_binds_a_free_port_and_close_frees_it() -> None:
    metrics = AgentMetrics()
    port = metrics.serve("127.0.0.1", 0)
    assert port > 0
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    with pytest.raises(RuntimeError):
        metrics.serve("127.0.0.1", 0)
    metrics.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_exactly_the_documented_families_and_no_created_series(
        served: tuple[AgentMetrics, int]) -> None:
    metrics, port = served
    metrics.info("0.1.0", "emulated", "Emulated GPU", 1)
    text = get(f"http://127.0.0.1:{port}/metrics")[1]
    names = {f.name for f in text_string_to_metric_families(text)}
    # the parser names counters without _total and info without _info: compare sample names
    sample_names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert not any(name.endswith("_created") for name in sample_names), sample_names
    exported = {n for n in FAMILIES if n in sample_names or f"{n}_count" in sample_names}
    assert exported == FAMILIES
    assert all(name.startswith("harp_") for name in names)


def test_each_family_has_the_values_recorded(served: tuple[AgentMetrics, int]) -> None:
    metrics, port = served
    metrics.info("1.2.3", "pycuda", "NVIDIA H200", 4)
    metrics.leases(held=3, queued=2)
    metrics.lease_granted(0.004)
    metrics.lease_granted(12.0)
    metrics.gpu_seconds(held_s=10.0, idle_s=4.0)
    metrics.gpu_seconds(held_s=5.0, idle_s=1.0)
    metrics.reclaimed()
    metrics.parked(1 << 30, 0.4)
    metrics.parked(1 << 20, 0.01)
    metrics.restored(1 << 30, 0.2)
    metrics.parked_bytes(memory=7 << 20, disk=3 << 20)
    metrics.sessions(active=3, parked=5)
    metrics.worker_restarted("out_of_memory")
    metrics.refused("unauthorized")
    metrics.refused("unauthorized")
    metrics.gpu(0.75, used=40 << 30, total=141 << 30)

    samples = scrape(port)
    assert value(samples, "harp_agent_info", version="1.2.3", executor="pycuda",
                 device="NVIDIA H200") == 1
    assert value(samples, "harp_slots") == 4
    assert value(samples, "harp_leases_held") == 3
    assert value(samples, "harp_leases_queued") == 2
    assert value(samples, "harp_lease_wait_seconds_count") == 2
    assert value(samples, "harp_lease_wait_seconds_sum") == pytest.approx(12.004)
    assert value(samples, "harp_lease_wait_seconds_bucket", le="0.005") == 1
    assert value(samples, "harp_lease_wait_seconds_bucket", le="+Inf") == 2
    assert value(samples, "harp_gpu_seconds_held_total") == 15
    assert value(samples, "harp_gpu_seconds_held_idle_total") == 5
    assert value(samples, "harp_reclaims_total") == 1
    assert value(samples, "harp_parks_total") == 2
    assert value(samples, "harp_park_bytes_total") == (1 << 30) + (1 << 20)
    assert value(samples, "harp_park_seconds_count") == 2
    assert value(samples, "harp_park_seconds_bucket", le="0.01") == 1
    assert value(samples, "harp_restores_total") == 1
    assert value(samples, "harp_restore_bytes_total") == 1 << 30
    assert value(samples, "harp_restore_seconds_sum") == pytest.approx(0.2)
    assert value(samples, "harp_parked_bytes", where="memory") == 7 << 20
    assert value(samples, "harp_parked_bytes", where="disk") == 3 << 20
    assert value(samples, "harp_sessions", state="active") == 3
    assert value(samples, "harp_sessions", state="parked") == 5
    assert value(samples, "harp_worker_restarts_total", reason="out_of_memory") == 1
    assert value(samples, "harp_worker_restarts_total", reason="crashed") == 0
    assert value(samples, "harp_refusals_total", kind="unauthorized") == 2
    assert value(samples, "harp_refusals_total", kind="draining") == 0
    assert value(samples, "harp_gpu_utilization_ratio") == 0.75
    assert value(samples, "harp_gpu_memory_used_bytes") == 40 << 30
    assert value(samples, "harp_gpu_memory_total_bytes") == 141 << 30

    metrics.leases(held=0, queued=0)
    samples = scrape(port)
    assert value(samples, "harp_leases_held") == 0 and value(samples, "harp_leases_queued") == 0


def test_labels_stay_within_their_fixed_sets(served: tuple[AgentMetrics, int]) -> None:
    metrics, port = served
    for i in range(200):
        metrics.worker_restarted(f"segfault in kernel {i}")
        metrics.refused(f"kernel-{i}")
    metrics.worker_restarted("hung")
    samples = scrape(port)
    reasons = {dict(labels)["reason"] for name, labels in samples
               if name == "harp_worker_restarts_total"}
    kinds = {dict(labels)["kind"] for name, labels in samples if name == "harp_refusals_total"}
    assert reasons == WORKER_RESTART_REASONS and kinds == REFUSAL_KINDS
    assert value(samples, "harp_worker_restarts_total", reason="other") == 200
    assert value(samples, "harp_worker_restarts_total", reason="hung") == 1
    assert value(samples, "harp_refusals_total", kind="other") == 200


def test_counters_ignore_negative_deltas_and_the_ratio_is_clamped(
        served: tuple[AgentMetrics, int]) -> None:
    metrics, port = served
    metrics.gpu_seconds(held_s=2.0, idle_s=1.0)
    metrics.gpu_seconds(held_s=-1.0, idle_s=-0.5)
    metrics.gpu(37.0, used=1, total=2)  # a percentage passed by mistake reads as fully busy
    samples = scrape(port)
    assert value(samples, "harp_gpu_seconds_held_total") == 2
    assert value(samples, "harp_gpu_seconds_held_idle_total") == 1
    assert value(samples, "harp_gpu_utilization_ratio") == 1


def test_two_agents_in_one_process_keep_separate_figures() -> None:
    first, second = AgentMetrics(), AgentMetrics()
    first_port, second_port = first.serve("127.0.0.1", 0), second.serve("127.0.0.1", 0)
    try:
        first.leases(held=1, queued=0)
        second.leases(held=4, queued=7)
        assert value(scrape(first_port), "harp_leases_held") == 1
        assert value(scrape(second_port), "harp_leases_queued") == 7
    finally:
        first.close()
        second.close()


def test_health_and_ready_follow_their_callables() -> None:
    state = {"healthy": True, "ready": False}

    def ready() -> bool:
        if state["ready"] is None:
            raise RuntimeError("lease table is gone")
        return bool(state["ready"])

    metrics = AgentMetrics(health=lambda: state["healthy"], ready=ready)
    port = metrics.serve("127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    try:
        assert get(f"{base}/healthz")[:2] == (200, "ok\n")
        assert get(f"{base}/readyz")[:2] == (503, "not ready\n")
        state["ready"] = True
        assert get(f"{base}/readyz")[:2] == (200, "ok\n")
        state["healthy"] = False
        assert get(f"{base}/healthz")[:2] == (503, "unhealthy\n")
        assert get(f"{base}/readyz")[0] == 200  # each probe asks its own callable
        state["ready"] = None  # a raising check is a failing check, and the server lives on
        assert get(f"{base}/readyz")[0] == 503
        assert get(f"{base}/metrics")[0] == 200
        assert get(f"{base}/healthz?verbose=1")[0] == 503
        assert get(f"{base}/nothing-here")[0] == 404
    finally:
        metrics.close()


def test_openmetrics_is_served_when_asked_for(served: tuple[AgentMetrics, int]) -> None:
    metrics, port = served
    metrics.leases(held=2, queued=0)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        body = reply.read().decode()
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
    assert "harp_leases_held 2.0" in body and body.rstrip().endswith("# EOF")
    assert "_created" not in body
