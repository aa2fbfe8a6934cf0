"""bench/network_delay.py: every configuration takes every place in the order over the rounds,
and what a delay adds per sync point is paired round by round against the same round's +0 µs
relay, not taken from the medians (figures made up here; nothing is timed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_network_delay",
                                                  BENCH / "network_delay.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_network_delay"] = module
    spec.loader.exec_module(module)
    return module


def test_rotation_puts_every_configuration_first_once(bench: ModuleType) -> None:
    configs = ["local", "no relay", "+0 µs", "+50 µs", "+1000 µs"]
    orders = [bench.rotated(configs, r) for r in range(len(configs))]
    for position in range(len(configs)):
        assert sorted(order[position] for order in orders) == sorted(configs)
    assert all(sorted(order) == sorted(configs) for order in orders)


def _runs(walls: list[float], sync_points: int) -> dict[str, list[dict[str, object]]]:
    run = {"sync_points": sync_points, "cpu_s": 0.1, "workers_cpu_s": 0.1, "batches": 9,
           "losses": [1.0]}
    return {"train_sync_256": [{**run, "s": s} for s in walls],
            "train_device_loss_256": [{**run, "s": s / 2, "sync_points": 1} for s in walls]}


def test_added_per_sync_point_is_paired_by_round(bench: ModuleType) -> None:
    # the delay adds 40 x 0.1 ms = 4 ms; a slow spell hits the delayed run of round 2 and both
    # runs of round 3: the medians' difference would say 50 ms per sync point
    zero = [1.000, 1.000, 3.000]
    delayed = [1.004, 3.004, 3.004]
    measured = {
        "runs": {"local": _runs([0.5, 0.5, 0.5], 40), "no relay": _runs([0.9, 0.9, 2.9], 40),
                 "+0 µs": _runs(zero, 40), "+50 µs": _runs(delayed, 40)},
        "rtt_us": {"no relay": [100.0] * 5, "+0 µs": [150.0] * 5, "+50 µs": [250.0] * 5},
        "sync_read_us": {c: [300.0] * 5 for c in ("local", "no relay", "+0 µs", "+50 µs")},
        "launch_us": {c: [] for c in ("local", "no relay", "+0 µs", "+50 µs")},
    }
    lines = bench.tables(measured, ["local", "no relay", "+0 µs", "+50 µs"], [0.0, 50.0], 3)
    added = next(line for line in lines if line.startswith("| training loop, launch-bound")
                 and "[" in line and "x (" not in line)
    assert "| 0.10 [0.10, 50.10] |" in added
    assert bench.paired(delayed, zero, 1e3 / 40) == pytest.approx([0.1, 50.1, 0.1])
    gain = next(line for line in lines if line.startswith("| 256 |"))
    assert gain.count("2.00x [2.00, 2.00]") == 4  # the rewrite's gain, per configuration
