"""harp_jupyter.server.metrics: lease waits timed from lease changes, on an injected clock."""

from __future__ import annotations

from harp_jupyter.server import metrics
from harp_jupyter.server.metrics import LEASE_WAIT, LeaseWaits, NotebookMetrics


def wait_count() -> float:
    return next(s.value for s in LEASE_WAIT.collect()[0].samples if s.name.endswith("_count"))


def wait_sum() -> float:
    return next(s.value for s in LEASE_WAIT.collect()[0].samples if s.name.endswith("_sum"))


def test_a_wait_is_timed_from_the_first_request_through_the_queue_to_held() -> None:
    now = [100.0]
    waits = LeaseWaits(clock=lambda: now[0])
    count, total = wait_count(), wait_sum()
    waits.on_change({"kernel_id": "k", "state": "acquiring"})
    now[0] += 2
    waits.on_change({"kernel_id": "k", "state": "queued"})
    now[0] += 3
    waits.on_change({"kernel_id": "k", "state": "held"})
    assert wait_count() == count + 1 and wait_sum() == total + 5
    waits.on_change({"kernel_id": "k", "state": "held"})  # no second observation
    assert wait_count() == count + 1


def test_kernels_that_never_get_a_gpu_are_forgotten_past_the_bound() -> None:
    waits = LeaseWaits(clock=lambda: 0.0)
    for i in range(metrics.MAX_TIMED + 50):
        waits.on_change({"kernel_id": f"k{i}", "state": "acquiring"})
    assert len(waits._since) == metrics.MAX_TIMED


def test_unknown_states_are_not_new_labels() -> None:
    families = list(NotebookMetrics(lambda: [{"state": "held"}, {"state": "made-up"}]).collect())
    kernels = next(f for f in families if f.name == "harp_notebook_kernels")
    labels = {s.labels["state"]: s.value for s in kernels.samples}
    assert set(labels) == set(metrics.STATES) and labels["held"] == 1
